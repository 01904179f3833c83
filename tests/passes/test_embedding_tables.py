"""Embedding tables (Gather on a constant 2-D table) through the weight pass: the looked-up rows
equal the numpy quantizer's dequantized table gathered, and the stored bytes are counted exactly."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.quantize import WeightQuantSpec, fake_quantize
from passes.quantize_weights import quantize_weights
from passes.storage import encoded_nbytes, initializer_nbytes

ROWS, HIDDEN = 300, 48  # 48 = one full and one partial block of 32


def _lookup_model(table: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", "S", table.shape[1]])],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    t = np.random.default_rng(0).standard_normal((ROWS, HIDDEN)).astype(np.float32)
    t[5] = 0.0  # an all-zero row (padding tokens often have one)
    return t


@pytest.mark.parametrize("target", ["storage", "ort-cpu", "qdq"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity,symmetric", [("per-channel", True), ("per-group", True),
                                                   ("per-group", False), ("per-tensor", False)])
def test_quantized_lookup_is_the_dequantized_table_gathered(table, target, bits, granularity, symmetric):
    spec = WeightQuantSpec(bits, symmetric, granularity, group_size=32, axis=0)  # one scale per row / row block
    out = quantize_weights(_lookup_model(table), {"table": spec}, target)
    onnx.checker.check_model(out, full_check=True)
    ids = np.random.default_rng(1).integers(0, ROWS, (3, 7)).astype(np.int64)
    ids[0, 0] = 5
    got = _run(out, ids)
    want = fake_quantize(table, spec)[ids]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(table).max())
    assert initializer_nbytes(out) == encoded_nbytes(table.shape, spec, target)
    fraction = initializer_nbytes(out) / table.nbytes
    assert fraction < {2: 0.16, 4: 0.2, 8: 0.36}[bits] if target == "storage" else fraction < 0.36


def test_per_row_scales_lie_along_the_vocabulary(table):
    """Per-channel with axis 0 stores one scale per row: a row of tiny values keeps its precision."""
    scaled = table.copy()
    scaled[7] *= 1e-3
    spec = WeightQuantSpec(4, True, "per-channel", axis=0)
    out = quantize_weights(_lookup_model(scaled), {"table": spec}, "storage")
    scales = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "table_scale"))
    assert scales.size == ROWS
    row = _run(out, np.array([[7]], np.int64))[0, 0]
    assert np.abs(row - scaled[7]).max() <= scales.reshape(-1)[7] / 2 + 1e-9
