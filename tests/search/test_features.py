"""config_key: one key per emitted model."""
from __future__ import annotations


def test_configs_that_make_one_model_hash_alike():
    from hirelc_onnx.config import CompressionConfig, KernelConfig
    from hirelc_onnx.search.features import config_key

    def key(**kernels):
        return config_key(CompressionConfig(kernels, target="storage"))

    fp32 = KernelConfig()
    assert key(a=KernelConfig(bits=32, qtype="asymmetric", granularity="per-tensor")) == key(a=fp32) == key()
    assert key(a=KernelConfig(bits=4, group_size=64)) == key(a=KernelConfig(bits=4))  # per-channel: no groups
    assert key(a=KernelConfig(bits=4, granularity="per-group", group_size=64)) != key(
        a=KernelConfig(bits=4, granularity="per-group"))
    assert key(a=KernelConfig(bits=4, qtype="asymmetric")) != key(a=KernelConfig(bits=4))
    assert key(a=KernelConfig(bits=32, keep_ratio=0.5)) != key(a=fp32)  # pruning an fp32 kernel is a change
