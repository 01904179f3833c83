"""Baselines every RL method is compared against, each emitting a model like the RL methods do.

  uniform   -- the same bits / keep ratio for every kernel (needs no data unless measured)
  l1-int8   -- L1-magnitude uniform channel pruning, then 8-bit weights (int8 activations too
               under ort-cpu)
  ort-int8  -- ONNX Runtime's own static int8 quantization of the fp32 model, with the settings
               that stay accurate on CPUs without VNNI (see passes.quantize_activations)
  random    -- random configs fitted to the budget (budget.repair with fill, sensitivity-blind),
               each measured for real; the best on the validation split wins (same evaluation
               budget as an RL run)
  uniform-l1 -- for each bit width of the target's ladder, every kernel at those bits and every
               prunable group L1-pruned by the one keep ratio that lands on the budget; each
               measured for real, the best on validation wins (at most `evaluations` of them)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import GRANULARITIES, CompressionConfig, KernelConfig
from hirelc_onnx.errors import InvalidOptionError, UserError, option
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.progress import ProgressFn, notify, progress_log
from hirelc_onnx.search.budget import MIN_KEEP, BudgetError, bits_ladder, granularity_choices, qtype_choices, repair
from hirelc_onnx.search.speed import MARGIN as SPEED_MARGIN
from hirelc_onnx.search.speed import ROUNDS as SPEED_ROUNDS
from hirelc_onnx.search.speed import SpeedGoal, speed_repair
from hirelc_onnx.search.context import Measurement, SearchContext
from passes.quantize_activations import quantize_activations
from passes.storage import initializer_nbytes

__all__ = ["MethodResult", "candidate_record", "keep_for_flops", "run_uniform", "run_l1_int8", "run_ort_int8", "run_random",
           "run_uniform_l1", "uniform_keep_for_budget"]

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """What a method hands back: the chosen config, the emitted model, and every candidate tried."""

    config: CompressionConfig | None
    model: onnx.ModelProto = field(repr=False)
    val_score: float | None
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def candidate_record(m: Measurement, kind: str = "real", **more) -> dict:
    """One evaluated candidate as the report and plots want it."""
    return {"kind": kind, "score": m.score, "ratio": m.cost.ratio, "bytes": m.cost.total_bytes,
            "macs_fraction": m.cost.macs_fraction, "finetuned": m.finetuned, "seconds": m.seconds,
            "config": m.config.to_dict(), **_placement_record(m), **more}  # the config: footprints.json, so a user can pick another point


def _placement_record(m: Measurement) -> dict:
    """Where a batched evaluation ran: worker, node, wall and queue seconds, attempts (none in-process alone)."""
    p = m.placement
    if p is None:
        return {}
    return {"worker": p.worker, "node": p.node, "wall_seconds": p.wall_seconds, "queue_seconds": p.queue_seconds,
            "attempts": p.attempts, "retried": p.retried}


def _uniform_config(bg: BlockGraph, target: str, bits: int, keep: float, qtype: str = "symmetric",
                    granularity: str = "per-channel") -> CompressionConfig:
    kernels = {}
    for name in bg.kernels:
        prunable = bg.prunable_kernel(name)
        kernels[name] = KernelConfig(bits=bits, keep_ratio=keep if prunable else 1.0, qtype=qtype,
                                     granularity=granularity)
    return CompressionConfig(kernels, target=target).validate()


def run_uniform(bg: BlockGraph, ctx: SearchContext | None, target: str, *, bits: int | None = None,
                keep: float = 1.0, qtype: str = "symmetric", granularity: str = "per-channel") -> MethodResult:
    """The same bits / keep ratio / qtype / granularity for every kernel (measured when there is data).

    bits: default 8, or 7 under ort-cpu, where ORT's u8 x s8 kernels saturate with full-range 8-bit
    weights on CPUs without VNNI (passes/quantize_activations.py).
    """
    if bits is None:
        bits = 7 if target == "ort-cpu" else 8
    if bits < 32 and target != "storage" and (qtype == "asymmetric" or granularity == "per-group"):
        log.warning("--target %s with %s %s weights: ORT runs them off its int8 fast path (docs/ARCHITECTURE.md, "
                    "'ORT's int8 kernels want symmetric weights'); symmetric per-channel is what it runs fast",
                    target, qtype, granularity)
    config = _uniform_config(bg, target, bits, keep, qtype, granularity)
    goal = getattr(ctx, "speed_goal", None)  # --speedup: the largest keep up to `keep` that meets it, timed whole
    if goal is not None:
        config = _uniform_keep_for_speed(bg, ctx, goal, lambda k: _uniform_config(bg, target, bits, k, qtype, granularity),
                                         keep)
    if ctx is None:
        return MethodResult(config, apply_config(bg, config), None)
    m = ctx.measure(config)
    return MethodResult(config, m.model, m.score, [candidate_record(m, method="uniform")])


def _uniform_keep_for_speed(bg: BlockGraph, ctx: SearchContext, goal: SpeedGoal,
                            config_at: Callable[[float], CompressionConfig], keep: float) -> CompressionConfig:
    """Uniform L1 under --speedup, by the rule the searches follow: the largest keep (in 1/16 steps,
    at most `keep`) whose calibrated estimate meets the goal with the repair's margin, built and
    timed whole; while it misses, the estimate is recalibrated (`SpeedGoal.observe`) and the next
    keep down is tried, at most `speed.ROUNDS` timings. The last one tried when none met it (the
    report then says the goal was missed, with the figure)."""
    calib = ctx.calib_batches if ctx.target in ("ort-cpu", "qdq") else None
    keeps = [k for k in np.arange(16, 3, -1) / 16 if k <= keep + 1e-9] or [keep]
    config, timed = config_at(keeps[-1]), 0
    for k in keeps:
        config = config_at(float(k))
        if goal.estimate(bg, config) < goal.factor * SPEED_MARGIN and k != keeps[-1]:
            continue
        speed = goal.timed(apply_config(bg, config, calib_batches=calib))
        timed += 1
        progress_log.info("uniform under %s: keep %.4f measured %.2fx whole", goal.describe(), k, speed)
        if goal.accepts(speed) or timed >= SPEED_ROUNDS:
            break
        goal.observe(bg, config, speed)
    return config


def _largest_keep(fits: Callable[[float], bool], lo: float, iterations: int) -> float:
    """Bisection for the largest keep ratio in [lo, 1] that `fits` (monotone: fits(lo) assumed)."""
    hi = 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def keep_for_flops(bg: BlockGraph, fraction: float, target: str = "storage") -> float:
    """The uniform keep ratio whose L1-pruned model has at most `fraction` of the original MACs
    (bisection on the cost model; MACs fall roughly with keep squared in conv chains)."""
    return _largest_keep(lambda keep: model_cost(bg, _uniform_config(bg, target, 32, keep)).macs_fraction <= fraction,
                         0.05, 30)


def uniform_keep_for_budget(bg: BlockGraph, target: str, bits: int, budget: float) -> float | None:
    """The largest uniform keep ratio (>= MIN_KEEP) at which `bits` everywhere meets `budget`, or
    None when even MIN_KEEP misses it (bisection on the cost model)."""
    def fits(keep: float) -> bool:
        return model_cost(bg, _uniform_config(bg, target, bits, keep)).ratio >= budget

    if fits(1.0):
        return 1.0
    if not fits(MIN_KEEP):
        return None
    return _largest_keep(fits, MIN_KEEP, 20)


def run_uniform_l1(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
                   evaluations: int = 8, progress: ProgressFn | None = None) -> MethodResult:
    """Uniform bits + uniform L1 pruning fitted to the budget, one candidate per bit width."""
    if ctx is None:
        raise UserError(f"{option('method', 'uniform-l1')} measures candidates: give {option('data')}")
    if budget is None:
        raise InvalidOptionError(f"{option('method', 'uniform-l1')} fits a budget: give {option('budget')}")
    candidates = []
    for bits in sorted((b for b in bits_ladder(target) if b < 32), reverse=True):
        keep = uniform_keep_for_budget(bg, target, bits, budget)
        if keep is not None:
            candidates.append(_uniform_config(bg, target, bits, keep))
    if not candidates:
        raise BudgetError(f"budget {budget:g}x is beyond uniform bits with L1 pruning down to {MIN_KEEP:.0%}")
    candidates = candidates[:max(1, evaluations)]
    best: Measurement | None = None
    history = []
    measured = ctx.measure_batch(candidates, lambda n: notify(progress, "uniform-l1: real evaluations", n, len(candidates)))
    for i, (config, m) in enumerate(zip(candidates, measured)):
        if m is None:  # its worker died every attempt (ctx.evaluation_log says why)
            continue
        bits = next(iter(config.kernels.values())).bits
        keep = min(kc.keep_ratio for kc in config.kernels.values())
        history.append(candidate_record(m, method="uniform-l1", step=i, bits=bits, keep=keep))
        if best is None or m.score > best.score:
            best = m
        progress_log.info("uniform-l1 %d/%d: %d bits, keep %.3f, %.2fx, measured %.4f", i + 1, len(candidates), bits,
                          keep, m.cost.ratio, m.score)
    if best is None:
        raise UserError("every candidate's evaluation failed (its worker died); see the log")
    return MethodResult(best.config, best.model, best.score, history)


def run_l1_int8(bg: BlockGraph, ctx: SearchContext | None, target: str, *, keep: float = 0.5) -> MethodResult:
    """8-bit containers; 7-bit weight grids under ort-cpu (no u8 x s8 saturation without VNNI)."""
    return run_uniform(bg, ctx, target, bits=7 if target == "ort-cpu" else 8, keep=keep)


def run_ort_int8(bg: BlockGraph, ctx: SearchContext | None, target: str) -> MethodResult:
    """ORT's quantize_static on the fp32 model (activations and weights int8, QDQ)."""
    if ctx is None:
        raise UserError(f"{option('method', 'ort-int8')} calibrates activations: give {option('data')}")
    model = quantize_activations(bg.model, ctx.calib_batches)
    score = ctx.score_model(model, ctx.splits.val)
    ratio = bg.weight_bytes / max(initializer_nbytes(model), 1)
    return MethodResult(None, model, score, [{"kind": "real", "score": score, "ratio": ratio, "method": "ort-int8"}])


