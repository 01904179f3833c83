"""Sparse weight storage against ORT: the rewritten model computes what the dense-with-zeros model does,
and `sparse_nbytes` is exactly what the pass writes."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, parser

import onnx_ir as ir
from passes.quantize import WeightQuantSpec
from passes.quantize_weights import quantize_weights
from passes.sparse_weights import (
    ENCODINGS,
    SparseEncoding,
    SparseWeightError,
    SparseWeightsPass,
    choose_encoding,
    dense_nbytes,
    sparse_nbytes,
    sparse_weights,
    stored_initializer,
)

NP = {t: helper.tensor_dtype_to_np_dtype(t) for t in
      (TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2)}


def _session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _sparse_array(dtype: int, shape: tuple[int, ...], density: float, seed: int = 0) -> np.ndarray:
    """Random nonzero values (never 0 themselves) at `density` of the positions."""
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < density
    if dtype == TensorProto.FLOAT:
        values = rng.standard_normal(shape).astype(np.float32) + 3.0
    else:
        lo, hi = {TensorProto.INT8: (1, 127), TensorProto.UINT8: (1, 255), TensorProto.INT4: (1, 7),
                  TensorProto.UINT4: (1, 15), TensorProto.INT2: (1, 1)}[dtype]
        values = rng.integers(lo, hi + 1, size=shape) * (rng.choice([-1, 1], size=shape) if lo == 1 and dtype in (
            TensorProto.INT8, TensorProto.INT4, TensorProto.INT2) else 1)
    return np.where(keep, values, 0).astype(NP[dtype])


def _gemm_model(w: np.ndarray, opset: int) -> onnx.ModelProto:
    """y = x @ decode(W)^T, with a per-row DequantizeLinear when W holds integers."""
    n_out, n_in = w.shape
    inits = [numpy_helper.from_array(w, "W")]
    nodes = []
    weight = "W"
    if w.dtype != np.float32:
        inits.append(numpy_helper.from_array(np.linspace(0.01, 0.1, n_out).astype(np.float32), "W_scale"))
        nodes.append(helper.make_node("DequantizeLinear", ["W", "W_scale"], ["Wf"], axis=0))
        weight = "Wf"
    nodes.append(helper.make_node("Gemm", ["x", weight], ["y"], transB=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n_out])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return model


def _folded_ops(model: onnx.ModelProto) -> list[str]:
    """The ops ORT runs after its load-time optimisations (ORT_ENABLE_EXTENDED: no layout rewrites)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sorted(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _nbytes(model: onnx.ModelProto, exclude: set[str] = frozenset()) -> int:
    return sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
               for t in model.graph.initializer if t.name not in exclude)


CASES = [  # dtype, density, the encoding expected to be smallest
    (TensorProto.FLOAT, 0.3, "bitmask"),
    (TensorProto.FLOAT, 0.02, "delta8"),
    (TensorProto.INT8, 0.1, "delta4"),
    (TensorProto.INT8, 0.5, "bitmask"),
    (TensorProto.UINT8, 0.05, "delta8"),
    (TensorProto.INT4, 0.05, "delta8"),
    (TensorProto.INT4, 0.2, "delta4"),
    (TensorProto.UINT4, 0.5, "bitmask"),
    (TensorProto.FLOAT, 0.0, "delta4"),
]


@pytest.mark.parametrize("dtype,density,expected", CASES,
                         ids=[f"{TensorProto.DataType.Name(d)}-{p}" for d, p, _ in CASES])
