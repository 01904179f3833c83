"""Two-stage method: its pieces checked against independent oracles, and one end-to-end run on VGG."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hirelc_onnx.apply import apply_pruning
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.evaluate.runner import predict
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.two_stage import TwoStageSettings, uniform_width
from hirelc_onnx.search.two_stage_sizes import StageSizes as _Sizes
from hirelc_onnx.search.two_stage_sizes import emit_stage as _emit
from hirelc_onnx.search.two_stage_sizes import fill_size as _fill_size
from hirelc_onnx.search.two_stage_sizes import onto_flops as _onto_flops
from hirelc_onnx.search.two_stage_sizes import repair_size as _repair_size
from hirelc_onnx.search.two_stage_sizes import with_choices as _with
from passes.storage import initializer_nbytes

TINY = TwoStageSettings(density=0.25, episodes_per_evaluation=2, real_candidates=1, probe_epochs=1, mask_epochs=1,
                        finetune_epochs=1)


@pytest.fixture(scope="module")
def vgg(reference_models):
    return build_block_graph(load_model(reference_models("vgg")))


@pytest.fixture(scope="module")
def splits():
    return split_dataset(load_digits(), 0)


def _prunable(bg):
    return [n for n, k in bg.kernels.items() if k.group is not None and bg.groups[k.group].prunable]


def _base(bg, target="storage"):
    return CompressionConfig({n: KernelConfig() for n in bg.kernels}, target=target)


def _magnitude_sparse(model: onnx.ModelProto, names, density: float) -> onnx.ModelProto:
    """Zero all but the largest `density` of each named weight (an independent stand-in for stage 1b)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in names:
            w = numpy_helper.to_array(t).copy()
            cut = np.quantile(np.abs(w), 1 - density)
            w[np.abs(w) < cut] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


def test_onto_flops_meets_the_target(vgg):
    rng = np.random.default_rng(0)
    prunable = _prunable(vgg)
    for target in (0.3, 0.5, 0.8):
        config = _with(_base(vgg), keep_ratio={n: float(rng.choice([0.5, 0.75, 1.0])) for n in prunable})
        projected = _onto_flops(vgg, config, prunable, target)
        assert model_cost(vgg, projected).macs_fraction <= target
        assert all(projected.get(n).keep_ratio <= config.get(n).keep_ratio for n in prunable)
    light = _with(_base(vgg), keep_ratio={n: 0.25 for n in prunable})
    assert _onto_flops(vgg, light, prunable, 0.5) is light


def test_sizes_are_exactly_the_emitted_bytes(vgg):
    """The stage-2 size table against the emitted model's initializers, sparse storage included."""
    pruned_config = _with(_base(vgg), keep_ratio={n: 0.5 for n in _prunable(vgg)})
    weights = [k.weight for k in vgg.kernel_list()]
    stage1 = _magnitude_sparse(apply_pruning(vgg, pruned_config), weights, 0.2)
    sizes = _Sizes(vgg, stage1, pruned_config, sparse=True)
    names = list(vgg.kernels)
    rng = np.random.default_rng(0)
    for bits in ([32] * len(names), [8] * len(names), [2, 4, 8, 4, 2, 4, 8, 32], list(rng.choice([2, 4, 8], 8))):
        config = _with(pruned_config, bits=dict(zip(names, map(int, bits))))
        emitted, sparse = _emit(vgg, stage1, config)
        assert sizes.total(config) == initializer_nbytes(emitted)
        assert sparse  # some kernels are stored sparsely at 20% density


def test_repair_meets_the_size_goal(vgg):
    pruned_config = _with(_base(vgg), keep_ratio={n: 0.5 for n in _prunable(vgg)})
    stage1 = _magnitude_sparse(apply_pruning(vgg, pruned_config), [k.weight for k in vgg.kernel_list()], 0.25)
    sizes = _Sizes(vgg, stage1, pruned_config, sparse=True)
    goal_bytes = vgg.weight_bytes / 40
    repaired = _repair_size(sizes, pruned_config, goal_bytes)
    assert sizes.total(repaired) <= goal_bytes
    floor = _repair_size(sizes, pruned_config, 1)  # unreachable: no lower rung saves a byte
    for name in vgg.kernels:
        for bits in (b for b in (8, 4, 2) if b < floor.get(name).bits):
            assert sizes.total(_with(floor, bits={name: bits})) >= sizes.total(floor)
    # 2 bits wherever that is smaller: a tiny kernel's 2-bit grid stays in INT4, at its 4-bit cost
    floor_bits = {floor.get(n).bits for n in vgg.kernels}
    assert 2 in floor_bits and floor_bits <= {2, 4}


def test_fill_spends_the_bytes_left_under_the_goal_where_they_cut_damage(vgg):
    """After the repair lands below the goal, the fill raises rungs until no further step fits; the
    damage-aware repair lowers the cheap kernels first."""
    pruned_config = _with(_base(vgg), keep_ratio={n: 0.5 for n in _prunable(vgg)})
    stage1 = _magnitude_sparse(apply_pruning(vgg, pruned_config), [k.weight for k in vgg.kernel_list()], 0.25)
    sizes = _Sizes(vgg, stage1, pruned_config, sparse=True)
    names = list(vgg.kernels)
    biggest = max(names, key=lambda n: vgg.kernels[n].params)
    weight = {n: 1e6 if n == biggest else 1.0 for n in names}  # the biggest kernel hurts most, the rest alike

    def cost(name, bits):
        return weight[name] / bits

    goal_bytes = vgg.weight_bytes / 40
    repaired = _repair_size(sizes, pruned_config, goal_bytes, cost)
    assert sizes.total(repaired) <= goal_bytes
    # the damage-aware repair lowers the kernels that hurt least first (the byte-greedy one the biggest first)
    greedy = _repair_size(sizes, pruned_config, goal_bytes)
    assert repaired.get(biggest).bits > greedy.get(biggest).bits
    assert repaired.get(biggest).bits > max(repaired.get(n).bits for n in names if n != biggest)
    low = _with(pruned_config, bits={n: 2 for n in names})
    filled = _fill_size(sizes, low, goal_bytes, cost)
    assert sizes.total(low) < sizes.total(filled) <= goal_bytes
    for n in names:  # maximal: no single one-rung raise still fits the goal
        up = [b for b in (4, 8, 32) if b > filled.get(n).bits]
        if up:
            assert sizes.total(_with(filled, bits={n: min(up)})) > goal_bytes
    assert _fill_size(sizes, filled, goal_bytes, cost) == filled


