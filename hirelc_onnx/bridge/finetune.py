"""Quantization-aware fine-tuning with knowledge distillation, on the (pruned) fp32 ONNX graph.

Pruning and low-bit weights lose accuracy that a short fine-tune recovers. The graph is
converted to torch (`to_torch`), the weights the config quantizes are fake-quantized exactly as
the quantization pass will store them (`apply_fake_quant`), and the fp32 latent weights are
trained to imitate the fp32 teacher:

    loss = kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - kd_weight) * cross-entropy(student, labels)      (KL only when unlabelled)

The module runs in eval mode throughout (BatchNorm and Dropout compute what the ONNX graph
computes; only the weights change). After every epoch the validation split is scored through
the fake-quantized module: accuracy (ties broken by lower cross-entropy) when labelled, else
-KL to the teacher. The best epoch's weights are kept (epoch 0 is the starting point, so the
result is never worse on validation than the input), and written back into the ONNX
initializers by name. The caller then runs `passes.quantize_weights` on the returned model.

Learning rate: one rate cannot serve a digits model trained from scratch and a pretrained
ImageNet network. Before training, a few probe steps at `lr`, then `lr * backoff`, ... from the
same start pick the first rate that does not double the validation loss; an epoch whose
validation loss more than doubles the best restores the best weights and goes on at a rate
`backoff` times smaller.

Determinism: data order comes from numpy's Generator(seed) and torch is seeded, so a run is
repeatable on one machine with one thread count, provided `max_epochs` or `patience` ends it.
When `time_budget_s` cannot fit `max_epochs`, the learning-rate schedule is shortened to the
epochs that fit (so the run still ends annealed) and training stops where the clock says.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from hirelc_onnx.bridge.convert import BridgeError, to_torch, torch_threads
from hirelc_onnx.bridge.fake_quant import apply_fake_quant
from hirelc_onnx.bridge.writeback import write_back
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.runner import ModelLike, predict
from hirelc_onnx.graph.blockgraph import build_block_graph
from hirelc_onnx.specs import weight_spec
from passes.quantize import WeightQuantSpec

__all__ = ["FinetuneSettings", "FinetuneResult", "finetune", "quant_specs"]

log = logging.getLogger(__name__)

QuantLike = Union[CompressionConfig, Mapping[str, WeightQuantSpec], None]
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class FinetuneSettings:
    """How `finetune` trains; every field can also be passed to `finetune` as a keyword."""

    time_budget_s: float = 60.0
    """Wall-clock limit for the whole call (conversion and teacher inference included); math.inf:
    none, `max_epochs` (or `patience`) ends the run and it is repeatable."""
    max_epochs: int = 60
    """Epochs at most. The cosine learning-rate decay spans them, or, when the time budget cannot
    fit them (measured after each epoch), the epochs it can: a clock-limited run still ends with
    a small learning rate, but is then no longer repeatable bit for bit."""
    lr: float = 2e-3
    """Peak learning rate (ResNet-20, 50% channels + int4: 2e-3 recovered best of 5e-4..3e-3)."""
    optimizer: str = "adam"
    """adam, or sgd (momentum 0.9, Nesterov)."""
    batch_size: int = 64
    temperature: float = 4.0
    """Distillation temperature T."""
    kd_weight: float = 0.7
    """Weight of the distillation term when labels exist (the rest is cross-entropy)."""
    patience: int = 15
    """Stop after this many epochs without a better validation score."""
    seed: int = 0
    """Seeds torch and the data order."""
    threads: int = 0
    """torch intra-op threads; 0 picks: one for models under `SMALL_MODEL_WEIGHTS` weights (see
    `torch_threads`: one is fastest there), every core above (EfficientNet-Lite0 at 224x224: an
    epoch of 200 crops takes 17 s on 2 threads)."""
    lr_probe_steps: int = 3
    """Before training, steps taken at `lr` (then lr/10, lr/100, lr/1000 from the same start) until
    the validation loss is at most DIVERGED times the starting weights'. A pretrained ImageNet model is
    wrecked by the learning rate a small digits model needs (EfficientNet-Lite0: KL 0.14 -> 3.7
    after one epoch at 2e-3, 0.14 -> 0.045 at 2e-5); 0 disables the probe."""
    backoff: float = 0.1
    """Learning-rate factor of each probe step, and of the restart after a diverged epoch (val loss
    above twice the best: the best weights are restored and training goes on at lr * backoff)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise BridgeError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise BridgeError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.temperature <= 0 or self.lr <= 0:
            raise BridgeError(f"temperature and lr must be positive, got {self.temperature} and {self.lr}")
        if self.batch_size < 1 or self.threads < 0 or self.max_epochs < 0 or self.patience < 1:
            raise BridgeError("batch_size and patience must be >= 1, threads and max_epochs >= 0")
        if not 0.0 < self.backoff < 1.0 or self.lr_probe_steps < 0:
            raise BridgeError(f"backoff must be in (0, 1) and lr_probe_steps >= 0, got {self.backoff}, "
                              f"{self.lr_probe_steps}")


