"""The Python API: `hirelc_onnx.compress(model, data=...)` with numpy data in every form the docs name,
the one progress callback `progress(phase, done, total)` on real runs, and errors that name
parameters (data=) from Python and flags (--data) from the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import hirelc_onnx
from hirelc_onnx.cli import main
from hirelc_onnx.compress import _load_data
from hirelc_onnx.errors import interface
from hirelc_onnx.evaluate.data import load_digits
from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.search.hirelc import QUICK_SETTINGS


@pytest.fixture(scope="module")
def resnet(reference_models):
    return reference_models("resnet20")


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.x.astype(np.float64), ds.y  # float64 on purpose: the API narrows it, as from a .npz


def _forms(x, y):
    """Every data= form the docs name, each holding the same 1797 labelled samples."""
    batches = [(x[i:i + 500], y[i:i + 500]) for i in range(0, len(x), 500)]
    return {
        "(x, y)": (x, y),
        "dict with y": {"input": x, "y": y},
        "dict with x": {"x": x, "y": y},
        "batches of (x, y)": batches,
        "generator of dicts": ({"input": bx, "y": by} for bx, by in batches),
        "Dataset": hirelc_onnx.Dataset(x, y),
    }


def test_every_data_form_fits_the_graph_inputs(resnet, digits):
    x, y = digits
    bg = build_block_graph(load_model(resnet))
    for name, data in _forms(x, y).items():
        ds = _load_data(data, bg, {})
        assert list(ds.inputs) == ["input"], name  # keyed by the graph's input name
        assert ds.x.dtype == np.float32 and np.allclose(ds.x, x), name
        assert np.array_equal(ds.y, y), name
    unlabelled = _load_data(x, bg, {})
    assert unlabelled.y is None and len(unlabelled) == len(x)


def test_bad_data_is_one_typed_error_naming_the_parameter(resnet, digits):
    x, y = digits
    bg = build_block_graph(load_model(resnet))
    with pytest.raises(hirelc_onnx.DataError, match="^data=: batch 1 lacks labels unlike batch 0"):
        _load_data([(x[:10], y[:10]), x[10:20]], bg, {})
    with pytest.raises(hirelc_onnx.DataError, match="does not fit the model"):
        _load_data(x[:, :, :4], bg, {})
    with pytest.raises(hirelc_onnx.DataError, match="^data= is of type int; expected"):
        _load_data(5, bg, {})
    with pytest.raises(hirelc_onnx.DataError, match="labels"):
        _load_data((x, y[:5]), bg, {})


def test_api_errors_name_parameters_and_the_cli_names_flags(resnet, tmp_path):
    with pytest.raises(hirelc_onnx.InvalidOptionError) as api:  # refused before the model is read
        hirelc_onnx.compress(tmp_path / "never-read.onnx", method="random")
    assert str(api.value).startswith("method='random' needs data= ") and "--" not in str(api.value)
    with pytest.raises(hirelc_onnx.InvalidOptionError, match=r"^resume= needs out_dir= "):
        hirelc_onnx.compress(tmp_path / "never-read.onnx", data="digits", resume=True)
    with pytest.raises(hirelc_onnx.UserError, match=r"^budget must look like"):
        hirelc_onnx.compress(tmp_path / "never-read.onnx", data="digits", budget="six")
    assert issubclass(hirelc_onnx.ConfigError, hirelc_onnx.UserError)
    with interface("cli"):
        with pytest.raises(hirelc_onnx.InvalidOptionError, match=r"^--method random needs --data "):
            hirelc_onnx.compress(tmp_path / "never-read.onnx", method="random")
    res = CliRunner().invoke(main, ["compress", str(tmp_path / "never-read.onnx"), "--method", "random"])
    assert res.exit_code == 2 and res.output.startswith("error: --method random needs --data "), res.output


def _recorder():
    calls: list[tuple] = []

    def progress(phase: str, done: int, total: int) -> None:
        assert isinstance(phase, str) and isinstance(done, int) and isinstance(total, int)
        assert 0 <= done <= total and total >= 1
        calls.append((phase, done, total))

    return calls, progress


@pytest.mark.slow
def test_numpy_data_and_the_progress_callback_on_a_real_hirelc_run(resnet, digits, tmp_path):
    x, y = digits
    calls, progress = _recorder()
    result = hirelc_onnx.compress(resnet, data=(x, y), method="hirelc", budget="6x", evaluations=2,
                                  finetune_epochs=0, settings=QUICK_SETTINGS, latency_runs=2, progress=progress,
                                  out_dir=tmp_path / "out")
    assert result.ratio >= 6.0 and 0.5 < result.test_score <= 1.0
    assert result.report["data"]["inputs"] == {"input": {"shape": [1, 8, 8], "dtype": "float32"}}
    phases = list(dict.fromkeys(c[0] for c in calls))
    assert phases[0] == "loading the model" and phases[-1] == "writing the outputs"
    assert "measuring the emitted model" in phases
    rounds = [c for c in calls if c[0] == "hirelc: real evaluations"]
    assert rounds[0] == ("hirelc: real evaluations", 0, 2) and rounds[-1] == ("hirelc: real evaluations", 2, 2)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["accuracy"]["n"] == result.report["accuracy"]["n"]


def test_the_progress_callback_on_a_real_random_run(resnet, digits):
    x, y = digits
    calls, progress = _recorder()
    batches = ({"input": x[i:i + 600], "y": y[i:i + 600]} for i in range(0, len(x), 600))
    hirelc_onnx.compress(resnet, data=batches, method="random", budget="6x", evaluations=2, finetune_epochs=0,
                         latency_runs=2, progress=progress)
    steps = [c for c in calls if c[0] == "random: real evaluations"]
    assert steps == [("random: real evaluations", 1, 2), ("random: real evaluations", 2, 2)]
    assert calls[0] == ("loading the model", 0, 1)
