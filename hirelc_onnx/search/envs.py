"""HiReLC's two gymnasium environments, over one shared `SearchProblem`.

  BudgetEnv (high level, one per model): action = a budget level per block, an index into
      `level_table` (target storage fraction, max pruning, min bits) from aggressive to generous,
      shifted by the block's sensitivity (sensitive blocks get more generous levels). A level is
      realized in a block by the block's low-level agents' voted choice when they were trained at
      that level, else by a deterministic greedy fill (`SearchProblem.realize`).
  BlockEnv (low level, one per block): action = MultiDiscrete per kernel [bitwidth index,
      keep-ratio index, qtype, granularity], decoded within the block's level; observation = the
      block's kernels' features (normalised params, MACs, fan-in/out, position, prunable, bytes
      share, sensitivity) and current choices, plus the level, current vs target compression and
      the last accuracy signal.

Both reward the same five parts (`RewardParts`): accuracy (estimated, in points vs fp32) +
compression (true bytes, `model_cost`) - budget distance - instability (change vs the previous
voted choice) - sensitivity penalty (aggressive choices on sensitive kernels). An episode is
`episode_steps` refinement steps from the current voted configuration.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Protocol

import gymnasium as gym
import numpy as np

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import MAX_BLOCK_KERNELS, BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.search.budget import KEEP_STEP, MIN_KEEP, bits_ladder, granularity_choices, qtype_choices
from hirelc_onnx.search.features import (CHOICE_FEATURES, STATIC_FEATURES, aggressiveness, config_key,
                                         encode_choice, is_prunable, kernel_features)

__all__ = ["RewardWeights", "RewardParts", "BudgetLevel", "level_table", "sensitivity_shifts", "keep_ladder",
           "granularity_choices", "Evaluation", "SearchProblem", "BlockEnv", "BudgetEnv"]

log = logging.getLogger(__name__)

_OBS_CLIP = 10.0
_BLOCK_GLOBALS = 7
_BLOCK_FEATURES = 6
_HIGH_GLOBALS = 3


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the five reward parts; ensemble members differ by scaling them."""

    accuracy: float = 1.0
    """Per percentage point of estimated accuracy against the fp32 validation score."""
    compression: float = 0.5
    """Per unit of log(ratio) / log(budget), capped at 1.25 (reaching the budget is worth 1)."""
    budget: float = 30.0
    """Per unit of budget distance (shortfall in log-ratio units; block levels' misses)."""
    instability: float = 0.5
    """Per unit of change against the previous voted choice (0 = same, 1 = every field changed fully)."""
    sensitivity: float = 1.0
    """Per unit of sensitivity-weighted aggressiveness (mean over kernels)."""

    def scaled(self, **factors: float) -> "RewardWeights":
        return replace(self, **{name: getattr(self, name) * f for name, f in factors.items()})


@dataclass(frozen=True)
class RewardParts:
    accuracy: float
    compression: float
    budget: float
    instability: float
    sensitivity: float

    def total(self, w: RewardWeights) -> float:
        return (w.accuracy * self.accuracy + w.compression * self.compression - w.budget * self.budget
                - w.instability * self.instability - w.sensitivity * self.sensitivity)


@dataclass(frozen=True)
class BudgetLevel:
    """What the high level grants a block: bytes, pruning and bit floor."""

    storage_fraction: float  # target bytes of the block's kernel weights / their fp32 bytes
    max_pruning: float  # at most this fraction of output channels removed
    min_bits: int  # no kernel of the block below this width


def keep_ladder() -> tuple[float, ...]:
    """Keep ratios an agent may choose: MIN_KEEP to 1 in KEEP_STEP steps (those the repair step uses)."""
    n = int(round((1.0 - MIN_KEEP) / KEEP_STEP))
    return tuple(round(MIN_KEEP + i * KEEP_STEP, 6) for i in range(n + 1))


