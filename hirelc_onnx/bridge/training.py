"""The one distillation training engine of the torch bridge: every fine-tune trains through `distil`.

`finetune` (fake-quantized weights) and `sparsity` (hard-concrete gates, fixed 0/1 masks) differ
only in what they wrap around the weights; the loss, the loop and the scoring are here:

    loss = kd_weight * sum over outputs of kd_loss(student, teacher, kind of the output)
           + (1 - kd_weight) * cross-entropy(labelled output, labels)   (distillation only without class labels)
           + extra_loss()                                              (e.g. the L0 penalty of the gates)

kd_loss per output kind (`evaluate/output_kinds.py` decides the kinds): class scores,
T^2 KL(softmax(teacher / T) || softmax(student / T)); per-position scores, the same KL over the last
axis, averaged over positions; dense maps, MSE divided by the teacher's mean square; embeddings,
that plus the mean cosine distance. A multi-output module (onnx2torch returns a tuple) distils on
every output. Labels count only when they are class indices of a class-score output
(`Distillation.label_output`); any other labels (strings, boxes) are for the user's metric, and
training then distils from the fp32 teacher alone.

The module runs in eval mode throughout (BatchNorm and Dropout compute what the ONNX graph
computes; only the weights change). After every epoch the validation split is scored (`validate`):
with class labels, accuracy with ties broken by lower cross-entropy; without, minus the summed
distillation loss at T = 1 (for class scores -KL(teacher || model), rather than top-1 agreement with
the teacher, which is flat once the model agrees with it on every row, while the KL still tells two
candidates apart).
With `keep_best` the best epoch's weights are restored at the end (epoch 0, the starting weights,
is the first candidate, so the result is never worse on validation than the input).

Learning rate: the peak rate decays on a cosine over the planned epochs (`decay`), or stays
constant. With `lr_probe_steps`, a few probe steps at `lr`, then `lr * backoff`, ... from the same
start pick the first rate that does not multiply the validation loss by more than DIVERGED; with
`backoff`, an epoch whose validation loss exceeds DIVERGED times the best restores the best
weights and goes on at a rate `backoff` times smaller.

Time: `time_budget_s` counts from the caller's `started` (conversion and teacher inference
included) and is checked before every step. When it cannot fit `max_epochs`, the planned epochs
shrink to those that fit, so a decaying rate still ends small. Determinism: data order comes from
numpy's Generator(seed) and torch is seeded, so a run is repeatable on one machine with one thread
count, provided `max_epochs` or `patience` ends it.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hirelc_onnx.bridge.convert import BridgeError, torch_inputs
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.objective import class_labels
from hirelc_onnx.evaluate.output_kinds import KIND_NAMES, classify
from hirelc_onnx.evaluate.runner import Inputs, ModelLike, predict_outputs
from hirelc_onnx.kill_points import kill_point
from hirelc_onnx.memory import heap_kept_for_reuse

__all__ = ["OUTPUT_KINDS", "OPTIMIZERS", "kd_loss", "logits", "teacher_logits", "Validation", "validate",
           "Distillation", "TrainSettings", "TrainResult", "optimizer_factory", "distil"]

log = logging.getLogger(__name__)

OUTPUT_KINDS = KIND_NAMES
"""What a model's output holds, which decides how a student imitates it (`evaluate/output_kinds.py`)."""
OPTIMIZERS = ("adam", "sgd")
PROBE_TRIES = 4
DIVERGED = 2.0  # a validation loss above this multiple of the best counts as divergence

OptimizerFactory = Callable[[float], torch.optim.Optimizer]


def _class_scores_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _sequence_scores_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    c = student.shape[-1]
    return _class_scores_kd(student.reshape(-1, c), teacher.reshape(-1, c), temperature)


def _normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher) / teacher.detach().pow(2).mean().clamp_min(1e-12)


def _dense_map_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return _normalised_mse(student, teacher)


def _embedding_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    n = student.shape[0]
    cos = F.cosine_similarity(student.reshape(n, -1), teacher.reshape(n, -1), dim=1, eps=1e-12)
    return _normalised_mse(student, teacher) + (1.0 - cos).mean()


