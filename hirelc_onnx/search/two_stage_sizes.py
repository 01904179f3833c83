"""The two-stage method's bookkeeping: configs per kernel, budgets and the exact bytes of what it emits.

`StageSizes` computes each kernel's stored bytes at every bit width once, exactly, from the
integers the quantizer writes and `passes.sparse_weights.choose_encoding` (the cost model does not
know sparse storage), so a stage-2 choice is sized without rewriting the model. `onto_flops` and
`project_densities` put a stage-1 choice onto its budgets (MACs, nonzero weights) by one factor
each, keeping the choice's shape; `repair_size` lowers bits until the size goal holds and
`fill_size` raises them while it still holds (the bytes left under the goal go where they help most);
`magnitude_masked` is the cheap stand-in for learned masks that the agents' episodes are scored on.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from hirelc_onnx.apply import apply_quantization
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import BlockGraph, Kernel
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.search.budget import bits_ladder
from hirelc_onnx.specs import fits_ranges, weight_spec, weight_target
from passes.clip_weights import mse_clipped
from passes.quantize import quantize
from passes.quantize_weights import encoding, stored_tensors
from passes.sparse_weights import DELTA4_OPSET, SparseWeightsPass, choose_encoding, dense_nbytes, stored_initializer
from passes.storage import encoded_nbytes, tensor_nbytes

__all__ = ["with_choices", "onto_flops", "project_densities", "magnitude_masked", "StageSizes", "emit_stage",
           "repair_size", "fill_size"]


def with_choices(config: CompressionConfig, **per_kernel: Mapping[str, object]) -> CompressionConfig:
    """`config` with fields replaced per kernel: with_choices(c, bits={"conv": 4})."""
    kernels = dict(config.kernels)
    for fld, values in per_kernel.items():
        for name, value in values.items():
            kernels[name] = replace(kernels[name], **{fld: value})
    return CompressionConfig(kernels, target=config.target, channel_multiple=config.channel_multiple).validate()


def onto_flops(bg: BlockGraph, config: CompressionConfig, prunable: list[str], target: float) -> CompressionConfig:
    """Scale the prunable kernels' keep ratios by one factor so the MACs fraction is at most `target`."""
    if model_cost(bg, config).macs_fraction <= target:
        return config
    ratios = {n: config.get(n).keep_ratio for n in prunable}

    def scaled(s: float) -> CompressionConfig:
        return with_choices(config, keep_ratio={n: max(0.05, r * s) for n, r in ratios.items()})

    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model_cost(bg, scaled(mid)).macs_fraction <= target else (lo, mid)
    return scaled(lo)


def project_densities(wanted: Mapping[str, float], params: Mapping[str, int], budget: float,
                      floor: float) -> dict[str, float]:
    """Scale the wanted densities by one factor (each clipped to [floor, 1]) so the kept entries are
    `budget` of all of them: sum d_i * params_i = budget * sum params_i (as near as the clip allows)."""
    total = sum(params[n] for n in wanted)

    def kept(s: float) -> float:
        return sum(min(1.0, max(floor, s * d)) * params[n] for n, d in wanted.items())

    lo, hi = 0.0, 1.0 / max(min(wanted.values()), 1e-9)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) <= budget * total else (lo, mid)
    return {n: min(1.0, max(floor, lo * d)) for n, d in wanted.items()}


def kept_count(density: float, size: int) -> int:
    """Entries a weight of `size` keeps at `density` (the rule the learned masks follow too)."""
    return max(1, int(round(density * size)))


