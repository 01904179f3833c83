"""HiReLC: hierarchical RL ensembles, a proxy-then-surrogate accuracy signal, an active-learning loop.

One readable loop (`run_hirelc`) with its settings (`HiReLCSettings`). Before the loop: one
proxy probe per kernel (the logit-MSE of quantizing that kernel alone to 4 bits), which
calibrates the cold-start accuracy estimator (surrogate.ProxyEstimator); sensitivity per kernel
and block from Fisher when the bridge provides it, else from those probes. Then, for each of the
`evaluations` rounds (the real-evaluation count random search gets):

  1. accuracy signal  recalibrate the proxy estimator on every config the proxy has scored;
                      retrain the MLP surrogate on every real (config, fine-tuned score) pair;
                      the agents' working config becomes the incumbent (the best real measurement,
                      before any the prior), so what they vote refines it (`refine_incumbent`)
  2. high level       the budget ensemble (PPO, A2C, PPO with other reward weights) trains on
                      BudgetEnv and votes a budget level per block, shifted by sensitivity
  3. low level        each block's ensemble trains on its BlockEnv under that level and votes
                      [bits, keep, qtype, granularity] per kernel; blocks update the working
                      config one after another
  4. proxy check      the voted config and the best pool configs go through ONNX Runtime
                      (cached by config hash), recorded as "proxy" history, for recalibration
  5. real evaluation  the estimator's prior (fp32 fitted by budget.repair with fill: the proxy's
                      damage-per-byte knapsack without the agents) competes in the first round
                      (`screen_first`; off: it is measured unscreened); each round ranks the
                      voted config repaired only as far as the budget needs, the
                      vote filled to the budget, the pool's fitted configs and knapsack's fitted
                      random starts (`restarts`) by predicted accuracy + kappa * surrogate spread
                      (active learning; `select_by_prediction` off: the vote first, whatever its
                      prediction); the first `screen_candidates` are scored by the real proxy and
                      the one whose measured damage is least is measured (`screen_rank`: the
                      estimator can miss a change by far). Measured for real: fine-tune,
                      quantize, score on the validation split
  6. state            the loop's memory (`hirelc_state.HiReLCState`: round, probes, measurements,
                      proxy results, working config, levels, the estimator's calibration, the
                      fine-tuning rate, the ensembles' weights and optimizer states) is written
                      atomically, so `resume=True` continues with the next round

A last round that measures the prior (a one-evaluation run, one pick per round) skips steps 2-4:
nothing could use what the agents learn or what the proxy checks record, and the prior is the same
without them (a one-evaluation run is the calibrated knapsack). Resuming such a run with more
evaluations trains the agents from then on, and says it differs from an uninterrupted run.

Resuming replays: everything a round depends on is either in the state or derived from
(seed, round) -- the round's numpy Generator and the global streams the RL learners draw from
(`agents.seeded_streams`) -- so a run killed at any point and resumed emits the model the
uninterrupted run emits, byte for byte, when fine-tuning is bounded by epochs (`finetune_epochs`;
a clock-bounded fine-tune is not repeatable even uninterrupted).

The result is the best REAL measurement that meets the budget (and `max_drop` when given);
the surrogate and the proxy shape rewards only.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.evaluate.objective import expected_score
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.kill_points import kill_point
from hirelc_onnx.progress import PhaseSteps, ProgressFn, notify, progress_log
from hirelc_onnx.search.agents import AgentSettings, Ensemble, load_ensembles, save_ensembles, seeded_streams
from hirelc_onnx.search.baselines import MethodResult, candidate_record, neighbour_config, random_config
from hirelc_onnx.search.budget import MIN_KEEP, check_reachable, repair
from hirelc_onnx.search.context import Measurement, SearchContext
from hirelc_onnx.search.envs import BlockEnv, BudgetEnv, RewardWeights, SearchProblem
from hirelc_onnx.search.features import WeightPerturbation, config_key, model_key
from hirelc_onnx.search.knapsack import fresh_restarts
from hirelc_onnx.search.hirelc_state import PROBE, HiReLCState, RealPoint, measure_probes, observe, probe_configs
from hirelc_onnx.search.surrogate import AccuracyModel, ProxyEstimator, ProxyObservation
from hirelc_onnx.search.speed import SpeedGoal, speed_budget, speed_repair

__all__ = ["HiReLCSettings", "QUICK_SETTINGS", "run_hirelc"]

log = logging.getLogger(__name__)

PHASE = "hirelc: real evaluations"
SCREEN_RANKS = ("corrected", "measured")


@dataclass(frozen=True)
class HiReLCSettings:
    """Every knob of HiReLC, with the defaults `hirelc-onnx compress --method hirelc` uses.

    Pass one as `settings=` to `run_hirelc` (or `hirelc_onnx.compress`).
    """

    ensemble_size: int = 3
    """Agents per ensemble (each level, each block): the first `ensemble_size` of `member_kinds`, cycled."""
    member_kinds: tuple[str, ...] = ("ppo", "a2c", "ppo-acc")
    """Learner and reward-weight profile of each member (agents.MEMBER_KINDS)."""
    voting: str = "majority"
    """How members' actions combine: majority (ties: most confident), majority-reward (ties: best
    recent return), soft (summed probabilities)."""
    reward: RewardWeights = RewardWeights()
    """Base weights of the five reward parts; members scale them."""
    n_levels: int = 7
    """Budget levels in the high level's table (envs.level_table)."""
    level_span: tuple[float, float] = (0.4, 2.5)
    """Storage fraction of the most aggressive / generous level, in multiples of 1 / budget."""
    sensitivity_shift: float = 1.0
    """Levels added per standard deviation of block sensitivity above the mean."""
    max_shift: int = 2
    """Largest sensitivity shift, in levels."""
    episode_steps: int = 8
    """Refinement steps per episode, at both levels (the paper's public code: 20)."""
    high_steps: int = 128
    """Environment steps per high-level member per round."""
    low_steps: int = 64
    """Environment steps per low-level member per block per round."""
    agent: AgentSettings = AgentSettings(n_steps=8)
    """Rollouts of n_envs * n_steps = 32 samples (the paper's public code: 128)."""
    """Learner hyper-parameters (rollout length, net size, learning rate, threads)."""
    surrogate_min_points: int = 2
    """Real measurements before the surrogate contributes to the accuracy term."""
    surrogate_prior_points: float = 4.0
    """The surrogate's weight in the accuracy term is n / (n + this), n = real measurements."""
    warmup_configs: int = 24
    """Random configs, fitted to the budget, scored by the real proxy before round 0: the surrogate's
    warm-up points (with every config the proxy scores later; the paper's code fine-tunes 100, too
    dear here) and more points for the estimator's calibration."""
    warmup_local: float = 0.0
    """Share of the warm-up configs that are the prior (fp32 fitted by the estimator) with
    `warmup_moves` kernels changed at random, repaired to the budget, instead of random configs: the
    surrogate then knows the region the agents refine (they start from the incumbent, the prior first)."""
    warmup_moves: int = 3
    """Kernels each local warm-up config changes."""
    warmup_weight: float = 0.25
    """What one proxy-scored warm-up point counts for in the surrogate's weight (a real one: 1)."""
    surrogate_models: int = 5
    """MLPs in the surrogate ensemble (their spread is the acquisition's uncertainty)."""
    pool_size: int = 8
    """Visited configs per round kept as active-learning candidates."""
    proxy_checks: int = 2
    """Pool configs per round scored by the real proxy (besides the voted and measured ones)."""
    acquisition_kappa: float = 1.0
    """Weight of the surrogate spread when a pool config is picked for measurement."""
    batch_size: int = 1
    """Real evaluations per round, measured side by side (`--workers`, `--ray`): the round's pick, then
    the next best unmeasured configs by acquisition. A run makes up to `evaluations` x this many."""
    fisher_samples: int = 256
    """Samples of the fine-tune split the Fisher sensitivity uses."""
    default_budget: float = 4.0
    """The true-bytes ratio searched for when no budget is given."""
    select_by_prediction: bool = True
    """Rounds after the first measure, of the voted config (repaired as `fill_votes` says), the vote
    filled to the budget and the pool's fitted configs, the unmeasured one with the best accuracy
    prediction + kappa * spread: the agents propose, the surrogate (taught by every real point)
    decides what is worth a fine-tune. Off: the vote is measured whatever its prediction."""
    refine_incumbent: bool = True
    """Each round the agents start from the incumbent: the best real measurement so far (before any,
    the prior the first round measures), so their votes are refinements of what is known to work,
    judged against it on the reward. Off: they refine their own working config round after round,
    from the level table's greedy fill (an ablation switch: `bench.search`'s `hirelc-unanchored`)."""
    screen_candidates: int = 8
    """The candidates the acquisition ranks first each round are scored by the real proxy (ONNX Runtime,
    no fine-tuning; cached, and recorded for the estimator's recalibration) before one is chosen for a
    fine-tune (`screen_rank` says how). The estimator's additive per-kernel errors can miss a change by
    far: on EfficientNet-Lite0 a pool config pruning two expand convs to 0.75 was predicted 0.97 and
    measured 0.025 by the proxy (0.12 after fine-tuning). 0: the acquisition alone."""
    screen_rank: str = "measured"
    """How the screened candidates are ranked. "measured": by the screen alone (the proxy's measured
    logit-MSE read through the calibrated agreement curve), so the fine-tune goes to the candidate whose
    measured damage is least; with four evaluations, the acquisition's exploration bonus (kappa times the
    surrogate's spread, up to 0.15 on the recognizer) otherwise outweighed the measurement and sent
    candidates the screen had seen as the worst of eight to a fine-tune (0.29 character accuracy).
    "corrected" (as before): the acquisition, each prediction moved by the estimator's measured error."""
    restarts: bool = True
    """Each round, knapsack's RESTARTS random starts fitted to the budget join the vote and the pool on the
    acquisition (source "restart"), not only when those have nothing unmeasured left: at 10x on the
    recognizer, knapsack's restarts beat its prior on every seed (0.81 mean against 0.73) while the agents'
    refinements of the prior did not. Off: restarts only as the last resort."""
    screen_first: bool = True
    """The first round is screened like the others: its fine-tune goes to the best screened of the prior,
    the agents' vote, their pool and the restarts (the prior always among those screened). Off: the first
    round measures the prior, the agents' first round unused (as before; on the recognizer at 6x the
    winners were then a restart and two pool configs at 0.9887 over three seeds, with it three pool
    configs at 0.9895; EfficientNet-Lite0 at 6x kept the prior)."""
    fill_votes: bool = False
    """Fill a voted config up to the budget (`budget.repair(fill=True)`: the estimator's greedy
    knapsack spends the slack) before measuring it. Off: a vote is repaired only as far as the
    budget needs, so what is measured is the agents' choice (an ablation switch)."""


