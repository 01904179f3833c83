"""Two-stage DRL compression (`--method two-stage`): an agent prunes, then another quantizes the pruned model.

docs/ARCHITECTURE.md, "The methods" 3; for over-parameterised models (VGG-style) where the aim is the
smallest file. One loop, top to bottom:

Stage 1, pruning
  a. Channels: a policy-gradient agent picks a keep ratio per prunable kernel. A pick above the
     FLOPs target is scaled down onto it (every candidate is feasible), the pruned model gets a
     short distillation fine-tune, and the reward is
         -logit_mse(fine-tuned, fp32 on the proxy batch) - flops_weight * MACs fraction.
     The best ratios found are pruned for real and fine-tuned longer.
  b. Weights: element-wise variational pruning learns per-weight hard-concrete masks through the
     torch bridge (`bridge.sparsity.learn_masks`, `density` of the kernel weights kept), then a
     fine-tune holds the zeros. The stage-1 model stores them sparsely (`passes.sparse_weights`)
     where that is smaller.
Stage 2, quantization
  An agent picks a bitwidth per kernel (the widths whose stored container differs, see
  `budget.bits_ladder`) for the stage-1 weights. A pick short of the size goal is repaired by
  lowering, one rung at a time, the kernel whose next rung saves the most bytes. Reward:
         -logit_mse(quantized, no fine-tune) + size_weight * log(ratio / goal).
  The best config is fine-tuned with the masks held and the weights fake-quantized exactly as
  stored, quantized, and stored sparsely where smaller.

Sizes are true bytes of what is emitted: the cost model does not know sparse storage, so each
kernel's bytes at each bitwidth are computed once, exactly, from the integers the quantizer
writes and `passes.sparse_weights.choose_encoding` (checked against the emitted model), plus every
other initializer as stored. The size goal is `budget`, else `TwoStageSettings.default_ratio`.
Sparse storage is used for the `storage` target only; `ort-cpu` / `qdq` keep dense integer
weights (their kernels are what the target is for). The agents are one categorical distribution
per decision trained by REINFORCE with a batch-mean baseline: a few dozen episodes, each a
config, is all the budget allows, and that is what such a policy learns from.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from hirelc_onnx.apply import apply_pruning, apply_quantization
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.graph.blockgraph import BlockGraph, Kernel
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.progress import ProgressFn, notify
from hirelc_onnx.search.baselines import MethodResult
from hirelc_onnx.search.budget import bits_ladder
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.specs import weight_spec, weight_target
from passes.quantize import quantize
from passes.quantize_weights import encoding, stored_tensors
from passes.storage import encoded_nbytes, initializer_nbytes, tensor_nbytes
from passes.sparse_weights import DELTA4_OPSET, SparseWeightsPass, choose_encoding, dense_nbytes, stored_initializer

__all__ = ["TwoStageSettings", "run_two_stage"]

log = logging.getLogger(__name__)

PHASE_TWO_STAGE = "two-stage: pruning, then quantization episodes"


@dataclass(frozen=True)
class TwoStageSettings:
    """Knobs of the two-stage method; the defaults compress the VGG digits reference past 30x."""

    keep_choices: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    """Channel keep ratios the stage-1 agent picks from, per prunable kernel."""
    flops_target: float = 0.5
    """Stage 1 keeps at most this fraction of the model's MACs."""
    flops_weight: float = 0.1
    """Reward per unit of MACs fraction: a small pull below the target when accuracy allows."""
    prune_episodes: int | None = None
    """Stage-1 episodes (each a short fine-tune); None: 3 x `evaluations`."""
    probe_epochs: int = 2
    """Epochs of the short fine-tune that scores a stage-1 episode."""
    density: float = 0.25
    """Fraction of the kernel weights' entries the element-wise masks keep."""
    mask_epochs: int = 12
    """Epochs of variational mask training."""
    quant_episodes: int = 32
    """Stage-2 episodes (each a quantization and a proxy run, no fine-tune)."""
    size_weight: float = 0.05
    """Reward per unit of log(ratio / goal) in stage 2."""
    default_ratio: float = 30.0
    """Size goal in true bytes when no budget is given (the issue's acceptance figure for VGG)."""
    finetune_epochs: int = 15
    """Epochs of each fine-tune between and after the stages (the best validation epoch is kept)."""
    batch_episodes: int = 4
    """Episodes per policy update."""
    policy_lr: float = 0.5
    """Step size of the policy's logits per update (rewards are standardised within a batch)."""


