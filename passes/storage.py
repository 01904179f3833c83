"""Stored bytes: of one weight under an encoding (before writing it), and of a model's initializers (after).

`encoded_nbytes` is what `quantize_weights` writes for one weight, counted by hand (the storage
decode by `passes.weight_encoding.storage_nbytes`, next to the rules that shape it).

The budget's unit is the byte the serialized model really stores (docs/ARCHITECTURE.md, "Storage cost"), so
this is not an estimate: for every spec and target it equals the sum of the initializer byte
sizes the pass emits for that weight (tests compare the two on real models). Counted:
  - integer data: ceil(n * container_bits / 8) (2-bit values four to a uint8 byte, INT4 two to
    a byte, the last byte padded);
  - scales: 4 bytes each (float32); zero points: stored like the data, when stored (storage
    per-tensor: one float32); storage's signed 2-bit decode: its offset (float32) and sign flip
    (uint8);
  - a log2 codebook: 4 * (2^bits - 1) (storage: 3-8 bits); its per-channel scale: 4 * O;
  - storage's small decode operands (`passes.quantize_weights`, rules 3-4): per 2-bit packed
    tensor the int64 shape it unpacks to (8 * rank) and, when its count is not a multiple of 4,
    the Slice end (8); per weight the uint8 masks (4) and float32 unshift (16) when packed, the
    int64 [-1] (8) when a packed count is padded, [0] (8) when a Slice starts at it; a per-group
    spread's Expand shape (24), Reshape shape (16), Slice end (8) and axes (8); the final
    Reshape's shape (8 * its rank);
  - ort-cpu / qdq: a per-group Reshape's int64 shape: 8 * ndim, for weights that are not 2-D.
Node attributes (axis, block_size, perm, to) live in the graph, not in initializers,
and are not counted.

`initializer_nbytes` counts a written model: the one byte counter of the project (the budget's
denominator, the report's weight bytes, the sizes the searches compare).
"""
from __future__ import annotations

import functools
import math

import onnx
from onnx import TensorProto, helper

from passes.quantize import WeightQuantSpec
from passes.weight_encoding import encoding, storage_nbytes

__all__ = ["encoded_nbytes", "initializer_nbytes", "tensor_nbytes"]

_SUB_BYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4, TensorProto.INT2: 2,
                  TensorProto.UINT2: 2}


def _packed(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def encoded_nbytes(shape: tuple[int, ...], spec: WeightQuantSpec | None, target: str = "storage") -> int:
    """Bytes of the initializers holding one weight of `shape`; fp32 bytes when `spec` is None."""
    return _encoded_nbytes(tuple(int(d) for d in shape), spec, target)


@functools.lru_cache(maxsize=1 << 16)
def _encoded_nbytes(shape: tuple[int, ...], spec: WeightQuantSpec | None, target: str) -> int:
    """Cached: a pure function of its arguments, asked for every kernel of every config a search prices
    (the cost model and the budget fit's moves; one knapsack search asked it about a million times)."""
    n = math.prod(shape)
    if spec is None:
        return 4 * n
    enc = encoding(spec, target, tuple(shape))
    if target == "storage":
        return storage_nbytes(tuple(shape), spec, enc)
    data = _packed(n, enc.container_bits)
    channels = shape[spec.axis] if spec.granularity != "per-tensor" else 1
    if enc.decode == "codebook":
        return data + 4 * (2**spec.bits - 1) + 4 * channels
    if spec.granularity == "per-group":
        n_scales = channels * -(-(n // channels) // spec.group_size)
    else:
        n_scales = channels
    zero_points = _packed(n_scales, enc.container_bits) if enc.zero_point else 0
    reshape = 8 * len(shape) if enc.blocked and len(shape) != 2 else 0
    return data + 4 * n_scales + zero_points + reshape


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes one initializer stores: its raw bytes, or, for values held in typed fields or external
    data not loaded, what they take written raw (sub-byte types packed)."""
    if tensor.raw_data:
        return len(tensor.raw_data)
    bits = _SUB_BYTE_BITS.get(tensor.data_type) or 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return _packed(math.prod(tensor.dims), bits)


def initializer_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer of `model`'s main graph: the true stored bytes a budget is met in."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)
