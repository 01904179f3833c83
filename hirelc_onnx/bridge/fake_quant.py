"""Torch fake quantization, bit for bit `passes.quantize.fake_quantize`, with a straight-through gradient.

Fine-tuning must see exactly the weights the emitted model will compute with, so the forward
pass repeats the reference arithmetic of `passes.quantize` step by step in float32: the same
divisions (never a multiply by a reciprocal), torch.round (half to even, as numpy.rint), the same
clamps, zero-padded per-group blocks, and log2 rounding by float32 threshold comparisons against
the same constants and an exact power-of-two table. The tests compare with np.array_equal.

The backward pass is the straight-through estimator: the gradient of the fake-quantized weight
is passed to the latent fp32 weight unchanged. (Clipping it outside the grid range would be a
no-op here: every grid is calibrated on the weight's own min/max, so no weight lies outside.)

`apply_fake_quant` parametrizes the converted module's bound weights
(torch.nn.utils.parametrize), so an optimizer trains the fp32 latent weights while every forward
pass computes with their quantized values; `remove_fake_quant` drops the parametrizations and
keeps the latent weights.

A weight named in `apply_fake_quant(..., frozen=...)` (an embedding table: 53% of MiniLM's bytes,
whose full fake quantization cost ~12% of every training step, and whose dense gradient and Adam
update over 30522 x 384 values cost more) is fake-quantized once and no longer trained
(`FrozenFakeQuant`): the forward pass reads the same exact values, the latent weight stays the fp32
original, so the quantization pass still emits exactly what training saw.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from hirelc_onnx.bridge.convert import BridgeError, bindings, onnx_layout
from passes.quantize import WeightQuantSpec

__all__ = ["fake_quantize_tensor", "fake_quant_ste", "FakeQuant", "FrozenFakeQuant", "apply_fake_quant",
           "remove_fake_quant"]

log = logging.getLogger(__name__)

_LOG2_TINY = 2.0**-100  # passes.quantize.LOG2_TINY


def _to_2d(w: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.movedim(w, axis, 0).reshape(w.shape[axis], -1)


def _from_2d(w2: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return torch.movedim(w2.reshape(moved), 0, axis)


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar tensor (rounded from the Python double as np.float32 rounds it)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _uniform(g: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Fake-quantize groups laid out on the last axis of `g` (passes.quantize.uniform_groups + dequantize)."""
    qmax = _f32(spec.qmax, g)
    one = _f32(1.0, g)
    if spec.symmetric:
        scale = torch.amax(g.abs(), dim=-1) / qmax
        scale = torch.where(scale == 0, one, scale)
        q = torch.clamp(torch.round(g / scale[..., None]), -qmax, qmax)
        return q * scale[..., None]
    zero = _f32(0.0, g)
    lo = torch.minimum(torch.amin(g, dim=-1), zero)
    hi = torch.maximum(torch.amax(g, dim=-1), zero)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, one, scale)
    zp = torch.clamp(torch.round(-lo / scale), zero, qmax)
    q = torch.clamp(torch.round(g / scale[..., None]) + zp[..., None], zero, qmax)
    return (q - zp[..., None]) * scale[..., None]