def level_table(budget: float, target: str, n_levels: int = 7,
                span: tuple[float, float] = (0.4, 2.5)) -> tuple[BudgetLevel, ...]:
    """Budget levels from most aggressive (0) to most generous (n_levels - 1).

    The storage fraction of level i is (1 / budget) times a multiplier spread geometrically over
    `span`, so the middle level asks every block for the budget itself and the table scales with
    the budget; the bit floor climbs the target's containers (`bits_ladder`) and the allowed
    pruning falls linearly from 1 - MIN_KEEP to 0.
    """
    rungs = sorted(b for b in bits_ladder(target) if b < 32)
    levels = []
    for i in range(n_levels):
        t = i / max(n_levels - 1, 1)
        multiplier = span[0] * (span[1] / span[0]) ** t
        min_bits = rungs[min(int(t * len(rungs)), len(rungs) - 1)]
        pruning = round((1.0 - MIN_KEEP) * (1.0 - t) / KEEP_STEP) * KEEP_STEP
        levels.append(BudgetLevel(min(1.0, multiplier / budget), pruning, min_bits))
    return tuple(levels)


def sensitivity_shifts(block_sensitivity: np.ndarray, scale: float = 1.0, max_shift: int = 2) -> np.ndarray:
    """Level offsets per block: + for blocks more sensitive than average (more generous), - for less."""
    s = np.asarray(block_sensitivity, dtype=np.float64)
    if s.size < 2 or s.std() < 1e-12:
        return np.zeros(s.size, dtype=np.int64)
    z = (s - s.mean()) / s.std()
    return np.clip(np.round(scale * z), -max_shift, max_shift).astype(np.int64)


class AccuracySignal(Protocol):
    def predict(self, config: CompressionConfig, cost: ModelCost, key: str | None = None):
        """An estimate with an `.accuracy` field (the validation score the config would get)."""


@dataclass(frozen=True)
class Evaluation:
    """A config judged without ONNX Runtime: true-bytes cost and the estimated accuracy."""

    config: CompressionConfig
    key: str  # features.config_key
    cost: ModelCost
    accuracy: float