QUICK_SETTINGS = HiReLCSettings(ensemble_size=2, high_steps=16, low_steps=16, surrogate_models=2, episode_steps=2,
                                warmup_configs=4, agent=AgentSettings(n_envs=2, n_steps=4))
"""The smallest complete loop (both levels, ensembles of two, every phase) for smoke runs: `bench --quick`
and the tests. Its runs show the machinery works, not how well HiReLC searches."""


def run_hirelc(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
               max_drop: float | None = None, time_limit: float | None = None, seed: int = 0,
               evaluations: int = 8, progress: ProgressFn | None = None,
               state_path: str | Path | None = None, resume: bool = False,
               settings: HiReLCSettings | None = None) -> MethodResult:
    """Search a config meeting `budget` (true-bytes ratio) with HiReLC; see the module docstring.

    max_drop: largest accepted drop of the validation score, in points (the final pick prefers
    measurements within it). time_limit: seconds; the best measurement so far is returned when
    the next round would overrun (at least one real evaluation is always made). state_path /
    resume: where the search state is written after each round, and whether to continue from it.
    """
    if ctx is None:
        raise UserError(f"{option('method', 'hirelc')} measures candidates: give {option('data')}")
    if evaluations < 1:
        raise UserError(f"hirelc needs at least one real evaluation, got evaluations={evaluations}")
    settings = settings or HiReLCSettings()
    if settings.batch_size < 1:
        raise UserError(f"hirelc's batch_size must be >= 1, got {settings.batch_size}")
    if settings.screen_rank not in SCREEN_RANKS:
        raise UserError(f"hirelc's screen_rank must be one of {', '.join(SCREEN_RANKS)}, got {settings.screen_rank!r}")
    goal: SpeedGoal | None = getattr(ctx, "speed_goal", None)
    if budget is None:
        budget = settings.default_budget if goal is None else speed_budget(bg, target, settings.default_budget)
        log.info("no budget given: searching for %gx", budget)
    check_reachable(bg, budget, target)
    start = time.perf_counter()
    state_path = Path(state_path) if state_path else None
    state = HiReLCState.load(state_path, bg, budget, target, seed, ctx) if resume else None
    if resume and state is None:
        log.warning("resume asked but no search state at %s: starting afresh", state_path)
    resumed_from = None if state is None else state.next_round
    if state is not None:  # the report counts the search's real evaluations, those made before the resume too
        ctx.evaluations += len(state.real)

    # --- sensitivity and the cold-start accuracy estimator ------------------------------------
    if state is None:
        state = _first_state(bg, ctx, budget, target, seed, settings, progress,
                             lambda seconds: _warn_if_slow(bg, seconds, evaluations, time_limit, settings))
    log.info("sensitivity from %s", state.sensitivity_source)
    estimator = ProxyEstimator.from_probes(WeightPerturbation(bg, ctx.range_fits), state.probes, ctx.fp32_val_score,
                                           state.prune_probes)
    accuracy = AccuracyModel(bg, estimator, state.kernel_sensitivity, MIN_KEEP,
                             min_points=settings.surrogate_min_points, prior_points=settings.surrogate_prior_points,
                             n_models=settings.surrogate_models, seed=seed, warmup_weight=settings.warmup_weight)
    problem = SearchProblem(bg, budget, target, accuracy, state.kernel_sensitivity, state.block_sensitivity,
                            ctx.fp32_val_score, base_weights=settings.reward, n_levels=settings.n_levels,
                            level_span=settings.level_span, sensitivity_shift=settings.sensitivity_shift,
                            max_shift=settings.max_shift)
    if resumed_from is None:
        initial = observe(ctx, problem.config(problem.current))
        state.proxies[config_key(initial.config)] = initial
        _warm_up(bg, ctx, state, estimator, budget, settings, progress,
                 None if time_limit is None else start + time_limit / 2)
    else:
        problem.current = dict(state.current.kernels)
        problem.block_levels = np.asarray(state.levels, dtype=np.int64)
        estimator.load_state(state.estimator)
        if ctx.finetune_lr is None:  # later fine-tunes start from the rate the first one settled on
            ctx.finetune_lr = state.finetune_lr

    # --- the ensembles: one for the block levels, one per block ----------------------------------
    ensemble = dict(size=settings.ensemble_size, kinds=settings.member_kinds, voting=settings.voting,
                    settings=settings.agent)
    high = Ensemble(lambda w: BudgetEnv(problem, w, settings.episode_steps), settings.reward,
                    seed=_agent_seed(seed), **ensemble)
    low = [Ensemble(lambda w, b=b: BlockEnv(problem, b, w, settings.episode_steps), settings.reward,
                    seed=_agent_seed(seed, b), **ensemble) for b in range(len(bg.blocks))]
    if resumed_from is not None and resumed_from < evaluations and any(
            h.get("adopted", {}).get("agents_idle") for h in state.history if h.get("kind") == "real"):
        log.warning("the search resumed from %s ended after round %d without training its agents (a last round "
                    "that measures the prior cannot use them): they start now, so this run will differ from an "
                    "uninterrupted one with %d evaluations", state_path, resumed_from, evaluations)
    if state.agents is not None:  # what they learnt in the rounds done
        try:
            load_ensembles(state.agents, [high, *low])
        except ValueError as exc:
            raise UserError(f"cannot resume from {state_path}: the saved agents do not fit this search's settings "
                            f"({exc}); delete it (or drop {option('resume')}) to start afresh") from None

    threshold = None if max_drop is None else ctx.fp32_val_score - max_drop / 100.0
    measured = {model_key(bg, p.config) for p in state.real}  # what is measured already, by the model it emits
    too_slow: set[str] = set()  # keys of candidates measured slower than --speedup asks
    speeds: dict[str, float] = {}  # key -> whole-model speedup under --speedup
    time_limited = False
    notify(progress, PHASE, state.next_round, evaluations)
    for rnd in range(state.next_round, evaluations):
        round_start = time.perf_counter()
        expected = np.mean(state.round_seconds) if state.round_seconds else ctx.finetune_seconds + 30.0
        if time_limit is not None and time.perf_counter() - start + expected > time_limit:
            time_limited = True
            if state.real:
                log.warning("time limit %gs: stopping after %d of %d rounds", time_limit, rnd, evaluations)
                break
        rng = np.random.default_rng([seed, rnd])
        adopted: dict[str, Any] = {}
        refined_from: dict[str, Any] | None = None  # the real point the agents refined this round (None: the prior)
        timing = {"rl": 0.0}
        if not time_limited:
            # 1. accuracy signal: recalibrate the proxy estimator, retrain the surrogate on real pairs
            accuracy.refit(list(state.proxies.values()), [(p.config, p.cost, p.score) for p in state.real],
                           _warmup_points(ctx, state) if settings.warmup_weight > 0 else [])
            if settings.refine_incumbent:
                incumbent, refined_from = _incumbent(bg, problem, accuracy, budget, state, threshold, goal, too_slow)
                problem.anchor(incumbent)
            problem.begin_round()
        # a last round that measures the prior (nothing measured yet, one pick) cannot use what the
        # agents learn or the proxy checks record: skipped (a one-evaluation run is the calibrated knapsack)
        agents_idle = rnd == evaluations - 1 and not measured and settings.batch_size == 1
        if agents_idle:
            adopted = {"agents_idle": True}  # a resume asking for more rounds says the agents start this round
        if not time_limited and not agents_idle:
            # the RL learners' random draws come from streams seeded by (seed, round): replayable on resume
            with seeded_streams([seed, rnd]):
                # 2. high level: budget levels per block, voted by the ensemble, shifted by sensitivity;
                #    adopted when they beat the current levels on the base-weights reward
                high.learn(settings.high_steps)
                kill_point("rl")  # kill-and-resume tests: die mid-round
                levels = high.rollout().levels
                adopted = {"levels": bool(problem.level_reward(levels) >= problem.level_reward(problem.block_levels))}
                if adopted["levels"]:
                    problem.set_levels(levels)
                # 3. low level: each block's ensemble refines its kernels under its level (adopted likewise)
                adopted["blocks"] = []
                for b, ens in enumerate(low):
                    ens.learn(settings.low_steps)
                    kernels = ens.rollout().kernels
                    before = {n: problem.current[n] for n in kernels}
                    if problem.block_reward(b, kernels) >= problem.block_reward(b, before):
                        problem.current.update(kernels)
                        adopted["blocks"].append(b)
        if not time_limited:
            timing["rl"] = time.perf_counter() - round_start
        voted = problem.config(problem.current)
        # 4. proxy check of the voted config and the best of the pool (cached by config hash)
        checks = [("voted", voted)] + [("pool", c) for c in problem.best_pool(settings.proxy_checks)]
        for role, config in ([] if time_limited or agents_idle else checks):
            _record_proxy(ctx, state, config, rnd, role)
        # 5. real evaluation: repair to the budget, choose by acquisition when already measured; with
        #    batch_size > 1 the next choices too, measured side by side (ctx.measure_batch: --workers, --ray)
        screen = None if time_limited or agents_idle else (
            lambda config, rnd=rnd: _screen(ctx, state, estimator, config, rnd))
        picks = _choose_batch(bg, problem, accuracy, voted, budget, state.kernel_sensitivity, measured, settings, rng,
                              goal, screen)
        predicted = []
        for _, candidate in picks:
            _record_proxy(ctx, state, candidate, rnd, "measured")
            predicted.append(accuracy.predict(candidate, ctx.cost(candidate)).accuracy)
        timing["proxy"] = time.perf_counter() - round_start - timing["rl"]
        for (source, candidate), guess, m in zip(picks, predicted, ctx.measure_batch([c for _, c in picks])):
            if m is None:  # its worker died every attempt: ctx.evaluation_log says why
                continue
            timing["measure"] = m.seconds
            point = RealPoint(rnd, m.config, config_key(candidate), m.score, m.cost, m.finetuned, m.seconds, source,
                              guess)
            speed = goal.timed(m.model) if goal is not None else None
            if speed is not None:
                speeds[point.key] = speed
            if speed is not None and not goal.accepts(speed):  # measured whole: not clearly faster than the goal, never returned
                too_slow.add(point.key)
                goal.observe(bg, m.config, speed)  # the estimate recalibrated: later picks prune more
            else:
                _keep_best(point, m, [p for p in state.real if p.key not in too_slow], threshold)
            state.real.append(point)
            measured.add(model_key(bg, candidate))
            moved = sum(candidate.get(n) != voted.get(n) for n in bg.kernels)  # kernels the repair / fit changed
            state.history.append(candidate_record(m, kind="real", method="hirelc", round=rnd, source=source,
                                                  predicted=guess, speedup=speed, changed_from_vote=moved, refined_from=refined_from,
                                                  levels=problem.block_levels.tolist(),
                                                  adopted=adopted, timing=dict(timing)))
            progress_log.info("hirelc round %d/%d: %s config %.2fx, predicted %.4f, measured %.4f (measure %.1fs)",
                              rnd + 1, evaluations, source, m.cost.ratio, guess, m.score, m.seconds)
        state.round_seconds.append(time.perf_counter() - round_start)
        state.next_round = rnd + 1
        log.info("round %d/%d: %.1fs (RL %.1fs, proxy %.1fs)", state.next_round, evaluations,
                 state.round_seconds[-1], timing["rl"], timing["proxy"])
        # 6. state: everything needed to continue with the next round
        state.current, state.levels = problem.config(problem.current), problem.block_levels.tolist()
        state.estimator, state.finetune_lr = estimator.state(), ctx.finetune_lr
        if state_path is not None:
            state.agents = save_ensembles([high, *low])
            state.save(state_path, accuracy.features)
        notify(progress, PHASE, state.next_round, evaluations)
        if time_limited:
            break

    if not state.real:
        raise UserError("every real evaluation failed (its worker died each attempt); see the log")
    fast_enough = [p for p in state.real if p.key not in too_slow]
    if fast_enough or not speeds:
        best = _best(fast_enough or state.real, threshold)
    else:  # none met --speedup: the fastest, rebuilt below (the report says the goal was missed, with its figure)
        best = max(state.real, key=lambda p: speeds.get(p.key, 0.0))
    if best.model is None:  # the best came from a resumed session whose saved model is gone
        best.model = ctx.measure(best.config).model
        ctx.evaluations -= 1  # the rebuild of a candidate measured before, not another evaluation
    extra = {
        "block_sensitivity": {b: float(s) for b, s in state.block_sensitivity.items()},
        "kernel_sensitivity": dict(state.kernel_sensitivity),
        "sensitivity_source": state.sensitivity_source,
        "kernel_sensitivity_share": dict(state.kernel_share),  # the report's scale: shares of the total
        "rounds": state.next_round,
        "resumed_from": resumed_from,
        "time_limited": time_limited,
        "budget": budget,
        "max_drop_met": None if threshold is None else best.score >= threshold - 1e-12,
        "best_round": best.round,
        "winner_source": best.source,
        "final_levels": problem.block_levels.tolist(),
        "level_table": [asdict(level) for level in problem.levels],
        "accuracy_signal": accuracy.source,
        "estimator": estimator.state(),
        "round_seconds": state.round_seconds,
        "settings": asdict(settings),
    }
    return MethodResult(best.config, best.model, best.score, state.history, extra)


