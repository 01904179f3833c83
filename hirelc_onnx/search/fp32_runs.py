"""Under `ort-cpu`, fp32 kernels only in runs that reach the graph's ends, never between int8 ones.

A kernel left fp32 (32 bits, or written in the storage encoding) between int8 kernels costs more
than its own fp32 time: ORT's quantizer puts a standalone Quantize before its int8 successor and a
Dequantize after its int8 predecessor, and around each NHWC island of int8 kernels ORT adds
Transposes (ResNet-20 with its stem, two 1x1 shortcuts and head fp32: 74 nodes against 37 with every
kernel int8, 0.80-0.85x of fp32 at batch 1 against 1.02-1.08x; bench/SPEED.md). A run of fp32
kernels that starts at the graph's inputs (every kernel it depends on is fp32: a stem) or ends at
its outputs (every kernel depending on it is fp32: a head) costs one Quantize or one Dequantize
where the all-int8 model has one too. So under ort-cpu a kernel may stay fp32 only when all its
kernel ancestors or all its kernel descendants are fp32 (`fp32_allowed`); `snap_fp32_runs` puts
every other 32-bit kernel on the int8 rung (fewer bytes: a met budget stays met), and
`budget.repair` spends slack only on a 32-bit rung the rule allows.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import onnx

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.specs import int8_kernel, weight_spec

__all__ = ["INT8_BITS", "graph_reach", "kernel_reach", "at_run_ends", "runs_fp32", "fp32_allowed", "isolated_fp32", "snap_fp32_runs"]

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
    """Whether kernel `name` may run fp32 under `kernels` (module docstring): every kernel it depends
    on runs fp32, or every kernel depending on it does. Always true outside ort-cpu."""
    if target != "ort-cpu":
        return True
    up, down = kernel_reach(bg)[name]
    return (all(runs_fp32(bg, n, kernels[n], target) for n in up)
            or all(runs_fp32(bg, n, kernels[n], target) for n in down))


def isolated_fp32(bg: BlockGraph, config: CompressionConfig) -> list[str]:
    """The 32-bit kernels of `config` the rule does not allow (between int8 kernels), in graph order."""
    if config.target != "ort-cpu":
        return []
    kernels = {n: config.get(n) for n in bg.kernels}
    return [n for n in sorted(bg.kernels, key=lambda n: bg.kernels[n].index)
            if kernels[n].bits == 32 and int8_kernel(bg.kernels[n], weight_spec(bg.kernels[n], replace(kernels[n], bits=INT8_BITS)), config.target)
            and not fp32_allowed(bg, kernels, n, config.target)]


def snap_fp32_runs(bg: BlockGraph, config: CompressionConfig) -> CompressionConfig:
    """`config` with every 32-bit kernel between int8 kernels (`isolated_fp32`) on the int8 rung;
    `config` itself when there is none. One pass is enough: a kernel the rule allows has only fp32
    kernels on one side, and none of those is snapped (each of them is allowed through the same side)."""
    isolated = isolated_fp32(bg, config)
    if not isolated:
        return config
    kernels = dict(config.kernels)
    for name in isolated:
        kernels[name] = replace(config.get(name), bits=INT8_BITS)
    return CompressionConfig(kernels, target=config.target, channel_multiple=config.channel_multiple)
