"""knapsack: HiReLC without its agents, the baseline that shows what the agents add.

The same accuracy signal HiReLC starts from (one proxy probe per kernel calibrates
`surrogate.ProxyEstimator`), the same greedy fit (`budget.repair` with the estimator's
damage-per-byte and `fill`), the same real evaluations and fine-tuning; no RL, no voting,
no surrogate. With `evaluations` > 1 it spends the extra rounds the way a careful engineer
would without agents:

  round 0   fp32 fitted to the budget by the probes' estimator (HiReLC's round 0 too)
  round r   the estimator recalibrated on every config the proxy has scored so far (each
            measured candidate is proxy-scored as well), then fp32 fitted again; when that
            config was measured already, the fit of `RESTARTS` random starting points whose
            estimated accuracy is best among those not yet measured

The emitted model is the best real measurement (validation score; ratio breaks ties).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.progress import PhaseSteps, ProgressFn, notify, progress_log
from hirelc_onnx.search.baselines import MethodResult, candidate_record, random_config
from hirelc_onnx.search.budget import check_reachable, repair
from hirelc_onnx.search.context import Measurement, SearchContext
from hirelc_onnx.search.features import WeightPerturbation, model_key
from hirelc_onnx.search.hirelc_state import measure_probes, observe, probe_configs
from hirelc_onnx.search.surrogate import ProxyEstimator, ProxyObservation

__all__ = ["probed_estimator", "run_knapsack"]

log = logging.getLogger(__name__)

RESTARTS = 16
"""Random starting points fitted when the recalibrated fit from fp32 was measured already."""


def fresh_restarts(bg: BlockGraph, target: str, fit: Callable[[CompressionConfig], CompressionConfig],
                   measured: set[str], rng: np.random.Generator
                   ) -> tuple[list[CompressionConfig], list[CompressionConfig]]:
    """RESTARTS random configs fitted by `fit`, and those of them whose model (`model_key`) is not in
    `measured`: where knapsack, and HiReLC when its agents have nothing new, look for a candidate."""
    starts = [fit(random_config(bg, target, rng)) for _ in range(RESTARTS)]
    return starts, [c for c in starts if model_key(bg, c) not in measured]


def probed_estimator(bg: BlockGraph, ctx: SearchContext, target: str,
                     progress: ProgressFn | None = None) -> ProxyEstimator:
    """HiReLC's probes scored by the real proxy and the estimator they calibrate: knapsack's accuracy
    signal, whose damage-per-byte fit from fp32 is the prior (HiReLC's without its agents)."""
    configs = probe_configs(bg, target)
    steps = PhaseSteps(progress, "knapsack: proxy probes", len(configs))
    probes, prune_probes = measure_probes(ctx, bg, configs, steps.step)
    return ProxyEstimator.from_probes(WeightPerturbation(bg, ctx.range_fits), probes, ctx.fp32_val_score, prune_probes)


def run_knapsack(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
                 evaluations: int = 8, seed: int = 0, progress: ProgressFn | None = None) -> MethodResult:
    """The estimator's damage-per-byte greedy fit, measured for real `evaluations` times (see the module)."""
    if ctx is None:
        raise UserError("--method knapsack measures candidates: give --data")
    if budget is None:
        raise UserError("--method knapsack fits a budget: give --budget")
    if evaluations < 1:  # its loop would end with nothing measured
        raise UserError(f"{option('method', 'knapsack')} needs at least one real evaluation, got "
                        f"{option('evaluations')} {evaluations}")
    check_reachable(bg, budget, target)
    estimator = probed_estimator(bg, ctx, target, progress)
    scored: list[ProxyObservation] = []
    rng = np.random.default_rng([seed, 17])

    def fit(start: CompressionConfig) -> CompressionConfig:
        return repair(bg, start, budget, damage=estimator.kernel_mse, fill=True)

    measured: set[str] = set()
    best: Measurement | None = None
    history: list[dict] = []
    for rnd in range(evaluations):
        if scored:
            estimator.calibrate(scored)
        source, candidate = "prior" if rnd == 0 else "recalibrated", fit(CompressionConfig({}, target=target))
        if model_key(bg, candidate) in measured:
            _, fresh = fresh_restarts(bg, target, fit, measured, rng)
            if not fresh:
                log.info("knapsack: every fit of %d restarts was measured already; stopping at round %d",
                         RESTARTS, rnd)
                break
            source, candidate = "restart", max(fresh, key=estimator.accuracy)
        scored.append(observe(ctx, candidate))
        m = ctx.measure(candidate)
        measured.add(model_key(bg, candidate))
        history.append(candidate_record(m, method="knapsack", round=rnd, source=source,
                                        predicted=estimator.accuracy(candidate)))
        progress_log.info("knapsack round %d/%d: %s config %.2fx, measured %.4f", rnd + 1, evaluations, source,
                 m.cost.ratio, m.score)
        if best is None or (m.score, m.cost.ratio) > (best.score, best.cost.ratio):
            best = m
        notify(progress, "knapsack: real evaluations", rnd + 1, evaluations)
    winner = next(h for h in history if h["score"] == best.score and h["ratio"] == best.cost.ratio)
    return MethodResult(best.config, best.model, best.score, history,
                        {"budget": budget, "winner_source": winner["source"], "estimator": estimator.state()})