class SearchProblem:
    """What both levels share: the model, the budget, the ladders, the sensitivities, and the working config.

    `current` is the configuration the agents refine (the last voted one, updated block by block
    as the low-level ensembles vote); `previous` is the one the instability term compares with.
    """

    def __init__(self, bg: BlockGraph, budget: float, target: str, accuracy: AccuracySignal,
                 kernel_sensitivity: dict[str, float], block_sensitivity: dict[int, float], fp32_score: float, *,
                 base_weights: RewardWeights = RewardWeights(), n_levels: int = 7,
                 level_span: tuple[float, float] = (0.4, 2.5), sensitivity_shift: float = 1.0,
                 max_shift: int = 2) -> None:
        self.bg = bg
        self.budget = budget
        self.target = target
        self.accuracy = accuracy
        self.fp32_score = fp32_score
        self.base_weights = base_weights
        self.sensitivity = kernel_sensitivity
        self.bits = tuple(sorted(bits_ladder(target)))
        self.keeps = keep_ladder()
        self.qtypes = qtype_choices(target)
        self.granularities = granularity_choices(target)
        self.levels = level_table(budget, target, n_levels, level_span)
        self.blocks = [list(b.kernels) for b in bg.blocks]
        self.block_sensitivity = np.array([block_sensitivity.get(b.id, 0.0) for b in bg.blocks])
        self.shifts = sensitivity_shifts(self.block_sensitivity, sensitivity_shift, max_shift)
        self.max_shift = max_shift
        self.static = kernel_features(bg)
        self.prunable = {n: is_prunable(bg, n) for n in bg.kernels}
        self._fp32_bytes = {n: bg.initializer_bytes[k.weight] for n, k in bg.kernels.items()}
        self._block_static = self._block_summary()
        self._realized: dict[tuple[int, int], dict[str, KernelConfig]] = {}
        self._costs: dict[str, ModelCost] = {}
        neutral = n_levels // 2
        self.block_levels = np.clip(neutral + self.shifts, 0, n_levels - 1)
        self.current: dict[str, KernelConfig] = {}
        for b in range(len(self.blocks)):
            self.current.update(self.realize(b, int(self.block_levels[b])))
        self.previous = dict(self.current)
        self.previous_levels = self.block_levels.copy()
        self.pool: dict[str, tuple[float, CompressionConfig]] = {}

    # --- configs and their evaluation ---------------------------------------------------
    def config(self, kernels: dict[str, KernelConfig]) -> CompressionConfig:
        return CompressionConfig(dict(kernels), target=self.target)

    def evaluate(self, kernels: dict[str, KernelConfig]) -> Evaluation:
        """True-bytes cost (cached by config) and the accuracy signal of a full kernel assignment."""
        config = self.config(kernels)
        key = config_key(config)
        if key not in self._costs:
            self._costs[key] = model_cost(self.bg, config)
        cost = self._costs[key]
        return Evaluation(config, key, cost, float(self.accuracy.predict(config, cost, key).accuracy))

    def begin_round(self) -> None:
        """A new round: the accuracy signal was refitted, the current config becomes the reference."""
        self._costs.clear()
        self.pool.clear()
        self.previous = dict(self.current)
        self.previous_levels = self.block_levels.copy()

    def remember(self, evaluation: Evaluation, reward: float) -> None:
        """Keep every visited config with its reward under the base weights (the ones every ensemble
        member scales): the active-learning candidate pool."""
        key = evaluation.key
        if key not in self.pool or self.pool[key][0] < reward:
            self.pool[key] = (reward, evaluation.config)

    def best_pool(self, n: int) -> list[CompressionConfig]:
        return [c for _, c in sorted(self.pool.values(), key=lambda rc: -rc[0])[:n]]

    # --- levels ---------------------------------------------------------------------------
    def effective_levels(self, action: np.ndarray) -> np.ndarray:
        """Agent levels shifted by block sensitivity, clipped to the table."""
        return np.clip(np.asarray(action, dtype=np.int64) + self.shifts, 0, len(self.levels) - 1)

    def block_fraction(self, block: int, kernels: dict[str, KernelConfig], cost: ModelCost | None = None) -> float:
        """Stored bytes of the block's kernel weights over their fp32 bytes."""
        if cost is None:
            cost = model_cost(self.bg, self.config({n: kernels[n] for n in self.blocks[block]}))
        names = self.blocks[block]
        return sum(cost.kernels[n].weight_bytes for n in names) / max(sum(self._fp32_bytes[n] for n in names), 1)

    def clip_to_level(self, name: str, kc: KernelConfig, level: BudgetLevel) -> KernelConfig:
        bits = kc.bits if kc.bits >= level.min_bits else level.min_bits
        keep = max(kc.keep_ratio, 1.0 - level.max_pruning) if self.prunable[name] else 1.0
        keep = min(k for k in self.keeps if k >= keep - 1e-9)
        return replace(kc, bits=bits, keep_ratio=keep)

    def realize(self, block: int, level_index: int) -> dict[str, KernelConfig]:
        """A deterministic fill of a level: fp32 everywhere, then one rung at a time, the least
        sensitive (then largest) kernel that can still drop bits drops to the next container; once
        every kernel sits at the level's bit floor, keep ratios step down to the pruning limit (groups
        produced inside the block only) in the same order. Stops when the block meets the level's
        storage fraction or nothing can be lowered. Cached: it depends on the level only."""
        if (block, level_index) in self._realized:
            return dict(self._realized[(block, level_index)])
        level = self.levels[level_index]
        names = self.blocks[block]
        kernels = {n: self.clip_to_level(n, KernelConfig(bits=32), level) for n in names}
        order = sorted(names, key=lambda n: (self.sensitivity.get(n, 0.0), -self._fp32_bytes[n], n))
        while self.block_fraction(block, kernels) > level.storage_fraction:
            lowered = next((step for lower in (self._lower_bits, self._lower_keep) for name in order
                            if (step := lower(name, kernels, level)) is not None), None)
            if lowered is None:
                break
            kernels.update(lowered)
        self._realized[(block, level_index)] = dict(kernels)
        return kernels

    def _lower_bits(self, name: str, kernels: dict[str, KernelConfig],
                    level: BudgetLevel) -> dict[str, KernelConfig] | None:
        lower = [b for b in self.bits if level.min_bits <= b < kernels[name].bits]
        return {name: replace(kernels[name], bits=max(lower))} if lower else None

    def _lower_keep(self, name: str, kernels: dict[str, KernelConfig],
                    level: BudgetLevel) -> dict[str, KernelConfig] | None:
        kc = kernels[name]
        if not self.prunable[name] or kc.keep_ratio - KEEP_STEP < 1.0 - level.max_pruning - 1e-9:
            return None
        producers = self.bg.groups[self.bg.kernels[name].group].producers
        if any(p not in kernels for p in producers):  # a group shared with other blocks prunes only as one
            return None
        keep = round(kc.keep_ratio - KEEP_STEP, 6)
        return {p: replace(kernels[p], keep_ratio=keep) for p in producers}

    def assemble(self, levels: np.ndarray) -> dict[str, KernelConfig]:
        """The full config for effective block levels: the low level's current choice where its level is
        unchanged, the greedy fill elsewhere."""
        kernels = {}
        for b, names in enumerate(self.blocks):
            if int(levels[b]) == int(self.block_levels[b]):
                kernels.update({n: self.current[n] for n in names})
            else:
                kernels.update(self.realize(b, int(levels[b])))
        return kernels

    def anchor(self, config: CompressionConfig) -> None:
        """Make `config` the working config the agents refine (HiReLC's incumbent: the best measured,
        or the prior before any): every kernel's choice as it is, each block at the level whose storage
        fraction is nearest the block's own (a level the agents leave unchanged keeps these choices)."""
        kernels = {n: config.get(n) for n in self.bg.kernels}
        cost = model_cost(self.bg, self.config(kernels))
        levels = []
        for b in range(len(self.blocks)):
            fraction = max(self.block_fraction(b, kernels, cost), 1e-9)
            levels.append(int(np.argmin([abs(math.log(fraction / lv.storage_fraction)) for lv in self.levels])))
        self.current = kernels
        self.block_levels = np.asarray(levels, dtype=np.int64)

    def set_levels(self, levels: np.ndarray) -> None:
        """Adopt voted levels: blocks whose level changed restart from the level's greedy fill."""
        self.current = self.assemble(levels)
        self.block_levels = np.asarray(levels, dtype=np.int64).copy()

    # --- low-level actions ------------------------------------------------------------------
    def block_nvec(self, block: int) -> list[int]:
        return [len(self.bits), len(self.keeps), len(self.qtypes), len(self.granularities)] * len(self.blocks[block])

    def decode(self, block: int, action: np.ndarray) -> dict[str, KernelConfig]:
        """A low-level action as kernel configs, clipped to the block's level (bit floor, pruning limit)."""
        level = self.levels[int(self.block_levels[block])]
        out = {}
        for i, name in enumerate(self.blocks[block]):
            b, k, q, g = (int(v) for v in action[4 * i: 4 * i + 4])
            kc = KernelConfig(bits=self.bits[b], keep_ratio=self.keeps[k], qtype=self.qtypes[q],
                              granularity=self.granularities[g])
            out[name] = self.clip_to_level(name, kc, level)
        return out

    def _indices(self, kc: KernelConfig) -> tuple[int, int, int, int]:
        """A choice as the nearest action; a grid outside the target's choices (the knapsack gives a
        weight ORT decodes at load, an embedding table under ort-cpu, storage's grids) reads as the first."""
        bits = int(np.argmin([abs(math.log2(b) - math.log2(kc.bits)) for b in self.bits]))
        keep = int(np.argmin([abs(k - kc.keep_ratio) for k in self.keeps]))
        gran = self.granularities.index(kc.granularity) if kc.granularity in self.granularities else 0
        qtype = self.qtypes.index(kc.qtype) if kc.qtype in self.qtypes else 0
        return bits, keep, qtype, gran

    def change(self, name: str, kc: KernelConfig) -> float:
        """How far a kernel's choice moved from the previous voted one, in [0, 1]."""
        a, b = self._indices(kc), self._indices(self.previous[name])
        return (abs(a[0] - b[0]) / max(len(self.bits) - 1, 1) + abs(a[1] - b[1]) / max(len(self.keeps) - 1, 1)
                + float(a[2] != b[2]) + float(a[3] != b[3])) / 4.0

    # --- reward parts ------------------------------------------------------------------------
    def _common(self, ev: Evaluation, names: list[str]) -> tuple[float, float, float, float]:
        log_budget = math.log(self.budget)
        accuracy = 100.0 * (ev.accuracy - self.fp32_score)
        compression = min(math.log(max(ev.cost.ratio, 1e-9)) / log_budget, 1.25)
        shortfall = max(0.0, math.log(self.budget / ev.cost.ratio)) / log_budget
        sensitivity = float(np.mean([self.sensitivity.get(n, 0.0) * aggressiveness(ev.config.get(n), MIN_KEEP)
                                     for n in names]))
        return accuracy, compression, shortfall, sensitivity

    def block_parts(self, block: int, block_kernels: dict[str, KernelConfig]) -> tuple[RewardParts, Evaluation]:
        """Reward parts of a block choice, spliced into the current config of the other blocks.

        Budget distance: the global shortfall plus half the block's miss of its level's storage
        fraction (|log(fraction / target)| / log(budget)), so a block neither hoards nor starves.
        """
        ev = self.evaluate({**self.current, **block_kernels})
        names = self.blocks[block]
        accuracy, compression, shortfall, sensitivity = self._common(ev, names)
        target = self.levels[int(self.block_levels[block])].storage_fraction
        miss = abs(math.log(max(self.block_fraction(block, block_kernels, ev.cost), 1e-9) / target))
        budget = shortfall + 0.5 * miss / math.log(self.budget)
        instability = float(np.mean([self.change(n, block_kernels[n]) for n in names]))
        return RewardParts(accuracy, compression, budget, instability, sensitivity), ev

    def level_parts(self, levels: np.ndarray) -> tuple[RewardParts, Evaluation]:
        """Reward parts of effective block levels (realized by `assemble`).

        Budget distance: the global shortfall plus a fifth of the overshoot (bytes spent below the
        budget are accuracy given away). Instability: mean level change over the table's width.
        """
        ev = self.evaluate(self.assemble(levels))
        accuracy, compression, shortfall, sensitivity = self._common(ev, list(self.bg.kernels))
        overshoot = max(0.0, math.log(ev.cost.ratio / self.budget)) / math.log(self.budget)
        instability = float(np.mean(np.abs(levels - self.previous_levels))) / max(len(self.levels) - 1, 1)
        return RewardParts(accuracy, compression, shortfall + 0.2 * overshoot, instability, sensitivity), ev

    def block_reward(self, block: int, block_kernels: dict[str, KernelConfig]) -> float:
        """The base-weights reward of a block choice (what a voted choice must beat to be adopted)."""
        return self.block_parts(block, block_kernels)[0].total(self.base_weights)

    def level_reward(self, levels: np.ndarray) -> float:
        """The base-weights reward of effective block levels."""
        return self.level_parts(levels)[0].total(self.base_weights)

    # --- observations -------------------------------------------------------------------------
    def _globals(self, ev: Evaluation) -> list[float]:
        return [math.log(ev.cost.ratio / self.budget) / math.log(self.budget), ev.accuracy / max(abs(self.fp32_score), 1e-9)]

    def block_observation(self, block: int, block_kernels: dict[str, KernelConfig], ev: Evaluation,
                          progress: float) -> np.ndarray:
        level = self.levels[int(self.block_levels[block])]
        rows = []
        for name in self.blocks[block]:
            rows.append(self.static[name])
            rows.append([self.sensitivity.get(name, 0.0)])
            rows.append(encode_choice(block_kernels[name], self.granularities))
        fraction = self.block_fraction(block, block_kernels, ev.cost)
        rows.append([math.log(level.storage_fraction), level.max_pruning, math.log2(level.min_bits) / 5.0,
                     math.log(max(fraction, 1e-9) / level.storage_fraction), *self._globals(ev), progress])
        return np.clip(np.concatenate(rows), -_OBS_CLIP, _OBS_CLIP).astype(np.float32)

    def block_obs_size(self, block: int) -> int:
        return len(self.blocks[block]) * (STATIC_FEATURES + 1 + CHOICE_FEATURES) + _BLOCK_GLOBALS

    def _block_summary(self) -> np.ndarray:
        total = max(sum(self._fp32_bytes.values()), 1)
        macs = max(self.bg.total_macs, 1)
        return np.array([[sum(self._fp32_bytes[n] for n in names) / total,
                          sum(self.bg.kernels[n].macs for n in names) / macs, len(names) / MAX_BLOCK_KERNELS,
                          self.block_sensitivity[b], self.shifts[b] / max(self.max_shift, 1)]
                         for b, names in enumerate(self.blocks)], dtype=np.float32)

    def level_observation(self, levels: np.ndarray, ev: Evaluation, progress: float) -> np.ndarray:
        per_block = np.concatenate([self._block_static, (levels / max(len(self.levels) - 1, 1))[:, None]],
                                   axis=1)
        obs = np.concatenate([per_block.ravel(), self._globals(ev), [progress]])
        return np.clip(obs, -_OBS_CLIP, _OBS_CLIP).astype(np.float32)

    def level_obs_size(self) -> int:
        return len(self.blocks) * _BLOCK_FEATURES + _HIGH_GLOBALS


