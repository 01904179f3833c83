"""BlockGraph on graphs we did not write: the onnx wheel's light model zoo."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from hirelc_onnx.graph import build_block_graph
from tests.light import ALL, LARGE, light_normalized

KERNEL_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _params(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name


@pytest.mark.parametrize("name", [_params(n) for n in ALL])
def test_kernels_and_params_match_initializers(name):
    model = light_normalized(name)
    bg = build_block_graph(model, normalized=True)
    inits = {t.name: t for t in model.graph.initializer}
    kernel_nodes = [n for n in model.graph.node if n.op_type in KERNEL_OPS and n.input[1] in inits]
    assert len(bg.kernels) == len(kernel_nodes)
    expected = sum(int(np.prod(inits[i].dims)) for n in kernel_nodes for i in n.input[1:3] if i in inits)
    assert bg.total_params == expected
    # every kernel sits in exactly one block
    in_blocks = [k for b in bg.blocks for k in b.kernels]
    assert sorted(in_blocks) == sorted(bg.kernels)


# Published totals of the reference architectures (weights + biases of conv/fc layers).
KNOWN_PARAMS = {
    "resnet50": 25_503_912,  # torchvision: 25,557,032 = this + 53,120 BatchNorm weights/biases
    "squeezenet": 1_235_496,
}


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_param_totals_match_published(name):
    bg = build_block_graph(light_normalized(name, fold_batchnorm=False), normalized=True)
    assert bg.total_params == KNOWN_PARAMS[name]
    folded = build_block_graph(light_normalized(name), normalized=True)  # BatchNorm folded: convs gain a bias
    bn_channels = sum(k.weight_shape[0] for k in bg.kernels.values() if k.op == "Conv" and k.bias is None)
    n_bn = sum(1 for n in light_normalized(name, fold_batchnorm=False).graph.node if n.op_type == "BatchNormalization")
    assert folded.total_params == KNOWN_PARAMS[name] + (bn_channels if n_bn else 0)


def _conv_macs(cin, cout, k, hout, wout, groups=1):
    return cout * hout * wout * (cin // groups) * k * k


@pytest.mark.slow
def test_vgg19_macs_hand_count():
    # conv stages of VGG-19 at 224x224: (cin, cout, spatial) per 3x3 conv, then three FC layers
    convs = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112)]
    convs += [(128, 256, 56)] + [(256, 256, 56)] * 3 + [(256, 512, 28)] + [(512, 512, 28)] * 3
    convs += [(512, 512, 14)] * 4
    hand = sum(_conv_macs(ci, co, 3, s, s) for ci, co, s in convs) + 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    bg = build_block_graph(light_normalized("vgg19"), normalized=True)
    assert bg.total_macs == hand


def test_resnet50_macs_hand_count():
    # Caffe2 ResNet-50 (stride on the 3x3 conv): stem, then bottleneck stages.
    macs = _conv_macs(3, 64, 7, 112, 112)
    cin = 64
    for width, blocks, spatial in ((64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)):
        for b in range(blocks):
            in_spatial = spatial * 2 if (b == 0 and width != 64) else spatial
            macs += _conv_macs(cin, width, 1, in_spatial, in_spatial)
            macs += _conv_macs(width, width, 3, spatial, spatial)
            macs += _conv_macs(width, width * 4, 1, spatial, spatial)
            if b == 0:
                macs += _conv_macs(cin, width * 4, 1, spatial, spatial)
            cin = width * 4
    macs += 2048 * 1000
    bg = build_block_graph(light_normalized("resnet50"), normalized=True)
    assert bg.total_macs == macs


def _producer_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_resnet50_residual_stages_share_one_group():
    model = light_normalized("resnet50")
    bg = build_block_graph(model, normalized=True)
    sums = [n for n in model.graph.node if n.op_type == "Sum"]
    producer = _producer_of(model)

    def conv_behind(tensor):  # walk back through BatchNorm/Relu to the conv
        node = producer[tensor]
        while node.op_type not in KERNEL_OPS:
            node = producer[node.input[0]]
        return node.name

    stage_sizes = {}
    for s in sums:
        groups = {bg.kernels[conv_behind(i)].group for i in s.input}
        assert len(groups) == 1, f"{s.name} joins groups {groups}"
        g = groups.pop()
        stage_sizes[g] = len(bg.groups[g].producers)
    # 4 stages; producers per stage = blocks + the projection shortcut
    assert sorted(stage_sizes.values()) == [4, 4, 5, 7]
    assert all(bg.groups[g].prunable for g in stage_sizes)


def test_densenet_concat_offsets():
    model = light_normalized("densenet121")
    bg = build_block_graph(model, normalized=True)
    producer = _producer_of(model)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert concats
    for node in concats[:10]:
        cmap = bg.analysis.maps[node.output[0]]
        offsets = dict((seg.source, off) for off, seg in cmap.offsets())
        off = 0
        for inp in node.input:
            in_map = bg.analysis.maps[inp]
            for seg in in_map.segments:
                assert offsets[seg.source] == off  # each input's channels start where the previous ended
                off += seg.length
        assert off == cmap.channels
        # the newest 32 growth channels come from the dense layer's second conv
        last = node.input[-1]
        conv = producer[last]
        assert conv.op_type == "Conv" and cmap.segments[-1].source == bg.analysis.kernel_source[conv.name]
        assert cmap.segments[-1].length == 32


def test_shufflenet_shuffle_is_refused():
    model = light_normalized("shufflenet")
    bg = build_block_graph(model, normalized=True)
    shuffles = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert shuffles
    producer = _producer_of(model)
    for t in shuffles:
        reshape = producer[t.input[0]]
        assert reshape.op_type == "Reshape"
        cmap = bg.analysis.maps.get(reshape.input[0])
        if cmap is None:
            continue  # its input was already refused upstream
        for seg in cmap.segments:
            group = bg.groups[bg.analysis.group_of_source[seg.source]]
            assert not group.prunable and group.refusal
    assert not bg.analysis.maps.get(shuffles[0].output[0]), "channels must not be followed through a shuffle"


def test_blocks_follow_residual_units():
    bg = build_block_graph(light_normalized("resnet50"), normalized=True)
    residual = [b for b in bg.blocks if b.kind == "residual"]
    assert len(residual) == 16 + 1  # one per bottleneck (the stem joins the first), plus the head
    assert all(1 <= len(b.kernels) <= 5 for b in residual)
