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
    assert round_to_unit(5, 36, 8) == 4  # 36 is no multiple of 8: steps of 4 (as graph-rl's action space)
    assert channel_unit(36, 8) == 4 and channel_unit(48, 8) == 8 and channel_unit(48, 1) == 1
    assert channel_unit(24, 16) == 8 and channel_unit(48, 16) == 16 and channel_unit(35, 8) == 1
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


def test_runs_judged_by_latency_round_to_orts_16_channel_blocks():
    """ORT's fp32 convolutions work in 16-channel blocks on AVX-512 and pad a cut inside one, so a run
    about speed rounds to 16 unless told otherwise; a run about bytes keeps 8."""
    from hirelc_onnx.compress import default_channel_multiple

    assert default_channel_multiple("ort-cpu", None) == 16
    assert default_channel_multiple("storage", 1.5) == 16
    assert default_channel_multiple("storage", None) == default_channel_multiple("qdq", None) == 8


def test_ort_cpu_records_16_and_an_explicit_multiple_wins(reference_models):
    path = reference_models("resnet20")
    bg = build_block_graph(onnx.load(path))
    for given, expected in ((None, 16), (8, 8)):
        extra = {} if given is None else {"channel_multiple": given}
        result = compress(path, method="l1-int8", target="ort-cpu", keep=0.6, finetune_epochs=0, data="digits",
                          latency_runs=1, **extra)
        assert result.config.channel_multiple == expected
        counts = group_keep_counts(replace(bg, channel_multiple=expected), result.config)
        assert counts and all(c % expected == 0 for c in counts.values())
        if expected == 16:  # 0.6 of 32 and 64 is 19 and 38: 16 and 32 in blocks of 16 (16 and 40 in 8s)
            assert sorted(set(counts.values())) == [16, 32]
