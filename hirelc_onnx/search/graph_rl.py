"""`--method graph-rl`: structured pruning by a graph-attention policy with per-channel keep actions.

The MDP. An episode visits the prunable channel groups in topological order; at each step the
policy (`gat.ChannelPolicy`) reads the graph observation -- layers and channel groups, data-flow
and coupling edges, the keep state so far -- and samples a keep/prune bit for every channel of the
current group. When every group is decided the environment makes the choice feasible and scores it.

The start. Each channel's keep logit starts at prior_scale * (its importance rank in its group -
(1 - u)), u the uniform keep ratio meeting the target, so the untrained policy's greedy episode
keeps every group's most important channels (a uniform cut, data-aware) and sampling explores
around the cut. Importance (`_rankings`) is the sum of the channel's rank by L1 magnitude and its
rank by group Fisher (`MaskedProxy.channel_importance`: the squared first-order loss change of
removing the channel, per sample, on fine-tune rows); L1 alone when the model cannot go through the
torch bridge. Why the sum: on the digits references at 50% MACs (seeds 0 and 1, one 10 s
fine-tune each), test cross-entropy after fine-tuning was, for L1 / Fisher / the rank sum, VGG
0.070 / 0.070 / 0.053 and ResNet-20 0.080 / 0.069 / 0.074: Fisher alone wins on ResNet-20 (and
halves the proxy error there, 0.30 vs 0.75) but not on VGG, the sum beats L1 on both.

The constraint (constrained MDP). The resource target is one or more usage limits, each a fraction
of the original model measured by the cost model on the emitted model: MACs (`flops=0.5`), kernel
weight elements (`params=0.5`), stored bytes with every kernel at `bits` (`budget=6`: bytes <= 1/6).
Two mechanisms, both documented where they act:
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
the pruned model with its per-channel statistics re-estimated (`MaskedProxy`: why, and why not the
raw pruned model). The reward is score - (best feasible score before this update) - Lagrangian
penalty: the agent competes with its own record, which starts at the best starting cut (below).
REINFORCE, with an exponential-moving-average baseline of past rewards (after a new record the
baseline lags the raised bar, so mediocre episodes get negative advantages), advantages scaled by
the batch's reward spread, and a small entropy bonus.

The result. Within `evaluations`, distinct episodes are measured for real -- pruned with their
exact channel sets, fine-tuned (the context's budget, the same for every candidate), quantized to
`bits`, scored on the validation split through ORT -- in this order: the starting cut (channels
ranked by L1 + Fisher ranks), the same cut ranked by Fisher alone, the trained policy's greedy
episode (keep where p > 0.5, projected), then the best by proxy score. The pick is made on the
validation plus calibration rows (`_Selection`: why not validation alone): the highest score wins,
except that scores within one row of the best count as tied (on a few hundred rows one image is
noise), and among tied candidates the lower loss (cross-entropy, or KL to fp32 without labels)
wins. The returned score is the pick's validation score. All are feasible; the check is repeated
on the measurement.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from hirelc_onnx.apply import apply_pruning
from hirelc_onnx.bridge.convert import torch_threads
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.metrics import (cross_entropy, kl_divergence, logit_mse_proxy, top1_accuracy,
                                          top1_agreement)
from hirelc_onnx.evaluate.runner import SessionConfig, predict
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.importance import l1_channel_scores
from hirelc_onnx.search.baselines import MethodResult, candidate_record
from hirelc_onnx.search.budget import BudgetError, bits_ladder
from hirelc_onnx.search.context import Measurement, SearchContext
from hirelc_onnx.search.gat import ChannelPolicy, GraphObservation, build_observation
from passes.channel_groups import ChannelMap

__all__ = ["GraphRLSettings", "Constraint", "resource_constraints", "PruningSpace", "MaskedProxy", "proxy_score",
           "run_graph_rl"]

log = logging.getLogger(__name__)

DEFAULT_FLOPS = 0.5  # the target when the caller gives none
# The proxy needs the pruned fp32 graph's outputs, not deployment speed: an unoptimised one-thread
# session builds several times faster than ORT_ENABLE_ALL and computes the same logits.
_PROXY_SESSION = SessionConfig(graph_optimization_level="disabled", intra_op_threads=1)


@dataclass(frozen=True)
class GraphRLSettings:
    """Knobs of the graph-RL search (defaults sized for the digits references on 2 CPU cores)."""

    episodes: int = 256
    """Proxy-scored episodes in the RL phase (rounded down to whole updates)."""
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
    channel_multiple: int = 4
    """Kept channel counts are multiples of this (groups whose width is not: any count). ORT's CPU
    convolutions leave their fast path on odd channel counts: on the ResNet-20 reference, 11/23/45
    channels per stage ran 2-7x slower than fp32 at batch 32 while 12/24/44 ran faster."""
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
    prior_scale: float = 6.0
    """Starting keep logit of a channel: prior_scale * (importance rank in its group in [0, 1] -
    (1 - uniform keep)); the starting greedy episode keeps each group's most important channels."""


