"""--channel-multiple: every method's pruned channel counts are rounded in one place
(`specs.group_keep_counts`), and the cost model and the emitted model agree on them."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

from hirelc_onnx.apply import apply_config
from hirelc_onnx.compress import compress
from hirelc_onnx.config import CompressionConfig, ConfigError, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph import build_block_graph, model_cost
from hirelc_onnx.specs import channel_unit, group_keep_counts, round_to_unit
from tests.light import light_normalized, strip_softmax
from tests.oracles import random_feeds, randomize_weights, run_ort


def test_round_to_unit_stays_within_the_group_and_keeps_one_unit():
    assert [round_to_unit(k, 64, 8) for k in (1, 4, 5, 11, 12, 13, 60, 63, 64)] == [8, 8, 8, 8, 16, 16, 64, 64, 64]
    assert round_to_unit(13, 64, 1) == 13
    assert round_to_unit(5, 36, 8) == 5  # 36 is no multiple of 8: any count (as graph-rl's action space)
    assert channel_unit(36, 8) == 1 and channel_unit(48, 8) == 8 and channel_unit(48, 1) == 1
    assert round_to_unit(1, 8, 8) == 8  # a group of one unit is never pruned


@pytest.fixture(scope="module")
def squeeze():
    model = randomize_weights(strip_softmax(light_normalized("squeezenet")))
    return build_block_graph(model, normalized=True), random_feeds(model)


def _half(bg, **more):
    return CompressionConfig({n: KernelConfig(keep_ratio=0.4) for n in bg.kernels}, **more).validate()


def test_counts_are_multiples_and_config_overrides_the_run(squeeze):
    bg, _ = squeeze
    plain = group_keep_counts(bg, _half(bg))
    rounded = group_keep_counts(replace(bg, channel_multiple=8), _half(bg))
    assert plain.keys() == rounded.keys() and plain
    assert any(plain[g] % 8 for g in plain)  # the test can fail: unrounded counts are not all multiples
    for gid, count in rounded.items():
        length = bg.groups[gid].length
        assert count % channel_unit(length, 8) == 0 and 0 < count < length
        assert abs(count - plain[gid]) <= channel_unit(length, 8) // 2
    assert group_keep_counts(bg, _half(bg, channel_multiple=8)) == rounded  # the config's own multiple wins
    assert group_keep_counts(replace(bg, channel_multiple=8), _half(bg, channel_multiple=1)) == plain


def test_cost_model_and_emitted_model_agree_on_rounded_counts(squeeze):
    bg, feeds = squeeze
    bg8 = replace(bg, channel_multiple=8)
    config = _half(bg)
    cost = model_cost(bg8, config)
    model = apply_config(bg8, config)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for name, kc in cost.kernels.items():
        assert weights[bg.kernels[name].weight] == kc.shape
        out = kc.shape[bg.kernels[name].out_axis]
        assert out % channel_unit(bg.kernels[name].weight_shape[bg.kernels[name].out_axis], 8) == 0
    assert np.isfinite(run_ort(model, feeds)[0]).all()


def test_config_json_round_trip_and_refusal():
    config = CompressionConfig({"a": KernelConfig(keep_ratio=0.5)}, channel_multiple=8)
    assert CompressionConfig.from_dict(config.to_dict()).channel_multiple == 8
    assert CompressionConfig.from_dict({"kernels": {}}).channel_multiple is None
    with pytest.raises(ConfigError, match="channel_multiple must be an integer >= 1"):
        CompressionConfig({}, channel_multiple=0).validate()


def test_compress_records_the_multiple_and_refuses_it_where_nothing_is_pruned(tmp_path, reference_models):
    path = reference_models("resnet20")
    result = compress(path, method="l1-int8", keep=0.4, finetune_epochs=0, data="digits", latency_runs=1)
    assert result.config.channel_multiple == 8
    bg = replace(build_block_graph(onnx.load(path)), channel_multiple=8)
    counts = group_keep_counts(bg, result.config)
    assert counts and all(c % 8 == 0 for c in counts.values())
    with pytest.raises(UserError, match="does not take channel_multiple="):
        compress(path, method="ort-int8", data="digits", channel_multiple=4)
