"""Element-wise pruning through the torch bridge: learned per-weight masks, and fine-tuning that keeps them.

Channel pruning removes whole filters; what is left of an over-parameterised model still holds
many weights it can do without. `learn_masks` finds them with hard-concrete gates (Louizos,
Welling & Kingma 2018, "Learning Sparse Neural Networks through L0 Regularization"): each listed
weight w is used as w * z, z a stretched, clamped binary-concrete sample whose log-odds
log_alpha is trained with the weights (starting from the weight's magnitude), and the loss adds
the expected L0 norm:

    loss = kd_weight * T^2 KL(teacher / T || student / T) + (1 - kd_weight) * CE(student, labels)
           + l0_weight * sum_i P(z_i != 0) / N

The density is scheduled rather than left to a penalty weight: it falls linearly from 1 to
`density` over the first `ramp` of the steps, and after every step all but the target fraction
of gates with the highest log-odds are closed (their log-odds capped below the open boundary,
where a gradient can still lift them back). Measured on the VGG digits reference, a dual-ascent
penalty weight instead overshot and collapsed the network within the few hundred steps this
budget allows, and shifting all log-odds together to meet the target scaled every kept weight
down until the signal vanished. At the end exactly `density` of the listed weights' entries are
kept over all of them (each weight keeps at least `min_layer_density`), at full value, and the
rest are written back as exact zeros. With `layer_density` (the two-stage agent's per-kernel
choice) the schedule, the projection and the final cut act within each weight at its own density.

`masked_finetune` then trains with every zero of the listed weights held at zero (a fixed 0/1
mask parametrization) and, optionally, the weights fake-quantized exactly as the quantization
pass will store them (the mask is applied first, and every grid maps 0 to 0, so the zeros
survive quantization). Both train through the bridge's one engine (`bridge.training.distil`,
fixed epochs at a constant rate, no probe) and write the latent weights back into the ONNX
initializers by name; `masked_finetune` keeps the best validation epoch (epoch 0 included), so it
never returns a model worse on validation than its input.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize

from hirelc_onnx.bridge.convert import BridgeError, bindings, latent, to_torch, torch_threads
from hirelc_onnx.bridge.fake_quant import FakeQuant
from hirelc_onnx.bridge.training import Distillation, TrainSettings, distil, optimizer_factory, validate
from hirelc_onnx.bridge.writeback import write_back
from hirelc_onnx.evaluate.data import Dataset
from passes.quantize import WeightQuantSpec

__all__ = ["MaskSettings", "SparseResult", "learn_masks", "masked_finetune"]

log = logging.getLogger(__name__)

# hard-concrete constants (Louizos et al.): temperature and stretch interval
_BETA, _GAMMA, _ZETA = 2.0 / 3.0, -0.1, 1.1
_OPEN = math.log(-_GAMMA / _ZETA)  # log-odds above which the deterministic gate is nonzero
_CLOSED_MARGIN = 2.0  # closed gates sit this far below _OPEN: open in about 6% of samples
_EVAL_BATCH = 256  # rows per forward pass when validating


@dataclass(frozen=True)
class MaskSettings:
    """How `learn_masks` trains the gates."""

    density: float = 0.25
    """Fraction of the listed weights' entries kept, over all of them together."""
    layer_density: Mapping[str, float] | None = None
    """Per listed weight, the fraction of its own entries kept (every listed weight named; each in
    (0, 1]): the schedule and the final cut then act within each weight, and `density` and
    `min_layer_density` are not used. None: one global cut."""
    min_layer_density: float = 0.02
    """Each weight keeps at least this fraction of its entries (no layer is cut off)."""
    epochs: int = 12
    """Passes over the training data."""
    ramp: float = 0.6
    """Share of the training steps over which the target density falls from 1 to `density`."""
    lr: float = 1e-3
    """Adam learning rate of the weights."""
    gate_lr: float = 5e-2
    """Adam learning rate of the gates' log-odds."""
    l0_weight: float = 1.0
    """lambda: weight of the expected fraction of open gates in the loss."""
    init_log_alpha: float = 4.0
    """Gate log-odds for a weight of the layer's RMS magnitude; log(|w| / rms) is added, so the
    gates start from the magnitude ranking and training revises it."""
    batch_size: int = 64
    temperature: float = 4.0
    kd_weight: float = 0.7
    time_budget_s: float = 60.0
    seed: int = 0
    threads: int = 1