_KD_LOSSES = {"class-scores": _class_scores_kd, "sequence-scores": _sequence_scores_kd,
              "dense-map": _dense_map_kd, "embedding": _embedding_kd}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            kind: str = "class-scores") -> torch.Tensor:
    """The distillation loss for outputs of `kind` (see the module docstring); 0 when student == teacher.
    Class scores: T^2 KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    if kind not in _KD_LOSSES:
        raise BridgeError(f"no distillation loss for outputs of kind {kind!r}; known: {OUTPUT_KINDS}")
    return _KD_LOSSES[kind](student, teacher, temperature)


def _as_outputs(out) -> list[torch.Tensor]:
    """A module's result as a list of output tensors (onnx2torch returns a tuple for several)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def logits(module: nn.Module, x: Inputs, batch_size: int) -> list[torch.Tensor]:
    """The module's outputs on `x` (one array, a mapping of input arrays in graph order, or a Dataset),
    one tensor per output, computed `batch_size` rows at a time without gradients; integer inputs
    stay integers."""
    inputs = x.inputs if isinstance(x, Dataset) else x
    tensors = torch_inputs(inputs)
    n = len(tensors[0])
    with torch.no_grad():
        parts = [_as_outputs(module(*(t[i:i + batch_size] for t in tensors))) for i in range(0, n, batch_size)]
    return [torch.cat(column) for column in zip(*parts)]


def teacher_logits(teacher: ModelLike, x: Inputs) -> list[np.ndarray]:
    """The teacher's float32 outputs on `x`, one array per output (ONNX Runtime: the fp32 model as deployed)."""
    return [np.asarray(o, dtype=np.float32) for o in predict_outputs(teacher, x)]


def _summed_kd(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], temperature: float,
               kinds: Sequence[str]) -> torch.Tensor:
    if len(student) != len(teacher):
        raise BridgeError(f"the student has {len(student)} outputs, the teacher {len(teacher)}")
    return sum(kd_loss(s, t, temperature, k) for s, t, k in zip(student, teacher, kinds))


class Validation(NamedTuple):
    """One validation pass. Class labels: (accuracy, -CE, CE); otherwise (-L, -L, L), L the summed
    distillation loss to the teacher at T = 1 (-KL for class scores)."""

    score: float
    tie_break: float
    loss: float

    @property
    def rank(self) -> tuple[float, float]:
        """What "better" compares: the score, then the tie-break."""
        return self.score, self.tie_break


def validate(module: nn.Module, data: "Distillation", batch_size: int) -> Validation:
    """Score `module` on `data.val`: accuracy with class labels, else against the teacher's outputs."""
    outs = logits(module, data.val, batch_size)
    if data.label_output is not None:
        out = outs[data.label_output]
        out = out.reshape(out.shape[0], -1)
        y = torch.from_numpy(np.asarray(data.val.y).reshape(-1).astype(np.int64))
        loss = float(F.cross_entropy(out, y))
        return Validation(float((out.argmax(1) == y).float().mean()), -loss, loss)
    if data.teacher_val is None:
        raise BridgeError("validation without class labels needs the teacher's outputs")
    loss = float(_summed_kd(outs, [torch.from_numpy(t) for t in data.teacher_val], 1.0, data.kinds))
    return Validation(-loss, -loss, loss)


def _label_output(kinds: Sequence[str], teacher: Sequence[np.ndarray], *labels) -> int | None:
    """The first class-score output when every labels array holds its class indices, else None."""
    for i, kind in enumerate(kinds):
        if kind == "class-scores":
            classes = teacher[i].reshape(len(teacher[i]), -1).shape[1]
            return i if all(class_labels(y, classes) for y in labels) else None
    return None


