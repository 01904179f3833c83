"""Ensembles of stable-baselines3 agents combined by voting, one ensemble per HiReLC decision.

Members differ in learner (PPO, A2C) and in reward weights (`MEMBER_KINDS`): agents that weigh
accuracy, compression or stability differently disagree where the trade-off is close, and the
vote settles it. Each member trains on its own copy of the environment (its own weights).

Voting rules (`vote`), per action dimension:
  majority         the value most members choose; a tie goes to the most confident member
                   (highest probability on its own choice) among those in the tie
  majority-reward  the same, ties going to the member with the best recent episode return
  soft             the value with the highest summed probability over members

Replay: a round's learning depends only on the members' weights, optimizer states and step
counters (`Ensemble.state_dict`, saved between rounds by HiReLC) and on the global random streams
stable-baselines3 draws from (torch's for actions, numpy's for minibatches), which the caller seeds
per round (`seeded_streams`); every `learn` starts fresh episodes from the problem's current config.
So a search resumed from a saved round boundary learns exactly what the uninterrupted one did.
"""
from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from hirelc_onnx.bridge.convert import torch_threads  # onnx2torch itself is imported only on conversion
from hirelc_onnx.search.envs import RewardWeights

__all__ = ["MEMBER_KINDS", "VOTING_RULES", "vote", "AgentSettings", "Member", "Ensemble", "seeded_streams", "silent",
           "save_ensembles", "load_ensembles"]

log = logging.getLogger(__name__)

# kind -> (learner, reward-weight factors relative to the base weights)
MEMBER_KINDS: dict[str, tuple[type[BaseAlgorithm], dict[str, float]]] = {
    "ppo": (PPO, {}),
    "a2c": (A2C, {}),
    "ppo-acc": (PPO, {"accuracy": 2.0, "compression": 0.5}),
    "a2c-comp": (A2C, {"accuracy": 0.5, "compression": 2.0}),
    "ppo-stable": (PPO, {"instability": 3.0}),
}
VOTING_RULES = ("majority", "majority-reward", "soft")


def vote(probs: Sequence[Sequence[np.ndarray]], rule: str = "majority",
         recent_returns: Sequence[float] | None = None) -> np.ndarray:
    """Combine members' per-dimension action distributions into one action.

    probs[m][d] is member m's probability vector over the values of dimension d; a member's own
    choice is its argmax (the deterministic action). See the module docstring for the rules.
    """
    if rule not in VOTING_RULES:
        raise ValueError(f"voting rule must be one of {VOTING_RULES}, got {rule!r}")
    n_members, n_dims = len(probs), len(probs[0])
    returns = np.asarray(recent_returns if recent_returns is not None else np.zeros(n_members), dtype=np.float64)
    action = np.zeros(n_dims, dtype=np.int64)
    for d in range(n_dims):
        p = np.stack([np.asarray(probs[m][d], dtype=np.float64) for m in range(n_members)])
        if rule == "soft":
            action[d] = int(np.argmax(p.sum(axis=0)))
            continue
        choices = p.argmax(axis=1)
        counts = np.bincount(choices, minlength=p.shape[1])
        tied = np.flatnonzero(counts == counts.max())
        voters = np.flatnonzero(np.isin(choices, tied))
        if rule == "majority":
            confidence = p[voters, choices[voters]]
            winner = voters[int(np.argmax(confidence))]
        else:
            winner = voters[int(np.argmax(returns[voters]))]
        action[d] = int(choices[winner])
    return action


@dataclass(frozen=True)
class AgentSettings:
    """Learner hyper-parameters shared by every member (small nets, short rollouts: seconds per round)."""

    n_envs: int = 4
    """Environment copies per member: one policy forward serves them all (the per-step cost is torch's)."""
    n_steps: int = 4
    """Steps per environment copy per rollout (a rollout is n_envs * n_steps samples)."""
    net_arch: tuple[int, ...] = (32, 32)
    learning_rate: float = 1e-3
    ent_coef: float = 0.01
    n_epochs: int = 4
    threads: int = 1



