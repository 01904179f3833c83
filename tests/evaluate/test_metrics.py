"""Metrics checked against hand-made cases and scipy as an independent reference."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr, softmax

from hirelc_onnx.errors import DataError, UserError
from hirelc_onnx.evaluate.metrics import (
    cosine_similarity,
    cross_entropy,
    fidelity,
    kl_divergence,
    logit_mse,
    logit_mse_proxy,
    plugin_metric,
    top1_accuracy,
    top1_agreement,
    top5_containment,
)

RNG = np.random.default_rng(0)
REF = RNG.normal(0, 3, (200, 10)).astype(np.float32)


def test_top1_accuracy_by_hand():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1_accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="3 predictions but 2 labels"):
        top1_accuracy(logits, np.array([1, 0]))


def test_cross_entropy_matches_scipy_softmax():
    labels = RNG.integers(0, 10, len(REF))
    expected = -np.log(softmax(REF.astype(np.float64), axis=1)[np.arange(len(REF)), labels]).mean()
    assert cross_entropy(REF, labels) == pytest.approx(expected, rel=1e-9)
    assert cross_entropy(REF[:, :, None, None], labels) == pytest.approx(expected, rel=1e-9)  # (N, C, 1, 1) heads
    with pytest.raises(DataError, match="200 predictions but 3 labels"):
        cross_entropy(REF, labels[:3])


def test_top5_containment_by_hand():
    ref = np.zeros((2, 7))
    ref[0, 6] = ref[1, 0] = 1  # reference top-1: class 6, class 0
    cand = np.array([[7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7]], dtype=float)
    # sample 0: class 6 ranks last in the candidate; sample 1: class 0 is last too
    assert top5_containment(cand, ref) == 0.0
    cand[0, 6] = 4.5  # now 5th
    assert top5_containment(cand, ref) == 0.5
    assert top5_containment(np.eye(3), np.eye(3)[::-1]) == 1.0  # C <= 5: always contained


def test_self_is_perfect():
    got = fidelity(REF, REF)
    assert got["top1_agreement"] == 1.0 and got["top5_containment"] == 1.0
    assert got["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert got["logit_mse"] == 0.0
    assert got["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert logit_mse_proxy(REF, REF) == 0.0


@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_perturbed_degrades_and_matches_scipy(noise):
    cand = REF + RNG.normal(0, noise, REF.shape).astype(np.float32)
    p, q = softmax(REF.astype(np.float64), axis=1), softmax(cand.astype(np.float64), axis=1)
    assert kl_divergence(cand, REF) == pytest.approx(rel_entr(p, q).sum(axis=1).mean(), rel=1e-9)
    a, b = cand.astype(np.float64), REF.astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine_similarity(cand, REF) == pytest.approx(cos.mean(), rel=1e-12)
    assert logit_mse(cand, REF) == pytest.approx(((a - b) ** 2).mean(), rel=1e-12)
    assert top1_agreement(cand, REF) == np.mean(cand.argmax(1) == REF.argmax(1)) < 1.0
    assert kl_divergence(cand, REF) > 0.01


def test_more_noise_is_worse():
    small, big = (REF + RNG.normal(0, s, REF.shape) for s in (0.3, 3.0))
    assert kl_divergence(big, REF) > kl_divergence(small, REF)
    assert cosine_similarity(big, REF) < cosine_similarity(small, REF)
    assert logit_mse_proxy(big, REF) > logit_mse_proxy(small, REF)


def test_logit_mse_proxy_is_scale_free():
    cand = REF + RNG.normal(0, 1.0, REF.shape)
    assert logit_mse_proxy(10 * cand, 10 * REF) == pytest.approx(logit_mse_proxy(cand, REF))
    mean_guess = np.full_like(REF, REF.mean())
    assert logit_mse_proxy(mean_guess, REF) == pytest.approx(1.0)


def test_cosine_of_zero_rows():
    z = np.zeros((2, 3))
    assert cosine_similarity(z, z) == 1.0
    assert cosine_similarity(z, np.ones((2, 3))) == 0.0


def test_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match=r"\(200, 10\) vs \(200, 5\)"):
        kl_divergence(REF, REF[:, :5])


def test_plugin_metric(tmp_path, monkeypatch):
    (tmp_path / "user_metrics.py").write_text(
        "import numpy as np\n"
        "def max_abs(logits, ref):\n"
        "    return np.abs(logits - ref).max()\n"
        "def nan(logits, ref):\n"
        "    return float('nan')\n"
        "def text(logits, ref):\n"
        "    return 'good'\n"
        "def boom(logits, ref):\n"
        "    raise KeyError('k')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cand = REF + 1.0
    assert plugin_metric("user_metrics:max_abs", cand, REF) == pytest.approx(1.0)
    for func, msg in [("nan", "finite"), ("text", "returned str"), ("boom", "KeyError"), ("absent", "no attribute")]:
        with pytest.raises(UserError, match=msg):
            plugin_metric(f"user_metrics:{func}", cand, REF)
    with pytest.raises(UserError, match="package.module:func"):
        plugin_metric("not a spec", cand, REF)
