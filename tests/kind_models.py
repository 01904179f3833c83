"""Tiny exported models on 1x8x8 inputs whose outputs are not plain class scores: per-position scores
(N, T, C), a unit-norm embedding (N, D), and both at once (a two-output model)."""
from __future__ import annotations

import functools
import io

import onnx

from passes.normalize import normalize


def _export(net, names: list[str]) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    axes = {"input": {0: "n"}, **{n: {0: "n"} for n in names}}
    torch.onnx.export(net.eval(), torch.zeros(2, 1, 8, 8), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=names, dynamic_axes=axes)
    return normalize(onnx.load_from_string(buf.getvalue()))


def _modules():
    import torch
    from torch import nn

    class Sequence(nn.Module):
        """Each of the 8 image columns is a position: (N, 8, 5) class scores per position."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 5, (8, 1))

        def forward(self, x):
            return self.head(torch.relu(self.conv(x))).squeeze(2).transpose(1, 2)

    class Embedding(nn.Module):
        """A 16-d embedding with unit L2 norm."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 8 * 8, 16)

        def forward(self, x):
            e = self.fc(torch.relu(self.conv(x)).flatten(1))
            return e / torch.sqrt((e * e).sum(1, keepdim=True) + 1e-12)

    class TwoHeads(nn.Module):
        """Class scores (N, 10) and the 16-d unit embedding they are computed from."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = Embedding()
            self.cls = nn.Linear(16, 10)

        def forward(self, x):
            e = self.embed(x)
            return self.cls(e) * 5.0, e

    return Sequence, Embedding, TwoHeads


@functools.lru_cache(maxsize=1)
def sequence_model() -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    return _export(_modules()[0](), ["scores"])


@functools.lru_cache(maxsize=1)
def embedding_model() -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    return _export(_modules()[1](), ["embedding"])


@functools.lru_cache(maxsize=1)
def two_output_model() -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    return _export(_modules()[2](), ["logits", "embedding"])
