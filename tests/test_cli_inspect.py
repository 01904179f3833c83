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


# --- a compressed model: what the file stores, needs, and which runtimes load it ---------------

def _compressed(reference_models, tmp_path, name, config_of):
    """resnet20 rewritten (no fine-tuning) under the config `config_of(kernel names)` builds; with its cost."""
    from hirelc_onnx.apply import apply_config
    from hirelc_onnx.graph import import_model, model_cost

    bg = import_model(reference_models("resnet20"))
    config = config_of(list(bg.kernels)).validate(bg.kernels)
    path = tmp_path / f"{name}.onnx"
    onnx.save(apply_config(bg, config), path)
    return path, config, model_cost(bg, config)


def test_inspect_compressed_gives_true_bytes_encodings_needs_and_runtimes(reference_models, tmp_path):
    from hirelc_onnx.config import CompressionConfig, KernelConfig
    from passes.storage import initializer_nbytes

    def mixed(names):  # every container the storage target writes: fp32, 2-bit packed, int4, int8, pruned
        choice = [KernelConfig(bits=2), KernelConfig(bits=4, granularity="per-group"), KernelConfig(bits=32),
                  KernelConfig(bits=8, qtype="asymmetric", keep_ratio=0.5), KernelConfig(bits=3, granularity="log2")]
        return CompressionConfig({n: choice[i % len(choice)] for i, n in enumerate(names)})

    for name, config_of in (("u4", lambda names: CompressionConfig.uniform(names, bits=4)), ("mixed", mixed)):
        path, config, cost = _compressed(reference_models, tmp_path, name, config_of)
        res = _cli("inspect", path, "--json", "--no-groups", *(["--no-runtimes"] if name == "mixed" else []))
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        written = onnx.load(str(path))
        assert info["totals"]["weight_bytes"] == initializer_nbytes(written)  # true bytes, not the fp32 1.09 MB
        assert info["totals"]["decoded_weight_bytes"] > 3 * info["totals"]["weight_bytes"]
        for k in info["kernels"]:
            kc = config.get(k["name"])
            st = k["stored"]
            assert k["bytes"] == cost.kernels[k["name"]].weight_bytes, k  # the cost model's exact bytes, per kernel
            if kc.bits == 32:
                assert st["encoding"] == "fp32" and st["bits"] == 32
            elif kc.granularity == "log2":
                assert st["granularity"] == "log2" and "codebook" in st["encoding"]
            else:
                assert st["bits"] <= kc.bits and st["packed"] == ("packed" in st["encoding"])
                assert st["granularity"].startswith(kc.granularity)
                assert st["encoding"] == {2: "2-bit packed in uint8", 4: "int4", 8: "uint8"}[kc.bits] or kc.bits == 2
        assert info["file"]["opset"] >= 21 and "INT4" in info["file"]["element_types"]
        assert any("INT4" in need for need in info["file"]["needs"])
        if name == "u4":
            ort_entry = next(r for r in info["runtimes"] if r["runtime"] == "onnxruntime")
            assert ort_entry["loads"] is True
        else:
            assert "runtimes" not in info
    text = _cli("inspect", path, "--no-groups", "--no-runtimes")
    assert text.returncode == 0 and "of weights as stored" in text.stdout and "needs: opset 21" in text.stdout
    assert "2-bit packed" in text.stdout and "runtime:" not in text.stdout


def test_inspect_says_which_runtime_refuses_int2(tmp_path):
    w = helper.make_tensor("w_q", onnx.TensorProto.INT2, [4, 4], [1, -1, 0, 1] * 4)
    s = numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "s")
    nodes = [helper.make_node("Cast", ["w_q"], ["wc"], to=onnx.TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["wc", "s"], ["w"], name="scale"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w, s])
    path = tmp_path / "int2.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)]), path)
    res = _cli("inspect", path, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kernels"][0]["stored"]["encoding"] == "int2" and info["kernels"][0]["bytes"] == 4 + 16
    assert "INT2 tensors: opset >= 25" in info["file"]["needs"]
    ov = next(r for r in info["runtimes"] if r["runtime"] == "openvino")
    assert ov["loads"] is False if ov["version"] else ov["expected"] is False
