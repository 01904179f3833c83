"""--weight-range: how quantized weights' ranges are set (`passes.clip_weights`), the same in the emitted
model, before a fine-tune, in the fake-quant proxy and in the estimator's weight error."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hirelc_onnx.apply import apply_config, apply_pruning, apply_quantization, clip_ranges, clipped_specs
from hirelc_onnx.compress import compress
from hirelc_onnx.config import CompressionConfig, ConfigError, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph import build_block_graph
from hirelc_onnx.search.fake_quant_proxy import FakeQuantModels
from hirelc_onnx.search.features import WeightPerturbation
from hirelc_onnx.specs import weight_spec
from passes.clip_weights import mse_clipped
from passes.quantize import fake_quantize
from tests.light import light_normalized, strip_softmax
from tests.oracles import random_feeds, randomize_weights, run_ort


@pytest.fixture(scope="module")
def squeeze():
    model = randomize_weights(strip_softmax(light_normalized("squeezenet")))
    return build_block_graph(model, normalized=True), random_feeds(model)


def _four_bit(bg, **more):
    return replace(CompressionConfig.uniform(bg.kernels, bits=4), **more)


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_mse_is_the_default_and_the_emitted_model_computes_with_clipped_grids(squeeze):
    bg, feeds = squeeze
    assert bg.weight_range == "mse"
    config = _four_bit(bg)
    fp32 = _weights(bg.model)
    oracle = onnx.ModelProto()
    oracle.CopyFrom(bg.model)
    clipped = 0
    for t in oracle.graph.initializer:
        kernel = next((k for k in bg.kernels.values() if k.weight == t.name), None)
        if kernel is not None:
            spec = weight_spec(kernel, config.get(kernel.name))
            ranged = mse_clipped(fp32[t.name], spec)
            clipped += int(not np.array_equal(ranged, fp32[t.name]))
            t.CopyFrom(numpy_helper.from_array(fake_quantize(ranged, spec), t.name))
    assert clipped > len(bg.kernels) // 2  # the test can fail: most 4-bit weights are clipped
    got, want = run_ort(apply_config(bg, config), feeds)[0], run_ort(oracle, feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert _weights(bg.model).keys() == fp32.keys()  # the block graph's model is never modified
    assert all(np.array_equal(v, fp32[k]) for k, v in _weights(bg.model).items())


def test_minmax_keeps_the_weights_and_the_config_overrides_the_run(squeeze):
    bg, _ = squeeze
    minmax = replace(bg, weight_range="minmax")
    assert clipped_specs(bg, _four_bit(bg)) and not clipped_specs(bg, _four_bit(bg, weight_range="minmax"))
    assert not clipped_specs(minmax, _four_bit(bg)) and clipped_specs(minmax, _four_bit(bg, weight_range="mse"))
    assert clip_ranges(minmax, _four_bit(bg), bg.model) is bg.model
    assert not clipped_specs(bg, CompressionConfig.uniform(bg.kernels))  # nothing quantized: nothing clipped
    assert apply_pruning(bg, _four_bit(bg)) is bg.model  # unpruned: the weights are shared, never copied


def test_clipping_before_a_finetune_or_in_the_weight_pass_emits_the_same_model(squeeze):
    """Two ways: clip_ranges then quantize as trained (the fine-tune path), or clip inside the pass."""
    bg, _ = squeeze
    config = _four_bit(bg)
    before = clip_ranges(bg, config, bg.model)
    assert before is not bg.model
    a = apply_quantization(bg, before, config, clip=False)
    b = apply_config(bg, config)
    assert _weights(a).keys() == _weights(b).keys()
    assert all(np.array_equal(v, _weights(b)[k]) for k, v in _weights(a).items())
    c = _weights(apply_quantization(bg, bg.model, config, clip=False))  # unclipped: other integers
    assert any(not np.array_equal(v, c[k]) for k, v in _weights(b).items())


def test_ort_cpu_pins_the_clipped_grids(squeeze):
    bg, feeds = squeeze
    config = CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=4)
    oracle = onnx.ModelProto()
    oracle.CopyFrom(bg.model)
    for t in oracle.graph.initializer:
        kernel = next((k for k in bg.kernels.values() if k.weight == t.name), None)
        if kernel is not None:
            spec = weight_spec(kernel, config.get(kernel.name))
            t.CopyFrom(numpy_helper.from_array(fake_quantize(mse_clipped(numpy_helper.to_array(t), spec), spec), t.name))
    emitted = apply_config(bg, config, calib_batches=[feeds])  # pinned grids: integers checked by the pass
    got, want = run_ort(emitted, feeds)[0], run_ort(oracle, feeds)[0]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99  # activations are int8 too: close, not equal


def test_clipped_grids_lower_the_output_error_of_a_four_bit_model(squeeze):
    bg, feeds = squeeze
    want = run_ort(bg.model, feeds)[0]
    errors = {r: float(np.mean((run_ort(apply_config(bg, _four_bit(bg, weight_range=r)), feeds)[0] - want) ** 2))
              for r in ("mse", "minmax")}
    assert errors["mse"] < errors["minmax"]


@pytest.mark.parametrize("weight_range", ["mse", "minmax"])
def test_proxy_and_estimator_read_the_same_ranges(squeeze, weight_range):
    bg, feeds = squeeze
    bg = replace(bg, weight_range=weight_range)
    first = next(iter(bg.kernels))
    kernels = {n: KernelConfig(bits=3, qtype="asymmetric") for n in bg.kernels}
    kernels[first] = KernelConfig(bits=3, keep_ratio=0.5)  # one pruned group as well
    config = CompressionConfig(kernels).validate()
    proxy = FakeQuantModels(bg).model(config)
    got, want = run_ort(proxy, feeds)[0], run_ort(apply_config(bg, config), feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    name = list(bg.kernels)[1]
    w = _weights(bg.model)[bg.kernels[name].weight]
    spec = weight_spec(bg.kernels[name], kernels[name])
    ranged = w if weight_range == "minmax" else mse_clipped(w, spec)
    want_err = float(np.sum((w - fake_quantize(ranged, spec)) ** 2) / np.sum(w * w))
    assert WeightPerturbation(bg).quant(name, kernels[name]) == pytest.approx(want_err, rel=1e-6)


def test_config_json_round_trip_and_refusal():
    config = CompressionConfig({"a": KernelConfig(bits=4)}, weight_range="minmax")
    assert CompressionConfig.from_dict(config.to_dict()).weight_range == "minmax"
    assert CompressionConfig.from_dict({"kernels": {}}).weight_range is None
    with pytest.raises(ConfigError, match="weight_range must be one of"):
        CompressionConfig({}, weight_range="percentile").validate()


def test_compress_records_the_range_and_refuses_it_where_ort_quantizes(reference_models):
    path = reference_models("resnet20")
    result = compress(path, method="uniform", bits=4, data="digits", finetune_epochs=0, latency_runs=1,
                      weight_range="minmax")
    assert result.config.weight_range == "minmax" and result.report["weight_range"] == "minmax"
    assert compress(path, method="uniform", bits=4, data="digits", finetune_epochs=0,
                    latency_runs=1).config.weight_range == "mse"
    with pytest.raises(UserError, match="does not take weight_range="):
        compress(path, method="ort-int8", data="digits", weight_range="mse")
    with pytest.raises(UserError, match="weight_range= must be one of"):
        compress(path, method="uniform", data="digits", weight_range="max")
