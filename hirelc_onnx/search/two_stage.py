"""Two-stage DRL compression (`--method two-stage`): an agent prunes, then another quantizes the pruned model.

For over-parameterised models (VGG-style) where the aim is the smallest file (Zhan, Lin & Cao,
arXiv 1912.02254). One loop, top to bottom:

Stage 1, pruning
  a. An agent walks the kernels (`two_stage_envs.PruneEnv`, SAC) and picks, per kernel, a channel
     keep ratio and an element-wise density. The choice is put onto the budgets
     (`two_stage_sizes`): keep ratios scaled down by one factor until the MACs are at most
     `flops_target`, densities scaled by one factor so the nonzero weights are `density` of the
     pruned kernels' weights (by default the uniform ablation's density at the size goal: the
     agents spread the nonzero weights the uniform choice keeps). The episode's reward is
     measured after the masks are applied, on the proxy batch, kernel by kernel: -log(1e-4 + the
     sum over kernels of the damage vs fp32 of that kernel alone pruned to its keep ratio with its
     largest-magnitude entries kept at its density). Each term is cached on a grid of eighths.
     Measured on the VGG digits reference, the whole model at 50% MACs or at 25% density without
     fine-tuning is already destroyed (damage 0.94 / 1.04, 1 = unrelated outputs): a joint score
     cannot tell choices apart, while one kernel compressed alone stays below that ceiling.
     The best episodes, the policy's own deterministic walk and the fallback (the same choice
     for every kernel, put onto the budgets) each get a short fine-tune with their masks held
     and are scored on validation; the best is kept. While no probe has recovered half the
     fp32 validation score, all of them train on (`probe_trust`): the CTC recognizer is still
     near 0 character accuracy after 2 epochs, where the ranking would be noise.
  b. Element-wise variational pruning learns per-weight hard-concrete masks at the chosen
     per-kernel densities (`bridge.sparsity.learn_masks`), then a fine-tune holds the zeros.
Stage 2, quantization
  A second agent walks the kernels (`two_stage_envs.QuantEnv`, SAC) and picks a bit width per
  kernel, within the size goal: as in AMC, each kernel's rung is clamped to the highest that
  leaves the goal reachable with the lowest rung for the kernels after it, so the walk cannot
  overshoot the budget and the last kernels take what is left. The rungs are coarse (2, 4, 8,
  32 bits), so a walk usually ends some bytes under the goal; the fill step (`fill_size`) gives
  them back, one rung at a time, to the kernel whose raise removes the most damage per byte (each
  kernel's damage alone at each rung on the proxy batch), so every candidate spends the goal's
  bytes, as the uniform choice does, rather than being compared at a higher ratio. (Before it,
  the agents landed at 10.2-11.3x against the uniform choice's 10.0x on the recognizer.) A walk
  still past the goal is repaired the other way, lowering the kernel that adds the least damage
  per byte saved. Reward: -log(damage + 1e-4) of the quantized stage-1 model on the proxy batch.
  The best episodes, the policy's walk and the fallback (one width for every kernel: the widest
  rung that meets the goal, then the same fill) are scored on validation without fine-tuning; the
  best is fine-tuned with the masks held and the weights fake-quantized exactly as stored, and
  emitted. (Measured on the CTC recognizer at 10x: the byte-greedy repair from full precision,
  the fallback before, put 2-bit kernels where the uniform width keeps 4 and lost 2.5 points to
  it after the final fine-tune; scoring each candidate after a one-epoch quantization-aware probe
  instead of untuned picked no better: 0.8751 against 0.8759 mean character accuracy, 3 seeds.)

`TwoStageSettings.choices = "uniform"` is the ablation: the same pipeline with one keep ratio
(the MACs target), one density and one bit width for every kernel, the density and width chosen
so the true bytes meet the same goal (`uniform_choice`), and the same fine-tuning epochs.

The report names where the emitted candidate came from (`extra["source"]`, per stage: "agent
(episode k)", "agent (policy)", "fallback (uniform)" or "uniform").
Sizes are true bytes of what is emitted (`two_stage_sizes.StageSizes`); the size goal is
`budget`, else `TwoStageSettings.default_ratio`. Sparse storage is used for the `storage` target
only; `ort-cpu` / `qdq` keep dense integer weights.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from hirelc_onnx.apply import apply_pruning, apply_quantization, clip_ranges
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.progress import ProgressFn, notify
from hirelc_onnx.search.baselines import MethodResult, keep_for_flops
from hirelc_onnx.search.budget import bits_ladder
from hirelc_onnx.search.context import Measurement, SearchContext
from hirelc_onnx.search.two_stage_envs import (PruneEnv, QuantEnv, WalkAgentSettings, ladder_index, policy_episode,
                                               rung_top, train_walk_agent)
from hirelc_onnx.search.two_stage_sizes import (StageSizes, emit_stage, fill_size, magnitude_masked, onto_flops,
                                                project_densities, repair_size, with_choices)
from hirelc_onnx.specs import weight_spec
from passes.storage import initializer_nbytes

__all__ = ["TwoStageSettings", "Candidate", "run_two_stage", "uniform_choice", "uniform_width"]

log = logging.getLogger(__name__)

PHASE_TWO_STAGE = "two-stage: pruning, then quantization episodes"

CHOICES = ("agent", "uniform")
_EPS = 1e-4  # damage floor in the reward's log
_GRID = 8  # stage 1's per-kernel damages are measured at keep ratios and densities in steps of 1 / _GRID


@dataclass(frozen=True)
class TwoStageSettings:
    """Knobs of the two-stage method; the defaults compress the VGG digits reference past 30x."""

    choices: str = "agent"
    """"agent": the SAC agents choose per kernel; "uniform": the ablation (one choice for all)."""
    min_keep: float = 0.25
    """Smallest keep ratio the stage-1 action maps to."""
    flops_target: float = 0.5
    """Stage 1 keeps at most this fraction of the model's MACs."""
    density: float | None = None
    """Stage 1's nonzero-weight budget: this fraction of the pruned kernels' weight entries is kept.
    None: the uniform ablation's density at the size goal (`uniform_choice`), so the agents spread
    the same nonzero weights the uniform choice keeps, and the same bytes, over the kernels."""
    min_density: float = 0.05
    """No kernel keeps less than this fraction of its entries."""
    episodes_per_evaluation: int = 25
    """Agent episodes per stage = this x `evaluations` (each a rewrite and a proxy run)."""
    real_candidates: int = 2
    """Best episodes per stage measured for real, beside the policy's walk and the fallback."""
    fill: bool = True
    """Stage 2 walks within the size goal (each kernel's rung clamped so the rest can still meet it)
    and gives the bytes left under it back, a rung at a time, where they cut the damage most
    (`fill_size`), so every agent candidate spends the goal's bytes as the uniform choice does.
    False: the agent's rungs as chosen, lowered by the byte-greedy repair until the goal holds."""
    fallback: bool = True
    """Measure the stage's fallback beside the agent's candidates (the report says which won)."""
    probe_epochs: int = 2
    """Epochs of the short fine-tune that scores a stage-1 candidate."""
    probe_trust: float = 0.5
    """While no candidate's probe reaches this fraction of the fp32 validation score, every probe
    trains on (epochs doubled, up to `probe_max_epochs`): below it the scores are noise."""
    probe_max_epochs: int = 8
    mask_epochs: int = 12
    """Epochs of variational mask training."""
    default_ratio: float = 30.0
    """Size goal in true bytes when no budget is given (the issue's acceptance figure for VGG)."""
    finetune_epochs: int = 15
    """Epochs of each fine-tune between and after the stages (the best validation epoch is kept)."""
    agent: WalkAgentSettings = field(default_factory=WalkAgentSettings)