@dataclass(frozen=True)
class Distillation:
    """What a run learns from: the data, the teacher's outputs on it (one array per output; on `val`
    only when it is scored against the teacher), each output's kind, and the output the labels
    are class indices of (None: labels, if any, are not used in training)."""

    train: Dataset
    val: Dataset
    teacher_train: list[np.ndarray]
    teacher_val: list[np.ndarray] | None
    kinds: tuple[str, ...] = ("class-scores",)
    label_output: int | None = None

    @classmethod
    def from_teacher(cls, teacher: ModelLike, train: Dataset, val: Dataset,
                     kinds: Sequence[str] | None = None) -> "Distillation":
        """kinds: each output's kind (None: classified from the teacher's outputs on `train`)."""
        if len(train) == 0 or len(val) == 0:
            raise BridgeError("training needs non-empty train and val datasets")
        return cls.from_outputs(teacher_logits(teacher, train), train, val,
                                lambda: teacher_logits(teacher, val), kinds)

    @classmethod
    def from_outputs(cls, teacher_train: list[np.ndarray], train: Dataset, val: Dataset,
                     teacher_val: Callable[[], list[np.ndarray]] | None, kinds: Sequence[str] | None = None
                     ) -> "Distillation":
        """From the teacher's outputs on `train`; `teacher_val()` gives them on `val` when needed."""
        kinds = tuple(kinds) if kinds is not None else tuple(classify(None, t) for t in teacher_train)
        if len(kinds) != len(teacher_train):
            raise BridgeError(f"{len(kinds)} output kinds for {len(teacher_train)} teacher outputs")
        label_output = _label_output(kinds, teacher_train, train.y, val.y)
        if label_output is None and teacher_val is None:
            raise BridgeError("validation without class labels needs the teacher's outputs on val")
        return cls(train, val, teacher_train, teacher_val() if label_output is None else None, kinds, label_output)


@dataclass(frozen=True)
class TrainSettings:
    """How `distil` trains (see the module docstring)."""

    max_epochs: int
    lr: float
    """Peak learning rate (the optimizer factory's argument)."""
    time_budget_s: float = math.inf
    """Wall-clock limit, counted from `distil`'s `started`; math.inf: none."""
    batch_size: int = 64
    eval_batch_size: int | None = None
    """Rows per forward pass when validating; None: `batch_size`."""
    temperature: float = 4.0
    kd_weight: float = 0.7
    """Weight of the distillation term when labels exist (the rest is cross-entropy)."""
    seed: int = 0
    patience: int | None = None
    """Stop after this many epochs without a better validation score; None: never early."""
    decay: bool = True
    """Cosine decay of the rate over the planned epochs; False: constant."""
    lr_probe_steps: int = 0
    """Steps of each learning-rate probe try; 0: no probe."""
    backoff: float | None = None
    """Rate factor of each probe try and of the restart after a diverged epoch; None: no restart."""
    keep_best: bool = True
    """Restore the best validation epoch's weights at the end (else the last epoch's stay)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.kd_weight <= 1.0:
            raise BridgeError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.temperature <= 0 or self.lr <= 0:
            raise BridgeError(f"temperature and lr must be positive, got {self.temperature} and {self.lr}")
        if self.batch_size < 1 or self.max_epochs < 0 or (self.patience is not None and self.patience < 1):
            raise BridgeError("batch_size and patience must be >= 1, max_epochs >= 0")
        if (self.backoff is not None and not 0.0 < self.backoff < 1.0) or self.lr_probe_steps < 0:
            raise BridgeError(f"backoff must be in (0, 1) and lr_probe_steps >= 0, got {self.backoff}, "
                              f"{self.lr_probe_steps}")
        if self.lr_probe_steps and self.backoff is None:
            raise BridgeError("the learning-rate probe needs a backoff factor")
        if self.backoff is not None and not self.keep_best:
            raise BridgeError("restarting a diverged epoch from the best weights needs keep_best")


@dataclass
class TrainResult:
    """How a run went; the module itself holds the weights (the best epoch's with keep_best)."""

    best: Validation
    """Best validation seen (also with keep_best off)."""
    best_epoch: int
    """Epoch of `best`; 0 means training did not beat the starting weights."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch (0 = before training): epoch, train_loss, val_score, val_loss, seconds, lr."""
    stopped: str = "max_epochs"
    """Why training ended: max_epochs, patience or time_budget."""
    lr: float = 0.0
    """The peak learning rate training ended with (after the probe and any divergence backoff)."""


def optimizer_factory(params: Sequence[nn.Parameter], kind: str = "adam") -> OptimizerFactory:
    """lr -> a fresh optimizer over `params`: Adam, or SGD with Nesterov momentum 0.9."""
    if kind not in OPTIMIZERS:
        raise BridgeError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    params = list(params)
    if kind == "adam":
        return lambda lr: torch.optim.Adam(params, lr=lr)
    return lambda lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics move in training mode too)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(state[k])