# --- the first state: probes and sensitivity ---------------------------------------------------

def _first_state(bg: BlockGraph, ctx: SearchContext, budget: float, target: str, seed: int,
                 settings: HiReLCSettings, progress: ProgressFn | None = None,
                 first_probe: Callable[[float], None] | None = None) -> HiReLCState:
    """A fresh search's memory: one proxy probe per kernel, and the sensitivity they (or Fisher) give.
    first_probe: told the seconds the first probe took (what every later candidate will cost)."""
    configs = probe_configs(bg, target)
    steps = PhaseSteps(progress, "hirelc: sensitivity and proxy probes", len(configs) + 1)
    probes, prune_probes = measure_probes(ctx, bg, configs, steps.step, first_probe)
    kernel_sens, block_sens, source, share = _sensitivity(bg, ctx, probes, settings)
    steps.step()
    return HiReLCState(sorted(bg.kernels), budget, target, seed, _rng_record(seed, len(bg.blocks)), probes, prune_probes,
                       kernel_sens, block_sens, source, kernel_share=share)


SLOW_RUN_SECONDS = 300.0
"""A search whose rewrites and ORT passes alone are forecast to take longer than this is warned about."""


def _warn_if_slow(bg: BlockGraph, per_candidate: float, evaluations: int, time_limit: float | None,
                  settings: HiReLCSettings) -> None:
    """Say, once the probes have timed one candidate, when the rest of the search will take long and
    which options bound it (a big model: every candidate is a rewrite and an ORT session of every weight)."""
    candidates = len(bg.kernels) + settings.warmup_configs + evaluations * (settings.proxy_checks + 1 +
                                                                             settings.batch_size)
    forecast = per_candidate * candidates
    if time_limit is None and forecast > SLOW_RUN_SECONDS:
        log.warning("each candidate of this model takes about %.0fs to rewrite and score through ONNX Runtime "
                    "(%d kernels, %.0f MB of fp32 weights): the %d probes, %d warm-up scores and %d rounds will "
                    "take about %.0f min, their agents' training besides; %s bounds the run after the probes, "
                    "%s N makes fewer rounds, %s knapsack has no agents", per_candidate, len(bg.kernels),
                    bg.weight_bytes / 1e6, len(bg.kernels), settings.warmup_configs, evaluations, forecast / 60,
                    option("time_limit"), option("evaluations"), option("method"))


