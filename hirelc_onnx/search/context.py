"""What every search method needs to score a candidate: costs, a cheap proxy, real measurements.

A method sees configs and numbers, never ONNX protos. The context owns the model, the data splits
(calibration / fine-tune / validation; the held-out test split is used only for the final report),
the fp32 reference outputs, and the three ways to judge a config:
  * cost(config)    -- true stored bytes and MACs, from the cost model (no rewrite);
  * proxy(config)   -- apply the config without fine-tuning, run the cached proxy batch through
                       ORT and compare every output with fp32's (the cold-start accuracy signal);
                       the model is built by swapping in fake-quantized weights
                       (search/fake_quant_proxy.py) where that computes the rewrite's logits
                       bit for bit (storage encodings) or the rewrite is dear (a big model);
  * measure(config) -- prune, fine-tune through the bridge (when it can convert the model),
                       quantize, and measure the score on the validation split through ORT;
  * measure_batch(configs) -- the same for candidates that can be judged at once, on the run's
                       executor (search/executors.py: in-process, local processes or Ray), results
                       in candidate order, a candidate whose worker kept dying as None.
The score is the run's `Objective` (evaluate/objective.py): the user's --metric when given, else
top-1 accuracy with class labels, else each output kind's agreement with the fp32 model (the worst
output's, relative to fp32, for a multi-output model). Labels that are not class indices of a
class-score output -- strings, floats, boxes -- are for a metric only: the score is then label-free
too. Inputs travel as one array per graph input, keyed by the input's name; token ids and masks
stay integers. A data-free context (`data_free`) holds inputs synthesised from the graph.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from hirelc_onnx.apply import apply_config, apply_pruning, apply_quantization, clip_ranges
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import Dataset, Splits
from hirelc_onnx.evaluate.loaders import check_fits, graph_inputs
from hirelc_onnx.evaluate.objective import Objective
from hirelc_onnx.evaluate.runner import evict_big_sessions, predict_outputs
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.search.executors import EvaluationTask, Executor, FailedEvaluation, InProcess, Placement
from hirelc_onnx.search.fake_quant_proxy import FakeQuantModels
from hirelc_onnx.search.range_fits import RangeFits
from hirelc_onnx.specs import weight_spec

__all__ = ["Measurement", "Proxy", "SearchContext"]

log = logging.getLogger(__name__)

FINETUNE_VAL_SAMPLES = 256
"""The fine-tune's own validation (its learning-rate probe, best epoch and divergence check: several
passes through the torch bridge per candidate) reads at most this many validation samples; the
candidate's score reads them all. A large validation split then makes the pick among candidates less
noisy without making every fine-tune dearer (EfficientNet-Lite0, 400 validation crops: a search took
616 s against 347 s at 60)."""

FAST_PROXY_WEIGHT_BYTES = 8 << 20
"""Above this many fp32 weight bytes every target's proxy swaps in fake-quantized weights; below it only
the storage target's does (bit-identical there; a DequantizeLinear ORT folds differs in the last float
bit, so small models, whose rewrite is cheap, keep the exact rewrite under ort-cpu / qdq)."""


@dataclass(frozen=True)
class Proxy:
    logit_mse: float  # the worst output's damage vs fp32 (0 = identical): logit MSE / variance, per-position KL, ...
    agreement: float  # the worst output's label-free score vs fp32 in [0, 1] (top-1 agreement, cosine, ...)


@dataclass
class Measurement:
    """A config applied for real: fine-tuned (when possible), quantized, scored through ORT."""

    config: CompressionConfig
    score: float  # the objective on the validation split (higher is better)
    cost: ModelCost
    model: onnx.ModelProto = field(repr=False)
    finetuned: bool
    seconds: float
    placement: Placement | None = None  # where it ran (measure_batch): worker, node, wall and queue time


class SearchContext:
    """Scores configs for a search method; see the module docstring."""

    def __init__(self, bg: BlockGraph, splits: Splits, target: str = "storage", *, proxy_size: int = 256,
                 finetune_seconds: float = 20.0, seed: int = 0, calib_size: int = 64,
                 finetune_epochs: int | None = None, data_free: bool = False, output_kind: str | dict | None = None,
                 metric: str | None = None, metric_mode: str = "max") -> None:
        """output_kind / metric / metric_mode: how outputs are scored (evaluate/objective.py: Objective.build)."""
        self.bg = bg
        specs = graph_inputs(bg.model)
        # every split keyed by the graph's input names (a single-input dataset's `x` renamed), cast to
        # the inputs' dtypes: calibration feeds, the bridge and ORT all take them as they are
        splits = Splits(*(check_fits(part, specs) for part in (splits.calib, splits.finetune, splits.val, splits.test)))
        self.splits = splits
        self.data_free = data_free
        """True when the data were synthesised from the graph (no --data): the score is fidelity only."""
        self.target = target
        self.seed = seed
        self.finetune_seconds = finetune_seconds
        # a fixed number of epochs instead of the clock: every candidate gets the same training, and
        # a run is repeatable (the clock makes results move with machine load)
        self.finetune_epochs = finetune_epochs
        self.finetune_lr: float | None = None  # the rate the first fine-tune settled on (see _finetune)
        self.labelled = splits.val.classes is not None
        if splits.val.y is not None and not self.labelled and metric is None:
            log.warning("labels of %s are %s, not class indices: they are for a metric only; the search scores "
                     "fidelity to the fp32 model (label-free)", splits.val.name, splits.val.y.dtype)
        self.input_names = [spec.name for spec in specs]
        rng = np.random.default_rng(seed)
        pool = splits.calib if len(splits.calib) else splits.finetune
        take = np.sort(rng.choice(len(pool), min(proxy_size, len(pool)), replace=False))
        self.proxy_inputs: dict[str, np.ndarray] = pool.rows(take)
        # the calibration rows a search scores its proxy on (a selection must not read them: `selection.Selection`)
        self.proxy_calib_rows = take if pool is splits.calib else np.zeros(0, dtype=np.int64)
        self.calib_batches = [pool.rows(slice(i, i + 32)) for i in range(0, min(len(pool), calib_size), 32)]
        self.proxy_ref = predict_outputs(bg.model, self.proxy_inputs)
        self.val_ref = predict_outputs(bg.model, splits.val)
        graph_outputs = bg.model.graph.output
        shapes = [[d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
                  for o in graph_outputs]
        self.objective = Objective.build([o.name for o in graph_outputs], shapes, self.val_ref, splits.val.y,
                                         output_kind=output_kind, metric=metric, metric_mode=metric_mode)
        self._refs = {id(splits.val): (splits.val, self.val_ref)}  # fp32 outputs per scored split
        self.fp32_val_score = self.score(self.val_ref, splits.val)
        self.evaluations = 0
        self._fake_quant: FakeQuantModels | None = None  # built on the first fast proxy; never pickled
        self._range_fits: RangeFits | None = None  # built on first use (`range_fits`); never pickled
        self.bridge_error: str | None = None
        self.executor: Executor = InProcess()
        """Where measure_batch runs its evaluations (compress sets it from --workers / --ray)."""
        self.evaluation_log: list[dict] = []
        """Per batched evaluation: where it ran, wall and queue seconds, attempts, failures (for the report)."""
        self.batch_log: list[dict] = []
        """Per batch: its size and wall seconds (throughput in bench/scale.py)."""

    def __getstate__(self) -> dict:
        """A worker's copy: no executor, no evaluation log, the fp32 outputs of the validation split only."""
        state = dict(self.__dict__)
        state.update(executor=None, evaluation_log=[], batch_log=[], _refs={}, _strides=_split_strides(self.splits),
                     _fake_quant=None, _range_fits=None)
        return state

    def __setstate__(self, state: dict) -> None:
        strides = state.pop("_strides")
        self.__dict__.update(state)
        self.splits = _restore_strides(self.splits, strides)
        self.executor = InProcess()
        self._refs = {id(self.splits.val): (self.splits.val, self.val_ref)}

    # --- judging configs ---------------------------------------------------------------
    def cost(self, config: CompressionConfig) -> ModelCost:
        return model_cost(self.bg, self._targeted(config))

    @property
    def range_fits(self) -> RangeFits:
        """The search's MSE range fits, shared by the proxy's models and the estimator's error table."""
        if getattr(self, "_range_fits", None) is None:
            self._range_fits = RangeFits()
        return self._range_fits

    def proxy(self, config: CompressionConfig) -> Proxy:
        evict_big_sessions()  # a big model: its rewrite's copies never stack on a session
        config = self._targeted(config)
        if config.target == "storage" or self.bg.weight_bytes > FAST_PROXY_WEIGHT_BYTES:
            if getattr(self, "_fake_quant", None) is None:
                self._fake_quant = FakeQuantModels(self.bg, fits=self.range_fits)
            return self.proxy_of(self._fake_quant.model(config))
        return self.proxy_of(apply_config(self.bg, config))

    def proxy_of(self, model: onnx.ModelProto) -> Proxy:
        """The proxy figures of an already rewritten model on the proxy batch."""
        return Proxy(*self.objective.proxy(predict_outputs(model, self.proxy_inputs), self.proxy_ref))

    def score(self, outputs: np.ndarray | list[np.ndarray], ds: Dataset) -> float:
        """The objective of `outputs` (one array, or one per graph output) on `ds`'s rows."""
        return self.objective.score(outputs, self.reference(ds), ds.y)

    def score_model(self, model: onnx.ModelProto, ds: Dataset) -> float:
        """`model`'s objective on `ds` through ORT."""
        return self.score(predict_outputs(model, ds), ds)

    def reference(self, ds: Dataset) -> list[np.ndarray]:
        """The fp32 model's outputs on `ds` (computed once per split)."""
        if id(ds) not in self._refs:
            self._refs[id(ds)] = (ds, predict_outputs(self.bg.model, ds))
        return self._refs[id(ds)][1]

    def measure(self, config: CompressionConfig, keep=None, finetune_seconds: float | None = None) -> Measurement:
        """Apply `config` for real and score it on the validation split.

        finetune_seconds overrides the context's clock for this call (ignored under `finetune_epochs`).
        """
        start = time.perf_counter()
        config = self._targeted(config)
        evict_big_sessions()  # a big model: its rewrite's copies never stack on a session
        pruned = apply_pruning(self.bg, config, keep)
        seconds = self.finetune_seconds if finetune_seconds is None else finetune_seconds
        tuned, finetuned = self._finetune(pruned, config, seconds)
        calib = self.calib_batches if config.target in ("ort-cpu", "qdq") else None
        model = apply_quantization(self.bg, tuned, config, calib, clip=not finetuned)  # a fine-tune starts clipped
        score = self.score_model(model, self.splits.val)
        self.evaluations += 1
        return Measurement(config, score, self.cost(config), model, finetuned, time.perf_counter() - start)

    def measure_batch(self, configs: list[CompressionConfig], done: Callable[[int], None] | None = None,
                      finetune_seconds: float | None = None, keeps: list | None = None) -> list[Measurement | None]:
        """`measure` of each config, on the executor, in candidate order; None where its worker died
        every attempt (recorded in `evaluation_log` with the reason). `done(n)` after each finished
        evaluation, n counting the batch's finished ones. The first fine-tune of a run settles the
        learning rate the later ones start from, so while none has, the first candidate runs alone
        first: every executor then gives the answer the in-process loop gives. keeps: per config, the
        channels each pruned group keeps (`measure`'s keep), or None."""
        start = time.perf_counter()
        configs = [self._targeted(c) for c in configs]
        done = _counting(done)
        out: list[Measurement | None] = []
        seconds = self.finetune_seconds if finetune_seconds is None else finetune_seconds
        tunes = self.finetune_epochs != 0 if self.finetune_epochs is not None else seconds > 0
        first = 1 if tunes and self.finetune_lr is None and self.bridge_error is None else 0
        keeps = list(keeps) if keeps is not None else [None] * len(configs)
        for lo, hi in ((0, first), (first, len(configs))):
            part = configs[lo:hi]
            if not part:
                continue
            tasks = [EvaluationTask(c, self.finetune_lr, self.bridge_error, finetune_seconds, k)
                     for c, k in zip(part, keeps[lo:hi])]
            for config, result in zip(part, self.executor.run(self, tasks, done)):
                out.append(self._adopt(config, result))
        self.batch_log.append({"size": len(configs), "seconds": time.perf_counter() - start})
        return out

    def measure_jobs(self, jobs: list[Callable[["SearchContext"], Measurement]],
                     done: Callable[[int], None] | None = None) -> list[Measurement | None]:
        """A method's own real evaluations, batched on the executor like `measure_batch`: each job is
        a picklable callable that judges one candidate on a context (the worker's copy of this one)
        and returns its Measurement (two-stage's masked fine-tunes). In candidate order, None where
        the worker died every attempt; logged like measure_batch's, not counted in `evaluations`
        (the method counts what it calls an evaluation)."""
        start = time.perf_counter()
        tasks = [EvaluationTask(None, self.finetune_lr, self.bridge_error, job=job) for job in jobs]
        results = self.executor.run(self, tasks, _counting(done))
        out = [self._adopt(None, result, counted=False) for result in results]
        self.batch_log.append({"size": len(jobs), "seconds": time.perf_counter() - start})
        return out

    def _adopt(self, config: CompressionConfig | None, result, counted: bool = True) -> Measurement | None:
        """One executor result into the driver: its fine-tuning state, the count, the log."""
        index = len(self.evaluation_log)
        if isinstance(result, FailedEvaluation):
            self.evaluation_log.append({"index": index, "status": "failed", "attempts": result.attempts,
                                        "reason": result.reason})
            log.warning("evaluation %d failed after %d attempts: %s", index, result.attempts, result.reason)
            return None
        outcome, placement = result
        if self.finetune_lr is None:
            self.finetune_lr = outcome.finetune_lr
        if self.bridge_error is None and outcome.bridge_error is not None:
            self.bridge_error = outcome.bridge_error
            log.warning("fine-tuning disabled: %s", outcome.bridge_error)
        if counted and not isinstance(self.executor, InProcess):
            self.evaluations += 1  # in-process, measure counted it
        m = outcome.measurement
        m.placement = placement
        self.evaluation_log.append({"index": index, "status": "retried" if placement.retried else "ok",
                                    "attempts": placement.attempts, "worker": placement.worker,
                                    "node": placement.node, "wall_seconds": placement.wall_seconds,
                                    "queue_seconds": placement.queue_seconds, "score": m.score})
        return m

    def test_score(self, model: onnx.ModelProto) -> float:
        """Score on the held-out test split (the final report only)."""
        return self.score_model(model, self.splits.test)

    @property
    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """One sample's dims per input, from the data: what fills a symbolic dim when timing the model."""
        return self.splits.val.sample_shapes

    # --- helpers -----------------------------------------------------------------------
    def _targeted(self, config: CompressionConfig) -> CompressionConfig:
        if config.target == self.target:
            return config
        return CompressionConfig(dict(config.kernels), target=self.target,
                                 channel_multiple=config.channel_multiple)

    def finetune_val(self) -> Dataset:
        """The validation rows the fine-tune reads: FINETUNE_VAL_SAMPLES of them drawn by the seed (a split
        keeps the data's order, which may be by class)."""
        val = self.splits.val
        if len(val) <= FINETUNE_VAL_SAMPLES:
            return val
        rows = np.sort(np.random.default_rng([self.seed, 256]).choice(len(val), FINETUNE_VAL_SAMPLES, replace=False))
        return val.subset(rows, f"{val.name} (fine-tune's {FINETUNE_VAL_SAMPLES})")

    def _finetune(self, pruned: onnx.ModelProto, config: CompressionConfig, seconds: float):
        epochs = self.finetune_epochs
        if self.bridge_error is not None or (seconds <= 0 if epochs is None else epochs == 0):
            return pruned, False
        budget = {"time_budget_s": seconds} if epochs is None else {"max_epochs": epochs, "time_budget_s": math.inf}
        try:  # torch, imported on the first fine-tune (a search without data or fine-tuning never pays it)
            from hirelc_onnx.bridge import finetune
        except ImportError as exc:  # torch missing: search without recovery, visibly
            self.bridge_error = f"fine-tuning unavailable: {exc}"
            log.warning(self.bridge_error)
            return pruned, False
        specs = {k.weight: spec for k in self.bg.kernels.values()
                 if (spec := weight_spec(k, config.get(k.name))) is not None}
        try:
            # candidates of one model share a learning rate: later fine-tunes train at the rate the
            # first one's probe settled on, without probing again (a probe try costs about an epoch on
            # EfficientNet-Lite0: 28 s of a 64 s evaluation); a later candidate that diverges at it is
            # caught by the engine's epoch backoff, and its best epoch (epoch 0 at worst) is kept
            lr = {} if self.finetune_lr is None else {"lr": self.finetune_lr, "lr_probe_steps": 0}
            # from the range-clipped weights: it trains against the grids that are emitted (apply.clip_ranges)
            result = finetune(clip_ranges(self.bg, config, pruned), specs, self.splits.finetune, self.finetune_val(),
                              teacher=self.bg.model, seed=self.seed, kinds=self.objective.kinds, **budget, **lr)
        except UserError as exc:
            self.bridge_error = str(exc)
            log.warning("fine-tuning disabled: %s", exc)
            return pruned, False
        if self.finetune_lr is None:
            self.finetune_lr = result.lr
        return result.model, True



