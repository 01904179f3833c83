"""Channel-coupling analysis: which channel dimensions must be pruned together, and why not.

Every kernel output (Conv, ConvTranspose, Gemm, MatMul with a constant weight) is a *source* of
channels. Sources are followed forward through the graph; each tensor that carries channels gets
a `ChannelMap`: the axis holding them and the ordered segments (source, length) laid along it,
each channel spanning `repeat` consecutive positions (Flatten/Reshape of C x H x W gives repeat
H*W). Ops that tie channel dimensions union their sources (union-find); a *group* is one class.

Rules, by op:
  1. Kernel producers start a source: Conv/ConvTranspose weight and bias, Gemm/MatMul columns.
     An embedding (Gather on a constant 2-D table, `embedding_table_input`) starts a source of
     its hidden dimension: the table's columns (axis 1) follow it, on the lookup's last axis.
     Vocabulary rows (axis 0) are never dropped; the hidden dimension is pruned only where the
     rules below prove it (a LayerNormalization over it, as in transformers, refuses it).
  2. Kernel consumers slice their input-channel axis: Conv (group 1) W axis 1, ConvTranspose W
     axis 0, Gemm W along K (with Flatten column blocks), MatMul B rows.
  3. Depthwise Conv (group == C, multiplier 1) and per-channel ops (BatchNormalization,
     InstanceNormalization) pass channels through, slicing their per-channel parameters.
  4. Unary elementwise ops and pooling pass channels through unchanged.
  5. Elementwise ops with several channel-carrying inputs (Add, Sum, Mul, ...) union the aligned
     segments; constant operands broadcast over the channel axis are sliced with them.
  6. Concat on the channel axis lays segments end to end (offsets); on another axis it unions.
  7. Flatten / Reshape / Transpose / Squeeze / Unsqueeze move the channel axis where the mapping
     is provable from static shapes; a Reshape that splits or interleaves channels (a channel
     shuffle, attention heads) is a barrier.
  8. Anything else (LRN, LayerNormalization over channels, Softmax over channels, grouped conv,
     unknown ops, graph outputs) is a barrier: every source reaching it is unprunable, with the
     reason recorded.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from passes.normalize import KERNEL_OPS, opset_of

__all__ = ["Segment", "ChannelMap", "Use", "Source", "ChannelGroup", "ChannelAnalysis", "analyze_channels",
           "tensor_shapes", "kernel_weight_input", "embedding_table_input", "node_attr"]

Dim = int | str | None

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Cast", "Mish", "ThresholdedRelu", "Sin", "Cos", "Sign", "Dropout",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
}
_SPATIAL_FIRST_AXIS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu", "Where"}
_PER_CHANNEL_NORM = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class Segment:
    source: int
    length: int


@dataclass(frozen=True)
class ChannelMap:
    """Where a tensor's channels are: `axis`, the segments laid along it, positions per channel."""

    axis: int
    rank: int
    segments: tuple[Segment, ...]
    repeat: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segments)

    def offsets(self) -> Iterable[tuple[int, Segment]]:
        off = 0
        for seg in self.segments:
            yield off, seg
            off += seg.length


@dataclass(frozen=True)
class Use:
    """A constant that must follow a source's channels.

    kind "slice": positions along `axis` of input `input_index` of `node` are sliced;
    kind "shape": element `axis` of the Reshape shape constant shrinks by the dropped count.
    The source's channel k sits at positions (offset + k) * repeat + r, r < repeat.
    """

    node: str
    input_index: int
    axis: int
    offset: int
    repeat: int = 1
    kind: str = "slice"


@dataclass
class Source:
    id: int
    node: str
    tensor: str
    length: int
    kernel: str | None  # the kernel node producing it, None for opaque sources
    uses: list[Use] = field(default_factory=list)
    refusal: str | None = None


