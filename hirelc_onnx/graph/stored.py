"""What a model file stores for each kernel weight: its encoding and its true bytes, read from the file.

`inspect` of a compressed model needs this: once normalised, a weight decoded in-graph (Cast -> Sub
-> Mul, DequantizeLinear, a codebook Gather, a sparse index) is folded back into fp32, so the
BlockGraph's sizes are those of the decoded weights. Here the raw file is read as written: per
kernel node, the initializers its weight is computed from (data, scales, zero points, decode
operands; counted by `passes.storage.tensor_nbytes`, the project's one byte counter), the stored
integer type, how many bits its values use, the grid's granularity, and whether the data are 2-bit
packed or sparse. The file's needs (opset, IR version, element types) come with it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from passes.storage import initializer_nbytes, tensor_nbytes

__all__ = ["StoredKernel", "StoredModel", "stored_model", "KERNEL_OPS", "weight_input"]

# ops that hold a weight, as written (quantized ops included)
KERNEL_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "QLinearConv", "QLinearMatMul",
                        "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm", "GatherBlockQuantized"})
_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_SPARSE_OPS = frozenset({"ScatterElements", "CumSum"})
# element types that need a recent opset (and IR version) to be stored at all
_TYPE_OPSET = {TensorProto.INT4: 21, TensorProto.UINT4: 21, TensorProto.INT2: 25, TensorProto.UINT2: 25,
               TensorProto.FLOAT4E2M1: 23}
_OP_OPSET = {"BitwiseAnd": 18, "BitwiseXor": 18, "BitwiseOr": 18}


@dataclass(frozen=True)
class StoredKernel:
    """One kernel weight as the file stores it."""

    node: str  # the kernel node's name
    op: str
    weight: str  # the tensor the kernel reads as its weight
    encoding: str  # "fp32", "int4", "int8", "2-bit packed in uint8", "uint4 codebook" ...
    bits: int | None  # bits the stored values use (fp32: 32); None when the data are not loaded
    granularity: str | None  # per-tensor, per-channel, "per-group N" (N weights per scale), log2; None for fp32
    decode: str  # "none", "folded at load (Cast/Mul ...)", "DequantizeLinear", "quantized op <op>"
    packed: bool  # 2-bit values four to a byte
    sparse: bool  # nonzeros and their positions, rebuilt in-graph
    bytes: int  # every initializer the weight is computed from (data, scales, zero points, decode operands)
    elements: int | None  # weights held (the decoded weight's element count), when known

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StoredModel:
    """A model file's kernels as stored, and what the file needs of a runtime."""

    kernels: list[StoredKernel]
    weight_bytes: int  # every initializer of the main graph (the budget's denominator)
    opset: int  # the default-domain opset the file declares
    ir_version: int
    element_types: list[str]  # every element type its initializers, casts, inputs and outputs use
    needs: list[str]  # why the opset / IR version is what it is ("INT4 initializers: opset >= 21")

    @property
    def compressed(self) -> bool:
        """True when some kernel weight is stored other than as a plain float tensor."""
        return any(k.encoding != "fp32" for k in self.kernels)

    def as_dict(self) -> dict:
        return {"compressed": self.compressed, "weight_bytes": self.weight_bytes, "opset": self.opset,
                "ir_version": self.ir_version, "element_types": self.element_types, "needs": self.needs,
                "kernels": [k.as_dict() for k in self.kernels]}