class _Steps:
    """One optimizer step on a batch of training rows: the distillation loss, plus `extra_loss`."""

    def __init__(self, module: nn.Module, data: Distillation, s: TrainSettings,
                 extra_loss: Callable[[], torch.Tensor] | None) -> None:
        self.module, self.s, self.extra_loss = module, s, extra_loss
        self.inputs = torch_inputs(data.train.inputs)
        self.teacher = [torch.from_numpy(t) for t in data.teacher_train]
        self.kinds, self.label_output = data.kinds, data.label_output
        self.y = (None if data.label_output is None
                  else torch.from_numpy(np.asarray(data.train.y).reshape(-1).astype(np.int64)))
        self.kd_weight = 1.0 if self.y is None else s.kd_weight

    def __call__(self, idx: torch.Tensor, opt: torch.optim.Optimizer) -> float:
        outs = _as_outputs(self.module(*(t[idx] for t in self.inputs)))
        loss = self.kd_weight * _summed_kd(outs, [t[idx] for t in self.teacher], self.s.temperature, self.kinds)
        if self.kd_weight < 1.0:
            out = outs[self.label_output]
            loss = loss + (1.0 - self.kd_weight) * F.cross_entropy(out.reshape(out.shape[0], -1), self.y[idx])
        if self.extra_loss is not None:
            loss = loss + self.extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())