@dataclass
class _Policy:
    """One categorical distribution per decision, trained by REINFORCE with a batch-mean baseline."""

    logits: np.ndarray  # (decisions, choices)
    lr: float
    rng: np.random.Generator
    batch: list[tuple[np.ndarray, float]] = field(default_factory=list)

    def probs(self) -> np.ndarray:
        e = np.exp(self.logits - self.logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def sample(self) -> np.ndarray:
        p = self.probs()
        return np.array([self.rng.choice(p.shape[1], p=row) for row in p])

    def record(self, action: np.ndarray, reward: float, batch_size: int) -> None:
        """Keep (action, reward); every `batch_size` episodes take one policy-gradient step."""
        self.batch.append((action, reward))
        if len(self.batch) < batch_size:
            return
        rewards = np.array([r for _, r in self.batch])
        advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        p = self.probs()
        grad = np.zeros_like(self.logits)
        rows = np.arange(len(self.logits))
        for (a, _), adv in zip(self.batch, advantage):
            grad -= adv * p
            grad[rows, a] += adv
        self.logits += self.lr * grad / len(self.batch)
        self.batch.clear()


@dataclass
class _Best:
    reward: float = -math.inf
    config: CompressionConfig | None = None


def _with(config: CompressionConfig, **per_kernel: Mapping[str, object]) -> CompressionConfig:
    """`config` with fields replaced per kernel: _with(c, bits={"conv": 4})."""
    kernels = dict(config.kernels)
    for fld, values in per_kernel.items():
        for name, value in values.items():
            kernels[name] = replace(kernels[name], **{fld: value})
    return CompressionConfig(kernels, target=config.target).validate()


def _onto_flops(bg: BlockGraph, config: CompressionConfig, prunable: list[str], target: float) -> CompressionConfig:
    """Scale the prunable kernels' keep ratios by one factor so the MACs fraction is at most `target`."""
    if model_cost(bg, config).macs_fraction <= target:
        return config
    ratios = {n: config.get(n).keep_ratio for n in prunable}

    def scaled(s: float) -> CompressionConfig:
        return _with(config, keep_ratio={n: max(0.05, r * s) for n, r in ratios.items()})

    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model_cost(bg, scaled(mid)).macs_fraction <= target else (lo, mid)
    return scaled(lo)


class _Sizes:
    """Exact emitted bytes of any bitwidth choice for the stage-1 weights (sparse storage included).

    The sparse encodings open to a weight depend on the emitted model's opset (delta4 needs 21),
    which the quantized kernels raise, so each entry is kept for both sides of that line.
    """

    def __init__(self, bg: BlockGraph, tuned: onnx.ModelProto, base: CompressionConfig, sparse: bool) -> None:
        inits = {t.name: t for t in tuned.graph.initializer}
        weights = {k.weight for k in bg.kernels.values()}
        dense = apply_quantization(bg, tuned, _with(base, bits={n: 32 for n in bg.kernels}))
        self.other = sum(tensor_nbytes(t) for t in dense.graph.initializer if t.name not in weights)
        self.opset = next(o.version for o in dense.opset_import if o.domain in ("", "ai.onnx"))
        self.bg, self.target = bg, base.target
        self.table: dict[str, dict[int, tuple[int, int]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, k in bg.kernels.items():
            w = numpy_helper.to_array(inits[k.weight])
            self.shapes[name] = w.shape
            self.table[name] = {bits: tuple(self._kernel_bytes(w, k, replace(base.get(name), bits=bits), base.target,
                                                               sparse, opset) for opset in (self.opset, DELTA4_OPSET))
                                for bits in bits_ladder(base.target)}

    @staticmethod
    def _kernel_bytes(w: np.ndarray, kernel: Kernel, kc: KernelConfig, target: str, sparse: bool, opset: int) -> int:
        spec = weight_spec(kernel, kc)
        if spec is None:
            return choose_encoding(w, opset).nbytes if sparse else dense_nbytes(w)
        target = weight_target(kernel, target)
        total = encoded_nbytes(w.shape, spec, target)
        if not sparse:
            return total
        enc = encoding(spec, target, w.shape)
        q = stored_tensors(quantize(w, spec), target).q.astype(onnx.helper.tensor_dtype_to_np_dtype(enc.container))
        return total - dense_nbytes(q) + choose_encoding(q, opset).nbytes

    def total(self, config: CompressionConfig) -> int:
        specs = {n: s for n, k in self.bg.kernels.items() if (s := weight_spec(k, config.get(n)))}
        opset = max([self.opset] + [encoding(s, weight_target(self.bg.kernels[n], self.target), self.shapes[n]).opset
                                    for n, s in specs.items()])
        side = int(opset >= DELTA4_OPSET)
        return self.other + sum(row[config.get(name).bits][side] for name, row in self.table.items())


def _emit(bg: BlockGraph, tuned: onnx.ModelProto, config: CompressionConfig,
          calib_batches: list[dict[str, np.ndarray]] | None = None) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Quantize the stage-1 weights for `config` and, for the storage target, store kernels sparsely
    where smaller; returns the model and {stored initializer: sparse encoding} for those that are."""
    model = apply_quantization(bg, tuned, config, calib_batches)
    if config.target != "storage":
        return model, {}
    ir_model = ir.from_proto(model)
    sparse = SparseWeightsPass([n for k in bg.kernel_list() if (n := stored_initializer(model, k.weight))])
    sparse(ir_model)
    return ir.to_proto(ir_model), {name: plan.encoding for name, plan in sparse.chosen.items()}


def _repair_size(sizes: _Sizes, config: CompressionConfig, goal_bytes: float) -> CompressionConfig:
    """Lower one kernel one rung at a time (the biggest saving first) until the bytes meet the goal."""
    ladder = bits_ladder(config.target)
    while (current := sizes.total(config)) > goal_bytes:
        steps = [_with(config, bits={n: max(b for b in ladder if b < config.get(n).bits)})
                 for n in sizes.table if config.get(n).bits > min(ladder)]
        if not steps:
            return config
        best = min(steps, key=sizes.total)
        if sizes.total(best) >= current:
            return config
        config = best
    return config


def run_two_stage(bg: BlockGraph, ctx: SearchContext | None, target: str, *, budget: float | None = None,
                  max_drop: float | None = None, time_limit: float | None = None, seed: int = 0,
                  evaluations: int = 8, progress: ProgressFn | None = None,
                  settings: TwoStageSettings | None = None) -> MethodResult:
    """Prune with an agent (channels, then learned element-wise masks), then quantize with another.

    budget: the true-bytes ratio stage 2 must reach (None: `settings.default_ratio`). evaluations:
    stage 1 runs 3 x evaluations episodes unless `settings.prune_episodes` says otherwise (each is
    a short fine-tune, the method's costly signal). max_drop is checked on validation and a miss
    logged; the report measures it on the held-out split.
    """
    # the torch bridge, imported when the method runs: the size tables and policies above need no torch
    from hirelc_onnx.bridge.convert import BridgeError
    from hirelc_onnx.bridge.sparsity import MaskSettings, learn_masks, masked_finetune

    if ctx is None:
        raise UserError(f"{option('method', 'two-stage')} fine-tunes and measures candidates: give {option('data')}")
    s = settings or TwoStageSettings()
    start = time.perf_counter()
    deadline = start + time_limit if time_limit else math.inf
    rng = np.random.default_rng(seed)
    goal = budget or s.default_ratio
    splits, teacher = ctx.splits, bg.model
    weights = [k.weight for k in bg.kernel_list()]
    prunable = [n for n, k in bg.kernels.items() if k.group is not None and bg.groups[k.group].prunable]
    base = CompressionConfig({n: KernelConfig() for n in bg.kernels}, target=target)
    prune_episodes = s.prune_episodes or 3 * evaluations
    total_steps = prune_episodes + s.quant_episodes
    history: list[dict] = []

    def proxy(model: onnx.ModelProto) -> tuple[float, float]:
        """(damage, agreement) against the fp32 model on the cached proxy batch (logit MSE, top-1
        agreement for class scores; see output_kinds for the other kinds)."""
        p = ctx.proxy_of(model)
        return p.logit_mse, p.agreement

    def val_score(model: onnx.ModelProto) -> float:
        return ctx.score_model(model, splits.val)

    # --- stage 1a: channel keep ratios, chosen by an agent rewarded on accuracy and FLOPs ---------
    policy = _Policy(np.zeros((len(prunable), len(s.keep_choices))), s.policy_lr, rng)
    best = _Best(config=_onto_flops(bg, base, prunable, s.flops_target))
    for step in range(prune_episodes if prunable else 0):
        if time.perf_counter() > deadline and best.config is not None and step:
            log.warning("two-stage: time limit reached after %d pruning episodes", step)
            break
        action = policy.sample()
        config = _onto_flops(bg, _with(base, keep_ratio={n: s.keep_choices[a] for n, a in zip(prunable, action)}),
                             prunable, s.flops_target)
        t0 = time.perf_counter()
        try:
            probe = masked_finetune(apply_pruning(bg, config), splits.finetune, splits.val, teacher,
                                    epochs=s.probe_epochs, seed=seed, kinds=ctx.objective.kinds)
        except BridgeError as exc:
            raise UserError(f"{option('method', 'two-stage')} needs the torch bridge for fine-tuning and masks: {exc}") from exc
        ctx.evaluations += 1
        mse, macs = proxy(probe.model)[0], model_cost(bg, config).macs_fraction
        reward = -mse - s.flops_weight * macs
        policy.record(action, reward, s.batch_episodes)
        if reward > best.reward:
            best = _Best(reward, config)
        history.append({"kind": "probe", "stage": 1, "step": step, "method": "two-stage", "score": probe.val_score,
                        "logit_mse": mse, "macs_fraction": macs, "ratio": model_cost(bg, config).ratio,
                        "reward": reward, "finetuned": True, "seconds": time.perf_counter() - t0})
        notify(progress, PHASE_TWO_STAGE, step + 1, total_steps)
    pruned_config = best.config
    keep = {n: pruned_config.get(n).keep_ratio for n in prunable}
    log.info("two-stage stage 1: keep ratios %s (MACs %.2f)", keep, model_cost(bg, pruned_config).macs_fraction)

    # --- stage 1b: fine-tune, learn element-wise masks, fine-tune holding the zeros -----------------
    tuned = masked_finetune(apply_pruning(bg, pruned_config), splits.finetune, splits.val, teacher,
                            epochs=s.finetune_epochs, seed=seed, kinds=ctx.objective.kinds).model
    masks = learn_masks(tuned, weights, splits.finetune, splits.val, teacher,
                        MaskSettings(density=s.density, epochs=s.mask_epochs, seed=seed), kinds=ctx.objective.kinds)
    stage1 = masked_finetune(masks.model, splits.finetune, splits.val, teacher, sparse=weights,
                             epochs=s.finetune_epochs, seed=seed, kinds=ctx.objective.kinds)
    ctx.evaluations += 1
    stage1_model, stage1_sparse = _emit(bg, stage1.model, pruned_config)
    stage1_report = _stage_report(bg, ctx, stage1_model, pruned_config, val_score(stage1_model), stage1_sparse)
    stage1_report["density"] = stage1.density
    history.append({"kind": "real", "stage": 1, "method": "two-stage", "score": stage1_report["val_score"],
                    "ratio": stage1_report["ratio"], "bytes": stage1_report["bytes"],
                    "macs_fraction": stage1_report["macs_fraction"], "finetuned": True,
                    "seconds": time.perf_counter() - start})

    # --- stage 2: bitwidths, chosen by an agent rewarded on accuracy and size -----------------------
    sizes = _Sizes(bg, stage1.model, pruned_config, sparse=target == "storage")
    goal_bytes = bg.weight_bytes / goal
    ladder = bits_ladder(target)
    names = list(bg.kernels)
    policy = _Policy(np.zeros((len(names), len(ladder))), s.policy_lr, rng)
    best = _Best()
    for step in range(s.quant_episodes):
        if time.perf_counter() > deadline and best.config is not None:
            log.warning("two-stage: time limit reached after %d quantization episodes", step)
            break
        action = policy.sample()
        config = _repair_size(sizes, _with(pruned_config, bits={n: ladder[a] for n, a in zip(names, action)}),
                              goal_bytes)
        t0 = time.perf_counter()
        mse, agreement = proxy(apply_quantization(bg, stage1.model, config))
        ratio = bg.weight_bytes / sizes.total(config)
        reward = -mse + s.size_weight * math.log(ratio / goal)
        policy.record(action, reward, s.batch_episodes)
        if reward > best.reward:
            best = _Best(reward, config)
        history.append({"kind": "proxy", "stage": 2, "step": step, "method": "two-stage", "score": agreement,
                        "logit_mse": mse, "ratio": ratio, "bytes": sizes.total(config), "reward": reward,
                        "bits": {n: config.get(n).bits for n in names}, "finetuned": False,
                        "seconds": time.perf_counter() - t0})
        notify(progress, PHASE_TWO_STAGE, prune_episodes + step + 1, total_steps)
    final_config = best.config or _repair_size(sizes, pruned_config, goal_bytes)

    # --- fine-tune with masks held and weights fake-quantized as stored; emit ----------------------
    specs = {k.weight: spec for n, k in bg.kernels.items() if (spec := weight_spec(k, final_config.get(n)))}
    qat = masked_finetune(stage1.model, splits.finetune, splits.val, teacher, sparse=weights, quant=specs,
                          epochs=s.finetune_epochs, seed=seed, kinds=ctx.objective.kinds)
    ctx.evaluations += 1
    model, stage2_sparse = _emit(bg, qat.model, final_config,
                                 ctx.calib_batches if target in ("ort-cpu", "qdq") else None)
    stage2_report = _stage_report(bg, ctx, model, final_config, val_score(model), stage2_sparse)
    stage2_report["bits"] = {n: final_config.get(n).bits for n in names}
    stage2_report["predicted_bytes"] = sizes.total(final_config)
    history.append({"kind": "real", "stage": 2, "method": "two-stage", "score": stage2_report["val_score"],
                    "ratio": stage2_report["ratio"], "bytes": stage2_report["bytes"],
                    "macs_fraction": stage2_report["macs_fraction"], "finetuned": True,
                    "seconds": time.perf_counter() - start})
    goal_met = stage2_report["ratio"] >= goal - 1e-9
    if not goal_met:
        log.warning("two-stage: size goal %.1fx missed: reached %.2fx", goal, stage2_report["ratio"])
    drop = 100.0 * (ctx.fp32_val_score - stage2_report["val_score"])
    if max_drop is not None and drop > max_drop:
        log.warning("two-stage: validation drop %.2f points exceeds --max-drop %.2f", drop, max_drop)
    extra = {"stages": {"stage1": stage1_report, "stage2": stage2_report}, "goal_ratio": goal,
             "goal_met": goal_met, "keep_ratios": keep, "seconds": time.perf_counter() - start}
    return MethodResult(final_config, model, stage2_report["val_score"], history, extra)


def _stage_report(bg: BlockGraph, ctx: SearchContext, model: onnx.ModelProto, config: CompressionConfig,
                  val: float, sparse: dict[str, str]) -> dict:
    """Size and accuracy of one stage's emitted model (true bytes; test split for the report only)."""
    nbytes = initializer_nbytes(model)
    return {"ratio": bg.weight_bytes / max(nbytes, 1), "bytes": nbytes, "val_score": val,
            "test_score": ctx.test_score(model), "macs_fraction": model_cost(bg, config).macs_fraction,
            "sparse_storage": sparse}