@dataclass
class Candidate:
    """A stage's candidate: where it came from, its config, its densities (stage 1) and proxy reward."""

    source: str
    config: CompressionConfig
    densities: dict[str, float] = field(default_factory=dict)
    reward: float = -math.inf
    val_score: float = -math.inf


def run_two_stage(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
                  max_drop: float | None = None, time_limit: float | None = None, seed: int = 0,
                  evaluations: int = 8, progress: ProgressFn | None = None,
                  settings: TwoStageSettings | None = None) -> MethodResult:
    """Prune with an agent (channels and element-wise densities), then quantize with another.

    budget: the true-bytes ratio stage 2 must reach (None: `settings.default_ratio`). evaluations:
    each agent plays `settings.episodes_per_evaluation` x evaluations episodes. time_limit cuts
    the agents' training short (their episodes so far still count). max_drop is checked on
    validation and a miss logged; the report measures it on the held-out split.
    """
    # the torch bridge, imported when the method runs
    from hirelc_onnx.bridge.sparsity import MaskSettings, learn_masks

    if ctx is None:
        raise UserError(f"{option('method', 'two-stage')} fine-tunes and measures candidates: give {option('data')}")
    s = settings or TwoStageSettings()
    if s.choices not in CHOICES:
        raise UserError(f"two-stage choices must be one of {', '.join(CHOICES)}, got {s.choices!r}")
    start = time.perf_counter()
    goal = budget or s.default_ratio
    splits, teacher, kinds = ctx.splits, bg.model, ctx.objective.kinds
    names = [k.name for k in bg.kernel_list()]
    weights = {n: bg.kernels[n].weight for n in names}
    prunable = [n for n in names if bg.kernels[n].group is not None and bg.groups[bg.kernels[n].group].prunable]
    base = CompressionConfig({n: KernelConfig() for n in names}, target=target)
    episodes = max(1, s.episodes_per_evaluation * evaluations) if s.choices == "agent" else 0
    total_steps = 2 * episodes + 2
    history: list[dict] = []
    done_steps = [0]

    def tick() -> None:
        done_steps[0] += 1
        notify(progress, PHASE_TWO_STAGE, min(done_steps[0], total_steps), total_steps)

    def damage(model: onnx.ModelProto) -> float:
        return float(ctx.proxy_of(model).logit_mse)

    def finetune(model: onnx.ModelProto, epochs: int, **kw):
        return _masked_finetune(ctx, model, epochs, seed, **kw)

    # --- stage 1a: channel keep ratios and element-wise densities -----------------------------------
    if s.choices == "agent":
        budget_from = "settings"
        if s.density is None:
            uniform = uniform_choice(bg, ctx, s, names, prunable, weights, base, goal)[0]
            s = replace(s, density=uniform.densities[names[0]])
            budget_from = "uniform choice at the goal"
        stage1_choice, stage1_info = _agent_stage1(bg, ctx, s, names, prunable, weights, base, episodes, seed,
                                                   damage, finetune, history, tick, start, time_limit)
        uniform_bits = None
        stage1_info.update(density_budget=s.density, density_budget_from=budget_from)
    else:
        stage1_choice, uniform_bits, stage1_info = uniform_choice(bg, ctx, s, names, prunable, weights, base, goal)
        tick()
    pruned_config, densities = stage1_choice.config, stage1_choice.densities
    keep = {n: pruned_config.get(n).keep_ratio for n in prunable}
    log.info("two-stage stage 1 (%s): keep %s, densities %s", stage1_choice.source, keep, densities)

    # --- stage 1b: fine-tune, learn the element-wise masks at the chosen densities, fine-tune holding them
    tuned = finetune(apply_pruning(bg, pruned_config), s.finetune_epochs).model
    masks = learn_masks(tuned, list(weights.values()), splits.finetune, ctx.finetune_val(), teacher,
                        MaskSettings(layer_density={weights[n]: d for n, d in densities.items()},
                                     epochs=s.mask_epochs, seed=seed, time_budget_s=math.inf), kinds=kinds)
    stage1 = finetune(masks.model, s.finetune_epochs, sparse=list(weights.values()))
    ctx.evaluations += 1
    stage1_model, stage1_sparse = emit_stage(bg, stage1.model, pruned_config)
    stage1_report = _stage_report(bg, ctx, stage1_model, pruned_config, ctx.score_model(stage1_model, splits.val),
                                  stage1_sparse)
    stage1_report.update(density=stage1.density, source=stage1_choice.source, **stage1_info)
    history.append({"kind": "real", "stage": 1, "method": "two-stage", "score": stage1_report["val_score"],
                    "ratio": stage1_report["ratio"], "bytes": stage1_report["bytes"],
                    "macs_fraction": stage1_report["macs_fraction"], "finetuned": True,
                    "seconds": time.perf_counter() - start})
    tick()

    # --- stage 2: bit widths ------------------------------------------------------------------------
    sizes = StageSizes(bg, stage1.model, pruned_config, sparse=target == "storage")
    goal_bytes = bg.weight_bytes / goal
    if s.choices == "agent":
        stage2_choice, stage2_info = _agent_stage2(bg, ctx, s, names, stage1.model, pruned_config, sizes, goal_bytes,
                                                   episodes, seed, damage, history, tick, start, time_limit)
    else:
        uniform = with_choices(pruned_config, bits={n: uniform_bits for n in names})
        repaired = repair_size(sizes, uniform, goal_bytes)
        lowered = sorted(n for n in names if repaired.get(n).bits != uniform_bits)
        stage2_choice = Candidate("uniform" if not lowered else f"uniform (repaired: {len(lowered)} kernels lowered)",
                                  repaired)
        stage2_info = {"uniform_bits": uniform_bits, "repaired_kernels": lowered}
    final_config = stage2_choice.config

    # --- fine-tune with masks held and weights fake-quantized as stored; emit ----------------------
    specs = {k.weight: spec for n, k in bg.kernels.items() if (spec := weight_spec(k, final_config.get(n)))}
    # from the range-clipped weights, quantized as trained (apply.clip_ranges)
    qat = finetune(clip_ranges(bg, final_config, stage1.model), s.finetune_epochs, sparse=list(weights.values()),
                   quant=specs)
    ctx.evaluations += 1
    model, stage2_sparse = emit_stage(bg, qat.model, final_config,
                                      ctx.calib_batches if target in ("ort-cpu", "qdq") else None, clip=False)
    stage2_report = _stage_report(bg, ctx, model, final_config, ctx.score_model(model, splits.val), stage2_sparse)
    stage2_report.update(bits={n: final_config.get(n).bits for n in names}, predicted_bytes=sizes.total(final_config),
                         source=stage2_choice.source, **stage2_info)
    history.append({"kind": "real", "stage": 2, "method": "two-stage", "score": stage2_report["val_score"],
                    "ratio": stage2_report["ratio"], "bytes": stage2_report["bytes"],
                    "macs_fraction": stage2_report["macs_fraction"], "finetuned": True,
                    "seconds": time.perf_counter() - start})
    tick()
    goal_met = stage2_report["ratio"] >= goal - 1e-9
    if not goal_met:
        log.warning("two-stage: size goal %.1fx missed: reached %.2fx", goal, stage2_report["ratio"])
    drop = 100.0 * (ctx.fp32_val_score - stage2_report["val_score"])
    if max_drop is not None and drop > max_drop:
        log.warning("two-stage: validation drop %.2f points exceeds --max-drop %.2f", drop, max_drop)
    source = {"stage1": stage1_choice.source, "stage2": stage2_choice.source}
    extra = {"stages": {"stage1": stage1_report, "stage2": stage2_report}, "goal_ratio": goal,
             "goal_met": goal_met, "keep_ratios": keep, "densities": densities, "choices": s.choices,
             "source": source, "episodes": episodes, "seconds": time.perf_counter() - start}
    log.info("two-stage: emitted candidate from stage 1 %s, stage 2 %s", source["stage1"], source["stage2"])
    return MethodResult(final_config, model, stage2_report["val_score"], history, extra)


