"""`--split-fractions`: how much of --data goes to calibration, fine-tuning, validation and test."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from hirelc_onnx.compress import compress
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import check_fractions, load_digits, split_counts, split_dataset
from hirelc_onnx.evaluate.metrics import top1_accuracy
from hirelc_onnx.evaluate.runner import predict

WIDE_VAL = (0.05, 0.25, 0.5, 0.2)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hirelc_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_fractions_parse_and_refuse():
    assert check_fractions("0.1,0.5,0.15,0.25") == (0.1, 0.5, 0.15, 0.25)
    for bad, says in [("0.5,0.5", "four"), ("0.1,0.5,0.4,0", "> 0"), ("0.1,0.5,0.2,0.3", "add up to 1"),
                      ("a,b,c,d", "four numbers"), ((0.2, 0.2, 0.2, float("nan")), "> 0")]:
        with pytest.raises(ValueError, match=says):
            check_fractions(bad)


def test_split_follows_the_fractions():
    ds = load_digits()
    splits = split_dataset(ds, 3, WIDE_VAL)
    parts = (splits.calib, splits.finetune, splits.val, splits.test)
    assert tuple(len(p) for p in parts) == split_counts(len(ds), WIDE_VAL)
    assert len(splits.val) == round(0.5 * len(ds))
    # every sample in exactly one part: the parts' images, stacked, are the dataset's, reordered
    stacked = np.concatenate([p.x.reshape(len(p), -1) for p in parts])
    assert sorted(map(bytes, stacked)) == sorted(map(bytes, ds.x.reshape(len(ds), -1)))


def test_compress_scores_and_records_the_split_evaluate_reuses(reference_models, tmp_path):
    """Two ways: the report's test figure is the emitted model's on the split the fractions make, and
    `evaluate` on the run folder (which reads the recorded fractions) gives the same figure."""
    path = tmp_path / "resnet20.onnx"
    shutil.copy(reference_models("resnet20"), path)
    result = compress(path, data="digits", method="uniform", bits=8, finetune_epochs=0, latency_runs=1,
                      out_dir=tmp_path / "o", split_fractions=WIDE_VAL)
    split = result.report["data"]["split"]
    assert split["fractions"] == list(WIDE_VAL)
    test = split_dataset(load_digits(), 0, WIDE_VAL).test
    assert split["samples"]["test"] == len(test) == result.report["accuracy"]["n"]
    assert split["samples"]["val"] == round(0.5 * 1797)
    emitted = onnx.load(tmp_path / "o" / "model.onnx")
    assert result.report["accuracy"]["compressed"] == top1_accuracy(predict(emitted, test.x), test.y)
    res = _cli("evaluate", tmp_path / "o", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"] == result.report["accuracy"]["compressed"]


def test_bad_fractions_are_one_line_before_any_work(reference_models, tmp_path):
    res = _cli("compress", reference_models("resnet20"), "--data", "digits", "--method", "uniform",
               "--split-fractions", "0.1,0.5,0.5,0.1", "--out", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: --split-fractions")
    assert not (tmp_path / "o").exists()


def test_a_split_that_leaves_a_part_empty_is_refused(reference_models, tmp_path):
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    with pytest.raises(UserError, match="leave a part empty"):
        compress(reference_models("resnet20"), data=x, method="uniform", bits=8, finetune_epochs=0,
                 split_fractions=(0.01, 0.49, 0.3, 0.2))
