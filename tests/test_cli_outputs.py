"""Where `compress` writes: the default folder (printed), --output-model, a folder holding another run
refused unless --overwrite (which clears only that run's files), --out naming a model file, and the
closing list of every file the run left."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from hirelc_onnx.cli import main
from hirelc_onnx.compress import compress
from hirelc_onnx.errors import UserError
from hirelc_onnx.report.outputs import run_files

UNIFORM = ["--method", "uniform", "--bits", "8"]  # data-free: the cheapest run that writes every output


@pytest.fixture()
def resnet(reference_models, tmp_path, monkeypatch):
    """A copy of the ResNet-20 reference, with the current folder a fresh one (where --out defaults)."""
    path = tmp_path / "models" / "resnet20.onnx"
    path.parent.mkdir()
    shutil.copy(reference_models("resnet20"), path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return path


def _compress(*args: str):
    return CliRunner().invoke(main, ["compress", *map(str, args)])


def _files_listed(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return [line.strip() for line in lines[lines.index("files:") + 1:]]


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_default_folder_is_named_after_the_model_and_a_second_run_is_refused(resnet, tmp_path):
    res = _compress(resnet, *UNIFORM)
    assert res.exit_code == 0, res.output
    out = tmp_path / "work" / "resnet20.hirelc"
    assert "output folder: resnet20.hirelc/ (the default; --out chooses)" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "footprints.json", "model.onnx", "report.html", "report.json"]
    assert _files_listed(res.stdout) == [f"resnet20.hirelc/{name}" for name in
                                         ("model.onnx", "config.json", "footprints.json", "report.json", "report.html")]
    assert not (resnet.parent / "resnet20.hirelc").exists()  # here, not beside the model
    before = (out / "model.onnx").read_bytes()
    line = _error_line(_compress(resnet, *UNIFORM, "--bits", "4"))
    assert line.startswith("error: --out resnet20.hirelc holds an earlier run (model.onnx, config.json")
    assert "--overwrite" in line and "--resume" not in line  # no search state there to continue
    assert (out / "model.onnx").read_bytes() == before  # refused before anything was written


def test_overwrite_clears_only_the_earlier_runs_files(resnet, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = ["model.onnx", "report.json", "search_state.json", "search_state.best.r3.onnx",
             "search_state.agents.r4.pt"]
    for name in stale:
        (out / name).write_text("an earlier run")
    (out / "notes.txt").write_text("the user's")
    line = _error_line(_compress(resnet, *UNIFORM, "--out", out))
    assert "--resume to continue it" in line  # search state is there: both ways out are named
    _error_line(_compress(resnet, "--method", "uniform", "--data", tmp_path / "missing.npz", "--out", out,
                          "--overwrite"))
    assert (out / "search_state.json").read_text() == "an earlier run"  # a refused run clears nothing
    res = _compress(resnet, *UNIFORM, "--bits", "4", "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "footprints.json", "model.onnx", "notes.txt", "report.html",
                                                     "report.json"]
    assert (out / "notes.txt").read_text() == "the user's"
    onnx.checker.check_model(onnx.load(out / "model.onnx"))
    assert json.loads((out / "report.json").read_text())["size"]["ratio"] > 6  # 4 bits this time, not the old file


def test_output_model_alone_writes_just_the_model(resnet, tmp_path):
    target = tmp_path / "pipeline" / "small.onnx"
    res = _compress(resnet, *UNIFORM, "--output-model", target)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in target.parent.iterdir()) == ["small.onnx"]  # no temporaries left
    assert not list((tmp_path / "work").iterdir())  # no default folder
    assert _files_listed(res.stdout) == [str(target)]
    onnx.checker.check_model(onnx.load(target))


def test_output_model_beside_the_folder_is_the_same_model(resnet, tmp_path):
    target = tmp_path / "small.onnx"
    target.write_bytes(b"an older model, replaced")
    result = compress(resnet, method="uniform", bits=8, out_dir=tmp_path / "o", output_model=target, latency_runs=2)
    assert target.read_bytes() == (tmp_path / "o" / "model.onnx").read_bytes()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["outputs"]["output_model"] == str(target) == result.report["outputs"]["output_model"]


@pytest.mark.parametrize("args, expect", [
    (["--out", "small.onnx"], "error: --out small.onnx names a model file, but --out is the output folder: "
                              "give --output-model small.onnx"),
    (["--out", "o", "--resume", "--data", "digits"], "error: --resume: o holds no search state"),
    (["--out", "o", "--resume", "--overwrite", "--data", "digits"], "--overwrite clears it: give one of them"),
    (["--output-model", "m.onnx", "--overwrite"], "error: --overwrite replaces an earlier run in an --out folder"),
])
def test_output_refusals_are_one_line_before_any_work(resnet, tmp_path, args, expect):
    line = _error_line(_compress(resnet, *args))
    assert line.startswith(expect) or expect in line, line
    assert not list((tmp_path / "work").iterdir())  # nothing created


def test_output_model_refusals(resnet, tmp_path):
    with pytest.raises(UserError, match="is the input model"):
        compress(resnet, method="uniform", output_model=resnet)
    with pytest.raises(UserError, match="is a folder"):
        compress(resnet, method="uniform", output_model=tmp_path)


def test_run_files_are_ours_only(tmp_path):
    for name in ("model.onnx", "model.onnx.data", "report.html", "search_state.json", "search_state.best.r2.onnx",
                 "other.onnx", "report.json.bak", ".hirelc.lock"):
        (tmp_path / name).write_text("")
    assert [p.name for p in run_files(tmp_path)] == ["model.onnx", "model.onnx.data", "report.html",
                                                    "search_state.json", "search_state.best.r2.onnx"]
    assert run_files(tmp_path / "missing") == []


def test_latency_runs_zero_skips_the_latency_rows_and_says_so(resnet, tmp_path):
    out = tmp_path / "o"
    res = _compress(resnet, *UNIFORM, "--out", out, "--latency-runs", "0")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["latency"] == {} and report["per_node"]["skipped"]
    assert report["latency_note"] == "Latency was not measured (skipped by --latency-runs 0)."
    assert "latency: not measured (skipped by --latency-runs 0)" in res.stdout
    assert "not measured: skipped by --latency-runs 0" in (out / "report.html").read_text()
    assert "latency batch" not in res.stdout
    timed = compress(resnet, method="uniform", bits=8, latency_runs=2)  # the default path still times both batches
    assert set(timed.report["latency"]) == {"batch1", "batch32"} and timed.report["per_node"]["rows"]
    assert "--latency-runs" in _error_line(_compress(resnet, *UNIFORM, "--latency-runs", "-1"))
    with pytest.raises(UserError, match="latency_runs= must be an integer >= 0"):
        compress(resnet, method="uniform", bits=8, latency_runs=-1)