def random_config(bg: BlockGraph, target: str, rng: np.random.Generator) -> CompressionConfig:
    """A random point of the search space (before budget repair)."""
    return CompressionConfig({name: _random_kernel(bg, name, target, rng) for name in bg.kernels}, target=target)


def neighbour_config(bg: BlockGraph, base: CompressionConfig, rng: np.random.Generator,
                     moves: int = 3) -> CompressionConfig:
    """`base` with `moves` kernels (distinct, at random) given a random choice each (before budget repair):
    a point near a config worth knowing the surroundings of."""
    names = sorted(bg.kernels)
    changed = rng.choice(len(names), size=min(moves, len(names)), replace=False)
    kernels = {n: base.get(n) for n in names}
    for i in changed:
        kernels[names[i]] = _random_kernel(bg, names[i], base.target, rng)
    return CompressionConfig(kernels, target=base.target)


def _random_kernel(bg: BlockGraph, name: str, target: str, rng: np.random.Generator) -> KernelConfig:
    """One kernel's random choice within what the target offers (`bits_ladder`, `qtype_choices`,
    `granularity_choices`; no log2): under ort-cpu a random grid ORT runs off its int8 fast path was
    a candidate no latency estimate foresaw (EfficientNet-Lite0: HiReLC's restart ran 0.25x of fp32)."""
    bits_choices = tuple(b for b in bits_ladder(target) if b < 32)
    return KernelConfig(
        bits=int(rng.choice(bits_choices)), keep_ratio=float(rng.choice([0.5, 0.75, 1.0])) if bg.prunable_kernel(name) else 1.0,
        qtype=str(rng.choice(qtype_choices(target))),
        granularity=str(rng.choice([g for g in GRANULARITIES if g in granularity_choices(target) and g != "log2"])))


