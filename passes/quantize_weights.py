"""Weight quantization pass: fp32 weight initializers become stored integers plus an in-graph decode.

Every named weight W is replaced by the integers `passes.quantize.quantize(W, spec)` computes
(bit for bit) and a short decode whose output keeps the name W, so its consumer is untouched and
computes with exactly `fake_quantize(W, spec)`. The encoding depends on the deployment target:

  1. storage, uniform grids (per-tensor, per-channel, per-group): the integers go into the
     smallest ONNX integer type that holds the grid: INT2/UINT2 for 2 bits (opset 25),
     INT4/UINT4 for 3-4 bits (opset 21), INT8/UINT8 for 5-8 bits; signed for symmetric grids,
     unsigned for asymmetric ones. Sub-byte types are packed by onnx's own helpers. Decode is one
     DequantizeLinear: scalar scale (per-tensor), `axis` = output-channel axis (per-channel),
     or blocked (per-group, see 4). A zero point is stored only for asymmetric grids.
  2. storage, log2: the codes (see `passes.quantize`) go into INT2 / INT4 / INT8 by the same
     size rule; decode is Cast(codes -> int32) -> Gather(float32 codebook) -> Mul(per-channel
     scale, shaped to broadcast along the output axis). ONNX's Gather takes neither int4 data
     nor int8 indices, hence the Cast (ORT 1.32 casts from int2/int4/int8). At ORT_ENABLE_ALL
     ORT folds this decode into an fp32 weight at load, so the kernel runs at fp32 speed.
  3. ort-cpu and qdq, uniform grids: the integers go into 8-bit containers (INT8 symmetric,
     UINT8 asymmetric; a sub-8-bit grid keeps its value range), with a zero point always stored,
     decoded by DequantizeLinear (opset 13, per-channel via `axis`): the standard QDQ weight
     pattern ORT fuses with activation QDQ into QLinearConv / QGemm. Per-group uses a blocked
     8-bit DequantizeLinear (opset 21), which ORT runs but never fuses into an integer kernel.
  4. per-group layout (any target): a 2-D weight is stored in its own layout and blocked along
     its fan-in axis (1 - axis); any other weight is stored as to_2d(q, axis) = [O, fan_in],
     blocked along axis 1, then Reshape(to the axis-first shape) and, when axis != 0, Transpose
     back to the original layout. The Reshape's shape is an int64 initializer.
  5. ort-cpu and qdq, log2 with bits <= 4: the levels +-s * 2^-k (k <= 6) are exactly the int8
     values +-2^(kmax - k) <= 64 times the per-channel scale s * 2^-kmax, so they are stored as
     an int8 per-channel DequantizeLinear (zero point 0): exact and fusable. log2 with 5-8 bits
     cannot be an 8-bit uniform grid: INT8 codes with the Cast/Gather/Mul decode of rule 2 (the
     kernel then runs in fp32).
  6. The targets ort-cpu and qdq write the same weights; they differ in what the caller adds.
     For ort-cpu, prefer `passes.quantize_activations(fp32_model, ..., weight_grids=specs)`,
     which stores the same integers. Running ORT's quantizer on this pass's output works only
     for single-DequantizeLinear decodes (ORT keeps them and matches the bias scale); measured
     with ORT 1.32, it crashes on a per-group decode and silently re-quantizes a 5-8-bit log2
     decode after constant-folding it.
  7. The default-domain opset is raised to the highest opset any chosen encoding needs (never
     lowered) with onnxscript's version converter (onnx's C converter as fallback), and the IR
     version to the minimum that opset requires.

New initializers are named <W>_quantized, <W>_scale, <W>_zero_point, <W>_codebook and
<W>_shape (with a numeric suffix if the name is taken); the decode's output keeps the name W.

Refusals (`WeightQuantError`, a ValueError naming the initializer): a name that is not an
initializer, a weight that is not float32 (already quantized, or not a weight), a weight that is
a graph input or output, used by no node or by more than one use (quantize per-consumer copies:
`passes.normalize` unshares kernel weights), or already feeding QuantizeLinear/DequantizeLinear,
and an axis the weight does not have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from passes.ir_build import add_constant, new_node, taken_names
from passes.quantize import QuantizedWeight, WeightQuantSpec, quantize, to_2d

__all__ = [
    "TARGETS",
    "Encoding",
    "QuantizeWeightsPass",
    "WeightQuantError",
    "StoredWeight",
    "encoding",
    "quantize_weights",
    "stored_tensors",
]

log = logging.getLogger(__name__)

TARGETS = ("storage", "ort-cpu", "qdq")

_CONTAINERS = {  # (bits, signed) -> ONNX type
    (2, True): TensorProto.INT2,
    (2, False): TensorProto.UINT2,
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
}
_CONTAINER_OPSET = {2: 25, 4: 21, 8: 13}
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


class WeightQuantError(ir.passes.PreconditionError, ValueError):
    """A weight the pass refuses to quantize; the message names the initializer and why."""


@dataclass(frozen=True)
class Encoding:
    """How one weight is written (see the module docstring's rules).

    decode: "dq" (one DequantizeLinear, plus Reshape/Transpose for non-2-D per-group) or
        "codebook" (Cast -> Gather -> Mul). container: ONNX type of the stored integers;
        container_bits: 2, 4 or 8. zero_point: whether a zero-point initializer is stored.
        blocked: per-group blocked DequantizeLinear. log2_as_int8: rule 5. opset: the minimum
        default-domain opset the decode needs.
    """

    decode: str
    container: int
    container_bits: int
    zero_point: bool
    blocked: bool
    log2_as_int8: bool
    opset: int


def encoding(spec: WeightQuantSpec, target: str) -> Encoding:
    """The encoding rules 1-5 choose for `spec` under `target`."""
    if target not in TARGETS:
        raise ValueError(f"quantize_weights: target must be one of {TARGETS}, got {target!r}")
    blocked = spec.granularity == "per-group"
    if target == "storage":
        cbits = 2 if spec.bits == 2 else 4 if spec.bits <= 4 else 8
        container = _CONTAINERS[(cbits, spec.signed)]
        opset = max(_CONTAINER_OPSET[cbits], 21 if blocked else 13)
        if spec.is_log2:
            return Encoding("codebook", container, cbits, False, False, False, opset)
        return Encoding("dq", container, cbits, not spec.symmetric, blocked, False, opset)
    container = _CONTAINERS[(8, spec.signed)]
    if spec.is_log2:
        if spec.bits <= 4:
            return Encoding("dq", container, 8, True, False, True, 13)
        return Encoding("codebook", container, 8, False, False, False, 13)
    return Encoding("dq", container, 8, True, blocked, False, 21 if blocked else 13)


@dataclass(frozen=True, eq=False)
class StoredWeight:
    """The tensors the pass writes for one weight, as values (int32 / float32) in the stored layout.

    q: the integers (cast to the encoding's container when written). scale: DequantizeLinear's
    scale, or the codebook decode's per-channel Mul operand (shaped to broadcast). zero_point:
    DequantizeLinear's zero point, None where the encoding stores none.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None


def stored_tensors(qw: QuantizedWeight, target: str) -> StoredWeight:
    """What the pass stores for `qw` under `target` (rules 1-5 of the module docstring)."""
    spec, enc = qw.spec, encoding(qw.spec, target)
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
    return StoredWeight(q.astype(np.int32), scale, zp if enc.zero_point else None)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace each named float32 weight initializer by stored integers + decode (module docstring)."""

    def __init__(self, specs: Mapping[str, WeightQuantSpec], target: str = "storage") -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"QuantizeWeightsPass: target must be one of {TARGETS}, got {target!r}")
        self.specs = dict(specs)
        self.target = target

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
        self._raise_opset(model, max(encoding(s, self.target).opset for s in self.specs.values()))
        graph = model.graph
        taken = taken_names(graph)
        for name, spec in self.specs.items():
            old = graph.initializers[name]
            weight = old.const_value.numpy()
            qw = quantize(weight, spec)
            nodes, out = _decode(graph, name, qw, encoding(spec, self.target), self.target, taken)
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


def _decode(graph: ir.Graph, name: str, qw: QuantizedWeight, enc: Encoding, target: str,
            taken: set[str]) -> tuple[list[ir.Node], ir.Value]:
    """Store qw's tensors as initializers and build the decode nodes; returns (nodes, output)."""
    spec, shape = qw.spec, qw.shape
    np_int = onnx.helper.tensor_dtype_to_np_dtype(enc.container)  # ml_dtypes for sub-byte types
    stored = stored_tensors(qw, target)
    q = add_constant(graph, taken, f"{name}_quantized", stored.q.astype(np_int))
    scale = add_constant(graph, taken, f"{name}_scale", stored.scale)
    if enc.decode == "codebook":
        codebook = add_constant(graph, taken, f"{name}_codebook", qw.codebook)
        cast = new_node(taken, name, "Cast", [q], to=ir.DataType.INT32)
        gather = new_node(taken, name, "Gather", [codebook, cast.outputs[0]], axis=0)
        mul = new_node(taken, name, "Mul", [gather.outputs[0], scale])
        return [cast, gather, mul], mul.outputs[0]
    zp = None
    if stored.zero_point is not None:
        zp = add_constant(graph, taken, f"{name}_zero_point", stored.zero_point.astype(np_int))
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
                     target: str = "storage") -> onnx.ModelProto:
    """Return a copy of `model` with the weights in `specs` quantized for `target` (input untouched)."""
    ir_model = ir.from_proto(model)
    QuantizeWeightsPass(specs, target)(ir_model)
    return ir.to_proto(ir_model)