def _sensitivity(bg: BlockGraph, ctx: SearchContext, probes: list[ProxyObservation],
                 settings: HiReLCSettings) -> tuple[dict[str, float], dict[int, float], str, dict[str, float]]:
    """Per-kernel and per-block sensitivity in [0, 1]: Fisher when the bridge provides it, else the probes;
    and each kernel's share of the total (what the report shows, the scale of `inspect --sensitivity`).

    Fisher needs the bridge (torch, onnx2torch, a convertible graph); any failure falls back to
    the proxy probes, which work for every model the apply step can rewrite.
    """
    try:
        from hirelc_onnx.bridge.fisher import fisher_sensitivity

        samples = fisher_samples(bg, settings)
        fisher = fisher_sensitivity(bg, ctx.splits.finetune, n_samples=samples, seed=ctx.seed,
                                    kind=ctx.objective.kinds[0], use_labels=ctx.objective.label_output == 0)
        return (_normalise(fisher.per_kernel), _normalise(fisher.per_block),
                f"fisher ({min(samples, len(ctx.splits.finetune))} samples)", dict(fisher.per_kernel))
    except Exception as exc:  # noqa: BLE001 - any bridge failure means: use the probes
        log.info("Fisher sensitivity unavailable (%s: %s); using proxy probes", type(exc).__name__, exc)
    per_kernel = {next(iter(p.config.kernels)): p.logit_mse for p in probes}
    per_block = {b.id: sum(per_kernel[n] for n in b.kernels) for b in bg.blocks}
    total = sum(max(float(v), 0.0) for v in per_kernel.values())
    share = {k: (max(float(v), 0.0) / total if total > 0 else 1.0 / len(per_kernel)) for k, v in per_kernel.items()}
    return (_normalise(per_kernel), _normalise(per_block),
            f"proxy probe (logit-MSE of each kernel alone at {PROBE.bits} bits)", share)


