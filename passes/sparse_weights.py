"""Sparse weight storage: a mostly-zero initializer becomes its nonzeros and their positions, decoded in-graph.

Element-wise pruning leaves weights that are mostly zeros, but a dense initializer stores every
zero at full width. This pass rewrites an initializer X (fp32 weights, or the integers a
quantization pass stored for DequantizeLinear) as the nonzero values plus an index, and rebuilds
X with standard ops, so the consumers of X are untouched and ONNX Runtime computes with exactly
the same tensor. Rules:

  1. Values: the nonzero entries of X in row-major order, in X's own type (INT4 / UINT4 packed by
     onnx's helpers, as `passes.quantize_weights` packs them). Only entries equal to 0 are
     dropped: under an asymmetric grid the integers of a zero weight are the zero point, so such
     weights gain nothing and stay dense (rule 4).
  2. Index, one of (the smallest is chosen per initializer):
       bitmask  one bit per element of X, little-endian in uint8 [ceil(n/8), 1], and the values
                [nnz + 1] (a trailing 0, so every gather index below is in range). Decoded
                without NonZero, which ORT never constant-folds: Cast(float) -> Mul([2^-0 .. 2^-7])
                -> Floor -> Mod 2 -> Reshape [-1] -> Slice [0, n) gives the bits (float, exact:
                OpenVINO 2026.4 computes a uint8 BitShift(RIGHT) inexactly where the decode
                feeds a Gemm's weight, and a 2-bit VGG classifier then agreed with ORT on 16% of
                digits); an exclusive CumSum of the bits
                is each set bit's value index; Where(bits, Gather(values, index), 0). Suits
                moderate sparsity: n/8 bytes whatever the pattern.
       delta4,  the gap from the previous nonzero (the first one's position itself) in
       delta8   UINT4 / UINT8 [1, m] (the relative index of Han et al.'s Deep Compression), and
                the values [1, m]. A gap larger than the type holds is bridged by filler entries
                (value 0 at a position inside the gap, which is zero anyway), so m >= nnz; an
                all-zero X stores one filler. Decoded by Cast(int64) -> CumSum(axis 1) ->
                ScatterElements(axis 1) into ConstantOfShape([1, n]) zeros. Suits high sparsity.
                delta4 only in models of opset >= 21, where UINT4 exists (the pass never
                converts the model's opset).
  3. Rebuild: Reshape(X's shape), so the output keeps X's name, type and shape. The decode works
     in a type ORT computes with (bitmask: INT32 for integers; delta: INT8 / UINT8 for INT4 /
     UINT4, whose ScatterElements ORT lacks) and Casts back to X's type at the end.
  4. An initializer is rewritten only when the chosen encoding's bytes are strictly fewer than
     its dense bytes; `sparse_nbytes` counts exactly the initializers written: values and index,
     and the small decode constants (bitmask: powers float[8], modulus float[1], [-1], [0], [n]
     int64, the CumSum axis int32, the Where zero (4 bytes); delta: the CumSum axis int32 and
     [1, n] int64; both: X's shape int64). Bytes are the serialized tensor data, the unit of the
     cost model (docs/ARCHITECTURE.md, "Budgets: the storage cost").
  5. The decode needs opset 11 (ScatterElements, CumSum, Mod with fmod); sub-byte values are only
     found in opset >= 21 models. ORT constant-folds every decode when it loads the model at
     ORT_ENABLE_ALL (checked in the tests), so this is a storage format: the kernel then runs as
     the dense model's does.
  6. INT2 / UINT2 stay dense: ORT 1.32 fails to load the model at ORT_ENABLE_ALL when it
     constant-folds a Cast to INT2 ("Element type mismatch between tensor proto and
     ortvalue_initializer"), and at the densities where sparsity pays, 2-bit values gain least.

Refusals (`SparseWeightError`, a ValueError naming the initializer) for names given explicitly:
not an initializer of the main graph, a graph input or output, used by no node, a type outside
FLOAT / INT8 / UINT8 / INT4 / UINT4 / INT2 / UINT2, or a model below opset 11. With no names,
every eligible initializer is tried and the others are left alone.

New initializers are named <X>_sparse_values, <X>_sparse_mask / <X>_sparse_delta and
<X>_sparse_* for the decode constants (with a numeric suffix if the name is taken); the decoded
output keeps the name X.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from passes.ir_build import add_constant, new_node, taken_names

__all__ = [
    "DELTA4_OPSET",
    "ENCODINGS",
    "SparseEncoding",
    "SparseWeightError",
    "SparseWeightsPass",
    "choose_encoding",
    "dense_nbytes",
    "sparse_nbytes",
    "sparse_weights",
    "stored_initializer",
]

log = logging.getLogger(__name__)

ENCODINGS = ("bitmask", "delta4", "delta8")
MIN_OPSET = 11
DELTA4_OPSET = 21  # UINT4 gaps
_BITS = {TensorProto.FLOAT: 32, TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4,
         TensorProto.UINT4: 4, TensorProto.INT2: 2, TensorProto.UINT2: 2}
_SPARSE_TYPES = (TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)  # rule 6
_SCATTER_TYPE = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
_DELTA = {"delta4": (TensorProto.UINT4, 15), "delta8": (TensorProto.UINT8, 255)}  # gap type, largest gap
# decode constants in bytes (rule 4): bitmask powers of 1/2, modulus, [-1], [0], [n], CumSum axis, Where zero;
# delta CumSum axis and ConstantOfShape's [1, n]
_INDEX_CONSTANTS = {"bitmask": 32 + 4 + 8 + 8 + 8 + 4 + 4, "delta4": 4 + 16, "delta8": 4 + 16}


class SparseWeightError(ir.passes.PreconditionError, ValueError):
    """An initializer the pass refuses to store sparsely; the message names it and why."""


@dataclass(frozen=True)
class SparseEncoding:
    """What the pass would write for one initializer: the encoding (None: stays dense) and its bytes."""

    encoding: str | None
    nbytes: int
    dense_nbytes: int
    nonzeros: int


def _packed(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _type_names(types: Iterable[int]) -> str:
    return ", ".join(TensorProto.DataType.Name(t) for t in types)


def _tensor_type(array: np.ndarray, sparse: bool = True) -> int:
    """The ONNX type of `array`, refused unless the pass stores it sparsely (or, sparse=False, densely)."""
    try:
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, ValueError, TypeError):
        dtype = TensorProto.UNDEFINED
    allowed = _SPARSE_TYPES if sparse else tuple(_BITS)
    if dtype not in allowed:
        raise SparseWeightError(f"sparse storage handles {_type_names(allowed)}, not {array.dtype}")
    return dtype


def _nonzero(array: np.ndarray) -> np.ndarray:
    """Flat positions of the nonzero entries (-0.0 counts as zero: it equals the 0 the decode fills in)."""
    return np.flatnonzero(np.asarray(array).reshape(-1).astype(np.float32) != 0)


def _delta_entries(positions: np.ndarray, values: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps (first: the position itself) and values with fillers so no gap exceeds `max_gap` (rule 2)."""
    if len(positions) == 0:  # an all-zero tensor: one filler at position 0
        positions, values = np.zeros(1, np.int64), np.zeros(1, values.dtype)
    gaps = np.diff(positions, prepend=0).astype(np.int64)
    counts = np.maximum(1, -(-gaps // max_gap))
    ends = np.cumsum(counts) - 1
    deltas = np.full(int(counts.sum()), max_gap, np.int64)
    deltas[ends] = gaps - (counts - 1) * max_gap
    out_values = np.zeros(len(deltas), values.dtype)
    out_values[ends] = values
    return deltas, out_values


def dense_nbytes(array: np.ndarray) -> int:
    """Bytes of `array` stored as a dense initializer of its type (sub-byte types packed)."""
    return _packed(int(np.asarray(array).size), _BITS[_tensor_type(array, sparse=False)])


def sparse_nbytes(array: np.ndarray, encoding: str) -> int:
    """Exact bytes of every initializer the pass writes for `array` under `encoding` (rule 4)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"sparse encoding must be one of {ENCODINGS}, got {encoding!r}")
    array = np.asarray(array)
    bits = _BITS[_tensor_type(array)]
    n = int(array.size)
    positions = _nonzero(array)
    shapes = 8 * array.ndim  # the Reshape back to X's shape
    if encoding == "bitmask":
        return _packed(len(positions) + 1, bits) + -(-n // 8) + _INDEX_CONSTANTS[encoding] + shapes
    _, max_gap = _DELTA[encoding]
    deltas, _ = _delta_entries(positions, np.zeros(len(positions), np.float32), max_gap)
    index_bits = 4 if encoding == "delta4" else 8
    return _packed(len(deltas), bits) + _packed(len(deltas), index_bits) + _INDEX_CONSTANTS[encoding] + shapes


def choose_encoding(array: np.ndarray, opset: int) -> SparseEncoding:
    """The smallest encoding for `array` in a model of `opset`, or None when none is strictly smaller
    than dense (rule 4) or its type stays dense (rule 6)."""
    dense = dense_nbytes(array)
    if _tensor_type(array, sparse=False) not in _SPARSE_TYPES or opset < MIN_OPSET:
        return SparseEncoding(None, dense, dense, len(_nonzero(array)))
    usable = [e for e in ENCODINGS if e != "delta4" or opset >= DELTA4_OPSET]
    sizes = {enc: sparse_nbytes(array, enc) for enc in usable}
    best = min(sizes, key=sizes.get)
    nnz = len(_nonzero(array))
    if sizes[best] < dense:
        return SparseEncoding(best, sizes[best], dense, nnz)
    return SparseEncoding(None, dense, dense, nnz)


def stored_initializer(model: onnx.ModelProto, name: str) -> str | None:
    """The initializer holding the stored values of tensor `name`: itself, or the integers its decode reads.

    Follows the decodes `passes.quantize_weights` writes back to their stored integers:
    DequantizeLinear (input 0), Reshape / Transpose / Cast / Slice (input 0), the scale's Mul and
    the zero point's Sub (input 0), 2-bit unpacking's BitwiseAnd and BitwiseXor (input 0) and
    Gather (the codes, input 1). None when `name` is computed from anything else.
    """
    inits = {t.name for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    follow = {"DequantizeLinear": 0, "Reshape": 0, "Transpose": 0, "Cast": 0, "Slice": 0, "Mul": 0, "Sub": 0,
              "BitwiseAnd": 0, "BitwiseXor": 0, "Gather": 1}
    seen = set()
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in follow or name in seen:
            return None
        seen.add(name)
        name = node.input[follow[node.op_type]]
    return name


class SparseWeightsPass(ir.passes.InPlacePass):
    """Store the named initializers (None: every eligible one) sparsely where smaller; see the module docstring."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.names = None if names is None else list(dict.fromkeys(names))
        self.chosen: dict[str, SparseEncoding] = {}

    def requires(self, model: ir.Model) -> None:
        if self.names is None:
            return
        opset = model.opset_imports.get("", 1)
        for name in self.names:
            value = model.graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise SparseWeightError(f"initializer {name!r}: no initializer of that name in the main graph")
            if value.is_graph_input() or value.is_graph_output():
                raise SparseWeightError(f"initializer {name!r}: is a graph input or output, so it cannot be rewritten")
            if not list(value.uses()):
                raise SparseWeightError(f"initializer {name!r}: not used by any node")
            if value.const_value.dtype.value not in _BITS:
                raise SparseWeightError(f"initializer {name!r}: type {value.const_value.dtype.name} cannot be stored "
                                        f"sparsely (supported: {_type_names(_BITS)})")
            if opset < MIN_OPSET:
                raise SparseWeightError(f"initializer {name!r}: the decode needs opset >= {MIN_OPSET}, the model has "
                                        f"{opset}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = self.names if self.names is not None else [n for n, v in graph.initializers.items()
                                                           if self._eligible(model, v)]
        taken = taken_names(graph)
        opset = model.opset_imports.get("", 1)
        self.chosen = {}
        for name in names:
            old = graph.initializers[name]
            array = old.const_value.numpy()
            plan = choose_encoding(array, opset)
            if plan.encoding is None:
                log.debug("%s stays dense (%d bytes; %d of %d nonzero)", name, plan.dense_nbytes, plan.nonzeros,
                          array.size)
                continue
            nodes, out = _decode(graph, name, array, plan.encoding, taken)
            out.type, out.shape = old.type, old.shape
            ir.convenience.replace_all_uses_with(old, out)
            graph.initializers.pop(name)
            out.name = name
            graph.insert_before(graph[0], nodes)
            self.chosen[name] = plan
            log.debug("%s stored %s: %d -> %d bytes", name, plan.encoding, plan.dense_nbytes, plan.nbytes)
        return ir.passes.PassResult(model, bool(self.chosen))

    def ensures(self, model: ir.Model) -> None:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)

    @staticmethod
    def _eligible(model: ir.Model, value: ir.Value) -> bool:
        return (value.const_value is not None and value.const_value.dtype.value in _BITS
                and not value.is_graph_input() and not value.is_graph_output() and bool(list(value.uses()))
                and model.opset_imports.get("", 1) >= MIN_OPSET)


def _decode(graph: ir.Graph, name: str, array: np.ndarray, encoding: str,
            taken: set[str]) -> tuple[list[ir.Node], ir.Value]:
    """Write values + index for `array` and the nodes rebuilding it (rules 1-3); returns (nodes, output)."""
    dtype = _tensor_type(array)
    flat = array.reshape(-1)
    positions = _nonzero(array)
    base = f"{name}_sparse"
    if encoding == "bitmask":
        work = TensorProto.FLOAT if dtype == TensorProto.FLOAT else TensorProto.INT32
        nodes = _bitmask_nodes(graph, taken, base, flat, positions, work)
    else:
        work = _SCATTER_TYPE.get(dtype, dtype)
        nodes = _delta_nodes(graph, taken, base, flat, positions, encoding, work)
    shape = add_constant(graph, taken, f"{base}_shape", np.array(array.shape, np.int64))
    nodes.append(new_node(taken, base, "Reshape", [nodes[-1].outputs[0], shape]))
    if work != dtype:
        nodes.append(new_node(taken, base, "Cast", [nodes[-1].outputs[0]], to=ir.DataType(dtype)))
    return nodes, nodes[-1].outputs[0]


def _values(graph: ir.Graph, taken: set[str], base: str, values: np.ndarray, shape: tuple[int, ...],
            work: int) -> tuple[list[ir.Node], ir.Value]:
    """The values initializer (X's type) and, when the decode works in another type, a Cast to it."""
    value = add_constant(graph, taken, f"{base}_values", np.ascontiguousarray(values.reshape(shape)))
    if value.const_value.dtype.value == work:
        return [], value
    cast = new_node(taken, base, "Cast", [value], to=ir.DataType(work))
    return [cast], cast.outputs[0]


def _bitmask_nodes(graph: ir.Graph, taken: set[str], base: str, flat: np.ndarray, positions: np.ndarray,
                   work: int) -> list[ir.Node]:
    """Rule 2, bitmask: flat X [n] in type `work`, by bits -> exclusive CumSum -> Gather -> Where."""
    n = flat.size
    bits = np.zeros(-(-n // 8) * 8, np.uint8)
    bits[positions] = 1
    mask = add_constant(graph, taken, f"{base}_mask", np.packbits(bits, bitorder="little").reshape(-1, 1))
    powers = add_constant(graph, taken, f"{base}_powers", (0.5 ** np.arange(8)).astype(np.float32))
    two = add_constant(graph, taken, f"{base}_two", np.array([2.0], np.float32))
    minus_one = add_constant(graph, taken, f"{base}_flat", np.array([-1], np.int64))
    start = add_constant(graph, taken, f"{base}_start", np.array([0], np.int64))
    end = add_constant(graph, taken, f"{base}_end", np.array([n], np.int64))
    axis = add_constant(graph, taken, f"{base}_axis", np.array(0, np.int32))
    zero = add_constant(graph, taken, f"{base}_zero", np.zeros((), helper.tensor_dtype_to_np_dtype(work)))
    nodes = [new_node(taken, base, "Cast", [mask], to=ir.DataType.FLOAT)]
    nodes.append(new_node(taken, base, "Mul", [nodes[-1].outputs[0], powers]))
    nodes.append(new_node(taken, base, "Floor", [nodes[-1].outputs[0]]))
    nodes.append(new_node(taken, base, "Mod", [nodes[-1].outputs[0], two], fmod=1))
    nodes.append(new_node(taken, base, "Reshape", [nodes[-1].outputs[0], minus_one]))
    nodes.append(new_node(taken, base, "Slice", [nodes[-1].outputs[0], start, end]))
    bit = nodes[-1].outputs[0]
    nodes.append(new_node(taken, base, "Cast", [bit], to=ir.DataType.INT32))
    nodes.append(new_node(taken, base, "CumSum", [nodes[-1].outputs[0], axis], exclusive=1))
    index = nodes[-1].outputs[0]
    cast, values = _values(graph, taken, base, np.append(flat[positions], np.zeros(1, flat.dtype)), (-1,), work)
    nodes += cast
    nodes.append(new_node(taken, base, "Gather", [values, index], axis=0))
    gathered = nodes[-1].outputs[0]
    nodes.append(new_node(taken, base, "Cast", [bit], to=ir.DataType.BOOL))
    nodes.append(new_node(taken, base, "Where", [nodes[-1].outputs[0], gathered, zero]))
    return nodes


def _delta_nodes(graph: ir.Graph, taken: set[str], base: str, flat: np.ndarray, positions: np.ndarray,
                 encoding: str, work: int) -> list[ir.Node]:
    """Rule 2, delta: flat X [1, n] in type `work`, by CumSum of gaps -> ScatterElements into zeros."""
    container, max_gap = _DELTA[encoding]
    deltas, values = _delta_entries(positions, flat[positions], max_gap)
    delta = add_constant(graph, taken, f"{base}_delta",
                      deltas.astype(helper.tensor_dtype_to_np_dtype(container)).reshape(1, -1))
    axis = add_constant(graph, taken, f"{base}_axis", np.array(1, np.int32))
    size = add_constant(graph, taken, f"{base}_size", np.array([1, flat.size], np.int64))
    nodes = [new_node(taken, base, "Cast", [delta], to=ir.DataType.INT64)]
    nodes.append(new_node(taken, base, "CumSum", [nodes[-1].outputs[0], axis]))
    positions_value = nodes[-1].outputs[0]
    cast, vals = _values(graph, taken, base, values, (1, -1), work)
    nodes += cast
    zero = ir.tensor(np.zeros(1, helper.tensor_dtype_to_np_dtype(work)), name="value")
    nodes.append(new_node(taken, base, "ConstantOfShape", [size], value=zero))
    nodes.append(new_node(taken, base, "ScatterElements", [nodes[-1].outputs[0], positions_value, vals], axis=1))
    return nodes


def sparse_weights(model: onnx.ModelProto, names: Sequence[str] | None = None) -> onnx.ModelProto:
    """Return a copy of `model` with the named initializers (None: all eligible) stored sparsely where smaller."""
    ir_model = ir.from_proto(model)
    SparseWeightsPass(names)(ir_model)
    return ir.to_proto(ir_model)
