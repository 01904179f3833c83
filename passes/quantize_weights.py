"""Weight quantization pass: fp32 weight initializers become stored integers plus an in-graph decode.

Every named weight W is replaced by the integers `passes.quantize.quantize(W, spec)` computes
(bit for bit) and a short decode whose output keeps the name W, so its consumer is untouched and
computes with exactly `fake_quantize(W, spec)`. The encoding depends on the deployment target:

  1. storage, uniform grids (per-tensor, per-channel, per-group): the integers go into the
     smallest container that holds the grid: 2 bits packed four to a uint8 byte (rule 3), INT4 /
     UINT4 for 3-4 bits (opset 21), INT8 / UINT8 for 5-8 bits; signed for symmetric grids,
     unsigned for asymmetric ones. Decode: Cast(float) -> Sub(zero point, asymmetric only) ->
     Mul(scale), the scale shaped to broadcast along the output axis (per-tensor: a scalar).
     This is plain arithmetic on constants, which a default ONNX Runtime session folds into an
     fp32 weight at load, so the kernel runs at fp32 speed; ORT never folds a DequantizeLinear
     of a constant (it keeps it for QDQ fusion) and would dequantize every weight on every run.
     The zero point is stored like the integers (packed, INT4 or 8-bit) in the scale's shape
     and Cast to float, except per-tensor, where it is one float32. A signed 2-bit grid
     {-1, 0, 1} is stored in two's complement (q & 3: a zero weight is a 0 field, so sparse
     storage still finds its zeros); the decode first flips each field's sign bit (BitwiseXor
     0b10101010: q + 2 in 0..3) and subtracts a float32 2 instead of a zero point.
  2. storage, log2 with 3-8 bits: the codes (see `passes.quantize`) go into INT4 (3-4 bits) or
     INT8; decode is Cast(codes -> int32) -> Gather(float32 codebook) -> Mul(per-channel scale,
     shaped to broadcast along the output axis). ONNX's Gather takes neither int4 data nor int8
     indices, hence the Cast. log2 with 2 bits has the levels {0, +-s} of the symmetric 2-bit
     grid and is stored as rule 1 stores that grid.
  3. storage, 2-bit packing: the stored values (rule 1), in the decode's layout flattened in C
     order, go four to a byte, value i of byte j at bits 2i..2i+1 (the order of ONNX's own
     sub-byte types), in a uint8 [ceil(n / 4), 1] initializer; unpacked by BitwiseAnd(uint8
     [3, 12, 48, 192]) -> Cast(float) -> Mul([1, 1/4, 1/16, 1/64], exact) -> Reshape(the
     layout) (when n is not a multiple of 4: Reshape([-1]) -> Slice([0], [n]) before it).
     ONNX's INT2 / UINT2 (opset 25) would need no unpacking, but OpenVINO refuses them, and
     OpenVINO 2026.4 rounds a uint8 BitShift(RIGHT) or Div (150 >> 2 gives 38): BitwiseAnd
     (opset 18) and float multiplies by powers of two are exact everywhere, and ORT folds them.
     Where the unpacking's small operands cost more than the n/4 bytes packing saves (weights of
     fewer than about 230 values), the 2-bit grid goes into INT4 / UINT4 instead, decoded as a
     3-4-bit grid is (`passes.weight_encoding` decides, by the exact bytes), so lowering a
     weight's bits never costs bytes.
  4. per-group layout (any target): a 2-D weight is stored in its own layout and blocked along
     its fan-in axis (1 - axis); any other weight is stored as to_2d(q, axis) = [O, fan_in],
     blocked along axis 1, then Reshape(to the axis-first shape) and, when axis != 0, Transpose
     back to the original layout. The Reshape's shape is an int64 initializer. Under storage,
     when the blocks tile the fan-in exactly (or there is one block), the integers are decoded
     in the blocked layout [O, n_blocks, G] ([n_blocks, G, O] for axis 1) with scale and zero
     point [O, n_blocks, 1] ([n_blocks, 1, O]), then Reshape to the 2-D layout (or straight to
     the axis-first shape); otherwise the integers stay [O, fan_in] and the scale and zero
     point are spread over the fan-in: Expand([1, 1, G]) -> Reshape([O, n_blocks * G]) ->
     Slice(axis 1, [0, fan_in)) (the transposed shapes for axis 1).
  5. ort-cpu and qdq, uniform grids: the integers go into 8-bit containers (INT8 symmetric,
     UINT8 asymmetric; a sub-8-bit grid keeps its value range), with a zero point always stored,
     decoded by DequantizeLinear (opset 13, per-channel via `axis`): the standard QDQ weight
     pattern ORT fuses with activation QDQ into QLinearConv / QGemm. Per-group uses a blocked
     8-bit DequantizeLinear (opset 21, rule 4's layout), which ORT runs but never fuses into an
     integer kernel.
  6. ort-cpu and qdq, log2 with bits <= 4: the levels +-s * 2^-k (k <= 6) are exactly the int8
     values +-2^(kmax - k) <= 64 times the per-channel scale s * 2^-kmax, so they are stored as
     an int8 per-channel DequantizeLinear (zero point 0): exact and fusable. log2 with 5-8 bits
     cannot be an 8-bit uniform grid: INT8 codes with the Cast/Gather/Mul decode of rule 2 (the
     kernel then runs in fp32).
  7. The targets ort-cpu and qdq write the same weights; they differ in what the caller adds.
     For ort-cpu, prefer `passes.quantize_activations(fp32_model, ..., weight_grids=specs)`,
     which stores the same integers. Running ORT's quantizer on this pass's output works only
     for single-DequantizeLinear decodes (ORT keeps them and matches the bias scale); measured
     with ORT 1.32, it crashes on a per-group decode and silently re-quantizes a 5-8-bit log2
     decode after constant-folding it.
  8. The default-domain opset is raised to the highest opset any chosen encoding needs (never
     lowered): storage 11 (Slice with inputs, Gather with negative indices), 18 for packed 2-bit
     (BitwiseAnd), 21 for INT4 / UINT4; ort-cpu / qdq 13, 21 for blocked. It is
     converted with onnxscript's version converter (onnx's C converter as fallback), and the IR
     version raised to the minimum that opset requires.

New initializers holding a weight's values are named <W>_quantized, <W>_scale, <W>_zero_point,
<W>_codebook (ort-cpu / qdq also <W>_shape), with a numeric suffix if the name is taken; the
decode's output keeps the name W. The storage decode's intermediate values, nodes and small
operands get short names instead (see `_StorageDecode`).

Refusals (`WeightQuantError`, a ValueError naming the initializer): a name that is not an
initializer, a weight that is not float32 (already quantized, or not a weight), a weight that is
a graph input or output, used by no node or by more than one use (quantize per-consumer copies:
`passes.normalize` unshares kernel weights), or already feeding QuantizeLinear/DequantizeLinear,
and an axis the weight does not have.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from passes.clip_weights import mse_clipped
from passes.ir_build import add_constant, fresh_name, new_node, taken_names
from passes.quantize import QuantizedWeight, WeightQuantSpec, quantize, to_2d
from passes.weight_encoding import TARGETS, Encoding, StorageLayout, encoding, storage_layout

__all__ = [
    "TARGETS",
    "Encoding",
    "QuantizeWeightsPass",
    "WeightQuantError",
    "StorageLayout",
    "StoredWeight",
    "encoding",
    "quantize_weights",
    "storage_layout",
    "stored_tensors",
]

log = logging.getLogger(__name__)

_PACK_MASKS = np.array([3, 12, 48, 192], np.uint8)  # rule 3: value i of a byte sits at bits 2i..2i+1
_PACK_UNSHIFT = np.array([1, 1 / 4, 1 / 16, 1 / 64], np.float32)  # exact powers of two
_PACK_SIGN_FLIP = np.array(0b10101010, np.uint8)  # rule 1: two's complement fields -> q + 2
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


class WeightQuantError(ir.passes.PreconditionError, ValueError):
    """A weight the pass refuses to quantize; the message names the initializer and why."""


@dataclass(frozen=True, eq=False)
class StoredWeight:
    """The tensors the pass writes for one weight, as written (dtype and shape of the initializers).

    q: the integers (INT4 / UINT4 as ml_dtypes, 2-bit packed as uint8 [ceil(n / 4), 1]). scale:
    DequantizeLinear's scale, or the storage decode's Mul operand (shaped to broadcast).
    zero_point: the zero point as stored, None where the encoding stores none.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None


