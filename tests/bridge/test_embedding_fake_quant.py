"""Embedding tables through the torch bridge: onnx2torch's Gather reads the table from a bound
parameter, fake quantization of it equals the numpy quantizer bit for bit, the module equals the
emitted ONNX model, and training the table writes it back by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from hirelc_onnx.bridge import apply_fake_quant, parameter_map, remove_fake_quant, to_torch, write_back
from hirelc_onnx.graph import build_block_graph
from passes.quantize import WeightQuantSpec, fake_quantize
from passes.quantize_weights import quantize_weights
from tests.embedding_model import embedding_model, token_ids


@pytest.fixture(scope="module")
def bg():
    return build_block_graph(embedding_model())


def _ort(model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]


@pytest.mark.parametrize("bits,symmetric,granularity", [(2, True, "per-channel"), (4, False, "per-group"),
                                                        (8, True, "per-group"), (3, True, "log2")])
def test_fake_quantized_tables_match_numpy_and_the_emitted_model(bg, bits, symmetric, granularity):
    specs = {k.weight: WeightQuantSpec(bits, symmetric, granularity, group_size=16, axis=k.out_axis)
             for k in bg.kernels.values() if k.op == "Gather"}
    module = apply_fake_quant(to_torch(bg.model), specs)
    inits = {t.name: numpy_helper.to_array(t) for t in bg.model.graph.initializer}
    for name, spec in specs.items():
        binding = module.onnx_bindings[name]
        seen = getattr(module.get_submodule(binding.path), binding.attr).detach().numpy()
        np.testing.assert_array_equal(seen, fake_quantize(inits[name], spec), err_msg=name)
    ids = token_ids(5)
    with torch.no_grad():
        got = module(torch.from_numpy(ids)).numpy()
    emitted = _ort(quantize_weights(bg.model, specs, "storage"), ids)
    assert np.abs(got - emitted).max() <= 1e-4 * max(1.0, np.abs(emitted).max())


def test_trained_table_is_written_back(bg):
    module = to_torch(bg.model)
    params = parameter_map(module, bg.model)
    assert isinstance(params["Wword"], torch.nn.Parameter)
    spec = WeightQuantSpec(4, True, "per-channel", axis=0)
    apply_fake_quant(module, {"Wword": spec})
    ids = torch.from_numpy(token_ids(4))
    opt = torch.optim.SGD([params["Wword"]], lr=0.1)
    before = params["Wword"].detach().clone()
    module(ids).pow(2).sum().backward()
    opt.step()
    rows = sorted(set(ids.reshape(-1).tolist()))
    moved = (params["Wword"].detach() != before).any(dim=1)
    assert moved[rows].all() and int(moved.sum()) == len(rows)  # the straight-through gradient reaches looked-up rows only
    remove_fake_quant(module)
    written = {t.name: numpy_helper.to_array(t) for t in write_back(bg.model, module).graph.initializer}
    np.testing.assert_array_equal(written["Wword"], params["Wword"].detach().numpy())


def test_frozen_table_computes_the_emitted_values_once_and_is_not_trained(bg):
    module = to_torch(bg.model)
    params = parameter_map(module, bg.model)
    specs = {k.weight: WeightQuantSpec(4, False, "per-group", group_size=16, axis=k.out_axis)
             for k in bg.kernels.values() if k.op == "Gather"}
    apply_fake_quant(module, specs, frozen={"Wword"})
    inits = {t.name: numpy_helper.to_array(t) for t in bg.model.graph.initializer}
    binding = module.onnx_bindings["Wword"]
    owner = module.get_submodule(binding.path)
    np.testing.assert_array_equal(getattr(owner, binding.attr).numpy(), fake_quantize(inits["Wword"], specs["Wword"]))
    ids = token_ids(5)
    before = params["Wword"].detach().clone()
    out = module(torch.from_numpy(ids))
    with torch.no_grad():
        emitted = _ort(quantize_weights(bg.model, specs, "storage"), ids)
    assert np.abs(out.detach().numpy() - emitted).max() <= 1e-4 * max(1.0, np.abs(emitted).max())
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert all(p is not params["Wword"] for p in trainable) and trainable
    out.pow(2).sum().backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    assert params["Wword"].grad is None and torch.equal(params["Wword"].detach(), before)
    remove_fake_quant(module)
    assert getattr(owner, binding.attr) is params["Wword"] and params["Wword"].requires_grad
    written = {t.name: numpy_helper.to_array(t) for t in write_back(bg.model, module).graph.initializer}
    np.testing.assert_array_equal(written["Wword"], inits["Wword"])
