"""Budgets in true bytes: parsing `6x`, checking reachability, and the deterministic repair step."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import BudgetError, InvalidOptionError
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost, weight_nbytes
from hirelc_onnx.specs import weight_target

__all__ = ["BudgetError", "parse_budget", "bits_ladder", "MIN_KEEP", "KEEP_STEP", "max_ratio", "check_reachable",
           "repair", "Damage"]

MIN_KEEP = 0.25  # the repair step never prunes a group below a quarter of its channels
KEEP_STEP = 0.125


def parse_budget(text: str | float | None) -> float | None:
    """'6x', '6', 6.0 -> 6.0 (compression ratio in true bytes); None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*", str(text))
        if not m:
            raise InvalidOptionError(f"budget must look like '6x' (a compression ratio), got {text!r}")
        value = float(m.group(1))
    if not value > 1.0:
        raise InvalidOptionError(f"budget must be a ratio above 1x, got {text!r}")
    return value


def bits_ladder(target: str) -> tuple[int, ...]:
    """Bit widths worth stepping through: only those whose stored container is smaller.

    storage packs 2-bit, 4-bit and 8-bit containers (3 bits costs what 4 does, 5-7 what 8 does);
    ort-cpu and qdq store every grid in 8 bits, so lowering below 8 saves nothing there. Under
    ort-cpu the top rung is 7 bits: ORT's u8 x s8 kernels saturate with full-range 8-bit weights
    on x86 CPUs without VNNI (docs/ARCHITECTURE.md, "Measured facts"), and 7-bit weights cannot.
    """
    return {"storage": (32, 8, 4, 2), "ort-cpu": (32, 7)}.get(target, (32, 8))


def _floor_config(bg: BlockGraph, target: str) -> CompressionConfig:
    kernels = {}
    for name, k in bg.kernels.items():
        prunable = k.group is not None and bg.groups[k.group].prunable
        low = min(bits_ladder(weight_target(k, target)))  # an embedding table under ort-cpu: storage's ladder
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


Damage = Callable[[str, KernelConfig], float]
"""Estimated accuracy damage of one kernel under a choice (e.g. logit-MSE from HiReLC's proxy estimator)."""


def repair(bg: BlockGraph, config: CompressionConfig, budget: float,
           sensitivity: dict[str, float] | None = None, *, damage: Damage | None = None,
           fill: bool = False) -> CompressionConfig:
    """Bring a config's true-bytes ratio to `budget`: lower it until it meets the budget, then
    (with `fill`) raise it while the budget still holds.

    The step is deterministic, one rung at a time. A rung down is the next smaller container in
    `bits_ladder(target)`, then keep_ratio down by KEEP_STEP to MIN_KEEP (prunable kernels only);
    a rung up is keep_ratio up by KEEP_STEP to 1, then the next larger container. A keep change
    moves every producer of the kernel's channel group, since a group keeps the largest ratio its
    producers ask for.

    Which kernel moves:
      * with `damage` (estimated damage of a kernel under a choice): lowering takes the rung with
        the least damage added per byte saved; filling the rung with the most damage removed per
        byte spent that still fits the budget (a greedy knapsack);
      * without: lowering takes kernels by (sensitivity ascending, current weight bytes
        descending, name), least sensitive and largest first; filling by (sensitivity descending,
        bytes ascending, name). Without sensitivities, bytes decide.
    Filling lands a config just above the budget, so methods compared at one budget are compared
    at (almost) one ratio, and slack the budget allows is spent on accuracy.
    """
    sensitivity = sensitivity or {}
    kernels = {name: config.get(name) for name in bg.kernels}
    for group in bg.groups:  # each producer states the keep its group really has (the emitted model is unchanged)
        if group.prunable and group.producers:
            keep = max(kernels[p].keep_ratio for p in group.producers)
            for p in group.producers:
                kernels[p] = replace(kernels[p], keep_ratio=keep)
    cost = model_cost(bg, CompressionConfig(kernels, target=config.target))
    while cost.ratio < budget:
        moves = [m for name in kernels for m in _moves(bg, kernels, name, config.target, cost, down=True)]
        if not moves:
            raise BudgetError(f"budget {budget:g}x cannot be met: reached {cost.ratio:.2f}x with every kernel at "
                              f"its floor")
        if damage is None:
            # the first kernel in sensitivity order, its first rung (bits before keep)
            name = min({m.name for m in moves}, key=lambda n: (sensitivity.get(n, 0.0),
                                                                -cost.kernels[n].weight_bytes, n))
            move = next(m for m in moves if m.name == name)
        else:
            move = min(moves, key=lambda m: (_damage_delta(bg, damage, kernels, m) / max(m.bytes, 1), m.name))
        _apply(bg, kernels, move)
        cost = model_cost(bg, CompressionConfig(dict(kernels), target=config.target))
    if fill:
        cost = _fill(bg, kernels, config.target, budget, cost, sensitivity, damage)
    return CompressionConfig(dict(kernels), target=config.target)


