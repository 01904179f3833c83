"""Which channels matter: the orderings that start the graph-RL policy, and the per-kernel Fisher
node feature of its observation.

Each channel's starting rank is the sum of its rank by L1 magnitude and its rank by group Fisher
(`MaskedProxy.channel_importance`: the squared first-order loss change of removing the channel,
per sample, on fine-tune rows); L1 alone when the model cannot go through the torch bridge. Why the
sum: on the digits references at 50% MACs (seeds 0 and 1, one 10 s fine-tune each), test
cross-entropy after fine-tuning was, for L1 / Fisher / the rank sum, VGG 0.070 / 0.070 / 0.053 and
ResNet-20 0.080 / 0.069 / 0.074: Fisher alone wins on ResNet-20 (and halves the proxy error there,
0.30 vs 0.75) but not on VGG, the sum beats L1 on both.
"""
from __future__ import annotations

import logging

import numpy as np

from hirelc_onnx.errors import UserError
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.importance import l1_channel_scores
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.gat import GraphObservation

__all__ = ["kernel_fisher", "channel_rankings", "scaled_ranks"]

log = logging.getLogger(__name__)


def kernel_fisher(bg: BlockGraph, ctx: SearchContext, samples: int, seed: int) -> dict[str, float] | None:
    """Per-kernel Fisher shares for the node features, None when unavailable (the feature is then zero)."""
    if samples <= 0:
        return None
    try:
        from hirelc_onnx.bridge.fisher import fisher_sensitivity
    except ImportError as exc:
        log.info("graph-rl: no Fisher feature (%s)", exc)
        return None
    try:
        return fisher_sensitivity(bg, ctx.splits.finetune, samples, seed, kind=ctx.objective.kinds[0],
                                  use_labels=ctx.objective.label_output == 0).per_kernel
    except (UserError, RuntimeError) as exc:  # RuntimeError: e.g. a graph exported for batch 1 only
        log.warning("graph-rl: no Fisher feature: %s", exc)
        return None


def channel_rankings(bg: BlockGraph, ctx: SearchContext, obs: GraphObservation, scorer, samples: int,
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
            classes = data.classes
            fisher = scorer.channel_importance(data.rows(rows), None if classes is None else classes[rows])
            return {"l1+group-fisher": [scaled_ranks(a) + scaled_ranks(b) for a, b in zip(l1, fisher)],
                    "group-fisher": fisher}
        except RuntimeError as exc:  # a converted op without a backward: rank by magnitude instead
            log.warning("graph-rl: no Fisher channel importance (%s); using L1 magnitude", exc)
    return {"l1": l1}


def scaled_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (0: least important); ties in index order."""
    return np.argsort(np.argsort(v, kind="stable"), kind="stable") / max(v.size - 1, 1)
