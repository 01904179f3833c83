"""fake_quant_proxy: the proxy's weight-swapped model computes the emitted rewrite's logits, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.evaluate.runner import predict_outputs
from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.search.baselines import random_config
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.fake_quant_proxy import FakeQuantModels


@pytest.fixture(scope="module")
def resnet(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    return bg, SearchContext(bg, split_dataset(load_digits(), 0), "storage", finetune_seconds=0)


def _configs(bg, target: str) -> list[CompressionConfig]:
    """Every granularity and grid, with and without pruned channels."""
    rng = np.random.default_rng(3)
    names = list(bg.kernels)
    pruned = random_config(bg, target, rng)
    assert any(kc.keep_ratio < 1.0 for kc in pruned.kernels.values())
    unpruned = CompressionConfig({n: KernelConfig(bits=kc.bits, qtype=kc.qtype, granularity=kc.granularity)
                                  for n, kc in random_config(bg, target, rng).kernels.items()}, target)
    log2 = CompressionConfig({n: KernelConfig(bits=3 + i % 4, granularity="log2") for i, n in enumerate(names)}, target)
    probe = CompressionConfig({names[1]: KernelConfig(bits=4, granularity="per-channel")}, target)
    return [pruned, unpruned, log2, probe]


def test_storage_proxy_equals_the_rewrite_bit_for_bit(resnet):
    bg, ctx = resnet
    models = FakeQuantModels(bg)
    for config in _configs(bg, "storage"):
        swapped = predict_outputs(models.model(config), ctx.proxy_inputs)[0]
        rewritten = predict_outputs(apply_config(bg, config), ctx.proxy_inputs)[0]
        np.testing.assert_array_equal(swapped, rewritten)
        assert ctx.proxy(config) == ctx.proxy_of(apply_config(bg, config))
    # the swapped model holds float weights only: no decode nodes were added
    assert [n.op_type for n in models.model(_configs(bg, "storage")[1]).graph.node] == \
        [n.op_type for n in bg.model.graph.node]


def test_unpruned_weights_are_cached_across_candidates(resnet):
    bg, _ = resnet
    models = FakeQuantModels(bg)
    config = _configs(bg, "storage")[1]
    first = models.model(config)
    assert (models.hits, models.misses) == (0, len(bg.kernels))
    second = models.model(config)
    assert models.hits == len(bg.kernels) and models.misses == len(bg.kernels)
    assert first.SerializeToString() == second.SerializeToString()


def test_the_cache_stays_within_its_bytes(resnet):
    bg, _ = resnet
    biggest = max(int(np.prod(k.weight_shape)) * 4 for k in bg.kernels.values())
    models = FakeQuantModels(bg, cache_bytes=biggest)
    for bits in (3, 5):
        models.model(CompressionConfig({n: KernelConfig(bits=bits) for n in bg.kernels}, "storage"))
    assert 0 < models._cached_bytes <= biggest


def test_small_models_keep_the_exact_rewrite_under_ort_cpu(resnet, monkeypatch):
    bg, _ = resnet
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "ort-cpu", finetune_seconds=0)
    config = _configs(bg, "ort-cpu")[1]
    assert ctx.proxy(config) == ctx.proxy_of(apply_config(bg, config))
    assert ctx._fake_quant is None  # ResNet-20's 1 MB of weights: below FAST_PROXY_WEIGHT_BYTES
    monkeypatch.setattr("hirelc_onnx.search.context.FAST_PROXY_WEIGHT_BYTES", 0)
    fast = ctx.proxy(config)
    assert ctx._fake_quant is not None
    exact = ctx.proxy_of(apply_config(bg, config))
    assert fast.agreement == exact.agreement and fast.logit_mse == pytest.approx(exact.logit_mse, rel=1e-5)


def test_the_estimator_and_the_proxy_share_one_range_search_per_weight_and_spec(resnet):
    from hirelc_onnx.search.features import WeightPerturbation
    from hirelc_onnx.search.range_fits import RangeFits

    bg, ctx = resnet
    config = _configs(bg, "storage")[1]  # unpruned: every quantized weight's fit can be kept
    fits = RangeFits()
    table = WeightPerturbation(bg, fits)
    errors = {name: table.quant(name, kc) for name, kc in config.kernels.items()}
    asked = fits.misses
    assert asked == sum(kc.quantized and kc.granularity != "log2" for kc in config.kernels.values()) > 0
    shared = FakeQuantModels(bg, fits=fits).model(config)
    assert (fits.misses, fits.hits) == (asked, asked)  # the proxy searched nothing anew
    alone = FakeQuantModels(bg).model(config)
    assert shared.SerializeToString() == alone.SerializeToString()
    assert errors == {name: WeightPerturbation(bg).quant(name, kc) for name, kc in config.kernels.items()}


def test_range_fits_searches_again_when_a_weight_s_values_change():
    from passes.clip_weights import mse_clipped
    from passes.quantize import WeightQuantSpec
    from hirelc_onnx.search.range_fits import RangeFits

    spec = WeightQuantSpec(3, True, "per-channel")
    w = np.random.default_rng(0).standard_t(3, size=(8, 30)).astype(np.float32)
    fits = RangeFits()
    assert np.array_equal(fits.clipped("W", w, spec), mse_clipped(w, spec))
    v = w * np.float32(2) + np.float32(1)
    assert np.array_equal(fits.clipped("W", v, spec), mse_clipped(v, spec))
    assert np.array_equal(fits.clipped("W", v, spec), mse_clipped(v, spec))
    assert (fits.misses, fits.hits) == (2, 1)