# --- stage 1 -------------------------------------------------------------------------------------------
def _stage1_projection(bg: BlockGraph, s: TwoStageSettings, names: list[str], prunable: list[str],
                       base: CompressionConfig, fractions: np.ndarray) -> tuple[CompressionConfig, dict[str, float]]:
    """(L, 2) fractions -> the config (keep ratios onto the MACs target) and densities onto the budget."""
    keep = {n: s.min_keep + float(fractions[i, 0]) * (1.0 - s.min_keep)
            for i, n in enumerate(names) if n in prunable}
    config = onto_flops(bg, with_choices(base, keep_ratio=keep), prunable, s.flops_target)
    params = {n: c.params for n, c in model_cost(bg, config).kernels.items()}
    wanted = {n: s.min_density + float(fractions[i, 1]) * (1.0 - s.min_density) for i, n in enumerate(names)}
    return config, project_densities(wanted, params, s.density, s.min_density)


def _agent_stage1(bg, ctx, s, names, prunable, weights, base, episodes, seed, damage, finetune, history, tick,
                  start, time_limit) -> tuple[Candidate, dict]:
    """Train the pruning agent on proxy episodes, then measure its best candidates and the fallback."""
    sens = _sensitivity(names, lambda n: damage(magnitude_masked(bg.model, {weights[n]: s.density})))
    fp32_params = {n: bg.kernels[n].params for n in names}
    total_params = sum(fp32_params.values())
    with_all = {n: 1.0 for n in prunable}

    def resources(t: int, done: np.ndarray) -> list[float]:
        keep = {n: s.min_keep + float(done[i, 0]) * (1.0 - s.min_keep)
                for i, n in enumerate(names[:t]) if n in prunable}
        rest = [n for n in prunable if n not in keep]
        whole = model_cost(bg, with_choices(base, keep_ratio={**with_all, **keep})).macs_fraction
        least = model_cost(bg, with_choices(base, keep_ratio={**keep, **{n: s.min_keep for n in rest}})).macs_fraction
        spent = sum((s.min_density + float(done[i, 1]) * (1 - s.min_density)) * fp32_params[n]
                    for i, n in enumerate(names[:t])) / (s.density * total_params)
        walked = sum(fp32_params[n] for n in names[:t]) / total_params
        return [whole - s.flops_target, least - s.flops_target, spent - walked]

    cache: dict[tuple[str, int, int], float] = {}

    def alone(name: str, keep: float, density: float) -> float:
        """Damage of kernel `name` alone at (keep, density), masks applied; cached on the grid."""
        k = int(round(keep * _GRID)) if name in prunable else _GRID
        d = max(1, int(round(density * _GRID)))
        if (name, k, d) not in cache:
            model = apply_pruning(bg, with_choices(base, keep_ratio={name: k / _GRID})) if k < _GRID else bg.model
            cache[(name, k, d)] = damage(magnitude_masked(model, {weights[name]: d / _GRID}))
        return cache[(name, k, d)]

    def judge(fractions: np.ndarray) -> tuple[float, dict]:
        if time_limit and time.perf_counter() - start > time_limit:
            return -math.log(1.0 + _EPS), {"skipped": True}  # past the time limit: no more rewrites
        t0 = time.perf_counter()
        config, densities = _stage1_projection(bg, s, names, prunable, base, fractions)
        d = sum(alone(n, config.get(n).keep_ratio, densities[n]) for n in names)
        reward = -math.log(d + _EPS)
        history.append({"kind": "proxy", "stage": 1, "step": len(env.episodes), "method": "two-stage",
                        "damage_sum": d, "macs_fraction": model_cost(bg, config).macs_fraction, "reward": reward,
                        "finetuned": False, "seconds": time.perf_counter() - t0})
        tick()
        return reward, {"config": config, "densities": densities}

    env = PruneEnv(bg, names, sens, judge, resources)
    agent = train_walk_agent(env, episodes, seed, 1, s.agent)
    candidates = _best_episodes(env, s.real_candidates)
    policy = policy_episode(agent, env, s.agent.threads)
    candidates.append(Candidate("agent (policy)", policy.info["config"], policy.info["densities"], policy.reward))
    if s.fallback:
        config, densities = _stage1_projection(bg, s, names, prunable, base, np.ones((len(names), 2)))
        candidates.append(Candidate("fallback (uniform)", config, densities))
    # the candidates' probes are one batch on the run's executor (in-process, local workers or Ray)
    probe_models: dict[str, onnx.ModelProto] = {}

    def probe(jobs: list[_Probe], epochs: int) -> None:
        for c, m in _measured(candidates, ctx.measure_jobs(jobs)):
            c.val_score, probe_models[c.source] = m.score, m.model
            ctx.evaluations += 1
            history.append({"kind": "probe", "stage": 1, "method": "two-stage", "source": c.source,
                            "score": c.val_score, "reward": c.reward,
                            "macs_fraction": model_cost(bg, c.config).macs_fraction, "epochs": epochs,
                            "finetuned": True, "seconds": m.seconds})

    probe([_Probe(c.config, c.densities, s.probe_epochs, seed) for c in candidates], s.probe_epochs)
    # a probe that has not brought any candidate back near fp32 tells them apart by noise (the CTC
    # recognizer is still near 0 character accuracy after 2 epochs): train every candidate on, doubling
    probe_epochs = s.probe_epochs
    while (max(c.val_score for c in candidates) < s.probe_trust * ctx.fp32_val_score
           and probe_epochs < s.probe_max_epochs):
        more = min(probe_epochs, s.probe_max_epochs - probe_epochs)
        candidates = [c for c in candidates if c.source in probe_models]
        probe([_Probe(c.config, c.densities, more, seed, start=probe_models[c.source]) for c in candidates], more)
        probe_epochs += more
    best = max(candidates, key=lambda c: (c.val_score, c.reward))
    return best, {"sensitivity": sens, "candidates": _summary(candidates), "probe_epochs": probe_epochs,
                  "reward_curve": _curve([e.reward for e in env.episodes if not e.info.get("skipped")])}


