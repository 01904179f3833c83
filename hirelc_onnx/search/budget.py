"""Budgets in true bytes: parsing `6x`, checking reachability, and the deterministic repair step."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from hirelc_onnx.config import QTYPES, CompressionConfig, KernelConfig
from hirelc_onnx.errors import BudgetError, InvalidOptionError
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost, weight_nbytes
from hirelc_onnx.specs import weight_target

__all__ = ["BudgetError", "parse_budget", "bits_ladder", "MIN_KEEP", "KEEP_STEP", "max_ratio", "check_reachable",
           "repair", "Damage", "granularity_choices", "qtype_choices"]

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


def granularity_choices(target: str) -> tuple[str, ...]:
    """Granularities worth choosing for a target: ORT's fused int8 kernels take per-channel or per-tensor;
    the storage target also packs per-group scales and log2 codebooks."""
    if target == "storage":
        return ("per-channel", "per-group", "per-tensor", "log2")
    return ("per-channel", "per-tensor")


def qtype_choices(target: str) -> tuple[str, ...]:
    """Weight grids worth choosing for a target: storage decodes either at load; ORT's int8 kernels
    (ort-cpu, and qdq, which ORT fuses into the same kernels) run weights with a zero point off their
    fast path (ORT 1.32, EfficientNet-Lite0 at batch 8: one asymmetric per-channel depthwise
    QLinearConv 72 ms against 1 ms symmetric; a search candidate with a third of its kernels
    asymmetric ran 0.25x of fp32 where its latency estimate said 2.3x), so they get symmetric ones."""
    return QTYPES if target == "storage" else ("symmetric",)


def _floor_config(bg: BlockGraph, target: str) -> CompressionConfig:
    kernels = {}
    for name, k in bg.kernels.items():
        prunable = bg.prunable_kernel(name)
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
    like = {"target": config.target, "channel_multiple": config.channel_multiple}  # what every step's config keeps
    cost = model_cost(bg, CompressionConfig(kernels, **like))
    table = _MoveTable(bg, config.target, down=True, damage=damage)
    while cost.ratio < budget:
        moves = [m for name in kernels for m in table.moves(kernels, name, cost)]
        if not moves:
            raise BudgetError(f"budget {budget:g}x cannot be met: reached {cost.ratio:.2f}x with every kernel at "
                              f"its floor")
        if damage is None:
            # the first kernel in sensitivity order, its first rung (bits before keep)
            name = min({m.name for m in moves}, key=lambda n: (sensitivity.get(n, 0.0),
                                                                -cost.kernels[n].weight_bytes, n))
            move = next(m for m in moves if m.name == name)
        else:
            move = min(moves, key=lambda m: (table.delta(kernels, m) / max(m.bytes, 1), m.name))
        _apply(bg, kernels, move)
        cost = model_cost(bg, CompressionConfig(dict(kernels), **like))
    if fill:
        cost = _fill(bg, kernels, config.target, budget, cost, sensitivity, damage)
    return CompressionConfig(dict(kernels), **like)


@dataclass(frozen=True)
class _Move:
    name: str
    choice: KernelConfig
    group: bool  # a keep change, applied to every producer of the kernel's group
    bytes: int  # estimated bytes saved (down) or spent (up); exact for bit changes


# the grids a damage-guided repair may give a storage weight at each rung: (qtype, granularity)
GRID_VARIANTS = (("symmetric", "per-channel"), ("asymmetric", "per-channel"), ("asymmetric", "per-group"))


def _moves(bg: BlockGraph, kernels: dict[str, KernelConfig], name: str, target: str, cost: ModelCost,
           down: bool, variants: bool = False) -> list[_Move]:
    """The kernel's one-rung moves, bits before keep going down, keep before bits going up.

    With `variants` (a damage-guided repair) a storage weight's bit rung is offered in each of
    `GRID_VARIANTS`, and a change of grid at its current bits that saves bytes (down) or spends
    them (up) is a move too: the knapsack then weighs 4 bits in groups of 32 with a zero point
    (5.1 bits a weight) against 4 bits per channel (4.1) and 8 bits (8.1), kernel by kernel.
    MiniLM at 6.01x, no fine-tuning, top-10 neighbour overlap on 1000 held-out sentences: 0.897
    with its table 4-bit asymmetric per row, attention 8-bit, feed-forward 4-bit asymmetric in
    groups of 32; HiReLC with symmetric per-channel rungs only found 0.841.
    """
    k = bg.kernels[name]
    kc, kcost = kernels[name], cost.kernels[name]
    prunable = bg.prunable_kernel(name)
    ladder = bits_ladder(weight_target(k, target))
    bits = [b for b in ladder if (b < kc.bits if down else b > kc.bits)]
    out = []
    grids = [(kc.qtype, kc.granularity)]
    if variants and weight_target(k, target) == "storage" and kc.granularity != "log2":
        grids += [g for g in GRID_VARIANTS if g != grids[0]]
    if bits:
        for qtype, granularity in grids:
            choice = replace(kc, bits=max(bits) if down else min(bits), qtype=qtype, granularity=granularity)
            new = weight_nbytes(k, choice, kcost.shape, kcost.fp32_weight_bytes, target)
            if not variants or (new < kcost.weight_bytes) == down:
                out.append(_Move(name, choice, False, abs(kcost.weight_bytes - new)))
    if kc.quantized:
        for qtype, granularity in grids[1:]:
            choice = replace(kc, qtype=qtype, granularity=granularity)
            new = weight_nbytes(k, choice, kcost.shape, kcost.fp32_weight_bytes, target)
            if new != kcost.weight_bytes and (new < kcost.weight_bytes) == down:
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


class _MoveTable:
    """One repair's moves and damage changes, recomputed only for the kernels a step changed.

    Each step of `repair` changes one kernel (or one channel group) and used to re-price every
    kernel's every move (EfficientNet-Lite0: a search's fills asked `_moves` 400,000 times). A
    kernel's moves depend only on its choice, its cost and, for a keep rung, its group's producers'
    bytes; a move's damage change only on the choices of the kernels it changes. Both are kept
    while those are equal, so the steps choose exactly what they chose before. Lives for one call:
    `damage` (the estimator) changes between calls.
    """

    def __init__(self, bg: BlockGraph, target: str, *, down: bool, damage: Damage | None):
        self.bg, self.target, self.down, self.damage = bg, target, down, damage
        self._moves: dict[str, tuple[tuple, list[_Move]]] = {}
        self._deltas: dict[tuple, float] = {}

    def moves(self, kernels: dict[str, KernelConfig], name: str, cost: ModelCost) -> list[_Move]:
        """`_moves` of `name` (the list is shared: do not change it)."""
        producers = self._producers(name) if self.bg.prunable_kernel(name) else ()
        sig = (kernels[name], cost.kernels[name], tuple(cost.kernels[p].weight_bytes for p in producers))
        hit = self._moves.get(name)
        if hit is None or hit[0] != sig:
            hit = sig, _moves(self.bg, kernels, name, self.target, cost, self.down, self.damage is not None)
            self._moves[name] = hit
        return hit[1]

    def delta(self, kernels: dict[str, KernelConfig], move: _Move) -> float:
        """`_damage_delta` of `move` from the kernels' current choices."""
        changed = self._producers(move.name) if move.group else (move.name,)
        key = move, tuple(kernels[n] for n in changed)
        value = self._deltas.get(key)
        if value is None:
            value = self._deltas[key] = _damage_delta(self.bg, self.damage, kernels, move)
        return value

    def _producers(self, name: str) -> tuple[str, ...]:
        return tuple(self.bg.groups[self.bg.kernels[name].group].producers)


