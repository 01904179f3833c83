"""Static activation quantization: close to fp32, fused by ORT, pinned weight grids kept exactly."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper, parser

from passes.quantize import WeightQuantSpec, fake_quantize, quantize
from passes.quantize_activations import quantize_activations

NET_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N,3,16,16] x) => (float[N,10] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
  r1 = Relu(c1)
  c2 = Conv <pads=[1,1,1,1], strides=[2,2]> (r1, W2, B2)
  r2 = Relu(c2)
  c3 = Conv <pads=[1,1,1,1]> (r2, W3, B3)
  r3 = Relu(c3)
  p = GlobalAveragePool(r3)
  f = Flatten(p)
  y = Gemm <transB=1> (f, W4, B4)
}
"""


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(0)
    model = parser.parse_model(NET_TEXT)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    weights = {"W1": he(16, 3, 3, 3), "W2": he(32, 16, 3, 3), "W3": he(32, 32, 3, 3), "W4": he(10, 32)}
    weights.update({f"B{i}": (0.1 * rng.standard_normal(w.shape[0])).astype(np.float32)
                    for i, w in enumerate(weights.values(), 1)})
    model.graph.initializer.extend(numpy_helper.from_array(w, n) for n, w in weights.items())

    def images(n):  # smooth random fields plus noise: structured like images, not white noise
        base = np.kron(rng.standard_normal((n, 3, 4, 4)), np.ones((1, 1, 4, 4)))
        return (base + 0.3 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)

    calib = [{"x": images(16)} for _ in range(4)]
    return model, weights, calib, images(64)


def _run(model: onnx.ModelProto, x: np.ndarray, optimized_path=None) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def default_quantized(net):
    model, _, calib, _ = net
    before = model.SerializeToString()
    out = quantize_activations(model, calib)
    assert model.SerializeToString() == before, "the input model was modified"
    return out


def test_default_is_close_to_fp32_and_fuses_into_qlinearconv(net, default_quantized, tmp_path):
    model, _, _, x = net
    fp32 = _run(model, x)
    got = _run(default_quantized, x, tmp_path / "opt.onnx")
    assert _rel(got, fp32) < 0.05
    assert np.mean(got.argmax(1) == fp32.argmax(1)) > 0.9
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops, ops


def test_default_scheme_is_uint8_activations_and_7_bit_int8_weights(default_quantized):
    inits = _inits(default_quantized)
    for name in ("W1", "W2", "W3", "W4"):
        q = inits[f"{name}_quantized"]
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 64, name
    assert inits["x_zero_point"].dtype == np.uint8


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_other_calibration_methods(net, method):
    model, _, calib, x = net
    assert _rel(_run(quantize_activations(model, calib[:2], method=method), x), _run(model, x)) < 0.1
    # a last short batch (as `SearchContext.calib_batches` cuts them: 16 + 16 + 7 rows) is rebatched
    # evenly for ORT's histogram calibrators, which fail on uneven batches ("inhomogeneous shape")
    uneven = [calib[0], calib[1], {"x": calib[2]["x"][:7]}]
    assert _rel(_run(quantize_activations(model, uneven, method=method), x), _run(model, x)) < 0.1


def test_uneven_batches_are_rebatched_to_one_size_with_every_row_once():
    from passes.quantize_activations import _even_batches

    rows = np.arange(39 * 2, dtype=np.float32).reshape(39, 2)
    batches = [{"x": rows[:16], "m": rows[:16, :1]}, {"x": rows[16:32], "m": rows[16:32, :1]},
               {"x": rows[32:], "m": rows[32:, :1]}]
    even = _even_batches(batches)
    assert {len(b["x"]) for b in even} == {13} and {len(b["m"]) for b in even} == {13}  # 39 = 3 x 13
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in even]), rows)
    np.testing.assert_array_equal(np.concatenate([b["m"] for b in even]), rows[:, :1])
    same = [{"x": rows[:13]}, {"x": rows[13:26]}]
    assert [len(b["x"]) for b in _even_batches(same)] == [13, 13]


def test_u8u8_scheme_stores_uint8_weights(net):
    model, _, calib, x = net
    out = quantize_activations(model, calib[:2], scheme="u8u8", per_channel=False)
    assert _inits(out)["W2_quantized"].dtype == np.uint8
    assert _rel(_run(out, x), _run(model, x)) < 0.05