RECENT_EPISODES = 50  # the window of "best recent reward"


@dataclass
class Member:
    """One learner of an ensemble, with the environment copies it trains on (its reward weights)."""

    kind: str
    model: BaseAlgorithm
    envs: list[Monitor]

    def recent_return(self) -> float:
        """Mean return of the member's latest training episodes (-inf before the first)."""
        returns = [r for env in self.envs for r in env.get_episode_rewards()[-RECENT_EPISODES:]]
        return float(np.mean(returns)) if returns else float("-inf")

    def probabilities(self, obs: np.ndarray) -> list[np.ndarray]:
        """Per action dimension, the policy's probability vector at `obs` (MultiDiscrete action spaces)."""
        policy = self.model.policy
        tensor, _ = policy.obs_to_tensor(obs)
        with torch.no_grad():
            dist = policy.get_distribution(tensor)
        return [c.probs[0].cpu().numpy() for c in dist.distribution]

    def state_dict(self) -> dict[str, Any]:
        """What the member's next `learn` and vote depend on: weights, optimizer state, counters, recent returns."""
        m = self.model
        return {"kind": self.kind, "policy": m.policy.state_dict(), "optimizer": m.policy.optimizer.state_dict(),
                "num_timesteps": int(m.num_timesteps), "n_updates": int(m._n_updates),
                "episode_returns": [[float(r) for r in env.get_episode_rewards()[-RECENT_EPISODES:]]
                                    for env in self.envs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s result (a member of the same kind and shapes)."""
        if state["kind"] != self.kind or len(state["episode_returns"]) != len(self.envs):
            raise ValueError(f"saved member {state['kind']!r} with {len(state['episode_returns'])} environments "
                             f"does not fit {self.kind!r} with {len(self.envs)}")
        m = self.model
        m.policy.load_state_dict(state["policy"])
        m.policy.optimizer.load_state_dict(state["optimizer"])
        m.num_timesteps, m._n_updates = state["num_timesteps"], state["n_updates"]
        for env, returns in zip(self.envs, state["episode_returns"]):
            env.episode_returns = list(returns)


class Ensemble:
    """`size` members built from `kinds` (cycled), each on `make_env(weights)`; `act` votes."""

    def __init__(self, make_env: Callable[[RewardWeights], gym.Env], base_weights: RewardWeights, *,
                 size: int = 3, kinds: Sequence[str] = ("ppo", "a2c", "ppo-acc"), voting: str = "majority",
                 settings: AgentSettings = AgentSettings(), seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"ensemble size must be at least 1, got {size}")
        if voting not in VOTING_RULES:
            raise ValueError(f"voting rule must be one of {VOTING_RULES}, got {voting!r}")
        unknown = [k for k in kinds if k not in MEMBER_KINDS]
        if unknown or not kinds:
            raise ValueError(f"ensemble member kinds must be among {sorted(MEMBER_KINDS)}, got {list(kinds)}")
        self.voting = voting
        self.settings = settings
        self.base_weights = base_weights
        self.eval_env = make_env(base_weights)
        self.members: list[Member] = []
        with torch_threads(settings.threads):  # tiny nets: more threads only contend (4.7 s vs 0.09 s, loaded)
            for i in range(size):
                kind = kinds[i % len(kinds)]
                algo, factors = MEMBER_KINDS[kind]
                weights = base_weights.scaled(**factors)
                envs = [Monitor(make_env(weights)) for _ in range(settings.n_envs)]
                self.members.append(Member(kind, self._model(algo, envs, seed + i), envs))

    def _model(self, algo: type[BaseAlgorithm], envs: list[gym.Env], seed: int) -> BaseAlgorithm:
        s = self.settings
        venv = DummyVecEnv([lambda env=env: env for env in envs])
        common = dict(policy_kwargs={"net_arch": list(s.net_arch)}, learning_rate=s.learning_rate,
                      ent_coef=s.ent_coef, n_steps=s.n_steps, seed=seed, verbose=0, device="cpu")
        if algo is PPO:
            return silent(PPO("MlpPolicy", venv, batch_size=s.n_steps * s.n_envs, n_epochs=s.n_epochs, **common))
        return silent(algo("MlpPolicy", venv, **common))

    def learn(self, steps: int) -> None:
        """Continue every member's training for `steps` environment steps (learning carries over rounds).

        Each call starts fresh episodes from the problem's current config: an episode left open by
        the previous call refined a config the round boundary has since replaced.
        """
        with torch_threads(self.settings.threads):
            for m in self.members:
                m.model._last_obs = None  # stable-baselines3 resets the environments when it has no observation
                m.model.learn(total_timesteps=steps, reset_num_timesteps=False)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The voted action at `obs`."""
        with torch_threads(self.settings.threads):
            probs = [m.probabilities(obs) for m in self.members]
        return vote(probs, self.voting, [m.recent_return() for m in self.members])

    def rollout(self) -> gym.Env:
        """Play one voted episode on the base-weights environment; returns it in its final state."""
        obs, _ = self.eval_env.reset()
        done = False
        while not done:
            obs, _, done, _, _ = self.eval_env.step(self.act(obs))
        return self.eval_env

    def recent_returns(self) -> dict[str, float]:
        """Each member's recent mean return, keyed "index:kind" (for logs and reports)."""
        return {f"{i}:{m.kind}": m.recent_return() for i, m in enumerate(self.members)}

    def state_dict(self) -> list[dict[str, Any]]:
        """Every member's `Member.state_dict`."""
        return [m.state_dict() for m in self.members]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        if len(state) != len(self.members):
            raise ValueError(f"saved ensemble has {len(state)} members, this one {len(self.members)}")
        for member, saved in zip(self.members, state):
            member.load_state_dict(saved)


def save_ensembles(ensembles: Sequence[Ensemble]) -> bytes:
    """The ensembles' states as one torch file's bytes (tensors and plain values only)."""
    buffer = io.BytesIO()
    torch.save([e.state_dict() for e in ensembles], buffer)
    return buffer.getvalue()


def load_ensembles(data: bytes, ensembles: Sequence[Ensemble]) -> None:
    """Restore `save_ensembles`'s bytes into ensembles built alike (same order, kinds and shapes).

    Read with `weights_only=True`: tensors and plain containers only, never pickled code.
    ValueError when the saved states do not fit.
    """
    try:
        saved = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises assorted types on a damaged file
        raise ValueError(f"unreadable ensemble state ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, list) or len(saved) != len(ensembles):
        raise ValueError(f"saved state holds {len(saved) if isinstance(saved, list) else '?'} ensembles, "
                         f"this search {len(ensembles)}")
    for ensemble, state in zip(ensembles, saved):
        try:
            ensemble.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as exc:  # torch: RuntimeError on a shape mismatch
            raise ValueError(f"saved ensemble state does not fit ({type(exc).__name__}: {exc})") from None


def silent(model: BaseAlgorithm) -> BaseAlgorithm:
    """`model` with a logger that writes nothing anywhere. Without one, every `learn` call of
    stable-baselines3 (verbose 0, no tensorboard) makes a new empty SB3-<time> folder in the temp
    directory: a HiReLC search left hundreds, a machine running many thousands."""
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


@contextmanager
def seeded_streams(entropy: Sequence[int]) -> Iterator[None]:
    """Seed the global random streams stable-baselines3 draws from (python, numpy, torch) from `entropy`
    for the block, and put back the caller's states afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seeds = np.random.SeedSequence(list(entropy)).generate_state(3, np.uint32)
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    torch.manual_seed(int(seeds[2]))
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
