"""cost.model_cost's per-graph tables: a graph rebuilt with other kernels never reads a stale table."""
from __future__ import annotations

from dataclasses import replace

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.graph.cost import weight_nbytes


def _kernel_bytes(bg, config) -> int:
    return sum(weight_nbytes(k, config.get(n), k.weight_shape, bg.initializer_bytes[k.weight], config.target)
               for n, k in bg.kernels.items())


def test_a_replaced_kernel_table_is_read_afresh(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    config = CompressionConfig.uniform(bg.kernels, "ort-cpu", bits=3, granularity="per-group")
    plain = model_cost(bg, config)
    assert plain.kernel_bytes == _kernel_bytes(bg, config)
    # int8_slower moves every weight to the storage encoding: other bytes, same model proto
    slow = replace(bg, kernels={n: replace(k, int8_slower="measured slower") for n, k in bg.kernels.items()})
    moved = model_cost(slow, config)
    assert moved.kernel_bytes == _kernel_bytes(slow, config) != plain.kernel_bytes
    assert model_cost(bg, config) == plain  # the first graph's table is still its own


def test_pruned_biases_are_scaled_and_the_rest_kept(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    whole = model_cost(bg)
    assert whole.total_bytes == bg.weight_bytes and whole.kernel_bytes + whole.other_bytes == whole.total_bytes
    pruned = model_cost(bg, CompressionConfig({n: KernelConfig(keep_ratio=0.5) for n in bg.kernels}))
    assert 0 < pruned.other_bytes < whole.other_bytes
    assert pruned.kernel_bytes < whole.kernel_bytes