@dataclass
class FinetuneResult:
    """The fine-tuned fp32 model (graph unchanged, weights trained) and how the run went."""

    model: onnx.ModelProto
    """The input graph with the best epoch's latent fp32 weights written back (not quantized)."""
    best_val: float
    """Best validation score: accuracy when `val` is labelled, else -KL(teacher || model)."""
    best_epoch: int
    """Epoch whose weights were kept; 0 means fine-tuning did not beat the starting weights."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch (0 = before training): epoch, train_loss, val_score, val_loss, seconds."""
    stopped: str = "max_epochs"
    """Why training ended: max_epochs, patience or time_budget."""
    seconds: float = 0.0
    """Wall time of the whole call, conversion and teacher inference included."""
    lr: float = 0.0
    """The peak learning rate training ended with (after the probe and any divergence backoff)."""


SMALL_MODEL_WEIGHTS = 1_000_000
PROBE_TRIES = 4
DIVERGED = 2.0  # a validation loss above this multiple of the best counts as divergence


def _auto_threads(model: onnx.ModelProto) -> int:
    """One thread for small models, every core for large ones (see FinetuneSettings.threads)."""
    import os

    weights = sum(math.prod(t.dims) for t in model.graph.initializer)
    return 1 if weights < SMALL_MODEL_WEIGHTS else max(1, os.cpu_count() or 1)


def quant_specs(model: onnx.ModelProto, config: CompressionConfig) -> dict[str, WeightQuantSpec]:
    """Weight initializer name -> quantizer spec for the kernels `config` quantizes in `model`."""
    bg = build_block_graph(model, normalized=True)
    config.validate(bg.kernels)
    specs = {}
    for name, kernel in bg.kernels.items():
        spec = weight_spec(kernel, config.get(name))
        if spec is not None:
            specs[kernel.weight] = spec
    return specs