@dataclass(frozen=True)
class Constraint:
    """A resource limit: usage (a fraction of the original model) <= limit."""

    kind: str  # "flops" (MACs), "params" (kernel weight elements) or "bytes" (stored bytes)
    limit: float

    def usage(self, bg: BlockGraph, cost: ModelCost) -> float:
        if self.kind == "flops":
            return cost.macs_fraction
        if self.kind == "params":
            full = sum(int(np.prod(k.weight_shape)) for k in bg.kernels.values())
            return sum(c.params for c in cost.kernels.values()) / max(full, 1)
        return cost.total_bytes / max(cost.original_bytes, 1)

    def describe(self) -> str:
        return f"bytes <= 1/{1 / self.limit:g} of fp32" if self.kind == "bytes" else f"{self.kind} <= {self.limit:g}"


def resource_constraints(budget: float | None = None, flops: float | None = None,
                         params: float | None = None) -> list[Constraint]:
    """The limits a run must meet: any of --budget Nx, --flops f, --params f (flops 0.5 when none is given)."""
    out = []
    for kind, value in (("flops", flops), ("params", params)):
        if value is not None:
            if not 0.0 < float(value) <= 1.0:
                raise UserError(f"--{kind} is a fraction of the original model in (0, 1], got {value!r}")
            out.append(Constraint(kind, float(value)))
    if budget is not None:
        out.append(Constraint("bytes", 1.0 / float(budget)))
    return out or [Constraint("flops", DEFAULT_FLOPS)]


