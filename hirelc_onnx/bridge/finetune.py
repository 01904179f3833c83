"""Quantization-aware fine-tuning with knowledge distillation, on the (pruned) fp32 ONNX graph.

Pruning and low-bit weights lose accuracy that a short fine-tune recovers. The graph is
converted to torch (`to_torch`), the weights the config quantizes are fake-quantized exactly as
the quantization pass will store them (`apply_fake_quant`; embedding tables once, and frozen), and
the fp32 latent weights are trained to imitate the fp32 teacher by the bridge's one training engine (`bridge.training.distil`:
the loss, the epoch loop, validation scoring, the learning-rate probe and divergence backoff are
described there). Here the engine runs with a cosine-decayed rate, early stopping (`patience`),
the probe and the backoff, and keeps the best validation epoch: accuracy (ties broken by lower
cross-entropy) when `val` is labelled, else -KL to the teacher. Epoch 0 is the starting point, so
the result is never worse on validation than the input. The latent weights are written back into
the ONNX initializers by name; the caller then runs `passes.quantize_weights` on the returned model.

Learning rate: one rate cannot serve a digits model trained from scratch and a pretrained
ImageNet network, hence the probe (a few steps at `lr`, then `lr * backoff`, ... from the same
start; the first rate that does not double the validation loss is used) and the restart at a rate
`backoff` times smaller after an epoch whose validation loss more than doubles the best.

Determinism: a run is repeatable on one machine with one thread count, provided `max_epochs` or
`patience` ends it. When `time_budget_s` cannot fit `max_epochs`, the learning-rate schedule is
shortened to the epochs that fit (so the run still ends annealed) and training stops where the
clock says.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

import numpy as np
import onnx

from hirelc_onnx.bridge.convert import BridgeError, to_torch, torch_threads
from hirelc_onnx.bridge.fake_quant import apply_fake_quant
from hirelc_onnx.bridge.training import OPTIMIZERS, Distillation, TrainSettings, distil, optimizer_factory
from hirelc_onnx.bridge.writeback import write_back
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.runner import TASK_CPUS_ENV, ModelLike
from hirelc_onnx.graph.blockgraph import build_block_graph
from hirelc_onnx.specs import weight_spec
from passes.quantize import WeightQuantSpec

__all__ = ["FinetuneSettings", "FinetuneResult", "finetune", "quant_specs"]

QuantLike = Union[CompressionConfig, Mapping[str, WeightQuantSpec], None]


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
    the validation loss is at most `training.DIVERGED` times the starting weights'. A pretrained ImageNet model is
    wrecked by the learning rate a small digits model needs (EfficientNet-Lite0: KL 0.14 -> 3.7
    after one epoch at 2e-3, 0.14 -> 0.045 at 2e-5); 0 disables the probe."""
    backoff: float = 0.1
    """Learning-rate factor of each probe step, and of the restart after a diverged epoch (val loss
    above twice the best: the best weights are restored and training goes on at lr * backoff)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise BridgeError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.threads < 0:
            raise BridgeError(f"threads must be >= 0, got {self.threads}")
        self.training()  # the engine checks the rest

    def training(self) -> TrainSettings:
        """The engine's settings: cosine decay, early stopping, probe, backoff, best epoch kept."""
        return TrainSettings(max_epochs=self.max_epochs, lr=self.lr, time_budget_s=self.time_budget_s,
                             batch_size=self.batch_size, temperature=self.temperature, kd_weight=self.kd_weight,
                             seed=self.seed, patience=self.patience, decay=True, lr_probe_steps=self.lr_probe_steps,
                             backoff=self.backoff, keep_best=True)


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
    """Per epoch (0 = before training): epoch, train_loss, val_score, val_loss, seconds, lr."""
    stopped: str = "max_epochs"
    """Why training ended: max_epochs, patience or time_budget."""
    seconds: float = 0.0
    """Wall time of the whole call, conversion and teacher inference included."""
    lr: float = 0.0
    """The peak learning rate training ended with (after the probe and any divergence backoff)."""


SMALL_MODEL_WEIGHTS = 1_000_000


def _auto_threads(model: onnx.ModelProto) -> int:
    """One thread for small models, every core (a worker's task: its CPUs) for large ones (see FinetuneSettings.threads)."""
    import os

    weights = sum(math.prod(t.dims) for t in model.graph.initializer)
    # a worker of a scaled-out search (search/executors.py) uses the CPUs its task was given
    cpus = int(os.environ.get(TASK_CPUS_ENV) or 0) or os.cpu_count() or 1
    return 1 if weights < SMALL_MODEL_WEIGHTS else max(1, cpus)


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


def _lookup_tables(model: onnx.ModelProto) -> set[str]:
    """Initializers read as the data of a Gather (embedding tables): fake-quantized once and frozen
    while the rest trains (`fake_quant.FrozenFakeQuant`; a step then costs what the encoder costs)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits}


def _specs(model: onnx.ModelProto, quant: QuantLike) -> dict[str, WeightQuantSpec]:
    if quant is None:
        return {}
    if isinstance(quant, CompressionConfig):
        return quant_specs(model, quant)
    return dict(quant)


def finetune(model: onnx.ModelProto, quant: QuantLike, train: Dataset, val: Dataset, *,
             teacher: ModelLike | np.ndarray | Sequence[np.ndarray] | None = None,
             settings: FinetuneSettings | None = None, kinds: Sequence[str] | None = None,
             **overrides: Any) -> FinetuneResult:
    """Fine-tune `model` (fp32, possibly pruned) under fake quantization of `quant`; best val epoch kept.

    quant: a CompressionConfig (kernel names of `model`), {weight initializer: WeightQuantSpec},
        or None to fine-tune in fp32.
    teacher: the fp32 model to distil (usually the unpruned original), or its outputs on `train`
        already computed (an array, or a list with one per output); None distils the input model's
        own fp32 outputs. `val` without class labels is scored against the teacher's val outputs,
        so it needs a teacher model (or None).
    kinds: each output's kind (`evaluate/output_kinds.py`), which picks its distillation loss;
        None classifies the teacher's outputs.
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
    if isinstance(teacher, (np.ndarray, list, tuple)):
        outputs = [np.asarray(t, np.float32) for t in (teacher if isinstance(teacher, (list, tuple)) else [teacher])]
        if any(len(t) != len(train) for t in outputs):
            raise BridgeError(f"teacher logits have {len(outputs[0])} rows, the train data {len(train)}")
        try:
            data = Distillation.from_outputs(outputs, train, val, None, kinds)
        except BridgeError as exc:
            raise BridgeError("unlabelled val data is scored against the teacher: pass the teacher model, "
                              "not logits") from exc
    else:
        data = Distillation.from_teacher(model if teacher is None else teacher, train, val, kinds)
    specs = _specs(model, quant)
    with torch_threads(s.threads or _auto_threads(model)):
        module = apply_fake_quant(to_torch(model), specs, frozen=_lookup_tables(model) & specs.keys())
        params = [p for p in module.parameters() if p.requires_grad]
        run = distil(module, optimizer_factory(params, s.optimizer), data, s.training(), t0)
        return FinetuneResult(model=write_back(model, module), best_val=run.best.score, best_epoch=run.best_epoch,
                              history=run.history, stopped=run.stopped, seconds=time.perf_counter() - t0, lr=run.lr)
