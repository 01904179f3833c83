"""CompressionConfig: validation refuses bad values before any rewrite; JSON round-trips."""
from __future__ import annotations

import math

import pytest

from hirelc_onnx.config import CompressionConfig, ConfigError, KernelConfig


@pytest.mark.parametrize("fields, match", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"bits": 4.0}, "bits"),
    ({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": -0.5}, "keep_ratio"), ({"keep_ratio": 1.01}, "keep_ratio"),
    ({"keep_ratio": math.nan}, "keep_ratio"), ({"qtype": "fancy"}, "qtype"), ({"granularity": "per-row"}, "granularity"),
    ({"group_size": 1}, "group_size"),
])
def test_invalid_kernel_config_is_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig({"conv1": KernelConfig(**fields)}).validate()


def test_unknown_kernel_and_target_are_refused():
    with pytest.raises(ConfigError, match="unknown kernel 'nope'"):
        CompressionConfig({"nope": KernelConfig(bits=4)}).validate(known_kernels=["conv1"])
    with pytest.raises(ConfigError, match="target"):
        CompressionConfig(target="gpu").validate()


def test_json_round_trip(tmp_path):
    cfg = CompressionConfig({"a": KernelConfig(bits=4, keep_ratio=0.5, qtype="asymmetric", granularity="per-group",
                                               group_size=16), "b": KernelConfig()}, target="ort-cpu")
    path = tmp_path / "config.json"
    cfg.save(path)
    back = CompressionConfig.load(path)
    assert back == cfg


def test_bad_json_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CompressionConfig.load(path)
    path.write_text('{"kernels": {"a": {"bits": 4, "colour": "red"}}}')
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        CompressionConfig.load(path)
    with pytest.raises(ConfigError, match="not found"):
        CompressionConfig.load(tmp_path / "missing.json")
