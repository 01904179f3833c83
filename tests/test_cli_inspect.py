"""`hirelc-onnx inspect`: tables and JSON on real models, one-line errors on bad files."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.light import light_path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hirelc_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_inspect_json_on_squeezenet():
    res = _cli("inspect", light_path("squeezenet"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["totals"]["kernels"] == 26
    assert info["totals"]["kernel_params"] == sum(k["params"] for k in info["kernels"])
    refused = [g for g in info["groups"] if not g["prunable"]]
    assert refused and all(g["refusal"] for g in refused)


def test_inspect_table_names_groups(tmp_path):
    res = _cli("inspect", light_path("inception_v1"))
    assert res.returncode == 0, res.stderr
    assert "Channel groups" in res.stdout and "LRN" in res.stdout


def _no_kernel_model(path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g), path)


def _truncated(path):
    src = light_path("squeezenet").read_bytes()
    path.write_bytes(src[: len(src) // 3])


@pytest.mark.parametrize("case, expect", [
    ("missing", "not found"),
    ("text", "not an ONNX model"),
    ("truncated", "not"),
    ("nokernel", "no compressible kernel"),
    ("directory", "directory"),
])
def test_bad_files_give_one_line_errors(tmp_path, case, expect):
    path = tmp_path / "model.onnx"
    if case == "text":
        path.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        _truncated(path)
    elif case == "nokernel":
        _no_kernel_model(path)
    elif case == "directory":
        path.mkdir()
    before = path.read_bytes() if path.is_file() else None
    res = _cli("inspect", path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    if before is not None:
        assert path.read_bytes() == before  # the user's file is untouched


def test_external_data_is_loaded(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    res = _cli("inspect", path, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["totals"]["kernel_params"] == 64 * 64
    (tmp_path / "m.data").unlink()
    res = _cli("inspect", path)
    assert res.returncode == 2 and "external" in res.stderr


def test_inspect_sensitivity_on_resnet20(reference_models):
    res = _cli("inspect", reference_models("resnet20"), "--sensitivity", "--data", "digits", "--samples", "64", "--json")
    assert res.returncode == 0, res.stderr
    sens = json.loads(res.stdout)["sensitivity"]
    assert sens["n_samples"] == 64 and sens["loss"] == "labels"
    assert abs(sum(sens["per_kernel"].values()) - 1.0) < 1e-6
    assert all(np.isfinite(v) and v >= 0 for v in sens["per_kernel"].values())
    res = _cli("inspect", reference_models("resnet20"), "--sensitivity")
    assert res.returncode == 2 and "needs --data" in res.stderr
