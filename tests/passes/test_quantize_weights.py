"""The weight-quantization pass against ORT: emitted model == fp32 model with fake-quantized weights."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper, parser

from passes.quantize import WeightQuantSpec, fake_quantize, quantize, to_2d
from passes.quantize_weights import QuantizeWeightsPass, WeightQuantError, encoding, quantize_weights
from passes.storage import encoded_nbytes

# Every kernel kind the product compresses, with its output-channel axis and a group size that
# leaves a partial last block.
KERNELS_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
kernels (float[2,4,6,6] x) => (float[2,10] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, Wconv, Bconv)
  c2 = Conv <pads=[1,1,1,1], group=2> (c1, Wgroup)
  c3 = Conv <pads=[1,1,1,1], group=8> (c2, Wdepth)
  ct = ConvTranspose <strides=[2,2]> (c3, Wtrans)
  f = Flatten <axis=1> (ct)
  g1 = Gemm <transB=1> (f, Wgemm1, Bgemm1)
  g2 = Gemm (g1, Wgemm0)
  y = MatMul(g2, Wmm)
}
"""
WEIGHTS = {  # name: (shape, output axis, group size)
    "Wconv": ((8, 4, 3, 3), 0, 16),
    "Wgroup": ((8, 4, 3, 3), 0, 32),
    "Wdepth": ((8, 1, 3, 3), 0, 4),
    "Wtrans": ((8, 3, 2, 2), 1, 12),
    "Wgemm1": ((16, 432), 0, 100),
    "Wgemm0": ((16, 12), 1, 5),
    "Wmm": ((12, 10), 1, 8),
}
TARGETS = ("storage", "ort-cpu", "qdq")
GRANULARITIES = ("per-tensor", "per-channel", "per-group", "log2")
CONTAINER = {  # (container bits, signed) -> ONNX type; 2 bits are packed into uint8 (storage rule 3)
    (2, True): TensorProto.UINT8, (2, False): TensorProto.UINT8, (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def kernels():
    rng = np.random.default_rng(0)
    model = parser.parse_model(KERNELS_TEXT)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, (s, _, _) in WEIGHTS.items()}
    weights["Wconv"][3] = 0.0  # an all-zero output channel
    weights["Wgemm1"][:, :50] *= 0.01  # blocks of very different ranges
    weights["Bconv"] = rng.standard_normal(8).astype(np.float32)
    weights["Bgemm1"] = rng.standard_normal(16).astype(np.float32)
    model.graph.initializer.extend(numpy_helper.from_array(w, n) for n, w in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model, weights, {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}


def _specs(bits, symmetric, granularity):
    return {n: WeightQuantSpec(bits, symmetric, granularity, group_size=g, axis=a) for n, (_, a, g) in WEIGHTS.items()}


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    return out


def _expected_stored(w, spec, target, packed=False):
    """The stored integers in their layout, flattened in C order, derived from the pass's documented
    rules (not its code)."""
    q = quantize(w, spec).q
    signed = spec.symmetric or spec.granularity == "log2"
    if spec.granularity == "log2" and target != "storage" and spec.bits <= 4:
        q = np.sign(q) * np.where(q == 0, 0, 2 ** np.maximum(np.abs(q) - 1, 0))  # rule 6
    if packed and signed:
        q = q & 3  # rule 1: a signed 2-bit grid is stored in two's complement
    if spec.granularity == "per-group" and w.ndim != 2:
        q = to_2d(q, spec.axis)  # rule 4
    return q.reshape(-1)


def _stored_values(stored: onnx.TensorProto, count: int) -> np.ndarray:
    """The stored integers flattened; 2-bit packed bytes unpacked by rule 3 (little-endian fields)."""
    array = numpy_helper.to_array(stored)
    if stored.data_type == TensorProto.UINT8 and array.ndim == 2 and array.shape[1] == 1 and array.size < count:
        array = (array.reshape(-1, 1) >> np.array([0, 2, 4, 6], np.uint8)) & 3
    return array.reshape(-1)[:count].astype(np.int32)


def _containers(spec, target):
    """The documented containers; a storage 2-bit grid is packed, or INT4 where that is smaller (rule 3)."""
    signed = spec.symmetric or spec.granularity == "log2"
    if target != "storage":
        return {CONTAINER[(8, signed)]}
    if spec.bits == 2:
        return {CONTAINER[(2, signed)], CONTAINER[(4, signed)]}
    return {CONTAINER[(4 if spec.bits <= 4 else 8, signed)]}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("bits", range(2, 9))
def test_emitted_model_matches_fake_quantized_reference(kernels, bits, symmetric, granularity, target):
    _check_emitted(kernels, _specs(bits, symmetric, granularity), target)


# group sizes that tile each weight's fan-in (the blocked storage decode of rule 4, no spread)
TILING_GROUPS = {"Wconv": 12, "Wgroup": 36, "Wdepth": 3, "Wtrans": 8, "Wgemm1": 48, "Wgemm0": 4, "Wmm": 6}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("bits", range(2, 9))
def test_per_group_blocks_that_tile_the_fan_in(kernels, bits, symmetric, target):
    specs = {n: WeightQuantSpec(bits, symmetric, "per-group", group_size=TILING_GROUPS[n], axis=a)
             for n, (_, a, _) in WEIGHTS.items()}
    _check_emitted(kernels, specs, target)


def _check_emitted(kernels, specs, target):
    model, weights, feeds = kernels
    before = model.SerializeToString()
    out = quantize_weights(model, specs, target)
    assert model.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(out, full_check=True)

    # 1. stored integers are quantize()'s, in the documented container and layout
    inits = {t.name: t for t in out.graph.initializer}
    for name, spec in specs.items():
        assert name not in inits
        stored = inits[f"{name}_quantized"]
        assert stored.data_type in _containers(spec, target), name
        packed = target == "storage" and stored.data_type == TensorProto.UINT8 and spec.bits == 2
        np.testing.assert_array_equal(_stored_values(stored, weights[name].size),
                                      _expected_stored(weights[name], spec, target, packed), err_msg=name)

    # 2. the decode reproduces fake_quantize bit for bit, and the outputs match the fp32 model
    #    whose weights are fake-quantized (both run at ORT_ENABLE_ALL)
    fq = {n: fake_quantize(weights[n], s) for n, s in specs.items()}
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in specs)
    got = _session(probe).run(None, feeds)
    for name, decoded in zip(specs, got[1:]):
        np.testing.assert_array_equal(decoded, fq[name], err_msg=name)
    want = _session(_with_weights(model, fq)).run(None, feeds)[0]
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    # 3. stored bytes are what passes.storage predicts, exactly
    nbytes = sum(len(t.raw_data) for t in out.graph.initializer)
    assert all(t.HasField("raw_data") for t in out.graph.initializer)
    assert nbytes == sum(encoded_nbytes(w.shape, specs.get(n), target) for n, w in weights.items())


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
def test_two_bit_storage_is_packed_where_smaller(symmetric, granularity):
    """Rule 3: packing costs a few small operands, so a tiny weight keeps its 2-bit grid in INT4;
    either way lowering 3 bits (INT4) to 2 never costs bytes, and a large weight takes ~n/4 bytes."""
    for shape in [(4, 1, 3, 3), (8, 1, 3, 3), (16, 1, 3, 3), (16, 4, 3, 3), (64, 64, 3, 3), (10, 64), (7,), (3, 5)]:
        two = WeightQuantSpec(2, symmetric, granularity, group_size=32)
        assert encoded_nbytes(shape, two) <= encoded_nbytes(shape, WeightQuantSpec(3, symmetric, granularity, 32))
    big = (64, 64, 3, 3)
    assert encoding(two, "storage", big).container == TensorProto.UINT8
    three = WeightQuantSpec(3, symmetric, granularity, group_size=32)
    assert encoded_nbytes(big, three) - encoded_nbytes(big, two) > 0.24 * 64 * 64 * 9  # n/4 bytes saved
    assert encoding(two, "storage", (4, 1, 3, 3)).container in (TensorProto.INT4, TensorProto.UINT4)


@pytest.mark.parametrize("target,bits,opset", [
    ("storage", 2, 21),  # these small weights keep their 2-bit grids in INT4 (rule 3)
    ("storage", 3, 21), ("storage", 8, 17), ("qdq", 4, 17), ("ort-cpu", 2, 17),
])
def test_opset_is_raised_only_as_needed(kernels, target, bits, opset):
    model, _, _ = kernels
    out = quantize_weights(model, _specs(bits, True, "per-channel"), target)
    assert {o.domain: o.version for o in out.opset_import}[""] == opset
    assert out.ir_version >= onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def test_opset_18_plus_models_convert_with_onnxscript(kernels):
    model, weights, feeds = kernels
    spec = WeightQuantSpec(4, True, "per-group", group_size=16)
    out = quantize_weights(onnx.version_converter.convert_version(model, 19), {"Wconv": spec}, "storage")
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    want = _session(_with_weights(model, {"Wconv": fake_quantize(weights["Wconv"], spec)})).run(None, feeds)[0]
    np.testing.assert_allclose(_session(out).run(None, feeds)[0], want, rtol=1e-4, atol=1e-4)


def test_blocked_decode_needs_opset_21_and_never_lowers(kernels):
    model, _, _ = kernels
    specs = _specs(8, True, "per-group")
    assert {o.domain: o.version for o in quantize_weights(model, specs, "qdq").opset_import}[""] == 21
    newer = quantize_weights(model, {"Wconv": WeightQuantSpec(4, True, "per-tensor")}, "storage")
    again = quantize_weights(newer, {"Wmm": WeightQuantSpec(8, True, "per-channel", axis=1)}, "qdq")
    assert {o.domain: o.version for o in again.opset_import}[""] == 21


def test_pass_follows_onnx_ir_machinery(kernels):
    model, weights, feeds = kernels
    ir_model = ir.from_proto(model)
    qpass = QuantizeWeightsPass({"Wconv": WeightQuantSpec(4, False, "per-group", group_size=16)}, "storage")
    assert isinstance(qpass, ir.passes.InPlacePass)
    result = qpass(ir_model)
    assert result.modified and result.model is ir_model
    assert "Wconv_quantized" in ir_model.graph.initializers
    assert not QuantizeWeightsPass({}, "storage")(ir_model).modified


def test_storage_file_is_8x_smaller_for_4_bit_per_channel(tmp_path):
    rng = np.random.default_rng(3)
    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        big (float[1,256] x) => (float[1,512] y) { y = Gemm <transB=1> (x, W) }
    """)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((512, 256)).astype(np.float32), "W"))
    fp32_path, q4_path, q2_path = tmp_path / "fp32.onnx", tmp_path / "q4.onnx", tmp_path / "q2.onnx"
    onnx.save(model, fp32_path)
    onnx.save(quantize_weights(model, {"W": WeightQuantSpec(4, True, "per-channel")}, "storage"), q4_path)
    onnx.save(quantize_weights(model, {"W": WeightQuantSpec(2, True, "per-channel")}, "storage"), q2_path)
    assert {o.domain: o.version for o in onnx.load(q2_path).opset_import}[""] == 18  # packed: BitwiseAnd
    ratio4 = fp32_path.stat().st_size / q4_path.stat().st_size
    ratio2 = fp32_path.stat().st_size / q2_path.stat().st_size
    assert 7.5 < ratio4 <= 8.0, ratio4
    assert 14.5 < ratio2 <= 16.0, ratio2
    assert encoded_nbytes((512, 256), WeightQuantSpec(4, True, "per-channel"), "storage") == 512 * 256 // 2 + 512 * 4
    assert encoded_nbytes((512, 256), None, "storage") == 512 * 256 * 4


# --- refusals -------------------------------------------------------------------------------------
REFUSALS_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
refusals (float[2,4] x, float[4,4] Winput) => (float[2,4] y, float[4,4] Wout) {
  a = MatMul(x, Wshared)
  b = MatMul(a, Wshared)
  c = MatMul(b, Wint)
  d = QuantizeLinear(Wfloat, s, zp)
  e = DequantizeLinear(d, s, zp)
  f = MatMul(c, e)
  g = MatMul(f, Winput)
  h = MatMul(g, Wout)
  y = MatMul(h, Wok)
}
"""


@pytest.fixture(scope="module")
def refusals():
    model = parser.parse_model(REFUSALS_TEXT)
    ones = np.ones((4, 4), np.float32)
    model.graph.initializer.extend([
        numpy_helper.from_array(ones, "Wshared"), numpy_helper.from_array(ones.astype(np.int8), "Wint"),
        numpy_helper.from_array(ones, "Wfloat"), numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.int8(0), "zp"), numpy_helper.from_array(ones, "Wout"),
        numpy_helper.from_array(ones, "Wunused"), numpy_helper.from_array(ones, "Winput"),
        numpy_helper.from_array(ones, "Wok"),
    ])
    return model


