"""BlockGraph on the reference models and EfficientNet-Lite0 (real ImageNet weights)."""
from __future__ import annotations

import numpy as np
import pytest

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph import build_block_graph, load_model
from tests.oracles import random_feeds, run_ort

KERNEL_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@pytest.mark.parametrize("name", ["resnet20", "vgg", "mobilenetv2", "vit",
                                  pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])
def test_reference_block_graph(reference_models, name):
    model = load_model(reference_models(name))
    bg = build_block_graph(model)
    inits = {t.name: t for t in bg.model.graph.initializer}
    kernel_nodes = [n for n in bg.model.graph.node if n.op_type in KERNEL_OPS and n.input[1] in inits]
    assert len(bg.kernels) == len(kernel_nodes)
    assert bg.total_params == sum(int(np.prod(inits[i].dims)) for n in kernel_nodes for i in n.input[1:3] if i in inits)
    assert bg.prunable_groups()
    # an all-fp32 keep-everything config reproduces the model
    feeds = random_feeds(bg.model, batch=2)
    out = apply_config(bg, CompressionConfig.uniform(bg.kernels))
    got, want = run_ort(out, feeds)[0], run_ort(model, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_mobilenet_depthwise_groups_pass_through(reference_models):
    bg = build_block_graph(load_model(reference_models("mobilenetv2")))
    depthwise = [n for n in bg.model.graph.node if n.name in bg.analysis.depthwise]
    assert depthwise
    for node in depthwise:
        # a depthwise conv continues its input's group: it is not a producer of a new one
        assert node.name not in bg.analysis.kernel_source
        assert bg.analysis.maps[node.output[0]] == bg.analysis.maps[node.input[0]]


def test_resnet20_mac_hand_count(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    # 8x8 digits: stem 3x3 1->16 at 8x8, stage 1 (16 ch, 8x8), stage 2 (32 ch, 4x4), stage 3 (64 ch, 2x2)
    macs = 16 * 8 * 8 * 9
    macs += 6 * (16 * 8 * 8 * 16 * 9)
    macs += (32 * 4 * 4 * 16 * 9) + 5 * (32 * 4 * 4 * 32 * 9) + 32 * 4 * 4 * 16  # + 1x1 projection
    macs += (64 * 2 * 2 * 32 * 9) + 5 * (64 * 2 * 2 * 64 * 9) + 64 * 2 * 2 * 32
    macs += 64 * 10
    shapes = sorted({k.weight_shape for k in bg.kernels.values()})
    assert bg.total_macs == macs, shapes
