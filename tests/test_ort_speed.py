"""ort-cpu never slower than fp32: the per-kernel latency table, the kernels it keeps fp32, and the
pass that turns an int8 kernel back into an fp32 one. No timing is asserted: the tests check what
is measured and what is done with a given table."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.evaluate.kernel_latency import KernelLatency, cpu_signature, kernel_table
from hirelc_onnx.evaluate.per_node import profile_nodes
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.ort_speed import flag_slow_kernels
from hirelc_onnx.specs import weight_target
from passes.fp32_kernels import fp32_kernels, int8_kernels
from tests.oracles import random_feeds


@pytest.fixture(scope="module")
def resnet(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))  # opset 17: ORT's QDQ output loads
    feeds = random_feeds(bg.model)
    config = CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=7)
    return bg, feeds, apply_config(bg, config, calib_batches=[feeds]), config


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ran(model, feeds):
    """op type ORT ran per node name of its optimised graph."""
    _, profile = profile_nodes(model, feeds, runs=1, warmup=0)
    return {name: op for name, (op, _) in profile.items()}


def test_fp32_kernels_turns_an_int8_kernel_back_keeping_its_integers(resnet):
    bg, feeds, int8, _ = resnet
    names = int8_kernels(int8)
    assert set(names) == set(bg.kernels)  # every kernel of the uniform ort-cpu model is a QDQ kernel
    chosen = names[0]
    out = fp32_kernels(int8, [chosen])
    assert int8_kernels(out) == names[1:]
    producers = {o: n for n in out.graph.node for o in n.output}
    node = next(n for n in out.graph.node if n.name == chosen)
    assert producers[node.input[1]].op_type == "Mul"  # the decode ORT folds at load, not a DequantizeLinear
    assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers)
    assert "QLinearConv" in _ran(int8, feeds).values()
    ran = _ran(out, feeds)
    assert not any(op == "DequantizeLinear" for name, op in ran.items() if chosen in name)
    # the weight integers are the same: only the kernel's input activation is no longer rounded
    want, got = _run(int8, feeds), _run(out, feeds)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert len(out.SerializeToString()) < 1.01 * len(int8.SerializeToString())


def test_latency_table_measures_every_kernel_and_is_cached(resnet, tmp_path, monkeypatch):
    import hirelc_onnx.evaluate.kernel_latency as kernel_latency

    bg, feeds, int8, _ = resnet
    kernels = sorted(bg.kernels)
    monkeypatch.setattr(kernel_latency, "_load", lambda: 1e3)  # a busy machine: measured, not kept
    table, cached = kernel_table(bg.model, int8, {1: feeds}, kernels, runs=2, cache=tmp_path)
    assert not cached and set(table) == set(kernels) and not list(tmp_path.iterdir())
    monkeypatch.setattr(kernel_latency, "_load", lambda: 0.0)
    table, cached = kernel_table(bg.model, int8, {1: feeds}, kernels, runs=2, cache=tmp_path)
    assert not cached and set(table) == set(kernels)
    assert all(row.fp32_ms[1] > 0 and row.int8_ms[1] > 0 and row.model_ms[1] >= row.fp32_ms[1]
               for row in table.values())
    again, cached = kernel_table(bg.model, int8, {1: feeds}, kernels, runs=2, cache=tmp_path)
    assert cached and again == table
    assert cpu_signature()


def test_kernel_time_interpolates_through_the_pruned_probe():
    """Given times: proportional without a probe; through the probe's point with one; a kernel the
    probe ran slower than full (ORT's int8 convolutions cut below 16 channels) is never estimated
    faster by cutting more."""
    plain = KernelLatency({32: 1.0}, {32: 0.5}, {32: 10.0})
    assert plain.time(32, False, 0.25) == pytest.approx(0.25) and plain.time(32, True, 0.5) == pytest.approx(0.25)
    linear = KernelLatency({32: 1.0}, {32: 0.5}, {32: 10.0}, 0.25, {32: 0.25}, {32: 0.125})
    for share in (1.0, 0.6, 0.25, 0.1):  # a probe on the proportional line changes nothing
        assert linear.time(32, False, share) == pytest.approx(share)
        assert linear.time(32, True, share) == pytest.approx(0.5 * share)
    packed = KernelLatency({32: 1.0}, {32: 0.4}, {32: 10.0}, 0.25, {32: 0.5}, {32: 0.8})
    assert packed.time(32, False, 1.0) == pytest.approx(1.0) and packed.time(32, False, 0.25) == pytest.approx(0.5)
    assert packed.time(32, False, 0.625) == pytest.approx(0.75)  # halfway between the two points
    assert packed.time(32, True, 0.625) == pytest.approx(0.6)
    assert packed.time(32, True, 0.1) == pytest.approx(0.8)  # below the probe: at most the slower point
    assert packed.time(32, False, 0.125) == pytest.approx(0.5 - 0.125 * 0.5 / 0.75)
    assert KernelLatency.from_dict(packed.as_dict()) == packed and KernelLatency.from_dict(plain.as_dict()) == plain


def test_latency_table_times_the_pruned_probe(reference_models, tmp_path, monkeypatch):
    """int8_latency_table also times both models with every prunable group at PROBE_KEEP: each cut
    kernel's row holds its MACs share there (from the cost model) and probe times; and the speed
    estimate reads them (a table whose probe says cutting is slower does not promise a speedup)."""
    from hirelc_onnx.evaluate.kernel_latency import PROBE_KEEP
    from hirelc_onnx.search.ort_speed import int8_latency_table
    from hirelc_onnx.search.speed import SpeedGoal

    monkeypatch.setenv("HIRELC_CACHE", str(tmp_path))
    bg = build_block_graph(load_model(reference_models("vgg")))
    feeds = random_feeds(bg.model)
    table, _ = int8_latency_table(bg, [feeds], batches=(1,), runs=2)
    fp32 = CompressionConfig.uniform(bg.kernels, bits=32)
    cut = CompressionConfig({n: replace(fp32.get(n), keep_ratio=PROBE_KEEP) if bg.prunable_kernel(n) else fp32.get(n)
                             for n in bg.kernels}, channel_multiple=bg.channel_multiple)
    cost = model_cost(bg, cut)
    probed = {n for n, row in table.items() if row.probe_share is not None}
    assert probed and probed <= set(bg.kernels)
    for n in probed:
        row = table[n]
        assert row.probe_share == pytest.approx(cost.kernels[n].macs / bg.kernels[n].macs)
        assert row.fp32_probe_ms[1] > 0 and row.int8_probe_ms[1] > 0
    slow = {n: replace(row, fp32_probe_ms={1: 2 * row.fp32_ms[1]}, int8_probe_ms={1: 2 * row.int8_ms[1]})
            if n in probed else row for n, row in table.items()}
    goal = SpeedGoal(1.5, 1, slow, bg.model)
    assert goal.estimate(bg, cut) < 1.0 < SpeedGoal(1.5, 1, {n: replace(r, probe_share=None) for n, r in slow.items()},
                                                   bg.model).estimate(bg, cut)


def test_a_kernel_slower_in_int8_is_written_as_an_fp32_kernel(resnet):
    bg, feeds, _, config = resnet
    slow, fast = sorted(bg.kernels)[:2]
    table = {slow: KernelLatency({1: 0.1, 32: 1.0}, {1: 0.2, 32: 1.5}, {1: 1.0, 32: 10.0}),
             fast: KernelLatency({1: 0.1, 32: 1.0}, {1: 0.11, 32: 0.5}, {1: 1.0, 32: 10.0})}
    assert table[slow].slower and not table[fast].slower
    flagged, reasons = flag_slow_kernels(bg, table)
    assert list(reasons) == [slow] and "slower" in reasons[slow]
    assert weight_target(flagged.kernels[slow], "ort-cpu") == "storage"
    assert weight_target(flagged.kernels[fast], "ort-cpu") == "ort-cpu"
    model = apply_config(flagged, config, calib_batches=[feeds])
    assert slow not in int8_kernels(model) and fast in int8_kernels(model)
    weights = {t.name: t for t in model.graph.initializer}
    cost = model_cost(flagged, config)
    assert cost.kernels[slow].weight_bytes < cost.kernels[slow].fp32_weight_bytes / 3  # still stored small
    assert np.isfinite(_run(model, feeds)).all() and weights


def test_with_every_kernel_fp32_and_still_slower_the_activation_pairs_go(resnet, monkeypatch):
    """whole_model_check's last step (the ViT: every MatMul back in fp32 and still 0.73x, the
    Quantize / Dequantize pairs around Add, LayerNormalization and Softmax costing the time)."""
    import hirelc_onnx.search.ort_speed as ort_speed

    bg, feeds, int8, _ = resnet
    timed = []

    def speedups(fp32, model, *args):  # slower while any activation is still quantized
        timed.append(model)
        return {1: 0.5 if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else 1.0}

    monkeypatch.setattr(ort_speed, "_speedups", speedups)
    model, fallbacks = ort_speed.whole_model_check(bg.model, int8, {}, batches=(1,))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert not int8_kernels(model) and fallbacks[-1]["kernel"].startswith("(activation")
    assert {f["kernel"] for f in fallbacks[:-1]} == set(bg.kernels)
    # the weights' integers are kept (decoded at load); the output is the fp32 model's up to their rounding
    want, got = _run(bg.model, feeds), _run(model, feeds)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert len(model.SerializeToString()) < 0.5 * len(bg.model.SerializeToString())


def test_every_kernel_turned_back_keeps_the_activations_the_quantizer_folded(resnet):
    """The quantizer folds a Relu in front of a QuantizeLinear into its range; turning every kernel
    back must keep that clamp (a plain bypass dropped it: 0.17 accuracy on ResNet-20)."""
    bg, feeds, int8, _ = resnet
    out = fp32_kernels(int8, int8_kernels(int8))
    assert int8_kernels(out) == []
    assert any(n.op_type == "Clip" for n in out.graph.node)
    want, got, fp32 = _run(int8, feeds), _run(out, feeds), _run(bg.model, feeds)
    scale = np.abs(fp32).max()
    assert np.abs(got - fp32).max() < 0.1 * scale  # only the weights' and activations' rounding is left
    assert np.abs(got - want).max() < 0.1 * scale


def test_outside_the_int8_kernels_the_quantize_dequantize_go(reference_models):
    """`fp32_outside_kernels` on the ViT: the int8 MatMuls keep their pairs, the pairs around Add,
    LayerNormalization and Softmax go, and the constants ORT's quantizer stored in 8 bits (norm
    scales, biases, the position table) are decoded by nodes ORT folds at load, in the same bytes."""
    from passes.fp32_kernels import fp32_outside_kernels
    from passes.storage import initializer_nbytes

    bg = build_block_graph(load_model(reference_models("vit")))
    feeds = random_feeds(bg.model)
    int8 = apply_config(bg, CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=7), calib_batches=[feeds])
    out = fp32_outside_kernels(int8)
    kept = set(int8_kernels(int8))
    assert set(int8_kernels(out)) == kept and kept
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name for t in out.graph.initializer}
    readers = {}
    for node in out.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    for dq in out.graph.node:  # every activation pair left is one an int8 kernel reads or writes
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            assert kept & set(readers.get(dq.output[0], [])) or producers[q.input[0]].name in kept, dq.name
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) < sum(
        n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and n.input[0].startswith(("pos", "norm", "layers.0.norm")) for n in out.graph.node)
    assert initializer_nbytes(out) <= initializer_nbytes(int8)
    fp32, want, got = _run(bg.model, feeds), _run(int8, feeds), _run(out, feeds)
    scale = np.abs(fp32).max()
    assert np.abs(got - fp32).max() <= np.abs(want - fp32).max() + 0.05 * scale
    ran = _ran(out, feeds)
    assert not any(op == "DequantizeLinear" for name, op in ran.items() if "_decode" in name)
    assert fp32_outside_kernels(fp32_kernels(out, int8_kernels(out))).graph.node  # nothing int8 left: all fp32


def test_with_no_int8_kernel_the_pairs_go_before_any_timing(resnet, monkeypatch):
    """Every kernel kept fp32 by the table (the ViT in bench run D2): the quantizer's pairs around the
    other ops go whatever a (noisy) whole-model timing says."""
    import hirelc_onnx.search.ort_speed as ort_speed

    bg, feeds, int8, _ = resnet
    monkeypatch.setattr(ort_speed, "_speedups", lambda *args: {1: 1.0})  # "not slower"
    none_int8 = fp32_kernels(int8, int8_kernels(int8))
    assert any(n.op_type == "QuantizeLinear" for n in none_int8.graph.node)
    model, fallbacks = ort_speed.whole_model_check(bg.model, none_int8, {}, batches=(1,))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert [f["kernel"] for f in fallbacks] == ["(activation Quantize / Dequantize pairs)"]
    want, got = _run(none_int8, feeds), _run(model, feeds)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    model, fallbacks = ort_speed.whole_model_check(bg.model, int8, {}, batches=(1,))
    assert model is int8 and not fallbacks  # int8 kernels and not slower: left as it is


def _ops(model, skip=("Cast", "Sub", "Mul")):
    """op type -> count, the weight decodes ORT folds at load left out."""
    from collections import Counter

    return Counter(n.op_type for n in model.graph.node if n.op_type not in skip)


def test_turned_back_against_the_fp32_model_the_dropped_relus_come_back(resnet):
    """With the fp32 model as reference, every pair bypassed leaves the Relu the quantizer dropped
    (ORT fuses it into the Conv, or the Conv + Add of a residual block), not a Clip to the pair's
    range, and none after an op that was no activation (GlobalAveragePool): ORT runs the graph fp32
    runs. With Clips ResNet-20 ran 58 nodes (11 Clip, 17 Reorder, 6 Add of their own) against 25."""
    from passes.fp32_kernels import fp32_outside_kernels

    bg, feeds, int8, _ = resnet
    out = fp32_outside_kernels(fp32_kernels(int8, int8_kernels(int8), bg.model), bg.model)
    assert _ops(out) == _ops(bg.model) and _ops(out)["Relu"] > 10
    assert sorted(_ran(out, feeds).values()) == sorted(_ran(bg.model, feeds).values())
    fp32, got = _run(bg.model, feeds), _run(out, feeds)
    assert np.abs(got - fp32).max() < 0.1 * np.abs(fp32).max()  # only the weights' rounding is left
    bare = fp32_outside_kernels(fp32_kernels(int8, int8_kernels(int8)))  # no reference: the range's Clip
    assert _ops(bare)["Clip"] > 10 and "Clip" in _ran(bare, feeds).values()


def test_a_dropped_relu6_comes_back_with_its_bounds(reference_models):
    """MobileNetV2's Clip(0, 6): restored as it was, not as Relu and not at the calibrated range."""
    from onnx import numpy_helper

    from passes.fp32_kernels import fp32_outside_kernels

    bg = build_block_graph(load_model(reference_models("mobilenetv2")))
    feeds = random_feeds(bg.model, batch=4)
    int8 = apply_config(bg, CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=7), calib_batches=[feeds])
    assert "Clip" not in _ops(int8)  # the quantizer folded them into the ranges
    out = fp32_outside_kernels(fp32_kernels(int8, int8_kernels(int8), bg.model), bg.model)
    assert _ops(out) == _ops(bg.model) and _ops(out)["Clip"] > 0
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert {(float(inits[n.input[1]]), float(inits[n.input[2]])) for n in out.graph.node if n.op_type == "Clip"} == {
        (0.0, 6.0)}
    fp32, got = _run(bg.model, feeds), _run(out, feeds)
    assert np.abs(got - fp32).max() < 0.1 * np.abs(fp32).max()


