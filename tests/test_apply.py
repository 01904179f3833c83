"""Config -> passes -> emitted model: outputs, bytes and file size are what the cost model says."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hirelc_onnx.apply import apply_config, apply_pruning, choose_channels
from hirelc_onnx.config import GRANULARITIES, CompressionConfig, ConfigError, KernelConfig
from hirelc_onnx.graph import build_block_graph, model_cost
from hirelc_onnx.specs import weight_spec
from passes.clip_weights import mse_clipped
from passes.quantize import fake_quantize
from tests.light import light_normalized, strip_softmax
from tests.oracles import random_feeds, randomize_weights, run_ort


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name):
        if name not in cache:
            model = randomize_weights(strip_softmax(light_normalized(name)))
            cache[name] = (build_block_graph(model, normalized=True), random_feeds(model))
        return cache[name]

    return get


def _random_config(bg, seed, target="storage"):
    rng = np.random.default_rng(seed)
    kernels = {}
    for name in bg.kernels:
        kernels[name] = KernelConfig(
            bits=int(rng.choice([2, 3, 4, 5, 6, 8, 32])), keep_ratio=float(rng.choice([0.25, 0.5, 0.75, 1.0])),
            qtype=str(rng.choice(["symmetric", "asymmetric"])), granularity=str(rng.choice(GRANULARITIES)),
            group_size=int(rng.choice([8, 16, 32])))
    return CompressionConfig(kernels, target=target).validate()


def _initializer_bytes(model):
    return sum(len(t.raw_data) for t in model.graph.initializer)


@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "densenet121"])
def test_fp32_keep_everything_reproduces_outputs(zoo, name):
    bg, feeds = zoo(name)
    out = apply_config(bg, CompressionConfig.uniform(bg.kernels))
    got, want = run_ort(out, feeds)[0], run_ort(bg.model, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name, seed", [("squeezenet", 0), ("squeezenet", 1), ("resnet50", 2), ("inception_v1", 3)])
@pytest.mark.parametrize("target", ["storage", "ort-cpu"])
def test_mixed_config_matches_fake_quant_oracle_and_cost_model(zoo, name, seed, target):
    bg, feeds = zoo(name)
    config = _random_config(bg, seed, target)
    emitted = apply_config(bg, config)
    onnx.checker.check_model(emitted, full_check=True)
    # oracle: the pruned fp32 model with each weight replaced by the numpy reference fake-quant of its
    # range-clipped values (the default --weight-range mse; passes/clip_weights.py)
    pruned = apply_pruning(bg, config)
    for t in pruned.graph.initializer:
        kernel = next((k for k in bg.kernels.values() if k.weight == t.name), None)
        spec = weight_spec(kernel, config.get(kernel.name)) if kernel else None
        if spec is not None:
            t.CopyFrom(numpy_helper.from_array(fake_quantize(mse_clipped(numpy_helper.to_array(t), spec), spec), t.name))
    got, want = run_ort(emitted, feeds)[0], run_ort(pruned, feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    cost = model_cost(bg, config)
    assert _initializer_bytes(emitted) == cost.total_bytes  # true bytes, exactly
    size = len(emitted.SerializeToString())
    assert abs(size - cost.total_bytes) / cost.total_bytes < 0.05
    assert abs(size - cost.file_bytes) / cost.file_bytes < 0.02


def test_four_bit_storage_is_about_eight_times_smaller(zoo, tmp_path):
    bg, _ = zoo("resnet50")
    emitted = apply_config(bg, CompressionConfig.uniform(bg.kernels, bits=4))
    path = tmp_path / "m.onnx"
    onnx.save(emitted, path)
    ratio = len(bg.model.SerializeToString()) / path.stat().st_size
    assert 7.5 < ratio < 8.1
    assert model_cost(bg, CompressionConfig.uniform(bg.kernels, bits=4)).ratio == pytest.approx(ratio, rel=0.01)


def test_pruning_keeps_highest_l1_channels(zoo):
    bg, _ = zoo("squeezenet")
    config = CompressionConfig.uniform(bg.kernels, keep_ratio=0.5)
    keep = choose_channels(bg, config)
    group = bg.groups[next(iter(keep))]
    kernel = bg.kernels[group.producers[0]]
    w = numpy_helper.to_array(next(t for t in bg.model.graph.initializer if t.name == kernel.weight))
    l1 = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
    kept = keep[group.id]
    assert len(kept) == round(group.length * 0.5)
    assert l1[kept].min() >= np.delete(l1, kept).max()


@pytest.mark.parametrize("bad", [KernelConfig(bits=0), KernelConfig(bits=9), KernelConfig(keep_ratio=0.0),
                                 KernelConfig(keep_ratio=1.5)])
def test_invalid_config_refused_before_rewrite(zoo, bad):
    bg, _ = zoo("squeezenet")
    before = bg.model.SerializeToString()
    with pytest.raises(ConfigError):
        apply_config(bg, CompressionConfig({next(iter(bg.kernels)): bad}))
    with pytest.raises(ConfigError, match="unknown kernel"):
        apply_config(bg, CompressionConfig({"no_such_kernel": KernelConfig(bits=4)}))
    assert bg.model.SerializeToString() == before
