"""ONNX model -> BlockGraph: compressible kernels, the blocks that budget them, channel groups."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from hirelc_onnx.config import DEFAULT_WEIGHT_RANGE
from hirelc_onnx.errors import NothingToCompressError
from hirelc_onnx.graph.ort_cpu_bytes import OrtCpuBytes
from passes.channel_groups import (ChannelAnalysis, ChannelGroup, analyze_channels, embedding_table_input,
                                   kernel_weight_input, node_attr, tensor_shapes)
from passes.normalize import infer_shapes, normalize, opset_of
from passes.storage import tensor_nbytes

__all__ = ["Kernel", "Block", "BlockGraph", "build_block_graph", "with_input_dims", "MAX_BLOCK_KERNELS"]

log = logging.getLogger(__name__)

MAX_BLOCK_KERNELS = 6  # a topological block longer than this is cut into chunks
_MERGE_OPS = {"Add", "Sum", "Concat", "Mul"}


@dataclass(frozen=True)
class Kernel:
    """A node with a constant weight that the search may prune and quantize.

    An embedding (op "Gather": a lookup in a constant 2-D table [rows, hidden]) is a kernel whose
    weight is the table: out_axis 0, so per-channel means one scale per row and per-group blocks
    run along a row; it has no MACs. Its output channels are the hidden dimension (the table's
    columns, `channel_axis` 1), pruned only where the channel analysis proves it.
    """

    name: str  # node name, unique after normalisation
    op: str
    weight: str  # initializer name of the weight
    bias: str | None
    weight_shape: tuple[int, ...]
    out_axis: int  # the weight's output-channel axis (per-channel scales lie along it)
    params: int  # weight + bias elements
    macs: int  # multiply-accumulates per sample at the inferred input shape
    fan_in: int
    fan_out: int
    index: int  # position among kernels, in topological order
    group: int | None  # channel group of its output channels
    input_groups: tuple[int, ...]  # channel groups laid along its input channels
    block: int = -1
    int8_slower: str = ""  # why its int8 kernel is not used under ort-cpu (measured slower than fp32), else ""

    @property
    def channel_axis(self) -> int:
        """The weight axis holding the output channels pruning drops: out_axis, except an
        embedding table's, whose channels are its hidden columns (rows are vocabulary)."""
        return 1 if self.op == "Gather" else self.out_axis


@dataclass(frozen=True)
class Block:
    """Kernels the high-level agent budgets as one unit (a residual unit, or a chunk)."""

    id: int
    name: str
    kernels: tuple[str, ...]
    kind: str  # "residual" (ends at a merge point) or "chunk"


