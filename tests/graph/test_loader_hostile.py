"""Hostile files: external data that escapes the model's folder, pickled .npz. One `error:` line each,
no traceback, nothing read from outside the folder and no input byte changed."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from hirelc_onnx.errors import DataError, ModelLoadError
from hirelc_onnx.evaluate.loaders import load_data
from hirelc_onnx.evaluate.runner import get_runner, model_file_size
from hirelc_onnx.graph.loader import check_external_locations, load_model

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N, 1, 8, 8] x) => (float[N, 10] y) {
    flat = Flatten(x)
    h = MatMul(flat, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


def tiny_model() -> onnx.ModelProto:
    """A two-MatMul classifier of digits-shaped input (1x8x8 -> 10), random weights."""
    model = onnx.parser.parse_model(TINY)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "w2"),
    ])
    onnx.checker.check_model(model)
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    """`model` at `path` with every initializer in one external file `location` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def set_location(path: Path, location: str) -> None:
    """Rewrite every external-data location of the model file at `path` (the data file stays where it is)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(model.SerializeToString())


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hirelc_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _hostile(tmp_path: Path, case: str) -> Path:
    """A model in tmp_path/model/ whose external data lives outside that folder, in the way `case` says."""
    model_path = save_external(tiny_model(), tmp_path / "model" / "tiny.onnx")
    secret = tmp_path / "secret.bin"
    (tmp_path / "model" / "weights.bin").rename(secret)
    if case == "dotdot":
        set_location(model_path, "../secret.bin")
    elif case == "deep-dotdot":
        set_location(model_path, "../../x")
    elif case == "absolute":
        set_location(model_path, str(secret))
    elif case == "symlink":
        os.symlink(secret, tmp_path / "model" / "weights.bin")
    return model_path


CASES = ["dotdot", "deep-dotdot", "absolute", "symlink"]


@pytest.mark.parametrize("case", CASES)
def test_loader_refuses_locations_outside_the_folder(tmp_path, case):
    path = _hostile(tmp_path, case)
    with pytest.raises(ModelLoadError, match=r"tensor 'w1' keeps its data at .*outside the model's folder"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path, load_external_data=False)  # refused even when the data is not asked for
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        get_runner(path)  # ONNX Runtime would read the data itself
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        model_file_size(path)


def test_the_check_reads_no_external_data(tmp_path):
    path = _hostile(tmp_path, "dotdot")
    model = onnx.load(str(path), load_external_data=False)
    (tmp_path / "secret.bin").unlink()  # nothing to read: the refusal comes from the location alone
    with pytest.raises(ModelLoadError, match=r"'\.\./secret\.bin'"):
        check_external_locations(model, path)


def test_external_data_inside_the_folder_loads(tmp_path):
    (tmp_path / "m" / "data").mkdir(parents=True)
    path = save_external(tiny_model(), tmp_path / "m" / "tiny.onnx", location="data/weights.bin")
    assert not load_model(path).graph.initializer[0].external_data  # loaded into the proto
    sub = tmp_path / "n"
    sub.mkdir()
    real = save_external(tiny_model(), sub / "tiny.onnx", location="real.bin")
    os.symlink("real.bin", sub / "link.bin")
    set_location(real, "link.bin")
    with pytest.raises(ModelLoadError, match="symbolic link"):  # onnx refuses even a symlink that stays inside
        load_model(real)


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_hostile_external_data_in_one_line(tmp_path, case):
    path = _hostile(tmp_path, case)
    before = _digests(tmp_path)
    for args in (["inspect", path], ["compress", path, "--method", "uniform", "--bits", "4", "--out", tmp_path / "o"]):
        res = _cli(*args)
        assert res.returncode != 0, (args, res.stdout)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert "w1" in lines[0] and "outside the model's folder" in lines[0], lines[0]
        assert "Traceback" not in res.stderr + res.stdout
    assert _digests(tmp_path) == before
    assert not (tmp_path / "o").exists()  # a refused run leaves no output folder behind


def test_cli_compresses_a_clean_external_data_model(tmp_path):
    path = save_external(tiny_model(), tmp_path / "m" / "tiny.onnx")
    res = _cli("compress", path, "--method", "uniform", "--bits", "4", "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "footprints.json", "model.onnx", "report.html",
                                                                   "report.json"]


def test_pickled_npz_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    model = save_external(tiny_model(), tmp_path / "m" / "tiny.onnx")
    before = _digests(tmp_path)
    with pytest.raises(DataError, match="pickled object arrays, which are refused"):
        load_data(str(path))
    res = _cli("compress", model, "--method", "l1-int8", "--data", path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and "pickled object arrays" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert _digests(tmp_path) == before
