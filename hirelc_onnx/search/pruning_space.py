"""The graph-RL action space: per-channel keep masks of the prunable groups, the resource limits they
must meet, and the projection that makes any sampled mask feasible.

A limit is a usage fraction of the original model measured by the cost model on the emitted
model: MACs (`flops=0.5`), kernel weight elements (`params=0.5`), stored bytes with every kernel at
`bits` (`budget=6`: bytes <= 1/6). `PruningSpace.project` moves a sample onto the boundary of those
limits in the policy's own order, checked on the exact cost model, so every scored, measured or
returned episode is feasible.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import InvalidOptionError, option
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.search.budget import BudgetError
from hirelc_onnx.search.gat import GraphObservation
from hirelc_onnx.search.speed import ACCEPT_MARGIN, SpeedGoal
from hirelc_onnx.specs import channel_unit

__all__ = ["DEFAULT_FLOPS", "Constraint", "resource_constraints", "PruningSpace"]

log = logging.getLogger(__name__)

DEFAULT_FLOPS = 0.5  # the target when the caller gives none


@dataclass(frozen=True)
class Constraint:
    """A resource limit: usage (a fraction of the original model) <= limit."""

    kind: str  # "flops" (MACs), "params" (kernel weight elements), "bytes" (stored bytes), "latency"
    limit: float
    goal: SpeedGoal | None = field(default=None, compare=False)  # latency: the --speedup goal that estimates it
    int8: frozenset[str] = frozenset()  # latency: the kernels that run int8 in every config of the space

    def usage(self, bg: BlockGraph, cost: ModelCost) -> float:
        if self.kind == "latency":  # estimated latency as a fraction of fp32's (search/speed.py)
            return 1.0 / self.goal.estimate_cost(bg, cost, set(self.int8))
        if self.kind == "flops":
            return cost.macs_fraction
        if self.kind == "params":
            full = sum(int(np.prod(k.weight_shape)) for k in bg.kernels.values())
            return sum(c.params for c in cost.kernels.values()) / max(full, 1)
        return cost.total_bytes / max(cost.original_bytes, 1)

    def describe(self) -> str:
        if self.kind == "latency":
            return self.goal.describe()
        return f"bytes <= 1/{1 / self.limit:g} of fp32" if self.kind == "bytes" else f"{self.kind} <= {self.limit:g}"


def resource_constraints(budget: float | None = None, flops: float | None = None,
                         params: float | None = None, goal: SpeedGoal | None = None,
                         int8: frozenset[str] = frozenset()) -> list[Constraint]:
    """The limits a run must meet: any of --budget Nx, --flops f, --params f, --speedup (a latency limit
    estimated from the per-kernel table, `int8` the kernels that run int8); flops 0.5 when none is given."""
    out = []
    for kind, value in (("flops", flops), ("params", params)):
        if value is not None:
            if not 0.0 < float(value) <= 1.0:
                raise InvalidOptionError(f"{option(kind)} is a fraction of the original model in (0, 1], got {value!r}")
            out.append(Constraint(kind, float(value)))
    if budget is not None:
        out.append(Constraint("bytes", 1.0 / float(budget)))
    if goal is not None:
        # the goal with the room a timed candidate needs to be accepted (`speed.ACCEPT_MARGIN`): a cut
        # projected onto the goal itself is timed at the edge and rejected about half the time
        out.append(Constraint("latency", 1.0 / (goal.factor * ACCEPT_MARGIN), goal, frozenset(int8)))
    return out or [Constraint("flops", DEFAULT_FLOPS)]


class PruningSpace:
    """Per-channel keep masks of the prunable groups <-> configs, their exact costs, and the projection."""

    def __init__(self, bg: BlockGraph, obs: GraphObservation, constraints: list[Constraint], target: str,
                 bits: int, min_keep: float, channel_multiple: int = 1) -> None:
        self.bg, self.obs, self.constraints, self.target, self.bits = bg, obs, constraints, target, bits
        self.limits = np.array([c.limit for c in constraints])
        self.lengths = obs.lengths.astype(int)
        self.multiple = channel_multiple
        self.units = np.array([channel_unit(int(n), channel_multiple) for n in self.lengths], dtype=int)
        self.floors = np.minimum(self.lengths, np.ceil(min_keep * self.lengths / self.units) * self.units)
        self.floors = np.maximum(self.floors, self.units).astype(int)

    def config(self, counts: np.ndarray) -> CompressionConfig:
        """The config whose groups keep `counts` channels (bits for every kernel); cost model and passes read it."""
        ratio = {}
        for gid, count, length in zip(self.obs.groups, counts, self.lengths):
            for producer in self.bg.groups[gid].producers:
                ratio[producer] = int(count) / length
        kernels = {name: KernelConfig(bits=self.bits, keep_ratio=ratio.get(name, 1.0)) for name in self.bg.kernels}
        # the multiple travels with the config: the cost model and the passes round to the space's unit
        return CompressionConfig(kernels, target=self.target, channel_multiple=self.multiple)

    @staticmethod
    def counts(masks: list[np.ndarray]) -> np.ndarray:
        """Kept channels per decided group."""
        return np.array([m.sum() for m in masks])

    def keep(self, masks: list[np.ndarray]) -> dict[int, np.ndarray]:
        """Explicit kept channel indices of the groups that lose channels."""
        return {gid: np.flatnonzero(m) for gid, m in zip(self.obs.groups, masks) if not m.all()}

    def usage(self, counts: np.ndarray) -> tuple[np.ndarray, ModelCost]:
        """Usage of every limit (and the exact cost) of the config keeping `counts` channels."""
        cost = model_cost(self.bg, self.config(counts))
        return self.usage_of(cost), cost

    def usage_of(self, cost: ModelCost) -> np.ndarray:
        """Usage of every limit by a model of this cost."""
        return np.array([c.usage(self.bg, cost) for c in self.constraints])

    def feasible(self, usage: np.ndarray) -> bool:
        return bool(np.all(usage <= self.limits + 1e-9))

    def check_reachable(self) -> None:
        """Raise BudgetError when every group at its floor still breaks a limit. A latency limit is the
        exception once whole-model timings have lowered its estimate (`SpeedGoal.scale` < 1, as
        `speed_repair` treats it): the table alone reached it, the calibration says the model runs
        slower than the table, so the limit becomes the floors' own estimate (prune as far as pruning
        goes; every candidate is timed whole and the report says the goal was missed)."""
        usage, _ = self.usage(self.floors)
        for i, c in enumerate(self.constraints):
            if usage[i] > self.limits[i] + 1e-9 and c.kind == "latency" and c.goal.scale < 1.0:
                log.warning("%s: pruning every channel group to its floor is estimated at %.2fx after calibration "
                            "against whole-model timings; searching as fast as pruning goes", c.describe(),
                            1.0 / usage[i])
                self.limits[i] = usage[i]
        if not self.feasible(usage):
            worst = int(np.argmax(usage / self.limits))
            raise BudgetError(f"{self.constraints[worst].describe()} is unreachable by pruning: every prunable "
                              f"group at its floor still uses {usage[worst]:.3f}")

    def uniform_counts(self, keep: float) -> np.ndarray:
        """Every group's kept channels at one keep fraction, rounded to its unit (at least its floor)."""
        return np.minimum(self.lengths, np.maximum(self.floors, np.round(keep * self.lengths / self.units)
                                                   * self.units)).astype(int)

    def uniform_keep(self) -> float:
        """The largest uniform keep fraction meeting every limit (the policy's starting point)."""
        lo, hi = 0.0, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.feasible(self.usage(self.uniform_counts(mid))[0]) else (lo, mid)
        return max(lo, 0.05)

    def project(self, masks: list[np.ndarray], probs: list[np.ndarray]) -> tuple[list[np.ndarray], ModelCost]:
        """The sampled masks moved onto the constraint boundary in the policy's own order.

        First each group's count is rounded to the nearest multiple of its unit (at least its
        floor), keeping sampled channels before unsampled ones and probable before improbable.
        Then, if a limit is exceeded, units of kept channels above the floors are dropped in
        ascending mean keep probability across all groups, as few as meet every limit; if every
        limit holds, units of dropped channels are added back in descending probability, as many
        as keep every limit (no episode wastes budget it was allowed). Usage is monotone along
        either order, so a binary search on the exact cost model finds the boundary.
        """
        masks = [m.copy() for m in masks]
        for m, p, unit, floor in zip(masks, probs, self.units, self.floors):
            count = max(floor, int(np.round(m.sum() / unit)) * unit)
            if count != m.sum():
                order = np.lexsort((-p, ~m))  # sampled first, then by probability
                m[:] = False
                m[order[:count]] = True
        counts = self.counts(masks)
        fill = self.feasible(self.usage(counts)[0])
        keys, groups, chunks = [], [], []
        for g, (m, p, unit, floor) in enumerate(zip(masks, probs, self.units, self.floors)):
            if fill:
                idx = np.flatnonzero(~m)
                idx = idx[np.argsort(-p[idx], kind="stable")]
            else:
                idx = np.flatnonzero(m)
                idx = idx[np.argsort(p[idx], kind="stable")][: len(idx) - floor]
            for i in range(0, len(idx), unit):
                chunks.append(idx[i:i + unit])
                keys.append(-p[chunks[-1]].mean() if fill else p[chunks[-1]].mean())
                groups.append(g)
        order = np.argsort(keys, kind="stable")  # within a group, chunk means are already in order
        chunks = [chunks[i] for i in order]
        sizes, groups = np.array([len(c) for c in chunks], int), np.array(groups, int)[order]

        def counts_after(k: int) -> np.ndarray:
            moved = np.bincount(groups[:k], weights=sizes[:k], minlength=len(counts)).astype(int)
            return counts + moved if fill else counts - moved

        def ok(k: int) -> bool:
            return self.feasible(self.usage(counts_after(k))[0])

        lo, hi = 0, len(chunks)  # fill: ok(lo), find the last ok; drop: not ok(lo), ok(hi) (floors are reachable)
        if fill and ok(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid) == fill:
                lo = mid
            else:
                hi = mid
        k = lo if fill else hi
        for g, chunk in zip(groups[:k], chunks[:k]):
            masks[g][chunk] = fill
        return masks, self.usage(counts_after(k))[1]