class PruningSpace:
    """Per-channel keep masks of the prunable groups <-> configs, their exact costs, and the projection."""

    def __init__(self, bg: BlockGraph, obs: GraphObservation, constraints: list[Constraint], target: str,
                 bits: int, min_keep: float, channel_multiple: int = 1) -> None:
        self.bg, self.obs, self.constraints, self.target, self.bits = bg, obs, constraints, target, bits
        self.lengths = obs.lengths.astype(int)
        self.units = np.where(self.lengths % channel_multiple == 0, channel_multiple, 1)
        self.floors = np.minimum(self.lengths, np.ceil(min_keep * self.lengths / self.units) * self.units)
        self.floors = np.maximum(self.floors, self.units).astype(int)

    def config(self, counts: np.ndarray) -> CompressionConfig:
        """The config whose groups keep `counts` channels (bits for every kernel); cost model and passes read it."""
        ratio = {}
        for gid, count, length in zip(self.obs.groups, counts, self.lengths):
            for producer in self.bg.groups[gid].producers:
                ratio[producer] = int(count) / length
        kernels = {name: KernelConfig(bits=self.bits, keep_ratio=ratio.get(name, 1.0)) for name in self.bg.kernels}
        return CompressionConfig(kernels, target=self.target)

    def keep(self, masks: list[np.ndarray]) -> dict[int, np.ndarray]:
        """Explicit kept channel indices of the groups that lose channels."""
        return {gid: np.flatnonzero(m) for gid, m in zip(self.obs.groups, masks) if not m.all()}

    def usage(self, counts: np.ndarray) -> tuple[np.ndarray, ModelCost]:
        cost = model_cost(self.bg, self.config(counts))
        return np.array([c.usage(self.bg, cost) for c in self.constraints]), cost

    def feasible(self, usage: np.ndarray) -> bool:
        return bool(np.all(usage <= np.array([c.limit for c in self.constraints]) + 1e-9))

    def check_reachable(self) -> None:
        usage, _ = self.usage(self.floors)
        if not self.feasible(usage):
            worst = int(np.argmax(usage / [c.limit for c in self.constraints]))
            raise BudgetError(f"{self.constraints[worst].describe()} is unreachable by pruning: every prunable "
                              f"group at its floor still uses {usage[worst]:.3f}")

    def uniform_keep(self) -> float:
        """The largest uniform keep fraction meeting every limit (the policy's starting point)."""
        lo, hi = 0.0, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            counts = np.maximum(self.floors, np.round(mid * self.lengths / self.units) * self.units).astype(int)
            lo, hi = (mid, hi) if self.feasible(self.usage(counts)[0]) else (lo, mid)
        return max(lo, 0.05)

    def project(self, masks: list[np.ndarray], probs: list[np.ndarray]) -> tuple[list[np.ndarray], ModelCost]:
        """The sampled masks moved onto the constraint boundary in the policy's own order.

        First each group's count is rounded to the nearest multiple of its unit (at least its
        floor), keeping sampled channels before unsampled ones and probable before improbable.
        Then, if a limit is exceeded, units of kept channels above the floors are dropped in
        ascending mean keep probability across all groups, as few as meet every limit; if every
        limit holds, units of dropped channels are added back in descending probability, as many
        as keep every limit (no episode wastes budget it was allowed). Usage is monotone along
        either order, so a binary search on the exact cost model finds the boundary.
        """
        masks = [m.copy() for m in masks]
        for m, p, unit, floor in zip(masks, probs, self.units, self.floors):
            count = max(floor, int(np.round(m.sum() / unit)) * unit)
            if count != m.sum():
                order = np.lexsort((-p, ~m))  # sampled first, then by probability
                m[:] = False
                m[order[:count]] = True
        counts = np.array([m.sum() for m in masks])
        fill = self.feasible(self.usage(counts)[0])
        keys, groups, chunks = [], [], []
        for g, (m, p, unit, floor) in enumerate(zip(masks, probs, self.units, self.floors)):
            if fill:
                idx = np.flatnonzero(~m)
                idx = idx[np.argsort(-p[idx], kind="stable")]
            else:
                idx = np.flatnonzero(m)
                idx = idx[np.argsort(p[idx], kind="stable")][: len(idx) - floor]
            for i in range(0, len(idx), unit):
                chunks.append(idx[i:i + unit])
                keys.append(-p[chunks[-1]].mean() if fill else p[chunks[-1]].mean())
                groups.append(g)
        order = np.argsort(keys, kind="stable")  # within a group, chunk means are already in order
        chunks = [chunks[i] for i in order]
        sizes, groups = np.array([len(c) for c in chunks], int), np.array(groups, int)[order]

        def counts_after(k: int) -> np.ndarray:
            moved = np.bincount(groups[:k], weights=sizes[:k], minlength=len(counts)).astype(int)
            return counts + moved if fill else counts - moved

        def ok(k: int) -> bool:
            return self.feasible(self.usage(counts_after(k))[0])

        lo, hi = 0, len(chunks)  # fill: ok(lo), find the last ok; drop: not ok(lo), ok(hi) (floors are reachable)
        if fill and ok(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid) == fill:
                lo = mid
            else:
                hi = mid
        k = lo if fill else hi
        for g, chunk in zip(groups[:k], chunks[:k]):
            masks[g][chunk] = fill
        return masks, self.usage(counts_after(k))[1]


