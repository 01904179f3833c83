"""Tests of the torch bridge; shared helpers: the digits splits and a tiny exported CNN."""
from __future__ import annotations

import functools

import onnx

from hirelc_onnx.evaluate.data import Splits, load_digits, split_dataset
from passes.normalize import normalize

DIGIT_MODELS = ("resnet20", "vgg", "mobilenetv2", "vit")


@functools.lru_cache(maxsize=1)
def digits() -> Splits:
    return split_dataset(load_digits(), seed=0)


@functools.lru_cache(maxsize=8)
def normalized(path: str) -> onnx.ModelProto:
    """A reference model file, normalised as the pipeline imports it (do not mutate)."""
    return normalize(onnx.load(path))


@functools.lru_cache(maxsize=1)
def tiny_cnn() -> onnx.ModelProto:
    """Conv -> ReLU -> Conv -> ReLU -> Flatten -> Linear on 1x8x8, random seeded weights, opset 17."""
    import io

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, torch.zeros(2, 1, 8, 8), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return normalize(onnx.load_from_string(buf.getvalue()))
