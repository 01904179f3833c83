"""`hirelc-onnx evaluate` on the ResNet-20 reference equals a plain ORT loop, fp32 and int8."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.graph import build_block_graph, load_model
from passes.quantize_activations import quantize_activations


def _plain_accuracy(path, x, y) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # ORT's default: all optimisations
    correct = 0
    for i in range(0, len(x), 32):
        correct += int((sess.run(None, {"input": x[i:i + 32]})[0].argmax(1) == y[i:i + 32]).sum())
    return correct / len(x)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_evaluate_matches_plain_ort(reference_models, tmp_path, kind):
    path = reference_models("resnet20")
    splits = split_dataset(load_digits(), 0)
    if kind == "int8":
        bg = build_block_graph(load_model(path))
        calib = [{"input": splits.calib.x[i:i + 32]} for i in range(0, 128, 32)]
        path = tmp_path / "int8.onnx"
        onnx.save(quantize_activations(bg.model, calib), path)
    res = subprocess.run([sys.executable, "-m", "hirelc_onnx", "evaluate", str(path), "--data", "digits",
                          "--split", "test", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    reported = json.loads(res.stdout)["accuracy"]
    assert reported == _plain_accuracy(path, splits.test.x, splits.test.y)
    assert np.isfinite(reported) and reported > 0.9
