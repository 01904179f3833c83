"""Accuracy against labels, fidelity against fp32 reference logits, and user plugin metrics."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

from hirelc_onnx.errors import DataError, UserError
from hirelc_onnx.evaluate.loaders import call_plugin, import_plugin

__all__ = [
    "top1_accuracy",
    "top1_agreement",
    "top5_containment",
    "kl_divergence",
    "cross_entropy",
    "logit_mse",
    "cosine_similarity",
    "fidelity",
    "logit_mse_proxy",
    "per_position_agreement",
    "per_position_kl",
    "snr_db",
    "load_metric",
    "call_metric",
    "plugin_metric",
]

log = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _as_2d(logits: np.ndarray) -> np.ndarray:
    """(N, C) float64 view of class scores; the trailing 1-dims of a (N, C, 1, 1) head are folded.

    Anything else with more than one class axis (per-position scores (N, T, C), maps) is refused:
    one arg-max over a flattened sequence or map means nothing (`output_kinds` scores those).
    """
    a = np.asarray(logits, dtype=np.float64)
    if a.ndim == 0:
        raise DataError("metrics need (N, C) logits, got a scalar")
    if a.ndim > 2 and any(d != 1 for d in a.shape[2:]):
        raise DataError(f"class-score metrics need (N, C) outputs, got shape {a.shape}; per-position or map "
                        "outputs are scored by their output kind")
    return a.reshape(a.shape[0], -1)


def _as_flat(a: np.ndarray) -> np.ndarray:
    """(N, features) float64: every value of a sample in one row (maps, embeddings)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        raise DataError("metrics need a batch axis, got a scalar")
    return a.reshape(a.shape[0], -1)


def _positions(logits: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N*T, C) float64 rows, one per position, of two (N, T, C) outputs of the same shape."""
    a, b = np.asarray(logits, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise DataError(f"outputs and reference outputs differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 2:
        raise DataError(f"per-position metrics need (N, T, C) outputs, got shape {a.shape}")
    return a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])


def _pair(logits: np.ndarray, ref: np.ndarray, flat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two outputs as (N, C) class scores, or with `flat` as (N, features) rows of any shape."""
    a, b = (_as_flat(logits), _as_flat(ref)) if flat else (_as_2d(logits), _as_2d(ref))
    if a.shape != b.shape:
        raise DataError(f"logits and reference logits differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _log_softmax(a: np.ndarray) -> np.ndarray:
    shifted = a - a.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    a = _as_2d(logits)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != a.shape[0]:
        raise DataError(f"{a.shape[0]} predictions but {y.shape[0]} labels")
    return float(np.mean(a.argmax(axis=1) == y))


def top1_agreement(logits: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of samples where the candidate's top-1 class equals the reference's."""
    a, b = _pair(logits, ref)
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def top5_containment(logits: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of samples where the reference's top-1 class is among the candidate's top 5.

    With fewer than 5 classes it is the top-min(5, C), so it is 1.0 for C <= 5.
    """
    a, b = _pair(logits, ref)
    k = min(5, a.shape[1])
    topk = np.argpartition(-a, k - 1, axis=1)[:, :k]
    return float(np.mean((topk == b.argmax(axis=1)[:, None]).any(axis=1)))


def kl_divergence(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(candidate)) in nats: 0 when the distributions agree."""
    a, b = _pair(logits, ref)
    log_p, log_q = _log_softmax(b), _log_softmax(a)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return float(max(0.0, kl.mean()))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits), in nats."""
    a = _as_2d(logits)
    y = np.asarray(labels).reshape(-1).astype(int)
    if y.shape[0] != a.shape[0]:
        raise DataError(f"{a.shape[0]} predictions but {y.shape[0]} labels")
    return float(-_log_softmax(a)[np.arange(len(y)), y].mean())


def logit_mse(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean squared difference of raw outputs (any shape)."""
    a, b = _pair(logits, ref, flat=True)
    return float(np.mean((a - b) ** 2))


def cosine_similarity(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean per-sample cosine between output vectors, each sample's values flattened (maps and
    embeddings too); two all-zero rows count as identical."""
    a, b = _pair(logits, ref, flat=True)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, np.finfo(np.float64).tiny)
    cos = np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))
    return float(cos.mean())


def fidelity(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Every label-free agreement metric of a candidate against the fp32 reference."""
    return {
        "top1_agreement": top1_agreement(logits, ref),
        "top5_containment": top5_containment(logits, ref),
        "kl_divergence": kl_divergence(logits, ref),
        "logit_mse": logit_mse(logits, ref),
        "cosine_similarity": cosine_similarity(logits, ref),
    }


def logit_mse_proxy(candidate_logits: np.ndarray, ref_logits: np.ndarray) -> float:
    """Cheap accuracy proxy for the search: logit MSE divided by the reference logits' variance.

    Scale-free, so reward weights carry across models: 0 means identical outputs, 1 means as far
    off as predicting the mean reference logit for every sample and class.
    """
    a, b = _pair(candidate_logits, ref_logits, flat=True)
    var = float(b.var())
    return float(np.mean((a - b) ** 2) / (var if var > 0 else 1.0))


def per_position_agreement(logits: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of positions of (N, T, C) scores whose arg-max over the last axis equals the reference's."""
    a, b = _positions(logits, ref)
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def per_position_kl(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(candidate)) over the last axis, in nats."""
    a, b = _positions(logits, ref)
    log_p, log_q = _log_softmax(b), _log_softmax(a)
    return float(max(0.0, (np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean()))


def snr_db(outputs: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio 20 log10(|ref| / |ref - out|) in dB, as ONNX Runtime's qdq_loss_debug
    computes it (the formula `per_node` uses too); norms floored at float eps, so identical outputs
    give a large finite figure."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    a, b = _as_flat(outputs), _as_flat(ref)
    if a.shape != b.shape:
        raise DataError(f"outputs and reference outputs differ in shape: {a.shape} vs {b.shape}")
    return float(compute_signal_to_quantization_noice_ratio(b, a))


def load_metric(spec: str) -> MetricFn:
    """Import a user metric `package.module:func(logits, labels_or_ref) -> float`."""
    fn = import_plugin(spec, "metric", UserError)
    if not callable(fn):
        raise UserError(f"metric plugin {spec!r} is not callable")
    return fn


def plugin_metric(spec: str, logits: np.ndarray, labels_or_ref: np.ndarray) -> float:
    """Run a user metric and insist on a finite number, so reports never carry garbage."""
    return call_metric(load_metric(spec), spec, logits, labels_or_ref)


def call_metric(fn: MetricFn, spec: str, outputs: Any, labels_or_ref: Any) -> float:
    """A loaded metric plugin `fn` called (bounded by call_plugin's time limit); a finite float or UserError."""
    try:
        value = call_plugin(fn, (outputs, labels_or_ref), spec, "metric plugin", UserError)
    except UserError:
        raise
    except Exception as exc:  # the user's code: report it in one line, traceback under -v
        log.debug("metric plugin %s raised", spec, exc_info=True)
        raise UserError(f"metric plugin {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"metric plugin {spec!r} returned {type(value).__name__}, expected a number") from exc
    if not math.isfinite(value):
        raise UserError(f"metric plugin {spec!r} returned {value}, expected a finite number")
    return value
