"""Which encoding a quantized weight gets, the layout of its storage decode, and that decode's exact bytes.

The rules are `passes.quantize_weights`'s module docstring (numbered there); this module decides
from a weight's spec, target and shape alone, without its values, so the cost model
(`passes.storage`) and the pass agree by construction. A storage 2-bit grid is packed four to a
byte unless the unpacking's small operands make that larger than INT4 (weights of fewer than about
230 values; rule 3): lowering a weight's bits never costs bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from onnx import TensorProto

from passes.quantize import WeightQuantSpec

__all__ = ["TARGETS", "Encoding", "StorageLayout", "encoding", "storage_layout", "storage_nbytes"]

TARGETS = ("storage", "ort-cpu", "qdq")

_CONTAINERS = {  # (bits, signed) -> ONNX type
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
}
_STORAGE_OPSET = {2: 18, 4: 21, 8: 11}  # rule 8


@dataclass(frozen=True)
class Encoding:
    """How one weight is written (the rules of `passes.quantize_weights`' module docstring).

    decode: "dq" (one DequantizeLinear, plus Reshape/Transpose for non-2-D per-group), "affine"
        (Cast -> [Sub] -> Mul: storage uniform grids and 2-bit log2) or "codebook" (Cast -> Gather
        -> Mul).
    container: ONNX type of the stored integers (UINT8 for 2-bit packed). container_bits: bits a
        value takes in it: 2 (packed, rule 3), 4 or 8. zero_point: whether a zero point is stored.
    blocked: per-group. log2_as_int8: rule 6. opset: the minimum default-domain opset the decode needs.
    offset: what the storage decode subtracts from every stored value when it stores no zero
        point (2 for a signed 2-bit grid, decoded as q + 2: rule 1), else 0.
    """

    decode: str
    container: int
    container_bits: int
    zero_point: bool
    blocked: bool
    log2_as_int8: bool
    opset: int
    offset: int = 0

    @property
    def packed(self) -> bool:
        """2-bit values packed four to a uint8 byte (rule 3)."""
        return self.container_bits == 2


def encoding(spec: WeightQuantSpec, target: str, shape: tuple[int, ...] | None = None) -> Encoding:
    """The encoding rules 1-6 choose for `spec` under `target` for a weight of `shape`. Only a
    storage 2-bit grid depends on the shape (packed, or INT4 where that is smaller: rule 3); it is
    refused without one."""
    if target not in TARGETS:
        raise ValueError(f"quantize_weights: target must be one of {TARGETS}, got {target!r}")
    blocked = spec.granularity == "per-group"
    if target == "storage":
        cbits = 2 if spec.bits == 2 else 4 if spec.bits <= 4 else 8
        unpacked = Encoding("codebook" if spec.is_log2 else "affine", _CONTAINERS[(max(cbits, 4), spec.signed)],
                            max(cbits, 4), not spec.signed, blocked, False, _STORAGE_OPSET[max(cbits, 4)])
        if cbits > 2:
            return unpacked
        if shape is None:
            raise ValueError("quantize_weights: a 2-bit storage encoding depends on the weight's shape")
        # rule 3; log2 2-bit levels {0, +-s} are the symmetric grid's, so never a codebook
        packed = Encoding("affine", TensorProto.UINT8, 2, not spec.signed, blocked, False, _STORAGE_OPSET[2],
                          2 if spec.signed else 0)
        unpacked = replace(unpacked, decode="affine")
        return packed if storage_nbytes(shape, spec, packed) < storage_nbytes(shape, spec, unpacked) else unpacked
    container = _CONTAINERS[(8, spec.signed)]
    if spec.is_log2:
        if spec.bits <= 4:
            return Encoding("dq", container, 8, True, False, True, 13)
        return Encoding("codebook", container, 8, False, False, False, 13)
    return Encoding("dq", container, 8, True, blocked, False, 21 if blocked else 13)


@dataclass(frozen=True)
class StorageLayout:
    """Shapes of the storage decode of one weight (rules 1-4), known from its shape and spec alone.

    view: the shape the integers are decoded in. params: the shape of the scale and zero point.
    spread: per-group blocks that do not tile the fan-in (rule 4): (Expand's shape, Reshape's
        shape, the Slice axis, its end), else None. final: the Reshape after the decode (None:
        view is the weight's shape). perm: the Transpose after it, or None.
    """

    view: tuple[int, ...]
    params: tuple[int, ...]
    spread: tuple[tuple[int, ...], tuple[int, ...], int, int] | None
    final: tuple[int, ...] | None
    perm: tuple[int, ...] | None


def storage_layout(shape: tuple[int, ...], spec: WeightQuantSpec) -> StorageLayout:
    """The storage decode's layout for a weight of `shape` (rules 1, 2 and 4)."""
    shape = tuple(int(d) for d in shape)
    axis, ndim = spec.axis, len(shape)
    if spec.granularity == "per-tensor":
        return StorageLayout(shape, (), None, None, None)
    if spec.granularity != "per-group":
        return StorageLayout(shape, (shape[axis],) + (1,) * (ndim - 1 - axis), None, None, None)
    block_axis = 1 - axis if ndim == 2 else 1
    channels = shape[axis]
    stored = shape if ndim == 2 else (channels, math.prod(shape) // channels)
    fan_in = stored[block_axis]
    n_blocks = -(-fan_in // spec.group_size)
    group = spec.group_size if n_blocks > 1 else fan_in
    moved = (channels,) + tuple(d for i, d in enumerate(shape) if i != axis)
    final = stored if ndim == 2 else moved
    perm = None
    if ndim != 2 and axis != 0:
        perm = tuple(1 + i if i < axis else 0 if i == axis else i for i in range(ndim))
    if block_axis == 1:
        params, blocked_view = (channels, n_blocks, 1), (channels, n_blocks, group)
        spread = ((1, 1, group), (channels, n_blocks * group), 1, fan_in)
    else:
        params, blocked_view = (n_blocks, 1, channels), (n_blocks, group, channels)
        spread = ((1, group, 1), (n_blocks * group, channels), 0, fan_in)
    if n_blocks * group == fan_in:
        return StorageLayout(blocked_view, params, None, final, perm)
    return StorageLayout(stored, params, spread, None if ndim == 2 else final, perm)


def _packed(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def storage_nbytes(shape: tuple[int, ...], spec: WeightQuantSpec, enc: Encoding) -> int:
    """Bytes of the initializers the storage decode of a weight of `shape` writes (rules 1-4), byte
    for byte (`passes.storage` lists what is counted)."""
    layout = storage_layout(shape, spec)
    tensors = [layout.view]  # the integer tensors: the data, and the zero point unless it is one float32
    if enc.zero_point and layout.params:
        tensors.append(layout.params)
    total = 4 * math.prod(layout.params)  # scales
    if enc.zero_point and not layout.params:
        total += 4
    if enc.decode == "codebook":
        total += 4 * (2**spec.bits - 1)
    if enc.offset:
        total += 4 + 1  # the float32 offset, the uint8 sign flip
    padded = False
    for dims in tensors:
        count = math.prod(dims)
        total += _packed(count, enc.container_bits)
        if enc.packed:
            total += 8 * len(dims) + (8 if count % 4 else 0)  # the shape it unpacks to, the Slice end
            padded = padded or count % 4 != 0
    if enc.packed:
        total += 4 + 16 + (8 if padded else 0)  # masks, unshift, [-1]
    if padded or layout.spread is not None:
        total += 8  # the Slice start [0]
    if layout.spread is not None:
        total += 24 + 16 + 8 + 8  # Expand shape, Reshape shape, Slice end, Slice axes
    if layout.final is not None:
        total += 8 * len(layout.final)
    return total
