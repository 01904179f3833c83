"""Channel importance: which channels of a group a pruning ratio keeps.

Scoring is kept apart from pruning (the pass takes indices, not ratios): the score is the L1
magnitude of each output channel's weights, summed over the group's producers after dividing each
producer's scores by their mean, so that one wide layer does not decide for the whole residual
stage. `channel_ranking` is the one place the choice is made: `apply` keeps the head of it, and
the search's damage estimate (`search.features.WeightPerturbation`) charges the tail it drops.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from hirelc_onnx.graph.blockgraph import BlockGraph

__all__ = ["l1_channel_scores", "channel_ranking", "kept_channels"]


def l1_channel_scores(bg: BlockGraph, group_id: int) -> np.ndarray:
    """Per-channel L1 importance of a channel group (larger = more important); computed once per
    graph (`BlockGraph.channel_scores`), a read-only array."""
    if group_id not in bg.channel_scores:
        scores = _l1_channel_scores(bg, group_id)
        scores.setflags(write=False)
        bg.channel_scores[group_id] = scores
    return bg.channel_scores[group_id]


def _l1_channel_scores(bg: BlockGraph, group_id: int) -> np.ndarray:
    group = bg.groups[group_id]
    inits = {t.name: t for t in bg.model.graph.initializer}
    total = np.zeros(group.length, np.float64)
    for producer in group.producers:
        k = bg.kernels.get(producer)
        if k is None:
            continue
        w = numpy_helper.to_array(inits[k.weight]).astype(np.float64)
        per_channel = np.abs(np.moveaxis(w, k.channel_axis, 0)).reshape(w.shape[k.channel_axis], -1).sum(axis=1)
        if per_channel.size != group.length:
            continue  # a grouped ConvTranspose or other layout where out channels differ
        total += per_channel / max(per_channel.mean(), 1e-12)
    return total


def channel_ranking(bg: BlockGraph, group_id: int) -> np.ndarray:
    """The group's channel indices, most important first: highest L1 score, ties to the lower index.

    Keeping `count` channels keeps the first `count` of this order; pruning drops the rest.
    """
    scores = l1_channel_scores(bg, group_id)
    return np.lexsort((np.arange(scores.size), -scores))


def kept_channels(bg: BlockGraph, group_id: int, count: int) -> np.ndarray:
    """Indices of the `count` channels a group keeps (the head of `channel_ranking`), ascending."""
    return np.sort(channel_ranking(bg, group_id)[:count])