@dataclass
class BlockGraph:
    """The framework-neutral view of a model that search and cost model work on."""

    model: onnx.ModelProto  # the normalised model all names refer to
    kernels: dict[str, Kernel]
    blocks: list[Block]
    groups: list[ChannelGroup]
    analysis: ChannelAnalysis
    opset: int
    input_shapes: dict[str, list]
    output_names: list[str]
    initializer_bytes: dict[str, int] = field(default_factory=dict)
    structure_bytes: int = 0  # serialized graph without weight data and value_info
    channel_multiple: int = 1  # pruned channel counts are rounded to it (--channel-multiple; specs.group_keep_counts)
    weight_range: str = DEFAULT_WEIGHT_RANGE  # how quantized weights' ranges are set (--weight-range; specs.weight_range)
    ort_cpu_bytes: OrtCpuBytes | None = None  # what ORT's quantizer adds under ort-cpu (graph/ort_cpu_bytes.py)
    channel_scores: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """`importance.l1_channel_scores` per group, computed once (a search asks for them per candidate:
    a second per call on AlexNet's 37M-weight Gemm); `replace` starts a new graph with an empty one."""


    @property
    def total_params(self) -> int:
        return sum(k.params for k in self.kernels.values())

    @property
    def total_macs(self) -> int:
        return sum(k.macs for k in self.kernels.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of every initializer as stored now (kernels and everything else)."""
        return sum(self.initializer_bytes.values())

    def kernel_list(self) -> list[Kernel]:
        return sorted(self.kernels.values(), key=lambda k: k.index)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def prunable_kernel(self, name: str) -> bool:
        """Whether kernel `name` produces a prunable channel group (its keep ratio can be below 1)."""
        group = self.kernels[name].group
        return group is not None and self.groups[group].prunable



def _static(dims) -> int:
    """Elements of a shape, symbolic or unknown dims (the batch) counted as 1."""
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in dims])) if dims else 1



def _kernel_geometry(node: onnx.NodeProto, w_shape: list[int], shapes: dict) -> tuple[int, int, int, int]:
    """(out_axis, macs per sample, fan_in, fan_out) of a kernel node."""
    out_shape = shapes.get(node.output[0])
    op = node.op_type
    if op == "Conv":
        fan_in = int(np.prod(w_shape[1:]))
        out_elems = _static(out_shape[1:]) if out_shape else w_shape[0]
        return 0, out_elems * fan_in, fan_in, w_shape[0]
    if op == "ConvTranspose":
        group = int(node_attr(node, "group", 1))
        in_shape = shapes.get(node.input[0])
        in_elems = _static(in_shape[1:]) if in_shape else w_shape[0]
        per_in = int(np.prod(w_shape[1:]))  # each input element feeds C_out/g * k outputs
        return 1, in_elems * per_in, w_shape[0] // group, w_shape[1] * group
    if op == "Gather":  # an embedding table [rows, hidden]: a lookup, no multiply-accumulates
        return 0, 0, w_shape[1], w_shape[1]
    if op == "Gemm":
        trans_b = int(node_attr(node, "transB", 0))
        n_out, k_in = (w_shape[0], w_shape[1]) if trans_b else (w_shape[1], w_shape[0])
        return (0 if trans_b else 1), n_out * k_in, k_in, n_out
    # MatMul with a constant [K, N] (or batched) right operand
    k_in, n_out = w_shape[-2], w_shape[-1]
    rows = _static(out_shape[:-1]) if out_shape else 1
    return len(w_shape) - 1, rows * k_in * n_out, k_in, n_out


def build_block_graph(model: onnx.ModelProto, *, normalized: bool = False, inplace: bool = False) -> BlockGraph:
    """Normalise `model` (unless already done) and build its BlockGraph.

    inplace: normalise `model` itself rather than a copy (the caller gives it up): a big model's
    weights are then held once.
    """
    norm = model if normalized else normalize(model, inplace=inplace)
    analysis = analyze_channels(norm)
    shapes = tensor_shapes(norm)
    inits = {t.name: t for t in norm.graph.initializer}
    constants = set(inits)

    kernels: dict[str, Kernel] = {}
    for node in norm.graph.node:
        widx = kernel_weight_input(node, constants)
        if widx is None:
            widx = embedding_table_input(node, inits, analysis.uses)
        if widx is None:
            continue
        w = inits[node.input[widx]]
        if w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue  # already quantized or integer weights: not ours to compress
        w_shape = list(w.dims)
        bias = node.input[2] if widx == 1 and len(node.input) > 2 and node.input[2] in inits else None
        out_axis, macs, fan_in, fan_out = _kernel_geometry(node, w_shape, shapes)
        group = analysis.group_of_kernel(node.name)
        in_map = analysis.input_map(node.name)
        in_groups = tuple(dict.fromkeys(analysis.group_of_source[s.source] for s in in_map.segments)) if in_map else ()
        params = int(np.prod(w_shape)) + (int(np.prod(inits[bias].dims)) if bias else 0)
        kernels[node.name] = Kernel(
            name=node.name, op=node.op_type, weight=w.name, bias=bias, weight_shape=tuple(w_shape),
            out_axis=out_axis, params=params, macs=int(macs), fan_in=fan_in, fan_out=fan_out,
            index=len(kernels), group=None if group is None else group.id, input_groups=in_groups,
        )
    if not kernels:
        raise NothingToCompressError(
            "the model has no compressible kernel (Conv, ConvTranspose, Gemm or MatMul with a constant weight, "
            "or Gather from a constant 2-D table)")

    blocks = _derive_blocks(norm, kernels)
    for block in blocks:
        for kname in block.kernels:
            kernels[kname] = _with_block(kernels[kname], block.id)
    input_shapes = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in i.type.tensor_type.shape.dim] for i in norm.graph.input}
    return BlockGraph(
        model=norm, kernels=kernels, blocks=blocks, groups=analysis.groups, analysis=analysis,
        opset=opset_of(norm), input_shapes=input_shapes, output_names=[o.name for o in norm.graph.output],
        initializer_bytes={t.name: tensor_nbytes(t) for t in norm.graph.initializer},
        structure_bytes=_structure_bytes(norm),
    )


def with_input_dims(bg: BlockGraph, sample_shapes: Mapping[str, Sequence[int]]) -> BlockGraph:
    """`bg` with every kernel's MACs counted at one sample's input dims (the data's, or --input-shape)
    where the model leaves them symbolic; `bg.model` itself keeps its symbolic dims."""
    todo = {name: tuple(int(d) for d in dims) for name, dims in sample_shapes.items()
            if name in bg.input_shapes and len(dims) == len(bg.input_shapes[name]) - 1
            and any(not (isinstance(d, int) and d > 0) for d in bg.input_shapes[name][1:])}
    if not todo:
        return bg
    fixed = onnx.ModelProto()
    fixed.CopyFrom(bg.model)
    for inp in fixed.graph.input:
        if inp.name in todo:
            for d, value in zip(list(inp.type.tensor_type.shape.dim)[1:], todo[inp.name]):
                d.dim_value = value
    shapes = tensor_shapes(infer_shapes(fixed))
    nodes = {n.name: n for n in bg.model.graph.node}
    kernels = {name: replace(k, macs=int(_kernel_geometry(nodes[name], list(k.weight_shape), shapes)[1]))
               for name, k in bg.kernels.items()}
    return replace(bg, kernels=kernels)


def _structure_bytes(model: onnx.ModelProto) -> int:
    """Bytes the serialized model spends on everything but weight data and value_info."""
    g = model.graph
    total = sum(n.ByteSize() + 3 for n in g.node) + sum(v.ByteSize() + 3 for v in list(g.input) + list(g.output))
    total += sum(len(t.name) + 6 * len(t.dims) + 12 for t in g.initializer)
    return total + sum(o.ByteSize() + 2 for o in model.opset_import) + len(model.producer_name) + 32


def _with_block(k: Kernel, block: int) -> Kernel:
    from dataclasses import replace

    return replace(k, block=block)


def _derive_blocks(model: onnx.ModelProto, kernels: dict[str, Kernel]) -> list[Block]:
    """Cut the topological kernel order at merge points (residual Add/Sum, Concat, gating Mul).

    A merge point is a node joining two or more computed tensors; the kernels since the last one
    form a residual unit. Runs longer than MAX_BLOCK_KERNELS (plain chains such as VGG) become
    chunks of consecutive kernels.
    """
    constants = {t.name for t in model.graph.initializer}
    runs: list[list[str]] = [[]]
    for node in model.graph.node:
        if node.name in kernels:
            runs[-1].append(node.name)
        elif node.op_type in _MERGE_OPS and sum(1 for i in node.input if i and i not in constants) >= 2:
            if runs[-1]:
                runs.append([])
    runs = [r for r in runs if r]
    blocks: list[Block] = []
    for run in runs:
        kind = "residual" if len(runs) > 1 and len(run) <= MAX_BLOCK_KERNELS else "chunk"
        pieces = [run] if kind == "residual" else _chunks(run)
        for piece in pieces:
            bid = len(blocks)
            blocks.append(Block(bid, f"block{bid}", tuple(piece), kind))
    return blocks


def _chunks(run: list[str]) -> list[list[str]]:
    n = max(1, -(-len(run) // MAX_BLOCK_KERNELS))
    size = -(-len(run) // n)
    return [run[i: i + size] for i in range(0, len(run), size)]
