"""The two-stage agents' layer walks (observation, episode length), SAC under a seed, and the uniform ablation's
choice at the size goal."""
from __future__ import annotations

import numpy as np
import pytest

from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.search.features import STATIC_FEATURES, kernel_features
from hirelc_onnx.search.two_stage_envs import (OP_TYPES, PruneEnv, QuantEnv, WalkAgentSettings, ladder_index,
                                               obs_size, policy_episode, rung_top, train_walk_agent)


@pytest.fixture(scope="module")
def vgg(reference_models):
    return build_block_graph(load_model(reference_models("vgg")))


def _names(bg):
    return [k.name for k in bg.kernel_list()]


def _env(bg, cls=PruneEnv, best=0.7):
    """A walk whose judge rewards closeness to `best` and whose resources echo the walk so far."""
    names = _names(bg)
    judged = []

    def judge(choices):
        judged.append(choices.copy())
        return -float(((choices - best) ** 2).sum()), {"n": len(judged)}

    def resources(t, done):
        return [t / len(names), float(done.sum())]

    sens = {n: float(i + 1) for i, n in enumerate(names)}
    return cls(bg, names, sens, judge, resources), judged


def test_observation_describes_the_kernel_and_the_walk_so_far(vgg):
    env, judged = _env(vgg)
    names, static = _names(vgg), kernel_features(vgg)
    obs, _ = env.reset()
    assert obs.shape == (obs_size(2, 2),) == env.observation_space.shape
    # index, op one-hot, the kernel's static features, its sensitivity (over the largest)
    assert obs[0] == 0.0
    assert list(obs[1:1 + len(OP_TYPES)]) == [1.0, 0.0, 0.0]  # the first kernel is a Conv
    np.testing.assert_allclose(obs[4:4 + STATIC_FEATURES], static[names[0]], rtol=1e-6)
    assert obs[4 + STATIC_FEATURES] == pytest.approx(1 / len(names))
    choices = np.array([[-1.0, 1.0], [0.0, 0.5]] + [[1.0, -1.0]] * (len(names) - 2), dtype=np.float32)
    rewards = []
    for t, action in enumerate(choices):
        obs, reward, done, truncated, _ = env.step(action)
        rewards.append(reward)
        assert done == (t == len(names) - 1) and not truncated
        if t == 0:  # the second kernel: its index, the first one's action as a fraction, the mean so far
            tail = obs[5 + STATIC_FEATURES:]
            assert obs[0] == pytest.approx(1 / (len(names) - 1))
            np.testing.assert_allclose(tail, [0.0, 1.0, 0.0, 1.0, 1 / len(names), 1.0])
    assert rewards[:-1] == [0.0] * (len(names) - 1)  # the episode's reward comes at its end, once
    assert len(judged) == 1 and len(env.episodes) == 1
    np.testing.assert_allclose(env.episodes[0].choices, (choices + 1) / 2)
    assert env.episodes[0].reward == rewards[-1] == pytest.approx(-(((choices + 1) / 2 - 0.7) ** 2).sum())
    # the last kernel: a Gemm, one-hot in the second family
    assert list(env.static[-1][1:4]) == [0.0, 1.0, 0.0]


def test_quant_walk_has_one_action_and_reads_rungs(vgg):
    env, _ = _env(vgg, QuantEnv)
    assert env.action_space.shape == (1,) and env.observation_space.shape == (obs_size(1, 2),)
    assert [ladder_index(f, 4) for f in (0.0, 0.24, 0.25, 0.74, 0.99, 1.0)] == [0, 0, 1, 2, 3, 3]