def distil(module: nn.Module, make_optimizer: OptimizerFactory, data: Distillation, s: TrainSettings,
           started: float, *, extra_loss: Callable[[], torch.Tensor] | None = None,
           after_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train `module` to imitate the teacher on `data` (see the module docstring).

    make_optimizer(lr): a fresh optimizer over the trainable parameters at peak rate lr (the probe
        and a divergence restart each build a new one; `optimizer_factory` is the common case).
    started: time.perf_counter() at the start of the caller's work, where the time budget begins.
    extra_loss(): added to every training step's loss; after_step(step): runs after each of them.
    Runs with the C heap kept for reuse (`memory.heap_kept_for_reuse`): each step's big tensors are
    served from freed ones, not mapped and faulted in anew.
    """
    with heap_kept_for_reuse():
        return _distil(module, make_optimizer, data, s, started, extra_loss, after_step)


def _distil(module: nn.Module, make_optimizer: OptimizerFactory, data: Distillation, s: TrainSettings,
            started: float, extra_loss: Callable[[], torch.Tensor] | None,
            after_step: Callable[[int], None] | None) -> TrainResult:
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    eval_batch = s.eval_batch_size or s.batch_size
    deadline = started + s.time_budget_s
    n = len(data.train)
    steps = math.ceil(n / s.batch_size)
    step_on = _Steps(module, data, s, extra_loss)

    def check() -> Validation:
        return validate(module, data, eval_batch)

    # epoch 0: the starting weights are the first candidate
    best = check()
    best_epoch, best_state = 0, _snapshot(module) if s.keep_best else None
    history = [{"epoch": 0, "train_loss": math.nan, "val_score": best.score, "val_loss": best.loss,
                "seconds": time.perf_counter() - started}]
    probe_rng = np.random.default_rng([s.seed, 1])  # its own stream: training sees the same data order
    lr = _probe_lr(module, make_optimizer, s, check, best.loss, best_state, step_on, probe_rng, n, deadline)
    opt = make_optimizer(lr)
    peaks = [g["lr"] for g in opt.param_groups]
    stopped, bad, step, epoch, horizon = "max_epochs", 0, 0, 0, s.max_epochs
    out_of_time = False
    t_train = time.perf_counter()
    while epoch < horizon:
        epoch += 1
        # one pass over the shuffled training data, stopping mid-epoch when the clock runs out
        perm = torch.from_numpy(rng.permutation(n))
        total, seen = 0.0, 0
        for i in range(steps):
            if time.perf_counter() > deadline:
                out_of_time = True
                break
            if s.decay:  # cosine decay over the planned horizon
                for group, peak in zip(opt.param_groups, peaks):
                    group["lr"] = peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / (horizon * steps))))
            idx = perm[i * s.batch_size:(i + 1) * s.batch_size]
            loss = step_on(idx, opt)
            if step == 0:
                kill_point("finetune")  # kill-and-resume tests: die mid-training
            if after_step is not None:
                after_step(step)
            step += 1
            total, seen = total + loss * len(idx), seen + len(idx)
        # validate what was trained, keep the best
        if seen:
            now = check()
            history.append({"epoch": epoch, "train_loss": total / seen, "val_score": now.score, "val_loss": now.loss,
                            "seconds": time.perf_counter() - started, "lr": lr})
            log.info("epoch %d: train loss %.4f, val %.4f (loss %.4f)", epoch, total / seen, now.score, now.loss)
            if now.rank > best.rank:
                best, best_epoch, bad = now, epoch, 0
                best_state = _snapshot(module) if s.keep_best else None
            else:
                bad += 1
            if s.backoff is not None and now.loss > DIVERGED * max(best.loss, 1e-12) and not out_of_time:
                # diverged: back to the best weights, on at a smaller learning rate
                lr *= s.backoff
                _restore(module, best_state)
                opt = make_optimizer(lr)
                peaks = [g["lr"] for g in opt.param_groups]
                log.info("val loss %.4f diverged from %.4f; restarting from epoch %d at lr %.2e",
                         now.loss, best.loss, best_epoch, lr)
        if out_of_time:
            stopped = "time_budget"
            break
        if s.patience is not None and bad >= s.patience:
            stopped = "patience"
            break
        # plan: shrink the horizon to the epochs the remaining budget fits, so a run the clock
        # limits still ends with a decayed learning rate
        now_t = time.perf_counter()
        if not math.isfinite(s.time_budget_s):
            continue
        fits = epoch + int((deadline - now_t) / max((now_t - t_train) / epoch, 1e-9))
        if fits < horizon:
            horizon = max(epoch, fits)
            stopped = "time_budget"
            log.info("the time budget fits %d epochs, not %d", horizon, s.max_epochs)
    if s.keep_best:
        _restore(module, best_state)
    return TrainResult(best=best, best_epoch=best_epoch, history=history, stopped=stopped, lr=lr)


def _probe_lr(module: nn.Module, make_optimizer: OptimizerFactory, s: TrainSettings, check: Callable[[], Validation],
              start_loss: float, start: dict[str, torch.Tensor] | None, step_on: _Steps, rng: np.random.Generator,
              n_train: int, deadline: float) -> float:
    """The first of lr, lr*backoff, ... (PROBE_TRIES tries) whose probe steps do not diverge (val loss).

    Each try starts from the input weights, so the probe changes nothing but the learning rate.
    When every try diverged, or the clock ran out, the rate below the last one tried is used.
    """
    lr = s.lr
    if s.lr_probe_steps == 0:
        return lr
    for _ in range(PROBE_TRIES):
        opt = make_optimizer(lr)
        perm = torch.from_numpy(rng.permutation(n_train))
        for i in range(s.lr_probe_steps):
            idx = perm[(i * s.batch_size) % n_train:][:s.batch_size]
            step_on(idx, opt)
        loss = check().loss
        _restore(module, start)
        log.info("probe lr %.2e: val loss %.4f (start %.4f)", lr, loss, start_loss)
        if loss <= DIVERGED * start_loss:
            return lr
        lr *= s.backoff  # a rate that raised the loss is never used: the next, smaller one is
        if time.perf_counter() > deadline:
            break
    return lr
