"""Per compressed kernel, the op ORT ran: checked against ORT's own profile, read here independently."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from hirelc_onnx.apply import apply_config
from hirelc_onnx.cli import main
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph import build_block_graph
from hirelc_onnx.evaluate.per_node import compressed_kernels, per_node_rows


@pytest.fixture(scope="module")
def resnet(reference_models):
    model = onnx.load(str(reference_models("resnet20")))
    bg = build_block_graph(model)
    x = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
    return bg, {bg.model.graph.input[0].name: x}


def _emit(bg, feed, target, **fields):
    config = CompressionConfig.uniform(bg.kernels, target=target, **fields)
    return apply_config(bg, config, calib_batches=[feed])


def _independent_profile(model: onnx.ModelProto, feed, folder: Path) -> dict[str, set[str]]:
    """node name -> op names, from a profiled session this test builds itself. Its file goes to the test's
    own `folder`: ORT names it by the millisecond in the working directory, where two xdist workers made
    one name and one deleted the file the other was about to read (and a failed test left it in the repo)."""
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    ops: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ops.setdefault(e["name"][: -len("_kernel_time")], set()).add(e["args"]["op_name"])
    return ops


@pytest.mark.parametrize("target, bits, ran", [("ort-cpu", 8, {"QLinearConv", "QGemm"}), ("storage", 4, {"Conv", "Gemm"})])
def test_rows_name_the_kernel_the_profile_shows(resnet, target, bits, ran, tmp_path):
    bg, feed = resnet
    model = _emit(bg, feed, target, bits=bits)
    rows = per_node_rows(model, feed, reference=bg.model, runs=3)
    assert [r.kernel for r in rows] == [n.name for n in compressed_kernels(model)]
    assert len(rows) == len(bg.kernels)
    profile = _independent_profile(model, feed, tmp_path)
    for r in rows:
        assert r.executed in ran, r
        assert r.ort_nodes and r.executed in profile[r.ort_nodes[0]], (r, profile.get(r.ort_nodes[0]))
        assert r.ms is not None and r.ms > 0 and r.fp32_ms is not None and r.fp32_ms > 0
        assert r.snr_db is not None and 0 < r.snr_db < 200


def test_identical_weights_give_a_huge_snr_and_pruned_kernels_say_so(resnet):
    bg, feed = resnet
    eight = _emit(bg, feed, "storage", bits=8)
    rows = {r.kernel: r for r in per_node_rows(eight, feed, reference=eight, runs=2)}
    assert all(r.snr_db > 250 for r in rows.values())  # no noise: ORT's formula floors it at machine epsilon
    pruned = _emit(bg, feed, "storage", bits=8, keep_ratio=0.5)
    notes = [r.note for r in per_node_rows(pruned, feed, reference=bg.model, runs=2) if r.snr_db is None]
    assert notes and all("pruned" in n for n in notes)


def _dq_conv_model() -> onnx.ModelProto:
    """One Conv whose weight is DequantizeLinear(int8): ORT keeps such DQ nodes for QDQ fusion."""
    rng = np.random.default_rng(1)
    w = rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.float32(0.01), "w_s"),
             numpy_helper.from_array(np.int8(0), "w_z")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_unfolded_weight_decode_is_named_and_timed(tmp_path):
    model = _dq_conv_model()
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    (row,) = per_node_rows(model, feed, runs=2)
    assert row.executed == "DequantizeLinear + Conv"
    profile = _independent_profile(model, feed, tmp_path)
    assert {"DequantizeLinear"} == profile[row.ort_nodes[1]] and "Conv" in profile[row.ort_nodes[0]]


def test_cli_per_node(resnet, tmp_path, reference_models):
    bg, feed = resnet
    path = tmp_path / "m.onnx"
    onnx.save(_emit(bg, feed, "ort-cpu", bits=8), str(path))
    fp32 = str(reference_models("resnet20"))
    res = CliRunner().invoke(main, ["benchmark", str(path), "--against", fp32, "--per-node", "--runs", "2",
                                    "--no-memory", "--json", "--data", "digits"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["per_node"]
    assert len(rows) == len(bg.kernels) and {r["executed"] for r in rows} <= {"QLinearConv", "QGemm"}
    assert all(r["snr_db"] > 5 for r in rows)  # real digits, not noise, so the calibrated int8 model is close
    plain = CliRunner().invoke(main, ["benchmark", fp32, "--per-node", "--runs", "2", "--no-memory"])
    assert plain.exit_code == 0 and "no compressed kernel" in plain.output


def test_compress_report_has_the_per_node_section(reference_models, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", str(reference_models("resnet20")), "--method", "uniform", "--bits", "8",
                                    "--target", "ort-cpu", "--data", "digits", "--finetune-epochs", "0",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    per_node = report["per_node"]
    assert per_node["input"] == "calibration rows"
    # int8 kernels, but for those the ort-cpu speed check keeps fp32 (ORT runs them slower in int8)
    speed = report.get("ort_cpu_speed") or {}
    kept = set(speed.get("kept_fp32", {})) | {f["kernel"] for f in speed.get("whole_model_fallbacks", [])}
    assert len(per_node["rows"]) > 10
    for r in per_node["rows"]:
        assert r["executed"] in {"QLinearConv", "QGemm"} or r["executed"].startswith(("Conv", "Gemm")) \
            and r["kernel"] in kept, (r, kept)
    assert "What ONNX Runtime ran" in (out / "report.html").read_text()
