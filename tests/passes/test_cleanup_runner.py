"""Clean-up passes and the checking pass runner."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from passes.cleanup import cleanup
from passes.runner import PassCheckError, run_passes
from tests.oracles import run_ort


def _model_with_dead_code():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    unused = numpy_helper.from_array(np.ones((64, 64), np.float32), "unused")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Identity", ["h"], ["hi"], name="id"),
        helper.make_node("Relu", ["hi"], ["y"], name="relu"),
        helper.make_node("Sigmoid", ["x"], ["dead"], name="dead"),
    ]
    g = helper.make_graph(nodes, "g", [x], [y], [w, unused])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_cleanup_removes_dead_nodes_unused_initializers_and_identities():
    model = _model_with_dead_code()
    clean = cleanup(model)
    assert [n.op_type for n in clean.graph.node] == ["MatMul", "Relu"]
    assert [t.name for t in clean.graph.initializer] == ["w"]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(clean, feeds)[0], run_ort(model, feeds)[0])
    assert len(model.graph.node) == 4  # input untouched


def test_checking_runner_catches_a_broken_pass():
    def break_it(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[0].input[1] = "missing_weight"
        return out

    model = _model_with_dead_code()
    assert run_passes(model, [cleanup], checking=True).graph.node
    run_passes(model, [break_it], checking=False)  # unchecked: goes through
    with pytest.raises(PassCheckError, match="after pass break_it"):
        run_passes(model, [cleanup, break_it], checking=True)
