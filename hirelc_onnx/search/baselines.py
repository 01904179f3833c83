"""Baselines every RL method is compared against, each emitting a model like the RL methods do.

  uniform   -- the same bits / keep ratio for every kernel (needs no data unless measured)
  l1-int8   -- L1-magnitude uniform channel pruning, then 8-bit weights (int8 activations too
               under ort-cpu)
  ort-int8  -- ONNX Runtime's own static int8 quantization of the fp32 model, with the settings
               that stay accurate on CPUs without VNNI (see passes.quantize_activations)
  random    -- random configs repaired to the budget, each measured for real; the best on the
               validation split wins (same evaluation budget as an RL run)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import GRANULARITIES, CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.search.budget import bits_ladder, repair
from hirelc_onnx.search.context import Measurement, SearchContext

__all__ = ["MethodResult", "candidate_record", "keep_for_flops", "run_uniform", "run_l1_int8", "run_ort_int8", "run_random",
           "BASELINES"]

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """What a method hands back: the chosen config, the emitted model, and every candidate tried."""

    config: CompressionConfig | None
    model: onnx.ModelProto = field(repr=False)
    val_score: float | None
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def candidate_record(m: Measurement, kind: str = "real", **more) -> dict:
    """One evaluated candidate as the report and plots want it."""
    return {"kind": kind, "score": m.score, "ratio": m.cost.ratio, "bytes": m.cost.total_bytes,
            "macs_fraction": m.cost.macs_fraction, "finetuned": m.finetuned, "seconds": m.seconds, **more}


def _uniform_config(bg: BlockGraph, target: str, bits: int, keep: float, qtype: str = "symmetric",
                    granularity: str = "per-channel") -> CompressionConfig:
    kernels = {}
    for name, k in bg.kernels.items():
        prunable = k.group is not None and bg.groups[k.group].prunable
        kernels[name] = KernelConfig(bits=bits, keep_ratio=keep if prunable else 1.0, qtype=qtype,
                                     granularity=granularity)
    return CompressionConfig(kernels, target=target).validate()


def run_uniform(bg: BlockGraph, ctx: SearchContext | None, target: str, *, bits: int = 8, keep: float = 1.0,
                qtype: str = "symmetric", granularity: str = "per-channel", **_) -> MethodResult:
    config = _uniform_config(bg, target, bits, keep, qtype, granularity)
    if ctx is None:
        return MethodResult(config, apply_config(bg, config), None)
    m = ctx.measure(config)
    return MethodResult(config, m.model, m.score, [candidate_record(m, method="uniform")])


def keep_for_flops(bg: BlockGraph, fraction: float, target: str = "storage") -> float:
    """The uniform keep ratio whose L1-pruned model has at most `fraction` of the original MACs
    (bisection on the cost model; MACs fall roughly with keep squared in conv chains)."""
    lo, hi = 0.05, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if model_cost(bg, _uniform_config(bg, target, 32, mid)).macs_fraction <= fraction:
            lo = mid
        else:
            hi = mid
    return lo


def run_l1_int8(bg: BlockGraph, ctx: SearchContext | None, target: str, *, keep: float = 0.5, **_) -> MethodResult:
    """8-bit containers; 7-bit weight grids under ort-cpu (no u8 x s8 saturation without VNNI)."""
    return run_uniform(bg, ctx, target, bits=7 if target == "ort-cpu" else 8, keep=keep)


def run_ort_int8(bg: BlockGraph, ctx: SearchContext | None, target: str, **_) -> MethodResult:
    """ORT's quantize_static on the fp32 model (activations and weights int8, QDQ)."""
    if ctx is None:
        raise UserError("--method ort-int8 calibrates activations: give --data")
    from passes.quantize_activations import quantize_activations

    model = quantize_activations(bg.model, ctx.calib_batches)
    from hirelc_onnx.evaluate.runner import predict

    score = ctx.score(predict(model, ctx.splits.val.x), ctx.splits.val)
    ratio = bg.weight_bytes / max(sum(len(t.raw_data) for t in model.graph.initializer), 1)
    return MethodResult(None, model, score, [{"kind": "real", "score": score, "ratio": ratio, "method": "ort-int8"}])


def random_config(bg: BlockGraph, target: str, rng: np.random.Generator) -> CompressionConfig:
    """A random point of the search space (before budget repair)."""
    bits_choices = tuple(b for b in bits_ladder(target) if b < 32)
    kernels = {}
    for name, k in bg.kernels.items():
        prunable = k.group is not None and bg.groups[k.group].prunable
        kernels[name] = KernelConfig(
            bits=int(rng.choice(bits_choices)), keep_ratio=float(rng.choice([0.5, 0.75, 1.0])) if prunable else 1.0,
            qtype=str(rng.choice(["symmetric", "asymmetric"])),
            granularity=str(rng.choice([g for g in GRANULARITIES if g != "log2"])))
    return CompressionConfig(kernels, target=target)


def run_random(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
               evaluations: int = 8, seed: int = 0, progress: Callable[[int, int], None] | None = None,
               **_) -> MethodResult:
    """Random search with the same number of real evaluations as the RL methods."""
    if ctx is None:
        raise UserError("--method random measures candidates: give --data")
    rng = np.random.default_rng(seed)
    best: Measurement | None = None
    history = []
    for i in range(evaluations):
        config = random_config(bg, target, rng)
        if budget:
            config = repair(bg, config, budget)
        m = ctx.measure(config)
        history.append(candidate_record(m, method="random", step=i))
        if best is None or m.score > best.score:
            best = m
        if progress:
            progress(i + 1, evaluations)
    return MethodResult(best.config, best.model, best.score, history)


BASELINES = {"uniform": run_uniform, "l1-int8": run_l1_int8, "ort-int8": run_ort_int8, "random": run_random}
