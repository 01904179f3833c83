"""Per compressed kernel: the operator ONNX Runtime really ran, its time, and its error against fp32.

A file can say "int8" and still run fp32 kernels behind unfolded DequantizeLinear nodes, or int8
kernels slower than fp32; only the optimised graph and the profile tell. This module reads both:
  * the graph ORT built after its optimisations (`SessionOptions.optimized_model_filepath`), to
    find which node a kernel of the given model became (ORT renames: `<name>_token_N` for QDQ
    fusions, `<tensor>_nchwc` for NCHWc convolutions, fused activations keep the last output name);
  * ORT's own profile (`enable_profiling`), for each node's measured kernel time;
  * the kernel's output (after its activation and any Q/DQ pair) in this model and in the fp32
    reference, side by side, scored as ORT's `qdq_loss_debug` scores it (SNR in dB).
Times and SNR come from separate sessions: exposing an intermediate tensor as a graph output can
change what ORT fuses, so the timed session runs the model untouched.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

from hirelc_onnx.errors import ModelLoadError
from hirelc_onnx.graph.stored import KERNEL_OPS, weight_input  # ops that hold a weight, before and after quantization

__all__ = ["NodeRow", "KERNEL_OPS", "compressed_kernels", "profile_nodes", "match_kernels", "kernel_snr",
           "per_node_rows"]

_QUANTIZED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm",
                            "GatherBlockQuantized"})
# single-input elementwise ops a kernel's output flows through before the next kernel sees it
_CHAIN_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                        "QuantizeLinear", "DequantizeLinear", "BatchNormalization"})
# ops that only move data between layouts or encodings: never "the kernel that ran"
_GLUE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "ReorderInput", "ReorderOutput", "Transpose",
                       "Cast", "Reshape"})
_RENAME_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_quant)+$")


@dataclass(frozen=True)
class NodeRow:
    """One compressed kernel of the model: what ORT ran for it and what it cost."""

    kernel: str  # node name in the given model
    op_type: str  # its op type there
    executed: str  # what ORT ran, e.g. "QLinearConv", "DequantizeLinear + Conv", "Conv (weights folded)"
    ort_nodes: tuple[str, ...]  # names of those nodes in ORT's optimised graph
    ms: float | None  # median kernel time per run, ORT's profile
    fp32_ms: float | None  # the same kernel in the reference model, when one is given
    snr_db: float | None  # kernel output against the reference's, when shapes agree
    note: str = ""

    @property
    def slower(self) -> bool:
        return self.ms is not None and self.fp32_ms is not None and self.ms > self.fp32_ms

    def as_dict(self) -> dict:
        return asdict(self) | {"ort_nodes": list(self.ort_nodes), "slower_than_fp32": self.slower}


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def compressed_kernels(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Kernel nodes whose weight is stored compressed: a quantized op, or a weight decoded in-graph."""
    inits = _initializers(model)
    producers = _producers(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in KERNEL_OPS:
            continue
        weight = weight_input(node)
        if node.op_type in _QUANTIZED_OPS or (weight and weight not in inits
                                              and _decoded(weight, model, inits, producers)):
            out.append(node)
    return out


def _decoded(name: str, model: onnx.ModelProto, inits: set[str], producers: dict[str, onnx.NodeProto]) -> bool:
    """True when `name` is computed from initializers only (a weight decode: DQ, Cast -> Sub -> Mul ...)."""
    graph_inputs = {i.name for i in model.graph.input}
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen or t in inits or t == "":
            continue
        seen.add(t)
        if t in graph_inputs or t not in producers:
            return False
        stack.extend(producers[t].input)
    return True


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    return consumers


def _chain(model: onnx.ModelProto, node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> list[str]:
    """The kernel's output and the tensors it flows into through activations and Q/DQ, in order."""
    outputs = {o.name for o in model.graph.output}
    chain = [node.output[0]]
    while chain[-1] not in outputs:
        users = consumers.get(chain[-1], [])
        if len(users) != 1 or users[0].op_type not in _CHAIN_OPS:
            break
        chain.append(users[0].output[0])
    return chain


def profile_nodes(model: onnx.ModelProto | str | os.PathLike, feed: Mapping[str, np.ndarray], runs: int = 20,
                  warmup: int = 3, threads: int = 0) -> tuple[onnx.ModelProto, dict[str, tuple[str, float]]]:
    """ORT's optimised graph and, per node of it, (op that ran, median microseconds per run)."""
    with tempfile.TemporaryDirectory(prefix="hirelc-profile-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        try:
            session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's pybind errors share no base class below Exception
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {' '.join(str(exc).split())}") from exc
        for _ in range(warmup + runs):
            session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    times: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(float(e["dur"]))
            ops[name] = e.get("args", {}).get("op_name", "?")
    # the last `runs` calls of each node are the timed ones (warm-up runs come first in the profile)
    return optimized, {n: (ops[n], float(np.median(t[-runs:]))) for n, t in times.items()}


def match_kernels(model: onnx.ModelProto, optimized: onnx.ModelProto,
                  kernels: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """For each kernel, the node(s) of ORT's optimised graph it became: the compute node first, then
    an unfolded weight decode feeding it, if any."""
    opt_producers = _producers(optimized)
    consumers = _consumers(model)
    found: dict[str, list[onnx.NodeProto]] = {}
    for k in kernels:
        keys = set(_chain(model, k, consumers)) | {k.name}
        hit = None
        for n in optimized.graph.node:
            if n.op_type in _GLUE_OPS:
                continue
            names = {n.name, _RENAME_SUFFIX.sub("", n.name)} | set(n.output)
            if names & keys:
                hit = n
                break
        if hit is None:
            continue
        nodes = [hit]
        weight = weight_input(hit)
        decode = opt_producers.get(weight) if weight else None
        if decode is not None and decode.op_type in ("DequantizeLinear", "Cast", "Mul", "Sub"):
            nodes.append(decode)
        found[k.name] = nodes
    return found


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return m


def _run(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(_with_outputs(model, names).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, dict(feed))))


def kernel_snr(model: onnx.ModelProto, reference: onnx.ModelProto, feed: Mapping[str, np.ndarray],
               kernels: list[onnx.NodeProto]) -> dict[str, tuple[float | None, str]]:
    """SNR (dB) of each kernel's output, after its activation and Q/DQ, against the reference node of
    the same name; (None, why) when there is no such node or the shapes differ (pruned channels)."""
    ref_nodes = {n.name: n for n in reference.graph.node}
    ours_consumers, ref_consumers = _consumers(model), _consumers(reference)
    pairs: dict[str, tuple[str, str]] = {}
    result: dict[str, tuple[float | None, str]] = {}
    for k in kernels:
        ref = ref_nodes.get(k.name)
        if ref is None:
            result[k.name] = (None, "no node of this name in the reference")
            continue
        pairs[k.name] = (_chain(model, k, ours_consumers)[-1], _chain(reference, ref, ref_consumers)[-1])
    if not pairs:
        return result
    ours = _run(model, feed, sorted({a for a, _ in pairs.values()}))
    theirs = _run(reference, feed, sorted({b for _, b in pairs.values()}))
    for name, (a, b) in pairs.items():
        x, y = theirs[b], ours[a]
        if x.shape != y.shape:
            result[name] = (None, f"output shape {y.shape} vs {x.shape} (pruned)")
        else:
            result[name] = (compute_signal_to_quantization_noice_ratio(x.astype(np.float64), y.astype(np.float64)), "")
    return result


def _executed(nodes: list[onnx.NodeProto], profile: Mapping[str, tuple[str, float]]) -> str:
    compute = nodes[0]
    op = profile.get(compute.name, (compute.op_type, 0.0))[0]
    if len(nodes) > 1:
        return f"{nodes[1].op_type} + {op}"
    return op


def per_node_rows(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], reference: onnx.ModelProto | None = None,
                  runs: int = 20, threads: int = 0) -> list[NodeRow]:
    """One row per compressed kernel of `model` (see the module docstring); `reference` (the fp32
    original) adds its time for the same kernel and the SNR of the kernel's output against it."""
    kernels = compressed_kernels(model)
    optimized, profile = profile_nodes(model, feed, runs=runs, threads=threads)
    matched = match_kernels(model, optimized, kernels)
    ref_ms: dict[str, float] = {}
    snr: dict[str, tuple[float | None, str]] = {}
    if reference is not None:
        ref_kernels = [n for n in reference.graph.node if n.name in {k.name for k in kernels}]
        ref_opt, ref_profile = profile_nodes(reference, feed, runs=runs, threads=threads)
        for name, nodes in match_kernels(reference, ref_opt, ref_kernels).items():
            ref_ms[name] = sum(ref_profile.get(n.name, ("", 0.0))[1] for n in nodes) / 1000.0
        snr = kernel_snr(model, reference, feed, kernels)
    rows = []
    for k in kernels:
        nodes = matched.get(k.name)
        db, why = snr.get(k.name, (None, ""))
        if nodes is None:
            rows.append(NodeRow(k.name, k.op_type, "not found (fused into a neighbour)", (), None, ref_ms.get(k.name),
                                db, why))
            continue
        ms = sum(profile.get(n.name, ("", 0.0))[1] for n in nodes) / 1000.0
        rows.append(NodeRow(k.name, k.op_type, _executed(nodes, profile), tuple(n.name for n in nodes), ms,
                            ref_ms.get(k.name), db, why))
    return rows