def test_when_no_model_timed_is_fast_enough_the_fastest_is_kept(resnet, monkeypatch):
    """Turning kernels back one by one made ResNet-20 slower (a kernel between int8 neighbours adds a
    standalone Quantize and Dequantize): when nothing met the tolerance, the fastest model timed is
    returned with the records of what it turned back, not the last one."""
    import hirelc_onnx.search.ort_speed as ort_speed

    bg, feeds, int8, _ = resnet
    n_int8 = len(int8_kernels(int8))
    seen = []

    def speedups(fp32, model, *args):  # all int8: 0.9; mixed: worse the more are turned back; none: 0.8
        left = len(int8_kernels(model))
        seen.append(left)
        return {1: 0.9 if left == n_int8 else 0.8 if left == 0 else 0.5 * left / n_int8}

    monkeypatch.setattr(ort_speed, "_speedups", speedups)
    model, fallbacks = ort_speed.whole_model_check(bg.model, int8, {}, batches=(1,))
    assert model is int8 and fallbacks == []
    assert seen[0] == n_int8 and 0 in seen  # every step was timed, the bare model too
    bare = lambda model: not any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # noqa: E731
    monkeypatch.setattr(ort_speed, "_speedups", lambda fp32, model, *a: {1: 0.95 if bare(model) else 0.6})
    model, fallbacks = ort_speed.whole_model_check(bg.model, int8, {}, batches=(1,))
    assert not int8_kernels(model) and not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert fallbacks[-1]["kernel"].startswith("(activation") and len(fallbacks) == n_int8 + 1