def test_stage_two_fallback_is_the_widest_uniform_width_within_the_goal(vgg):
    config = _with(_base(vgg), keep_ratio={n: 0.5 for n in _prunable(vgg)})
    sizes = _Sizes(vgg, apply_pruning(vgg, config), config, sparse=True)
    widths = (2, 4, 8, 32)
    uniform_bytes = {b: sizes.total(_with(config, bits={n: b for n in vgg.kernels})) for b in widths}
    for b in (4, 8):  # a goal just above that width's bytes: that width, the next one up is too big
        chosen = uniform_width(sizes, config, uniform_bytes[b] * 1.001)
        assert {chosen.get(n).bits for n in vgg.kernels} == {b}
    chosen = uniform_width(sizes, config, uniform_bytes[2] * 0.5)  # out of reach: the lowest rung everywhere
    assert {chosen.get(n).bits for n in vgg.kernels} == {2}


def test_masks_hit_the_density_and_fine_tuning_keeps_the_zeros(vgg, splits):
    from hirelc_onnx.bridge.sparsity import MaskSettings, learn_masks, masked_finetune
    from passes.quantize import WeightQuantSpec, fake_quantize

    pruned = apply_pruning(vgg, _with(_base(vgg), keep_ratio={n: 0.5 for n in _prunable(vgg)}))
    weights = [k.weight for k in vgg.kernel_list()]
    masked = learn_masks(pruned, weights, splits.finetune, splits.val, vgg.model, MaskSettings(density=0.2, epochs=1))
    arrays = {t.name: numpy_helper.to_array(t) for t in masked.model.graph.initializer}
    kept = sum(int((arrays[w] != 0).sum()) for w in weights) / sum(arrays[w].size for w in weights)
    assert abs(kept - 0.2) < 0.01
    spec = WeightQuantSpec(bits=4, symmetric=True, granularity="per-channel", axis=0)
    tuned = masked_finetune(masked.model, splits.finetune, splits.val, vgg.model, sparse=weights,
                            quant={weights[3]: spec}, epochs=1)
    after = {t.name: numpy_helper.to_array(t) for t in tuned.model.graph.initializer}
    for w in weights:
        assert not np.any(after[w][arrays[w] == 0])
    assert not np.any(fake_quantize(after[weights[3]], spec)[arrays[weights[3]] == 0])
    acc = float((predict(tuned.model, splits.val.x).argmax(1) == splits.val.y).mean())
    assert acc == pytest.approx(tuned.val_score, abs=0.01)


def test_end_to_end_on_vgg_reports_both_stages(reference_models):
    from hirelc_onnx.compress import compress

    # probe_trust above 1: no probe is ever trusted, so every stage-1 probe trains on to probe_max_epochs
    settings = replace(TINY, probe_trust=1.01, probe_max_epochs=2)
    result = compress(reference_models("vgg"), data="digits", method="two-stage", budget="20x", latency_runs=2,
                      evaluations=2, settings=settings)
    report = result.report
    stages = report["search"]["stages"]
    assert set(stages) == {"stage1", "stage2"}
    for stage in stages.values():
        assert {"ratio", "val_score", "test_score", "bytes"} <= set(stage)
    assert stages["stage1"]["macs_fraction"] <= TINY.flops_target + 1e-9
    assert stages["stage2"]["ratio"] > stages["stage1"]["ratio"]
    assert report["size"]["ratio"] == pytest.approx(stages["stage2"]["ratio"])
    assert report["size"]["ratio"] >= 20
    assert report["goal"]["budget_met"]
    assert report["accuracy"]["compressed"] == pytest.approx(stages["stage2"]["test_score"])
    assert stages["stage2"]["sparse_storage"]  # {initializer: encoding} of the kernels stored sparsely
    assert {h["stage"] for h in report["history"]} == {1, 2}
    # the emitted candidate's source, per stage: an agent's episode or policy walk, or a named fallback
    source = report["search"]["source"]
    assert source["stage1"] == stages["stage1"]["source"] and source["stage2"] == stages["stage2"]["source"]
    assert all(re.fullmatch(r"agent \((episode \d+|policy)\)|fallback \(uniform\)", s)
               for s in source.values())
    assert report["search"]["episodes"] == 4 and len(stages["stage1"]["candidates"]) == 3  # 1 best, policy, fallback
    assert {h["kind"] for h in report["history"] if h["stage"] == 1} == {"proxy", "probe", "real"}
    probes = [h for h in report["history"] if h["kind"] == "probe"]
    assert stages["stage1"]["probe_epochs"] == 2 and [h["epochs"] for h in probes] == [1] * 3 + [1] * 3
    # stage 2 walks within the goal and fills: every agent episode lands at or under the goal's bytes
    proxies = [h for h in report["history"] if h["kind"] == "proxy" and h["stage"] == 2]
    assert proxies and all(h["ratio"] >= 20 for h in proxies)
