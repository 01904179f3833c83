"""Reference weight quantizer (numpy): the exact integers and scales every other component must match.

This module is the single definition of what "quantize weight W with spec S" means. The graph
pass (`passes.quantize_weights`) stores exactly the integers computed here, and a torch
fake-quantizer must reproduce `fake_quantize` bit for bit, so the arithmetic is spelled out.

Notation: b = spec.bits (2..8). All arithmetic is IEEE float32 (inputs are cast to float32
first); `rint` is round-half-to-even (numpy.rint, torch.round); `clip(x, lo, hi)` clamps.

Groups (the set of weights sharing one scale)
    Let A = spec.axis, the weight's OUTPUT-channel axis (Conv W[O, I/g, kh, kw]: 0; Gemm with
    transB=1, W[N, K]: 0; Gemm transB=0 or MatMul constant B[K, N]: 1; ConvTranspose
    W[I, O/g, kh, kw]: 1), and O = W.shape[A]. `to_2d(W, A)` moves axis A to the front and
    reshapes (C order) to [O, fan_in]; `from_2d` is its inverse.
    per-tensor   one group: the whole tensor.
    per-channel  O groups: to_2d(W, A)[o, :] for each output channel o.
    per-group    for each output channel o, blocks of G = spec.group_size consecutive entries of
                 to_2d(W, A)[o, :]: block j holds columns [j*G, min((j+1)*G, fan_in)); the last
                 block may be partial. Scales have shape [O, ceil(fan_in / G)].
    log2         per channel, as per-channel.

Symmetric uniform (zero point 0, signed restricted grid)
    qmax  = 2^(b-1) - 1                      (int8: -127..127; 2 bits: -1..1)
    amax  = max |w| over the group
    scale = float32(amax / qmax); if scale == 0 (all-zero group, or underflow) then scale = 1
    q     = clip(rint(w / scale), -qmax, qmax)
    w'    = q * scale

Asymmetric uniform (unsigned grid with zero point)
    qmax  = 2^b - 1
    lo    = min(min(w), 0), hi = max(max(w), 0)   (the range always contains 0)
    scale = float32((hi - lo) / qmax); if scale == 0 then scale = 1
    zp    = clip(rint(-lo / scale), 0, qmax)
    q     = clip(rint(w / scale) + zp, 0, qmax)
    w'    = (q - zp) * scale                  (q - zp is an exact integer, then one float32 multiply)

    These are exactly ONNX DequantizeLinear's (x - x_zero_point) * x_scale, so ORT reproduces w'.

log2 (power-of-two levels times a per-channel scale; qtype is ignored: asymmetric log2 is the
same as symmetric, because power-of-two levels are symmetric about 0 by construction)
    qmax  = 2^(b-1) - 1, kmax = qmax - 1
    s     = max |w| over the channel; a channel with s < 2^-100 is treated as all zero (s = 1,
            all codes 0) so that s * 2^-k never becomes subnormal for the storable k <= 6 and
            decode stays exact in every container.
    levels: 0 and +-s * 2^-k for k = 0..kmax (2^b - 1 levels: one sign bit, code 0 = zero).
    Code q in [-qmax, qmax]: q = 0 is zero; q = sign(w) * (qmax - k) is the level 2^-k, so
    |q| = qmax is +-s and |q| = 1 is +-s * 2^-kmax.
    Rounding (nearest level in the log domain, decided by float32 comparisons only, no log):
        r = |w| / s  (float32)
        k = number of j in 0..kmax-1 with r < T_j,  T_j = float32(2^-(j + 0.5))
            (the geometric midpoints between neighbouring levels; r == T_j goes to the larger level)
        zero if r < 2^-(kmax + 1)  (half the smallest level: the linear midpoint to zero)
    codebook[q] = 0 if q == 0 else sign(q) * 2^-(qmax - |q|)   (exact float32 powers of two)
    w'    = codebook[q] * s                   (exact: a power of two times s)
    With b = 2 the levels are {0, +-s} and the zero threshold s/2: the same as symmetric
    per-channel 2-bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "GRANULARITIES",
    "LOG2_TINY",
    "QuantizedWeight",
    "WeightQuantSpec",
    "blocks",
    "dequantize",
    "fake_quantize",
    "from_2d",
    "log2_codebook",
    "quantize",
    "to_2d",
    "uniform_groups",
]

GRANULARITIES = ("per-tensor", "per-channel", "per-group", "log2")
LOG2_TINY = np.float32(2.0**-100)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class WeightQuantSpec:
    """How to quantize one weight tensor (see the module docstring for the exact arithmetic).

    bits: 2..8. symmetric: signed grid with zero point 0 (True) or unsigned grid with a zero
    point (False). granularity: per-tensor, per-channel, per-group or log2. group_size: entries
    per block for per-group. axis: the weight's output-channel axis.
    """

    bits: int
    symmetric: bool
    granularity: str
    group_size: int = 32
    axis: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"WeightQuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"WeightQuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"WeightQuantSpec.group_size must be a positive integer, got {self.group_size!r}")
        if not _is_int(self.axis) or self.axis < 0:
            raise ValueError(f"WeightQuantSpec.axis must be a non-negative integer, got {self.axis!r}")

    @property
    def is_log2(self) -> bool:
        return self.granularity == "log2"

    @property
    def signed(self) -> bool:
        """Whether the integers are signed: symmetric uniform grids and every log2 code."""
        return self.symmetric or self.is_log2

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """The integers and parameters of one quantized weight.

    q: int32 integers (uniform grid values, or log2 codes) in the weight's original shape.
    scale: float32; shape () for per-tensor, [O] for per-channel and log2, [O, n_blocks] for
        per-group (blocks of the to_2d layout).
    zero_point: int32 of scale's shape for asymmetric uniform grids, None otherwise.
    codebook: float32 [2^b - 1] for log2, indexed by code with negative codes wrapping
        (codebook[q], numpy/ONNX Gather convention), None otherwise.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    codebook: np.ndarray | None
    spec: WeightQuantSpec
    shape: tuple[int, ...]


