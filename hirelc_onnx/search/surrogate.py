"""The accuracy signal behind HiReLC's rewards: a calibrated proxy estimator, then an MLP surrogate.

An ONNX Runtime proxy evaluation (apply the config, run a cached batch, compare logits with
fp32) costs a few hundred milliseconds; an agent needs thousands of reward evaluations a round.
So the proxy is used to *calibrate* a cheap estimator instead of being called at every step:

  ProxyEstimator  logit-MSE(config) ~ a_q * sum_k c_k * eq_k + a_p * sum_k c_k * ep_k, where eq_k / ep_k
                  are the relative weight errors of kernel k's quantization / pruning
                  (features.WeightPerturbation) and c_k is kernel k's measured logit-MSE per unit of
                  weight error (from one proxy probe per kernel). a_q, a_p are refitted on every
                  full config the proxy has scored. Agreement ~ exp(-b * MSE); accuracy estimate =
                  fp32 validation score * agreement (objective.expected_score: as far below a
                  negative fp32 score, a loss under --metric-mode min).
  Surrogate       a small MLP ensemble trained on (config features -> fine-tuned validation score)
                  pairs from real measurements; it learns what fine-tuning recovers, which the
                  proxy cannot see.
  AccuracyModel   the reward's accuracy term: the proxy estimate during cold start, handed over to
                  the surrogate as real points accrue (weight n / (n + prior)). Reward shaping only:
                  the final model is chosen on real measurements.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.evaluate.objective import expected_score
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost
from hirelc_onnx.search.features import WeightPerturbation, config_features, config_key

__all__ = ["ProxyObservation", "ProxyEstimator", "Surrogate", "AccuracyEstimate", "AccuracyModel", "PRUNE_PROBE_KEEP",
           "prune_probe_configs"]

log = logging.getLogger(__name__)

_EPS = 1e-8


@dataclass(frozen=True)
class ProxyObservation:
    """One real proxy evaluation: a config and its logit-MSE / top-1 agreement against fp32."""

    config: CompressionConfig
    logit_mse: float
    agreement: float


PRUNE_PROBE_KEEP = 0.75
"""The keep ratio each channel group is probed at (its producers pruned together, nothing quantized)."""


def prune_probe_configs(bg: BlockGraph, target: str) -> list[CompressionConfig]:
    """One config per prunable channel group: its producers at PRUNE_PROBE_KEEP. The weight energy a cut
    removes says little of what it costs: on EfficientNet-Lite0 two expand convs cut to 0.75 were estimated
    from energy at 0.97 agreement with fp32 and measured at 0.025 (their depthwise and SE consumers lose
    the channels too), so each group's cost per unit of that energy is measured, as each kernel's is for
    quantization."""
    return [CompressionConfig({p: KernelConfig(keep_ratio=PRUNE_PROBE_KEEP) for p in g.producers}, target=target)
            for g in bg.groups if g.prunable and g.producers]


class ProxyEstimator:
    """Predicts the proxy's logit-MSE and agreement for any config from per-kernel weight errors.

    Why additive: the first-order (HAWQ-style) view of quantization noise is that kernels
    contribute independently; the two global scales a_q, a_p, refitted on whole configs the
    proxy really scored, absorb how errors compound, and keep pruning and quantization on their
    own footing (they perturb logits differently for the same weight energy).
    """

    def __init__(self, perturbation: WeightPerturbation, coefficients: dict[str, float], fp32_score: float,
                 decay: float = 1.0, prune_coefficients: dict[str, float] | None = None) -> None:
        self.perturbation = perturbation
        self.coefficients = coefficients
        self.prune_coefficients = prune_coefficients or {}
        """Per kernel, logit-MSE per unit of pruning error from its group's own probe; a kernel without
        one uses its quantization coefficient."""
        self.fp32_score = fp32_score
        self.scale_q = 1.0
        self.scale_p = 1.0
        self.decay = decay

    @classmethod
    def from_probes(cls, perturbation: WeightPerturbation, probes: list[ProxyObservation],
                    fp32_score: float, prune_probes: list[ProxyObservation] = ()) -> "ProxyEstimator":
        """Per-kernel coefficients from single-kernel probes (each probe config names exactly one kernel)
        and, from `prune_probes` (each a channel group's producers at one keep ratio, nothing quantized),
        one pruning coefficient per group, given to each of its producers."""
        coefficients = {}
        for obs in probes:
            (name,) = obs.config.kernels
            eq, ep = perturbation.components(obs.config)[name]
            coefficients[name] = obs.logit_mse / max(eq + ep, 1e-6)
        prune_coefficients = {}
        for obs in prune_probes:
            components = perturbation.components(obs.config)
            error = sum(components[n][1] for n in obs.config.kernels)
            if error > 1e-9:  # a group whose rounded channel count kept everything says nothing
                prune_coefficients.update({n: obs.logit_mse / error for n in obs.config.kernels})
        est = cls(perturbation, coefficients, fp32_score, prune_coefficients=prune_coefficients)
        est.decay = _fit_decay([*probes, *prune_probes], est.decay)
        return est

    def _prune_coefficient(self, name: str) -> float:
        return self.prune_coefficients.get(name, self.coefficients.get(name, 0.0))

    def components(self, config: CompressionConfig) -> tuple[float, float]:
        """(quantization, pruning) parts of the unscaled estimate."""
        q = p = 0.0
        for name, (eq, ep) in self.perturbation.components(config).items():
            q += self.coefficients.get(name, 0.0) * eq
            p += self._prune_coefficient(name) * ep
        return q, p

    def kernel_mse(self, name: str, kc: KernelConfig) -> float:
        """One kernel's share of the estimate under choice `kc` (its own keep ratio): the damage
        `budget.repair` trades against bytes."""
        eq, ep = self.perturbation.kernel(name, kc, kc.keep_ratio)
        return self.scale_q * self.coefficients.get(name, 0.0) * eq + self.scale_p * self._prune_coefficient(name) * ep

    def mse(self, config: CompressionConfig) -> float:
        q, p = self.components(config)
        return self.scale_q * q + self.scale_p * p

    def agreement(self, mse: float) -> float:
        return math.exp(-self.decay * max(mse, 0.0))

    def accuracy(self, config: CompressionConfig) -> float:
        """The cold-start accuracy estimate: fp32 validation score times the estimated agreement."""
        return self.accuracy_at(self.mse(config))

    def accuracy_at(self, mse: float) -> float:
        """The accuracy a logit-MSE reads as on the calibrated curve: estimated (`accuracy`) or measured (a
        proxy score HiReLC's screen reads)."""
        return expected_score(self.fp32_score, self.agreement(mse))

    def calibrate(self, observations: list[ProxyObservation], prior_weight: float = 0.5) -> None:
        """Refit a_q, a_p (log-space least squares, pulled toward 1) and the agreement decay b."""
        from scipy.optimize import minimize

        rows = [(*self.components(o.config), o.logit_mse) for o in observations]
        rows = [r for r in rows if r[0] + r[1] > 0]
        if rows:
            data = np.asarray(rows)

            def loss(theta: np.ndarray) -> float:
                pred = math.e ** theta[0] * data[:, 0] + math.e ** theta[1] * data[:, 1]
                resid = np.log(pred + _EPS) - np.log(data[:, 2] + _EPS)
                return float(np.sum(resid ** 2) + prior_weight * np.sum(theta ** 2))

            start = np.log([self.scale_q, self.scale_p])
            theta = minimize(loss, start, method="L-BFGS-B", bounds=[(-6.0, 6.0)] * 2).x
            self.scale_q, self.scale_p = float(math.e ** theta[0]), float(math.e ** theta[1])
        self.decay = _fit_decay(observations, self.decay)

    def state(self) -> dict:
        """The calibration (what `calibrate` refits and starts its next fit from)."""
        return {"scale_q": self.scale_q, "scale_p": self.scale_p, "decay": self.decay}

    def load_state(self, state: dict) -> None:
        """Continue from a calibration `state()` returned."""
        self.scale_q, self.scale_p, self.decay = float(state["scale_q"]), float(state["scale_p"]), float(state["decay"])


def _fit_decay(observations: list[ProxyObservation], default: float) -> float:
    """Least squares through the origin of -log(agreement) on MSE; `default` when nothing disagrees."""
    pts = [(o.logit_mse, -math.log(min(max(o.agreement, 1e-3), 1.0))) for o in observations if o.logit_mse > 0]
    num = sum(m * a for m, a in pts)
    den = sum(m * m for m, _ in pts)
    return num / den if den > 0 and num > 0 else default


class Surrogate:
    """An ensemble of small MLP regressors (scikit-learn), inputs and target standardised.

    Several seeds give a spread, used as the uncertainty in the active-learning acquisition.
    L-BFGS suits the tiny data sets (a handful to a few dozen real measurements).
    """

    def __init__(self, n_models: int = 5, hidden: tuple[int, ...] = (32, 16), alpha: float = 1e-3,
                 seed: int = 0) -> None:
        self.n_models = n_models
        self.hidden = hidden
        self.alpha = alpha
        self.seed = seed
        self._models: list = []
        self._x_mean = self._x_std = None
        self._y_mean, self._y_std = 0.0, 1.0

    @property
    def fitted(self) -> bool:
        return bool(self._models)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Surrogate":
        from sklearn.neural_network import MLPRegressor

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._x_mean, self._x_std = x.mean(axis=0), x.std(axis=0)
        self._x_std[self._x_std < 1e-9] = 1.0
        self._y_mean, self._y_std = float(y.mean()), max(float(y.std()), 1e-3)
        xs, ys = (x - self._x_mean) / self._x_std, (y - self._y_mean) / self._y_std
        self._models = []
        for i in range(self.n_models):
            model = MLPRegressor(hidden_layer_sizes=self.hidden, solver="lbfgs", alpha=self.alpha, max_iter=2000,
                                 random_state=self.seed + i)
            self._models.append(model.fit(xs, ys))
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std across the ensemble) in the target's units.

        The fitted layers are applied in numpy (ReLU hidden layers, identity output, as
        MLPRegressor computes): the reward calls this once per environment step, and sklearn's
        input validation would cost more than the arithmetic.
        """
        xs = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self._x_mean) / self._x_std
        preds = []
        for model in self._models:
            h = xs
            for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_)):
                h = h @ w + b
                if i < len(model.coefs_) - 1:
                    h = np.maximum(h, 0.0)
            preds.append(h[:, 0])
        preds = np.stack(preds) * self._y_std + self._y_mean
        return preds.mean(axis=0), preds.std(axis=0)


@dataclass(frozen=True)
class AccuracyEstimate:
    accuracy: float  # what the reward uses
    proxy_accuracy: float  # the calibrated proxy estimate alone
    proxy_mse: float
    std: float  # surrogate ensemble spread (0 before the surrogate exists)


class AccuracyModel:
    """The reward's accuracy term for any config, cached by config until the next refit."""

    def __init__(self, bg: BlockGraph, estimator: ProxyEstimator, sensitivity: dict[str, float], min_keep: float,
                 *, min_points: int = 2, prior_points: float = 4.0, n_models: int = 5, seed: int = 0,
                 warmup_weight: float = 0.0) -> None:
        self.bg = bg
        self.estimator = estimator
        self.sensitivity = sensitivity
        self.min_keep = min_keep
        self.min_points = min_points
        self.prior_points = prior_points
        self.surrogate = Surrogate(n_models=n_models, seed=seed)
        self.warmup_weight = warmup_weight
        self.n_points = 0
        self.n_warmup = 0
        self._cache: dict[str, AccuracyEstimate] = {}

    @property
    def surrogate_weight(self) -> float:
        """n / (n + prior_points), n = real measurements + warmup_weight * proxy-scored warm-up points."""
        if not self.surrogate.fitted:
            return 0.0
        n = self.n_points + self.warmup_weight * self.n_warmup
        return n / (n + self.prior_points)

    @property
    def source(self) -> str:
        w = self.surrogate_weight
        return "proxy" if w == 0 else f"surrogate (weight {w:.2f}) + proxy"

    def features(self, config: CompressionConfig, cost: ModelCost, finetuned: bool = True) -> np.ndarray:
        """The surrogate's inputs; the last one says whether the score is a fine-tuned (real) one."""
        mse = self.estimator.mse(config)
        x = config_features(self.bg, config, cost, mse, self.estimator.agreement(mse), self.sensitivity,
                            self.min_keep)
        return np.append(x, 1.0 if finetuned else 0.0)

    def refit(self, proxy_observations: list[ProxyObservation],
              real: list[tuple[CompressionConfig, ModelCost, float]],
              warmup: list[tuple[CompressionConfig, ModelCost, float]] = ()) -> None:
        """Recalibrate the proxy estimator, then retrain the surrogate on every real measurement.

        warmup: proxy-scored configs with their measured (not fine-tuned) score, when `warmup_weight`
        > 0: many cheap points that teach the MLP the shape of the damage; a flag feature separates
        them from the few fine-tuned points, and predictions are made for the fine-tuned flag. The
        surrogate starts with one real point when it has warm-up points, else with `min_points`."""
        self.estimator.calibrate(proxy_observations)
        self.n_points = len(real)
        self.n_warmup = len(warmup) if self.warmup_weight > 0 else 0
        if self.n_points >= (1 if self.n_warmup else self.min_points):
            rows = [(c, cost, s, True) for c, cost, s in real] + [(c, cost, s, False) for c, cost, s in warmup][:self.n_warmup]
            x = np.stack([self.features(config, cost, ft) for config, cost, _, ft in rows])
            self.surrogate.fit(x, np.array([score for _, _, score, _ in rows]))
        self._cache.clear()

    def predict(self, config: CompressionConfig, cost: ModelCost, key: str | None = None) -> AccuracyEstimate:
        key = key or config_key(config)
        if key not in self._cache:
            mse = self.estimator.mse(config)
            proxy_acc = self.estimator.accuracy_at(mse)
            accuracy, std = proxy_acc, 0.0
            w = self.surrogate_weight
            if w > 0:
                mean, spread = self.surrogate.predict(self.features(config, cost))
                accuracy = w * float(np.clip(mean[0], 0.0, 1.0)) + (1 - w) * proxy_acc
                std = float(spread[0])
            self._cache[key] = AccuracyEstimate(accuracy, proxy_acc, mse, std)
        return self._cache[key]