def run_random(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
               evaluations: int = 8, seed: int = 0,
               progress: ProgressFn | None = None) -> MethodResult:
    """Random search with the same number of real evaluations as the RL methods."""
    if ctx is None:
        raise UserError(f"{option('method', 'random')} measures candidates: give {option('data')}")
    if evaluations < 1:  # nothing measured, nothing to return
        raise UserError(f"{option('method', 'random')} needs at least one real evaluation, got "
                        f"{option('evaluations')} {evaluations}")
    rng = np.random.default_rng(seed)
    goal = getattr(ctx, "speed_goal", None)  # --speedup: pruned to the estimate, rejected when measured slower
    best: Measurement | None = None
    fastest: tuple[float, Measurement] | None = None
    history = []
    configs = []
    for _ in range(evaluations):
        config = random_config(bg, target, rng)
        config = repair(bg, config, budget, fill=True) if budget else config
        configs.append(speed_repair(bg, config, goal) if goal is not None else config)
    measured = ctx.measure_batch(configs, lambda n: notify(progress, "random: real evaluations", n, evaluations))
    for i, m in enumerate(measured):
        if m is None:  # its worker died every attempt (ctx.evaluation_log says why)
            continue
        speed = goal.measure(m.model) if goal is not None else None
        history.append(candidate_record(m, method="random", step=i, **({} if speed is None else {"speedup": speed})))
        if speed is not None and not goal.accepts(speed):  # rejected: kept only in case none meets the goal
            if fastest is None or speed > fastest[0]:
                fastest = (speed, m)
        elif best is None or m.score > best.score:
            best = m
        progress_log.info("random %d/%d: config %.2fx, measured %.4f", i + 1, evaluations, m.cost.ratio, m.score)
    if best is None and fastest is not None:  # no candidate reached the speedup: the fastest one, and the report says so
        best = fastest[1]
    if best is None:
        raise UserError("every candidate's evaluation failed (its worker died); see the log")
    return MethodResult(best.config, best.model, best.score, history)
