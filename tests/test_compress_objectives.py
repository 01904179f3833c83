"""compress scores what the outputs hold: per-position scores, several outputs, and a task metric plugin."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import tests.metric_plugins as plugins
from hirelc_onnx.cli import main
from hirelc_onnx.compress import compress
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.evaluate.metrics import cosine_similarity, per_position_agreement, top1_accuracy
from hirelc_onnx.evaluate.runner import predict_outputs
from hirelc_onnx.search import hirelc
from tests.bridge import tiny_cnn
from tests.kind_models import sequence_model, two_output_model
from tests.quick_cli import with_quick_settings


@pytest.fixture()
def saved(tmp_path):
    def save(model: onnx.ModelProto, name: str):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        return path
    return save


def test_sequence_outputs_are_scored_per_position(saved):
    """(N, T, C) scores: the report's score is per-position agreement, which the old flattened
    (N, T*C) arg-max misjudges; the digit labels are not per-position, so they are not used."""
    path = saved(sequence_model(), "seq")
    result = compress(path, data="digits", method="uniform", bits=2, finetune_epochs=0, latency_runs=2)
    acc = result.report["accuracy"]
    assert acc["metric"] == "per-position top-1 agreement with fp32"
    assert [o["kind"] for o in acc["outputs"]] == ["sequence-scores"]
    test = split_dataset(load_digits(), 0).test
    ours, ref = predict_outputs(result.model, test.x)[0], predict_outputs(path, test.x)[0]
    right = per_position_agreement(ours, ref)
    flattened = np.mean(ours.reshape(len(ours), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1))
    assert acc["compressed"] == pytest.approx(right) and acc["fp32"] == 1.0
    assert abs(flattened - right) > 0.05  # the old metric gave another answer on this very model
    assert acc["outputs"][0]["per_position_agreement"] == pytest.approx(right)


def test_two_outputs_score_the_worst_relative_to_fp32(saved):
    path = saved(two_output_model(), "two")
    result = compress(path, data="digits", method="uniform", bits=2, finetune_epochs=1, latency_runs=2)
    acc = result.report["accuracy"]
    assert [(o["name"], o["kind"]) for o in acc["outputs"]] == [("logits", "class-scores"), ("embedding", "embedding")]
    test = split_dataset(load_digits(), 0).test
    ours, ref = predict_outputs(result.model, test.x), predict_outputs(path, test.x)
    relative_accuracy = top1_accuracy(ours[0], test.y) / top1_accuracy(ref[0], test.y)
    expected = min(relative_accuracy, cosine_similarity(ours[1], ref[1]))
    assert acc["compressed"] == pytest.approx(expected) and acc["metric"].startswith("worst of 2 outputs")
    assert acc["outputs"][1]["snr_db"] > 0
    assert acc["outputs"][0]["accuracy"] == pytest.approx(top1_accuracy(ours[0], test.y))
    assert acc["outputs"][0]["fp32_accuracy"] == pytest.approx(top1_accuracy(ref[0], test.y))


@pytest.mark.parametrize("method, options", [("uniform", ["--bits", "3"]),
                                             ("hirelc", ["--budget", "4x", "--evaluations", "2"])])
def test_a_metric_plugin_drives_the_search_and_the_report(saved, tmp_path, monkeypatch, method, options):
    monkeypatch.setattr(hirelc, "run_hirelc", with_quick_settings(hirelc.run_hirelc))  # the plugin's path, small agents
    path = saved(tiny_cnn(), "tiny")
    plugins.CALLS.clear()
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", str(path), "--data", "digits", "--method", method, *options,
                                    "--finetune-epochs", "1", "--metric", "tests.metric_plugins:error_rate",
                                    "--metric-mode", "min", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    test = split_dataset(load_digits(), 0).test
    emitted = onnx.load(out / "model.onnx")
    error = float(np.mean(predict_outputs(emitted, test.x)[0].argmax(1) != test.y))
    assert acc["metric"] == "tests.metric_plugins:error_rate (lower is better)"
    assert acc["compressed"] == pytest.approx(error)  # the loss itself, not its negative
    assert acc["drop_points"] == pytest.approx(100 * (error - acc["fp32"]))  # positive when it got worse
    split = split_dataset(load_digits(), 0)
    assert len(split.val) in plugins.CALLS and len(test) in plugins.CALLS  # the search and the report used it
    real = [h for h in report["history"] if h.get("kind", "real") == "real" and "score" in h]
    assert real and all(0.0 <= h["score"] <= 1.0 for h in real)  # shown as error rates
    assert "<td>class-scores</td>" in (out / "report.html").read_text()  # the report says what each output held


@pytest.mark.parametrize("args, expect", [
    (["--data", "digits", "--metric-mode", "min"], "--metric-mode only matters with --metric"),
    (["--data", "digits", "--output-kind", "boxes"], "unknown output kind 'boxes'"),
    (["--data", "digits", "--output-kind", "probs=embedding"], "does not have; its outputs: logits"),
    (["--metric", "tests.metric_plugins:error_rate"], "--metric only matters with --data"),
    (["--data", "digits", "--metric", "tests.metric_plugins:nope"], "has no attribute 'nope'"),
])
def test_scoring_options_are_checked_in_one_line(saved, args, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out (tiny.hirelc/) is made here, not in a folder another worker shares
    path = saved(tiny_cnn(), "tiny")
    res = CliRunner().invoke(main, ["compress", str(path), "--method", "uniform", *args])
    assert res.exit_code != 0 and expect in res.output, res.output
    assert "Traceback" not in res.output


def test_string_labels_reach_only_the_metric(saved):
    """Labels that are strings (what the fp32 model reads at each position) go to the metric; fine-tuning
    distils from fp32. By construction the metric equals per-position agreement with fp32."""
    from hirelc_onnx.evaluate.data import Dataset

    model = sequence_model()
    path = saved(model, "seq")
    digits = load_digits()
    texts = np.array(["".join(map(str, row)) for row in predict_outputs(model, digits.x)[0].argmax(-1)])
    data = Dataset(digits.x, texts, "read digits")
    result = compress(path, data=data, method="uniform", bits=2, finetune_epochs=1, latency_runs=2,
                      metric="tests.metric_plugins:positions_read")
    acc = result.report["accuracy"]
    test = split_dataset(data, 0).test
    ours, ref = predict_outputs(result.model, test.x)[0], predict_outputs(path, test.x)[0]
    assert acc["fp32"] == 1.0 and acc["compressed"] == pytest.approx(per_position_agreement(ours, ref))
    assert acc["task_accuracy_measured"] and acc["finetune_warning"] is None