# --- stage 2 -------------------------------------------------------------------------------------------
def _agent_stage2(bg, ctx, s, names, stage1_model, pruned_config, sizes, goal_bytes, episodes, seed, damage,
                  history, tick, start, time_limit) -> tuple[Candidate, dict]:
    """Train the quantization agent on proxy episodes, then score its best candidates and the fallback."""
    ladder = sorted(bits_ladder(pruned_config.target))
    lowest = min(ladder)

    def bits_of(fractions: np.ndarray) -> dict[str, int]:
        return {n: ladder[ladder_index(float(f[0]), len(ladder))] for n, f in zip(names, fractions)}

    unquantized = damage(stage1_model)
    alone_cache: dict[tuple[str, int], float] = {}

    def cost(name: str, bits: int) -> float:
        """Proxy damage of the stage-1 model with kernel `name` alone at `bits` (cached)."""
        if bits >= 32:
            return unquantized
        if (name, bits) not in alone_cache:
            alone_cache[(name, bits)] = damage(apply_quantization(bg, stage1_model,
                                                                  with_choices(pruned_config, bits={name: bits})))
        return alone_cache[(name, bits)]

    sens = _sensitivity(names, lambda n: cost(n, lowest))

    def resources(t: int, done: np.ndarray) -> list[float]:
        chosen = bits_of(done) if t else {}
        low = sizes.total(with_choices(pruned_config, bits={**{n: lowest for n in names}, **chosen}))
        high = sizes.total(with_choices(pruned_config, bits={**{n: 32 for n in names}, **chosen}))
        return [math.log(low / goal_bytes), math.log(high / goal_bytes)]

    def bound(t: int, done: np.ndarray) -> list[float]:
        """AMC's clamp: the highest rung for kernel t that leaves the goal reachable at the lowest rung after it."""
        rest = {**{n: lowest for n in names}, **(bits_of(done) if t else {})}
        for r in range(len(ladder) - 1, 0, -1):
            if sizes.total(with_choices(pruned_config, bits={**rest, names[t]: ladder[r]})) <= goal_bytes:
                return [rung_top(r, len(ladder))]
        return [rung_top(0, len(ladder))]

    cache: dict[tuple[int, ...], float] = {}

    def judge(fractions: np.ndarray) -> tuple[float, dict]:
        if time_limit and time.perf_counter() - start > time_limit:
            return -math.log(1.0 + _EPS), {"skipped": True}
        t0 = time.perf_counter()
        walked = repair_size(sizes, with_choices(pruned_config, bits=bits_of(fractions)), goal_bytes,
                             cost if s.fill else None)
        config = fill_size(sizes, walked, goal_bytes, cost) if s.fill else walked
        key = tuple(config.get(n).bits for n in names)
        if key not in cache:
            cache[key] = damage(apply_quantization(bg, stage1_model, config))
        d = cache[key]
        reward = -math.log(d + _EPS)
        filled = sorted(n for n in names if config.get(n).bits != walked.get(n).bits)
        history.append({"kind": "proxy", "stage": 2, "step": len(env.episodes), "method": "two-stage",
                        "logit_mse": d, "ratio": bg.weight_bytes / sizes.total(config), "reward": reward,
                        "bits": {n: config.get(n).bits for n in names}, "filled": filled, "finetuned": False,
                        "seconds": time.perf_counter() - t0})
        tick()
        return reward, {"config": config, "filled": filled}

    env = QuantEnv(bg, names, sens, judge, resources, bound if s.fill else None)
    agent = train_walk_agent(env, episodes, seed, 2, s.agent)
    candidates = _best_episodes(env, s.real_candidates)
    policy = policy_episode(agent, env, s.agent.threads)
    candidates.append(Candidate("agent (policy)", policy.info["config"], reward=policy.reward))
    if s.fallback:  # one width for every kernel, its slack given back as the agents' walks are
        fallback = uniform_width(sizes, pruned_config, goal_bytes)
        candidates.append(Candidate("fallback (uniform)",
                                    fill_size(sizes, fallback, goal_bytes, cost) if s.fill else fallback))
    for c, m in _measured(candidates, ctx.measure_jobs([_QuantScore(stage1_model, c.config) for c in candidates])):
        c.val_score = m.score
        history.append({"kind": "real", "stage": 2, "method": "two-stage", "source": c.source, "score": c.val_score,
                        "reward": c.reward, "ratio": bg.weight_bytes / sizes.total(c.config), "finetuned": False})
    best = max(candidates, key=lambda c: (c.val_score, c.reward))
    return best, {"sensitivity": sens, "candidates": _summary(candidates),
                  "reward_curve": _curve([e.reward for e in env.episodes if not e.info.get("skipped")])}