def _specs(model: onnx.ModelProto, quant: QuantLike) -> dict[str, WeightQuantSpec]:
    if quant is None:
        return {}
    if isinstance(quant, CompressionConfig):
        return quant_specs(model, quant)
    return dict(quant)


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2-scaled KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _logits(module: nn.Module, x: np.ndarray, batch_size: int) -> torch.Tensor:
    x = np.asarray(x, np.float32)
    with torch.no_grad():
        return torch.cat([module(torch.from_numpy(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def _validate(module: nn.Module, val: Dataset, teacher_val: np.ndarray | None,
              batch_size: int) -> tuple[tuple[float, float], float]:
    """((score, tie-break), loss): (accuracy, -CE) when labelled, else (-KL, -KL)."""
    logits = _logits(module, val.x, batch_size)
    if val.y is not None:
        y = torch.from_numpy(val.y.astype(np.int64))
        loss = float(F.cross_entropy(logits, y))
        return (float((logits.argmax(1) == y).float().mean()), -loss), loss
    kl = float(_kd_loss(logits, torch.from_numpy(teacher_val), 1.0))
    return (-kl, -kl), kl


def _teacher_logits(teacher: ModelLike | np.ndarray | None, model: onnx.ModelProto, data: Dataset) -> np.ndarray:
    source = model if teacher is None else teacher
    return np.asarray(predict(source, data.x), dtype=np.float32)


def finetune(model: onnx.ModelProto, quant: QuantLike, train: Dataset, val: Dataset, *,
             teacher: ModelLike | np.ndarray | None = None, settings: FinetuneSettings | None = None,
             **overrides: Any) -> FinetuneResult:
    """Fine-tune `model` (fp32, possibly pruned) under fake quantization of `quant`; best val epoch kept.

    quant: a CompressionConfig (kernel names of `model`), {weight initializer: WeightQuantSpec},
        or None to fine-tune in fp32.
    teacher: the fp32 model to distil (usually the unpruned original), or its logits on `train`
        already computed; None distils the input model's own fp32 outputs. `val` without labels
        is scored against the teacher's val logits, so it needs a teacher model (or None).
    settings / overrides: a FinetuneSettings, and keyword overrides of its fields
        (e.g. `time_budget_s=30, seed=1`).
    """
    t0 = time.perf_counter()
    unknown = sorted(set(overrides) - {f.name for f in fields(FinetuneSettings)})
    if unknown:
        raise BridgeError(f"unknown fine-tuning setting {unknown[0]!r}")
    s = replace(settings or FinetuneSettings(), **overrides)
    if len(train) == 0 or len(val) == 0:
        raise BridgeError("fine-tuning needs non-empty train and val datasets")
    if isinstance(teacher, np.ndarray):
        if len(teacher) != len(train):
            raise BridgeError(f"teacher logits have {len(teacher)} rows, the train data {len(train)}")
        if val.y is None:
            raise BridgeError("unlabelled val data is scored against the teacher: pass the teacher model, not logits")
        teacher_train = teacher.astype(np.float32)
    else:
        teacher_train = _teacher_logits(teacher, model, train)
    teacher_val = _teacher_logits(teacher, model, val) if val.y is None else None
    specs = _specs(model, quant)
    with torch_threads(s.threads or _auto_threads(model)):
        return _train(model, specs, train, val, teacher_train, teacher_val, s, t0)


def _train(model: onnx.ModelProto, specs: dict[str, WeightQuantSpec], train: Dataset, val: Dataset,
           teacher_train: np.ndarray, teacher_val: np.ndarray | None, s: FinetuneSettings,
           t0: float) -> FinetuneResult:
    """The training loop of `finetune` (arguments validated there)."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    module = apply_fake_quant(to_torch(model), specs)
    params = [p for p in module.parameters() if p.requires_grad]
    steps = math.ceil(len(train) / s.batch_size)
    x_all = torch.from_numpy(np.asarray(train.x, np.float32))
    t_all = torch.from_numpy(teacher_train)
    y_all = None if train.y is None else torch.from_numpy(train.y.astype(np.int64))
    kd_weight = 1.0 if y_all is None else s.kd_weight

    def step_on(idx: torch.Tensor, opt: torch.optim.Optimizer) -> float:
        logits = module(x_all[idx])
        loss = kd_weight * _kd_loss(logits, t_all[idx], s.temperature)
        if kd_weight < 1.0:
            loss = loss + (1.0 - kd_weight) * F.cross_entropy(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    # epoch 0: the starting weights are the first candidate
    best, val_loss = _validate(module, val, teacher_val, s.batch_size)
    best_epoch, best_state = 0, _snapshot(module)
    history = [{"epoch": 0, "train_loss": math.nan, "val_score": best[0], "val_loss": val_loss,
                "seconds": time.perf_counter() - t0}]
    probe_rng = np.random.default_rng([s.seed, 1])  # its own stream: training sees the same data order
    lr = _probe_lr(module, params, s, val, teacher_val, val_loss, best_state, step_on, probe_rng, len(train), t0)
    opt = _optimizer(params, s, lr)
    stopped, bad, step, epoch, horizon = "max_epochs", 0, 0, 0, s.max_epochs
    out_of_time = False
    t_train = time.perf_counter()
    while epoch < horizon:
        epoch += 1
        # one pass over the shuffled training data, stopping mid-epoch when the clock runs out
        perm = torch.from_numpy(rng.permutation(len(train)))
        total, seen = 0.0, 0
        for i in range(steps):
            if time.perf_counter() - t0 > s.time_budget_s:
                out_of_time = True
                break
            for group in opt.param_groups:  # cosine decay over the planned horizon
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / (horizon * steps))))
            idx = perm[i * s.batch_size:(i + 1) * s.batch_size]
            loss = step_on(idx, opt)
            step += 1
            total, seen = total + loss * len(idx), seen + len(idx)
        # validate what was trained, keep the best
        if seen:
            score, val_loss = _validate(module, val, teacher_val, s.batch_size)
            history.append({"epoch": epoch, "train_loss": total / seen, "val_score": score[0], "val_loss": val_loss,
                            "seconds": time.perf_counter() - t0, "lr": lr})
            log.info("fine-tune epoch %d: train loss %.4f, val %.4f (loss %.4f)", epoch, total / seen, score[0], val_loss)
            if score > best:
                best, best_epoch, bad = score, epoch, 0
                best_state = _snapshot(module)
            else:
                bad += 1
            if val_loss > DIVERGED * max(-best[1], 1e-12) and not out_of_time:
                # diverged: back to the best weights, on at a smaller learning rate
                lr *= s.backoff
                _restore(module, best_state)
                opt = _optimizer(params, s, lr)
                log.info("fine-tune: val loss %.4f diverged from %.4f; restarting from epoch %d at lr %.2e",
                         val_loss, -best[1], best_epoch, lr)
        if out_of_time:
            stopped = "time_budget"
            break
        if bad >= s.patience:
            stopped = "patience"
            break
        # plan: shrink the horizon to the epochs the remaining budget fits, so a run the clock
        # limits still ends with a decayed learning rate
        now = time.perf_counter()
        if not math.isfinite(s.time_budget_s):
            continue
        fits = epoch + int((s.time_budget_s - (now - t0)) / max((now - t_train) / epoch, 1e-9))
        if fits < horizon:
            horizon = max(epoch, fits)
            stopped = "time_budget"
            log.info("fine-tune: the time budget fits %d epochs, not %d", horizon, s.max_epochs)
    _restore(module, best_state)
    return FinetuneResult(model=write_back(model, module), best_val=best[0], best_epoch=best_epoch, history=history,
                          stopped=stopped, seconds=time.perf_counter() - t0, lr=lr)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics move in training mode too)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(state[k])


def _optimizer(params: list[nn.Parameter], s: FinetuneSettings, lr: float) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


def _probe_lr(module: nn.Module, params: list[nn.Parameter], s: FinetuneSettings, val: Dataset,
              teacher_val: np.ndarray | None, start_loss: float, start: dict[str, torch.Tensor], step_on,
              rng: np.random.Generator, n_train: int, t0: float) -> float:
    """The first of lr, lr*backoff, ... (PROBE_TRIES tries) whose probe steps do not diverge (val loss).

    Each try starts from the input weights, so the probe changes nothing but the learning rate.
    When every try diverged, or the clock ran out, the rate below the last one tried is used.
    """
    lr = s.lr
    if s.lr_probe_steps == 0:
        return lr
    for _ in range(PROBE_TRIES):
        opt = _optimizer(params, s, lr)
        perm = torch.from_numpy(rng.permutation(n_train))
        for i in range(s.lr_probe_steps):
            idx = perm[(i * s.batch_size) % n_train:][:s.batch_size]
            step_on(idx, opt)
        _, loss = _validate(module, val, teacher_val, s.batch_size)
        _restore(module, start)
        log.info("fine-tune: probe lr %.2e: val loss %.4f (start %.4f)", lr, loss, start_loss)
        if loss <= DIVERGED * start_loss:
            return lr
        lr *= s.backoff  # a rate that raised the loss is never used: the next, smaller one is
        if time.perf_counter() - t0 > s.time_budget_s:
            break
    return lr