def test_flags_that_do_not_pay_off_whole_are_dropped(resnet, monkeypatch):
    """The table flags kernels one by one; ResNet-20 with its flagged stem, shortcuts and head fp32
    ran slower than with every kernel int8 (the Q/DQ and Transposes around them). prepare times both
    whole and keeps the flags only when they make the model faster at its slowest batch."""
    import hirelc_onnx.search.ort_speed as ort_speed

    bg, feeds, _, _ = resnet
    slow = {"/stem/stem.0/Conv", "/fc/Gemm"}
    table = {n: KernelLatency({1: 0.01, 32: 0.02}, {1: 0.02 if n in slow else 0.01, 32: 0.05 if n in slow else 0.01},
                              {1: 0.2, 32: 1.0}) for n in bg.kernels}
    monkeypatch.setattr(ort_speed, "int8_latency_table", lambda *a, **k: (table, True))
    timed = []

    def speedups(flags_pay):
        def timing(fp32, model, *args):
            all_int8 = len(int8_kernels(model)) == len(bg.kernels)
            timed.append(len(int8_kernels(model)))
            return {1: 1.05 if all_int8 != flags_pay else 0.8, 32: 1.4}
        return timing

    monkeypatch.setattr(ort_speed, "_speedups", speedups(flags_pay=False))
    out, _, record = ort_speed.prepare(bg, [feeds])
    assert not any(k.int8_slower for k in out.kernels.values()) and record["kept_fp32"] == {}
    assert set(record["kept_fp32_dropped"]["kernels"]) == slow
    assert sorted(timed) == [len(bg.kernels) - len(slow), len(bg.kernels)]  # both models were timed
    monkeypatch.setattr(ort_speed, "_speedups", speedups(flags_pay=True))
    out, _, record = ort_speed.prepare(bg, [feeds])
    assert {n for n, k in out.kernels.items() if k.int8_slower} == slow == set(record["kept_fp32"])
    assert "kept_fp32_dropped" not in record