def uniform_width(sizes: StageSizes, config: CompressionConfig, goal_bytes: float) -> CompressionConfig:
    """Stage 2's fallback: the widest rung of the ladder that, given to every kernel, meets the size
    goal (the lowest rung everywhere when none does)."""
    ladder = sorted(bits_ladder(config.target), reverse=True)
    for bits in ladder:
        uniform = with_choices(config, bits={n: bits for n in sizes.table})
        if sizes.total(uniform) <= goal_bytes:
            break
    return uniform


# --- the uniform ablation ------------------------------------------------------------------------------
def uniform_choice(bg: BlockGraph, ctx: SearchContext, s: TwoStageSettings, names: list[str], prunable: list[str],
                   weights: dict[str, str], base: CompressionConfig, goal: float) -> tuple[Candidate, int, dict]:
    """One keep ratio (the MACs target), one density and one bit width for every kernel, at the goal.

    For each rung of the target's ladder below 32 bits, the largest uniform density whose exact
    bytes (magnitude masks at that density, the rung everywhere, sparse storage) meet the goal;
    of the rungs that land on the goal (at a density in [min_density, 1): a rung past the goal
    even dense would not be the same size), the one with the least summed damage of compressing
    each kernel alone (the agents' stage-1 measure). Returns (stage-1 candidate, the rung, what
    was tried).
    """
    keep = keep_for_flops(bg, s.flops_target, base.target)
    config = with_choices(base, keep_ratio={n: keep for n in prunable})
    pruned = apply_pruning(bg, config)
    goal_bytes = bg.weight_bytes / goal
    sparse = base.target == "storage"

    def total(density: float, bits: int) -> int:
        masked = magnitude_masked(pruned, {weights[n]: density for n in names})
        return StageSizes(bg, masked, config, sparse, ladder=(bits,)).total(
            with_choices(config, bits={n: bits for n in names}))

    def damage_sum(density: float, bits: int) -> float:
        """Sum over kernels of the proxy damage of compressing each alone (the agents' stage-1 measure)."""
        total_damage = 0.0
        for n in names:
            alone = with_choices(base, keep_ratio={n: keep} if n in prunable else {}, bits={n: bits})
            model = magnitude_masked(apply_pruning(bg, alone), {weights[n]: density})
            total_damage += float(ctx.proxy_of(apply_quantization(bg, model, alone)).logit_mse)
        return total_damage

    tried = {}
    for bits in sorted(b for b in bits_ladder(base.target) if b < 32):
        if total(s.min_density, bits) > goal_bytes or total(1.0, bits) <= goal_bytes:
            tried[bits] = None  # out of reach, or past the goal even at full density (not the same size)
            continue
        lo, hi = s.min_density, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid, bits) <= goal_bytes else (lo, mid)
        tried[bits] = {"density": lo, "damage_sum": damage_sum(lo, bits)}
    reachable = {b: t for b, t in tried.items() if t is not None}
    if not reachable:
        raise UserError(f"two-stage uniform choices cannot meet {goal:g}x at a density in [{s.min_density:g}, 1)")
    bits = min(reachable, key=lambda b: reachable[b]["damage_sum"])
    density = reachable[bits]["density"]
    candidate = Candidate("uniform", config, {n: density for n in names})
    return candidate, bits, {"uniform_keep": keep, "uniform_density": density, "uniform_bits": bits,
                             "uniform_tried": {str(b): t for b, t in tried.items()}}