FISHER_MACS = 16e9
"""Multiply-accumulates (per-sample MACs x samples) the Fisher pass may spend before `fisher_samples`
is cut: each sample is a forward and backward pass of its own."""
FISHER_MIN_SAMPLES = 64
"""The fewest samples a cut Fisher pass takes. EfficientNet-Lite0 on 200 photo crops: 64 samples rank
its 50 kernels as 200 do (Spearman 0.9996; blocks identical) in 19 s instead of 57 s."""


def fisher_samples(bg: BlockGraph, settings: HiReLCSettings) -> int:
    """`settings.fisher_samples`, cut for a model whose per-sample passes are dear (FISHER_MACS); the
    digits references (2.5 M MACs) keep them all."""
    affordable = int(FISHER_MACS // max(bg.total_macs, 1))
    return min(settings.fisher_samples, max(FISHER_MIN_SAMPLES, affordable))


def _normalise(values: dict) -> dict:
    """Log-scale min-max to [0, 1]: sensitivities span orders of magnitude; ranks and ratios matter."""
    if not values:
        return {}
    logs = {k: math.log(max(float(v), 0.0) + 1e-12) for k, v in values.items()}
    lo, hi = min(logs.values()), max(logs.values())
    return {k: 0.5 if hi - lo < 1e-12 else (v - lo) / (hi - lo) for k, v in logs.items()}


# --- proxy and real evaluations ------------------------------------------------------------------

def _record_proxy(ctx: SearchContext, state: HiReLCState, config: CompressionConfig, rnd: int, role: str) -> None:
    """Score a config with the real proxy once (cached by hash) and keep a history record of it."""
    key = config_key(config)
    if key in state.proxies:
        return
    obs = state.proxies[key] = observe(ctx, config)
    cost = ctx.cost(config)
    state.history.append({"kind": "proxy", "method": "hirelc", "round": rnd, "role": role,
                          "score": expected_score(ctx.fp32_val_score, obs.agreement), "agreement": obs.agreement,
                          "logit_mse": obs.logit_mse, "ratio": cost.ratio, "bytes": cost.total_bytes,
                          "macs_fraction": cost.macs_fraction, "meets_budget": cost.ratio >= state.budget - 1e-9})


def _warm_up(bg: BlockGraph, ctx: SearchContext, state: HiReLCState, estimator: ProxyEstimator, budget: float,
             settings: HiReLCSettings, progress: ProgressFn | None = None, deadline: float | None = None) -> None:
    """Score `warmup_configs` configs, repaired to the budget, with the real proxy (round -1): random ones,
    and first the `warmup_local` share as neighbours of the prior;
    fewer when `deadline` (perf_counter seconds: half of --time-limit) passes first."""
    rng = np.random.default_rng([state.seed, 17_017])
    steps = PhaseSteps(progress, "hirelc: warm-up proxy scores", settings.warmup_configs)
    local = round(settings.warmup_local * settings.warmup_configs)
    prior = repair(bg, CompressionConfig({}, target=state.target), budget, state.kernel_sensitivity,
                   damage=estimator.kernel_mse, fill=True) if local else None
    for i in range(settings.warmup_configs):
        if deadline is not None and time.perf_counter() > deadline:
            log.warning("time limit: the warm-up stops after %d of %d proxy scores (half the time is spent)", i,
                        settings.warmup_configs)
            break
        start = (neighbour_config(bg, prior, rng, settings.warmup_moves) if i < local
                 else random_config(bg, state.target, rng))
        config = repair(bg, start, budget, state.kernel_sensitivity, damage=estimator.kernel_mse, fill=False)
        _record_proxy(ctx, state, config, -1, "warmup")
        steps.step()


def _warmup_points(ctx: SearchContext, state: HiReLCState) -> list[tuple[CompressionConfig, Any, float]]:
    """Every proxy-scored config with its measured score (no fine-tuning): the surrogate's warm-up."""
    return [(o.config, ctx.cost(o.config), expected_score(ctx.fp32_val_score, o.agreement))
            for o in state.proxies.values()]


def _screen(ctx: SearchContext, state: HiReLCState, estimator: ProxyEstimator, config: CompressionConfig,
            rnd: int) -> float:
    """A candidate's accuracy as the estimator reads its measured damage: the real proxy's logit-MSE (scored
    once, recorded as a "screen" proxy record) through the calibrated agreement curve, in place of the
    additive estimate. Not the proxy batch's top-1 agreement: on a few dozen samples it barely moves (the
    recognizer at 10x: 0.875 and 0.881 for two configs whose measured logit-MSE, 0.43 and 0.40, and
    fine-tuned scores, 0.74 and 0.80, the logit-MSE ordered right)."""
    _record_proxy(ctx, state, config, rnd, "screen")
    return estimator.accuracy_at(state.proxies[config_key(config)].logit_mse)


def _choose(bg: BlockGraph, problem: SearchProblem, accuracy: AccuracyModel, voted: CompressionConfig,
            budget: float, sensitivity: dict[str, float], measured: set[str], settings: HiReLCSettings,
            rng: np.random.Generator, goal: SpeedGoal | None = None,
            screen: Callable[[CompressionConfig], float] | None = None) -> tuple[str, CompressionConfig]:
    """The config to measure. In the first round (nothing measured), the estimator's prior: fp32 fitted
    to the budget (the damage-per-byte knapsack alone), measured unscreened without `screen_first` or a
    `screen` (or with no `screen_candidates`); with them, it competes with what follows and is always
    screened. Then the voted config fitted to the budget, unless already measured;
    then the unmeasured fitted pool config with the best surrogate mean + kappa * spread; then, of
    RESTARTS fitted random starts, the unmeasured one predicted best ("restart"). "Unmeasured" is by
    the model a config emits (`model_key`). With `select_by_prediction`, the vote (as repaired, and
    filled) competes with the pool on that acquisition instead of going first; with `restarts`, the
    unmeasured fitted random starts compete there too, every round. With `screen` (a config's real
    proxy score), the first `screen_candidates` by acquisition are ranked again: by that score alone
    (`screen_rank` "measured"), or each prediction moved by the difference between its measured proxy
    score and the estimator's ("corrected")."""
    def fit(config: CompressionConfig, fill: bool = True) -> CompressionConfig:
        return _fit(bg, accuracy, config, budget, sensitivity, goal, fill)

    first = not measured
    prior = fit(CompressionConfig({}, target=problem.target)) if first else None
    if first and (screen is None or settings.screen_candidates <= 0 or not settings.screen_first):
        return "prior", prior
    repaired = fit(voted, settings.fill_votes)
    votes = [("vote" if config_key(repaired) == config_key(voted) else "vote-repaired", repaired)]
    if settings.select_by_prediction:  # the vote with its slack spent by the knapsack competes too
        votes.append(("vote-filled", fit(voted, True)))
    elif model_key(bg, repaired) not in measured:
        return votes[0]
    pool = [("pool", fit(config)) for config in problem.best_pool(settings.pool_size)]
    if settings.restarts:  # knapsack's other starting points compete with the agents' proposals
        pool += [("restart", config) for config in fresh_restarts(bg, problem.target, fit, measured, rng)[1]]
    ranked, seen = [], set()
    for source, candidate in ([("prior", prior)] if first else []) + (votes + pool if settings.select_by_prediction else pool):
        key = model_key(bg, candidate)
        if key in measured or key in seen:
            continue
        seen.add(key)
        est = accuracy.predict(candidate, problem.evaluate(candidate.kernels).cost)
        ranked.append((est.accuracy + settings.acquisition_kappa * est.std, est, source, candidate))
    ranked.sort(key=lambda r: -r[0])  # stable: ties keep the earlier (the vote before the pool)
    if screen is not None and settings.screen_candidates > 0 and ranked:
        # the front-runners ranked again by their measured proxy score ("measured"), or each prediction moved
        # by the estimator's measured error on it ("corrected": the proxy estimate and the surrogate, which
        # reads the estimate as a feature, inherit that error alike)
        def rescored(r: tuple) -> float:
            measured_score = screen(r[3])
            return measured_score if settings.screen_rank == "measured" else r[0] + measured_score - r[1].proxy_accuracy

        front = ranked[:settings.screen_candidates]
        if first and not any(r[2] == "prior" for r in front):  # the prior is always screened
            front += [r for r in ranked if r[2] == "prior"]
        ranked = sorted(((rescored(r), *r[1:]) for r in front), key=lambda r: -r[0])
    if ranked:
        return ranked[0][2], ranked[0][3]
    # every vote and pool config fits onto one measured already: of RESTARTS random starts fitted to the
    # budget, the unmeasured one predicted best (knapsack's rule), not one random config (on MiniLM
    # that was predicted 0.77 against the others' 0.99, and measured 0.86: a real evaluation lost)
    starts, fresh = fresh_restarts(bg, problem.target, fit, measured, rng)
    fresh = fresh or starts[:1]
    return "restart", max(fresh, key=lambda c: accuracy.predict(c, problem.evaluate(c.kernels).cost).accuracy)


def _choose_batch(bg: BlockGraph, problem: SearchProblem, accuracy: AccuracyModel, voted: CompressionConfig,
                  budget: float, sensitivity: dict[str, float], measured: set[str], settings: HiReLCSettings,
                  rng: np.random.Generator, goal: SpeedGoal | None = None,
                  screen: Callable[[CompressionConfig], float] | None = None) -> list[tuple[str, CompressionConfig]]:
    """`settings.batch_size` choices of `_choose`, each as if the ones before were measured already:
    the round's pick (the prior, then the voted config), then the next best by acquisition."""
    picks: list[tuple[str, CompressionConfig]] = []
    taken = set(measured)
    for _ in range(settings.batch_size):
        source, candidate = _choose(bg, problem, accuracy, voted, budget, sensitivity, taken, settings, rng, goal,
                                    screen)
        if picks and model_key(bg, candidate) in taken:
            break  # nothing new left to measure this round
        picks.append((source, candidate))
        taken.add(model_key(bg, candidate))
    return picks


def _incumbent(bg: BlockGraph, problem: SearchProblem, accuracy: AccuracyModel, budget: float, state: HiReLCState,
               threshold: float | None, goal: SpeedGoal | None,
               too_slow: set[str]) -> tuple[CompressionConfig, dict[str, Any] | None]:
    """What the agents refine this round: the best real measurement that may be returned (with its
    round and source), else the prior the first round measures (fp32 fitted to the budget by the
    calibrated estimator; None)."""
    returnable = [p for p in state.real if p.key not in too_slow]
    if returnable:
        best = _best(returnable, threshold)
        return best.config, {"round": best.round, "source": best.source}
    return _fit(bg, accuracy, problem.config({}), budget, state.kernel_sensitivity, goal), None


def _fit(bg: BlockGraph, accuracy: AccuracyModel, config: CompressionConfig, budget: float,
         sensitivity: dict[str, float], goal: SpeedGoal | None, fill: bool = True) -> CompressionConfig:
    """`config` fitted to the budget by the estimator's damage-per-byte knapsack (`budget.repair`; with
    `fill`, its slack spent too), then to --speedup when given: fp32 fitted so is HiReLC's prior."""
    fitted = repair(bg, config, budget, sensitivity, damage=accuracy.estimator.kernel_mse, fill=fill)
    return fitted if goal is None else speed_repair(bg, fitted, goal)  # --speedup: a constraint like the budget


def _keep_best(point: RealPoint, m: Measurement, real: list[RealPoint], threshold: float | None) -> None:
    """Hold the emitted model of the best measurement only (the state saves it beside itself)."""
    current = _best(real, threshold) if real else None
    if current is not None and _rank(current, threshold) >= _rank(point, threshold):
        return
    for p in real:
        p.model = None
    point.model = m.model


def _rank(p: RealPoint, threshold: float | None) -> tuple:
    """Within max_drop first, then score, then ratio (every measured config meets the budget)."""
    return (threshold is None or p.score >= threshold - 1e-12, p.score, p.cost.ratio)


def _best(real: list[RealPoint], threshold: float | None) -> RealPoint:
    return max(real, key=lambda p: _rank(p, threshold))


# --- settings and seeds --------------------------------------------------------------------------

def _agent_seed(seed: int, block: int | None = None) -> int:
    """Seed of an ensemble's first member (member i adds i): the high level's, or block `block`'s."""
    return seed * 100_000 + (0 if block is None else 100 * (block + 1))


def _rng_record(seed: int, blocks: int) -> dict[str, Any]:
    """How the loop seeds its random streams, as the state records it."""
    return {"seed": seed, "high_agents": _agent_seed(seed),
            "block_agents": [_agent_seed(seed, b) for b in range(blocks)],
            "member_offset": "+ member index", "round_stream": "numpy.random.default_rng([seed, round])",
            "learner_streams": "agents.seeded_streams([seed, round]) around each round's RL"}
