"""Torch fake quantization equals the numpy reference bit for bit, and the emitted ONNX model within 1e-4."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper, parser

from hirelc_onnx.bridge import (
    BridgeError,
    FakeQuant,
    apply_fake_quant,
    fake_quantize_tensor,
    parameter_map,
    remove_fake_quant,
    to_torch,
)
from hirelc_onnx.evaluate.runner import SessionConfig, predict
from hirelc_onnx.graph import build_block_graph
from passes.quantize import WeightQuantSpec, fake_quantize
from tests.bridge import digits, normalized, tiny_cnn

quantize_weights = pytest.importorskip("passes.quantize_weights").quantize_weights

GRANULARITIES = ("per-tensor", "per-channel", "per-group", "log2")
# (shape, output axis): Conv, depthwise Conv, Gemm transB=1, Gemm transB=0 / MatMul, ConvTranspose, 1-D
SHAPES = [((16, 6, 3, 3), 0), ((8, 1, 3, 3), 0), ((10, 37), 0), ((37, 10), 1), ((5, 3, 2, 2), 1), ((11,), 0)]


def _weights(shape: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Gaussian weights at three magnitudes, an all-positive one, and one with zero / tiny channels."""
    out = [(rng.standard_normal(shape) * s).astype(np.float32) for s in (1.0, 1e-3, 300.0)]
    out.append(np.abs(out[0]))
    special = out[0].copy()
    flat = np.moveaxis(special, 0, 0).reshape(shape[0], -1)
    flat[0] = 0.0  # an all-zero channel (scale falls back to 1)
    if shape[0] > 1:
        flat[1] *= np.float32(2.0**-110)  # below LOG2_TINY; subnormal / underflowing levels
    special.reshape(-1)[-3:] = [np.float32(1e-40), -np.float32(0.0), np.float32(-1e-45)]
    out.append(special)
    return out


@pytest.mark.parametrize("shape,axis", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_torch_equals_numpy_reference_bit_for_bit(shape, axis):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    weights = _weights(shape, rng)
    checked = 0
    for bits, symmetric, granularity in itertools.product(range(2, 9), (True, False), GRANULARITIES):
        for group_size in ((5, 32) if granularity == "per-group" else (32,)):  # 5: partial last blocks
            spec = WeightQuantSpec(bits, symmetric, granularity, group_size=group_size, axis=axis)
            for w in weights:
                expected = fake_quantize(w, spec)
                got = fake_quantize_tensor(torch.from_numpy(w), spec).numpy()
                assert got.dtype == np.float32
                assert np.array_equal(got, expected), (bits, symmetric, granularity, group_size)
                checked += 1
    assert checked == 7 * 2 * 5 * len(weights)


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_half_to_even_ties(symmetric):
    # symmetric 8-bit per-tensor with max 127: scale 1, so x.5 values are exact ties
    w = np.array([127.0, 63.5, 62.5, 0.5, -0.5, 1.5, -2.5, 2.5, -127.0], np.float32)
    spec = WeightQuantSpec(8, symmetric, "per-tensor")
    assert np.array_equal(fake_quantize_tensor(torch.from_numpy(w), spec).numpy(), fake_quantize(w, spec))


def test_log2_threshold_ties_go_to_the_larger_level():
    t = [np.float32(2.0 ** -(j + 0.5)) for j in range(6)]
    w = np.array([[1.0] + t + [np.nextafter(x, np.float32(0)) for x in t]], np.float32)
    for bits in (3, 4, 8):
        spec = WeightQuantSpec(bits, True, "log2", axis=0)
        assert np.array_equal(fake_quantize_tensor(torch.from_numpy(w), spec).numpy(), fake_quantize(w, spec))


def test_straight_through_gradient_and_transposed_layout():
    rng = np.random.default_rng(0)
    w_onnx = rng.standard_normal((12, 5)).astype(np.float32)  # Gemm B[K, N], output axis 1
    spec = WeightQuantSpec(3, False, "per-group", group_size=5, axis=1)
    latent = torch.tensor(w_onnx.T.copy(), requires_grad=True)  # nn.Linear holds B transposed
    out = FakeQuant(spec, transposed=True)(latent)
    assert np.array_equal(out.detach().numpy().T, fake_quantize(w_onnx, spec))
    upstream = torch.from_numpy(rng.standard_normal((5, 12)).astype(np.float32))
    (out * upstream).sum().backward()
    assert torch.equal(latent.grad, upstream)


def _mlp() -> onnx.ModelProto:
    """MatMul with a constant weight, then a Gemm with transB=0 (bound transposed in torch)."""
    rng = np.random.default_rng(1)
    model = parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[N,64] input) => (float[N,10] logits) '
                               '{ h = MatMul(input, W1) r = Relu(h) logits = Gemm(r, W2, b2) }')
    model.graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((64, 40)) / 8).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal((40, 10)) / 6).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
    ])
    return model


