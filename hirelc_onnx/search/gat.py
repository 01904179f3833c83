"""The graph-RL pruner's eyes and hands: a graph observation of a BlockGraph and a GAT policy over it.

Observation. One node per kernel (layer) and one per channel group; three kinds of edge, each in
both directions (6 edge types, one-hot edge attributes):
  * data flow     kernel -> kernel, the nearest upstream kernels found by walking the ONNX graph
                  back through non-kernel nodes (activations, pooling, Add, Concat, Reshape, ...);
  * produces      kernel -> the group its output channels belong to (residual producers share one);
  * consumes      group -> each kernel whose input channels it is (a depthwise conv consumes the
                  group it passes through).
Node features (NODE_FEATURES columns, all roughly in [0, 1]) are static facts -- node kind, op
kind, log parameters, MACs share, fan-in / fan-out (or group width), position, weight |w| mean and
std, Fisher share, prunable -- and the keep state of the current episode (STATE_COLUMNS): fraction
of output / input channels kept, whether the group is decided, whether it is being decided now.

Policy. A graph attention network (torch_geometric's GATConv, edge-type aware, residual) gives
node embeddings and a global embedding (mean and max pooled). Visiting the prunable groups in
topological order, the keep/prune decision of each channel of the current group is a Bernoulli
whose logit is
    prior + MLP([group embedding, global embedding, channel features, step]) + b_channel
where `prior` is the logit of the uniform keep ratio that meets the resource target (so the first
episodes are near the constraint), channel features are normalised L1 norms of the channel's
producer and consumer weights and their ranks (CHANNEL_FEATURES), and b_channel is a free,
learned per-channel bias. The MLP's output layer starts at zero, so the starting logits are
prior + b_channel: zeros by default, or `channel_logits - prior` when the caller gives starting
logits (graph RL gives an importance ranking); the agent refines them from the reward,
generalising through the features and memorising through the biases.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import GATConv

from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.importance import l1_channel_scores

__all__ = ["NODE_FEATURES", "STATE_COLUMNS", "CHANNEL_FEATURES", "EDGE_TYPES", "GraphObservation",
           "build_observation", "GATEncoder", "ChannelPolicy"]

log = logging.getLogger(__name__)

EDGE_TYPES = ("dataflow", "dataflow-reverse", "produces", "produced-by", "consumes", "consumed-by")
STATIC_FEATURES = 14
_WEIGHT_COLUMNS = (10, 11, 12)  # |w| mean, w std, Fisher: a group node averages its producers'
STATE_COLUMNS = (14, 15, 16, 17)  # keep out, keep in, decided, current
NODE_FEATURES = STATIC_FEATURES + len(STATE_COLUMNS)
CHANNEL_FEATURES = 4  # producer L1 / mean, consumer L1 / mean, their ranks in the group


@dataclass(frozen=True)
class GraphObservation:
    """The static part of the observation plus the index maps that turn a keep state into node features."""

    x: np.ndarray
    """(nodes, NODE_FEATURES) features with the keep state of the unpruned model (all kept)."""
    edge_index: np.ndarray
    """(2, edges) source and target node of every edge."""
    edge_attr: np.ndarray
    """(edges, len(EDGE_TYPES)) one-hot edge type."""
    node_names: tuple[str, ...]
    """Kernel node name, or "group:<id>" for a channel group."""
    groups: tuple[int, ...]
    """Prunable channel groups in the order the agent decides them (topological)."""
    group_nodes: np.ndarray
    """(len(groups),) node index of each decided group."""
    lengths: np.ndarray
    """(len(groups),) channels of each decided group."""
    channel_features: tuple[np.ndarray, ...]
    """Per decided group, (length, CHANNEL_FEATURES)."""
    out_map: np.ndarray
    """(nodes, len(groups)) 1 where the node's output channels are that group (group nodes: itself)."""
    in_map: np.ndarray
    """(nodes, len(groups)) share of the node's input channels lying in that group."""

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def states(self, kept: np.ndarray, decided: np.ndarray, current: int | None) -> np.ndarray:
        """(batch, nodes, NODE_FEATURES) features for `kept` channel counts (batch, groups).

        `decided` (batch, groups) marks the groups already chosen; `current` is the index in
        `groups` of the one being chosen now (None when the episode is over).
        """
        frac = kept / self.lengths[None, :]
        pruned = 1.0 - frac  # nodes touching no decided group read keep 1
        out_keep = 1.0 - pruned @ self.out_map.T
        in_keep = 1.0 - pruned @ self.in_map.T
        touched = self.out_map + (self.in_map > 0)
        x = np.repeat(self.x[None], kept.shape[0], axis=0)
        x[..., STATE_COLUMNS[0]] = out_keep
        x[..., STATE_COLUMNS[1]] = in_keep
        x[..., STATE_COLUMNS[2]] = np.minimum(decided.astype(np.float32) @ self.out_map.T, 1.0)
        x[..., STATE_COLUMNS[3]] = 0.0 if current is None else np.minimum(touched[:, current], 1.0)[None, :]
        return x.astype(np.float32)


