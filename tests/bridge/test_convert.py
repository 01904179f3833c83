"""ONNX -> torch -> ONNX: the converted module computes what ORT computes, and write-back is by name."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper, parser

from hirelc_onnx.bridge import BridgeError, bindings, parameter_map, to_torch, write_back
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.runner import predict
from hirelc_onnx.graph import build_block_graph
from passes.normalize import normalize
from tests.bridge import DIGIT_MODELS, digits, normalized, tiny_cnn


def _ort(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _parse(text: str, **inits: np.ndarray) -> onnx.ModelProto:
    model = parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return model


@pytest.mark.parametrize("name", DIGIT_MODELS)
def test_reference_model_round_trip(reference_models, name):
    model = normalized(str(reference_models(name)))
    x = digits().test.x
    ref = predict(model, x)
    module = to_torch(model)
    assert not module.training
    torch_err = float(np.abs(_torch(module, x) - ref).max())

    back = write_back(model, module)
    back_err = float(np.abs(_ort(back, input=x) - ref).max())
    print(f"\n{name}: torch vs ORT max |diff| {torch_err:.2e}; write-back ORT vs ORT {back_err:.2e}")
    assert torch_err <= 1e-4
    assert back_err <= 1e-5
    assert list(back.graph.node) == list(model.graph.node)
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))

    # every kernel's weight and bias is reachable as a torch tensor of the right size
    params = parameter_map(module, model)
    for k in build_block_graph(model, normalized=True).kernels.values():
        assert params[k.weight].numel() == int(np.prod(k.weight_shape))
        assert k.bias is None or k.bias in params
        assert params[k.weight].requires_grad


@pytest.mark.slow
def test_efficientnet_lite0_round_trip(reference_models):
    from examples.reference_models import effnet_crops

    model = normalize(onnx.load(str(reference_models("efficientnet_lite0"))))
    x = effnet_crops(4, seed=0)
    ref = predict(model, x)
    module = to_torch(model)
    torch_err = float(np.abs(_torch(module, x) - ref).max())
    back_err = float(np.abs(predict(write_back(model, module), x) - ref).max())
    print(f"\nefficientnet_lite0: torch vs ORT max |diff| {torch_err:.2e} (max |logit| {np.abs(ref).max():.1f}); "
          f"write-back ORT vs ORT {back_err:.2e}")
    assert torch_err <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert back_err <= 1e-5


def test_trained_weights_written_back_by_name():
    model = tiny_cnn()
    module = to_torch(model)
    with torch.no_grad():
        for i, p in enumerate(parameter_map(module, model).values()):
            p.add_(0.01 * (i + 1))
    x = digits().test.x[:64]
    back = write_back(model, module)
    np.testing.assert_allclose(_ort(back, input=x), _torch(module, x), atol=1e-4)
    assert np.abs(_ort(back, input=x) - _ort(model, input=x)).max() > 1e-3
    assert list(back.graph.node) == list(model.graph.node)
    assert [t.name for t in back.graph.initializer] == [t.name for t in model.graph.initializer]


def test_gemm_without_transB_is_bound_transposed_and_written_back():
    rng = np.random.default_rng(0)
    model = _parse('<ir_version: 8, opset_import: ["" : 17]> g (float[N,3] x) => (float[N,4] y) '
                   '{ h = Gemm(x, W, b) y = Relu(h) }',
                   W=rng.standard_normal((3, 4)).astype(np.float32), b=rng.standard_normal(4).astype(np.float32))
    module = to_torch(model)
    assert bindings(module)["W"].transposed
    assert tuple(parameter_map(module, model)["W"].shape) == (4, 3)  # nn.Linear's layout
    with torch.no_grad():
        parameter_map(module, model)["W"][0, 2] += 1.0
    back = write_back(model, module)
    assert numpy_helper.to_array(back.graph.initializer[0])[2, 0] != numpy_helper.to_array(model.graph.initializer[0])[2, 0]
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(_ort(back, x=x), _torch(module, x), atol=1e-5)


def test_an_initializer_used_twice_is_one_trainable_tensor():
    model = _parse('<ir_version: 8, opset_import: ["" : 17]> g (float[2,3] x) => (float[2,3] y) '
                   '{ a = Add(x, B) c = Mul(a, x) y = Add(c, B) }', B=np.arange(3, dtype=np.float32))
    module = to_torch(model)
    assert len(list(module.parameters())) == 1
    with torch.no_grad():
        parameter_map(module, model)["B"].add_(1.0)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(_torch(module, x), _ort(write_back(model, module), x=x), atol=1e-6)


def test_opset19_reshape_is_converted_down_to_17():
    model = _parse('<ir_version: 9, opset_import: ["" : 19]> g (float[2,3] x) => (float[3,2] y) '
                   '{ h = Relu(x) y = Reshape(h, S) }', S=np.array([3, 2], np.int64))
    x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_torch(to_torch(model), x), _ort(model, x=x))


_W = {"W": np.ones((3, 4), np.float32)}
_REFUSED = [
    ('<ir_version: 10, opset_import: ["" : 20]> g (float[2,3] x) => (float[2,4] y) '
     '{ h = MatMul(x, W) y = Gelu(h) }', _W, ["Gelu", "20"]),
    ('<ir_version: 8, opset_import: ["" : 13]> g (float[2,3] x) => (float[2,3] y) '
     '{ s = Constant<value=float {0.1}>() z = Constant<value=uint8 {0}>() '
     'q = QuantizeLinear(x, s, z) y = DequantizeLinear(q, s, z) }', {}, ["QuantizeLinear", "13"]),
    ('<ir_version: 8, opset_import: ["" : 13, "com.microsoft" : 1]> g (float[2,3] x) => (float[2,3] y) '
     '{ y = com.microsoft.FastGelu(x) }', {}, ["FastGelu", "opset 1"]),
    ('<ir_version: 8, opset_import: ["" : 17]> g (float[2,3] x) => (float[2,3] y) { y = Hardmax(x) }', {},
     ["Hardmax", "opset 17"]),
    ('<ir_version: 8, opset_import: ["" : 17]> g (float[1,2,4,4] x) => (float[1,2,5,5] y) '
     '{ y = ConvTranspose<pads=[0, 0, 1, 1], strides=[1, 1]>(x, K) }', {"K": np.ones((2, 2, 3, 3), np.float32)},
     ["ConvTranspose", "opset 17", "non symmetrical"]),
    ('<ir_version: 8, opset_import: ["" : 17]> g (float[2,3] x) => (float[2,4] y) '
     '{ y = Gemm<alpha=2.0>(x, W) }', _W, ["Gemm", "alpha"]),
]


@pytest.mark.parametrize("text,inits,words", _REFUSED, ids=["gelu20", "qdq", "contrib", "hardmax", "convT-pad", "alpha"])
def test_unconvertible_models_are_refused_naming_the_op(text, inits, words):
    with pytest.raises(BridgeError) as info:
        to_torch(_parse(text, **inits))
    assert isinstance(info.value, UserError)
    for word in words:
        assert word in str(info.value)
    assert "torchvision" not in sys.modules  # the import stub never outlives the conversion


def test_module_from_another_graph_is_refused():
    model = tiny_cnn()
    module = to_torch(model)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = other.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[:2], w.name))
    with pytest.raises(BridgeError, match="shape"):
        parameter_map(module, other)
    with pytest.raises(BridgeError, match="shape"):
        write_back(other, module)
