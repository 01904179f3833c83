"""The light model zoo shipped inside the onnx wheel, normalised once per test process."""
from __future__ import annotations

import functools
from pathlib import Path

import onnx

import onnx.backend.test as _bt
from passes.normalize import normalize

LIGHT_DIR = Path(_bt.__file__).parent / "data" / "light"
SMALL = ("squeezenet", "resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet")
LARGE = ("vgg19", "bvlc_alexnet", "zfnet512")  # hundreds of MB once their weights are materialised
ALL = SMALL + LARGE


def light_path(name: str) -> Path:
    return LIGHT_DIR / f"light_{name}.onnx"


@functools.lru_cache(maxsize=4)
def light_normalized(name: str, fold_batchnorm: bool = True) -> onnx.ModelProto:
    return normalize(onnx.load(str(light_path(name))), fold_batchnorm=fold_batchnorm)


def strip_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its final Softmax removed, so tests compare logits, not saturated
    probabilities (random weights easily give one-hot softmax outputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    last = g.node[-1]
    if last.op_type == "Softmax" and last.output[0] == g.output[0].name:
        logits = last.input[0]
        del g.node[-1]
        g.output[0].name = logits
    return out
