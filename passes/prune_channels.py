"""Structured channel pruning: physically remove channels of whole channel groups.

Given the analysis of `passes.channel_groups` and, per prunable group, the channel indices to
keep, the pass:
  1. slices every constant that follows the group (kernel weights and biases on both the
     producing and the consuming side, BatchNorm parameters, broadcast constants, Flatten->Gemm
     column blocks, Concat-offset positions), copying a constant first when it is shared by a node
     that slices it differently;
  2. shrinks the channel entry of Reshape shape constants;
  3. sets `group` of depthwise Convs to their new channel count;
  4. drops stale value_info and re-infers shapes.
The input model is not modified. Refusals (unknown or unprunable group, bad indices) raise
`PruneError` before anything is rewritten.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from passes.channel_groups import ChannelAnalysis, analyze_channels
from passes.ir_build import fresh_name
from passes.normalize import infer_shapes, remove_unused_initializers

__all__ = ["PruneError", "prune_channels", "check_keep"]


class PruneError(ValueError):
    """A pruning request that cannot be applied; nothing was rewritten."""


def check_keep(analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int]]) -> dict[int, np.ndarray]:
    """Validate a {group id: kept channel indices} request and normalise it to sorted arrays."""
    out: dict[int, np.ndarray] = {}
    for gid, kept in keep.items():
        if not isinstance(gid, (int, np.integer)) or not (0 <= gid < len(analysis.groups)):
            raise PruneError(f"unknown channel group {gid!r}")
        group = analysis.groups[gid]
        arr = np.unique(np.asarray(list(kept), dtype=np.int64))
        if arr.size and (arr[0] < 0 or arr[-1] >= group.length):
            raise PruneError(f"group {gid}: channel indices must lie in [0, {group.length})")
        if arr.size == 0:
            raise PruneError(f"group {gid}: at least one channel must be kept")
        if arr.size == group.length:
            continue
        if not group.prunable:
            raise PruneError(f"group {gid} cannot be pruned: {group.refusal}")
        out[int(gid)] = arr
    return out


def prune_channels(model: onnx.ModelProto, keep: Mapping[int, Sequence[int]],
                   analysis: ChannelAnalysis | None = None) -> onnx.ModelProto:
    """Return a copy of `model` with each group `g` reduced to the channels `keep[g]`.

    `model` must be normalised (passes.normalize) and `analysis` computed on it (computed here
    when omitted).
    """
    analysis = analysis or analyze_channels(model)
    request = check_keep(analysis, keep)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    if not request:
        return result
    drops = analysis.drops(request)
    graph = result.graph
    nodes = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}

    consumers: dict[str, int] = defaultdict(int)
    for n in graph.node:
        for i in n.input:
            consumers[i] += 1
    per_input: dict[tuple[str, int], list[tuple[int, str, np.ndarray]]] = defaultdict(list)
    for (node, idx, axis, kind), positions in drops.items():
        per_input[(node, idx)].append((axis, kind, positions))

    new_inits: dict[str, onnx.TensorProto] = {}
    taken = set(inits)
    for (node_name, idx), edits in per_input.items():
        node = nodes[node_name]
        name = node.input[idx]
        arr = numpy_helper.to_array(inits[name])
        for axis, kind, positions in sorted(edits, key=lambda e: e[0]):
            if kind == "slice":
                arr = np.delete(arr, positions, axis=axis)
            else:  # shape constant: shrink the channel entry
                arr = arr.copy()
                arr[axis] -= len(positions)
        new_name = name if consumers[name] == 1 else fresh_name(taken, f"{name}__{node_name}")
        new_inits[new_name] = numpy_helper.from_array(arr, new_name)
        node.input[idx] = new_name
    for idx in reversed(range(len(graph.initializer))):
        if graph.initializer[idx].name in new_inits:
            del graph.initializer[idx]
    graph.initializer.extend(new_inits.values())

    for name in analysis.depthwise:
        node = nodes[name]
        weight = new_inits.get(node.input[1]) or inits[node.input[1]]
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = int(weight.dims[0])
    remove_unused_initializers(graph)
    return infer_shapes(result)


