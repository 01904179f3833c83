"""The two-stage method's agents: gymnasium environments that walk the layers, driven by SAC.

AMC (He et al. 2018) and HAQ (Wang et al. 2019) style: an episode visits the compressible kernels
in topological order, one step per kernel. The observation at step t describes kernel t and the
episode so far (`LayerWalkEnv.observation`):

    [t / (L - 1), op one-hot (conv, gemm / matmul, gather), log params, MACs share, log fan-in,
     log fan-out, position, prunable, bytes share (features.kernel_features), sensitivity,
     the previous kernel's action, the mean action so far, resources (two numbers per stage)]

and the action is the kernel's choice in [-1, 1] per dimension, read as a fraction in [0, 1]:
  stage 1 (`PruneEnv`):  [keep ratio, element-wise density]; resources: the MACs fraction if the
                         remaining kernels stay whole and if they are cut to the minimum, each
                         minus the MACs target, and the share of the nonzero-weight budget spent
                         so far less the share of the weights walked;
  stage 2 (`QuantEnv`):  [bit width], a rung of the target's ladder; resources: log of the bytes
                         if the remaining kernels take the lowest and the highest rung, over the
                         goal's bytes.
Budget-aware steps (AMC's action clamp): an environment may be given `bound(t, done)`, the largest
fraction per action number that kernel t may take given the choices so far so that the goal can
still be met by the kernels after it; the action is clamped to it before it is recorded, so the
walk never spends more than the budget and the last kernels get what is left, not a repair after
the fact. Stage 2 uses it (`QuantEnv`: the highest rung that leaves the lowest rung for the rest
within the goal's bytes). The reward is 0 until the last step, which scores the whole episode
(`judge`: the caller projects the choices onto the budgets and measures the result; see
search/two_stage.py). Every episode is
kept (`episodes`), so the caller can measure the best of them for real.

Why SAC (stable-baselines3): the choices are continuous quantities (a keep ratio, a density, a
bit width read off a continuous scale as in HAQ), so a continuous actor-critic fits them without
a discretisation per layer; AMC and HAQ used DDPG for the same reason. SAC is the off-policy
actor-critic that explores through its entropy term rather than a hand-tuned noise schedule, and
its replay buffer trains on every episode many times: an episode costs a model rewrite and a
proxy run, so episodes, not gradient steps, are the budget. PPO would need on-policy batches and
throw each away after an update.

Determinism: the environments hold no randomness; `train_walk_agent` seeds SAC and the global
streams it draws from (`agents.seeded_streams`) and trains on one torch thread, so a seed gives
the same episodes and the same policy on one machine.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.search.features import STATIC_FEATURES, kernel_features

__all__ = ["OP_TYPES", "Episode", "LayerWalkEnv", "PruneEnv", "QuantEnv", "WalkAgentSettings", "obs_size",
           "train_walk_agent", "policy_episode", "ladder_index", "rung_top"]

OP_TYPES = (("Conv", "ConvTranspose"), ("Gemm", "MatMul"), ("Gather",))
"""Op families of the observation's one-hot, in order."""
_OBS_CLIP = 10.0


def obs_size(action_dims: int, resources: int) -> int:
    """Length of a walk's observation for actions of `action_dims` numbers and `resources` numbers."""
    return 1 + len(OP_TYPES) + STATIC_FEATURES + 1 + 2 * action_dims + resources


@dataclass
class Episode:
    """One walk: the fractions chosen per kernel (rows in walk order), and what the judge said."""

    choices: np.ndarray
    reward: float
    info: dict = field(default_factory=dict)