def _dataflow(bg: BlockGraph) -> list[tuple[str, str]]:
    """(upstream kernel, kernel) pairs: walk back from each kernel's activation input to the nearest kernels."""
    graph = bg.model.graph
    producer = {out: node for node in graph.node for out in node.output}
    nodes = {n.name: n for n in graph.node}
    edges = set()
    for name in bg.kernels:
        stack, seen = [nodes[name].input[0]], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            node = producer[tensor]
            if node.name in bg.kernels:
                edges.add((node.name, name))
            else:
                stack.extend(i for i in node.input if i)
    return sorted(edges)


def _weight_stats(bg: BlockGraph) -> dict[str, tuple[float, float]]:
    inits = {t.name: t for t in bg.model.graph.initializer}
    stats = {}
    for name, k in bg.kernels.items():
        w = numpy_helper.to_array(inits[k.weight]).astype(np.float64)
        stats[name] = (float(np.abs(w).mean()), float(w.std()))
    return stats


def _consumer_l1(bg: BlockGraph, group_id: int) -> np.ndarray:
    """Per-channel L1 of the weights that read the group's channels (input side of consumer kernels).

    Each consuming weight's scores are divided by their mean before summing, as for producers.
    """
    group = bg.groups[group_id]
    analysis = bg.analysis
    total = np.zeros(group.length)
    for sid in group.sources:
        for use in analysis.sources[sid].uses:
            k = bg.kernels.get(use.node)
            if k is None or use.input_index != 1 or use.axis == k.out_axis or use.kind != "slice":
                continue
            w = np.abs(analysis.const_array(analysis.nodes[use.node].input[1]).astype(np.float64))
            per_pos = np.moveaxis(w, use.axis, 0).reshape(w.shape[use.axis], -1).sum(axis=1)
            pos = (use.offset + np.arange(group.length))[:, None] * use.repeat + np.arange(use.repeat)[None, :]
            if pos.max() >= per_pos.size:
                continue
            per_channel = per_pos[pos].sum(axis=1)
            total += per_channel / max(per_channel.mean(), 1e-12)
    return total


def _channel_features(bg: BlockGraph, group_id: int) -> np.ndarray:
    def normed(v: np.ndarray) -> np.ndarray:
        return np.clip(v / v.mean(), 0.0, 4.0) if v.mean() > 0 else np.ones_like(v)

    def ranks(v: np.ndarray) -> np.ndarray:  # in [0, 1]; ties share their mean rank (constant weights: 0.5)
        order = np.empty(v.size)
        order[np.argsort(v, kind="stable")] = np.arange(v.size)
        _, tie, count = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(tie, weights=order) / count)[tie] / max(v.size - 1, 1)

    prod, cons = l1_channel_scores(bg, group_id), _consumer_l1(bg, group_id)
    return np.stack([normed(prod), normed(cons), ranks(prod), ranks(cons)], axis=1).astype(np.float32)


