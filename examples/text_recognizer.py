"""A small CTC text-line recognizer as a reference model: per-position class scores, not one label.

A CNN (strided 3x3 convs that shrink the 32-pixel height to 1 and the width by 4) feeds one
pre-norm self-attention layer over the 40 column positions, then a linear head: input `input`
float32 (N, 1, 32, 160) (examples/text_lines.py), output `logits` (N, 40, 37), class 0 the CTC
blank and class k the k-th character of ALPHABET. No recurrent layer. Trained with torch's CTC
loss on lines rendered with matplotlib's DejaVu fonts, in a few CPU minutes; exported at opset 17
like every reference here and cached as `<cache>/models/text_recognizer-v<version>.onnx`.

Lines: seed 0 trains, seed 2 picks the epoch, seed 1 (the default of `write_lines_npz`) is the
held-out set the reported character accuracy is measured on, through ONNX Runtime.

`text_recognizer(small=True)` is the test suite's build: the same network, data seeds and recipe on
fewer lines for fewer epochs (SMALL_RECIPE, about a third of the training), cached apart as
`text_recognizer-small-v<version>.onnx`, so a fresh clone's `make test` does not pay for the full
training; the benchmark's figures always come from the full build.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from examples.ctc_metric import char_accuracy
from examples.reference_models import (
    OPSET, TRAIN_THREADS, TransformerLayer, _cached_build, _count_params, _export, _ort_logits, _verify,
)
from examples.text_lines import ALPHABET, LINE_HEIGHT, LINE_WIDTH, render_lines
from hirelc_onnx.bridge.convert import torch_threads

__all__ = ["RECOGNIZER_VERSION", "TRAIN_SEED", "VAL_SEED", "TEST_SEED", "SMALL_RECIPE", "TextRecognizer",
           "text_recognizer"]

RECOGNIZER_VERSION = "1"
TRAIN_SEED, TEST_SEED, VAL_SEED = 0, 1, 2
TRAIN_LINES, VAL_LINES, TEST_LINES = 8000, 500, 1000
EPOCHS, BATCH, LR, SEED = 6, 32, 3e-3, 0
SMALL_RECIPE = {"train_lines": 4000, "epochs": 5}
"""The tests' build (`text_recognizer(small=True)`): 625 steps instead of 1500, about 60 CPU s instead
of 150; measured held-out character accuracy 0.968 (the full build: 0.99)."""


def _conv_bn_relu(cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TextRecognizer(nn.Module):
    """(N, 1, 32, W) -> (N, W/4, len(ALPHABET) + 1) CTC class scores."""

    def __init__(self, width: int = LINE_WIDTH, dim: int = 96, classes: int = len(ALPHABET) + 1) -> None:
        super().__init__()
        self.positions, self.dim = width // 4, dim
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 24, (3, 3), (2, 2), (1, 1)),     # 16 x W/2
            *_conv_bn_relu(24, 48, (3, 3), (2, 2), (1, 1)),    # 8 x W/4
            *_conv_bn_relu(48, 64, (3, 3), (2, 1), (1, 1)),    # 4 x W/4
            *_conv_bn_relu(64, dim, (LINE_HEIGHT // 8, 1), (1, 1), (0, 0)),  # 1 x W/4
        )
        self.pos = nn.Parameter(torch.zeros(1, self.positions, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.context = TransformerLayer(dim, heads=4, tokens=self.positions, mlp=2 * dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).reshape(-1, self.dim, self.positions).transpose(1, 2)
        return self.head(self.context(h + self.pos))


def _targets(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated class indices (1-based; 0 is blank) and per-line lengths, as F.ctc_loss wants."""
    index = {c: i + 1 for i, c in enumerate(ALPHABET)}
    flat = [index[c] for s in labels for c in str(s)]
    return torch.tensor(flat, dtype=torch.long), torch.tensor([len(str(s)) for s in labels], dtype=torch.long)


