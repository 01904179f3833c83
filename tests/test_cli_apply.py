"""`hirelc-onnx apply`: a run's config re-applied to the original model gives the run's model; bad
configs are one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hirelc_onnx.compress import compress


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hirelc_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run(reference_models, tmp_path_factory):
    """A run without fine-tuning (uniform 4-bit, 3/4 of the channels, data-free): deterministic bytes."""
    tmp = tmp_path_factory.mktemp("apply")
    model = tmp / "resnet20.onnx"
    shutil.copy(reference_models("resnet20"), model)
    compress(model, method="uniform", bits=4, keep=0.75, latency_runs=2, out_dir=tmp / "run")
    return model, tmp / "run"


def test_config_json_round_trip_gives_the_runs_bytes(run, tmp_path):
    model, out = run
    res = _cli("apply", model, out / "config.json", "--out", tmp_path / "a", "--data", "digits")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    summary = json.loads((tmp_path / "a" / "apply.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert summary["size"]["weight_bytes"] == report["size"]["weight_bytes"]
    assert summary["accuracy"]["split"] == "test" and summary["accuracy"]["n"] > 0
    assert "true bytes" in res.stdout and "test split" in res.stdout


def test_footprints_point_round_trip(run, tmp_path):
    model, out = run
    fp = json.loads((out / "footprints.json").read_text())
    (tmp_path / "entry.json").write_text(json.dumps(fp["candidates"][0]))
    for source in (out / "footprints.json", tmp_path / "entry.json"):
        dest = tmp_path / source.stem
        res = _cli("apply", model, source, "--out", dest)
        assert res.returncode == 0, res.stderr
        assert (dest / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


@pytest.mark.parametrize("case, expect", [
    ("compressed", "already compressed"),
    ("unknown kernel", "does not fit"),
    ("bad bits", "bits must be one of"),
    ("not json", "not valid JSON"),
    ("candidate", "--candidate 7 is not in"),
])
def test_configs_that_do_not_fit_are_one_line_errors(run, tmp_path, case, expect):
    model, out = run
    config, extra = out / "config.json", []
    if case == "compressed":
        model = out / "model.onnx"
    elif case == "unknown kernel":
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"target": "storage", "kernels": {"/not/a/kernel": {"bits": 4}}}))
    elif case == "bad bits":
        config = tmp_path / "c.json"
        data = json.loads((out / "config.json").read_text())
        next(iter(data["kernels"].values()))["bits"] = 9
        config.write_text(json.dumps(data))
    elif case == "not json":
        config = tmp_path / "c.json"
        config.write_text("{not json")
    else:
        config, extra = out / "footprints.json", ["--candidate", "7"]
    res = _cli("apply", model, config, "--out", tmp_path / "o", *extra)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], res.stderr
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_a_folder_holding_a_run_is_refused_unless_overwrite(run, tmp_path):
    model, out = run
    dest = tmp_path / "again"
    shutil.copytree(out, dest)
    res = _cli("apply", model, dest / "config.json", "--out", dest)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    res = _cli("apply", model, dest / "config.json", "--out", dest, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["apply.json", "config.json", "model.onnx"]  # the run's report went
    assert (dest / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
