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


def test_model_key_sees_keep_ratios_that_round_to_one_channel_count(reference_models):
    """A keep ratio that rounds to the channel count the group keeps anyway is the same model (the prior
    measured again, on EfficientNet-Lite0); a count that really changes is another one."""
    from dataclasses import replace

    from hirelc_onnx.config import CompressionConfig, KernelConfig
    from hirelc_onnx.graph import build_block_graph, load_model
    from hirelc_onnx.search.features import config_key, model_key

    bg = replace(build_block_graph(load_model(reference_models("resnet20"))), channel_multiple=8)
    group = next(g for g in bg.groups if g.prunable and g.producers and g.length == 16)
    name = sorted(group.producers)[0]
    base = CompressionConfig({n: KernelConfig(bits=4) for n in bg.kernels}, target="storage")

    def keep(ratio, of=(name,)):
        return CompressionConfig({**base.kernels, **{n: KernelConfig(bits=4, keep_ratio=ratio) for n in of}},
                                 target="storage")

    assert config_key(keep(0.95)) != config_key(base)  # two configs ...
    assert model_key(bg, keep(0.95)) == model_key(bg, base)  # ... one model: 15.2 channels round to 16
    # every producer at a half: 8 channels kept, another model
    assert model_key(bg, keep(0.5, of=tuple(group.producers))) != model_key(bg, base)
    # one producer at a half, the others whole: the group keeps the largest ratio asked, so nothing changes
    if len(group.producers) > 1:
        assert model_key(bg, keep(0.5)) == model_key(bg, base)
