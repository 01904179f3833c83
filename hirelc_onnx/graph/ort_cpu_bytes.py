"""The bytes ORT's static quantizer adds under `ort-cpu`, read once from a model it emitted.

`graph/cost.py` counts each kernel weight's encoding exactly, but ORT's quantizer (the activation
pass of `ort-cpu`, `passes/quantize_activations.py`) rewrites more than the weights: a Conv / Gemm
bias of an int8 kernel becomes int32 with a float scale and an int32 zero point per weight scale
(12 bytes a channel instead of 4), constants read by the ops it quantizes (a MatMul's Add bias, a
LayerNormalization's scale, a position table) become uint8 with a scale and zero point, and every
activation it quantizes stores a scale and a zero point. Left out, the estimate ran 3.54x where the
emitted MobileNetV2 stored 2.88x (bench/SPEED.md). What ORT does is a property of the graph, not of
the calibration values, so one emitted model (every kernel int8, `search/ort_speed.py: prepare`)
tells, per initializer of the input, the bytes per element it became, and what the activations
add; `cost.model_cost` scales those to the channels a config keeps. A kernel the config leaves out
of int8 (fp32, or written in the storage encoding) keeps its bias fp32; the activation pairs next to
it are still counted (ORT may keep them for a neighbour), so such a config's estimate errs small.
"""
from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field

import onnx

from passes.storage import tensor_nbytes

__all__ = ["OrtCpuBytes", "ort_cpu_bytes"]

_SUFFIXES = ("", "_quantized", "_scale", "_zero_point", "_quantized_scale", "_quantized_zero_point")


@dataclass(frozen=True)
class OrtCpuBytes:
    """What ORT's quantizer made of a model's non-weight initializers, and its activations' cost."""

    per_element: dict[str, float] = field(default_factory=dict)  # input initializer -> emitted bytes per element
    int8_biases: frozenset[str] = frozenset()  # kernel biases ORT wrote as int32 (they stay fp32 when out of int8)
    activation_bytes: int = 0  # scales and zero points of the activations ORT quantized
    dropped_with: dict[str, str] = field(default_factory=dict)  # a constant ORT removed (a Relu6's bounds,
    # the activation folded into the kernel before it) -> that kernel: kept when the kernel is not int8


def ort_cpu_bytes(model: onnx.ModelProto, emitted: onnx.ModelProto, kernels: Iterable,
                  specs: Container[str]) -> OrtCpuBytes:
    """Read what ORT's quantizer added to `model` (the normalised input) in `emitted` (every kernel
    of `kernels` int8 (their weights in `specs`), unpruned): per non-weight initializer its bytes
    per element, and what is left over (the activations' scales and zero points)."""
    kernels = list(kernels)
    sizes = {t.name: tensor_nbytes(t) for t in emitted.graph.initializer}
    dtypes = {t.name: t.data_type for t in emitted.graph.initializer}
    weights = {k.weight for k in kernels}
    claimed: set[str] = set()  # the kernel weights' encodings: cost.weight_nbytes counts those
    for k in kernels:
        if k.weight in specs:
            claimed.update(k.weight + s for s in _SUFFIXES[1:] if k.weight + s in sizes)
    per_element: dict[str, float] = {}
    int8_biases = set()
    for init in model.graph.initializer:
        if init.name in weights:
            continue
        names = [init.name + s for s in _SUFFIXES if init.name + s in sizes and init.name + s not in claimed]
        claimed.update(names)
        elements = max(1, _elements(init))
        per_element[init.name] = sum(sizes[n] for n in names) / elements
        if dtypes.get(init.name + "_quantized") == onnx.TensorProto.INT32:
            int8_biases.add(init.name)
    activations = sum(size for name, size in sizes.items() if name not in claimed)
    kernel_nodes = {k.name for k in kernels}
    producers = {o: n for n in model.graph.node for o in n.output}
    dropped_with = {}
    for node in model.graph.node:
        before = producers.get(node.input[0]) if node.input else None
        if before is None or before.name not in kernel_nodes:
            continue
        for name in node.input[1:]:
            if per_element.get(name, -1.0) == 0.0:
                dropped_with[name] = before.name
    return OrtCpuBytes(per_element, frozenset(int8_biases), activations, dropped_with)


def _elements(init: onnx.TensorProto) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n