def _key(move: _Move, damage: Damage | None) -> tuple:
    """What a rung that missed the budget blocks: the kernel's rung, or (damage-guided) that one choice."""
    return (move.name, move.group) if damage is None else (move.name, move.group, move.choice)


def _fill(bg: BlockGraph, kernels: dict[str, KernelConfig], target: str, budget: float, cost: ModelCost,
          sensitivity: dict[str, float], damage: Damage | None) -> ModelCost:
    """Raise rungs while the budget holds (see `repair`); `kernels` is updated in place."""
    blocked: set[tuple] = set()
    table = _MoveTable(bg, target, down=False, damage=damage)
    while True:
        slack = cost.original_bytes / budget - cost.total_bytes
        moves = [m for name in kernels for m in table.moves(kernels, name, cost)
                 if _key(m, damage) not in blocked and m.bytes <= slack]
        if damage is not None:  # a grid variant can cost more and still be worse: never spend bytes on damage
            moves = [m for m in moves if m.choice.bits != kernels[m.name].bits or m.group
                     or table.delta(kernels, m) < 0]
        if not moves:
            return cost
        if damage is None:
            moves.sort(key=lambda m: (-sensitivity.get(m.name, 0.0), cost.kernels[m.name].weight_bytes, m.name))
        else:
            moves.sort(key=lambda m: (table.delta(kernels, m) / max(m.bytes, 1), m.name))
        move = moves[0]
        before = {n: kernels[n] for n in bg.kernels}
        _apply(bg, kernels, move)
        trial = model_cost(bg, CompressionConfig(dict(kernels), target=target))
        if trial.ratio >= budget:
            cost = trial
        else:  # the estimate missed consumer bytes: undo, never try this rung again
            kernels.update(before)
            blocked.add(_key(move, damage))