def _np_type(onnx_type: int) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(onnx_type)  # ml_dtypes for sub-byte types


def _pack2(values: np.ndarray) -> np.ndarray:
    """Rule 3: values in 0..3, flattened in C order, four to a byte -> uint8 [ceil(n / 4), 1]."""
    flat = np.zeros(-(-values.size // 4) * 4, np.uint8)
    flat[: values.size] = values.reshape(-1)
    lanes = flat.reshape(-1, 4)
    return (lanes[:, 0] | lanes[:, 1] << 2 | lanes[:, 2] << 4 | lanes[:, 3] << 6).reshape(-1, 1)


def _stored_ints(values: np.ndarray, enc: Encoding, shape: tuple[int, ...]) -> np.ndarray:
    values = values.reshape(shape)
    return _pack2(values) if enc.packed else values.astype(_np_type(enc.container))


def _storage_tensors(qw: QuantizedWeight, enc: Encoding) -> StoredWeight:
    spec, layout = qw.spec, storage_layout(qw.shape, qw.spec)
    q, scale, zp = qw.q, qw.scale, qw.zero_point
    if spec.granularity == "per-group":
        if len(qw.shape) != 2:
            q = to_2d(q, spec.axis)
        if len(qw.shape) == 2 and spec.axis == 1:
            scale, zp = scale.T, None if zp is None else zp.T
    if enc.packed and enc.offset:
        q = np.bitwise_and(q, 3)  # two's complement in 2 bits (rule 1)
    scale = np.ascontiguousarray(scale, np.float32).reshape(layout.params)
    if zp is not None:
        zp = (zp.astype(np.float32).reshape(()) if not layout.params
              else _stored_ints(np.ascontiguousarray(zp), enc, layout.params))
    return StoredWeight(_stored_ints(np.ascontiguousarray(q), enc, layout.view), scale, zp)


def stored_tensors(qw: QuantizedWeight, target: str) -> StoredWeight:
    """What the pass stores for `qw` under `target` (rules 1-6 of the module docstring)."""
    spec, enc = qw.spec, encoding(qw.spec, target, qw.shape)
    if target == "storage":
        return _storage_tensors(qw, enc)
    q, scale, zp = qw.q, qw.scale, qw.zero_point
    if enc.log2_as_int8:
        q = np.sign(q) * np.left_shift(1, np.maximum(np.abs(q) - 1, 0))
        scale = (scale * np.float32(2.0 ** -(2 ** (spec.bits - 1) - 2))).astype(np.float32)
    elif enc.decode == "codebook":
        scale = scale.reshape((-1,) + (1,) * (len(qw.shape) - 1 - spec.axis))
    elif enc.blocked and len(qw.shape) == 2 and spec.axis == 1:
        scale = np.ascontiguousarray(scale.T)
        zp = None if zp is None else np.ascontiguousarray(zp.T)
    if enc.blocked and len(qw.shape) != 2:
        q = to_2d(q, spec.axis)
    if enc.zero_point and zp is None:
        zp = np.zeros(scale.shape, np.int32)
    np_int = _np_type(enc.container)
    return StoredWeight(q.astype(np_int), scale, zp.astype(np_int) if enc.zero_point else None)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace each named float32 weight initializer by stored integers + decode (module docstring)."""

    def __init__(self, specs: Mapping[str, WeightQuantSpec], target: str = "storage",
                 clip: Collection[str] = ()) -> None:
        """clip: weights whose range is clipped before they are quantized (`passes.clip_weights`)."""
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"QuantizeWeightsPass: target must be one of {TARGETS}, got {target!r}")
        self.specs = dict(specs)
        self.target = target
        self.clip = frozenset(clip)

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        for name, spec in self.specs.items():
            if not isinstance(spec, WeightQuantSpec):
                raise WeightQuantError(f"weight {name!r}: expected a WeightQuantSpec, got {type(spec).__name__}")
            value = graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise WeightQuantError(f"weight {name!r}: no initializer of that name in the main graph")
            dtype = value.const_value.dtype
            if dtype != ir.DataType.FLOAT:
                raise WeightQuantError(
                    f"weight {name!r}: stored as {dtype.name}, not FLOAT: already quantized or not a float weight"
                )
            if value.is_graph_input() or value.is_graph_output():
                raise WeightQuantError(f"weight {name!r}: is a graph input or output, so it cannot be rewritten")
            uses = list(value.uses())
            if not uses:
                raise WeightQuantError(f"weight {name!r}: not used by any node")
            if len(uses) > 1:
                users = sorted({u.node.name or u.node.op_type for u in uses})
                raise WeightQuantError(
                    f"weight {name!r}: shared by {len(uses)} uses ({', '.join(users)}); quantize per-consumer "
                    "copies instead (passes.normalize unshares kernel weights)"
                )
            user = uses[0].node
            if user.domain in ("", "ai.onnx") and user.op_type in _QDQ_OPS:
                raise WeightQuantError(f"weight {name!r}: already quantized (feeds {user.op_type} {user.name!r})")
            shape = value.const_value.shape
            if len(shape) == 0 or (spec.granularity != "per-tensor" and spec.axis >= len(shape)):
                raise WeightQuantError(
                    f"weight {name!r}: shape {tuple(shape)} has no output-channel axis {spec.axis}"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.specs:
            return ir.passes.PassResult(model, False)
        shapes = {name: tuple(model.graph.initializers[name].const_value.shape) for name in self.specs}
        self._raise_opset(model, max(encoding(s, self.target, shapes[n]).opset for n, s in self.specs.items()))
        graph = model.graph  # after the version converter
        taken = taken_names(graph)
        for name, spec in self.specs.items():
            old = graph.initializers[name]
            weight = old.const_value.numpy()
            if name in self.clip:
                weight = mse_clipped(weight, spec)
            qw = quantize(weight, spec)
            enc = encoding(spec, self.target, qw.shape)
            if self.target == "storage":
                nodes, out = _StorageDecode(graph, name, taken).build(qw, enc)
            else:
                nodes, out = _dq_decode(graph, name, qw, enc, self.target, taken)
            out.type = old.type
            out.shape = old.shape
            ir.convenience.replace_all_uses_with(old, out)
            graph.initializers.pop(name)
            out.name = name
            graph.insert_before(graph[0], nodes)
            log.debug("quantized %s: %s, %s", name, spec, self.target)
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)

    @staticmethod
    def _raise_opset(model: ir.Model, needed: int) -> None:
        current = model.opset_imports.get("", 1)
        if needed > current:
            # onnxscript takes ~0.3 s to import; only a model below the encodings' opset needs it
            from onnxscript.version_converter import ConvertVersionPass

            converter_log = logging.getLogger("onnxscript.version_converter")
            converter_log.addFilter(_quiet_handover)
            try:
                ConvertVersionPass(needed, fallback=True)(model)
            finally:
                converter_log.removeFilter(_quiet_handover)
            if model.opset_imports.get("", 1) != needed:
                raise ValueError(
                    f"quantize_weights: could not convert the model from opset {current} to {needed}, "
                    "which the chosen weight encodings need"
                )
        opset = model.opset_imports[""]
        needed_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
        model.ir_version = max(model.ir_version, needed_ir)


def _quiet_handover(record: logging.LogRecord) -> bool:
    """Drop onnxscript's notice that it hands a pre-18 model to onnx's C converter: expected here."""
    return "will be converted using the onnx C API" not in record.getMessage()


class _StorageDecode:
    """Builds the storage decode of one weight (rules 1-4): its initializers and nodes, in order.

    The stored tensors keep descriptive names (<W>_quantized, <W>_scale, ...); the decode's
    intermediate values and small operands get short ones (<id>.<k>, <id>.masks, <id>.shape,
    ...; <id> is w, w_1, ... per weight), and a node is named after its output: every name is
    written into the file, and a 2-bit decode named after its weight takes more bytes than its
    integers on a small model.
    """

    def __init__(self, graph: ir.Graph, name: str, taken: set[str]) -> None:
        self.graph, self.name, self.taken = graph, name, taken
        self.id = fresh_name(taken, "w")
        self.nodes: list[ir.Node] = []
        self._shared: dict[str, ir.Value] = {}

    def const(self, suffix: str, array: np.ndarray, short: bool = True) -> ir.Value:
        base = f"{self.id}.{suffix}" if short else f"{self.name}_{suffix}"
        return add_constant(self.graph, self.taken, base, array)

    def shared(self, suffix: str, array: np.ndarray) -> ir.Value:
        """A constant written once per weight, however many tensors of it use it."""
        if suffix not in self._shared:
            self._shared[suffix] = self.const(suffix, array)
        return self._shared[suffix]

    def op(self, op_type: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        out = ir.Value(name=fresh_name(self.taken, f"{self.id}.{len(self.nodes)}"))
        self.nodes.append(ir.node(op_type, inputs, attrs, outputs=[out], name=out.name))
        return out

    def floats(self, stored: ir.Value, shape: tuple[int, ...], enc: Encoding, signed: bool = False) -> ir.Value:
        """The stored integers as float32 in `shape`; 2-bit bytes unpacked (rule 3) on the way,
        signed ones turned into q + 2 (rule 1)."""
        if not enc.packed:
            return self.op("Cast", [stored], to=ir.DataType.FLOAT)
        if signed:
            stored = self.op("BitwiseXor", [stored, self.const("flip", _PACK_SIGN_FLIP)])
        fields = self.op("BitwiseAnd", [stored, self.shared("masks", _PACK_MASKS)])
        fields = self.op("Cast", [fields], to=ir.DataType.FLOAT)
        fields = self.op("Mul", [fields, self.shared("unshift", _PACK_UNSHIFT)])
        count = math.prod(shape)
        if count % 4:
            fields = self.op("Reshape", [fields, self.shared("flat", np.array([-1], np.int64))])
            fields = self.op("Slice", [fields, self.shared("start", np.array([0], np.int64)),
                                       self.const("end", np.array([count], np.int64))])
        return self.op("Reshape", [fields, self.const("shape", np.array(shape, np.int64))])

    def spread(self, value: ir.Value, spread: tuple) -> ir.Value:
        """Per-group scale / zero point over the fan-in when the blocks do not tile it (rule 4)."""
        expand, flat, axis, end = spread
        value = self.op("Expand", [value, self.shared("expand", np.array(expand, np.int64))])
        value = self.op("Reshape", [value, self.shared("spread", np.array(flat, np.int64))])
        return self.op("Slice", [value, self.shared("start", np.array([0], np.int64)),
                                 self.shared("stop", np.array([end], np.int64)),
                                 self.shared("axes", np.array([axis], np.int64))])

    def build(self, qw: QuantizedWeight, enc: Encoding) -> tuple[list[ir.Node], ir.Value]:
        layout = storage_layout(qw.shape, qw.spec)
        stored = stored_tensors(qw, "storage")
        data = self.const("quantized", stored.q, short=False)
        if enc.decode == "codebook":
            codes = self.op("Cast", [data], to=ir.DataType.INT32)
            values = self.op("Gather", [self.const("codebook", qw.codebook, short=False), codes])
        else:
            values = self.floats(data, layout.view, enc, signed=enc.offset != 0)
        scale = self.const("scale", stored.scale, short=False)
        if layout.spread is not None:
            scale = self.spread(scale, layout.spread)
        if stored.zero_point is not None:
            zp = self.const("zero_point", stored.zero_point, short=False)
            if layout.params:
                zp = self.floats(zp, layout.params, enc)
            if layout.spread is not None:
                zp = self.spread(zp, layout.spread)
            values = self.op("Sub", [values, zp])
        elif enc.offset:
            values = self.op("Sub", [values, self.const("offset", np.array(enc.offset, np.float32))])
        out = self.op("Mul", [values, scale])
        if layout.final is not None:
            out = self.op("Reshape", [out, self.const("shape", np.array(layout.final, np.int64))])
        if layout.perm is not None:
            out = self.op("Transpose", [out], perm=list(layout.perm))
        return self.nodes, out


def _dq_decode(graph: ir.Graph, name: str, qw: QuantizedWeight, enc: Encoding, target: str,
               taken: set[str]) -> tuple[list[ir.Node], ir.Value]:
    """ort-cpu / qdq (rules 4-6): store qw's tensors and build the DequantizeLinear (or codebook) decode."""
    spec, shape = qw.spec, qw.shape
    stored = stored_tensors(qw, target)
    q = add_constant(graph, taken, f"{name}_quantized", stored.q)
    scale = add_constant(graph, taken, f"{name}_scale", stored.scale)
    if enc.decode == "codebook":
        codebook = add_constant(graph, taken, f"{name}_codebook", qw.codebook)
        cast = new_node(taken, name, "Cast", [q], to=ir.DataType.INT32)
        gather = new_node(taken, name, "Gather", [codebook, cast.outputs[0]], axis=0)
        mul = new_node(taken, name, "Mul", [gather.outputs[0], scale])
        return [cast, gather, mul], mul.outputs[0]
    zp = None
    if stored.zero_point is not None:
        zp = add_constant(graph, taken, f"{name}_zero_point", stored.zero_point)
    attrs: dict[str, int] = {}
    if enc.blocked:
        attrs = {"axis": 1 - spec.axis if len(shape) == 2 else 1, "block_size": spec.group_size}
    elif spec.granularity != "per-tensor":
        attrs = {"axis": spec.axis}
    nodes = [new_node(taken, name, "DequantizeLinear", [q, scale, zp], **attrs)]
    if enc.blocked and len(shape) != 2:
        axis = spec.axis
        moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
        target_shape = add_constant(graph, taken, f"{name}_shape", np.array(moved, np.int64))
        nodes.append(new_node(taken, name, "Reshape", [nodes[-1].outputs[0], target_shape]))
        if axis != 0:
            perm = [1 + i if i < axis else 0 if i == axis else i for i in range(len(shape))]
            nodes.append(new_node(taken, name, "Transpose", [nodes[-1].outputs[0]], perm=perm))
    return nodes, nodes[-1].outputs[0]


def quantize_weights(model: onnx.ModelProto, specs: Mapping[str, WeightQuantSpec],
                     target: str = "storage", clip: Collection[str] = ()) -> onnx.ModelProto:
    """Return a copy of `model` with the weights in `specs` quantized for `target` (input untouched);
    those named in `clip` range-clipped first (`passes.clip_weights.mse_clipped`)."""
    ir_model = ir.from_proto(model)
    QuantizeWeightsPass(specs, target, clip)(ir_model)
    return ir.to_proto(ir_model)
