"""`--method graph-rl`: structured pruning by a graph-attention policy with per-channel keep actions.

The MDP. An episode visits the prunable channel groups in topological order; at each step the
policy (`gat.ChannelPolicy`) reads the graph observation -- layers and channel groups, data-flow
and coupling edges, the keep state so far -- and samples a keep/prune bit for every channel of the
current group. When every group is decided the environment makes the choice feasible and scores it.

The start (`--prior`). With "l1-fisher", each channel's keep logit starts at prior_scale * (its
importance rank in its group - (1 - u)), u the uniform keep ratio meeting the target, so the
untrained policy's greedy episode keeps every group's most important channels (a uniform cut,
data-aware) and sampling explores around the cut. Importance (`channel_importance.channel_rankings`,
where the module says why) is the sum of the channel's rank by L1 magnitude and its rank by group
Fisher; L1 alone when the model cannot go through the torch bridge. With "none", every channel
starts at the logit of u (the policy knows the channels only through its observation) and no
ranked cut is scored or measured: what is emitted comes from the policy alone.

The training. Every episode is scored by the cheap masked proxy, so the policy takes hundreds of
updates (`episodes` / `batch`); the episodes are scored on the first `proxy_rows` rows of the proxy
batch (4x cheaper than all of it), the free per-channel biases learn at `bias_lr`, larger than the
network's `lr`, so the logits can travel several units from wherever they started. The result
records the learning curve (the batch's mean proxy score per update, and the best so far) and how
far training moved the policy (`policy_shift`: along its greedy episode, the mean Bernoulli KL from
the starting policy and the share of channels whose decision flipped).

The constraint (constrained MDP). The resource target is one or more usage limits, each a fraction
of the original model measured by the cost model on the emitted model (`pruning_space`): MACs
(`flops=0.5`), kernel weight elements (`params=0.5`), stored bytes with every kernel at `bits`
(`budget=6`: bytes <= 1/6). Two mechanisms, both documented where they act:
  * Lagrangian relaxation: the reward pays lambda_j * relative violation of limit j by the action
    the policy SAMPLED; after every policy update each multiplier takes a dual ascent step,
    lambda_j <- max(0, lambda_j + dual_lr * mean relative (usage_j - limit_j)), so the policy
    learns to sample feasible actions itself;
  * feasibility projection (`PruningSpace.project`): the environment moves the sample onto the
    constraint boundary in the policy's own order -- dropping its least probable kept channels
    while a limit is exceeded, adding back its most probable dropped ones while every limit still
    holds -- checked on the exact cost model. Only projected, feasible episodes are scored, kept
    as candidates, measured or returned.

The reward (self-competition). The proxy score is -(logit MSE vs fp32)/(fp32 logit variance) of
the pruned model with its per-channel statistics re-estimated (`masked_proxy.MaskedProxy`: why,
and why not the raw pruned model alone), minus `raw_weight` times that of the raw pruned model:
fine-tuning starts from the raw one, and the recalibrated damage alone cannot tell a strong
channel from a weak one whose loss re-standardisation hides (`GraphRLSettings.raw_weight`). The reward is score - (best feasible score before this update)
- Lagrangian penalty: the agent competes with its own record, which starts at the best starting
cut (below).
REINFORCE, with an exponential-moving-average baseline of past rewards (after a new record the
baseline lags the raised bar, so mediocre episodes get negative advantages), advantages scaled by
the batch's reward spread, and a small entropy bonus.

The result. Within `evaluations`, distinct episodes are measured for real -- pruned with their
exact channel sets, fine-tuned (the context's budget, the same for every candidate), quantized to
`bits`, scored on the validation split through ORT -- in this order: the trained policy's greedy
episode (keep where p > 0.5, projected), then the best by proxy score (the best `rescore` episodes
re-scored on the whole proxy batch, the prior's ranked cuts among them: one is measured when the
proxy ranks it there). No ranked cut is measured unconditionally (`GraphRLSettings.measure_start`):
on ResNet-20 the uniform ranked cut lost on every seed, and with 4 evaluations each forced one is a
policy candidate fewer. Each real evaluation records its source ("ranking-l1-fisher",
"ranking-fisher", "ranking-l1" or "policy"), and the result the emitted candidate's
(`extra["source"]`, the report's "source"). The pick is made on the validation rows plus the
calibration rows the proxy never read (`selection.Selection`: why not validation alone, and why not
the proxy's rows): the highest score wins, except that scores within one standard error of the
best (an accuracy's binomial one, at least one row) count as tied, and among tied candidates the
lower loss (cross-entropy, or KL to fp32 without labels) wins. The returned score is the pick's
validation score. All are feasible; the check is repeated
on the measurement.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hirelc_onnx.bridge.convert import torch_threads
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.evaluate.objective import expected_score
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.progress import ProgressFn, notify, progress_log
from hirelc_onnx.search.baselines import MethodResult, candidate_record
from hirelc_onnx.search.budget import bits_ladder
from hirelc_onnx.search.channel_importance import channel_rankings, kernel_fisher, scaled_ranks
from hirelc_onnx.search.context import Measurement, SearchContext
from hirelc_onnx.search.gat import ChannelPolicy, GraphObservation, build_observation
from hirelc_onnx.search.masked_proxy import proxy_scorer
from hirelc_onnx.search.pruning_space import PruningSpace, resource_constraints
from hirelc_onnx.search.selection import Selection
from hirelc_onnx.specs import weight_target

__all__ = ["GraphRLSettings", "PRIORS", "SOURCES", "run_graph_rl"]

log = logging.getLogger(__name__)

PHASE_GRAPH_RL = "graph-rl: policy updates, then real evaluations"


@dataclass(frozen=True)
class GraphRLSettings:
    """Knobs of the graph-RL search (defaults sized for the digits references on 2 CPU cores)."""

    episodes: int = 1024
    """Proxy-scored episodes in the RL phase (rounded down to whole updates). 128 updates: on VGG
    without a prior the batch's mean proxy score was still rising after 64 (from -0.15 to -0.06..-0.09
    over them, 3 seeds, while the best episode sat at -0.05), so the policy was stopped before
    its own samples reached the level of its best; 64 updates took 18-26 s of RL on one core."""
    batch: int = 8
    """Episodes per policy update."""
    lr: float = 3e-3
    """Adam learning rate of the policy."""
    entropy: float = 1e-3
    """Weight of the mean per-channel Bernoulli entropy bonus."""
    baseline_decay: float = 0.8
    """EMA decay of the reward baseline (past updates' mean reward)."""
    dual_lr: float = 0.2
    """Dual ascent step of the Lagrange multipliers (per unit of relative violation)."""
    min_keep: float = 0.125
    """No group keeps fewer than this fraction of its channels (and at least one unit)."""
    channel_multiple: int | None = None
    """Kept channel counts are multiples of this (groups whose width is not: any count;
    `specs.channel_unit`); None: the run's (--channel-multiple, `BlockGraph.channel_multiple`)."""
    bits: int | None = None
    """Weight bits of every kernel in the emitted model; None: the target's top quantized rung
    (`budget.bits_ladder`: 8, or 7 under ort-cpu, as the l1-int8 baseline); 32 prunes only."""
    hidden: int = 64
    """GAT embedding size."""
    heads: int = 4
    """GAT attention heads."""
    layers: int = 2
    """GAT layers."""
    fisher_samples: int = 64
    """Samples for the per-kernel Fisher node feature (0: skip, the feature is zero)."""
    search_share: float = 0.5
    """With a time limit: the share of it the RL phase may use (the rest measures candidates)."""
    importance_samples: int = 512
    """Fine-tune rows for the per-channel group Fisher importance that ranks channels at the start
    (0, or no torch bridge: L1 magnitude ranks them)."""
    prior_scale: float = 2.0
    """Starting keep logit of a channel: prior_scale * (importance rank in its group in [0, 1] -
    (1 - uniform keep)); the starting greedy episode keeps each group's most important channels.
    At 6 (keep probabilities 0.05-0.95 at half keep) the policy stayed on its start on some seeds
    (ResNet-20 seed 2: mean KL 0.034 from it after 128 updates, candidates 0.91-0.96 on validation);
    at 2 (0.27-0.73) it moved on every seed (KL 0.11-1.0; bench/ABLATION_GRAPH_RL.md)."""
    measure_start: bool = False
    """With the prior: measure the ranked starting cut whatever the proxy thinks of it (True), or only
    where the proxy ranks it among the best (False). On ResNet-20 at 50% MACs the uniform ranked cut
    scored 0.76-0.85 on validation on every seed: a forced evaluation spent on a known loser."""
    proxy_rows: int = 64
    """Rows of the context's proxy batch that score the RL phase's episodes (0: all); the best
    `rescore` distinct episodes are scored again on the whole batch for the final ranking."""
    rescore: int = 24
    """Episodes re-scored on the whole proxy batch before the real evaluations."""
    bias_lr: float = 0.05
    """Adam learning rate of the free per-channel keep biases (the GAT and head use `lr`): large
    enough that a few hundred noisy updates can move a channel's logit by several units."""
    raw_weight: float = 1.0
    """Weight of the pruned model's damage WITHOUT re-estimated channel statistics in the proxy score
    (`masked_proxy.MaskedProxy`: the recalibrated damage alone is blind to what fine-tuning starts
    from). On VGG, 3 epochs, seed 1, without a prior: the 4 measured candidates' test cross-entropy
    0.063-0.073 with the recalibrated damage alone, 0.060-0.064 at 0.25, 0.056-0.059 at 1.0 (uniform
    L1: 0.059); each episode costs a second forward pass."""
    prior: str = "l1-fisher"
    """"l1-fisher": start from the importance ranking and measure its cut (above); "none": every
    channel starts at the uniform keep logit and only the policy's episodes are measured.
    Against uniform L1 at 50% MACs, 3 epochs (mean of 3 seeds, bench/ABLATION_GRAPH_RL.md): ResNet-20
    with the prior +17.9 points, none +17.7; the CTC recognizer +32.4 and +24.3 points of character
    accuracy; VGG -0.45 and +0.15 (-2.7 and +0.7 test images: there the prior's region fine-tunes worse)."""


def _rollout(policy: ChannelPolicy, obs: GraphObservation, batch: int, greedy: bool = False):
    """Decide every prunable group of `batch` episodes: masks and probabilities per group, summed
    log-probabilities (batch,) and mean entropies (batch,) for the gradient."""
    kept = obs.lengths[None, :].repeat(batch, axis=0)
    decided = np.zeros_like(kept, dtype=bool)
    masks, probs, logp, entropy = [], [], 0.0, 0.0
    for step in range(len(obs.groups)):
        states = torch.from_numpy(obs.states(kept, decided, step))
        logits = policy(states, step)
        dist = torch.distributions.Bernoulli(logits=logits)
        action = (logits > 0).float() if greedy else dist.sample()
        logp = logp + dist.log_prob(action).sum(dim=-1)
        entropy = entropy + dist.entropy().mean(dim=-1) / len(obs.groups)
        masks.append(action.numpy().astype(bool))
        probs.append(dist.probs.detach().numpy())
        kept[:, step] = np.maximum(masks[-1].sum(axis=1), 1)
        decided[:, step] = True
    per_episode = [[m[i] for m in masks] for i in range(batch)], [[p[i] for p in probs] for i in range(batch)]
    return per_episode, logp, entropy


def _distinct(candidates: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """The candidates in their order, each set of masks once."""
    out, seen = [], set()
    for masks in candidates:
        if _key(masks) not in seen:
            seen.add(_key(masks))
            out.append(masks)
    return out


def _key(masks: list[np.ndarray]) -> bytes:
    return np.packbits(np.concatenate(masks)).tobytes()


PRIORS = ("l1-fisher", "none")
"""--prior: where the policy starts (GraphRLSettings.prior says what each does)."""

SOURCES = {"l1+group-fisher": "ranking-l1-fisher", "group-fisher": "ranking-fisher", "l1": "ranking-l1"}
"""The source a ranked cut's real evaluation records, by ranking; the policy's episodes record "policy"."""


def _bernoulli_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p, q = np.clip(p, 1e-6, 1 - 1e-6), np.clip(q, 1e-6, 1 - 1e-6)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def _greedy(policy: ChannelPolicy, obs: GraphObservation) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The policy's greedy episode (keep where p > 0.5) and its per-channel keep probabilities."""
    with torch.no_grad():
        (masks, probs), _, _ = _rollout(policy, obs, 1, greedy=True)
    return masks[0], probs[0]


def run_graph_rl(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
                 time_limit: float | None = None, seed: int = 0,
                 evaluations: int = 8, progress: ProgressFn | None = None,
                 flops: float | None = None, params: float | None = None, bits: int | None = None,
                 prior: str | None = None, settings: GraphRLSettings | None = None) -> MethodResult:
    """Graph-attention RL channel pruning under a resource constraint (see the module docstring).

    flops / params: fractions of the original MACs / kernel weights; budget: true-bytes ratio;
    bits: weight bits of the emitted model (overrides `settings.bits`); prior: "l1-fisher" or
    "none" (overrides `settings.prior`). No max_drop: the method maximises accuracy within the limits.
    """
    if ctx is None:
        raise UserError(f"{option('method', 'graph-rl')} scores candidates on data: give {option('data')}")
    s = settings or GraphRLSettings()
    prior_kind = prior if prior is not None else s.prior
    if prior_kind not in PRIORS:
        raise UserError(f"--prior must be one of {', '.join(PRIORS)}, got {prior_kind!r}")
    bits = int(bits if bits is not None else s.bits if s.bits is not None else bits_ladder(target)[1])
    start = time.perf_counter()
    rl_deadline = start + s.search_share * time_limit if time_limit else math.inf
    torch.manual_seed(seed)
    goal = getattr(ctx, "speed_goal", None)  # --speedup: a latency limit from the per-kernel table, measured whole
    int8 = frozenset() if bits >= 32 or target == "storage" else frozenset(
        n for n, k in bg.kernels.items() if weight_target(k, target) != "storage")
    constraints = resource_constraints(budget, flops, params, goal, int8)
    obs = build_observation(bg, kernel_fisher(bg, ctx, s.fisher_samples, seed))
    if not obs.groups:
        raise UserError(f"{option('method', 'graph-rl')} prunes channels, and this model has no prunable channel group "
                        "(see `hirelc-onnx inspect` for the reasons)")
    space = PruningSpace(bg, obs, constraints, target, bits, s.min_keep, s.channel_multiple or bg.channel_multiple)
    space.check_reachable()
    prior = space.uniform_keep()
    scorer = proxy_scorer(bg, ctx, obs, space)
    if hasattr(scorer, "raw_weight"):  # the torch proxy; the ORT one scores the raw pruned model only
        scorer.raw_weight = s.raw_weight
    t_imp = time.perf_counter()
    if prior_kind == "l1-fisher":
        rankings = channel_rankings(bg, ctx, obs, scorer, s.importance_samples, seed)
        start_logits = {name: [s.prior_scale * (scaled_ranks(v) - (1.0 - prior)) for v in scores]
                        for name, scores in rankings.items()}
        importance_kind = next(iter(rankings))
    else:  # uninformative: every channel at the uniform keep logit, no ranked cut
        start_logits, importance_kind = {}, None
    policy = ChannelPolicy(obs, prior, s.hidden, s.heads, s.layers,
                           channel_logits=start_logits[importance_kind] if start_logits else None)
    optimizer = torch.optim.Adam([{"params": [p for n, p in policy.named_parameters() if n != "channel_bias"]},
                                  {"params": [policy.channel_bias], "lr": s.bias_lr}], lr=s.lr)
    rows_of = getattr(scorer, "use_rows", None)  # the torch proxy can score on fewer rows; the ORT one cannot
    if rows_of and s.proxy_rows:
        rows_of(s.proxy_rows)
    log.info("graph-rl: %d prunable groups, %d channels, %s; uniform keep %.3f meets it; prior %s",
             len(obs.groups), int(obs.lengths.sum()), ", ".join(c.describe() for c in constraints), prior,
             prior_kind)

    updates = max(1, s.episodes // s.batch)
    total_steps = updates + evaluations
    lam = np.zeros(len(constraints))
    best, baseline = -math.inf, None
    scored: dict[bytes, dict] = {}  # projected masks -> proxy result (episodes repeat as the policy sharpens)
    history: list[dict] = []
    lam_trace, best_curve, mean_curve = [], [], []
    with torch_threads(1):  # tiny graphs: one thread is 10x faster than two on a busy 2-core machine
        # --- the starting cuts: each ranking's greedy episode (every group's top channels), projected;
        # the first is the untrained policy's own greedy episode (none without a prior)
        starts, start_of = [], {}
        for name, logits in start_logits.items():
            masks, _ = space.project([lg > 0 for lg in logits], [1.0 / (1.0 + np.exp(-lg)) for lg in logits])
            scored.setdefault(_key(masks), {"masks": masks, "score": scorer(masks)[0]})
            starts.append(masks)
            start_of.setdefault(_key(masks), SOURCES[name])
        if starts:
            best = max(scored[_key(m)]["score"] for m in starts)  # the record to beat starts there
        first_masks, first_probs = _greedy(policy, obs)
        importance_seconds = time.perf_counter() - t_imp
        t_rl = time.perf_counter()
        for update in range(updates):
            if time.perf_counter() > rl_deadline:
                log.info("graph-rl: time limit reached after %d updates", update)
                break
            # --- rollout: one keep/prune bit per channel, group by group
            (ep_masks, ep_probs), logp, entropy = _rollout(policy, obs, s.batch)

            # --- environment: exact cost of what was sampled, projection to feasibility, proxy score
            scores, violations = np.zeros(s.batch), np.zeros((s.batch, len(constraints)))
            for i, (masks, probs) in enumerate(zip(ep_masks, ep_probs)):
                sampled = space.usage(space.counts(masks))[0]
                violations[i] = (sampled - space.limits) / space.limits
                masks, cost = space.project(masks, probs)
                key = _key(masks)
                if key not in scored:
                    score, mse, agreement = scorer(masks)
                    scored[key] = {"masks": masks, "score": score}
                    history.append({"kind": "proxy", "method": "graph-rl", "episode": update * s.batch + i,
                                    "score": expected_score(ctx.fp32_val_score, agreement),  # score scale, as HiReLC's
                                    "proxy_score": score, "logit_mse": mse, "agreement": agreement,
                                    "macs_fraction": cost.macs_fraction, "ratio": cost.ratio,
                                    "sampled_feasible": bool(np.all(violations[i] <= 1e-9)),
                                    "kept_channels": int(sum(m.sum() for m in masks))})
                scores[i] = scored[key]["score"]

            # --- self-competition reward, Lagrangian penalty, REINFORCE step
            bar = best if math.isfinite(best) else scores.mean()
            rewards = scores - bar - np.maximum(violations, 0.0) @ lam
            baseline = rewards.mean() if baseline is None else baseline
            advantage = torch.from_numpy((rewards - baseline) / (rewards.std() + 1e-8)).float()
            loss = -(advantage * logp).mean() - s.entropy * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            baseline = s.baseline_decay * baseline + (1 - s.baseline_decay) * rewards.mean()
            best = max(best, scores.max())

            # --- dual ascent on the multipliers
            lam = np.maximum(0.0, lam + s.dual_lr * violations.mean(axis=0))
            lam_trace.append(lam.tolist())
            best_curve.append(best)
            mean_curve.append(float(scores.mean()))
            log.debug("graph-rl update %d: best %.4f mean %.4f lambda %s", update, best, scores.mean(), lam)
            notify(progress, PHASE_GRAPH_RL, update + 1, total_steps)

        # --- the greedy policy's episode (keep where p > 0.5, projected), first in line for real evaluation
        g_masks, g_probs = _greedy(policy, obs)
        greedy, _ = space.project(g_masks, g_probs)
        if _key(greedy) not in scored:
            scored[_key(greedy)] = {"masks": greedy, "score": scorer(greedy)[0]}
        # --- the final ranking on the whole proxy batch: the starts, the greedy episode, the best episodes
        if rows_of and s.proxy_rows:
            rows_of(None)
            top = sorted(scored.values(), key=lambda r: -r["score"])[:s.rescore]
            finalists = _distinct(starts + [greedy] + [r["masks"] for r in top])
            scored = {_key(m): {"masks": m, "score": scorer(m)[0]} for m in finalists}
    rl_seconds = time.perf_counter() - t_rl
    # how far training moved the policy: along its greedy episode, before vs after
    shift = {"mean_kl": float(np.mean(np.concatenate([_bernoulli_kl(a, b) for a, b in zip(g_probs, first_probs)]))),
             "mean_abs_prob_change": float(np.mean(np.abs(np.concatenate(g_probs) - np.concatenate(first_probs)))),
             "flipped_fraction": float(np.mean(np.concatenate(g_masks) != np.concatenate(first_masks)))}

    # --- real evaluation: the greedy episode, then the best by proxy score (ranked cuts among them
    # when the proxy ranks them there; the prior's starting cut first with `measure_start`)
    by_proxy = [r["masks"] for r in sorted(scored.values(), key=lambda r: -r["score"])]
    ranked = _distinct((starts[:1] if s.measure_start else []) + [greedy] + by_proxy)
    measured: list[tuple[Measurement, float, float]] = []  # (measurement, selection score, selection loss)
    too_slow: list[tuple[Measurement, float, float]] = []
    sources: dict[int, str] = {}  # id of a measurement -> what proposed it
    select = Selection(ctx)
    t_measure = time.perf_counter()
    chosen = ranked[:max(1, evaluations)]
    # one batch (run side by side under --workers / --ray); under a time limit one at a time, so the
    # limit can stop between evaluations
    batch = None if time_limit else ctx.measure_batch(
        [space.config(space.counts(masks)) for masks in chosen],
        lambda n: notify(progress, PHASE_GRAPH_RL, updates + n, total_steps),
        keeps=[space.keep(masks) for masks in chosen])
    slow_speed: dict[int, float] = {}  # id of a measurement timed too slow -> its whole timing

    def real(rank: int, masks: list[np.ndarray], m: Measurement | None, source: str, total: int) -> None:
        """One real evaluation recorded: measured (and, under --speedup, timed whole), or too slow."""
        if m is None:  # its worker died every attempt (ctx.evaluation_log says why)
            return
        proxy = scored[_key(masks)]["score"]
        feasible = space.feasible(space.usage_of(m.cost))
        progress_log.info("graph-rl real evaluation %d/%d: MACs %.3f of fp32, %.2fx, measured %.4f", rank + 1,
                          total, m.cost.macs_fraction, m.cost.ratio, m.score)
        chosen_by = select(m.model)
        sources[id(m)] = source
        speed = goal.measure(m.model) if goal is not None and feasible else None
        if speed is not None and not goal.accepts(speed):  # measured whole: not clearly faster than --speedup asks
            feasible = False
            too_slow.append((m, *chosen_by))
            slow_speed[id(m)] = speed
        history.append(candidate_record(m, "real", method="graph-rl", rank=rank,
                                        source=source, greedy=_key(masks) == _key(greedy),
                                        proxy_score=proxy, selection_score=chosen_by[0], selection_loss=chosen_by[1],
                                        feasible=feasible, kept_channels=int(space.counts(masks).sum()), speedup=speed))
        if feasible:
            measured.append((m, *chosen_by))
        notify(progress, PHASE_GRAPH_RL, updates + rank + 1, total_steps)

    for rank, masks in enumerate(chosen):
        if rank and time_limit and time.perf_counter() - start > time_limit:
            log.info("graph-rl: time limit reached after %d real evaluations", rank)
            break
        m = ctx.measure(space.config(space.counts(masks)), keep=space.keep(masks)) if batch is None else batch[rank]
        real(rank, masks, m, start_of.get(_key(masks), "policy"), len(chosen))
    # --speedup, every candidate timed too slow and evaluations left (the episodes projected onto fewer
    # distinct cuts than evaluations, as when the estimate says little pruning is needed: ResNet-20's
    # every episode kept all channels, timed 1.49x for 1.5x, and was returned): the estimate is
    # recalibrated on the timing (`SpeedGoal.observe`, as hirelc's candidates do) and the greedy
    # episode projected again under it and measured, until one is accepted or the evaluations run out
    tried, rank = {_key(m) for m in chosen}, len(chosen)
    while (goal is not None and too_slow and not measured and rank < max(1, evaluations)
           and not (time_limit and time.perf_counter() - start > time_limit)):
        slow = too_slow[-1][0]
        if not goal.observe(bg, slow.config, slow_speed[id(slow)]):
            break
        masks, _ = space.project(greedy, g_probs)
        if _key(masks) in tried:
            break
        tried.add(_key(masks))
        scored.setdefault(_key(masks), {"masks": masks, "score": scorer(masks)[0]})
        real(rank, masks, ctx.measure(space.config(space.counts(masks)), keep=space.keep(masks)), "recalibrated",
             max(1, evaluations))
        rank += 1
    # the selection score decides; within one standard error of the best, the loss (none met --speedup: the best of those)
    best_m = select.pick(measured) or (select.pick(too_slow) if too_slow else None)
    if best_m is None:  # projection makes every candidate feasible: reaching here is a cost-model bug
        raise RuntimeError("graph-rl: no measured candidate met the resource limits")
    extra = {"constraints": [{"kind": c.kind, "limit": c.limit, "text": c.describe()} for c in constraints],
             "source": sources[id(best_m)], "prior": prior_kind,
             "lagrange_multipliers": lam_trace, "best_proxy_curve": best_curve, "learning_curve": mean_curve,
             "policy_shift": shift, "prior_keep": prior,
             "proxy_metric": "-normalised logit MSE, pruned fp32 with re-estimated channel statistics"
                             + (f" + {s.raw_weight:g} x that without" if getattr(scorer, "raw_weight", 0) else ""),
             "episodes": len(best_curve) * s.batch, "distinct_episodes": len(scored), "bits": bits,
             "channel_importance": importance_kind, "importance_seconds": importance_seconds,
             "rl_seconds": rl_seconds, "measure_seconds": time.perf_counter() - t_measure}
    return MethodResult(best_m.config, best_m.model, best_m.score, history, extra)