@dataclass
class SparseResult:
    """The model with the listed weights' zeros written in, and how training went."""

    model: onnx.ModelProto
    density: dict[str, float]
    """Listed weight -> fraction of its entries that are nonzero."""
    val_score: float
    """Validation score of the returned weights (torch, fake-quantized when asked): accuracy when
    labelled, else -KL(teacher || model) (`training.validate`)."""
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class _HardConcreteGate(nn.Module):
    """Parametrization w -> w * z, z a hard-concrete gate per entry.

    z is sampled while gradients are recorded (training steps); under no_grad (validation) it is
    the 0/1 mask the gate stands for (open when its deterministic value would be nonzero), so
    scoring sees the weights as they will be kept: unscaled, or zero.
    """

    def __init__(self, w: torch.Tensor, init_log_alpha: float) -> None:
        super().__init__()
        rms = w.detach().pow(2).mean().sqrt().clamp_min(1e-12)
        log_mag = torch.log(w.detach().abs().clamp_min(1e-12) / rms).clamp(-2.0, 2.0)
        self.log_alpha = nn.Parameter(init_log_alpha + log_mag)

    def gate(self) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return (self.log_alpha > _OPEN).to(self.log_alpha.dtype)
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / _BETA)
        return (s * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        """P(z != 0) per entry: the expected L0 norm's summand."""
        return torch.sigmoid(self.log_alpha - _BETA * math.log(-_GAMMA / _ZETA))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.gate()


class _FixedMask(nn.Module):
    """Parametrization w -> w * mask with a constant 0/1 mask: pruned entries stay zero."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _weights(module: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """ONNX weight name -> (owning module, attribute, latent tensor), refusing names not bound."""
    table = bindings(module)
    missing = [n for n in names if n not in table]
    if missing:
        raise BridgeError(f"weight {missing[0]!r} has no torch tensor after conversion; list float kernel weights")
    return {n: (table[n].owner(module), table[n].attr, latent(module, table[n])) for n in names}


def _density(module: nn.Module, names: Sequence[str]) -> dict[str, float]:
    return {n: float((w != 0).float().mean()) for n, (_, _, w) in _weights(module, names).items()}


def _project(gates: Sequence[_HardConcreteGate], target: float) -> None:
    """Close all but the `target` fraction of gates with the highest log-odds (at most that many open).

    Closed gates get their log-odds capped `_CLOSED_MARGIN` below the open boundary: they stay out
    of the deterministic mask and rarely open in samples, but their gradient can still lift them
    back above the open ones. The open gates are left alone, so the kept weights keep z ~ 1.
    """
    with torch.no_grad():
        scores = torch.cat([g.log_alpha.reshape(-1) for g in gates])
        k = max(1, int(round(target * scores.numel())))
        if int((scores > _OPEN).sum()) <= k:
            return
        kth = torch.topk(scores, k).values[-1]
        for g in gates:
            la = g.log_alpha
            la.copy_(torch.where(la < kth, la.clamp(max=_OPEN - _CLOSED_MARGIN), la))


def _keep_masks(gates: Mapping[str, _HardConcreteGate], density: float, min_layer: float,
                layer_density: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The highest-log-odds gates, `density` of all entries, at least `min_layer` of each weight;
    with `layer_density`, each weight's own fraction of its highest-log-odds gates."""
    if layer_density is not None:
        masks = {}
        for name, g in gates.items():
            la = g.log_alpha.detach().reshape(-1)
            mask = torch.zeros_like(la, dtype=torch.bool)
            mask[torch.topk(la, max(1, int(round(layer_density[name] * la.numel())))).indices] = True
            masks[name] = mask.reshape(g.log_alpha.shape)
        return masks
    scores = torch.cat([g.log_alpha.detach().reshape(-1) for g in gates.values()])
    k = max(1, int(round(density * scores.numel())))
    threshold = torch.topk(scores, k).values.min()
    masks = {}
    for name, g in gates.items():
        la = g.log_alpha.detach()
        mask = la >= threshold
        floor = max(1, int(math.ceil(min_layer * la.numel())))
        if int(mask.sum()) < floor:
            mask = torch.zeros_like(mask).reshape(-1)
            mask[torch.topk(la.reshape(-1), floor).indices] = True
            mask = mask.reshape(la.shape)
        masks[name] = mask
    return masks


def learn_masks(model: onnx.ModelProto, weights: Sequence[str], train: Dataset, val: Dataset,
                teacher: onnx.ModelProto, settings: MaskSettings = MaskSettings(), *,
                kinds: Sequence[str] | None = None) -> SparseResult:
    """Learn which entries of `weights` (ONNX initializer names) to zero; return the model with them zeroed.

    teacher: the fp32 model to distil (usually the unpruned original). kinds: each output's kind
    (None: classified from the teacher's outputs). See the module docstring.
    """
    t0 = time.perf_counter()
    if not 0.0 < settings.density <= 1.0:
        raise BridgeError(f"mask density must be in (0, 1], got {settings.density}")
    per_layer = settings.layer_density
    if per_layer is not None and (set(per_layer) != set(weights)
                                  or not all(0.0 < d <= 1.0 for d in per_layer.values())):
        raise BridgeError("layer_density must give every listed weight a density in (0, 1]")
    data = Distillation.from_teacher(teacher, train, val, kinds)
    plan = TrainSettings(max_epochs=settings.epochs, lr=settings.lr, time_budget_s=settings.time_budget_s,
                         batch_size=settings.batch_size, eval_batch_size=_EVAL_BATCH, temperature=settings.temperature,
                         kd_weight=settings.kd_weight, seed=settings.seed, decay=False, keep_best=False)
    with torch_threads(settings.threads):
        module = to_torch(model)
        gates: dict[str, _HardConcreteGate] = {}
        for name, (owner, attr, w) in _weights(module, weights).items():
            gates[name] = _HardConcreteGate(w, settings.init_log_alpha)
            parametrize.register_parametrization(owner, attr, gates[name])
        gate_params = [g.log_alpha for g in gates.values()]
        ids = {id(p) for p in gate_params}
        weight_params = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]

        def adam(lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam([{"params": weight_params, "lr": lr}, {"params": gate_params, "lr": settings.gate_lr}])

        total = sum(g.log_alpha.numel() for g in gates.values())
        ramp_steps = max(1, int(settings.ramp * settings.epochs * math.ceil(len(train) / settings.batch_size)))

        def l0_penalty() -> torch.Tensor:
            return settings.l0_weight * sum(g.open_probability().sum() for g in gates.values()) / total

        def follow_schedule(step: int) -> None:
            progress = min(1.0, (step + 1) / ramp_steps)
            if per_layer is None:
                _project(list(gates.values()), 1.0 - (1.0 - settings.density) * progress)
                return
            for name, g in gates.items():
                _project([g], 1.0 - (1.0 - per_layer[name]) * progress)

        history = distil(module, adam, data, plan, t0, extra_loss=l0_penalty, after_step=follow_schedule).history
        masks = _keep_masks(gates, settings.density, settings.min_layer_density, per_layer)
        with torch.no_grad():
            for name, (owner, attr, w) in _weights(module, weights).items():
                w.mul_(masks[name])
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
        score = validate(module, data, _EVAL_BATCH).score
        density = _density(module, weights)
        out = write_back(model, module)
    kept = sum(int(m.sum()) for m in masks.values()) / total
    log.info("learned masks: %.1f%% of %d weights kept, val %.4f", 100 * kept, total, score)
    return SparseResult(out, density, score, history, time.perf_counter() - t0)


def masked_finetune(model: onnx.ModelProto, train: Dataset, val: Dataset, teacher: onnx.ModelProto, *,
                    sparse: Sequence[str] = (), quant: Mapping[str, WeightQuantSpec] | None = None,
                    epochs: int = 10, time_budget_s: float = 30.0, lr: float = 1e-3, batch_size: int = 64,
                    temperature: float = 4.0, kd_weight: float = 0.7, seed: int = 0,
                    threads: int = 1, kinds: Sequence[str] | None = None) -> SparseResult:
    """Distillation fine-tuning that keeps every zero of the `sparse` weights and fake-quantizes `quant`.

    sparse: ONNX weight names whose zero entries are pruned (held at zero); quant: weight name ->
    the spec the quantization pass will use; kinds: each output's kind (None: classified from the
    teacher's outputs). The best validation epoch is kept.
    """
    t0 = time.perf_counter()
    data = Distillation.from_teacher(teacher, train, val, kinds)
    plan = TrainSettings(max_epochs=epochs, lr=lr, time_budget_s=time_budget_s, batch_size=batch_size,
                         eval_batch_size=_EVAL_BATCH, temperature=temperature, kd_weight=kd_weight, seed=seed,
                         decay=False, keep_best=True)
    quant = dict(quant or {})
    with torch_threads(threads):
        module = to_torch(model)
        table = bindings(module)
        masks = {}
        for name, (owner, attr, w) in _weights(module, sparse).items():
            masks[name] = (w.detach() != 0).to(w.dtype)
            parametrize.register_parametrization(owner, attr, _FixedMask(masks[name]))
        for name, (owner, attr, _) in _weights(module, list(quant)).items():
            parametrize.register_parametrization(owner, attr, FakeQuant(quant[name], table[name].transposed))
        params = [p for p in module.parameters() if p.requires_grad]
        run = distil(module, optimizer_factory(params, "adam"), data, plan, t0)
        history, score = run.history, run.best.score
        with torch.no_grad():
            for name, (_, _, w) in _weights(module, sparse).items():
                w.mul_(masks[name])
        density = _density(module, sparse)
        out = write_back(model, module)
    log.info("masked fine-tune: %d epochs, val %.4f (%.1fs)", len(history) - 1, score, time.perf_counter() - t0)
    return SparseResult(out, density, score, history, time.perf_counter() - t0)
