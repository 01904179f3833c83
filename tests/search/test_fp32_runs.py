"""Under ort-cpu, 32-bit kernels only in a run ending at the graph's outputs (`search/fp32_runs.py`):
the snap, the repair that keeps to it, what ORT makes of the emitted graph, and the kernels the
whole-model check may turn back. On a small generated residual graph; no timing is asserted."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph import build_block_graph
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.search.budget import repair
from hirelc_onnx.search.fp32_runs import at_run_ends, isolated_fp32, snap_fp32_runs
from passes.fp32_kernels import int8_kernels

CONVS = ["stem", "c1", "c2", "c3"]  # stem, a residual block (c1, c2, + the stem's output), c3, then a Gemm head


def _residual() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(name, x, cin, relu=True):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (16, cin, 3, 3)).astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name, pads=[1, 1, 1, 1]))
        if not relu:
            return f"{name}.y"
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    stem = conv("stem", "x", 3)
    block = conv("c2", conv("c1", stem, 16), 16, relu=False)
    nodes += [helper.make_node("Add", [block, stem], ["sum"], name="add"),
              helper.make_node("Relu", ["sum"], ["sum.r"], name="add.relu")]
    x = conv("c3", "sum.r", 16)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (10, 16)).astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _config(bits: dict[str, int], target: str = "ort-cpu") -> CompressionConfig:
    return CompressionConfig({n: KernelConfig(bits=b) for n, b in bits.items()}, target=target)


def _kernels(bg) -> dict[str, str]:
    """short name (stem, c1, ..., fc) -> the kernel's name in the graph."""
    return {short: next(n for n in bg.kernels if short in n) for short in CONVS + ["fc"]}


def _ran(model: onnx.ModelProto, tmp) -> list[onnx.NodeProto]:
    """The nodes of ORT's optimised graph (every optimisation, layout passes included)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp)
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return list(onnx.load(str(tmp)).graph.node)


def test_32_bit_kernels_an_int8_kernel_depends_on_are_snapped_to_int8_and_the_head_stays():
    bg = build_block_graph(_residual())
    k = _kernels(bg)
    mixed = _config({k["stem"]: 32, k["c1"]: 7, k["c2"]: 32, k["c3"]: 7, k["fc"]: 32})
    assert isolated_fp32(bg, mixed) == [k["stem"], k["c2"]]
    snapped = snap_fp32_runs(bg, mixed)
    assert {n: snapped.get(n).bits for n in k.values()} == {
        k["stem"]: 7, k["c1"]: 7, k["c2"]: 7, k["c3"]: 7, k["fc"]: 32}
    assert model_cost(bg, snapped).total_bytes < model_cost(bg, mixed).total_bytes  # a met budget stays met
    head = _config({k["stem"]: 7, k["c1"]: 7, k["c2"]: 7, k["c3"]: 32, k["fc"]: 32})  # a run ending at the output
    assert isolated_fp32(bg, head) == [] and snap_fp32_runs(bg, head) is head
    storage = _config({k["stem"]: 32, k["c1"]: 8, k["c2"]: 32, k["c3"]: 8, k["fc"]: 8}, target="storage")
    assert snap_fp32_runs(bg, storage) is storage  # only ort-cpu has int8 kernels ORT quantizes around


def test_repair_fills_32_bits_only_where_every_kernel_after_runs_fp32():
    bg = build_block_graph(_residual())
    k = _kernels(bg)
    # the stem and c2 are the most sensitive: the fill would raise them first
    sensitivity = {k["c2"]: 10.0, k["stem"]: 9.0, k["fc"]: 0.5}
    start = CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=7)
    budget = model_cost(bg, start).ratio * 0.8  # slack for a kernel or two at 32 bits
    out = repair(bg, start, budget, sensitivity, fill=True)
    assert model_cost(bg, out).ratio >= budget
    assert out.get(k["c2"]).bits == 7 and out.get(k["stem"]).bits == 7 and isolated_fp32(bg, out) == []
    assert out.get(k["fc"]).bits == 32  # the slack went to the head
    # a start with c2 at 32 bits before int8 kernels is snapped before the budget is measured
    mixed = _config({k["stem"]: 7, k["c1"]: 7, k["c2"]: 32, k["c3"]: 7, k["fc"]: 7})
    assert repair(bg, mixed, budget).get(k["c2"]).bits == 7


def test_what_ort_runs_for_a_32_bit_kernel_before_int8_ones(tmp_path):
    """Why the rule: a 32-bit kernel between int8 kernels runs int8 all the same (ORT quantizes its
    float weight at load, on its own grid), so its fp32 bytes buy nothing; a 32-bit stem runs fp32
    and ORT's NHWC layout wraps the residual Add after it in Transposes. The snapped config's model
    runs every kernel but the head int8 with the fewest Transposes."""
    bg = build_block_graph(_residual())
    k = _kernels(bg)
    feeds = [{"x": np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)}]

    def emitted(bits):
        return apply_config(bg, _config(dict(zip([k[n] for n in CONVS + ["fc"]], bits))), calib_batches=feeds)

    def ops(model, name):
        ran = _ran(model, tmp_path / f"{name}.onnx")
        return collections.Counter(n.op_type for n in ran), {n.name.split("_token")[0]: n for n in ran}

    middle = emitted([7, 7, 32, 7, 32])  # c2 at 32 bits between int8 kernels
    assert k["c2"] not in int8_kernels(middle)  # a float weight in the file...
    count, nodes = ops(middle, "middle")
    assert nodes[k["c2"]].op_type == "QLinearConv"  # ...that ORT quantizes itself and runs int8
    assert count["QLinearConv"] == 4
    snap = snap_fp32_runs(bg, _config({k["c2"]: 32, k["fc"]: 32} | {k[n]: 7 for n in ("stem", "c1", "c3")}))
    assert {n: snap.get(n).bits for n in k.values()} == {k[n]: 7 for n in CONVS} | {k["fc"]: 32}
    int8_head = emitted([7, 7, 7, 7, 32])  # what the snap makes of it: ORT runs the same ops, in fewer bytes
    assert len(int8_head.SerializeToString()) < len(middle.SerializeToString())
    snapped, _ = ops(int8_head, "snapped")
    stem_fp32, _ = ops(emitted([32, 7, 7, 7, 32]), "stem")
    assert (stem_fp32["Conv"], stem_fp32["QLinearConv"]) == (1, 3) and snapped["QLinearConv"] == 4
    assert stem_fp32["Transpose"] > snapped["Transpose"]  # the int8 region's entry after the stem costs layout
    # the whole-model check may turn back only the int8 kernels at an end of the int8 region
    kernel_nodes = [n.name for n in int8_head.graph.node if n.op_type in ("Conv", "Gemm")]
    assert sorted(at_run_ends(int8_head, int8_kernels(int8_head), kernel_nodes)) == sorted([k["stem"], k["c3"]])


def test_only_the_latency_tables_flags_in_the_head_run_stand():
    """A kernel the per-kernel table finds slower in int8 stays fp32 only when no int8 kernel depends
    on it (`head_run`): the stem, with int8 c1 after it, is dropped; c2, c3 and the head stay, and
    without c3 among them only the head does."""
    from hirelc_onnx.search.fp32_runs import head_run

    bg = build_block_graph(_residual())
    k = _kernels(bg)
    assert head_run(bg, [k["stem"], k["c2"], k["c3"], k["fc"]]) == {k["c2"], k["c3"], k["fc"]}
    assert head_run(bg, [k["stem"], k["c2"], k["fc"]]) == {k["fc"]}
    assert head_run(bg, [k["c3"]]) == set()  # the head after it runs int8