# --- shared pieces -------------------------------------------------------------------------------------
def _masked_finetune(ctx: SearchContext, model: onnx.ModelProto, epochs: int, seed: int, **kw):
    """The bridge's distillation fine-tune holding masks (and fake quantization) on `ctx`'s data."""
    from hirelc_onnx.bridge.convert import BridgeError
    from hirelc_onnx.bridge.sparsity import masked_finetune

    try:
        # epochs, not the bridge's default wall clock, end every fine-tune: the ablation's arms get the
        # same fine-tuning however loaded the machine is
        kw.setdefault("time_budget_s", math.inf)
        return masked_finetune(model, ctx.splits.finetune, ctx.finetune_val(), ctx.bg.model, epochs=epochs, seed=seed,
                               kinds=ctx.objective.kinds, **kw)
    except BridgeError as exc:
        raise UserError(f"{option('method', 'two-stage')} needs the torch bridge for fine-tuning and masks: {exc}") from exc


@dataclass(frozen=True)
class _Probe:
    """Stage 1's real evaluation of a candidate, wherever the executor runs it (SearchContext.measure_jobs):
    prune, keep each kernel's largest entries at its density, a short fine-tune holding those zeros,
    the validation score."""

    config: CompressionConfig
    densities: dict[str, float]
    epochs: int
    seed: int
    start: onnx.ModelProto | None = None  # a probe to train on (its zeros held), instead of pruning afresh

    def __call__(self, ctx: SearchContext) -> Measurement:
        t0 = time.perf_counter()
        weights = {n: k.weight for n, k in ctx.bg.kernels.items()}
        masked = self.start if self.start is not None else magnitude_masked(
            apply_pruning(ctx.bg, self.config), {weights[n]: v for n, v in self.densities.items()})
        probe = _masked_finetune(ctx, masked, self.epochs, self.seed, sparse=[k.weight for k in ctx.bg.kernel_list()])
        return Measurement(self.config, ctx.score_model(probe.model, ctx.splits.val), ctx.cost(self.config),
                           probe.model, True, time.perf_counter() - t0)