def test_ort_equality_and_exact_bytes(dtype, density, expected):
    w = _sparse_array(dtype, (48, 200), density)
    dense = _gemm_model(w, 21)
    plan = choose_encoding(w, 21)
    assert plan.encoding == expected
    assert plan.nbytes == sparse_nbytes(w, expected) < dense_nbytes(w)

    out = sparse_weights(dense, ["W"])
    onnx.checker.check_model(out, full_check=True)
    assert "W" not in {t.name for t in out.graph.initializer}
    # exactly what sparse_nbytes counted replaced W's dense bytes
    assert _nbytes(out) - _nbytes(dense, {"W"}) == plan.nbytes
    x = np.random.default_rng(1).standard_normal((7, 200)).astype(np.float32)
    want = _session(dense).run(None, {"x": x})[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_allclose(_session(out, level).run(None, {"x": x})[0], want, rtol=0, atol=1e-5)
    assert _folded_ops(out) == _folded_ops(dense)  # rule 5: ORT folds the decode away at load


def test_byte_count_by_hand():
    # 16 fp32 entries, nonzeros at 0, 3, 40 (gap 37 > 15: two delta4 fillers)
    w = np.zeros((4, 16), np.float32)
    w.reshape(-1)[[0, 3, 40]] = [1.0, 2.0, 3.0]
    shape = 8 * 2  # X's 2-D shape, int64
    # values + trailing 0, mask, then powers of 1/2 (float[8]), modulus (float), [-1], [0], [n], axis, Where zero
    assert sparse_nbytes(w, "bitmask") == 4 * 4 + 64 // 8 + (32 + 4 + 8 + 8 + 8 + 4 + 4) + shape
    # values, gaps, then axis and [1, n]
    assert sparse_nbytes(w, "delta8") == 3 * 4 + 3 + (4 + 16) + shape
    assert sparse_nbytes(w, "delta4") == 5 * 4 + 3 + (4 + 16) + shape  # 5 entries: 0, 3, +15, +15, +7
    assert dense_nbytes(w) == 256
    assert dense_nbytes(w.astype(NP[TensorProto.INT4])) == 32


def test_not_used_when_not_smaller():
    w = _sparse_array(TensorProto.INT4, (48, 200), 0.9)
    model = _gemm_model(w, 21)
    assert choose_encoding(w, 21).encoding is None
    assert all(sparse_nbytes(w, e) >= dense_nbytes(w) for e in ENCODINGS)
    ir_model = ir.from_proto(model)
    result = SparseWeightsPass(["W"])(ir_model)
    assert not result.modified
    assert ir.to_proto(result.model).graph.initializer[0].name == "W"


def test_int2_stays_dense():
    """ORT 1.32 cannot constant-fold a Cast to INT2 at load (rule 6): 2-bit integers are left dense."""
    w = _sparse_array(TensorProto.INT2, (48, 200), 0.02)
    assert choose_encoding(w, 25) == SparseEncoding(None, 2400, 2400, int((w.astype(np.int8) != 0).sum()))
    assert not SparseWeightsPass(["W"])(ir.from_proto(_gemm_model(w, 25))).modified
    assert not SparseWeightsPass()(ir.from_proto(_gemm_model(w, 25))).modified


def test_high_sparsity_much_smaller():
    w = _sparse_array(TensorProto.FLOAT, (256, 512), 0.05)
    assert choose_encoding(w, 17).nbytes < dense_nbytes(w) / 8


QUANT_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
net (float[2,4,6,6] x) => (float[2,10] y) {
  c = Conv <pads=[1,1,1,1]> (x, Wconv)
  f = Flatten <axis=1> (c)
  y = Gemm <transB=1> (f, Wgemm)
}
"""


@pytest.mark.parametrize("granularity", ["per-channel", "per-group", "log2"])
def test_quantized_weights_resolve_and_match(granularity):
    """The pass on what quantize_weights writes: resolved through the decode, outputs unchanged."""
    rng = np.random.default_rng(0)
    model = parser.parse_model(QUANT_TEXT)
    weights = {"Wconv": (8, 4, 3, 3), "Wgemm": (10, 288)}
    for name, shape in weights.items():
        w = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < 0.1)
        model.graph.initializer.append(numpy_helper.from_array(w, name))
    specs = {n: WeightQuantSpec(bits=4, symmetric=True, granularity=granularity, group_size=16, axis=0)
             for n in weights}
    quantized = quantize_weights(model, specs)
    stored = [stored_initializer(quantized, n) for n in weights]
    assert all(s is not None and s != n for s, n in zip(stored, weights))
    out = sparse_weights(quantized, stored)
    assert {n.op_type for n in out.graph.node} >= {"ScatterElements", "Conv", "Gemm"}
    assert _nbytes(out) < _nbytes(quantized)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_session(out).run(None, {"x": x})[0], _session(quantized).run(None, {"x": x})[0],
                               rtol=0, atol=1e-5)
    assert _folded_ops(out) == _folded_ops(quantized)


def test_stored_initializer_of_plain_and_computed_tensors():
    model = parser.parse_model(QUANT_TEXT)
    model.graph.initializer.extend([numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "Wconv"),
                                    numpy_helper.from_array(np.ones((10, 288), np.float32), "Wgemm")])
    assert stored_initializer(model, "Wconv") == "Wconv"
    assert stored_initializer(model, "c") is None  # a Conv output, not a weight decode


def test_delta4_needs_opset_21():
    """UINT4 gaps exist from opset 21; below it the next smallest encoding is used, and runs."""
    w = _sparse_array(TensorProto.INT8, (48, 200), 0.2)
    assert choose_encoding(w, 21).encoding == "delta4"
    plan = choose_encoding(w, 17)
    assert plan.encoding == "bitmask" and plan.nbytes == sparse_nbytes(w, "bitmask")
    dense = _gemm_model(w, 17)
    out = sparse_weights(dense, ["W"])
    assert _nbytes(out) - _nbytes(dense, {"W"}) == plan.nbytes
    x = np.ones((2, 200), np.float32)
    np.testing.assert_allclose(_session(out).run(None, {"x": x})[0], _session(dense).run(None, {"x": x})[0],
                               rtol=0, atol=1e-5)


def test_every_eligible_initializer_without_names():
    w = _sparse_array(TensorProto.FLOAT, (48, 200), 0.05)
    out = sparse_weights(_gemm_model(w, 17))
    assert "W" not in {t.name for t in out.graph.initializer}


@pytest.mark.parametrize("name,why", [("nope", "'nope': no initializer"), ("x", "'x': no initializer"),
                                      ("shape", "'shape': type INT64 cannot be stored sparsely"),
                                      ("unused", "'unused': not used by any node")])
def test_refusals_name_the_initializer(name, why):
    model = _gemm_model(_sparse_array(TensorProto.FLOAT, (8, 16), 0.1), 17)
    model.graph.initializer.append(numpy_helper.from_array(np.array([8, 16], np.int64), "shape"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((8, 16), np.float32), "unused"))
    model.graph.node.append(helper.make_node("Reshape", ["y", "shape"], ["y2"]))
    with pytest.raises(SparseWeightError, match=why):
        SparseWeightsPass([name])(ir.from_proto(model))


def test_refuses_old_opset_and_graph_outputs():
    model = _gemm_model(_sparse_array(TensorProto.FLOAT, (8, 16), 0.1), 10)
    model.ir_version = 7
    with pytest.raises(SparseWeightError, match="opset >= 11"):
        SparseWeightsPass(["W"])(ir.from_proto(model))
    model = _gemm_model(_sparse_array(TensorProto.FLOAT, (8, 16), 0.1), 17)
    model.graph.output.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 16]))
    with pytest.raises(SparseWeightError, match="graph input or output"):
        SparseWeightsPass(["W"])(ir.from_proto(model))
