"""ONNX Runtime sessions built as a user deploys them: predictions, accuracy, latency, size, memory.

Accuracy is always measured through the optimised session (ORT_ENABLE_ALL by default), because
ORT's fusions change numerics (e.g. saturating U8S8 QLinearConv on AVX2 without VNNI).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnxruntime as ort

from hirelc_onnx.errors import DataError, ModelLoadError, UserError, option
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.loaders import InputSpec, check_fits
from hirelc_onnx.evaluate.metrics import fidelity, plugin_metric, top1_accuracy
from hirelc_onnx.evaluate.folding import write_folded
from hirelc_onnx.graph.external_data import decoded_nbytes, light_copy, serialized_nbytes
from hirelc_onnx.evaluate.output_kinds import classify, fidelity_of
from hirelc_onnx.graph.loader import all_tensors, check_file_external_locations, load_model
from hirelc_onnx.memory import bound_heap, release_freed_memory

__all__ = [
    "ModelLike",
    "SessionConfig",
    "OrtRunner",
    "load_onnx",
    "get_runner",
    "default_session_config",
    "TASK_CPUS_ENV",
    "TIMING_BUDGET_ENV",
    "timing_config",
    "timing_budget_s",
    "ratio_stats",
    "clear_cache",
    "predict",
    "predict_outputs",
    "evaluate",
    "benchmark_latency",
    "benchmark_side_by_side",
    "model_file_size",
    "measure_peak_memory",
    "fit_together",
    "evict_big_sessions",
]

log = logging.getLogger(__name__)

ModelLike = Union[str, os.PathLike, onnx.ModelProto]
Inputs = Union[np.ndarray, Mapping[str, np.ndarray], Dataset]
"""What prediction takes: one array (a single-input model), one array per input name, or a Dataset."""

_OPT_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
_CACHE_SIZE = 8
# sessions cached together hold at most this many decoded weight bytes (a big model's fp32 session
# and its compressed one each hold every weight as float32): beyond it the oldest is dropped first
_CACHE_BYTES = 512 << 20
# a ModelProto this big (serialized, or its weights as float32) is handed to ORT as a file with
# external data and its decodes folded (ORT maps it) rather than as serialized bytes (which ORT
# parses into two more copies, then folds into two more)
# (always beyond PROTOBUF_LIMIT, which no bytes object can pass). Below it, bytes: a 90 MB MiniLM
# builds its session in 0.5 s from bytes and 2.3 s through the file, and a search builds hundreds
FILE_SESSION_BYTES = 256 << 20
_cache: OrderedDict[tuple, "OrtRunner"] = OrderedDict()


@dataclass(frozen=True)
class SessionConfig:
    """The deployment settings a session is built with; part of the session cache key."""

    graph_optimization_level: str = "all"
    """ORT graph optimisation: disabled, basic, extended or all (ORT_ENABLE_ALL, ORT's default)."""
    intra_op_threads: int = 0
    """Threads per operator; 0 lets ORT choose (one per physical core)."""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """Execution providers in priority order."""
    allow_spinning: bool | None = None
    """Whether idle intra-op workers spin waiting for work; None leaves ORT's default (they spin)."""
    stop_spinning_after_run: bool = False
    """Workers stop spinning when a run returns (ORT's session.force_spinning_stop): a session timed
    right after another's is not slowed by the other's spinning workers (`timing_config`)."""

    def session_options(self) -> ort.SessionOptions:
        if self.graph_optimization_level not in _OPT_LEVELS:
            levels = ", ".join(_OPT_LEVELS)
            raise UserError(f"graph optimization level must be one of {levels}, got {self.graph_optimization_level!r}")
        if self.intra_op_threads < 0:
            raise UserError(f"intra-op threads must be >= 0, got {self.intra_op_threads}")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise UserError(f"execution provider(s) {', '.join(missing)} not in this onnxruntime build ({', '.join(available)})")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization_level])
        so.intra_op_num_threads = self.intra_op_threads
        so.log_severity_level = 3  # errors only: ORT's optimiser warnings are noise to a user
        if self.allow_spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.stop_spinning_after_run:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        return so


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, raising ModelLoadError that says what is wrong (missing, not ONNX, truncated)."""
    return load_model(path, load_external_data=load_external_data, check=False)


class OrtRunner:
    """One ORT session plus what callers need to feed it: input name, shape, dtype, classes."""

    def __init__(self, model: ModelLike, config: SessionConfig | None = None, cost: int | None = None,
                 serialized: bytes | None = None):
        """serialized: `in_memory_bytes(model)` when the caller has it already (get_runner hashes it)."""
        self.config = config or SessionConfig()
        so = self.config.session_options()
        providers = list(self.config.providers)
        scratch = None
        if isinstance(model, onnx.ModelProto):
            self.label = model.graph.name or "<in-memory model>"
            source: Any = serialized if serialized is not None else in_memory_bytes(model)
            if source is None:
                scratch = tempfile.TemporaryDirectory(prefix="hirelc-session-")
                source = str(write_folded(model, scratch.name))
        else:
            self.label = str(model)
            path = Path(model)
            if not path.is_file():
                load_onnx(path)  # raises the precise reason
            check_file_external_locations(path)  # ORT reads external data itself: refuse escapes first
            source = str(path)
        try:
            self.session = ort.InferenceSession(source, sess_options=so, providers=providers)
        except Exception as exc:  # ORT's pybind errors share no base class below Exception
            if not isinstance(model, onnx.ModelProto):
                load_onnx(model, load_external_data=False)  # a file problem gets its precise message
            raise ModelLoadError(f"ONNX Runtime cannot load {self.label}: {_one_line(exc)}") from exc
        finally:
            if scratch is not None:  # ORT has read or mapped the data: the scratch copy can go
                scratch.cleanup()
        self.cost = _session_cost(model) if cost is None else cost  # decoded weight bytes it holds
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        first = self.inputs[0]
        self.input_name: str = first.name
        self.input_shape: tuple = tuple(first.shape)
        self.input_dtype = np.dtype(_ORT_DTYPES.get(first.type, np.float32))
        self.input_specs: list[InputSpec] = [
            InputSpec(i.name, tuple(i.shape), np.dtype(_ORT_DTYPES.get(i.type, np.float32))) for i in self.inputs]
        self.output_name: str = self.outputs[0].name
        last = self.outputs[0].shape[-1] if self.outputs[0].shape else None
        class_scores = classify(self.outputs[0].shape) == "class-scores"  # else labels are not its class indices
        self.num_classes: int | None = last if isinstance(last, int) and last > 0 and class_scores else None

    @property
    def fixed_batch(self) -> int | None:
        """The model's batch size when its first input dim is a fixed number, else None."""
        d = self.input_shape[0] if self.input_shape else None
        return d if isinstance(d, int) and d > 0 else None

    def fit(self, ds: Dataset) -> Dataset:
        """The dataset checked against (and cast to) this model's inputs, keyed by their names; DataError if not."""
        return check_fits(ds, self.input_specs, None, self.num_classes)

    def feed_arrays(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """`inputs` keyed by this model's input names, in its order, dtypes untouched (ids stay integers).

        One array, or a mapping holding one array, feeds a single-input model whatever its key."""
        if isinstance(inputs, Dataset):
            inputs = inputs.inputs
        names = [i.name for i in self.inputs]
        if not isinstance(inputs, Mapping):
            if len(names) != 1:
                raise DataError(f"{self.label} has {len(names)} inputs ({', '.join(names)}); give one array per input")
            return {names[0]: np.asarray(inputs)}
        if len(names) == 1 and len(inputs) == 1:
            return {names[0]: np.asarray(next(iter(inputs.values())))}
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DataError(f"{self.label}: no array for input {missing[0]!r} (given: {', '.join(inputs)})")
        return {n: np.asarray(inputs[n]) for n in names}

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs for one feed; ORT failures become a one-line DataError."""
        try:
            return self.session.run(None, dict(feed))
        except Exception as exc:  # ORT's pybind errors share no base class below Exception
            raise DataError(f"ONNX Runtime failed running {self.label}: {_one_line(exc)}") from exc

    def predict(self, x: Inputs, batch_size: int = 64) -> np.ndarray:
        """First-output logits for every row of `x` (see feed_arrays); a fixed-batch model gets padded batches."""
        return self.predict_outputs(x, batch_size, [self.output_name])[0]

    def predict_outputs(self, x: Inputs, batch_size: int = 64, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Every output (or those `names`) for every row of `x`, one array per output."""
        names = [o.name for o in self.outputs] if names is None else list(names)
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        feed = self.feed_arrays(x)
        total = len(next(iter(feed.values())))
        if total == 0:
            raise DataError("no inputs to predict")
        fixed = self.fixed_batch
        bs = fixed or batch_size
        outs = []
        for i in range(0, total, bs):
            batch = {k: v[i : i + bs] for k, v in feed.items()}
            n = len(next(iter(batch.values())))
            if fixed and n < fixed:
                batch = {k: np.concatenate([v, np.repeat(v[-1:], fixed - n, axis=0)]) for k, v in batch.items()}
            try:
                out = self.session.run(names, batch)
            except Exception as exc:  # ORT's pybind errors share no base class below Exception
                raise DataError(f"ONNX Runtime failed running {self.label} on rows {i}..{i + n - 1}: {_one_line(exc)}") from exc
            outs.append([o[:n] for o in out])
        return [np.concatenate(parts) for parts in zip(*outs)]

    def feed_shapes(self, batch_size: int, input_shapes: Mapping[str, Sequence[int]] | None = None,
                    sample_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
        """Concrete shapes for every input: batch dims filled, other symbolic dims from `input_shapes`
        (full shapes, used as given) or `sample_shapes` (one sample's dims, e.g. the data's)."""
        input_shapes = input_shapes or {}
        sample_shapes = sample_shapes or {}
        unknown = sorted(set(input_shapes) - {i.name for i in self.inputs})
        if unknown:
            names = ", ".join(i.name for i in self.inputs)
            raise UserError(f"{self.label} has no input(s) {', '.join(unknown)}; inputs: {names}")
        shapes = {}
        for inp in self.inputs:
            if inp.name in input_shapes:
                shapes[inp.name] = tuple(int(d) for d in input_shapes[inp.name])
                continue
            sample = sample_shapes.get(inp.name)
            if sample is not None and len(sample) == len(inp.shape) - 1:
                first = inp.shape[0] if inp.shape else None
                if isinstance(first, int) and first > 0 and first != batch_size:
                    raise DataError(
                        f"{self.label} has a fixed batch size of {first} (input {inp.name!r}); measure it at batch size {first}"
                    )
                shapes[inp.name] = (batch_size,) + tuple(int(d) for d in sample)
                continue
            dims = []
            for axis, d in enumerate(inp.shape):
                fixed = isinstance(d, int) and d > 0
                if axis == 0 and not fixed:
                    dims.append(batch_size)
                elif axis == 0 and d != batch_size:
                    raise DataError(
                        f"{self.label} has a fixed batch size of {d} (input {inp.name!r}); measure it at batch size {d}"
                    )
                elif fixed:
                    dims.append(d)
                else:
                    raise DataError(
                        f"{self.label}: input {inp.name!r} has symbolic dim {d!r} at axis {axis}; "
                        f"give its full shape ({option('input_shape')} {inp.name}=1x...)"
                    )
            shapes[inp.name] = tuple(dims)
        return shapes

    def random_feed(
        self, batch_size: int, input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
        sample_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Standard-normal floats (zeros for integer inputs, which are often indices) of the feed shapes."""
        rng = np.random.default_rng(seed)
        shapes = self.feed_shapes(batch_size, input_shapes, sample_shapes)
        feed = {}
        for inp in self.inputs:
            shape = shapes[inp.name]
            elements = int(np.prod(shape, dtype=object))
            if elements > _MAX_FEED_ELEMENTS:
                raise UserError(f"{self.label}: input {inp.name!r} of shape {tuple(shape)} has {elements:.3g} elements "
                                f"per batch, too many to feed (the limit is {_MAX_FEED_ELEMENTS:.3g}); are its dims right?")
            dtype = np.dtype(_ORT_DTYPES.get(inp.type, np.float32))
            feed[inp.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        return feed


# a random feed larger than this (4 GiB of float32) means dims no real input has: refuse, don't allocate
_MAX_FEED_ELEMENTS = 1 << 30


def in_memory_bytes(model: onnx.ModelProto) -> bytes | None:
    """The serialized model when a session reads it from memory; None for a big one, which a session
    reads from a scratch file its weight decodes are folded into (`folding.write_folded`)."""
    if decoded_nbytes(model) > FILE_SESSION_BYTES or serialized_nbytes(model) > FILE_SESSION_BYTES:
        return None
    return model.SerializeToString()


def _digest(model: onnx.ModelProto) -> str:
    """sha256 of the model's structure and of each initializer in turn (no whole-model bytes object,
    which a model over 2 GiB cannot even have)."""
    h = hashlib.sha256(light_copy(model).SerializeToString())
    for t in model.graph.initializer:
        h.update(t.SerializeToString())
    return h.hexdigest()


def _session_cost(model: ModelLike) -> int:
    """Decoded weight bytes a session of `model` holds (`decoded_nbytes`); 0 for a file onnx cannot parse."""
    if isinstance(model, onnx.ModelProto):
        return decoded_nbytes(model)
    try:
        return decoded_nbytes(onnx.load(str(model), load_external_data=False))
    except Exception:  # an ORT-format file or garbage: its own loader reports it
        return 0


def fit_together(models: Sequence[ModelLike]) -> bool:
    """Whether sessions of all `models` fit the session cache's byte budget at once."""
    return sum(_session_cost(m) for m in models) <= _CACHE_BYTES


def _cache_key(model: ModelLike, config: SessionConfig, serialized: bytes | None = None) -> tuple:
    if isinstance(model, onnx.ModelProto):  # the bytes a session will read, hashed once (a MiniLM search: 120 models)
        return ("bytes", hashlib.sha256(serialized).hexdigest() if serialized is not None else _digest(model), config)
    p = Path(model).resolve()
    try:
        st = p.stat()
    except OSError:
        return ("path", str(p), None, None, config)
    return ("path", str(p), st.st_mtime_ns, st.st_size, config)


TASK_CPUS_ENV = "HIRELC_TASK_CPUS"
"""Set in a scaled-out search's worker (search/executors.py) to the CPUs its task was given."""


def default_session_config() -> SessionConfig:
    """The settings a session gets when the caller names none: ORT's own thread count, or in a worker
    of a scaled-out search the CPUs its task was given (N workers on N cores, not N x N threads).
    The bytes do not move with it: MLAS splits an operator's outputs over threads, never one sum
    (tests/search/test_executors.py checks every reference model at 1, 2 and 4 threads)."""
    return SessionConfig(intra_op_threads=int(os.environ.get(TASK_CPUS_ENV) or 0))


def get_runner(model: ModelLike, config: SessionConfig | None = None) -> OrtRunner:
    """A cached runner per (model file state or model bytes, settings): sessions are slow to build."""
    config = config or default_session_config()
    serialized = in_memory_bytes(model) if isinstance(model, onnx.ModelProto) else None
    key = _cache_key(model, config, serialized)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    bound_heap()
    cost = _session_cost(model)
    evicted = freed = 0
    while _cache and (len(_cache) >= _CACHE_SIZE or sum(r.cost for r in _cache.values()) + cost > _CACHE_BYTES):
        freed += _cache.popitem(last=False)[1].cost  # dropped before the new session is built, so both never coexist
        evicted = True
    if evicted or cost > FILE_SESSION_BYTES:  # and a big rewrite's garbage is gone before a big session
        # the full collection only around big models: a search evicts a small session per candidate
        release_freed_memory(collect=max(freed, cost) > FILE_SESSION_BYTES)
    runner = OrtRunner(model, config, cost, serialized)
    del serialized  # ORT holds its own copy
    _cache[key] = runner
    if cost > FILE_SESSION_BYTES:
        release_freed_memory()  # ORT's load-time copies (constant folding, prepacking) are freed by now
    return runner


def evict_big_sessions() -> None:
    """Drop cached sessions of big models (weights over FILE_SESSION_BYTES as float32).

    Called before rewriting a big model: the rewrite's copies would otherwise stack on a session
    the next big one evicts anyway (the session cache holds one big model at a time).
    """
    big = [key for key, r in _cache.items() if r.cost > FILE_SESSION_BYTES]
    for key in big:
        del _cache[key]
    if big:
        release_freed_memory()


def clear_cache() -> None:
    """Drop cached sessions (frees their memory)."""
    _cache.clear()
    release_freed_memory()


def predict(model: ModelLike, x: Inputs, batch_size: int = 64, config: SessionConfig | None = None) -> np.ndarray:
    """Logits (first output) of `model` on `x` (one array, one per input name, or a Dataset), batch by batch."""
    return get_runner(model, config).predict(x, batch_size)


def predict_outputs(model: ModelLike, x: Inputs, batch_size: int = 64,
                    config: SessionConfig | None = None) -> list[np.ndarray]:
    """Every output of `model` on `x`, one array per graph output, batch by batch."""
    return get_runner(model, config).predict_outputs(x, batch_size)


def evaluate(
    model: ModelLike,
    dataset: Dataset,
    batch_size: int = 64,
    reference: ModelLike | np.ndarray | None = None,
    metrics: Sequence[str] = (),
    config: SessionConfig | None = None,
) -> dict[str, float]:
    """Measure `model` on `dataset`: n, accuracy when labelled, fidelity when a reference is given.

    reference: the fp32 model, or its logits already computed on `dataset` (cache them in a search).
    metrics: plugin specs `package.module:func(logits, labels_or_ref)`, called with the labels
        when the data has them, else with the reference logits; results keyed by spec.
    """
    runner = get_runner(model, config)
    ds = runner.fit(dataset)
    logits = runner.predict(ds, batch_size)
    out: dict[str, float] = {"n": len(ds)}
    kind_ok = classify(None, logits) == "class-scores"  # labels of other outputs are for --metric only
    classes = ds.classes if kind_ok else None
    if classes is not None:
        out["accuracy"] = top1_accuracy(logits, classes)
    ref_logits = None
    if reference is not None:
        if isinstance(reference, np.ndarray):
            ref_logits = reference
        else:
            ref_runner = get_runner(reference, config)
            ref_logits = ref_runner.predict(ref_runner.fit(dataset), batch_size)
        kind = classify(None, ref_logits)  # per-position scores and maps are compared as their kind is
        out.update(fidelity(logits, ref_logits) if kind == "class-scores" else fidelity_of(logits, ref_logits, kind))
        if classes is not None:
            out["reference_accuracy"] = top1_accuracy(ref_logits, classes)
    for spec in metrics:
        target = ds.y if ds.y is not None else ref_logits
        if target is None:
            raise UserError(f"metric {spec!r} needs labelled data or a reference model")
        out[spec] = plugin_metric(spec, logits, target)
    return out


TIMING_BUDGET_ENV = "HIRELC_TIMING_BUDGET_S"
"""Seconds `benchmark_side_by_side` times for, per call (one batch size), when the caller gives no budget."""
DEFAULT_BUDGET_S = 3.0
"""The budget without the variable, per call (a batch size): the A/A ratios it gives are in bench/timer_aa.md."""
SLOT_RUNS = 2
"""Timed runs of one model in a row within a round, after one untimed run (its caches warm again)."""
MIN_ROUNDS = 5
"""Rounds every timing has, whatever its budget: the spread needs a few ratios."""


def available_cpus() -> int:
    """The CPUs this process is given: its task's (`TASK_CPUS_ENV`), else its affinity mask."""
    given = int(os.environ.get(TASK_CPUS_ENV) or 0)
    if given > 0:
        return given
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        return os.cpu_count() or 1


def timing_config(config: SessionConfig | None = None) -> SessionConfig:
    """The settings every model of a side-by-side timing gets, alike: `config` (default:
    `default_session_config()`) with its intra-op threads fixed to the CPUs given when it leaves the
    choice to ORT, workers spinning during a run as deployed, and stopping when it returns (else a
    session's workers spin on for about 40 ms after a run, competing with the next session's)."""
    base = config or default_session_config()
    return replace(base, intra_op_threads=base.intra_op_threads or available_cpus(), allow_spinning=True,
                   stop_spinning_after_run=True)


def timing_budget_s() -> float:
    """`TIMING_BUDGET_ENV` when set (a number of seconds >= 0), else DEFAULT_BUDGET_S."""
    value = os.environ.get(TIMING_BUDGET_ENV)
    if not value:
        return DEFAULT_BUDGET_S
    try:
        budget = float(value)
    except ValueError:
        budget = -1.0
    if not budget >= 0:
        raise UserError(f"{TIMING_BUDGET_ENV} must be a number of seconds >= 0, got {value!r}")
    return budget


def _latency_stats(times_s: Sequence[float], batch_size: int) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    median = float(np.median(ms))
    return {
        "batch_size": batch_size,
        "runs": len(ms),
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "throughput_per_s": batch_size * 1e3 / median if median > 0 else float("inf"),
    }


def ratio_stats(ratios: Sequence[float]) -> dict[str, Any]:
    """The median of per-round ratios and their interquartile range, taken on a log scale so that
    the figures of 1 / ratio are exactly the reciprocals (an even count's median is the geometric
    mean of the middle two)."""
    logs = np.log(np.asarray(ratios, dtype=float))
    q1, median, q3 = np.exp(np.percentile(logs, [25, 50, 75]))
    return {"speedup": float(median), "speedup_iqr": [float(q1), float(q3)]}


def benchmark_side_by_side(
    models: Sequence[ModelLike],
    batch_size: int = 1,
    warmup: int = 5,
    runs: int = 30,
    config: SessionConfig | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    sample_shapes: Mapping[str, Sequence[int]] | None = None,
    budget_s: float | None = None,
) -> list[dict[str, Any]]:
    """Latency of several models timed in alternating rounds, and each one's speed against the first.

    A round runs the models in order and back (A B B A), each `SLOT_RUNS` timed runs after one
    untimed run, so a load that drifts during the round hits every model alike; the round gives each
    model its fastest run (other processes on the machine only ever slow a run: the fastest of a few
    is the least disturbed), and every model after the first the ratio first / it. Its
    "speedup" is the median of those per-round ratios (not the ratio of medians: the rounds pair
    runs made moments apart), "speedup_iqr" their interquartile range (a spread that includes 1.0
    says the difference is within the noise). Every model gets the same settings (`timing_config`:
    threads fixed, workers' spinning stopped after each run, else it slowed the next model's run
    1.7-2x on 2 cores) and `warmup` untimed runs first; sessions and inputs are made once. Rounds go
    on until the first model has `runs` timed runs, `MIN_ROUNDS` rounds are done and `budget_s`
    seconds have passed (default: `timing_budget_s()`). Each result: the `_latency_stats` of all
    its timed runs and "rounds".

    input_shapes: full shapes of inputs with symbolic dims; sample_shapes: one sample's dims per
    input (the data's), the batch axis filled with `batch_size`."""
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise UserError(f"need runs >= 1, warmup >= 0 and batch size >= 1 (got {runs}, {warmup}, {batch_size})")
    budget = timing_budget_s() if budget_s is None else budget_s
    if not budget >= 0:
        raise UserError(f"the timing budget must be >= 0 seconds, got {budget_s}")
    config = timing_config(config)
    runners = [get_runner(m, config) for m in models]
    feeds = [r.random_feed(batch_size, input_shapes, sample_shapes=sample_shapes) for r in runners]
    for r, f in zip(runners, feeds):
        for _ in range(max(1, warmup)):
            r.run(f)  # the first run checks the feed and surfaces errors in one line
    calls = [(r.session.run, f) for r, f in zip(runners, feeds)]
    order = list(range(len(calls))) + list(range(len(calls)))[::-1]
    times: list[list[float]] = [[] for _ in calls]
    rounds: list[list[float]] = []  # per round, each model's fastest run
    clock = time.perf_counter
    start = clock()
    while len(rounds) < MIN_ROUNDS or len(times[0]) < runs or clock() - start < budget:
        this_round: list[list[float]] = [[] for _ in calls]
        for i in order:
            run, feed = calls[i]
            run(None, feed)
            for _ in range(SLOT_RUNS):
                t0 = clock()
                run(None, feed)
                this_round[i].append(clock() - t0)
        for i, t in enumerate(this_round):
            times[i].extend(t)
        rounds.append([min(t) for t in this_round])  # other processes only ever slow a run
    out: list[dict[str, Any]] = []
    for i, t in enumerate(times):
        stats: dict[str, Any] = {**_latency_stats(t, batch_size), "rounds": len(rounds)}
        if i > 0:
            stats.update(ratio_stats([r[0] / max(r[i], 1e-12) for r in rounds]))
        out.append(stats)
    return out


def benchmark_latency(
    model: ModelLike,
    batch_size: int = 1,
    warmup: int = 5,
    runs: int = 30,
    config: SessionConfig | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """median_ms, p90_ms, mean_ms, min_ms, throughput_per_s on a random input of the model's shape."""
    return benchmark_side_by_side([model], batch_size, warmup, runs, config, input_shapes, budget_s=budget_s)[0]


def model_file_size(model: ModelLike) -> int:
    """Bytes on disk: the .onnx file plus its external-data files; a ModelProto's serialized size."""
    if isinstance(model, onnx.ModelProto):
        return serialized_nbytes(model)
    p = Path(model)
    proto = load_onnx(p, load_external_data=False)
    locations = {
        e.value
        for t in all_tensors(proto.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    extra = sum((p.parent / loc).stat().st_size for loc in locations if (p.parent / loc).is_file())
    return p.stat().st_size + extra


_MEMORY_SCRIPT = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort
spec = json.loads(sys.argv[1])
def rss():
    # the high-water mark of this process's own memory map: /proc's VmHWM starts afresh at exec,
    # while ru_maxrss carries over the parent's peak through fork and exec (every figure +0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 2**20
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
base = rss()
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["level"])
so.intra_op_num_threads = spec["threads"]
so.log_severity_level = 3
sess = ort.InferenceSession(spec["path"], so, providers=spec["providers"])
loaded = rss()
rng = np.random.default_rng(0)
feed = {}
for name, (shape, dtype) in spec["feed"].items():
    dt = np.dtype(dtype)
    feed[name] = rng.standard_normal(shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dt)
for _ in range(3):
    sess.run(None, feed)
print(json.dumps({"baseline_rss_mb": base, "after_load_rss_mb": loaded, "peak_rss_mb": rss()}))
"""


def measure_peak_memory(
    model: ModelLike,
    batch_size: int = 1,
    config: SessionConfig | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, float]:
    """Peak resident memory of loading and running the model, measured in a fresh subprocess.

    Returns peak_rss_mb (the subprocess's peak RSS, MiB), baseline_rss_mb (after importing numpy
    and onnxruntime), after_load_rss_mb (after building the session), delta_mb = peak - baseline
    and the same in bytes, delta_bytes: weights, ORT's arena and activations for one batch.
    The subprocess is started afresh (exec) and reads its own high-water mark (/proc/self/status
    VmHWM on Linux; ru_maxrss elsewhere), so the parent's memory never counts.
    """
    config = config or SessionConfig()
    runner = get_runner(model, config)
    feed = {
        inp.name: (list(shape), np.dtype(_ORT_DTYPES.get(inp.type, np.float32)).str)
        for inp, shape in zip(runner.inputs, runner.feed_shapes(batch_size, input_shapes).values())
    }
    with tempfile.TemporaryDirectory(prefix="hirelc-mem-") as tmp:
        if isinstance(model, onnx.ModelProto):
            path = str(Path(tmp) / "model.onnx")
            onnx.save(model, path)
        else:
            path = str(Path(model).resolve())
        spec = {
            "path": path,
            "level": _OPT_LEVELS[config.graph_optimization_level],
            "threads": config.intra_op_threads,
            "providers": list(config.providers),
            "feed": feed,
        }
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(spec)], capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise UserError(f"memory measurement of {runner.label} took over {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise UserError(f"memory measurement of {runner.label} failed: {tail[0]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["delta_mb"] = out["peak_rss_mb"] - out["baseline_rss_mb"]
    out["delta_bytes"] = int(round(out["delta_mb"] * 2**20))
    log.debug("memory of %s at batch %d: %s (config %s)", runner.label, batch_size, out, asdict(config))
    return out