def stored_model(model: onnx.ModelProto) -> StoredModel:
    """Read `model` (as loaded from its file, not normalised) kernel by kernel; never modifies it."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    constant = set(inits)  # tensors computed from initializers only (graph nodes are topologically sorted)
    for node in model.graph.node:
        if all(i in constant for i in node.input if i):
            constant.update(node.output)
    kernels = []
    for node in model.graph.node:
        if node.op_type not in KERNEL_OPS:
            continue
        weight = weight_input(node)
        if not weight or weight not in constant or all(i in constant for i in node.input if i):
            continue  # no stored weight, or a node of a weight's decode (a codebook Gather): not a kernel
        try:
            row = _kernel(node, weight, inits, producers)
        except (ValueError, TypeError, KeyError, IndexError, StopIteration):  # a decode this reader does not know
            row = StoredKernel(node.name, node.op_type, weight, "unknown", None, None, "not recognised", False, False,
                               0, None)
        if row is not None:
            kernels.append(row)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = _element_types(model)
    return StoredModel(kernels, initializer_nbytes(model), opset, model.ir_version,
                       sorted(TensorProto.DataType.Name(t) for t in types), _needs(model, types))


def weight_input(node: onnx.NodeProto) -> str | None:
    """The input of a (possibly rewritten) kernel node that carries its weight."""
    if node.op_type in ("Gather", "GatherBlockQuantized"):
        return node.input[0] if node.input else None
    if node.op_type in ("QLinearConv", "QLinearMatMul"):
        return node.input[3] if len(node.input) > 3 else None
    return node.input[1] if len(node.input) > 1 else None


def _decode_of(name: str, inits: dict, producers: dict) -> tuple[list[onnx.NodeProto], list[str]] | None:
    """The nodes (producer first) and initializers `name` is computed from, or None when a graph
    input reaches it (callers ask only for tensors computed from initializers)."""
    nodes, leaves, seen, stack = [], [], set(), [name]
    while stack:
        t = stack.pop()
        if t in seen or t == "":
            continue
        seen.add(t)
        if t in inits:
            leaves.append(t)
            continue
        node = producers.get(t)
        if node is None:  # a graph input or a value the graph computes from one
            return None
        nodes.append(node)
        stack.extend(node.input)
    return nodes[::-1], leaves


def _kernel(node: onnx.NodeProto, weight: str, inits: dict, producers: dict) -> StoredKernel | None:
    if weight in inits:  # stored as it is used
        t = inits[weight]
        elements = math.prod(t.dims)
        if t.data_type in _FLOATS:
            fp32 = t.data_type == TensorProto.FLOAT
            return StoredKernel(node.name, node.op_type, weight,
                                "fp32" if fp32 else TensorProto.DataType.Name(t.data_type).lower(),
                                32 if fp32 else 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize,
                                None, "none", False, False, tensor_nbytes(t), elements)
        scales = [inits[i] for i in node.input if i in inits and inits[i].data_type in _FLOATS]
        return StoredKernel(node.name, node.op_type, weight, TensorProto.DataType.Name(t.data_type).lower(),
                            _bits_used(t), _granularity(elements, t.dims, scales[0] if scales else None, None),
                            f"quantized op {node.op_type}", False, False,
                            tensor_nbytes(t) + sum(tensor_nbytes(s) for s in scales), elements)
    found = _decode_of(weight, inits, producers)
    if found is None:
        return None
    nodes, leaves = found
    ops = {n.op_type for n in nodes}
    nbytes = sum(tensor_nbytes(inits[name]) for name in leaves)
    sparse = bool(ops & _SPARSE_OPS)  # passes/sparse_weights.py: nonzeros and an index, rebuilt in-graph
    packed = "BitwiseAnd" in ops and not sparse
    codebook = "Gather" in ops and not sparse  # a sparse bitmask decode gathers values too
    dq = next((n for n in nodes if n.op_type == "DequantizeLinear"), None)
    data = _data_tensor(nodes, leaves, inits, dq, sparse)
    if data is None:  # only float operands: a float weight computed in-graph (a Cast from fp16, a Transpose ...)
        floats = [inits[n] for n in leaves if inits[n].data_type in _FLOATS]
        biggest = max(floats, key=lambda t: math.prod(t.dims)) if floats else None
        kind = "fp32" if biggest is None or biggest.data_type == TensorProto.FLOAT else \
            TensorProto.DataType.Name(biggest.data_type).lower()
        return StoredKernel(node.name, node.op_type, weight, kind, 32 if kind == "fp32" else None, None,
                            "computed in-graph", False, False, nbytes, None)
    container = TensorProto.DataType.Name(data.data_type).lower()
    elements = _decoded_elements(nodes, leaves, inits, data, packed)
    granularity = None
    if data.data_type in _FLOATS:  # sparse float values
        encoding, bits = ("fp32" if data.data_type == TensorProto.FLOAT else container), 32
    elif packed:
        encoding, bits = f"2-bit packed in {container}", 2
    else:
        encoding, bits = container, _bits_used(data)
    if codebook:
        book = next(inits[n.input[0]] for n in nodes if n.op_type == "Gather" and n.input[0] in inits)
        encoding, granularity = f"{container} codebook", "log2"
        bits = max(1, math.ceil(math.log2(math.prod(book.dims) + 1)))
    elif data.data_type not in _FLOATS:
        scale = _scale(nodes, inits, dq)
        granularity = _granularity(elements, None, scale, _group_size(nodes, inits, dq, data))
    if sparse:
        density = f", {math.prod(data.dims) / elements:.0%} of values stored" if elements else ""
        encoding = f"sparse {encoding}{density}"
    decode = "DequantizeLinear" if dq is not None else \
        "folded at load (" + " -> ".join(dict.fromkeys(n.op_type for n in nodes)) + ")"
    return StoredKernel(node.name, node.op_type, weight, encoding, bits, granularity, decode, packed, sparse, nbytes,
                        elements)


def _data_tensor(nodes, leaves, inits, dq, sparse: bool) -> onnx.TensorProto | None:
    """The initializer holding the weight's values: a sparse decode's values, DequantizeLinear's
    first input, else the largest integer initializer among the leaves (None: only floats)."""
    if sparse:
        values = [inits[n] for n in leaves if n.endswith("_sparse_values")]
        if values:
            return values[0]
    if dq is not None and dq.input[0] in inits:
        return inits[dq.input[0]]
    ints = [inits[n] for n in leaves if inits[n].data_type not in _FLOATS and inits[n].data_type != TensorProto.INT64]
    return max(ints, key=lambda t: math.prod(t.dims)) if ints else None


def _decoded_elements(nodes, leaves, inits, data, packed: bool) -> int | None:
    """Weights the decode yields: the last Reshape's shape when it has one, else the data's count."""
    for n in reversed(nodes):
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in inits:
            dims = numpy_helper.to_array(inits[n.input[1]]).tolist()
            if all(d > 0 for d in dims):
                return math.prod(dims)
            break
    count = math.prod(data.dims)
    return count * 4 if packed else count


def _scale(nodes, inits, dq) -> onnx.TensorProto | None:
    """The grid's scale: DequantizeLinear's second input, else the float operand of the last Mul
    (or of the Expand that spreads per-group scales)."""
    if dq is not None:
        return inits.get(dq.input[1]) if len(dq.input) > 1 else None
    for n in reversed(nodes):
        if n.op_type in ("Mul", "Expand"):
            floats = [inits[i] for i in n.input if i in inits and inits[i].data_type in _FLOATS]
            if floats:
                return max(floats, key=lambda t: math.prod(t.dims))
    return None


def _group_size(nodes, inits, dq, data) -> int | None:
    """Weights per scale along the fan-in of a per-group grid, from the file."""
    if dq is not None:
        size = next((a.i for a in dq.attribute if a.name == "block_size"), 0)
        return size or None
    expand = next((n for n in nodes if n.op_type == "Expand" and len(n.input) > 1 and n.input[1] in inits), None)
    if expand is not None:
        return int(max(numpy_helper.to_array(inits[expand.input[1]]).tolist()))
    return int(data.dims[-1]) if len(data.dims) == 3 else None


def _granularity(elements: int | None, dims, scale: onnx.TensorProto | None, group: int | None) -> str | None:
    if scale is None:
        return None
    n = math.prod(scale.dims)
    if n <= 1:
        return "per-tensor"
    if group is not None or (elements is not None and dims is not None and n > max(dims)):
        size = group or (elements // n if elements else None)
        return f"per-group {size}" if size else "per-group"
    return "per-channel"


def _bits_used(t: onnx.TensorProto) -> int | None:
    """Bits the stored integers need: the smallest signed / unsigned width that holds all of them."""
    if not t.raw_data and t.data_location == TensorProto.EXTERNAL:
        return None  # not read (a shell): the container's width is all that is known
    try:
        values = numpy_helper.to_array(t).astype(np.int64)
    except Exception:  # a type numpy cannot hold: say nothing rather than guess
        return None
    if values.size == 0:
        return None
    lo, hi = int(values.min()), int(values.max())
    signed = t.data_type in (TensorProto.INT8, TensorProto.INT4, TensorProto.INT2, TensorProto.INT16,
                             TensorProto.INT32)
    if signed:
        return max(1 + max(hi, 0).bit_length(), 1 + max(-lo - 1, 0).bit_length(), 2)
    return max(hi.bit_length(), 1)


def _element_types(model: onnx.ModelProto) -> set[int]:
    types = {t.data_type for t in model.graph.initializer}
    for v in list(model.graph.input) + list(model.graph.output):
        if v.type.HasField("tensor_type"):
            types.add(v.type.tensor_type.elem_type)
    for n in model.graph.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to":
                types.add(a.i)
    types.discard(TensorProto.UNDEFINED)
    return types


def _needs(model: onnx.ModelProto, types: set[int]) -> list[str]:
    """What sets the file's minimum opset: sub-byte element types and recent ops."""
    needs = [f"{TensorProto.DataType.Name(t)} tensors: opset >= {v}" for t, v in sorted(_TYPE_OPSET.items())
             if t in types]
    ops = {n.op_type for n in model.graph.node}
    needs += [f"{op}: opset >= {v}" for op, v in sorted(_OP_OPSET.items()) if op in ops]
    blocked = any(a.name == "block_size" and a.i for n in model.graph.node if n.op_type == "DequantizeLinear"
                  for a in n.attribute)
    if blocked:
        needs.append("blocked DequantizeLinear: opset >= 21")
    return needs