@dataclass(frozen=True)
class ChannelGroup:
    """Channel dimensions that must be pruned together; `refusal` says why it cannot be."""

    id: int
    length: int
    sources: tuple[int, ...]
    producers: tuple[str, ...]  # kernel nodes whose output channels this group is
    tensors: tuple[str, ...]  # tensors carrying the group's channels
    refusal: str | None

    @property
    def prunable(self) -> bool:
        return self.refusal is None


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[Dim]]:
    """Shapes known for every tensor (inputs, outputs, value_info, initializers)."""
    shapes: dict[str, list[Dim]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def kernel_weight_input(node: onnx.NodeProto, constants: set[str]) -> int | None:
    """Index of the constant weight input of a kernel node, or None when it is not a kernel."""
    if node.op_type not in KERNEL_OPS or len(node.input) < 2:
        return None
    if node.input[1] in constants:
        return 1
    return None


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def embedding_table_input(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                          uses: dict[str, int] | None = None) -> int | None:
    """0 when `node` is an embedding lookup: a Gather along axis 0 of a constant 2-D float table
    that only this node reads (when `uses` counts readers), with computed indices; else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    table = constants.get(node.input[0])
    if table is None or node.input[1] in constants or len(table.dims) != 2 or table.data_type not in _FLOATS:
        return None
    if int(node_attr(node, "axis", 0)) not in (0, -2):
        return None
    if uses is not None and uses.get(node.input[0], 0) != 1:
        return None
    return 0


def input_uses(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs and graph outputs read each tensor."""
    uses: dict[str, int] = defaultdict(int)
    for n in graph.node:
        for i in n.input:
            uses[i] += 1
    for o in graph.output:
        uses[o.name] += 1
    return uses


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def add(self, x: int) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node`, or `default`."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _prod(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    """Product of dims as (integer part, sorted symbolic names); None if any dim is unknown."""
    n, syms = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, str):
            syms.append(d)
        else:
            n *= int(d)
    return n, tuple(sorted(syms))


class ChannelAnalysis:
    """The result of `analyze_channels`: sources, groups, per-tensor channel maps."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.constants: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.shapes = tensor_shapes(model)
        self.nodes: dict[str, onnx.NodeProto] = {n.name: n for n in self.graph.node}
        self.sources: list[Source] = []
        self.maps: dict[str, ChannelMap] = {}
        self.depthwise: list[str] = []
        self.kernel_source: dict[str, int] = {}  # kernel node -> the source of its output channels
        self.kernel_input: dict[str, str] = {}  # kernel node -> activation input tensor
        self.uf = _UnionFind()
        self.groups: list[ChannelGroup] = []
        self.group_of_source: dict[int, int] = {}
        self.uses = input_uses(self.graph)

    # --- construction helpers -----------------------------------------------------------
    def new_source(self, node: str, tensor: str, length: int, kernel: str | None, refusal: str | None = None) -> int:
        sid = len(self.sources)
        self.sources.append(Source(sid, node, tensor, length, kernel, refusal=refusal))
        self.uf.add(sid)
        return sid

    def refuse(self, cmap: ChannelMap | None, reason: str) -> None:
        if cmap is None:
            return
        for seg in cmap.segments:
            if self.sources[seg.source].refusal is None:
                self.sources[seg.source].refusal = reason

    def use(self, cmap: ChannelMap, node: str, input_index: int, axis: int, kind: str = "slice",
            repeat: int | None = None) -> None:
        for off, seg in cmap.offsets():
            self.sources[seg.source].uses.append(
                Use(node, input_index, axis, off, cmap.repeat if repeat is None else repeat, kind))

    def shape(self, name: str) -> list[Dim] | None:
        return self.shapes.get(name)

    def const_array(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    # --- results ----------------------------------------------------------------------------
    def finish(self) -> None:
        members: dict[int, list[int]] = defaultdict(list)
        for s in self.sources:
            members[self.uf.find(s.id)].append(s.id)
        tensors_of: dict[int, set[str]] = defaultdict(set)
        for t, cmap in self.maps.items():
            for seg in cmap.segments:
                tensors_of[self.uf.find(seg.source)].add(t)
        position = {o: i for i, n in enumerate(self.graph.node) for o in n.output}
        for gid, root in enumerate(sorted(members)):
            srcs = members[root]
            lengths = {self.sources[s].length for s in srcs}
            refusal = next((self.sources[s].refusal for s in srcs if self.sources[s].refusal), None)
            if len(lengths) != 1:
                refusal = refusal or f"coupled channel dimensions differ in size {sorted(lengths)}"
            producers = tuple(self.sources[s].kernel for s in srcs if self.sources[s].kernel)
            tensors = tuple(sorted(tensors_of[root], key=lambda t: (position.get(t, -1), t)))
            self.groups.append(ChannelGroup(gid, min(lengths), tuple(srcs), producers, tensors, refusal))
            for s in srcs:
                self.group_of_source[s] = gid

    def group_of_kernel(self, kernel: str) -> ChannelGroup | None:
        sid = self.kernel_source.get(kernel)
        return None if sid is None else self.groups[self.group_of_source[sid]]

    def input_map(self, kernel: str) -> ChannelMap | None:
        t = self.kernel_input.get(kernel)
        return None if t is None else self.maps.get(t)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def positions(self, use: Use, kept: np.ndarray, length: int) -> np.ndarray:
        """Positions along the use's axis that a source with `kept` channels (of `length`) drops."""
        dropped = np.setdiff1d(np.arange(length), kept)
        return ((use.offset + dropped)[:, None] * use.repeat + np.arange(use.repeat)[None, :]).reshape(-1)

    def drops(self, keep: dict[int, Sequence[int]]) -> dict[tuple[str, int, int, str], np.ndarray]:
        """For each (node, input, axis, kind): the positions dropped when groups keep `keep`."""
        out: dict[tuple[str, int, int, str], list[np.ndarray]] = defaultdict(list)
        for gid, kept in keep.items():
            group = self.groups[gid]
            kept_arr = np.asarray(sorted(set(int(k) for k in kept)), dtype=np.int64)
            for sid in group.sources:
                for use in self.sources[sid].uses:
                    out[(use.node, use.input_index, use.axis, use.kind)].append(
                        self.positions(use, kept_arr, group.length))
        return {k: np.unique(np.concatenate(v)) for k, v in out.items()}

    def pruned_initializer_shapes(self, kept_counts: dict[int, int]) -> dict[tuple[str, int], list[int]]:
        """Shape of each sliced (node, input) constant when group g keeps kept_counts[g] channels."""
        result: dict[tuple[str, int], list[int]] = {}
        for gid, count in kept_counts.items():
            group = self.groups[gid]
            dropped = group.length - int(count)
            if dropped <= 0:
                continue
            for sid in group.sources:
                for use in self.sources[sid].uses:
                    if use.kind != "slice":
                        continue
                    key = (use.node, use.input_index)
                    if key not in result:
                        result[key] = list(self.constants[self.nodes[use.node].input[use.input_index]].dims)
                    result[key][use.axis] -= dropped * use.repeat
        return result


def analyze_channels(model: onnx.ModelProto) -> ChannelAnalysis:
    """Follow channels through a normalised model (see passes.normalize) and group them."""
    a = ChannelAnalysis(model)
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        _visit(a, node)
    for name in graph_outputs:
        a.refuse(a.maps.get(name), f"channels reach the graph output '{name}'")
    a.finish()
    return a


# --- the per-op rules -------------------------------------------------------------------------

def _visit(a: ChannelAnalysis, node: onnx.NodeProto) -> None:
    op = node.op_type
    ins = [a.maps.get(i) if i else None for i in node.input]
    if op in KERNEL_OPS and kernel_weight_input(node, set(a.constants)) is not None:
        _kernel(a, node, ins[0])
        return
    if embedding_table_input(node, a.constants, a.uses) is not None:
        _embedding(a, node)
        return
    if not any(ins):
        return
    if op in _UNARY:
        cmap = ins[0]
        if op in _SPATIAL_FIRST_AXIS and cmap.axis != 1:
            a.refuse(cmap, f"{op} '{node.name}' pools over the channel axis")
            return
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            a.refuse(cmap, f"MaxPool '{node.name}' returns indices")
            return
        for extra in node.input[1:]:  # Clip min/max must be scalars
            arr = a.const_array(extra) if extra else None
            if extra and (arr is None or arr.size != 1):
                a.refuse(cmap, f"{op} '{node.name}' has a non-scalar parameter")
                return
        a.maps[node.output[0]] = cmap
        return
    if op in _PER_CHANNEL_NORM:
        cmap = ins[0]
        if cmap is None or cmap.axis != 1 or cmap.repeat != 1 or any(ins[1:]) or not all(
                i in a.constants for i in node.input[1:]):
            a.refuse(cmap, f"{op} '{node.name}' cannot be followed")
            return
        for idx in _PER_CHANNEL_NORM[op][: len(node.input) - 1]:
            a.use(cmap, node.name, idx, 0)
        a.maps[node.output[0]] = cmap
        return
    if op in _ELEMENTWISE:
        _elementwise(a, node, ins)
        return
    if op == "Concat":
        _concat(a, node, ins)
        return
    if op in ("Flatten", "Reshape"):
        _reshape(a, node, ins[0])
        if op == "Reshape" and len(ins) > 1 and ins[1]:
            a.refuse(ins[1], f"Reshape '{node.name}' uses channels as a shape")
        return
    if op == "Transpose":
        cmap = ins[0]
        perm = list(node_attr(node, "perm", list(reversed(range(cmap.rank)))))
        a.maps[node.output[0]] = ChannelMap(perm.index(cmap.axis), cmap.rank, cmap.segments, cmap.repeat)
        return
    if op in ("Squeeze", "Unsqueeze"):
        _squeeze(a, node, ins[0])
        return
    if op in ("Softmax", "LogSoftmax", "LayerNormalization") and ins[0] is not None and not any(ins[1:]):
        cmap = ins[0]
        axis = node_attr(node, "axis", -1 if op != "Softmax" or opset_of(a.model) >= 13 else 1)
        axis = axis % cmap.rank
        covers = cmap.axis >= axis if op == "LayerNormalization" or opset_of(a.model) < 13 else cmap.axis == axis
        if covers:
            a.refuse(cmap, f"{op} '{node.name}' normalises over the channel axis")
            return
        a.maps[node.output[0]] = cmap
        return
    for cmap in ins:
        a.refuse(cmap, f"consumed by {op} '{node.name}', whose channel mapping is not followed")


def _kernel(a: ChannelAnalysis, node: onnx.NodeProto, x: ChannelMap | None) -> None:
    op, name = node.op_type, node.name
    w_shape = list(a.constants[node.input[1]].dims)
    a.kernel_input[name] = node.input[0]
    has_bias = len(node.input) > 2 and node.input[2] != ""
    bias_const = has_bias and node.input[2] in a.constants
    out = node.output[0]
    if op == "Conv":
        group = int(node_attr(node, "group", 1))
        cout = w_shape[0]
        if group == 1:
            if x is not None:
                a.use(x, name, 1, 1)
        elif x is not None and group == x.channels and cout == group and w_shape[1] == 1 and x.repeat == 1:
            # depthwise, multiplier 1: output channels are the input channels
            a.use(x, name, 1, 0)
            if bias_const:
                a.use(x, name, 2, 0)
            elif has_bias:
                a.refuse(x, f"Conv '{name}' has a non-constant bias")
            a.depthwise.append(name)
            a.maps[out] = x
            return
        else:
            a.refuse(x, f"grouped Conv '{name}' (group={group}) couples channels across groups")
        refusal = None if group == 1 else (
            f"depthwise Conv '{name}' reads channels that are not followed (its input is a barrier)"
            if group == w_shape[0] and w_shape[1] == 1 else f"grouped Conv '{name}' (group={group})")
        if has_bias and not bias_const:
            refusal = refusal or f"Conv '{name}' has a non-constant bias"
        _conv_source(a, name, out, cout, 0, bias_const, refusal, len(w_shape))
        return
    if op == "ConvTranspose":
        group = int(node_attr(node, "group", 1))
        if x is not None:
            if group == 1:
                a.use(x, name, 1, 0)
            else:
                a.refuse(x, f"grouped ConvTranspose '{name}'")
        cout = w_shape[1] * group
        refusal = None if group == 1 else f"grouped ConvTranspose '{name}' (group={group})"
        if node_attr(node, "output_shape") is not None:
            refusal = refusal or f"ConvTranspose '{name}' has an explicit output_shape"
        _conv_source(a, name, out, cout, 1, bias_const, refusal, len(w_shape))
        return
    if op == "Gemm":
        trans_a, trans_b = int(node_attr(node, "transA", 0)), int(node_attr(node, "transB", 0))
        if x is not None:
            if trans_a == 0 and x.axis == 1 and x.rank == 2:
                a.use(x, name, 1, 1 if trans_b else 0)
            else:
                a.refuse(x, f"Gemm '{name}' does not contract over the channel axis")
        n_out = w_shape[0] if trans_b else w_shape[1]
        sid = a.new_source(name, out, n_out, name)
        a.sources[sid].uses.append(Use(name, 1, 0 if trans_b else 1, 0))
        if bias_const:
            c_shape = list(a.constants[node.input[2]].dims)
            if c_shape and c_shape[-1] == n_out and n_out > 1:
                a.sources[sid].uses.append(Use(name, 2, len(c_shape) - 1, 0))
        elif has_bias:
            a.sources[sid].refusal = f"Gemm '{name}' has a non-constant C"
        a.kernel_source[name] = sid
        a.maps[out] = ChannelMap(1, 2, (Segment(sid, n_out),))
        return
    # MatMul with a constant right operand [K, N]
    x_shape = a.shape(node.input[0])
    if len(w_shape) != 2 or x_shape is None:
        a.refuse(x, f"MatMul '{name}' has a weight of rank {len(w_shape)} or an input of unknown rank")
        refusal = f"MatMul '{name}' weight of rank {len(w_shape)}"
        rank = len(x_shape) if x_shape else 2
    else:
        rank = len(x_shape)
        refusal = None
        if x is not None:
            if x.axis == rank - 1:
                a.use(x, name, 1, 0)
            else:
                a.refuse(x, f"MatMul '{name}' does not contract over the channel axis")
    n_out = w_shape[-1]
    sid = a.new_source(name, out, n_out, name, refusal)
    a.sources[sid].uses.append(Use(name, 1, len(w_shape) - 1, 0))
    a.kernel_source[name] = sid
    a.maps[out] = ChannelMap(max(rank, 2) - 1, max(rank, 2), (Segment(sid, n_out),))


def _embedding(a: ChannelAnalysis, node: onnx.NodeProto) -> None:
    """An embedding lookup's output carries the table's hidden dimension on its last axis (rule 1)."""
    hidden = int(a.constants[node.input[0]].dims[1])
    ids = a.shape(node.input[1])
    rank = len(ids) + 1 if ids is not None else 2
    sid = a.new_source(node.name, node.output[0], hidden, node.name)
    a.sources[sid].uses.append(Use(node.name, 0, 1, 0))
    a.kernel_source[node.name] = sid
    a.maps[node.output[0]] = ChannelMap(rank - 1, rank, (Segment(sid, hidden),))


def _conv_source(a: ChannelAnalysis, name: str, out: str, cout: int, weight_axis: int, bias_const: bool,
                 refusal: str | None, rank: int) -> None:
    """A Conv / ConvTranspose output starts a source: its weight's out-channel axis and bias follow it."""
    sid = a.new_source(name, out, cout, name, refusal)
    a.sources[sid].uses.append(Use(name, 1, weight_axis, 0))
    if bias_const:
        a.sources[sid].uses.append(Use(name, 2, 0, 0))
    a.kernel_source[name] = sid
    a.maps[out] = ChannelMap(1, rank, (Segment(sid, cout),))


def _aligned(cmap: ChannelMap, out_rank: int) -> ChannelMap:
    return ChannelMap(cmap.axis + out_rank - cmap.rank, out_rank, cmap.segments, cmap.repeat)


def _same_layout(x: ChannelMap, y: ChannelMap) -> bool:
    return (x.axis == y.axis and x.repeat == y.repeat
            and [s.length for s in x.segments] == [s.length for s in y.segments])


def _elementwise(a: ChannelAnalysis, node: onnx.NodeProto, ins: list[ChannelMap | None]) -> None:
    name = node.name
    in_shapes = [a.shape(i) if i else None for i in node.input]
    out_rank = max([m.rank for m in ins if m] + [len(s) for s in in_shapes if s is not None])
    tracked = [_aligned(m, out_rank) for m in ins if m]
    first = tracked[0]
    if not all(_same_layout(first, m) for m in tracked[1:]):
        for m in ins:
            a.refuse(m, f"{node.op_type} '{name}' joins tensors whose channels are laid out differently")
        return
    positions = first.channels * first.repeat
    for idx, (inp, m) in enumerate(zip(node.input, ins)):
        if m is not None or not inp:
            continue
        shape = in_shapes[idx]
        if shape is None:
            for t in tracked:
                a.refuse(t, f"{node.op_type} '{name}' has an operand of unknown shape")
            return
        k = first.axis - (out_rank - len(shape))
        size = shape[k] if k >= 0 else 1
        if size == 1:
            continue
        if inp in a.constants and size == positions:
            a.use(first, name, idx, k)
            continue
        for t in tracked:
            a.refuse(t, f"{node.op_type} '{name}' mixes channels with a non-constant operand")
        return
    for m in tracked[1:]:
        for s1, s2 in zip(first.segments, m.segments):
            a.uf.union(s1.source, s2.source)
    a.maps[node.output[0]] = first


def _concat(a: ChannelAnalysis, node: onnx.NodeProto, ins: list[ChannelMap | None]) -> None:
    name = node.name
    shapes = [a.shape(i) for i in node.input]
    ref = next(m for m in ins if m)
    rank = ref.rank
    axis = int(node_attr(node, "axis", 1)) % rank
    if axis != ref.axis:  # concatenation along another axis: channels must line up
        _elementwise_union(a, node, ins)
        return
    segments: list[Segment] = []
    for inp, m, shape in zip(node.input, ins, shapes):
        if m is not None:
            if m.axis != axis or m.repeat != ref.repeat:
                for mm in ins:
                    a.refuse(mm, f"Concat '{name}' joins channels laid out differently")
                return
            segments.extend(m.segments)
            continue
        size = shape[axis] if shape is not None else None
        if not isinstance(size, int) or size % ref.repeat:
            for mm in ins:
                a.refuse(mm, f"Concat '{name}' has an input of unknown channel count")
            return
        sid = a.new_source(name, inp, size // ref.repeat, None, f"input '{inp}' of Concat '{name}' is not a kernel output")
        segments.append(Segment(sid, size // ref.repeat))
    a.maps[node.output[0]] = ChannelMap(axis, rank, tuple(segments), ref.repeat)


def _elementwise_union(a: ChannelAnalysis, node: onnx.NodeProto, ins: list[ChannelMap | None]) -> None:
    tracked = [m for m in ins if m]
    if len(tracked) != len(ins) or not all(_same_layout(tracked[0], m) for m in tracked[1:]):
        for m in ins:
            a.refuse(m, f"{node.op_type} '{node.name}' joins tensors whose channels do not line up")
        return
    for m in tracked[1:]:
        for s1, s2 in zip(tracked[0].segments, m.segments):
            a.uf.union(s1.source, s2.source)
    a.maps[node.output[0]] = tracked[0]


def _reshape(a: ChannelAnalysis, node: onnx.NodeProto, cmap: ChannelMap) -> None:
    name = node.name
    d_in = a.shape(node.input[0])
    d_out = a.shape(node.output[0])
    if node.op_type == "Flatten" and d_in is not None:
        k = int(node_attr(node, "axis", 1)) % max(len(d_in), 1)
        d_out = [None, None]
        lead, tail = _prod(d_in[:k]), _prod(d_in[k:])
        if lead and tail:
            d_out = [lead[0] if not lead[1] else None, tail[0] if not tail[1] else None]
    if d_in is None or d_out is None:
        a.refuse(cmap, f"{node.op_type} '{name}' has unknown shapes")
        return
    ax = cmap.axis
    after = _prod(d_in[ax + 1:])
    if node.op_type == "Flatten":
        k = int(node_attr(node, "axis", 1)) % len(d_in)
        inner = _prod(d_in[k:ax])
        if k <= ax and inner == (1, ()) and after and not after[1]:
            a.maps[node.output[0]] = ChannelMap(1, 2, cmap.segments, cmap.repeat * after[0])
            return
        a.refuse(cmap, f"Flatten '{name}' interleaves channels with other dimensions")
        return
    if after is None or after[1] or not isinstance(d_in[ax], int):
        a.refuse(cmap, f"Reshape '{name}' has unknown dimensions at or after the channel axis")
        return
    for b in range(len(d_out)):
        rest = _prod(d_out[b + 1:])
        if not isinstance(d_out[b], int) or rest is None or rest[1]:
            continue
        # Elements are conserved, so when channel and trailing sizes agree the leading (batch)
        # dims agree too, even when they are symbolic or unknown.
        if d_out[b] == d_in[ax] and rest == after:
            factor = 1
        elif d_out[b] == d_in[ax] * after[0] and rest == (1, ()):
            factor = after[0]
        else:
            continue
        lead_in, lead_out = _prod(d_in[:ax]), _prod(d_out[:b])
        if lead_in and lead_out and not lead_in[1] and not lead_out[1] and lead_in != lead_out:
            continue
        shape = a.const_array(node.input[1]) if len(node.input) > 1 else None
        if shape is None:
            a.refuse(cmap, f"Reshape '{name}' takes a computed shape")
            return
        if int(shape[b]) > 0:
            a.use(cmap, name, 1, b, kind="shape", repeat=cmap.repeat * factor)
        a.maps[node.output[0]] = ChannelMap(b, len(d_out), cmap.segments, cmap.repeat * factor)
        return
    a.refuse(cmap, f"Reshape '{name}' splits or interleaves channels (e.g. a channel shuffle or attention heads)")


def _squeeze(a: ChannelAnalysis, node: onnx.NodeProto, cmap: ChannelMap) -> None:
    axes = node_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        arr = a.const_array(node.input[1])
        axes = None if arr is None else [int(v) for v in arr.reshape(-1)]
    d_out = a.shape(node.output[0])
    if node.op_type == "Unsqueeze":
        if axes is None:
            a.refuse(cmap, f"Unsqueeze '{node.name}' has computed axes")
            return
        rank = cmap.rank + len(axes)
        inserted = sorted(x % rank for x in axes)
        kept = [i for i in range(rank) if i not in inserted]
        a.maps[node.output[0]] = ChannelMap(kept[cmap.axis], rank, cmap.segments, cmap.repeat)
        return
    d_in = a.shape(node.input[0])
    if axes is None:
        if d_in is None:
            a.refuse(cmap, f"Squeeze '{node.name}' has unknown shapes")
            return
        axes = [i for i, d in enumerate(d_in) if d == 1]
    axes = sorted(x % cmap.rank for x in axes)
    if cmap.axis in axes:
        a.refuse(cmap, f"Squeeze '{node.name}' removes the channel axis")
        return
    new_axis = cmap.axis - sum(1 for x in axes if x < cmap.axis)
    a.maps[node.output[0]] = ChannelMap(new_axis, cmap.rank - len(axes), cmap.segments, cmap.repeat)
    _ = d_out