class MaskedProxy:
    """Scores keep masks in one torch forward pass, without rewriting ONNX (the RL phase's proxy).

    The fp32 model is converted once (`bridge.to_torch`). A forward hook on every node whose
    output carries a decided group's channels zeroes the pruned positions. Zeroing a channel in
    every tensor that carries it computes what removing it does -- each consumer kernel reads
    zeros from it -- so no pass, session or protobuf is built per episode (a test checks the
    masked logits against the pruning pass run through ORT).

    Pruning half the MACs of a small network without fine-tuning collapses its logits: on the
    ResNet-20 reference, uniform L1 pruning at 0.71 keep leaves 9% top-1 agreement with fp32 and a
    normalised logit MSE of 1.15, and random channels score the same, so raw outputs cannot rank
    candidates. With `recalibrate`, each kernel output channel is re-standardised on the proxy
    batch to the fp32 model's per-channel mean and std: what re-estimating BatchNorm statistics
    does before fine-tuning (EagleEye, Li et al. 2020, rank pruned candidates this way), applied at
    the kernel outputs because BatchNorm is folded into the kernels here. Measured on six 50%-MACs
    ResNet-20 candidates, the rank correlation with validation accuracy after 2 fine-tuning epochs
    was 0.94 for the recalibrated score and 0.66 for the raw one.
    """

    def __init__(self, bg: BlockGraph, obs: GraphObservation, x: np.ndarray, recalibrate: bool = True) -> None:
        from hirelc_onnx.bridge.convert import to_torch

        self.module = to_torch(bg.model)
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.recalibrate = recalibrate
        self.lengths = obs.lengths.astype(int)
        self.column = {gid: j for j, gid in enumerate(obs.groups)}
        producer = {out: node.name for node in bg.model.graph.node for out in node.output}
        group_of = bg.analysis.group_of_source
        self.hooked: list[tuple[nn.Module, ChannelMap, list[int | None], bool]] = []
        self.producers: set[int] = set()  # hooks on a decided group's producer kernels
        for _, sub in self.module.named_modules():
            mapping = getattr(sub, "onnx_mapping", None)
            cmap = bg.analysis.maps.get(mapping.outputs[0]) if mapping is not None and mapping.outputs else None
            if cmap is None:
                continue
            cols = [self.column.get(group_of[seg.source]) for seg in cmap.segments]
            kernel = bg.kernels.get(producer.get(mapping.outputs[0]))
            is_kernel = kernel is not None
            if is_kernel or any(c is not None for c in cols):
                if kernel is not None and kernel.group in self.column:  # not a depthwise pass-through
                    self.producers.add(len(self.hooked))
                self.hooked.append((sub, cmap, cols, is_kernel))
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: list[np.ndarray] | None = None
        self._taps: list[tuple[int, torch.Tensor]] | None = None  # producer outputs, while scoring importance
        for i, (sub, *_) in enumerate(self.hooked):
            sub.register_forward_hook(functools.partial(self._hook, i))
        with torch.no_grad():
            self.ref = self.module(self.x).numpy()

    def _positions(self, cmap: ChannelMap, cols: list[int | None]) -> torch.Tensor | None:
        if self.masks is None or all(c is None for c in cols):
            return None
        parts = [np.ones(seg.length, bool) if c is None else self.masks[c] for seg, c in zip(cmap.segments, cols)]
        return torch.from_numpy(np.repeat(np.concatenate(parts), cmap.repeat).astype(np.float32))

    def _hook(self, i: int, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):  # multi-output nodes are channel barriers
            return output
        _, cmap, cols, is_kernel = self.hooked[i]
        axis = cmap.axis % output.dim()
        shape = [1] * output.dim()
        shape[axis] = -1
        if is_kernel and self.recalibrate:
            dims = [d for d in range(output.dim()) if d != axis]
            mean, std = output.mean(dim=dims), output.std(dim=dims, correction=0)
            if i not in self.stats:  # the first pass is the unpruned model: its statistics are the target
                self.stats[i] = (mean, std)
            ref_mean, ref_std = self.stats[i]
            scale = ref_std / torch.maximum(std, 0.1 * ref_std + 1e-8)
            output = (output - mean.view(shape)) * scale.view(shape) + ref_mean.view(shape)
        if self._taps is not None and i in self.producers:
            self._taps.append((i, output))  # a producer of decided groups: where the mask m_c acts
        keep = self._positions(cmap, cols)
        return output if keep is None else output * keep.view(shape)

    def channel_importance(self, x: np.ndarray, labels: np.ndarray | None = None,
                           chunk: int = 64) -> list[np.ndarray]:
        """Group Fisher importance of every decided channel (one array per decided group).

        Zeroing channel c multiplies every producer output of its group by a mask m_c = 0; to
        first order the loss of sample n changes by s_nc = dL_n/dm_c = sum over the producers'
        output positions of activation * gradient. The score is mean_n s_nc^2 (the empirical
        Fisher of the mask, Liu et al. 2021, "Group Fisher pruning"): the loss increase expected
        from removing the channel, on one scale across groups. Loss: cross-entropy with `labels`,
        else with the fp32 model's own argmax. Computed unpruned and without recalibration.
        """
        sums = [np.zeros(n) for n in self.lengths]
        recalibrate, self.recalibrate = self.recalibrate, False
        try:
            for start in range(0, len(x), chunk):
                xb = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk])).requires_grad_(True)
                self._taps = []
                logits = self.module(xb)
                taps, self._taps = self._taps, None
                if not taps:
                    break
                y = (torch.from_numpy(labels[start:start + chunk].astype(np.int64)) if labels is not None
                     else logits.detach().argmax(1))
                loss = nn.functional.cross_entropy(logits, y, reduction="sum")
                grads = torch.autograd.grad(loss, [out for _, out in taps])
                for col, ps in enumerate(self._per_sample(taps, grads, len(xb))):
                    sums[col] += (ps ** 2).sum(axis=0)
        finally:
            self._taps, self.recalibrate = None, recalibrate
        return [s / max(len(x), 1) for s in sums]

    def _per_sample(self, taps: list[tuple[int, torch.Tensor]], grads, batch: int) -> list[np.ndarray]:
        """(batch, channels) dL_n/dm_c per decided group: activation * gradient summed over every
        position of every producer output that carries the channel."""
        per_sample = [np.zeros((batch, n)) for n in self.lengths]
        for (i, out), grad in zip(taps, grads):
            _, cmap, cols, _ = self.hooked[i]
            axis = cmap.axis % out.dim()
            dims = [d for d in range(out.dim()) if d not in (0, axis)]
            s = ((out * grad).sum(dim=dims) if dims else out * grad).detach().double().numpy()  # (batch, positions)
            offset = 0
            for seg, col in zip(cmap.segments, cols):
                width = seg.length * cmap.repeat
                if col is not None:
                    per_sample[col] += s[:, offset:offset + width].reshape(batch, seg.length, cmap.repeat).sum(-1)
                offset += width
        return per_sample

    def __call__(self, masks: list[np.ndarray]) -> tuple[float, float, float]:
        """(score, logit MSE, top-1 agreement) of the model keeping `masks` (one bool array per decided group)."""
        self.masks = masks
        try:
            with torch.no_grad():
                logits = self.module(self.x).numpy()
        finally:
            self.masks = None
        mse = logit_mse_proxy(logits, self.ref)
        return -mse, mse, top1_agreement(logits, self.ref)


