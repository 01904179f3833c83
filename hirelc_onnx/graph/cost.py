"""Cost model: parameters, MACs and bytes, counted the way the emitted model really stores them.

The budget's unit is true bytes: every initializer of the model after pruning, kernel weights at
their encoded size (integers + scales + zero points + codebooks, as `passes.storage` counts what
the quantization pass writes), everything the search did not touch at its stored size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.ort_cpu_bytes import OrtCpuBytes
from hirelc_onnx.specs import group_keep_counts, int8_kernel, weight_spec, weight_target
from passes.weight_encoding import encoding, storage_layout
from passes.storage import encoded_nbytes

__all__ = ["KernelCost", "ModelCost", "model_cost", "weight_nbytes"]


@dataclass(frozen=True)
class KernelCost:
    name: str
    params: int  # weight elements kept
    macs: int
    weight_bytes: int  # the weight as emitted
    fp32_weight_bytes: int  # the weight as it was
    shape: tuple[int, ...] = ()  # the weight's shape after pruning


@dataclass(frozen=True)
class ModelCost:
    total_bytes: int  # every initializer of the emitted model
    original_bytes: int  # every initializer of the input model
    kernel_bytes: int
    other_bytes: int  # biases, norms, embeddings, heads the config leaves fp32
    macs: int
    original_macs: int
    kernels: dict[str, KernelCost]
    nominal_ratio: float  # the literature's figure: 1 / mean over kernels of (bits/32 * keep)
    file_bytes: int  # estimate of the serialized file: weights + graph structure + decode nodes

    @property
    def ratio(self) -> float:
        """True-bytes compression ratio: original bytes / emitted bytes."""
        return self.original_bytes / max(self.total_bytes, 1)

    @property
    def macs_fraction(self) -> float:
        return self.macs / max(self.original_macs, 1)

    def as_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes, "original_bytes": self.original_bytes, "ratio": self.ratio,
            "kernel_bytes": self.kernel_bytes, "other_bytes": self.other_bytes, "macs": self.macs,
            "original_macs": self.original_macs, "macs_fraction": self.macs_fraction,
            "nominal_ratio_unweighted_bits_times_keep": self.nominal_ratio, "file_bytes_estimate": self.file_bytes,
        }


def model_cost(bg: BlockGraph, config: CompressionConfig | None = None) -> ModelCost:
    """Bytes and MACs of the model `bg` emitted under `config` (None: as it is)."""
    config = config or CompressionConfig()
    counts = group_keep_counts(bg, config)
    sliced = bg.analysis.pruned_initializer_shapes(counts)
    shape_of: dict[str, list[int]] = {}
    for (node, idx), shape in sliced.items():
        shape_of.setdefault(bg.analysis.nodes[node].input[idx], shape)
    weight_kernel = {k.weight: k for k in bg.kernels.values()}

    added = _ort_added(bg, config)
    kernel_costs: dict[str, KernelCost] = {}
    total = kernel_bytes = decode = 0
    for init in bg.model.graph.initializer:
        stored = bg.initializer_bytes[init.name]
        dims = list(init.dims)
        shape = shape_of.get(init.name, dims)
        elems = math.prod(shape)
        per_elem = stored / max(math.prod(dims), 1)
        kernel = weight_kernel.get(init.name)
        if kernel is None:
            total += _other_nbytes(init.name, elems, per_elem, added)
            continue
        kc = config.get(kernel.name)
        nbytes = weight_nbytes(kernel, kc, tuple(shape), stored, config.target)
        decode += _decode_overhead(kernel.weight, weight_spec(kernel, kc), tuple(shape),
                                   weight_target(kernel, config.target))
        total += nbytes
        kernel_bytes += nbytes
        full = math.prod(dims)
        kernel_costs[kernel.name] = KernelCost(kernel.name, elems, int(round(kernel.macs * elems / max(full, 1))),
                                               nbytes, stored, tuple(shape))
    total += added[0].activation_bytes if added else 0
    nominal = np.mean([config.get(k).bits / 32 * config.get(k).keep_ratio for k in bg.kernels])
    return ModelCost(
        total_bytes=total, original_bytes=bg.weight_bytes, kernel_bytes=kernel_bytes,
        other_bytes=total - kernel_bytes, macs=sum(c.macs for c in kernel_costs.values()),
        original_macs=bg.total_macs, kernels=kernel_costs, nominal_ratio=float(1.0 / nominal),
        file_bytes=total + bg.structure_bytes + decode,
    )


def _ort_added(bg: BlockGraph, config: CompressionConfig) -> tuple[OrtCpuBytes, dict[str, int], set[str]] | None:
    """Under ort-cpu with ORT's quantizer in play (some kernel int8, `bg.ort_cpu_bytes` read from
    its output): that reading; per int8 kernel's bias the number of weight scales (its int32 bias
    stores a scale and a zero point per scale; 0: one a channel kept); the constants that stay as
    stored, next to a kernel left fp32. None otherwise: nothing but the weights changes."""
    added = bg.ort_cpu_bytes
    if added is None or config.target != "ort-cpu":
        return None
    scales, as_stored, any_int8 = {}, set(), False
    for name, kernel in bg.kernels.items():
        spec = weight_spec(kernel, config.get(name))
        if int8_kernel(kernel, spec, config.target):
            any_int8 = True
            if kernel.bias in added.int8_biases:
                scales[kernel.bias] = 1 if spec.granularity == "per-tensor" else 0  # 0: one a channel kept
        else:  # ORT leaves this kernel fp32: its bias, and the constants after it, stay as stored
            as_stored.update(c for c, k in added.dropped_with.items() if k == name)
            if kernel.bias in added.int8_biases:
                as_stored.add(kernel.bias)
    return (added, scales, as_stored) if any_int8 else None


def _other_nbytes(name: str, elems: int, per_elem: float, added) -> int:
    """Bytes of an initializer that is not a kernel weight, `elems` of its elements kept: as stored,
    or as ORT's quantizer writes it (`graph/ort_cpu_bytes.py`): an int8 kernel's bias as int32 with
    a float scale and an int32 zero point per weight scale, a constant it quantizes at the bytes per
    element it was measured to take; an int32 bias of a kernel left out of int8 stays as stored."""
    if added is None:
        return int(round(elems * per_elem))
    reading, scales, as_stored = added
    if name in scales:
        return 4 * elems + 8 * (scales[name] or elems)
    if name in as_stored or name not in reading.per_element:
        return int(round(elems * per_elem))
    return int(round(elems * reading.per_element[name]))


def weight_nbytes(kernel, kc, shape: tuple[int, ...], stored_bytes: int, target: str) -> int:
    """Bytes of one kernel weight of (pruned) `shape` under choice `kc`: its encoding when
    quantized, else its stored bytes scaled to the elements kept."""
    spec = weight_spec(kernel, kc)
    if spec is not None:
        return encoded_nbytes(shape, spec, weight_target(kernel, target))
    return round(math.prod(shape) * stored_bytes / max(math.prod(kernel.weight_shape), 1))


def _decode_overhead(weight: str, spec, shape: tuple[int, ...], target: str) -> int:
    """Approximate serialized bytes of a quantized weight's decode nodes and initializer headers.

    ort-cpu / qdq (one DequantizeLinear): measured on the onnx light zoo, 170-480 bytes a kernel,
    growing with the name length. storage: counted from the decode's shape (its nodes, its
    short-named operands and the tensors named after the weight), with the bytes per item fitted
    on the reference models' decodes at 2-8 bits (mean error about 10 bytes a kernel).
    """
    if spec is None:
        return 0
    if target != "storage":
        if spec.granularity == "per-group" or spec.granularity == "log2":
            return 8 * len(weight) + 120
        return 4 * len(weight) + 60
    nodes, operands, named = _storage_decode_items(spec, shape)
    return max(0, 48 * nodes + 18 * operands + named * (17 + 2 * len(weight)) - 42)


def _storage_decode_items(spec, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(nodes, short-named operands, tensors named after the weight) of a storage decode
    (`passes.quantize_weights`, rules 1-4)."""
    enc, layout = encoding(spec, "storage", shape), storage_layout(shape, spec)
    nodes, operands, named = 1, 0, 2  # Mul by the scale; <W>_quantized, <W>_scale
    tensors = [layout.view] + ([layout.params] if enc.zero_point and layout.params else [])
    if enc.decode == "codebook":  # Cast -> Gather, <W>_codebook
        nodes, named, tensors = nodes + 2, named + 1, tensors[1:]
    padded = False
    for dims in tensors:
        if not enc.packed:
            nodes += 1  # Cast
            continue
        nodes, operands = nodes + 4, operands + 1  # BitwiseAnd, Cast, Mul, Reshape; its shape
        if math.prod(dims) % 4:
            nodes, operands, padded = nodes + 2, operands + 1, True  # Reshape [-1], Slice; its end
    if enc.packed:
        operands += 2 + 2 * padded  # masks, unshift; [-1], [0]
    if enc.zero_point:
        nodes, named = nodes + 1, named + 1  # Sub; <W>_zero_point
    elif enc.offset:
        nodes, operands = nodes + 2, operands + 2  # BitwiseXor, Sub; their sign flip and offset
    if layout.spread is not None:
        nodes += 3 * (1 + (enc.zero_point and bool(layout.params)))
        operands += 4 + (not padded)
    if layout.final is not None:
        nodes, operands = nodes + 1, operands + 1
    if layout.perm is not None:
        nodes += 1
    return nodes, operands, named
