"""Budgets in true bytes: parsing `6x`, checking reachability, and the deterministic repair step."""
from __future__ import annotations

import re
from dataclasses import replace

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import model_cost

__all__ = ["BudgetError", "parse_budget", "bits_ladder", "MIN_KEEP", "KEEP_STEP", "max_ratio", "check_reachable",
           "repair"]

MIN_KEEP = 0.25  # the repair step never prunes a group below a quarter of its channels
KEEP_STEP = 0.125


class BudgetError(UserError):
    """The budget cannot be met by any config this tool can emit for the model and target."""


def parse_budget(text: str | float | None) -> float | None:
    """'6x', '6', 6.0 -> 6.0 (compression ratio in true bytes); None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*", str(text))
        if not m:
            raise UserError(f"budget must look like '6x' (a compression ratio), got {text!r}")
        value = float(m.group(1))
    if not value > 1.0:
        raise UserError(f"budget must be a ratio above 1x, got {text!r}")
    return value


def bits_ladder(target: str) -> tuple[int, ...]:
    """Bit widths worth stepping through: only those whose stored container is smaller.

    storage packs 2-bit, 4-bit and 8-bit containers (3 bits costs what 4 does, 5-7 what 8 does);
    ort-cpu and qdq store every grid in 8 bits, so lowering below 8 saves nothing there. Under
    ort-cpu the top rung is 7 bits: ORT's u8 x s8 kernels saturate with full-range 8-bit weights
    on x86 CPUs without VNNI (DESIGN.md), and 7-bit weights cannot.
    """
    return {"storage": (32, 8, 4, 2), "ort-cpu": (32, 7)}.get(target, (32, 8))


def _lower(kc: KernelConfig, target: str, prunable: bool) -> KernelConfig | None:
    ladder = bits_ladder(target)
    smaller = [b for b in ladder if b < kc.bits]
    if smaller:
        return replace(kc, bits=max(smaller))
    if prunable and kc.keep_ratio - KEEP_STEP >= MIN_KEEP - 1e-9:
        return replace(kc, keep_ratio=round(kc.keep_ratio - KEEP_STEP, 6))
    return None


def _floor_config(bg: BlockGraph, target: str) -> CompressionConfig:
    low = min(bits_ladder(target))
    kernels = {}
    for name, k in bg.kernels.items():
        prunable = k.group is not None and bg.groups[k.group].prunable
        kernels[name] = KernelConfig(bits=low, keep_ratio=MIN_KEEP if prunable else 1.0)
    return CompressionConfig(kernels, target=target)


def max_ratio(bg: BlockGraph, target: str) -> float:
    """The largest true-bytes ratio the repair step can reach (every kernel at its floor)."""
    return model_cost(bg, _floor_config(bg, target)).ratio


def check_reachable(bg: BlockGraph, budget: float, target: str) -> None:
    """Fail before any long work when the budget is beyond reach."""
    best = max_ratio(bg, target)
    if best < budget:
        raise BudgetError(f"budget {budget:g}x is unreachable for this model with target '{target}': at most "
                          f"{best:.2f}x (all kernels at {min(bits_ladder(target))} bits, prunable channel "
                          f"groups at {MIN_KEEP:.0%}; untouched weights cost {bg.weight_bytes - sum(bg.initializer_bytes[k.weight] for k in bg.kernels.values())} bytes)")


def repair(bg: BlockGraph, config: CompressionConfig, budget: float,
           sensitivity: dict[str, float] | None = None) -> CompressionConfig:
    """Lower a config until its true-bytes ratio meets `budget`, least sensitive kernels first.

    The step is deterministic: kernels are ordered by (sensitivity ascending, current weight
    bytes descending, name); each round takes the first kernel that can still be lowered and
    lowers it one rung: next smaller container in `bits_ladder(target)`, then keep_ratio down by
    KEEP_STEP to MIN_KEEP (prunable kernels only; every producer of the kernel's channel group
    is lowered with it, since a group keeps the largest ratio its producers ask for). Without
    sensitivities, bytes decide.
    """
    sensitivity = sensitivity or {}
    kernels = {name: config.get(name) for name in bg.kernels}
    current = CompressionConfig(kernels, target=config.target)
    cost = model_cost(bg, current)
    stuck: set[str] = set()
    while cost.ratio < budget:
        order = sorted((n for n in kernels if n not in stuck),
                       key=lambda n: (sensitivity.get(n, 0.0), -cost.kernels[n].weight_bytes, n))
        if not order:
            raise BudgetError(f"budget {budget:g}x cannot be met: reached {cost.ratio:.2f}x with every kernel at "
                              f"its floor")
        name = order[0]
        k = bg.kernels[name]
        lowered = _lower(kernels[name], config.target, k.group is not None and bg.groups[k.group].prunable)
        if lowered is None:
            stuck.add(name)
            continue
        if lowered.keep_ratio != kernels[name].keep_ratio:  # a group prunes as one: lower its producers together
            for producer in bg.groups[k.group].producers:
                kernels[producer] = replace(kernels[producer], keep_ratio=lowered.keep_ratio)
        kernels[name] = lowered
        current = CompressionConfig(dict(kernels), target=config.target)
        cost = model_cost(bg, current)
    return current