@dataclass(frozen=True)
class _QuantScore:
    """Stage 2's real evaluation of a candidate: the stage-1 model quantized to its bit widths, scored
    on validation (no fine-tuning)."""

    stage1_model: onnx.ModelProto
    config: CompressionConfig

    def __call__(self, ctx: SearchContext) -> Measurement:
        t0 = time.perf_counter()
        model = apply_quantization(ctx.bg, self.stage1_model, self.config)
        return Measurement(self.config, ctx.score_model(model, ctx.splits.val), ctx.cost(self.config), model, False,
                           time.perf_counter() - t0)


def _measured(candidates: list[Candidate], results: list) -> list[tuple[Candidate, Measurement]]:
    """The candidates whose evaluation came back (a worker that died every attempt leaves its
    candidate unscored, never chosen); none back is an error."""
    pairs = [(c, m) for c, m in zip(candidates, results) if m is not None]
    if not pairs:
        raise UserError("two-stage: every candidate's evaluation failed (its worker died); see the log")
    return pairs


def _sensitivity(names: list[str], damage_of: Callable[[str], float]) -> dict[str, float]:
    """Per kernel, the proxy damage of compressing it alone (the stage's own way), over their sum."""
    raw = {n: max(damage_of(n), 0.0) for n in names}
    total = sum(raw.values()) or 1.0
    return {n: v / total for n, v in raw.items()}