def to_2d(w: np.ndarray, axis: int) -> np.ndarray:
    """Move the output-channel axis first and flatten the rest: [O, fan_in] (a view when possible)."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def from_2d(w2: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Inverse of `to_2d` for a weight of `shape`."""
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.moveaxis(w2.reshape(moved), 0, axis)


def log2_codebook(bits: int) -> np.ndarray:
    """float32 [2^b - 1]: codebook[q] for codes q in [-qmax, qmax], negative codes wrapping."""
    qmax = 2 ** (bits - 1) - 1
    pos = [2.0 ** -(qmax - m) for m in range(1, qmax + 1)]
    return np.array([0.0] + pos + [-p for p in reversed(pos)], dtype=np.float32)


def _check(w: np.ndarray, spec: WeightQuantSpec) -> np.ndarray:
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize: expected a float weight, got dtype {w.dtype}")
    if w.ndim == 0 or w.size == 0:
        raise ValueError(f"quantize: expected a non-empty weight with at least one axis, got shape {w.shape}")
    if spec.granularity != "per-tensor" and spec.axis >= w.ndim:
        raise ValueError(f"quantize: axis {spec.axis} out of range for a weight of shape {w.shape}")
    w = w.astype(np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize: the weight holds NaN or Inf")
    return w


def blocks(w2: np.ndarray, group_size: int) -> np.ndarray:
    """[O, fan_in] -> [O, n_blocks, group_size], padding the last block with zeros.

    Zero padding never changes a block's scale: max|w| and the 0-including range ignore zeros.
    """
    o, fan_in = w2.shape
    n_blocks = -(-fan_in // group_size)
    padded = np.zeros((o, n_blocks * group_size), np.float32)
    padded[:, :fan_in] = w2
    return padded.reshape(o, n_blocks, group_size)


def uniform_groups(g: np.ndarray, spec: WeightQuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize groups laid out on the last axis of `g`; returns q (g's shape), scale, zero point."""
    if spec.symmetric:
        qmax = np.float32(spec.qmax)
        scale = (np.max(np.abs(g), axis=-1) / qmax).astype(np.float32)
        scale[scale == 0] = 1
        q = np.clip(np.rint(g / scale[..., None]), -qmax, qmax)
        return q.astype(np.int32), scale, None
    qmax = np.float32(spec.qmax)
    lo = np.minimum(np.min(g, axis=-1), np.float32(0))
    hi = np.maximum(np.max(g, axis=-1), np.float32(0))
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale[scale == 0] = 1
    zp = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(g / scale[..., None]) + zp[..., None], 0, qmax)
    return q.astype(np.int32), scale, zp.astype(np.int32)


def _log2(w2: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes [O, fan_in] and per-channel scale [O] (see the module docstring)."""
    qmax = 2 ** (bits - 1) - 1
    kmax = qmax - 1
    s = np.max(np.abs(w2), axis=1)
    s = np.where(s < LOG2_TINY, np.float32(1), s).astype(np.float32)
    r = (np.abs(w2) / s[:, None]).astype(np.float32)
    k = np.zeros(r.shape, np.int32)
    for j in range(kmax):
        k += r < np.float32(2.0 ** -(j + 0.5))
    q = np.where(r < np.float32(2.0 ** -(kmax + 1)), 0, np.sign(w2).astype(np.int32) * (qmax - k))
    return q.astype(np.int32), s


def quantize(w: np.ndarray, spec: WeightQuantSpec) -> QuantizedWeight:
    """Quantize a float weight following the module docstring exactly."""
    w = _check(w, spec)
    shape = tuple(int(d) for d in w.shape)
    if spec.granularity == "per-tensor":
        q, scale, zp = uniform_groups(w.reshape(1, -1), spec)
        return QuantizedWeight(q.reshape(shape), scale.reshape(()), None if zp is None else zp.reshape(()),
                               None, spec, shape)
    w2 = to_2d(w, spec.axis)
    if spec.is_log2:
        codes, s = _log2(w2, spec.bits)
        return QuantizedWeight(from_2d(codes, shape, spec.axis), s, None, log2_codebook(spec.bits), spec, shape)
    if spec.granularity == "per-channel":
        q2, scale, zp = uniform_groups(w2, spec)
        return QuantizedWeight(from_2d(q2, shape, spec.axis), scale, zp, None, spec, shape)
    q3, scale, zp = uniform_groups(blocks(w2, spec.group_size), spec)
    q2 = q3.reshape(w2.shape[0], -1)[:, : w2.shape[1]]
    return QuantizedWeight(from_2d(q2, shape, spec.axis), scale, zp, None, spec, shape)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """float32 weight of the original shape: (q - zp) * scale, or codebook[q] * s for log2."""
    spec = qw.spec
    if spec.granularity == "per-tensor":
        zp = np.int32(0) if qw.zero_point is None else qw.zero_point
        return ((qw.q - zp).astype(np.float32) * qw.scale).astype(np.float32)
    q2 = to_2d(qw.q, spec.axis)
    if spec.is_log2:
        w2 = qw.codebook[q2] * qw.scale[:, None]
    elif spec.granularity == "per-channel":
        zp = 0 if qw.zero_point is None else qw.zero_point[:, None]
        w2 = (q2 - zp).astype(np.float32) * qw.scale[:, None]
    else:
        g = spec.group_size
        scale = np.repeat(qw.scale, g, axis=1)[:, : q2.shape[1]]
        zp = 0 if qw.zero_point is None else np.repeat(qw.zero_point, g, axis=1)[:, : q2.shape[1]]
        w2 = (q2 - zp).astype(np.float32) * scale
    return from_2d(w2.astype(np.float32), qw.shape, spec.axis)


def fake_quantize(w: np.ndarray, spec: WeightQuantSpec) -> np.ndarray:
    """dequantize(quantize(w, spec)): the float32 weight the emitted model computes with."""
    return dequantize(quantize(w, spec))