def proxy_score(bg: BlockGraph, ctx: SearchContext, config: CompressionConfig,
                keep: dict[int, np.ndarray]) -> tuple[float, float, float]:
    """(score, logit MSE, top-1 agreement) of the ONNX-pruned fp32 model on the proxy batch through ORT.

    The fallback when the model cannot go through the torch bridge: exact, slower, and without
    recalibration (see MaskedProxy for why that ranks collapsed candidates poorly).
    """
    logits = predict(apply_pruning(bg, config, keep), ctx.proxy_x, config=_PROXY_SESSION)
    mse = logit_mse_proxy(logits, ctx.proxy_ref)
    return -mse, mse, top1_agreement(logits, ctx.proxy_ref)


def _fisher(bg: BlockGraph, ctx: SearchContext, samples: int, seed: int) -> dict[str, float] | None:
    """Per-kernel Fisher shares for the node features, None when unavailable (the feature is then zero)."""
    if samples <= 0:
        return None
    try:
        from hirelc_onnx.bridge.fisher import fisher_sensitivity
    except ImportError as exc:
        log.info("graph-rl: no Fisher feature (%s)", exc)
        return None
    try:
        return fisher_sensitivity(bg, ctx.splits.finetune, samples, seed).per_kernel
    except (UserError, RuntimeError) as exc:  # RuntimeError: e.g. a graph exported for batch 1 only
        log.warning("graph-rl: no Fisher feature: %s", exc)
        return None