@dataclass(frozen=True)
class _Move:
    name: str
    choice: KernelConfig
    group: bool  # a keep change, applied to every producer of the kernel's group
    bytes: int  # estimated bytes saved (down) or spent (up); exact for bit changes


def _moves(bg: BlockGraph, kernels: dict[str, KernelConfig], name: str, target: str, cost: ModelCost,
           down: bool) -> list[_Move]:
    """The kernel's one-rung moves, bits before keep going down, keep before bits going up."""
    k = bg.kernels[name]
    kc, kcost = kernels[name], cost.kernels[name]
    prunable = k.group is not None and bg.groups[k.group].prunable
    ladder = bits_ladder(weight_target(k, target))
    bits = [b for b in ladder if (b < kc.bits if down else b > kc.bits)]
    out = []
    if bits:
        choice = replace(kc, bits=max(bits) if down else min(bits))
        new = weight_nbytes(k, choice, kcost.shape, kcost.fp32_weight_bytes, target)
        out.append(_Move(name, choice, False, abs(kcost.weight_bytes - new)))
    keep = round(kc.keep_ratio + (-KEEP_STEP if down else KEEP_STEP), 6)
    if prunable and (MIN_KEEP - 1e-9 <= keep if down else kc.keep_ratio < 1.0):
        keep = min(keep, 1.0)
        producers = bg.groups[k.group].producers
        # output channels of the group's producers scale with the keep ratio (consumers' inputs too:
        # left out of the estimate, counted exactly once the move is made)
        scale = abs(keep - kc.keep_ratio) / max(kc.keep_ratio, 1e-9)
        saved = sum(cost.kernels[p].weight_bytes for p in producers) * scale
        out.append(_Move(name, replace(kc, keep_ratio=keep), True, int(saved)))
    return out if down else out[::-1]


def _apply(bg: BlockGraph, kernels: dict[str, KernelConfig], move: _Move) -> None:
    if move.group:
        for producer in bg.groups[bg.kernels[move.name].group].producers:
            kernels[producer] = replace(kernels[producer], keep_ratio=move.choice.keep_ratio)
    kernels[move.name] = move.choice


def _damage_delta(bg: BlockGraph, damage: Damage, kernels: dict[str, KernelConfig], move: _Move) -> float:
    """Damage after the move minus before, over the kernels it changes (>= 0 going down)."""
    if not move.group:
        return damage(move.name, move.choice) - damage(move.name, kernels[move.name])
    keep = move.choice.keep_ratio
    return sum(damage(n, replace(kernels[n], keep_ratio=keep)) - damage(n, kernels[n])
               for n in bg.groups[bg.kernels[move.name].group].producers)


def _fill(bg: BlockGraph, kernels: dict[str, KernelConfig], target: str, budget: float, cost: ModelCost,
          sensitivity: dict[str, float], damage: Damage | None) -> ModelCost:
    """Raise rungs while the budget holds (see `repair`); `kernels` is updated in place."""
    blocked: set[tuple[str, bool]] = set()
    while True:
        slack = cost.original_bytes / budget - cost.total_bytes
        moves = [m for name in kernels for m in _moves(bg, kernels, name, target, cost, down=False)
                 if (m.name, m.group) not in blocked and m.bytes <= slack]
        if not moves:
            return cost
        if damage is None:
            moves.sort(key=lambda m: (-sensitivity.get(m.name, 0.0), cost.kernels[m.name].weight_bytes, m.name))
        else:
            moves.sort(key=lambda m: (_damage_delta(bg, damage, kernels, m) / max(m.bytes, 1), m.name))
        move = moves[0]
        before = {n: kernels[n] for n in bg.kernels}
        _apply(bg, kernels, move)
        trial = model_cost(bg, CompressionConfig(dict(kernels), target=target))
        if trial.ratio >= budget:
            cost = trial
        else:  # the estimate missed consumer bytes: undo, never try this rung again
            kernels.update(before)
            blocked.add((move.name, move.group))
