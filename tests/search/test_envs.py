"""HiReLC's environments: gymnasium conformance, the level table, sensitivity shifts, the greedy fill,
action decoding within levels, and the reward parts, on the ResNet-20 reference graph."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.budget import MIN_KEEP, bits_ladder
from hirelc_onnx.search.envs import (BlockEnv, BudgetEnv, RewardWeights, SearchProblem, keep_ladder, level_table,
                                     sensitivity_shifts)
from hirelc_onnx.search.features import aggressiveness

BUDGET = 6.0


@dataclass(frozen=True)
class _Estimate:
    accuracy: float


class StubAccuracy:
    """An accuracy signal without ONNX Runtime: one point lost per unit of total aggressiveness."""

    def predict(self, config: CompressionConfig, cost, key=None) -> _Estimate:
        return _Estimate(0.99 - 0.01 * sum(aggressiveness(k, MIN_KEEP) for k in config.kernels.values()))


@pytest.fixture(scope="module")
def problem(reference_models) -> SearchProblem:
    bg = build_block_graph(load_model(reference_models("resnet20")))
    names = [k.name for k in bg.kernel_list()]
    kernel_sens = {n: i / (len(names) - 1) for i, n in enumerate(names)}
    block_sens = {b.id: float(np.mean([kernel_sens[n] for n in b.kernels])) for b in bg.blocks}
    return SearchProblem(bg, BUDGET, "storage", StubAccuracy(), kernel_sens, block_sens, 0.99)


def _multi_kernel_block(problem: SearchProblem) -> int:
    return next(b for b, names in enumerate(problem.blocks) if len(names) == 3)


def test_block_env_passes_check_env(problem):
    check_env(BlockEnv(problem, _multi_kernel_block(problem)))


def test_budget_env_passes_check_env(problem):
    check_env(BudgetEnv(problem))


def test_block_env_action_is_multidiscrete_per_kernel(problem):
    block = _multi_kernel_block(problem)
    env = BlockEnv(problem, block)
    per_kernel = [len(problem.bits), len(problem.keeps), 2, len(problem.granularities)]
    assert list(env.action_space.nvec) == per_kernel * 3
    assert problem.bits == (2, 4, 8, 32)  # storage packs 2/4/8-bit containers; fp32 stays possible


def test_under_ort_cpu_the_agents_choose_symmetric_per_channel_or_per_tensor_grids(problem):
    """ORT's int8 kernels run a weight with a zero point off their fast path: the agents' action
    space under ort-cpu has one qtype, and every decoded choice is symmetric."""
    ort = SearchProblem(problem.bg, 3.5, "ort-cpu", StubAccuracy(), problem.sensitivity,
                        {b.id: 0.5 for b in problem.bg.blocks}, 0.99)
    assert ort.qtypes == ("symmetric",) and ort.granularities == ("per-channel", "per-tensor")
    block = _multi_kernel_block(ort)
    env = BlockEnv(ort, block)
    assert list(env.action_space.nvec) == [len(ort.bits), len(ort.keeps), 1, 2] * 3
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    assert {ort.config(ort.current).get(n).qtype for n in ort.bg.kernels} == {"symmetric"}
    # a config from elsewhere (the knapsack gives a weight ORT decodes at load any storage grid, as
    # ViT's embedding table under ort-cpu) is still read: the agents' instability term compares with it
    name = ort.blocks[block][0]
    ort.previous = {**ort.previous, name: KernelConfig(bits=4, qtype="asymmetric", granularity="per-group")}
    assert 0.0 <= ort.change(name, ort.config(ort.current).get(name)) <= 1.0
    assert env.observation_space.shape == (problem.block_obs_size(block),)


def test_episode_is_episode_steps_refinements(problem):
    env = BlockEnv(problem, 0, episode_steps=3)
    env.reset(seed=0)
    dones = [env.step(env.action_space.sample())[2] for _ in range(3)]
    assert dones == [False, False, True]


def test_level_table_runs_from_aggressive_to_generous():
    levels = level_table(BUDGET, "storage", 7)
    fractions = [lv.storage_fraction for lv in levels]
    assert fractions == sorted(fractions)
    assert math.isclose(levels[3].storage_fraction, 1 / BUDGET)  # the middle level asks for the budget itself
    assert [lv.min_bits for lv in levels] == sorted(lv.min_bits for lv in levels)
    assert [lv.max_pruning for lv in levels] == sorted((lv.max_pruning for lv in levels), reverse=True)
    assert levels[0].max_pruning == pytest.approx(1 - MIN_KEEP) and levels[-1].max_pruning == 0
    int8_rung = {b for b in bits_ladder("ort-cpu") if b < 32}  # ORT stores every grid in 8-bit containers
    assert {lv.min_bits for lv in level_table(BUDGET, "ort-cpu", 7)} == int8_rung


def test_sensitive_blocks_shift_to_generous_levels():
    shifts = sensitivity_shifts(np.array([0.0, 0.1, 0.5, 0.9, 1.0]), scale=1.0, max_shift=1)
    assert shifts[0] < 0 < shifts[-1]
    assert list(shifts) == sorted(shifts) and np.abs(shifts).max() <= 1
    assert not sensitivity_shifts(np.array([0.3, 0.3, 0.3])).any()


def test_realize_meets_level_and_respects_floors(problem):
    for block in range(len(problem.blocks)):
        for index, level in enumerate(problem.levels):
            kernels = problem.realize(block, index)
            assert all(k.bits >= level.min_bits for k in kernels.values())
            assert all(k.keep_ratio >= 1 - level.max_pruning - 1e-9 for k in kernels.values())
        generous = problem.realize(block, len(problem.levels) - 1)
        assert problem.block_fraction(block, generous) <= problem.levels[-1].storage_fraction + 1e-9


def test_decode_clips_to_the_block_level(problem):
    block = _multi_kernel_block(problem)
    level = problem.levels[int(problem.block_levels[block])]
    lowest = np.zeros(len(problem.block_nvec(block)), dtype=np.int64)  # 2 bits, keep 0.25: below any floor
    for name, kc in problem.decode(block, lowest).items():
        assert kc.bits == max(2, level.min_bits)
        expected = 1 - level.max_pruning if problem.prunable[name] else 1.0
        assert kc.keep_ratio == pytest.approx(min(k for k in keep_ladder() if k >= expected - 1e-9))


def test_reward_parts(problem):
    problem.begin_round()
    block = _multi_kernel_block(problem)
    same = {n: problem.current[n] for n in problem.blocks[block]}
    parts, ev = problem.block_parts(block, same)
    assert parts.instability == 0
    assert ev.cost.ratio == pytest.approx(model_cost(problem.bg, problem.config(problem.current)).ratio)
    fp32 = {n: KernelConfig() for n in same}
    fp32_parts, fp32_ev = problem.block_parts(block, fp32)
    # accuracy is points given away against fp32: the block's fp32 choice gives less away than its
    # compressed one, and (the other blocks staying compressed) still some
    assert parts.accuracy < fp32_parts.accuracy < 0
    assert fp32_parts.sensitivity == 0 < parts.sensitivity  # nothing compressed, nothing to penalise
    assert fp32_ev.cost.ratio < ev.cost.ratio and fp32_parts.compression < parts.compression
    weights = RewardWeights()
    assert parts.total(weights.scaled(accuracy=0, compression=0, budget=0, instability=0)) == pytest.approx(
        -weights.sensitivity * parts.sensitivity)


def test_budget_shortfall_is_penalised(problem):
    problem.begin_round()
    all_generous = np.full(len(problem.blocks), len(problem.levels) - 1)
    all_aggressive = np.zeros(len(problem.blocks), dtype=np.int64)
    generous, ev_generous = problem.level_parts(all_generous)
    aggressive, ev_aggressive = problem.level_parts(all_aggressive)
    assert ev_generous.cost.ratio < BUDGET < ev_aggressive.cost.ratio
    shortfall = math.log(BUDGET / ev_generous.cost.ratio) / math.log(BUDGET)
    assert generous.budget == pytest.approx(shortfall)
    assert aggressive.budget < generous.budget


def test_anchor_keeps_every_choice_and_picks_the_nearest_level(problem):
    saved = (dict(problem.current), problem.block_levels.copy())
    try:
        names = list(problem.bg.kernels)
        chosen = {n: KernelConfig(bits=(2, 4, 8, 32)[i % 4]) for i, n in enumerate(names)}
        problem.anchor(CompressionConfig(chosen, target="storage"))
        assert problem.current == chosen
        cost = model_cost(problem.bg, CompressionConfig(chosen, target="storage"))
        for b in range(len(problem.blocks)):
            fraction = problem.block_fraction(b, chosen, cost)
            gaps = [abs(math.log(fraction / lv.storage_fraction)) for lv in problem.levels]
            assert gaps[int(problem.block_levels[b])] == min(gaps)
        # a block env starts its episodes from the anchored choices
        block = _multi_kernel_block(problem)
        BlockEnv(problem, block).reset(seed=0)
        assert problem.assemble(problem.block_levels) == chosen
    finally:
        problem.current, problem.block_levels = saved
