"""`hirelc-onnx compress` end to end: outputs, report truthfulness, and refusals before long work."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from hirelc_onnx.cli import main
from hirelc_onnx.compress import compress
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import split_dataset, load_digits
from hirelc_onnx.evaluate.metrics import top1_accuracy
from hirelc_onnx.evaluate.runner import predict


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hirelc_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def resnet_copy(reference_models, tmp_path):
    path = tmp_path / "resnet20.onnx"
    shutil.copy(reference_models("resnet20"), path)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_uniform_cli_writes_outputs_true_to_the_file(resnet_copy, tmp_path):
    before = _digest(resnet_copy)
    out = tmp_path / "out"
    res = _cli("compress", resnet_copy, "--method", "uniform", "--bits", "4", "--keep", "0.5", "--target", "storage",
               "--out", out)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    model = onnx.load(out / "model.onnx")
    assert report["size"]["file_bytes"] == (out / "model.onnx").stat().st_size
    assert report["size"]["weight_bytes"] == sum(len(t.raw_data) for t in model.graph.initializer)
    assert report["size"]["weight_bytes"] == report["size"]["predicted_weight_bytes"]
    assert report["size"]["ratio"] > 20
    assert _digest(resnet_copy) == before  # the input is never modified
    assert "<img" in (out / "report.html").read_text()


def test_measured_accuracy_is_the_emitted_models(resnet_copy, tmp_path):
    result = compress(resnet_copy, data="digits", method="l1-int8", target="ort-cpu", finetune_seconds=0,
                      out_dir=tmp_path / "o", latency_runs=3, keep=0.75)
    test = split_dataset(load_digits(), 0).test
    emitted = onnx.load(tmp_path / "o" / "model.onnx")
    assert result.report["accuracy"]["compressed"] == top1_accuracy(predict(emitted, test.x), test.y)
    assert result.report["accuracy"]["n"] == len(test)


def test_fixed_epoch_finetuning_is_repeatable_and_reported(resnet_copy, tmp_path):
    """--finetune-epochs replaces the clock: two runs emit the same weights and the report says so."""
    runs = [compress(resnet_copy, data="digits", method="uniform", target="storage", bits=4, keep=0.75,
                     finetune_epochs=2, out_dir=tmp_path / name, latency_runs=2) for name in ("a", "b")]
    a, b = (onnx.load(tmp_path / name / "model.onnx") for name in ("a", "b"))
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]
    assert runs[0].report["accuracy"]["compressed"] == runs[1].report["accuracy"]["compressed"]
    assert runs[0].report["accuracy"]["finetune_budget"] == {"epochs": 2}
    untuned = compress(resnet_copy, data="digits", method="uniform", target="storage", bits=4, keep=0.75,
                       finetune_epochs=0, latency_runs=2)
    assert untuned.report["accuracy"]["compressed"] != runs[0].report["accuracy"]["compressed"]


@pytest.mark.parametrize("args, expect", [
    (["--budget", "200x", "--data", "digits", "--method", "random"], "unreachable"),
    (["--budget", "lots", "--data", "digits"], "budget must look like"),
    (["--method", "random", "--budget", "6x"], "needs --data"),
    (["--data", "/no/such/data.npz", "--method", "random"], "not found"),
    (["--data", "digits", "--finetune-epochs", "-1"], "finetune-epochs"),
    (["--data", "digits", "--resume"], "--resume: resnet20.hirelc holds no search state"),  # the default --out
    (["--method", "uniform", "--finetune-seconds", "5"], "--finetune-seconds only matters with --data"),
])
def test_refusals_are_one_line_and_fast(resnet_copy, args, expect):
    res = _cli("compress", resnet_copy, *args, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_data_that_does_not_fit_is_refused(resnet_copy, tmp_path):
    npz = tmp_path / "bad.npz"
    np.savez(npz, x=np.zeros((20, 3, 32, 32), np.float32), y=np.zeros(20, np.int64))
    res = _cli("compress", resnet_copy, "--data", npz, "--method", "random", timeout=120)
    assert res.returncode == 2 and "shape" in res.stderr and "Traceback" not in res.stderr


def test_out_folder_never_overwrites_the_input(resnet_copy):
    model = resnet_copy.with_name("model.onnx")
    resnet_copy.rename(model)
    before = _digest(model)
    res = _cli("compress", model, "--method", "uniform", "--out", model.parent)
    assert res.returncode == 2 and "overwrite the input" in res.stderr
    assert _digest(model) == before


# an option each method would ignore: (CLI arguments, the same as a compress() keyword)
INAPPLICABLE = {
    "hirelc": (["--bits", "4"], {"bits": 4}),
    "graph-rl": (["--max-drop", "1"], {"max_drop": 1.0}),
    "two-stage": (["--finetune-seconds", "5"], {"finetune_seconds": 5.0}),
    "uniform": (["--budget", "6x"], {"budget": "6x"}),
    "uniform-l1": (["--time-limit", "60"], {"time_limit": 60.0}),
    "l1-int8": (["--evaluations", "4"], {"evaluations": 4}),
    "ort-int8": (["--keep", "0.5"], {"keep": 0.5}),
    "random": (["--resume"], {"resume": True}),
}


def _one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["compress", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("method", list(INAPPLICABLE))
def test_an_option_the_method_ignores_is_refused_before_any_work(method, tmp_path):
    """The model path does not exist: the refusal comes before the model is read."""
    args, keywords = INAPPLICABLE[method]
    missing = tmp_path / "never-read.onnx"
    line = _one_error_line([str(missing), "--method", method, "--data", "digits", "--out", str(tmp_path / "o"), *args])
    assert line.startswith(f"error: --method {method} does not take {args[0]} (it takes")
    keyword = next(iter(keywords))  # from Python the message names parameters, never flags
    with pytest.raises(UserError, match=f"^method='{method}' does not take {keyword}= "):
        compress(missing, method=method, data="digits", **keywords)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", list(INAPPLICABLE))
def test_an_unknown_option_is_refused(method, tmp_path):
    missing = tmp_path / "never-read.onnx"
    line = _one_error_line([str(missing), "--method", method, "--bitz", "4"])
    assert "No such option" in line and "--bitz" in line
    with pytest.raises(UserError, match="^unknown option 'bitz'"):
        compress(missing, method=method, data="digits", bitz=4)
