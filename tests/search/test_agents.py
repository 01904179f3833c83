"""Ensembles and voting: each rule on hand-made distributions, an ensemble that must beat random
actions on a toy environment whose optimum is known, and an ensemble restored from its saved state
that learns on exactly as the original does (what a resumed HiReLC search relies on)."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env

import torch

from hirelc_onnx.search.agents import AgentSettings, Ensemble, load_ensembles, save_ensembles, seeded_streams, vote
from hirelc_onnx.search.envs import RewardWeights

TARGET = np.array([3, 0, 4, 1])


class TargetEnv(gym.Env):
    """One-step episodes; the reward is minus the L1 distance of the action to TARGET (optimum 0).

    The reward weights scale the penalty, as ensemble members' weights scale HiReLC's reward parts.
    """

    def __init__(self, weights: RewardWeights | None = None) -> None:
        self.scale = (weights or RewardWeights()).accuracy
        self.action_space = gym.spaces.MultiDiscrete([5] * len(TARGET))
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        reward = -self.scale * float(np.abs(np.asarray(action) - TARGET).sum())
        return np.zeros(3, np.float32), reward, True, False, {}


def _onehot(n: int, i: int, p: float) -> np.ndarray:
    v = np.full(n, (1 - p) / (n - 1))
    v[i] = p
    return v


def test_majority_wins_per_dimension():
    probs = [[_onehot(3, 0, 0.9), _onehot(3, 2, 0.5)],
             [_onehot(3, 0, 0.4), _onehot(3, 1, 0.9)],
             [_onehot(3, 1, 0.9), _onehot(3, 1, 0.4)]]
    assert vote(probs, "majority").tolist() == [0, 1]


def test_tie_goes_to_most_confident_member():
    probs = [[_onehot(4, 0, 0.6)], [_onehot(4, 2, 0.8)], [_onehot(4, 3, 0.7)], [_onehot(4, 0, 0.5)],
             [_onehot(4, 2, 0.4)]]
    # 0 and 2 tie with two votes each; member 1 (0.8 on 2) is the most confident of them; member 2's
    # 0.7 does not count since its value 3 is not in the tie
    assert vote(probs, "majority").tolist() == [2]


def test_tie_goes_to_best_recent_return():
    probs = [[_onehot(3, 0, 0.9)], [_onehot(3, 1, 0.4)]]
    assert vote(probs, "majority-reward", recent_returns=[-5.0, -1.0]).tolist() == [1]
    assert vote(probs, "majority", recent_returns=[-5.0, -1.0]).tolist() == [0]


def test_soft_vote_sums_probabilities():
    probs = [[np.array([0.5, 0.5, 0.0])], [np.array([0.0, 0.45, 0.55])], [np.array([0.0, 0.45, 0.55])]]
    assert vote(probs, "soft").tolist() == [1]  # 1.4 > 1.1, though 2 is two members' argmax
    assert vote(probs, "majority").tolist() == [2]


def test_single_member_vote_is_its_argmax():
    probs = [[_onehot(5, 3, 0.3), _onehot(2, 1, 0.7)]]
    for rule in ("majority", "majority-reward", "soft"):
        assert vote(probs, rule).tolist() == [3, 1]


def test_unknown_rule_and_size_are_refused():
    with pytest.raises(ValueError, match="voting rule"):
        vote([[_onehot(2, 0, 0.9)]], "plurality")
    with pytest.raises(ValueError, match="size"):
        Ensemble(TargetEnv, RewardWeights(), size=0)
    with pytest.raises(ValueError, match="kinds"):
        Ensemble(TargetEnv, RewardWeights(), kinds=("dqn",))


def test_ensemble_members_cycle_kinds_and_scale_weights():
    ens = Ensemble(TargetEnv, RewardWeights(), size=4, kinds=("ppo", "a2c", "ppo-acc"))
    assert [m.kind for m in ens.members] == ["ppo", "a2c", "ppo-acc", "ppo"]
    assert [m.envs[0].unwrapped.scale for m in ens.members] == [1.0, 1.0, 2.0, 1.0]
    assert len(ens.members[0].envs) == AgentSettings().n_envs


def test_ensemble_beats_random_actions_on_toy_env():
    check_env(TargetEnv())
    rng = np.random.default_rng(0)
    env = TargetEnv()
    random_reward = np.mean([env.step(env.action_space.sample())[1] for _ in range(500)])
    ens = Ensemble(TargetEnv, RewardWeights(), size=3, voting="majority", seed=0,
                   settings=AgentSettings(learning_rate=3e-3))
    ens.learn(1500)
    obs, _ = env.reset(seed=int(rng.integers(1000)))
    voted_reward = env.step(ens.act(obs))[1]
    assert voted_reward > random_reward + 3.0  # random: about -6.8; the optimum is 0
    assert voted_reward >= -1.0  # at most one coordinate off by one
    assert all(np.isfinite(r) for r in ens.recent_returns().values())


def test_learning_leaves_nothing_in_the_temp_directory(tmp_path, monkeypatch):
    # stable-baselines3's default logger made an empty SB3-<time> folder there per learn() call:
    # 24,492 of them on the development machine after a few days of searches
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    ens = Ensemble(TargetEnv, RewardWeights(), size=2, seed=0, settings=AgentSettings(n_steps=4))
    ens.learn(16)
    ens.learn(16)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _weights(ens: Ensemble) -> list[torch.Tensor]:
    return [t.clone() for m in ens.members for t in m.model.policy.state_dict().values()]


def test_a_restored_ensemble_learns_on_exactly_like_the_original():
    settings = AgentSettings(n_envs=2, n_steps=4)
    kinds = ("ppo", "a2c")  # both learners (Adam and RMSprop states)
    original = Ensemble(TargetEnv, RewardWeights(), size=2, kinds=kinds, seed=3, settings=settings)
    with seeded_streams([3, 0]):
        original.learn(16)
    saved = save_ensembles([original])
    # a fresh process would build the ensemble anew (other seed: nothing may come from construction)
    restored = Ensemble(TargetEnv, RewardWeights(), size=2, kinds=kinds, seed=99, settings=settings)
    load_ensembles(saved, [restored])
    assert restored.recent_returns() == original.recent_returns()
    for ens in (original, restored):
        with seeded_streams([3, 1]):
            ens.learn(16)
    before = _weights(original)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(restored)))
    with seeded_streams([3, 2]):  # and the round's stream matters: another one learns otherwise
        original.learn(16)
    with seeded_streams([3, 5]):
        restored.learn(16)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(original), _weights(restored)))


def test_seeded_streams_give_back_the_callers_states():
    torch.manual_seed(1)
    np.random.seed(1)
    expected = torch.rand(1), np.random.rand()
    torch.manual_seed(1)
    np.random.seed(1)
    with seeded_streams([7, 0]):
        inside = torch.rand(1), np.random.rand()
    assert (torch.rand(1), np.random.rand()) == expected
    with seeded_streams([7, 0]):
        assert (torch.rand(1), np.random.rand()) == inside


def test_load_ensembles_refuses_a_state_that_does_not_fit():
    ens = Ensemble(TargetEnv, RewardWeights(), size=2, kinds=("ppo", "a2c"), settings=AgentSettings(n_envs=2))
    other = Ensemble(TargetEnv, RewardWeights(), size=2, kinds=("a2c", "ppo"), settings=AgentSettings(n_envs=2))
    with pytest.raises(ValueError, match="does not fit"):
        load_ensembles(save_ensembles([ens]), [other])
    with pytest.raises(ValueError, match="ensembles"):
        load_ensembles(save_ensembles([ens]), [ens, other])
    wider = Ensemble(TargetEnv, RewardWeights(), size=2, kinds=("ppo", "a2c"),
                     settings=AgentSettings(n_envs=2, net_arch=(8,)))
    with pytest.raises(ValueError, match="does not fit"):
        load_ensembles(save_ensembles([ens]), [wider])
    with pytest.raises(ValueError, match="unreadable"):
        load_ensembles(b"not a torch file", [ens])