def _best_episodes(env, n: int) -> list[Candidate]:
    """The `n` best-rewarded episodes (earliest first among equals) as candidates."""
    ranked = sorted((i for i, e in enumerate(env.episodes) if not e.info.get("skipped")),
                    key=lambda i: (-env.episodes[i].reward, i))[:n]
    return [Candidate(f"agent (episode {i})", env.episodes[i].info["config"], env.episodes[i].info.get("densities", {}),
                      env.episodes[i].reward) for i in ranked]


def _summary(candidates: list[Candidate]) -> list[dict]:
    return [{"source": c.source, "reward": None if math.isinf(c.reward) else c.reward, "val_score": c.val_score}
            for c in candidates]


def _curve(rewards: list[float], points: int = 10) -> list[float]:
    """Mean reward over `points` equal slices of the episodes (the learning curve in the report)."""
    if not rewards:
        return []
    return [float(np.mean(part)) for part in np.array_split(np.asarray(rewards), min(points, len(rewards)))]


def _stage_report(bg: BlockGraph, ctx: SearchContext, model: onnx.ModelProto, config: CompressionConfig,
                  val: float, sparse: dict[str, str]) -> dict:
    """Size and accuracy of one stage's emitted model (true bytes; test split for the report only)."""
    nbytes = initializer_nbytes(model)
    return {"ratio": bg.weight_bytes / max(nbytes, 1), "bytes": nbytes, "val_score": val,
            "test_score": ctx.test_score(model), "macs_fraction": model_cost(bg, config).macs_fraction,
            "sparse_storage": sparse}