# ORT at EXTENDED/ALL rewrites DequantizeLinear(uint8/uint4) -> MatMul/Gemm into MatMulNBits, whose
# own arithmetic departs from the decode (measured up to 1e-2 relative on the ViT); BASIC runs the
# stored integers through DequantizeLinear exactly as the reference decodes them.
EXACT_DECODE = SessionConfig(graph_optimization_level="basic")


def _agreement(model: onnx.ModelProto, specs: dict[str, WeightQuantSpec], x: np.ndarray) -> float:
    """max |torch fake-quant - ORT on the emitted quantized model| / max(1, max |ORT|)."""
    module = apply_fake_quant(to_torch(model), specs)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    emitted = predict(quantize_weights(model, specs, target="storage"), x, config=EXACT_DECODE)
    return float(np.abs(got - emitted).max() / max(1.0, np.abs(emitted).max()))


def _specs(model: onnx.ModelProto, **fields) -> dict[str, WeightQuantSpec]:
    bg = build_block_graph(model, normalized=True)
    return {k.weight: WeightQuantSpec(axis=k.out_axis, **fields) for k in bg.kernels.values()}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fake_quant_module_matches_emitted_onnx(granularity):
    x_img = digits().test.x[:128]
    x_flat = x_img.reshape(len(x_img), -1)
    worst = 0.0
    for bits, symmetric in itertools.product((2, 3, 4, 8), (True, False)):
        fields = dict(bits=bits, symmetric=symmetric, granularity=granularity, group_size=16)
        worst = max(worst, _agreement(tiny_cnn(), _specs(tiny_cnn(), **fields), x_img),
                    _agreement(_mlp(), _specs(_mlp(), **fields), x_flat))
    print(f"\n{granularity}: worst relative |torch - ORT(emitted)| {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("name,fields", [
    ("resnet20", dict(bits=4, symmetric=True, granularity="per-channel")),
    ("vit", dict(bits=3, symmetric=False, granularity="per-group", group_size=32)),
    ("mobilenetv2", dict(bits=5, symmetric=True, granularity="log2")),
])
def test_fake_quant_reference_model_matches_emitted_onnx(reference_models, name, fields):
    model = normalized(str(reference_models(name)))
    err = _agreement(model, _specs(model, **fields), digits().test.x)
    print(f"\n{name} {fields}: relative |torch - ORT(emitted)| {err:.2e}")
    assert err <= 1e-4


def test_remove_fake_quant_keeps_the_latent_weights():
    model = tiny_cnn()
    module = to_torch(model)
    before = {k: v.detach().clone() for k, v in parameter_map(module, model).items()}
    specs = _specs(model, bits=2, symmetric=True, granularity="per-tensor")
    apply_fake_quant(module, specs)
    name = next(iter(specs))
    owner = module.get_submodule(module.onnx_bindings[name].path)
    assert not torch.equal(owner.weight, before[name])  # the forward sees quantized values
    remove_fake_quant(module)
    after = parameter_map(module, model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_unknown_weight_is_refused():
    with pytest.raises(BridgeError, match="no_such_weight"):
        apply_fake_quant(to_torch(tiny_cnn()), {"no_such_weight": WeightQuantSpec(4, True, "per-channel")})
