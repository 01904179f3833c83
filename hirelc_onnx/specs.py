"""Translate the search's choices (CompressionConfig) into the passes' parameters."""
from __future__ import annotations

from typing import TYPE_CHECKING

from hirelc_onnx.config import CompressionConfig, KernelConfig
from passes.quantize import WeightQuantSpec

if TYPE_CHECKING:  # annotations only: graph.cost imports this module
    from hirelc_onnx.graph.blockgraph import BlockGraph, Kernel

__all__ = ["weight_spec", "weight_target", "keep_count", "group_keep_counts"]


def weight_spec(kernel: "Kernel", kc: KernelConfig) -> WeightQuantSpec | None:
    """The quantizer spec for a kernel's weight, or None when it stays fp32."""
    if not kc.quantized:
        return None
    return WeightQuantSpec(bits=kc.bits, symmetric=kc.qtype == "symmetric", granularity=kc.granularity,
                           group_size=kc.group_size, axis=kernel.out_axis)


def weight_target(kernel: "Kernel", target: str) -> str:
    """The encoding (`passes.quantize_weights` target) a kernel's weight is written in under `target`.

    An embedding table under ort-cpu gets the storage encoding, which ORT folds into an fp32
    table at load: ORT has no quantized lookup faster than an fp32 Gather (`bench/embedding_lookup.py`,
    ORT 1.32, a 30522x384 table, 128 ids, batch 1 / 32: DequantizeLinear -> Gather 0.01x / 0.18x of
    fp32, as it dequantizes the whole table every run; com.microsoft GatherBlockQuantized 0.69x /
    0.28x at 8 bits, 0.19x / 0.06x at 4 bits; the folded storage decode 1.01x / 1.02x), and ort-cpu
    never emits a kernel slower than fp32.
    """
    return "storage" if kernel.op == "Gather" and target == "ort-cpu" else target


def keep_count(ratio: float, length: int) -> int:
    """Channels kept of `length` at keep ratio `ratio`: rounded, at least one."""
    return max(1, int(round(ratio * length)))


def group_keep_counts(bg: "BlockGraph", config: CompressionConfig) -> dict[int, int]:
    """Channels each prunable group keeps under `config`.

    A group's channels are shared by all the kernels that produce it (a residual stage, a
    concat's producers are separate groups), so it keeps the LARGEST keep_ratio any of its
    producers asks for: a sensitive producer is never pruned harder than it asked. At least one
    channel is always kept. Unprunable groups keep everything and are not listed.
    """
    counts: dict[int, int] = {}
    for group in bg.groups:
        if not group.prunable or not group.producers:
            continue
        ratio = max(config.get(k).keep_ratio for k in group.producers)
        kept = keep_count(ratio, group.length)
        if kept < group.length:
            counts[group.id] = kept
    return counts