def build_observation(bg: BlockGraph, fisher: dict[str, float] | None = None) -> GraphObservation:
    """The graph observation of `bg`; `fisher` is the per-kernel Fisher share (None: zeros)."""
    kernels = bg.kernel_list()
    groups = [g for g in bg.groups if g.producers]
    names = [k.name for k in kernels] + [f"group:{g.id}" for g in groups]
    index = {n: i for i, n in enumerate(names)}
    gnode = {g.id: index[f"group:{g.id}"] for g in groups}
    stats = _weight_stats(bg)
    fisher = fisher or {}
    max_params = max(k.params for k in kernels)
    total_macs = max(bg.total_macs, 1)
    max_in, max_out = max(k.fan_in for k in kernels), max(k.fan_out for k in kernels)
    max_len = max(g.length for g in groups)
    max_abs = max(max(s[0] for s in stats.values()), 1e-12)
    max_std = max(max(s[1] for s in stats.values()), 1e-12)
    fisher_scale = len(kernels)  # a share of 1/len(kernels) is the typical kernel: maps to log1p(1)
    last = max(len(kernels) - 1, 1)

    x = np.zeros((len(names), NODE_FEATURES), np.float32)
    x[:, STATE_COLUMNS[0]] = x[:, STATE_COLUMNS[1]] = 1.0
    for k in kernels:
        depthwise = k.op == "Conv" and k.group is None  # passes its input group through: no output group
        prunable = bg.prunable_kernel(k.name)
        x[index[k.name], :STATIC_FEATURES] = [
            1.0, 0.0, float(k.op in ("Conv", "ConvTranspose") and not depthwise), float(depthwise),
            float(k.op in ("Gemm", "MatMul")), math.log1p(k.params) / math.log1p(max_params), k.macs / total_macs,
            math.log1p(k.fan_in) / math.log1p(max_in), math.log1p(k.fan_out) / math.log1p(max_out), k.index / last,
            stats[k.name][0] / max_abs, stats[k.name][1] / max_std,
            math.log1p(fisher.get(k.name, 0.0) * fisher_scale) / math.log1p(fisher_scale), float(prunable)]
    for g in groups:
        members = [bg.kernels[p] for p in g.producers]
        readers = [k for k in kernels if g.id in k.input_groups]
        weights = x[[index[p] for p in g.producers]][:, _WEIGHT_COLUMNS].mean(axis=0)
        x[gnode[g.id], :STATIC_FEATURES] = [
            0.0, 1.0, 0.0, 0.0, 0.0, math.log1p(sum(k.params for k in members)) / math.log1p(max_params),
            min(sum(k.macs for k in members + readers) / total_macs, 1.0), math.log1p(g.length) / math.log1p(max_len),
            len(members) / len(kernels), np.mean([k.index for k in members]) / last, *weights, float(g.prunable)]

    edges: list[tuple[int, int, int]] = []
    for a, b in _dataflow(bg):
        edges += [(index[a], index[b], 0), (index[b], index[a], 1)]
    for k in kernels:
        if k.group in gnode:
            edges += [(index[k.name], gnode[k.group], 2), (gnode[k.group], index[k.name], 3)]
        for gid in k.input_groups:
            if gid in gnode:
                edges += [(gnode[gid], index[k.name], 4), (index[k.name], gnode[gid], 5)]
    edge_index = np.array([[e[0] for e in edges], [e[1] for e in edges]], np.int64).reshape(2, -1)
    edge_attr = np.eye(len(EDGE_TYPES), dtype=np.float32)[[e[2] for e in edges]].reshape(-1, len(EDGE_TYPES))

    decided = [g for g in groups if g.prunable]
    decided.sort(key=lambda g: min(bg.kernels[p].index for p in g.producers))
    col = {g.id: j for j, g in enumerate(decided)}
    out_map = np.zeros((len(names), len(decided)), np.float32)
    in_map = np.zeros_like(out_map)
    for g in decided:
        out_map[gnode[g.id], col[g.id]] = 1.0
        for p in g.producers:
            out_map[index[p], col[g.id]] = 1.0
    for k in kernels:
        width = sum(bg.groups[gid].length for gid in k.input_groups)
        for gid in k.input_groups:
            if gid in col:
                in_map[index[k.name], col[gid]] = bg.groups[gid].length / width
    log.debug("graph observation: %d nodes, %d edges, %d prunable groups", len(names), len(edges), len(decided))
    return GraphObservation(
        x=x, edge_index=edge_index, edge_attr=edge_attr, node_names=tuple(names),
        groups=tuple(g.id for g in decided), group_nodes=np.array([gnode[g.id] for g in decided], np.int64),
        lengths=np.array([g.length for g in decided], np.float64),
        channel_features=tuple(_channel_features(bg, g.id) for g in decided), out_map=out_map, in_map=in_map)