@pytest.mark.parametrize("spec", [
    WeightQuantSpec(4, True, "per-channel"),
    WeightQuantSpec(5, False, "per-channel"),
    WeightQuantSpec(3, True, "per-tensor"),
    WeightQuantSpec(4, True, "log2"),
], ids=str)
def test_pinned_weight_grids_are_kept_exactly(net, spec, tmp_path):
    model, weights, calib, x = net
    grids = {n: spec for n in ("W1", "W2", "W3", "W4")}
    out = quantize_activations(model, calib[:2], weight_grids=grids)
    inits = _inits(out)
    for name in grids:
        qw = quantize(weights[name], spec)
        stored = inits[f"{name}_quantized"].astype(np.int32)
        if spec.granularity == "log2":  # int8 values +-2^(|code| - 1), scale s * 2^-kmax
            expect = np.sign(qw.q) * np.where(qw.q == 0, 0, 2 ** np.maximum(np.abs(qw.q) - 1, 0))
            kmax = 2 ** (spec.bits - 1) - 2
            np.testing.assert_array_equal(inits[f"{name}_scale"], qw.scale * np.float32(2.0**-kmax))
        else:
            expect = qw.q
            np.testing.assert_array_equal(inits[f"{name}_scale"], qw.scale)
        np.testing.assert_array_equal(stored, expect, err_msg=name)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for t in reference.graph.initializer:
        if t.name in grids:
            t.CopyFrom(numpy_helper.from_array(fake_quantize(weights[t.name], spec), t.name))
    assert _rel(_run(out, x, tmp_path / "opt.onnx"), _run(reference, x)) < 0.05
    assert "QLinearConv" in [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="kl"), "method"),
    (dict(scheme="s4s4"), "scheme"),
    (dict(weight_grids={"W1": WeightQuantSpec(4, True, "per-group")}), "not one 8-bit DequantizeLinear"),
    (dict(weight_grids={"W1": WeightQuantSpec(6, True, "log2")}), "not one 8-bit DequantizeLinear"),
    (dict(weight_grids={"W1": WeightQuantSpec(4, True, "per-channel")}, per_channel=False), "per_channel=True"),
    (dict(weight_grids={"Wx": WeightQuantSpec(4, True, "per-channel")}), "not an initializer"),
])
def test_refusals(net, kwargs, match):
    model, _, calib, _ = net
    with pytest.raises(ValueError, match=match):
        quantize_activations(model, calib[:1], **kwargs)


def test_empty_calibration_is_refused(net):
    with pytest.raises(ValueError, match="calib_batches"):
        quantize_activations(net[0], [])


CONV_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N,16,4,4] x) => (float[N,8,4,4] y) {
  y = Conv(x, W, B)
}
"""


def test_default_scheme_fused_kernel_computes_the_qdq_reference(tmp_path):
    """ORT's fused QLinearConv gives what the QDQ file defines (the unoptimised session: Dequantize,
    fp32 Conv, Quantize) on a conv whose full-range int8 weights and high uint8 inputs overflow the
    int16 pair sums of u8 x s8 kernels on x86 without VNNI (there `scheme="u8s8"` is off by 79
    output steps in ORT, and OpenVINO 2026.4 overflows alike); the default 7-bit weights never do."""
    rng = np.random.default_rng(0)
    model = parser.parse_model(CONV_TEXT)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.uniform(-1, 1, (8, 16, 1, 1)).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(8, np.float32), "B")])
    x = rng.uniform(-1.5, 1.5, (256, 16, 4, 4)).astype(np.float32)
    out = quantize_activations(model, [{"x": x[:64]}])
    fused = _run(out, x, tmp_path / "opt.onnx")
    assert "QLinearConv" in [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = reference.run(None, {"x": x})[0]
    step = float(_inits(out)["y_scale"])
    assert np.abs(fused - want).max() <= step * 1.001  # a rounding tie at most
    if importlib.util.find_spec("openvino"):  # the optional second runtime's int8 kernels too
        import openvino

        from hirelc_onnx.evaluate.runtimes import OPENVINO_F32

        core = openvino.Core()
        compiled = core.compile_model(core.read_model(out.SerializeToString()), "CPU", OPENVINO_F32)
        assert np.abs(np.asarray(compiled({0: x})[compiled.output(0)]) - want).max() <= step * 1.001


def _old_batch_one(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """`model` as an older exporter wrote it: batch fixed to 1 and an older opset (Gemm, Conv, Relu,
    Flatten and GlobalAveragePool read the same there), like the onnx wheel's light models (opset 9)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in (*out.graph.input, *out.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    out.opset_import[0].version = opset
    out.ir_version = 4
    return out


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_an_opset_9_batch_one_model_with_uneven_batches_quantizes_and_runs(net, method):
    """ORT's quantizer writes per-channel DequantizeLinear `axis` into an opset-9 model as it is (invalid:
    the attribute exists from opset 13), and its calibrator feeds each batch as given (a batch-1 model
    fed 7 rows fails): the pass raises the opset to 13 and cuts the rows to the model's batch."""
    model, _, calib, x = net
    old = _old_batch_one(model, 9)
    out = quantize_activations(old, [{"x": calib[0]["x"][:4]}, {"x": calib[1]["x"][:3]}], method=method)
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= 13
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(8)])
    assert _rel(got, _run(model, x[:8])) < 0.1


