"""`hirelc-onnx evaluate` and `benchmark` through the real CLI: numbers match the API, errors are one line."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from hirelc_onnx.cli import main
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.evaluate.runner import evaluate
from tests.evaluate.test_runner import digits, gemm_classifier, lr_weights, model_path, perturbed_path  # noqa: F401  (fixtures)


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "250"})  # rich tables unwrapped


def _one_line_error(result, *match: str) -> None:
    """Exit code 2, exactly one line on stderr naming the problem, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output + result.stderr
    for m in match:
        assert m in lines[0], lines[0]


@pytest.fixture()
def digits_npz(tmp_path, digits):
    path = tmp_path / "digits.npz"
    np.savez(path, x=digits.x, y=digits.y)
    return path


def test_evaluate_json_matches_api(model_path, digits_npz, digits):
    res = _run("evaluate", model_path, "--data", digits_npz, "--json", "--batch-size", 128)
    assert res.exit_code == 0, res.output + res.stderr
    out = json.loads(res.stdout)
    assert out["n"] == 1797
    assert out["accuracy"] == evaluate(model_path, digits)["accuracy"]
    assert out["file_size_bytes"] == model_path.stat().st_size


def test_evaluate_split_and_table(model_path):
    res = _run("evaluate", model_path, "--data", "digits", "--split", "test", "--seed", 4, "--json")
    test = split_dataset(load_digits(), 4).test
    assert json.loads(res.stdout)["n"] == len(test)
    assert json.loads(res.stdout)["accuracy"] == evaluate(model_path, test)["accuracy"]
    table = _run("evaluate", model_path, "--data", "digits")
    assert table.exit_code == 0
    assert "top-1 accuracy" in table.stdout and "1797" in table.stdout and "file size" in table.stdout


def test_evaluate_fidelity_on_unlabelled_data(tmp_path, model_path, perturbed_path, digits):
    np.savez(tmp_path / "u.npz", x=digits.x[:300])
    same = json.loads(_run("evaluate", model_path, "--data", tmp_path / "u.npz", "--reference", model_path, "--json").stdout)
    assert same["top1_agreement"] == 1.0 and same["cosine_similarity"] == pytest.approx(1.0)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-9) and "accuracy" not in same
    worse = json.loads(_run("evaluate", perturbed_path, "--data", tmp_path / "u.npz", "--reference", model_path, "--json").stdout)
    assert worse["top1_agreement"] < 1.0 and worse["kl_divergence"] > 0.01
    _one_line_error(_run("evaluate", model_path, "--data", tmp_path / "u.npz"), "no labels", "--reference")


def test_evaluate_image_folder(tmp_path, model_path):
    for cls, value in (("0", 0), ("1", 255)):
        for i in range(2):
            (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("L", (16, 16), value).save(tmp_path / "imgs" / cls / f"{i}.png")
    res = _run("evaluate", model_path, "--data", tmp_path / "imgs", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["n"] == 4


def _bad_data(tmp_path, kind: str) -> tuple[str, tuple[str, ...]]:
    """A data spec of one broken kind, and what its error must say."""
    if kind == "missing":
        return str(tmp_path / "nope.npz"), ("data not found", "nope.npz")
    if kind == "no_x":
        np.savez(tmp_path / "b.npz", inputs=np.zeros((2, 1, 8, 8), np.float32))
        return str(tmp_path / "b.npz"), ("no array 'x'", "inputs")
    if kind == "shape":
        np.savez(tmp_path / "b.npz", x=np.zeros((2, 64), np.float32), y=np.zeros(2))
        return str(tmp_path / "b.npz"), ("expected input shape (N, 1, 8, 8)", "got (N, 64)")
    if kind == "dtype":
        np.savez(tmp_path / "b.npz", x=np.array([["a"] * 8] * 2))
        return str(tmp_path / "b.npz"), ("must be numeric",)
    if kind == "labels":
        np.savez(tmp_path / "b.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.array([3, 10]))
        return str(tmp_path / "b.npz"), ("labels in [3, 10]", "10 outputs")
    if kind == "empty_folder":
        (tmp_path / "e").mkdir()
        return str(tmp_path / "e"), ("no images in",)
    if kind == "bad_image":
        (tmp_path / "i" / "c").mkdir(parents=True)
        (tmp_path / "i" / "c" / "bad.png").write_bytes(b"nope")
        return str(tmp_path / "i"), ("cannot read image", "bad.png")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "no_x", "shape", "dtype", "labels", "empty_folder", "bad_image"])
def test_evaluate_bad_data_is_one_line(tmp_path, model_path, kind):
    spec, match = _bad_data(tmp_path, kind)
    _one_line_error(_run("evaluate", model_path, "--data", spec), *match)


@pytest.mark.parametrize("command", ["evaluate", "benchmark"])
def test_bad_model_is_one_line(tmp_path, command, model_path):
    extra = ["--data", "digits"] if command == "evaluate" else []
    _one_line_error(_run(command, tmp_path / "missing.onnx", *extra), "model file not found")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage\xff" * 10)
    _one_line_error(_run(command, tmp_path / "junk.onnx", *extra), "junk.onnx")
    data = model_path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    _one_line_error(_run(command, tmp_path / "cut.onnx", *extra), "cut.onnx")


def test_benchmark_side_by_side_json(model_path, tmp_path, lr_weights):
    big = tmp_path / "big.onnx"
    w, b = lr_weights
    onnx.save(gemm_classifier(np.tile(w, (1, 8)), np.tile(b, 8)), big)  # 8x the weights
    res = _run(
        "benchmark", model_path, "--against", big, "--batch-sizes", "1,4", "--runs", 3, "--warmup", 1, "--no-memory", "--json"
    )
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["batch_size"] for r in out["model"]["results"]] == [1, 4]
    assert all(r["runs"] >= 3 and r["median_ms"] > 0 for e in ("model", "against") for r in out[e]["results"])
    assert out["size_ratio"] == pytest.approx(big.stat().st_size / model_path.stat().st_size)
    assert out["size_ratio"] > 4
    a = out["against"]["results"][1]
    # the model's speed against --against: the reciprocal of the timer's per-round figures for --against
    assert out["speedup"]["4"] == pytest.approx(1 / a["speedup"])
    q1, q3 = out["speedup_iqr"]["4"]
    assert q1 == pytest.approx(1 / a["speedup_iqr"][1]) and q1 <= out["speedup"]["4"] <= q3


def test_benchmark_table_with_memory(model_path):
    res = _run("benchmark", model_path, "--runs", 2, "--warmup", 0)
    assert res.exit_code == 0, res.stderr
    for col in ("median ms", "p90 ms", "items/s", "peak memory", f"model: {model_path}, 2,"):
        assert col in res.stdout
    assert " KiB" in res.stdout or " MiB" in res.stdout  # the memory figure, in the one unit style


def test_benchmark_bad_options(model_path):
    _one_line_error(_run("benchmark", model_path, "--batch-sizes", "1,x"), "--batch-sizes")
    _one_line_error(_run("benchmark", model_path, "--input-shape", "y=1x1x8x8", "--no-memory"), "no input(s) y")
