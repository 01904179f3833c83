"""`compress` on graphs nobody here made: the light model zoo inside the onnx wheel (opset 9, weights
given as ConstantOfShape nodes, 224x224 inputs, up to 144M parameters).

Each run goes through the product's main path (hirelc, the quick settings, one real evaluation) and
the emitted model is judged on its own: ONNX Runtime loads it, its initializers as stored (counted
here, not by the product) are at most a sixth of the fp32 weights, and its output on the onnx test
suite's reference input (`arange(n) / n` in the input's shape, as onnx's backend runner makes it)
agrees with the reference output the wheel ships (`light_*_output_0.pb`) within onnx's own
tolerance for these models (rtol 1e-3; densenet121 2e-3). The light models' weights are constants,
so the quantized weights are exact and the agreement is close; what these tests catch is a rewrite,
an opset raise or a session that breaks on graphs of this shape.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from hirelc_onnx import compress
from hirelc_onnx.search.hirelc import QUICK_SETTINGS
from tests.light import ALL, light_normalized, light_path

BUDGET = 6.0
RTOL = {"densenet121": 2e-3}  # onnx's backend test tolerances for these models (1e-3 for the others)


def _stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer as the file stores them (packed INT4 / INT2 at their width)."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
               for t in model.graph.initializer)


def _reference(name: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(input name, the reference input, the reference output) of onnx's backend test for `name`."""
    model = onnx.load(str(light_path(name)))
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    n = int(np.prod(shape))
    x = (np.arange(n).reshape(shape) / n).astype(np.float32)
    out = numpy_helper.to_array(onnx.load_tensor(str(light_path(name)).replace(".onnx", "_output_0.pb")))
    return inp.name, x, out


def _compress_and_check(name: str, out: Path, data=None, **options) -> dict:
    result = compress(str(light_path(name)), budget=f"{BUDGET:g}x", data=data, settings=QUICK_SETTINGS,
                      evaluations=1, out_dir=out, **options)
    emitted = onnx.load(str(out / "model.onnx"))
    ratio = _stored_bytes(light_normalized(name)) / _stored_bytes(emitted)
    assert ratio >= BUDGET - 1e-9, ratio
    assert result.ratio == pytest.approx(ratio)  # the report counts what the file stores
    input_name, x, expected = _reference(name)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: x})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=RTOL.get(name, 1e-3), atol=1e-7)
    return result.report


def test_squeezenet_with_a_few_samples_meets_the_budget_and_keeps_the_reference_output(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    report = _compress_and_check("squeezenet", tmp_path / "out", data=x, finetune_epochs=0)
    assert report["data"]["samples"] == 16 and not report["data"]["data_free"]


@pytest.mark.zoo  # minutes per model: `make test-zoo`
@pytest.mark.parametrize("name", ALL)
def test_every_light_model_compresses_data_free(name, tmp_path):
    report = _compress_and_check(name, tmp_path / "out")
    assert report["data"]["data_free"]


def test_squeezenet_compresses_to_int8_for_ort_cpu_data_free(tmp_path):
    """The ort-cpu target on an opset-9, batch-1 graph: ORT's quantizer needs opset 13 for per-channel
    DequantizeLinear and its calibrator feeds the batch as given (both crashed `compress` here)."""
    result = compress(str(light_path("squeezenet")), method="uniform", target="ort-cpu", out_dir=tmp_path / "out")
    emitted = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in emitted.graph.node}
    input_name, x, expected = _reference("squeezenet")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: x})[0]
    assert got.shape == expected.shape
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.05  # int8 activations: close, not exact
    assert result.ratio > 3.5  # int8 weights