def test_bound_clamps_each_step_before_it_is_recorded(vgg):
    """AMC's budget-aware step: the action is clamped to what the walk so far leaves, and the next
    observation sees the clamped choice."""
    names = _names(vgg)
    budget = 2.0  # the fractions of a walk may sum to at most this

    def bound(t, done):
        return [max(0.0, min(1.0, budget - float(done.sum())))]

    env = QuantEnv(vgg, names, {n: 1.0 for n in names}, lambda c: (float(c.sum()), {}), lambda t, d: [0.0, 0.0],
                   bound)
    env.reset()
    for _ in names:
        obs, *_ = env.step(np.array([1.0], dtype=np.float32))  # always asks for the top
    choices = env.episodes[0].choices[:, 0]
    np.testing.assert_allclose(choices, [1.0, 1.0] + [0.0] * (len(names) - 2))
    assert env.episodes[0].reward == pytest.approx(budget)
    assert [ladder_index(rung_top(i, 4), 4) for i in range(4)] == [0, 1, 2, 3]


def test_sac_agent_is_deterministic_under_a_seed_and_learns(vgg):
    fast = WalkAgentSettings(net_arch=(16, 16), batch_size=32)
    runs = []
    for seed in (0, 0, 1):
        env, _ = _env(vgg, QuantEnv, best=0.9)
        agent = train_walk_agent(env, 24, seed, 2, fast)
        runs.append((env, policy_episode(agent, env)))
    (a, pa), (b, pb), (c, _) = runs
    assert len(a.episodes) == 25  # 24 trained + the policy's walk
    np.testing.assert_array_equal(np.stack([e.choices for e in a.episodes]), np.stack([e.choices for e in b.episodes]))
    np.testing.assert_array_equal(pa.choices, pb.choices)
    assert not np.array_equal(a.episodes[-1].choices, c.episodes[-1].choices)
    warmup = np.mean([e.reward for e in a.episodes[:6]])  # uniformly random actions
    assert pa.reward > warmup  # the trained policy's walk beats random choices on this reward


def test_the_walk_agent_leaves_nothing_in_the_temp_directory(vgg, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    env, _ = _env(vgg, QuantEnv, best=0.9)
    train_walk_agent(env, 4, 0, 2, WalkAgentSettings(net_arch=(16, 16), batch_size=32))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_uniform_choice_meets_the_goal_tightly(vgg):
    from hirelc_onnx.apply import apply_pruning
    from hirelc_onnx.config import CompressionConfig, KernelConfig
    from hirelc_onnx.evaluate.data import load_digits, split_dataset
    from hirelc_onnx.graph.cost import model_cost
    from hirelc_onnx.search.context import SearchContext
    from hirelc_onnx.search.two_stage import TwoStageSettings, uniform_choice
    from hirelc_onnx.search.two_stage_sizes import StageSizes, emit_stage, magnitude_masked, with_choices
    from passes.storage import initializer_nbytes

    ctx = SearchContext(vgg, split_dataset(load_digits(), 0), proxy_size=64)
    names = _names(vgg)
    weights = {n: vgg.kernels[n].weight for n in names}
    prunable = [n for n in names if vgg.kernels[n].group is not None and vgg.groups[vgg.kernels[n].group].prunable]
    base = CompressionConfig({n: KernelConfig() for n in names})
    s = TwoStageSettings()
    goal = 30.0
    candidate, bits, info = uniform_choice(vgg, ctx, s, names, prunable, weights, base, goal)
    keeps = {candidate.config.get(n).keep_ratio for n in prunable}
    densities = set(candidate.densities.values())
    assert len(keeps) == 1 and len(densities) == 1 and bits in (2, 4, 8)  # one choice for every kernel
    assert model_cost(vgg, candidate.config).macs_fraction <= s.flops_target
    density = densities.pop()
    config = with_choices(candidate.config, bits={n: bits for n in names})
    pruned = apply_pruning(vgg, candidate.config)

    def emitted_ratio(d):
        model, _ = emit_stage(vgg, magnitude_masked(pruned, {weights[n]: d for n in names}), config)
        return vgg.weight_bytes / initializer_nbytes(model)

    assert emitted_ratio(density) >= goal  # the emitted bytes meet the goal...
    assert emitted_ratio(min(1.0, density * 1.05)) < goal  # ...and a 5% denser uniform choice would not
    sizes = StageSizes(vgg, magnitude_masked(pruned, {weights[n]: density for n in names}), candidate.config, True)
    assert vgg.weight_bytes / sizes.total(config) == pytest.approx(emitted_ratio(density))