class _RefinementEnv(gym.Env):
    """Shared episode mechanics: `episode_steps` refinements, each visited config offered to the pool."""

    metadata = {"render_modes": []}

    def __init__(self, problem: SearchProblem, weights: RewardWeights, episode_steps: int) -> None:
        self.problem = problem
        self.weights = weights
        self.episode_steps = episode_steps
        self._t = 0

    def _finish_step(self, parts: RewardParts, ev: Evaluation) -> tuple[float, bool]:
        self.problem.remember(ev, parts.total(self.problem.base_weights))
        self._t += 1
        return parts.total(self.weights), self._t >= self.episode_steps


class BlockEnv(_RefinementEnv):
    """Low level: choose [bits, keep, qtype, granularity] for every kernel of one block under its level."""

    def __init__(self, problem: SearchProblem, block: int, weights: RewardWeights | None = None,
                 episode_steps: int = 2) -> None:
        super().__init__(problem, weights or RewardWeights(), episode_steps)
        self.block = block
        self.action_space = gym.spaces.MultiDiscrete(problem.block_nvec(block))
        self.observation_space = gym.spaces.Box(-_OBS_CLIP, _OBS_CLIP, (problem.block_obs_size(block),), np.float32)
        self.kernels: dict[str, KernelConfig] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self.kernels = {n: self.problem.current[n] for n in self.problem.blocks[self.block]}
        ev = self.problem.evaluate({**self.problem.current, **self.kernels})
        return self.problem.block_observation(self.block, self.kernels, ev, 0.0), {}

    def step(self, action):
        self.kernels = self.problem.decode(self.block, np.asarray(action))
        parts, ev = self.problem.block_parts(self.block, self.kernels)
        reward, done = self._finish_step(parts, ev)
        obs = self.problem.block_observation(self.block, self.kernels, ev, self._t / self.episode_steps)
        return obs, reward, done, False, {"parts": parts, "ratio": ev.cost.ratio, "accuracy": ev.accuracy}


class BudgetEnv(_RefinementEnv):
    """High level: choose a budget level for every block (shifted by sensitivity before use)."""

    def __init__(self, problem: SearchProblem, weights: RewardWeights | None = None, episode_steps: int = 2) -> None:
        super().__init__(problem, weights or RewardWeights(), episode_steps)
        self.action_space = gym.spaces.MultiDiscrete([len(problem.levels)] * len(problem.blocks))
        self.observation_space = gym.spaces.Box(-_OBS_CLIP, _OBS_CLIP, (problem.level_obs_size(),), np.float32)
        self.levels = problem.block_levels.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self.levels = self.problem.block_levels.copy()
        ev = self.problem.evaluate(self.problem.current)
        return self.problem.level_observation(self.levels, ev, 0.0), {}

    def step(self, action):
        self.levels = self.problem.effective_levels(action)
        parts, ev = self.problem.level_parts(self.levels)
        reward, done = self._finish_step(parts, ev)
        obs = self.problem.level_observation(self.levels, ev, self._t / self.episode_steps)
        return obs, reward, done, False, {"parts": parts, "ratio": ev.cost.ratio, "accuracy": ev.accuracy}