def _rankings(bg: BlockGraph, ctx: SearchContext, obs: GraphObservation, scorer, samples: int,
              seed: int) -> dict[str, list[np.ndarray]]:
    """Channel orderings of every decided group, name -> per-group scores (higher: keep first).

    The first is the policy's start: "l1+group-fisher", the sum of each channel's rank by L1
    magnitude and by group Fisher (`MaskedProxy.channel_importance`), then "group-fisher" alone.
    Without the torch bridge, or with `samples` 0, only "l1".
    """
    l1 = [l1_channel_scores(bg, gid) for gid in obs.groups]
    if samples > 0 and hasattr(scorer, "channel_importance"):  # the torch proxy, not the ORT fallback
        data = ctx.splits.finetune
        rows = np.sort(np.random.default_rng(seed).choice(len(data), min(samples, len(data)), replace=False))
        try:
            fisher = scorer.channel_importance(data.x[rows], None if data.y is None else data.y[rows])
            return {"l1+group-fisher": [_ranks(a) + _ranks(b) for a, b in zip(l1, fisher)], "group-fisher": fisher}
        except RuntimeError as exc:  # a converted op without a backward: rank by magnitude instead
            log.warning("graph-rl: no Fisher channel importance (%s); using L1 magnitude", exc)
    return {"l1": l1}


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (0: least important); ties in index order."""
    return np.argsort(np.argsort(v, kind="stable"), kind="stable") / max(v.size - 1, 1)


class _Selection:
    """What picks the returned candidate among the measured ones: score and loss on the validation
    plus calibration rows.

    Each candidate's fine-tuning already kept its best epoch by validation accuracy, so validation
    alone flatters every candidate a little; the calibration rows only fed the proxy and the
    activation ranges, never a label or a gradient. Together they are about 1.7x the validation
    rows (digits: 450 rows instead of 270). Score: top-1 accuracy (labelled) or agreement with
    fp32; loss: cross-entropy or KL to fp32.
    """

    def __init__(self, ctx: SearchContext) -> None:
        parts = [ctx.splits.val] + [ctx.splits.calib] * (len(ctx.splits.calib) > 0)
        self.labelled = all(p.y is not None for p in parts)
        if not self.labelled:
            parts = [ctx.splits.val]
        self.x = np.concatenate([p.x for p in parts])
        self.y = np.concatenate([p.y for p in parts]).astype(int) if self.labelled else None
        self.ref = None if self.labelled else ctx.val_ref

    def __call__(self, model) -> tuple[float, float]:
        logits = predict(model, self.x)
        if not self.labelled:
            return top1_agreement(logits, self.ref), kl_divergence(logits, self.ref)
        return top1_accuracy(logits, self.y), cross_entropy(logits, self.y)


def _scorer(bg: BlockGraph, ctx: SearchContext, obs: GraphObservation,
            space: PruningSpace) -> Callable[[list[np.ndarray]], tuple[float, float, float]]:
    """The recalibrated torch proxy, or the ORT proxy when the model cannot go through the bridge."""
    try:
        return MaskedProxy(bg, obs, ctx.proxy_x)
    except (UserError, RuntimeError) as exc:  # RuntimeError: a torch forward failed (a batch-1-only Reshape)
        log.warning("graph-rl: proxy without recalibration through ORT (%s)", exc)

    def score(masks: list[np.ndarray]) -> tuple[float, float, float]:
        return proxy_score(bg, ctx, space.config(np.array([m.sum() for m in masks])), space.keep(masks))

    return score


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


def _key(masks: list[np.ndarray]) -> bytes:
    return np.packbits(np.concatenate(masks)).tobytes()


def run_graph_rl(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
                 time_limit: float | None = None, seed: int = 0,
                 evaluations: int = 8, progress: Callable[[int, int], None] | None = None,
                 flops: float | None = None, params: float | None = None, bits: int | None = None,
                 settings: GraphRLSettings | None = None) -> MethodResult:
    """Graph-attention RL channel pruning under a resource constraint (see the module docstring).

    flops / params: fractions of the original MACs / kernel weights; budget: true-bytes ratio;
    bits: weight bits of the emitted model (overrides `settings.bits`). No max_drop: the method
    maximises accuracy within the limits.
    """
    if ctx is None:
        raise UserError("--method graph-rl scores candidates on data: give --data")
    s = settings or GraphRLSettings()
    bits = int(bits if bits is not None else s.bits if s.bits is not None else bits_ladder(target)[1])
    start = time.perf_counter()
    rl_deadline = start + s.search_share * time_limit if time_limit else math.inf
    torch.manual_seed(seed)
    constraints = resource_constraints(budget, flops, params)
    obs = build_observation(bg, _fisher(bg, ctx, s.fisher_samples, seed))
    if not obs.groups:
        raise UserError("--method graph-rl prunes channels, and this model has no prunable channel group "
                        "(see `hirelc-onnx inspect` for the reasons)")
    space = PruningSpace(bg, obs, constraints, target, bits, s.min_keep, s.channel_multiple)
    space.check_reachable()
    prior = space.uniform_keep()
    scorer = _scorer(bg, ctx, obs, space)
    t_imp = time.perf_counter()
    rankings = _rankings(bg, ctx, obs, scorer, s.importance_samples, seed)
    start_logits = {name: [s.prior_scale * (_ranks(v) - (1.0 - prior)) for v in scores]
                    for name, scores in rankings.items()}
    importance_kind = next(iter(rankings))
    policy = ChannelPolicy(obs, prior, s.hidden, s.heads, s.layers, channel_logits=start_logits[importance_kind])
    optimizer = torch.optim.Adam(policy.parameters(), lr=s.lr)
    limits = np.array([c.limit for c in constraints])
    log.info("graph-rl: %d prunable groups, %d channels, %s; uniform keep %.3f meets it",
             len(obs.groups), int(obs.lengths.sum()), ", ".join(c.describe() for c in constraints), prior)

    updates = max(1, s.episodes // s.batch)
    total_steps = updates + evaluations
    lam = np.zeros(len(constraints))
    best, baseline = -math.inf, None
    scored: dict[bytes, dict] = {}  # projected masks -> proxy result (episodes repeat as the policy sharpens)
    history: list[dict] = []
    lam_trace, best_curve = [], []
    with torch_threads(1):  # tiny graphs: one thread is 10x faster than two on a busy 2-core machine
        # --- the starting cuts: each ranking's greedy episode (every group's top channels), projected;
        # the first is the untrained policy's own greedy episode
        starts, start_of = [], {}
        for name, logits in start_logits.items():
            masks, _ = space.project([lg > 0 for lg in logits], [1.0 / (1.0 + np.exp(-lg)) for lg in logits])
            scored.setdefault(_key(masks), {"masks": masks, "score": scorer(masks)[0]})
            starts.append(masks)
            start_of.setdefault(_key(masks), name)
        best = max(scored[_key(m)]["score"] for m in starts)  # the record to beat starts there
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
                sampled = space.usage(np.array([m.sum() for m in masks]))[0]
                violations[i] = (sampled - limits) / limits
                masks, cost = space.project(masks, probs)
                key = _key(masks)
                if key not in scored:
                    score, mse, agreement = scorer(masks)
                    scored[key] = {"masks": masks, "score": score}
                    history.append({"kind": "proxy", "method": "graph-rl", "episode": update * s.batch + i,
                                    "score": ctx.fp32_val_score * agreement,  # accuracy scale, as HiReLC's
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
            log.debug("graph-rl update %d: best %.4f mean %.4f lambda %s", update, best, scores.mean(), lam)
            if progress:
                progress(update + 1, total_steps)

        # --- the greedy policy's episode (keep where p > 0.5, projected), first in line for real evaluation
        with torch.no_grad():
            (g_masks, g_probs), _, _ = _rollout(policy, obs, 1, greedy=True)
        greedy, _ = space.project(g_masks[0], g_probs[0])
        if _key(greedy) not in scored:
            scored[_key(greedy)] = {"masks": greedy, "score": scorer(greedy)[0]}
    rl_seconds = time.perf_counter() - t_rl

    # --- real evaluation: the starting cuts, the greedy episode, then the best by proxy score
    ranked, seen = [], set()
    for masks in starts + [greedy] + [r["masks"] for r in sorted(scored.values(), key=lambda r: -r["score"])]:
        if _key(masks) not in seen:
            seen.add(_key(masks))
            ranked.append(masks)
    best_m: Measurement | None = None
    measured: list[tuple[Measurement, float, float]] = []  # (measurement, selection score, selection loss)
    select = _Selection(ctx)
    t_measure = time.perf_counter()
    for rank, masks in enumerate(ranked[:max(1, evaluations)]):
        if rank and time_limit and time.perf_counter() - start > time_limit:
            log.info("graph-rl: time limit reached after %d real evaluations", rank)
            break
        counts = np.array([m.sum() for m in masks])
        m = ctx.measure(space.config(counts), keep=space.keep(masks))
        proxy = scored[_key(masks)]["score"]
        feasible = space.feasible(np.array([c.usage(bg, m.cost) for c in constraints]))
        chosen_by = select(m.model)
        history.append(candidate_record(m, "real", method="graph-rl", rank=rank,
                                        start=start_of.get(_key(masks)), greedy=_key(masks) == _key(greedy),
                                        proxy_score=proxy, selection_score=chosen_by[0], selection_loss=chosen_by[1],
                                        feasible=feasible, kept_channels=int(counts.sum())))
        if feasible:
            measured.append((m, *chosen_by))
        if progress:
            progress(updates + rank + 1, total_steps)
    # the selection score decides, but a score within one row of the best is a tie (on a few hundred
    # rows a single image is noise), and among the tied the lower selection loss wins
    if measured:
        top = max(score for _, score, _ in measured)
        best_m = min((c for c in measured if c[1] >= top - 1.0 / len(select.x) - 1e-9), key=lambda c: c[2])[0]
    if best_m is None:  # projection makes every candidate feasible: reaching here is a cost-model bug
        raise RuntimeError("graph-rl: no measured candidate met the resource limits")
    extra = {"constraints": [{"kind": c.kind, "limit": c.limit, "text": c.describe()} for c in constraints],
             "lagrange_multipliers": lam_trace, "best_proxy_curve": best_curve, "prior_keep": prior,
             "proxy_metric": "-normalised logit MSE, pruned fp32 with re-estimated channel statistics",
             "episodes": len(best_curve) * s.batch, "distinct_episodes": len(scored), "bits": bits,
             "channel_importance": importance_kind, "importance_seconds": importance_seconds,
             "rl_seconds": rl_seconds, "measure_seconds": time.perf_counter() - t_measure}
    return MethodResult(best_m.config, best_m.model, best_m.score, history, extra)