@pytest.mark.parametrize("name,spec,match", [
    ("Wshared", WeightQuantSpec(4, True, "per-channel"), "shared by 2 uses"),
    ("Wint", WeightQuantSpec(4, True, "per-channel"), "INT8, not FLOAT"),
    ("Wfloat", WeightQuantSpec(4, True, "per-channel"), "already quantized"),
    ("Wout", WeightQuantSpec(4, True, "per-channel"), "graph input or output"),
    ("Winput", WeightQuantSpec(4, True, "per-channel"), "graph input or output"),
    ("Wunused", WeightQuantSpec(4, True, "per-channel"), "not used"),
    ("Wmissing", WeightQuantSpec(4, True, "per-channel"), "no initializer"),
    ("Wok", WeightQuantSpec(4, True, "per-channel", axis=2), "axis 2"),
])
def test_refusals_name_the_initializer(refusals, name, spec, match):
    with pytest.raises(WeightQuantError, match=match) as err:
        quantize_weights(refusals, {name: spec}, "storage")
    assert name in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_target_is_refused(refusals):
    with pytest.raises(ValueError, match="target"):
        quantize_weights(refusals, {}, "gpu")


@pytest.mark.parametrize("spec,target", itertools.product(
    [WeightQuantSpec(3, False, "per-group", group_size=5), WeightQuantSpec(6, True, "log2"),
     WeightQuantSpec(2, False, "per-group", group_size=5), WeightQuantSpec(2, False, "per-channel"),
     WeightQuantSpec(2, True, "per-tensor")], TARGETS))