def _scores(model: nn.Module, x: np.ndarray, batch: int = 250) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def _train(x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray],
           epochs: int = EPOCHS) -> tuple[nn.Module, dict[str, Any]]:
    """AdamW + one-cycle on CTC loss; fresh pixel noise per batch; keep the epoch best on `val`."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = TextRecognizer()
    xs = torch.from_numpy(x)
    steps = len(x) // BATCH
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=epochs * steps, pct_start=0.15)
    best, best_state, best_epoch, history = -1.0, None, -1, []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            sigma = torch.rand(len(idx), 1, 1, 1, generator=gen) * 0.04
            xb = (xs[idx] + sigma * torch.randn(xs[idx].shape, generator=gen)).clamp(0.0, 1.0)
            flat, lengths = _targets(y[idx.numpy()])
            log_probs = F.log_softmax(model(xb), dim=-1).transpose(0, 1)  # (T, N, C)
            frames = torch.full((len(idx),), log_probs.shape[0], dtype=torch.long)
            loss = F.ctc_loss(log_probs, flat, frames, lengths, blank=0, zero_infinity=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = char_accuracy(_scores(model, val[0]), val[1])
        history.append(round(acc, 4))
        if acc > best:
            best, best_epoch, best_state = acc, epoch, copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval(), {"val_char_accuracy": best, "best_epoch": best_epoch, "val_history": history}


def _build_recognizer(train_lines: int = TRAIN_LINES, epochs: int = EPOCHS) -> tuple[onnx.ModelProto, dict[str, Any]]:
    t0, c0 = time.perf_counter(), time.process_time()
    x, y = render_lines(train_lines, TRAIN_SEED)
    val = render_lines(VAL_LINES, VAL_SEED)
    xt, yt = render_lines(TEST_LINES, TEST_SEED)
    render_cpu = time.process_time() - c0
    with torch_threads(TRAIN_THREADS):
        t1, c1 = time.perf_counter(), time.process_time()
        model, fit = _train(x, y, val, epochs)
        train_s, train_cpu = time.perf_counter() - t1, time.process_time() - c1
        proto = _export(model, torch.from_numpy(xt[:2]))
        diffs = _verify(proto, model, xt[:200])
    test_acc = char_accuracy(_ort_logits(proto, xt), yt)
    info = {
        "name": "text_recognizer",
        "version": RECOGNIZER_VERSION,
        "dataset": f"rendered lines, {len(ALPHABET)} characters, DejaVu fonts (examples/text_lines.py)",
        "alphabet": ALPHABET,
        "input_shape": [None, 1, LINE_HEIGHT, LINE_WIDTH],
        "output_shape": [None, LINE_WIDTH // 4, len(ALPHABET) + 1],
        "lines": {"train": [train_lines, TRAIN_SEED], "val": [VAL_LINES, VAL_SEED], "test": [TEST_LINES, TEST_SEED]},
        "test_char_accuracy": test_acc,
        **fit,
        "epochs": epochs,
        "steps": epochs * (train_lines // BATCH),
        "render_cpu_seconds": round(render_cpu, 2),
        "train_seconds": round(train_s, 2),
        "train_cpu_seconds": round(train_cpu, 2),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "params": _count_params(model),
        "opset": OPSET,
        "torch": torch.__version__,
        **diffs,
    }
    return proto, info


def text_recognizer(cache_dir: str | Path | None = None, small: bool = False) -> Path:
    """Path to the trained CTC recognizer as ONNX (input `input` (N,1,32,160), output `logits` (N,40,37)).

    small: the tests' build on SMALL_RECIPE (same network and seeds, less training), cached apart."""
    if small:
        return _cached_build(f"text_recognizer-small-v{RECOGNIZER_VERSION}", cache_dir,
                             lambda: _build_recognizer(**SMALL_RECIPE))
    return _cached_build(f"text_recognizer-v{RECOGNIZER_VERSION}", cache_dir, _build_recognizer)
