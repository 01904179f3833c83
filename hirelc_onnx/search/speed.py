"""`--speedup 1.5x --batch 32`: measured ORT latency as a search constraint.

The per-kernel latency table (`evaluate/kernel_latency.py`, measured once per model and machine)
steers: `SpeedGoal.estimate` predicts a config's speedup at the goal's batch (each kernel's fp32 or
int8 time, scaled by the share of its MACs pruning leaves; everything else as in fp32), and
`speed_repair` prunes until the estimate meets the goal, as `budget.repair` does for bytes. Every
candidate a method accepts is then timed whole against fp32 (`SpeedGoal.measure`, interleaved
medians): one below the goal is never returned while one above it exists.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import onnx

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.kernel_latency import LatencyTable
from hirelc_onnx.evaluate.runner import benchmark_side_by_side
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.search.budget import KEEP_STEP, MIN_KEEP, BudgetError
from hirelc_onnx.specs import weight_spec, weight_target

__all__ = ["SpeedGoal", "parse_speedup", "speed_repair"]


def parse_speedup(text: str | float | None) -> float | None:
    """'1.5x', '1.5', 1.5 -> 1.5 (fp32 latency / compressed latency); None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*", str(text))
    if not m or not float(m.group(1)) > 0:
        raise UserError(f"--speedup must look like '1.5x' (fp32 latency over the compressed model's), got {text!r}")
    return float(m.group(1))


@dataclass
class SpeedGoal:
    """At least `factor` times faster than fp32 at batch `batch`, in ORT on this machine."""

    factor: float
    batch: int
    table: LatencyTable
    fp32: onnx.ModelProto = field(repr=False)
    sample_shapes: Mapping[str, Sequence[int]] | None = None
    runs: int = 20
    measured: dict[int, float] = field(default_factory=dict)  # id(model) -> speedup, for the report

    def int8(self, bg: BlockGraph, config: CompressionConfig) -> set[str]:
        """The kernels that run as int8 kernels under `config`."""
        if config.target not in ("ort-cpu", "qdq"):
            return set()
        return {n for n, k in bg.kernels.items() if weight_spec(k, config.get(n)) is not None
                and weight_target(k, config.target) != "storage"}

    def estimate_cost(self, bg: BlockGraph, cost: ModelCost, int8: set[str]) -> float:
        """Estimated speedup of a model of `cost` whose kernels `int8` run int8."""
        b = self.batch
        rows = [r for r in self.table.values() if b in r.model_ms]
        if not rows:
            return 1.0
        model_ms = rows[0].model_ms[b]
        total = model_ms
        for name, row in self.table.items():
            if name not in cost.kernels or b not in row.fp32_ms:
                continue
            share = cost.kernels[name].macs / max(bg.kernels[name].macs, 1)
            own = row.int8_ms[b] if name in int8 else row.fp32_ms[b]
            total += own * share - row.fp32_ms[b]
        return model_ms / max(total, 1e-9)

    def estimate(self, bg: BlockGraph, config: CompressionConfig) -> float:
        return self.estimate_cost(bg, model_cost(bg, config), self.int8(bg, config))

    def measure(self, model: onnx.ModelProto) -> float:
        """fp32 latency / `model`'s at the goal's batch: the median of the timer's per-round ratios."""
        _, comp = benchmark_side_by_side([self.fp32, model], batch_size=self.batch, runs=self.runs, warmup=3,
                                         sample_shapes=self.sample_shapes)
        speed = comp["speedup"]
        self.measured[id(model)] = speed
        return speed

    def met(self, model: onnx.ModelProto) -> bool:
        return self.measure(model) >= self.factor

    def describe(self) -> str:
        return f"speedup >= {self.factor:g}x at batch {self.batch}"


def speed_repair(bg: BlockGraph, config: CompressionConfig, goal: SpeedGoal, margin: float = 1.05) -> CompressionConfig:
    """Prune until the estimated speedup reaches the goal (times `margin`: the estimate ignores the
    Quantize / Dequantize around int8 kernels): each step lowers by KEEP_STEP the keep of the
    prunable group whose step buys the most estimated speed, down to MIN_KEEP. Raises BudgetError
    when every group at MIN_KEEP still misses it."""
    kernels = {name: config.get(name) for name in bg.kernels}
    like = {"target": config.target, "channel_multiple": config.channel_multiple}
    current = goal.estimate(bg, CompressionConfig(dict(kernels), **like))
    while current < goal.factor * margin:
        best, best_speed = None, current
        for group in bg.groups:
            if not group.prunable or not group.producers:
                continue
            keep = round(max(kernels[p].keep_ratio for p in group.producers) - KEEP_STEP, 6)
            if keep < MIN_KEEP - 1e-9:
                continue
            trial = dict(kernels)
            for p in group.producers:
                trial[p] = replace(trial[p], keep_ratio=keep)
            speed = goal.estimate(bg, CompressionConfig(trial, **like))
            if speed > best_speed + 1e-9:
                best, best_speed = trial, speed
        if best is None:
            if current >= goal.factor:
                break
            raise BudgetError(f"{goal.describe()} is beyond pruning every channel group to {MIN_KEEP:.0%}: "
                              f"estimated {current:.2f}x from the per-kernel latency table")
        kernels, current = best, best_speed
    return CompressionConfig(kernels, **like)