def _log2(w2: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize [O, fan_in] to per-channel power-of-two levels (passes.quantize._log2)."""
    qmax = 2 ** (bits - 1) - 1
    kmax = qmax - 1
    s = torch.amax(w2.abs(), dim=1)
    s = torch.where(s < _f32(_LOG2_TINY, w2), _f32(1.0, w2), s)
    r = w2.abs() / s[:, None]
    # k = #{j < kmax : r < T_j}, T_j = float32(2^-(j+0.5)) decreasing in j: count via a sorted search
    thresholds = torch.tensor([2.0 ** -(j + 0.5) for j in range(kmax)], dtype=torch.float32, device=w2.device)
    k = kmax - torch.searchsorted(thresholds.flip(0), r.contiguous(), right=True)
    levels = torch.tensor([2.0**-j for j in range(kmax + 1)], dtype=torch.float32, device=w2.device)
    level = torch.sign(w2) * levels[k]
    level = torch.where(r < _f32(2.0 ** -(kmax + 1), w2), _f32(0.0, w2), level)
    return level * s[:, None]


def fake_quantize_tensor(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """float32 `fake_quantize(w, spec)` of passes.quantize, computed in torch (no gradient rule)."""
    if not w.is_floating_point():
        raise BridgeError(f"fake quantization needs a float weight, got {w.dtype}")
    if spec.granularity != "per-tensor" and spec.axis >= w.dim():
        raise BridgeError(f"fake quantization: axis {spec.axis} out of range for a weight of shape {tuple(w.shape)}")
    w = w.to(torch.float32)
    if spec.granularity == "per-tensor":
        return _uniform(w.reshape(1, -1), spec).reshape(w.shape)
    w2 = _to_2d(w, spec.axis)
    if spec.is_log2:
        return _from_2d(_log2(w2, spec.bits), w.shape, spec.axis)
    if spec.granularity == "per-channel":
        return _from_2d(_uniform(w2, spec), w.shape, spec.axis)
    o, fan_in = w2.shape
    n_blocks = -(-fan_in // spec.group_size)
    padded = torch.nn.functional.pad(w2, (0, n_blocks * spec.group_size - fan_in))
    blocks = _uniform(padded.reshape(o, n_blocks, spec.group_size), spec)
    return _from_2d(blocks.reshape(o, -1)[:, :fan_in], w.shape, spec.axis)


class _StraightThrough(torch.autograd.Function):
    """Forward: exact fake quantization; backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
        return fake_quantize_tensor(w.detach(), spec).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quant_ste(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Fake-quantized `w` whose gradient flows straight through to `w`."""
    return _StraightThrough.apply(w, spec)


class FakeQuant(nn.Module):
    """Parametrization computing a weight's fake-quantized value from its latent fp32 value.

    `transposed`: the torch tensor is the ONNX initializer transposed, so the spec (written for
    the ONNX layout) is applied to the transpose; transposing is exact.
    """

    def __init__(self, spec: WeightQuantSpec, transposed: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.transposed = transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return fake_quant_ste(w.t(), self.spec).t()
        return fake_quant_ste(w, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        kind = "symmetric" if s.symmetric else "asymmetric"
        return f"bits={s.bits}, {kind}, {s.granularity}, group_size={s.group_size}, axis={s.axis}"


class FrozenFakeQuant(nn.Module):
    """Parametrization of a weight that is not trained: its fake-quantized value, computed once.

    The value is a buffer (it follows the module across devices) and the latent weight is left
    untouched, so `remove_fake_quant` and write-back see the fp32 original.
    """

    def __init__(self, latent: torch.Tensor, spec: WeightQuantSpec, transposed: bool = False) -> None:
        super().__init__()
        self.spec = spec
        with torch.no_grad():
            w = latent.t() if transposed else latent
            value = fake_quantize_tensor(w.detach(), spec).to(latent.dtype)
            self.register_buffer("value", value.t() if transposed else value)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"frozen, bits={self.spec.bits}, {self.spec.granularity}"


def apply_fake_quant(module: nn.Module, specs: Mapping[str, WeightQuantSpec],
                     frozen: Collection[str] = ()) -> nn.Module:
    """Parametrize the weights named in `specs` (ONNX initializer names) with `FakeQuant`, in place.

    Weights also named in `frozen` get `FrozenFakeQuant` instead and stop requiring gradients.
    A weight already fake-quantized has its parametrization replaced. Raises BridgeError for a
    name the module does not hold.
    """
    table = bindings(module)
    for name, spec in specs.items():
        b = table.get(name)
        if b is None:
            raise BridgeError(f"cannot fake-quantize {name!r}: no such float initializer in the converted module")
        owner, attr = b.owner(module), b.attr
        if parametrize.is_parametrized(owner, attr):
            _remove(owner, attr)
        if spec.granularity != "per-tensor" and spec.axis >= onnx_layout(b, getattr(owner, attr)).dim():
            raise BridgeError(f"cannot fake-quantize {name!r}: axis {spec.axis} out of range")
        if name in frozen:
            latent = getattr(owner, attr)
            latent.requires_grad_(False)
            parametrize.register_parametrization(owner, attr, FrozenFakeQuant(latent, spec, b.transposed))
        else:
            parametrize.register_parametrization(owner, attr, FakeQuant(spec, b.transposed))
    log.debug("fake-quantized %d weights", len(specs))
    return module


def remove_fake_quant(module: nn.Module) -> nn.Module:
    """Drop every fake-quant parametrization, keeping the latent fp32 weights, in place."""
    for b in bindings(module).values():
        owner, attr = b.owner(module), b.attr
        if parametrize.is_parametrized(owner, attr):
            _remove(owner, attr)
    return module


def _remove(owner: nn.Module, attr: str) -> None:
    """Drop `attr`'s parametrization, keeping its latent weight (trainable again if it was frozen)."""
    frozen = any(isinstance(p, FrozenFakeQuant) for p in owner.parametrizations[attr])
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
    if frozen:
        getattr(owner, attr).requires_grad_(True)