def _counting(done: Callable[[int], None] | None) -> Callable[[int], None]:
    """An executor's per-evaluation callback (its batch index) as `done(n)`, n finished so far."""
    finished = [0]

    def one_done(_: int) -> None:
        finished[0] += 1
        if done:
            done(finished[0])

    return one_done


def _split_strides(splits: Splits) -> dict:
    """Each split's input arrays' strides. A size-1 dim may carry any stride (a reshape leaves one),
    pickling resets it, and torch picks its conv kernels by strides: a worker's copy would fine-tune
    to other float sums than the driver unless they are put back (`_restore_strides`)."""
    return {(part, name): a.strides for part in ("calib", "finetune", "val", "test")
            for name, a in getattr(splits, part).inputs.items()}


def _restore_strides(splits: Splits, strides: dict) -> Splits:
    """`splits` with the strides `_split_strides` recorded (same memory, same values)."""
    def put(part: str) -> Dataset:
        ds = getattr(splits, part)
        inputs = {name: np.lib.stride_tricks.as_strided(a, a.shape, strides.get((part, name), a.strides))
                  if a.flags.c_contiguous else a for name, a in ds.inputs.items()}
        return replace(ds, inputs=inputs)

    return Splits(*(put(part) for part in ("calib", "finetune", "val", "test")))