def test_rows_are_cut_to_the_model_batch_with_the_last_one_completed():
    from passes.quantize_activations import _model_batches

    model = parser.parse_model(NET_TEXT)
    fixed = _old_batch_one(model, 17)
    rows = np.arange(7 * 3 * 16 * 16, dtype=np.float32).reshape(7, 3, 16, 16)
    batches = [{"x": rows[:4]}, {"x": rows[4:]}]
    cut = _model_batches(fixed, batches)
    assert [len(b["x"]) for b in cut] == [1] * 7
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cut]), rows)
    model2 = _old_batch_one(model, 17)
    model2.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    cut2 = _model_batches(model2, batches)
    assert [len(b["x"]) for b in cut2] == [2, 2, 2, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cut2])[:7], rows)
    np.testing.assert_array_equal(cut2[-1]["x"][1], rows[6])  # the last row repeated
    assert [len(b["x"]) for b in _model_batches(model, batches)] == [4, 3]  # symbolic batch: as given


def test_a_softmax_giving_the_output_stays_fp32(net):
    """ORT puts a Softmax output on a fixed [0, 1] uint8 grid: probabilities under 0.002 become 0."""
    model, _, calib, x = net
    probs = onnx.ModelProto()
    probs.CopyFrom(model)
    g = probs.graph
    g.node.append(onnx.helper.make_node("Softmax", ["y"], ["prob"], axis=1))
    g.node.append(onnx.helper.make_node("Flatten", ["prob"], ["q"], name="flat"))
    g.output[0].name = "q"
    out = quantize_activations(probs, calib[:2])
    producer = {o: n for n in out.graph.node for o in n.output}
    assert producer["q"].op_type == "Flatten" and producer[producer["q"].input[0]].op_type == "Softmax"
    got, want = _run(out, x), _run(probs, x)
    small = want < 0.002
    assert small.any() and (got[small] > 0).all()  # small probabilities survive
    assert _rel(got, want) < 0.1


def test_a_dead_channel_keeps_its_bias(net, caplog):
    """A channel with weights ~0 and a bias (EfficientNet-Lite0's stem: 3e-9 against 0.19) is written
    as zeros on a floored grid step: on its own step the bias overflows int32 and ORT clips it."""
    from passes.quantize_activations import DEAD_CHANNEL_SCALE

    model, weights, calib, x = net
    dead = onnx.ModelProto()
    dead.CopyFrom(model)
    w1, b1 = weights["W1"].copy(), weights["B1"].copy()
    w1[3] *= 1e-9
    b1[3] = 3.0
    for t in dead.graph.initializer:
        if t.name in ("W1", "B1"):
            t.CopyFrom(numpy_helper.from_array({"W1": w1, "B1": b1}[t.name], t.name))
    spec = WeightQuantSpec(7, True, "per-channel")
    with caplog.at_level("WARNING"):
        out = quantize_activations(dead, calib[:2], weight_grids={"W1": spec})
    assert not [r for r in caplog.records if "exceeds the range" in r.getMessage()]
    inits = _inits(out)
    scale = inits["W1_scale"]
    assert scale[3] == pytest.approx(DEAD_CHANNEL_SCALE * scale.max()) and not inits["W1_quantized"][3].any()
    live = [c for c in range(16) if c != 3]
    np.testing.assert_array_equal(inits["W1_quantized"][live], quantize(w1, spec).q[live])  # the others as pinned
    # the dead channel's output is relu(3.0) everywhere, as in fp32
    np.testing.assert_allclose(_first_relu(dead, x)[:, 3], 3.0, atol=1e-5)
    np.testing.assert_allclose(_first_relu(out, x)[:, 3], 3.0, atol=0.05)


def _first_relu(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The net's first Relu output (r1), read by adding it to the graph's outputs (in a copy)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r1"], {"x": x})[0]
