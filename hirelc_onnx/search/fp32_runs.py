"""Under `ort-cpu`, 32-bit kernels only in a run that ends at the graph's outputs (a head).

What ORT 1.32 runs for a kernel the config leaves at 32 bits depends on where it sits in the model
ORT's quantizer emits (`passes/quantize_activations.py`):
- between int8 kernels its input and output are quantized anyway, and ORT quantizes the float
  weight itself at load (DequantizeLinear -> Conv -> QuantizeLinear becomes a QLinearConv): it runs
  int8, on ORT's own 8-bit grid rather than the fine-tuned one, and its fp32 bytes buy nothing;
  turned into a true fp32 kernel (`passes/fp32_kernels.py`) it costs a Quantize / Dequantize pair
  and Transposes around ORT's NHWC int8 kernels (ResNet-20 with its stem, shortcuts and head
  turned back: 74 nodes, 18 Transposes, against 37 and 2 with every kernel int8);
- at the graph's inputs (a stem) it runs fp32, and the int8 region starts after it: on ResNet-20
  ORT's NHWC layout pass then wraps every residual Add of the first stage in Transposes (44 nodes,
  8 Transposes, against 37 and 2), at the largest resolution of the model;
- in a run every kernel after which is fp32 (the head) it runs fp32 behind one Dequantize, as the
  all-int8 model has one there too.
So under ort-cpu a kernel may stay at 32 bits only when every kernel depending on it runs fp32
(`fp32_allowed`); `snap_fp32_runs` puts every other 32-bit kernel on the int8 rung (fewer bytes: a
met budget stays met), and `budget.repair` spends slack only on a 32-bit rung the rule allows.
Whether a kernel ORT runs slower in int8 stays fp32 is the measured latency table's call
(`search/ort_speed.py`), timed whole; the whole-model check turns kernels back only at an end of
the int8 region (`at_run_ends`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import onnx

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.specs import int8_kernel, weight_spec

__all__ = ["INT8_BITS", "graph_reach", "kernel_reach", "at_run_ends", "runs_fp32", "fp32_allowed", "isolated_fp32",
           "snap_fp32_runs", "head_run"]

INT8_BITS = 7
"""The ort-cpu int8 rung (`budget.bits_ladder`): a snapped kernel's bits."""


def graph_reach(model: onnx.ModelProto, kernels: Iterable[str]) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Per node named in `kernels`: the named nodes it depends on and those depending on it
    (transitively, through any op), from `model`'s topology."""
    kernels = set(kernels)
    graph = model.graph
    producer = {out: node.name for node in graph.node for out in node.output}
    upstream: dict[str, frozenset[str]] = {}  # node -> kernels it depends on (itself excluded)
    for node in graph.node:  # topological order (an ONNX graph's nodes are)
        seen: set[str] = set()
        for name in node.input:
            src = producer.get(name)
            if src is None:
                continue
            seen |= upstream.get(src, frozenset())
            if src in kernels:
                seen.add(src)
        upstream[node.name] = frozenset(seen)
    downstream: dict[str, set[str]] = {k: set() for k in kernels}
    for name in kernels:
        for anc in upstream.get(name, frozenset()):
            downstream[anc].add(name)
    return {k: (upstream.get(k, frozenset()), frozenset(downstream[k])) for k in kernels}


def kernel_reach(bg: BlockGraph) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """`graph_reach` of `bg`'s kernels in `bg.model`, computed once per graph (`BlockGraph.kernel_reach`)."""
    if not bg.kernel_reach:
        bg.kernel_reach.update(graph_reach(bg.model, bg.kernels))
    return bg.kernel_reach


def at_run_ends(model: onnx.ModelProto, int8: Iterable[str], kernels: Iterable[str]) -> list[str]:
    """Of the int8 kernels `int8` of an emitted model (`kernels`: every kernel node in it), those that
    can turn fp32 and keep the rule: every kernel on one side of them already fp32."""
    int8 = set(int8)
    reach = graph_reach(model, set(kernels) | int8)
    return [n for n in int8 if n in reach
            and (not (reach[n][0] & int8) or not (reach[n][1] & int8))]


def runs_fp32(bg: BlockGraph, name: str, kc: KernelConfig, target: str) -> bool:
    """Whether the kernel runs as an fp32 kernel under `kc` (not an int8 kernel of ORT's quantizer)."""
    kernel = bg.kernels[name]
    return not int8_kernel(kernel, weight_spec(kernel, kc), target)


def fp32_allowed(bg: BlockGraph, kernels: Mapping[str, KernelConfig], name: str, target: str) -> bool:
    """Whether kernel `name` may stay at 32 bits under `kernels` (module docstring): every kernel
    depending on it runs fp32. Always true outside ort-cpu."""
    if target != "ort-cpu":
        return True
    return all(runs_fp32(bg, n, kernels[n], target) for n in kernel_reach(bg)[name][1])


def isolated_fp32(bg: BlockGraph, config: CompressionConfig) -> list[str]:
    """The 32-bit kernels of `config` the rule does not allow (an int8 kernel depends on them), in graph order."""
    if config.target != "ort-cpu":
        return []
    kernels = {n: config.get(n) for n in bg.kernels}

    def would_run_int8(name: str) -> bool:  # not a table, nor a kernel the latency table keeps fp32
        kernel = bg.kernels[name]
        return int8_kernel(kernel, weight_spec(kernel, replace(kernels[name], bits=INT8_BITS)), config.target)

    return [n for n in sorted(bg.kernels, key=lambda n: bg.kernels[n].index)
            if kernels[n].bits == 32 and would_run_int8(n) and not fp32_allowed(bg, kernels, n, config.target)]


def snap_fp32_runs(bg: BlockGraph, config: CompressionConfig) -> CompressionConfig:
    """`config` with every 32-bit kernel the rule does not allow (`isolated_fp32`) on the int8 rung;
    `config` itself when there is none. One pass is enough: every kernel depending on an allowed
    one runs fp32 and is allowed too (its dependants are among the first one's), so none is snapped."""
    isolated = isolated_fp32(bg, config)
    if not isolated:
        return config
    kernels = dict(config.kernels)
    for name in isolated:
        kernels[name] = replace(config.get(name), bits=INT8_BITS)
    return CompressionConfig(kernels, target=config.target, channel_multiple=config.channel_multiple)


def head_run(bg: BlockGraph, names: Iterable[str]) -> set[str]:
    """Of the kernels `names` (the latency table's slower-in-int8 ones), those that may run fp32
    under the rule with all of `names` fp32: every kernel depending on them is in `names` or never
    runs int8 (a table). One kept fp32 with an int8 kernel after it runs as a true fp32 kernel
    between Quantize / Dequantize pairs, and ORT's NHWC int8 region around it breaks (module
    docstring), a cost the per-kernel table does not see."""
    names = set(names)
    reach = kernel_reach(bg)

    def fp32(n: str) -> bool:
        return n in names or bg.kernels[n].op == "Gather"

    return {n for n in names if n in reach and all(fp32(d) for d in reach[n][1])}
