"""Cost model: parameters, MACs and bytes, counted the way the emitted model really stores them.

The budget's unit is true bytes: every initializer of the model after pruning, kernel weights at
their encoded size (integers + scales + zero points + codebooks, as `passes.storage` counts what
the quantization pass writes), everything the search did not touch at its stored size.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import BlockGraph, Kernel
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
    """Bytes and MACs of the model `bg` emitted under `config` (None: as it is).

    A search's reward calls this for thousands of configs a round: the model's initializer table is
    read once per BlockGraph (`_initializer_rows`) and each kernel's bytes once per (kernel, choice,
    shape, target) (`_kernel_bytes`), so a call costs a loop over the initializers, not a protobuf walk
    and an encoding layout per weight (EfficientNet-Lite0: about 10 ms a call before)."""
    config = config or CompressionConfig()
    counts = group_keep_counts(bg, config)
    shape_of: dict[str, tuple[int, ...]] = {}
    if counts:
        for (node, idx), shape in bg.analysis.pruned_initializer_shapes(counts).items():
            shape_of.setdefault(bg.analysis.nodes[node].input[idx], tuple(shape))

    added = _ort_added(bg, config)
    table = _initializer_table(bg)
    kernel_costs: dict[str, KernelCost] = {}
    kernel_bytes = decode = 0
    if added is None:  # the others at their stored size, those pruned scaled to what they keep
        others = table.other_bytes + sum(int(round(math.prod(shape) * table.per_elem[name])) - table.other[name]
                                         for name, shape in shape_of.items() if name in table.other)
    else:
        others = sum(_other_nbytes(name, math.prod(shape_of.get(name, dims)), table.per_elem[name], added)
                     for name, dims in table.other_dims.items())
    for name, stored, dims, full, kernel in table.kernels:
        shape = shape_of.get(name, dims)
        elems = math.prod(shape)
        nbytes, overhead = _kernel_bytes(kernel, config.get(kernel.name), shape, stored, config.target)
        decode += overhead
        kernel_bytes += nbytes
        kernel_costs[kernel.name] = KernelCost(kernel.name, elems, int(round(kernel.macs * elems / max(full, 1))),
                                               nbytes, stored, shape)
    total = others + kernel_bytes
    total += added[0].activation_bytes if added else 0
    nominal = np.mean([config.get(k).bits / 32 * config.get(k).keep_ratio for k in bg.kernels])
    return ModelCost(
        total_bytes=total, original_bytes=bg.weight_bytes, kernel_bytes=kernel_bytes,
        other_bytes=total - kernel_bytes, macs=sum(c.macs for c in kernel_costs.values()),
        original_macs=bg.total_macs, kernels=kernel_costs, nominal_ratio=float(1.0 / nominal),
        file_bytes=total + bg.structure_bytes + decode,
    )


@dataclass(frozen=True)
class _InitializerTable:
    """A graph's initializers as the cost model reads them (`_initializer_table`)."""

    kernels: list[tuple[str, int, tuple[int, ...], int, Kernel]]
    """(weight name, stored bytes, dims, elements, kernel) per kernel weight, in initializer order."""
    other: dict[str, int]
    """Every other initializer's bytes unpruned (its stored bytes, as `_other_nbytes` rounds them)."""
    other_dims: dict[str, tuple[int, ...]]
    per_elem: dict[str, float]
    """Stored bytes per element of every initializer."""
    other_bytes: int
    """sum(other.values())."""


_TABLES: OrderedDict[tuple[int, int, int], tuple[tuple, _InitializerTable]] = OrderedDict()
_TABLES_KEPT = 8


def _initializer_table(bg: BlockGraph) -> _InitializerTable:
    """`bg.model`'s initializers split into kernel weights and the others, built once per (model,
    kernels, stored sizes) and kept for the last few graphs (the key's objects are held, so an id is
    never reused while its entry lives)."""
    owners = (bg.model, bg.kernels, bg.initializer_bytes)
    key = tuple(id(o) for o in owners)
    entry = _TABLES.get(key)
    if entry is not None and all(a is b for a, b in zip(entry[0], owners)):
        _TABLES.move_to_end(key)
        return entry[1]
    weight_kernel = {k.weight: k for k in bg.kernels.values()}
    kernels, other, other_dims, per_elem = [], {}, {}, {}
    for init in bg.model.graph.initializer:
        stored, dims = bg.initializer_bytes[init.name], tuple(init.dims)
        full = math.prod(dims)
        per_elem[init.name] = stored / max(full, 1)
        kernel = weight_kernel.get(init.name)
        if kernel is None:
            other[init.name], other_dims[init.name] = int(round(full * per_elem[init.name])), dims
        else:
            kernels.append((init.name, stored, dims, full, kernel))
    table = _InitializerTable(kernels, other, other_dims, per_elem, sum(other.values()))
    _TABLES[key] = (owners, table)
    while len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return table


@functools.lru_cache(maxsize=1 << 16)
def _kernel_bytes(kernel: Kernel, kc: KernelConfig, shape: tuple[int, ...], stored: int,
                  target: str) -> tuple[int, int]:
    """(emitted bytes, decode-node overhead) of one kernel weight of (pruned) `shape` under `kc`."""
    return (weight_nbytes(kernel, kc, shape, stored, target),
            _decode_overhead(kernel.weight, weight_spec(kernel, kc), shape, weight_target(kernel, target)))


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