class GATEncoder(nn.Module):
    """Node features -> node embeddings (residual GAT layers) and a global embedding (mean and max pooled).

    Batches are disjoint copies of one graph: `x` is (batch, nodes, features) and the edges are
    offset per copy, so one call encodes every episode of a policy update.
    """

    def __init__(self, node_dim: int, edge_dim: int, hidden: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"GAT hidden size {hidden} must be a multiple of the head count {heads}")
        self.hidden = hidden
        self.embed = nn.Linear(node_dim, hidden)
        self.convs = nn.ModuleList(GATConv(hidden, hidden // heads, heads=heads, edge_dim=edge_dim, residual=True)
                                   for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.pool = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor,
                edge_attr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, nodes, hidden) node embeddings and (batch, hidden) global embeddings."""
        batch, nodes, _ = x.shape
        offsets = (torch.arange(batch) * nodes).repeat_interleave(edge_index.shape[1])
        ei = edge_index.repeat(1, batch) + offsets[None, :]
        ea = edge_attr.repeat(batch, 1)
        h = F.elu(self.embed(x.reshape(batch * nodes, -1)))
        for conv, norm in zip(self.convs, self.norms):
            h = norm(F.elu(conv(h, ei, ea)))
        h = h.reshape(batch, nodes, self.hidden)
        return h, torch.tanh(self.pool(torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=-1)))


class ChannelPolicy(nn.Module):
    """Per-channel keep logits for one prunable group, given the episode's graph state (see module docstring)."""

    def __init__(self, obs: GraphObservation, prior_keep: float, hidden: int = 64, heads: int = 4,
                 layers: int = 2, channel_logits: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.obs = obs
        self.encoder = GATEncoder(NODE_FEATURES, len(EDGE_TYPES), hidden, heads, layers)
        self.head = nn.Sequential(nn.Linear(2 * hidden + CHANNEL_FEATURES + 1, hidden), nn.ELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[-1].weight)  # start at the prior: every channel kept with prior_keep
        nn.init.zeros_(self.head[-1].bias)
        sizes = [len(f) for f in obs.channel_features]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        p = min(max(prior_keep, 1e-3), 1 - 1e-3)
        self.prior = math.log(p / (1 - p))
        start = torch.zeros(int(self.offsets[-1]))
        if channel_logits is not None:  # the starting keep logit of each channel, prior included
            start = torch.from_numpy(np.concatenate(channel_logits).astype(np.float32)) - self.prior
        self.channel_bias = nn.Parameter(start)
        self.register_buffer("edge_index", torch.from_numpy(obs.edge_index))
        self.register_buffer("edge_attr", torch.from_numpy(obs.edge_attr))
        for i, f in enumerate(obs.channel_features):
            self.register_buffer(f"channels{i}", torch.from_numpy(f))

    def forward(self, states: torch.Tensor, step: int) -> torch.Tensor:
        """(batch, channels of group `step`) keep logits; `states` is (batch, nodes, NODE_FEATURES)."""
        nodes, glob = self.encoder(states, self.edge_index, self.edge_attr)
        group = nodes[:, int(self.obs.group_nodes[step])]
        chans = getattr(self, f"channels{step}")
        batch, length = states.shape[0], chans.shape[0]
        when = torch.full((batch, length, 1), step / max(len(self.obs.groups) - 1, 1))
        inp = torch.cat([group[:, None].expand(-1, length, -1), glob[:, None].expand(-1, length, -1),
                         chans[None].expand(batch, -1, -1), when], dim=-1)
        bias = self.channel_bias[self.offsets[step]: self.offsets[step + 1]]
        return self.prior + self.head(inp).squeeze(-1) + bias[None, :]