class LayerWalkEnv(gym.Env):
    """One step per kernel of `names`; the last step's reward is `judge(choices)`.

    judge takes the (L, action_dims) fractions in [0, 1] and returns (reward, info); resources
    takes the step index and the fractions chosen so far and returns the same count of numbers
    at every step; bound (optional) takes the same and returns the largest fraction per action
    number that step may take (the action is clamped to it).
    """

    metadata = {"render_modes": []}

    def __init__(self, bg: BlockGraph, names: Sequence[str], sensitivity: dict[str, float], action_dims: int,
                 judge: Callable[[np.ndarray], tuple[float, dict]],
                 resources: Callable[[int, np.ndarray], Sequence[float]],
                 bound: Callable[[int, np.ndarray], Sequence[float]] | None = None) -> None:
        if not names:
            raise ValueError("a layer walk needs at least one kernel")
        self.names = list(names)
        self.action_dims = action_dims
        self.judge = judge
        self.resources = resources
        self.bound = bound
        static = kernel_features(bg)
        top = max(max(sensitivity.get(n, 0.0) for n in names), 1e-12)
        last = max(len(names) - 1, 1)
        rows = []
        for t, name in enumerate(self.names):
            op = bg.kernels[name].op
            onehot = [float(op in family) for family in OP_TYPES]
            rows.append(np.concatenate([[t / last], onehot, static[name], [sensitivity.get(name, 0.0) / top]]))
        self.static = np.asarray(rows, dtype=np.float32)
        self.n_resources = len(resources(0, np.zeros((0, action_dims))))
        self.action_space = gym.spaces.Box(-1.0, 1.0, (action_dims,), np.float32)
        self.observation_space = gym.spaces.Box(-_OBS_CLIP, _OBS_CLIP, (obs_size(action_dims, self.n_resources),),
                                                np.float32)
        self.episodes: list[Episode] = []
        self._t = 0
        self._choices = np.zeros((len(self.names), action_dims))

    def observation(self) -> np.ndarray:
        t, done = self._t, self._choices[: self._t]
        previous = done[-1] if t else np.zeros(self.action_dims)
        mean = done.mean(axis=0) if t else np.zeros(self.action_dims)
        obs = np.concatenate([self.static[min(t, len(self.names) - 1)], previous, mean,
                              list(self.resources(t, done))])
        return np.clip(obs, -_OBS_CLIP, _OBS_CLIP).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._choices = np.zeros((len(self.names), self.action_dims))
        return self.observation(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        fraction = (a + 1.0) / 2.0
        if self.bound is not None:
            fraction = np.minimum(fraction, np.asarray(self.bound(self._t, self._choices[: self._t]), dtype=np.float64))
        self._choices[self._t] = fraction
        self._t += 1
        if self._t < len(self.names):
            return self.observation(), 0.0, False, False, {}
        choices = self._choices.copy()
        reward, info = self.judge(choices)
        self.episodes.append(Episode(choices, float(reward), info))
        return self.observation(), float(reward), True, False, {"episode_reward": float(reward)}


class PruneEnv(LayerWalkEnv):
    """Stage 1: [keep ratio, element-wise density] per kernel."""

    def __init__(self, bg: BlockGraph, names: Sequence[str], sensitivity: dict[str, float],
                 judge: Callable[[np.ndarray], tuple[float, dict]],
                 resources: Callable[[int, np.ndarray], Sequence[float]],
                 bound: Callable[[int, np.ndarray], Sequence[float]] | None = None) -> None:
        super().__init__(bg, names, sensitivity, 2, judge, resources, bound)


class QuantEnv(LayerWalkEnv):
    """Stage 2: [bit width] per kernel (a rung of the ladder, read off the fraction)."""

    def __init__(self, bg: BlockGraph, names: Sequence[str], sensitivity: dict[str, float],
                 judge: Callable[[np.ndarray], tuple[float, dict]],
                 resources: Callable[[int, np.ndarray], Sequence[float]],
                 bound: Callable[[int, np.ndarray], Sequence[float]] | None = None) -> None:
        super().__init__(bg, names, sensitivity, 1, judge, resources, bound)


@dataclass(frozen=True)
class WalkAgentSettings:
    """SAC's knobs for a layer walk (small nets; a few hundred episodes of a handful of steps)."""

    net_arch: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-3
    batch_size: int = 64
    gamma: float = 1.0
    """Undiscounted, as in AMC: the only reward is the episode's, at its end."""
    warmup_fraction: float = 0.25
    """Share of the episodes played with uniformly random actions before learning starts."""
    threads: int = 1


def train_walk_agent(env: LayerWalkEnv, episodes: int, seed: int, stream: int,
                     settings: WalkAgentSettings = WalkAgentSettings()):
    """Train SAC on `env` for `episodes` whole episodes (seeded: see the module docstring); return it.

    stream: a number that tells apart the agents of one run (stage 1, stage 2), mixed into the seed.
    """
    from stable_baselines3 import SAC

    from hirelc_onnx.bridge.convert import torch_threads
    from hirelc_onnx.search.agents import seeded_streams, silent

    steps = len(env.names)
    warmup = max(1, int(round(settings.warmup_fraction * episodes)))
    with seeded_streams([seed, stream]), torch_threads(settings.threads):
        model = silent(SAC("MlpPolicy", env, learning_rate=settings.learning_rate, buffer_size=max(episodes * steps, 1000),
                    learning_starts=warmup * steps, batch_size=settings.batch_size, gamma=settings.gamma,
                    train_freq=(1, "episode"), gradient_steps=-1, seed=seed * 1000 + stream, device="cpu",
                    policy_kwargs={"net_arch": list(settings.net_arch)}, verbose=0))
        model.learn(total_timesteps=episodes * steps)
    return model


def policy_episode(model, env: LayerWalkEnv, threads: int = 1) -> Episode:
    """Play one episode with the trained policy's deterministic action (its mean) and return it."""
    from hirelc_onnx.bridge.convert import torch_threads

    with torch_threads(threads):
        obs, _ = env.reset()
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, done, _, _ = env.step(action)
    return env.episodes[-1]


def ladder_index(fraction: float, rungs: int) -> int:
    """The rung a fraction in [0, 1] reads as, out of `rungs` (equal shares of the scale)."""
    return min(rungs - 1, int(math.floor(fraction * rungs)))


def rung_top(index: int, rungs: int) -> float:
    """The largest fraction that still reads as rung `index` (the clamp for "at most this rung")."""
    return 1.0 if index >= rungs - 1 else (index + 1 - 1e-6) / rungs
