"""The accuracy signal: the MLP surrogate on a synthetic mapping, weight-perturbation tables against an
independent numpy computation, the proxy estimator's calibration, and the proxy-to-surrogate hand-over."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.features import WeightPerturbation, config_features, config_key
from hirelc_onnx.search.surrogate import AccuracyModel, ProxyEstimator, ProxyObservation, Surrogate


@pytest.fixture(scope="module")
def bg(reference_models):
    return build_block_graph(load_model(reference_models("resnet20")))


@pytest.fixture(scope="module")
def perturbation(bg):
    return WeightPerturbation(bg)


def _synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1, 1, size=(n, 5))
    return x, np.sin(2 * x[:, 0]) + x[:, 1] ** 2 - 0.5 * x[:, 2] + 0.3 * x[:, 3] * x[:, 4]


def test_surrogate_learns_a_synthetic_mapping():
    rng = np.random.default_rng(0)
    x, y = _synthetic(300, rng)
    x_test, y_test = _synthetic(200, rng)
    model = Surrogate(n_models=3, seed=0).fit(x, y)
    mean, std = model.predict(x_test)
    r2 = 1 - np.sum((mean - y_test) ** 2) / np.sum((y_test - y_test.mean()) ** 2)
    assert r2 > 0.8
    # the ensemble's spread is what active learning reads: it must grow away from the data it saw
    # (measured: 0.036 on held-out points inside [-1, 1]^5, 0.125 on points in [3, 4]^5)
    _, far_std = model.predict(rng.uniform(3, 4, size=(200, 5)))
    assert std.shape == mean.shape and far_std.mean() > 2 * std.mean()


def test_surrogate_numpy_forward_matches_sklearn():
    rng = np.random.default_rng(1)
    x, y = _synthetic(60, rng)
    model = Surrogate(n_models=2, seed=3).fit(x, y)
    xs = (x - model._x_mean) / model._x_std
    sk = np.mean([m.predict(xs) for m in model._models], axis=0) * model._y_std + model._y_mean
    np.testing.assert_allclose(model.predict(x)[0], sk, rtol=1e-10, atol=1e-10)


def test_quantization_error_falls_with_bits(bg, perturbation):
    name = "/layers/layers.8/conv2/Conv"
    errors = [perturbation.quant(name, KernelConfig(bits=b)) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert perturbation.quant(name, KernelConfig(bits=32)) == 0


def test_pruning_error_is_the_energy_of_the_smallest_l1_channels(bg, perturbation):
    """Oracle: an independent numpy computation on the initializer."""
    kernel = bg.kernels["/layers/layers.7/conv1/Conv"]
    w = numpy_helper.to_array(next(t for t in bg.model.graph.initializer if t.name == kernel.weight))
    rows = w.reshape(w.shape[0], -1)
    dropped = np.argsort(np.abs(rows).sum(axis=1), kind="stable")[: rows.shape[0] // 2]
    expected = (rows[dropped] ** 2).sum() / (rows ** 2).sum()
    assert perturbation.prune(kernel.name, 0.5) == pytest.approx(expected, rel=1e-6)
    assert perturbation.prune(kernel.name, 1.0) == 0
    assert perturbation.prune(kernel.name, 0.25) > perturbation.prune(kernel.name, 0.5)


def test_group_keeps_the_largest_producer_ratio(bg, perturbation):
    """A residual stream is pruned only when every producer asks: one producer alone changes nothing."""
    group = next(g for g in bg.groups if g.prunable and len(g.producers) > 1)
    one = CompressionConfig({group.producers[0]: KernelConfig(keep_ratio=0.5)})
    assert all(pruned == 0 for _, pruned in perturbation.components(one).values())
    everyone = CompressionConfig({p: KernelConfig(keep_ratio=0.5) for p in group.producers})
    assert all(perturbation.components(everyone)[p][1] > 0 for p in group.producers)


def _estimator(bg, perturbation) -> ProxyEstimator:
    probes = [ProxyObservation(CompressionConfig({n: KernelConfig(bits=2)}), 0.01 * (i + 1), 0.99)
              for i, n in enumerate(bg.kernels)]
    return ProxyEstimator.from_probes(perturbation, probes, fp32_score=0.98)


def test_estimator_reproduces_its_probes(bg, perturbation):
    est = _estimator(bg, perturbation)
    for i, name in enumerate(bg.kernels):
        assert est.mse(CompressionConfig({name: KernelConfig(bits=2)})) == pytest.approx(0.01 * (i + 1))
    assert est.decay == pytest.approx(-np.log(0.99) * sum(0.01 * (i + 1) for i in range(len(bg.kernels)))
                                      / sum((0.01 * (i + 1)) ** 2 for i in range(len(bg.kernels))))
    assert est.accuracy(CompressionConfig()) == pytest.approx(0.98)


def test_estimator_calibration_recovers_scales(bg, perturbation):
    est = _estimator(bg, perturbation)
    rng = np.random.default_rng(0)
    names = list(bg.kernels)
    observations = []
    for _ in range(12):
        config = CompressionConfig({n: KernelConfig(bits=int(rng.choice([2, 4, 8])),
                                                    keep_ratio=float(rng.choice([0.5, 0.75, 1.0])))
                                    for n in names})
        q, p = est.components(config)
        observations.append(ProxyObservation(config, 2.0 * q + 5.0 * p, 0.9))
    est.calibrate(observations, prior_weight=1e-6)
    assert est.scale_q == pytest.approx(2.0, rel=1e-3)
    assert est.scale_p == pytest.approx(5.0, rel=1e-3)


def test_accuracy_model_hands_over_to_the_surrogate(bg, perturbation):
    est = _estimator(bg, perturbation)
    sens = {n: 0.5 for n in bg.kernels}
    model = AccuracyModel(bg, est, sens, 0.25, min_points=2, prior_points=4.0, n_models=2)
    config = CompressionConfig({n: KernelConfig(bits=4) for n in bg.kernels})
    cost = model_cost(bg, config)
    cold = model.predict(config, cost)
    assert model.source == "proxy" and cold.accuracy == cold.proxy_accuracy and cold.std == 0
    real = [(CompressionConfig({n: KernelConfig(bits=b) for n in bg.kernels}), None, s)
            for b, s in ((2, 0.90), (4, 0.97), (8, 0.99))]
    real = [(c, model_cost(bg, c), s) for c, _, s in real]
    model.refit([], real)
    assert model.surrogate_weight == pytest.approx(3 / 7)
    warm = model.predict(config, cost)
    assert warm.proxy_accuracy == pytest.approx(cold.proxy_accuracy)
    assert warm.accuracy != cold.accuracy
    assert len(model.features(config, cost)) == len(config_features(bg, config, cost, 0.1, 0.9, sens, 0.25)) + 1


def test_warm_up_points_start_the_surrogate_with_one_real_point(bg, perturbation):
    est = _estimator(bg, perturbation)
    sens = {n: 0.5 for n in bg.kernels}
    model = AccuracyModel(bg, est, sens, 0.25, min_points=2, prior_points=4.0, n_models=2, warmup_weight=0.25)
    configs = [CompressionConfig({n: KernelConfig(bits=b) for n in bg.kernels}) for b in (2, 3, 4, 6, 8)]
    warmup = [(c, model_cost(bg, c), s) for c, s in zip(configs, (0.3, 0.6, 0.85, 0.95, 0.98))]
    real = [(configs[2], model_cost(bg, configs[2]), 0.97)]
    model.refit([], real)
    assert model.surrogate_weight == 0  # one real point alone: below min_points
    model.refit([], real, warmup)
    assert model.surrogate_weight == pytest.approx((1 + 0.25 * 5) / (1 + 0.25 * 5 + 4.0))
    # the fine-tuned flag: the real point's config is predicted near its fine-tuned score, not its warm-up one
    mean, _ = model.surrogate.predict(model.features(configs[2], real[0][1]))
    assert abs(mean[0] - 0.97) < abs(mean[0] - 0.85)


def test_config_key_ignores_explicit_fp32_entries(bg):
    a = CompressionConfig({"/fc/Gemm": KernelConfig(bits=4)})
    b = CompressionConfig({"/fc/Gemm": KernelConfig(bits=4), "/stem/stem.0/Conv": KernelConfig()})
    assert config_key(a) == config_key(b)
    assert config_key(a) != config_key(CompressionConfig({"/fc/Gemm": KernelConfig(bits=8)}))
    assert config_key(a) != config_key(CompressionConfig(dict(a.kernels), target="ort-cpu"))


def test_pruning_probes_give_each_group_its_own_cost(bg, perturbation):
    """A group's probe (its producers at PRUNE_PROBE_KEEP) is reproduced by the estimator, and other keep
    ratios of that group scale with the dropped energy; a group without a probe falls back to the
    kernel's quantization coefficient."""
    from hirelc_onnx.search.surrogate import PRUNE_PROBE_KEEP, prune_probe_configs

    configs = prune_probe_configs(bg, "storage")
    groups = [g for g in bg.groups if g.prunable and g.producers]
    assert len(configs) == len(groups) and all(set(c.kernels) == set(g.producers) for c, g in zip(configs, groups))
    assert all(kc.keep_ratio == PRUNE_PROBE_KEEP and not kc.quantized for c in configs for kc in c.kernels.values())
    probed = [c for c in configs if sum(p for _, p in perturbation.components(c).values()) > 0][:2]
    prune_probes = [ProxyObservation(c, 0.5 * (i + 1), 0.6) for i, c in enumerate(probed)]
    quant = _estimator(bg, perturbation)
    est = ProxyEstimator.from_probes(perturbation, [ProxyObservation(CompressionConfig({n: KernelConfig(bits=2)}),
                                                                     0.01 * (i + 1), 0.99)
                                                    for i, n in enumerate(bg.kernels)], 0.98, prune_probes)
    for i, config in enumerate(probed):
        assert est.mse(config) == pytest.approx(0.5 * (i + 1))
        assert est.mse(config) != pytest.approx(quant.mse(config))
        half = CompressionConfig({n: KernelConfig(keep_ratio=0.5) for n in config.kernels})
        ratio = (sum(p for _, p in perturbation.components(half).values())
                 / sum(p for _, p in perturbation.components(config).values()))
        assert est.mse(half) == pytest.approx(0.5 * (i + 1) * ratio)
        name = next(iter(config.kernels))  # the knapsack's per-kernel damage reads the same coefficient
        assert est.kernel_mse(name, KernelConfig(keep_ratio=PRUNE_PROBE_KEEP)) == pytest.approx(
            est.prune_coefficients[name] * perturbation.prune(name, PRUNE_PROBE_KEEP))
    unprobed = next(c for c in configs if c not in probed)
    assert est.mse(unprobed) == pytest.approx(quant.mse(unprobed))
