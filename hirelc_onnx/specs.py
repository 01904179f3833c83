"""Translate the search's choices (CompressionConfig) into the passes' parameters."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hirelc_onnx.config import DEFAULT_WEIGHT_RANGE, CompressionConfig, KernelConfig
from passes.quantize import WeightQuantSpec

if TYPE_CHECKING:  # annotations only: graph.cost imports this module
    from hirelc_onnx.graph.blockgraph import BlockGraph, Kernel

__all__ = ["weight_spec", "weight_target", "int8_kernel", "keep_count", "channel_unit", "round_to_unit", "channel_multiple",
           "group_keep_counts", "weight_range", "fits_ranges"]


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
    never emits a kernel slower than fp32. So does a kernel whose int8 version ORT was measured to run
    slower than fp32 on this machine (`Kernel.int8_slower`, `search/ort_speed.py`): its integers are
    decoded at load and it runs as an fp32 kernel, at fp32 speed, still stored small.
    """
    slow = kernel.op == "Gather" or bool(getattr(kernel, "int8_slower", ""))
    return "storage" if slow and target == "ort-cpu" else target


def int8_kernel(kernel: "Kernel", spec: WeightQuantSpec | None, target: str) -> bool:
    """Whether ORT's static quantizer gets this kernel as an int8 kernel (its grid pinned, its bias
    int32, its input activation quantized): a quantized weight written in the target's own encoding
    (not storage), on a grid that is one 8-bit DequantizeLinear (per-tensor, per-channel, log2 up
    to 4 bits). Under ort-cpu / qdq with calibration data (`apply.quantization_passes`)."""
    return spec is not None and weight_target(kernel, target) != "storage" and (
        spec.granularity in ("per-tensor", "per-channel") or (spec.granularity == "log2" and spec.bits <= 4))


def keep_count(ratio: float, length: int) -> int:
    """Channels kept of `length` at keep ratio `ratio`: rounded, at least one."""
    return max(1, int(round(ratio * length)))


def channel_unit(length: int, multiple: int) -> int:
    """The step a group of `length` channels is pruned in: the largest of `multiple`, its half, its
    quarter ... that divides the width (a count then stays a multiple of it all the way up to the full
    width), else 1. A 24-channel group under a multiple of 16 steps in 8s, not in 1s.

    ORT's CPU convolutions and GEMMs leave their vectorised fast path on odd channel counts: on the
    ResNet-20 reference, 11/23/45 channels per stage ran 2-7x slower than fp32 at batch 32 while
    12/24/44 ran faster. graph-rl's action space (`search.pruning_space`) steps in the same unit.
    """
    unit = max(multiple, 1)
    while unit > 1 and length % unit:
        unit //= 2
    return unit


def round_to_unit(kept: int, length: int, multiple: int) -> int:
    """`kept` channels of `length` rounded to the nearest multiple of the group's unit, at least one
    unit and never above the group's width."""
    unit = channel_unit(length, multiple)
    return int(min(length, max(unit, unit * math.floor(kept / unit + 0.5))))


def channel_multiple(bg: "BlockGraph", config: CompressionConfig) -> int:
    """The multiple pruned channel counts are rounded to: the config's own (a saved config.json
    reproduces its counts anywhere), else the run's (`BlockGraph.channel_multiple`, --channel-multiple)."""
    return config.channel_multiple or getattr(bg, "channel_multiple", 1) or 1


def weight_range(bg: "BlockGraph", config: CompressionConfig | None = None) -> str:
    """How `config`'s quantized weights get their ranges (`config.WEIGHT_RANGES`): the config's own,
    else the run's (`BlockGraph.weight_range`, --weight-range)."""
    return (config.weight_range if config is not None else None) or getattr(bg, "weight_range", DEFAULT_WEIGHT_RANGE)


def fits_ranges(bg: "BlockGraph", config: CompressionConfig | None = None) -> bool:
    """Whether quantized weights are range-clipped before their grids are fitted (`passes.clip_weights`):
    every weight range but `minmax`."""
    return weight_range(bg, config) != "minmax"


def group_keep_counts(bg: "BlockGraph", config: CompressionConfig) -> dict[int, int]:
    """Channels each prunable group keeps under `config`.

    A group's channels are shared by all the kernels that produce it (a residual stage, a
    concat's producers are separate groups), so it keeps the LARGEST keep_ratio any of its
    producers asks for: a sensitive producer is never pruned harder than it asked. The count is
    rounded to the group's unit (`round_to_unit`, `channel_multiple`): the one place every method's
    counts are rounded, so the cost model and the passes agree. At least one unit is always kept.
    Unprunable groups keep everything and are not listed.
    """
    multiple = channel_multiple(bg, config)
    counts: dict[int, int] = {}
    for group in bg.groups:
        if not group.prunable or not group.producers:
            continue
        ratio = max(config.get(k).keep_ratio for k in group.producers)
        kept = round_to_unit(keep_count(ratio, group.length), group.length, multiple)
        if kept < group.length:
            counts[group.id] = kept
    return counts