def test_encoded_nbytes_of_a_1d_weight(spec, target):
    """Weights of rank != 2 take the Reshape path, and 7 2-bit values pad their last byte (storage
    rule 3); the count must include every shape and Slice constant."""
    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        vec (float[3,7] x) => (float[3,7] y) { y = Mul(x, W) }
    """)
    w = np.linspace(-1, 2, 7, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "W"))
    out = quantize_weights(model, {"W": spec}, target)
    assert sum(len(t.raw_data) for t in out.graph.initializer) == encoded_nbytes((7,), spec, target)
    got = _session(out).run(None, {"x": np.ones((3, 7), np.float32)})[0]
    np.testing.assert_array_equal(got[0], fake_quantize(w, spec))


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The ops a default InferenceSession runs after its load-time optimisations."""
    so = ort.SessionOptions()  # default graph optimization level, as a user gets it
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3  # the NCHWc note about saving an ORT_ENABLE_ALL model
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("bits", range(2, 9))
def test_default_session_folds_every_storage_decode(kernels, bits, symmetric, granularity, tmp_path):
    """Rules 1-4: a default ORT session constant-folds the storage decodes at load, so the kernels
    run on fp32 weights: the optimised graph is the fp32 model's, op for op."""
    model, weights, _ = kernels
    choices = [_specs(bits, symmetric, granularity)]
    if granularity == "per-group":  # and the blocked decode of rule 4
        choices.append({n: WeightQuantSpec(bits, symmetric, granularity, group_size=TILING_GROUPS[n], axis=a)
                        for n, (_, a, _) in WEIGHTS.items()})
    for specs in choices:
        out = quantize_weights(model, specs, "storage")
        fp32 = _with_weights(model, {n: fake_quantize(weights[n], s) for n, s in specs.items()})
        ops = _optimized_ops(out, tmp_path)
        assert ops == _optimized_ops(fp32, tmp_path)
        decode_ops = {"DequantizeLinear", "Cast", "BitwiseAnd", "BitwiseXor", "Gather", "Sub", "Expand", "Slice"}
        assert not decode_ops & set(ops)
        types = {t.data_type for t in out.graph.initializer}
        assert not types & {TensorProto.INT2, TensorProto.UINT2}  # OpenVINO refuses them (rule 3)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", (2, 3, 8))
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
def test_sparse_storage_finds_the_stored_integers_of_every_decode(kernels, bits, symmetric, granularity):
    """`passes.sparse_weights.stored_initializer` follows each storage decode back to <W>_quantized."""
    from passes.sparse_weights import stored_initializer

    model, _, _ = kernels
    out = quantize_weights(model, _specs(bits, symmetric, granularity), "storage")
    assert all(stored_initializer(out, name) == f"{name}_quantized" for name in WEIGHTS)