def magnitude_masked(model: onnx.ModelProto, densities: Mapping[str, float]) -> onnx.ModelProto:
    """A copy of `model` with each named weight zeroed but its largest-magnitude `density` entries."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in densities:
            w = numpy_helper.to_array(t)
            flat = np.abs(w).reshape(-1)
            keep = np.argsort(-flat, kind="stable")[:kept_count(densities[t.name], flat.size)]
            mask = np.zeros(flat.size, dtype=bool)
            mask[keep] = True
            t.CopyFrom(numpy_helper.from_array(np.where(mask.reshape(w.shape), w, 0).astype(w.dtype), t.name))
    return out


class StageSizes:
    """Exact emitted bytes of any bitwidth choice for the stage-1 weights (sparse storage included).

    The sparse encodings open to a weight depend on the emitted model's opset (delta4 needs 21),
    which the quantized kernels raise, so each entry is kept for both sides of that line.
    """

    def __init__(self, bg: BlockGraph, tuned: onnx.ModelProto, base: CompressionConfig, sparse: bool,
                 ladder: tuple[int, ...] | None = None) -> None:
        """ladder: the bit widths to tabulate (None: the target's whole ladder)."""
        inits = {t.name: t for t in tuned.graph.initializer}
        weights = {k.weight for k in bg.kernels.values()}
        dense = apply_quantization(bg, tuned, with_choices(base, bits={n: 32 for n in bg.kernels}))
        self.other = sum(tensor_nbytes(t) for t in dense.graph.initializer if t.name not in weights)
        self.opset = next(o.version for o in dense.opset_import if o.domain in ("", "ai.onnx"))
        self.bg, self.target = bg, base.target
        self.table: dict[str, dict[int, tuple[int, int]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        clip = fits_ranges(bg, base)  # the integers are those of the range-clipped weights
        for name, k in bg.kernels.items():
            w = numpy_helper.to_array(inits[k.weight])
            self.shapes[name] = w.shape
            self.table[name] = {bits: tuple(self._kernel_bytes(w, k, replace(base.get(name), bits=bits), base.target,
                                                               sparse, opset, clip) for opset in (self.opset, DELTA4_OPSET))
                                for bits in (ladder or bits_ladder(base.target))}

    @staticmethod
    def _kernel_bytes(w: np.ndarray, kernel: Kernel, kc: KernelConfig, target: str, sparse: bool, opset: int,
                      clip: bool) -> int:
        spec = weight_spec(kernel, kc)
        if spec is None:
            return choose_encoding(w, opset).nbytes if sparse else dense_nbytes(w)
        target = weight_target(kernel, target)
        total = encoded_nbytes(w.shape, spec, target)
        if not sparse:
            return total
        if clip:
            w = mse_clipped(w, spec)
        enc = encoding(spec, target, w.shape)
        q = stored_tensors(quantize(w, spec), target).q.astype(onnx.helper.tensor_dtype_to_np_dtype(enc.container))
        return total - dense_nbytes(q) + choose_encoding(q, opset).nbytes

    def total(self, config: CompressionConfig) -> int:
        specs = {n: s for n, k in self.bg.kernels.items() if (s := weight_spec(k, config.get(n)))}
        opset = max([self.opset] + [encoding(s, weight_target(self.bg.kernels[n], self.target), self.shapes[n]).opset
                                    for n, s in specs.items()])
        side = int(opset >= DELTA4_OPSET)
        return self.other + sum(row[config.get(name).bits][side] for name, row in self.table.items())


def emit_stage(bg: BlockGraph, tuned: onnx.ModelProto, config: CompressionConfig,
               calib_batches: list[dict[str, np.ndarray]] | None = None,
               clip: bool = True) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Quantize the stage-1 weights for `config` and, for the storage target, store kernels sparsely
    where smaller; returns the model and {stored initializer: sparse encoding} for those that are.
    clip: as `apply.apply_quantization` (False for weights fine-tuned from `apply.clip_ranges`)."""
    model = apply_quantization(bg, tuned, config, calib_batches, clip=clip)
    if config.target != "storage":
        return model, {}
    ir_model = ir.from_proto(model)
    sparse = SparseWeightsPass([n for k in bg.kernel_list() if (n := stored_initializer(model, k.weight))])
    sparse(ir_model)
    return ir.to_proto(ir_model), {name: plan.encoding for name, plan in sparse.chosen.items()}


def repair_size(sizes: StageSizes, config: CompressionConfig, goal_bytes: float,
                cost: Callable[[str, int], float] | None = None) -> CompressionConfig:
    """Lower one kernel one rung at a time until the bytes meet the goal.

    cost(kernel, bits): the damage of that kernel alone at that width; with it, each step lowers
    the kernel whose step adds the least damage per byte saved, without it the kernel whose step
    saves the most bytes."""
    ladder = bits_ladder(config.target)
    while (current := sizes.total(config)) > goal_bytes:
        steps = [(n, max(b for b in ladder if b < config.get(n).bits)) for n in sizes.table
                 if config.get(n).bits > min(ladder)]
        saved = {step: current - sizes.total(with_choices(config, bits={step[0]: step[1]})) for step in steps}
        steps = [step for step in steps if saved[step] > 0]
        if not steps:
            return config
        if cost is None:
            name, bits = max(steps, key=lambda st: saved[st])
        else:
            name, bits = min(steps, key=lambda st: ((cost(st[0], st[1]) - cost(st[0], config.get(st[0]).bits))
                                                    / saved[st], -saved[st]))
        config = with_choices(config, bits={name: bits})
    return config


def fill_size(sizes: StageSizes, config: CompressionConfig, goal_bytes: float,
              cost: Callable[[str, int], float]) -> CompressionConfig:
    """Give the bytes left under the goal back: raise one kernel one rung at a time, the step that
    removes the most damage (`cost`, as in `repair_size`) per byte added, while the total stays
    within `goal_bytes`. A choice that lands short of the goal would otherwise be compared, at a
    higher ratio, against one that spends the whole budget."""
    ladder = bits_ladder(config.target)
    while True:
        current = sizes.total(config)
        steps = []
        for n in sizes.table:
            up = [b for b in ladder if b > config.get(n).bits]
            if not up:
                continue
            step = (n, min(up))
            added = sizes.total(with_choices(config, bits={n: step[1]})) - current
            gain = cost(n, config.get(n).bits) - cost(n, step[1])
            if current + added <= goal_bytes and gain > 0:
                steps.append((gain / max(added, 1), step))
        if not steps:
            return config
        _, (name, bits) = max(steps, key=lambda s: s[0])
        config = with_choices(config, bits={name: bits})
