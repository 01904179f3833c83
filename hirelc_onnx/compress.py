"""`compress`: the main job, from an ONNX file to a smaller ONNX file with a report that is true of it.

Orchestration only: check every option first (the method and its options: search/methods.py), load
the model and the data, run the method, measure the emitted model (report/build.py) and write the
outputs (report/outputs.py), holding --out (lock.py) throughout. The input file is never modified.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import onnx

from hirelc_onnx.config import DEFAULT_WEIGHT_RANGE, TARGETS, WEIGHT_RANGES, CompressionConfig
from hirelc_onnx.errors import DataError, InvalidOptionError, UserError, current_interface, option
from hirelc_onnx.evaluate.data import DEFAULT_FRACTIONS, Dataset, check_fractions, split_counts, split_dataset
from hirelc_onnx.evaluate.loaders import ImageOptions, check_fits, dataset_from_python, graph_inputs, load_data
from hirelc_onnx.evaluate.objective import METRIC_MODES
from hirelc_onnx.evaluate.output_kinds import classify
from hirelc_onnx.evaluate.synthetic import synthesize
from hirelc_onnx.graph import BlockGraph, build_block_graph, load_model
from hirelc_onnx.graph.blockgraph import with_input_dims
from hirelc_onnx.lock import hold_out_dir
from hirelc_onnx.progress import ProgressFn, notify
from hirelc_onnx.report.build import build_report, goal_sentence
from hirelc_onnx.report.outputs import (STATE_FILE, check_out_dir, check_output_model, clear_run_files,
                                        write_model, write_outputs)
from hirelc_onnx.search import ort_speed
from hirelc_onnx.search.budget import check_reachable, parse_budget
from hirelc_onnx.search.speed import parse_speedup, speed_budget
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.executors import executor_closed, make_executor
from hirelc_onnx.search.methods import FINETUNE_OPTIONS, METHODS, PRUNING_OPTIONS, QUANT_OPTIONS, check_options, flag, get_method

__all__ = ["CompressResult", "compress", "DATA_OPTIONS", "DEFAULT_CHANNEL_MULTIPLE", "SPEED_CHANNEL_MULTIPLE",
           "default_channel_multiple", "DEFAULT_WEIGHT_RANGE"]

DEFAULT_CHANNEL_MULTIPLE = 8
"""Pruned channel counts are multiples of 8 unless --channel-multiple says otherwise: ORT's CPU kernels
run odd widths off their vectorised path (`specs.channel_unit`)."""

SPEED_CHANNEL_MULTIPLE = 16
"""The default multiple where the run is about speed (`--target ort-cpu`, `--speedup`): ORT's fp32
convolutions run in NCHWc blocks of 16 channels on AVX-512 (8 on AVX2, which 16 also fits) and pad a
count inside a block up to the block. Measured on ResNet-20 in ORT, 2-core AVX-512 Xeon, side by side:
every group cut to 3/4 with a multiple of 8 (16/24/48 channels, 0.72 of the MACs) ran 1.05x / 1.10x of
fp32 at batch 1 / 32, the same as with 16 (16/32/48, 0.87 of the MACs: 1.05x / 1.10x), and 64 -> 56
channels ran 0.99x / 1.00x: a cut inside a block costs accuracy and buys no time."""


def default_channel_multiple(target: str, speedup: float | None) -> int:
    """The multiple pruned counts are rounded to when the user gives none: SPEED_CHANNEL_MULTIPLE for a
    run judged by its latency, DEFAULT_CHANNEL_MULTIPLE for one judged by its bytes."""
    return SPEED_CHANNEL_MULTIPLE if target == "ort-cpu" or speedup is not None else DEFAULT_CHANNEL_MULTIPLE


_PYTHON_DATA = ", arrays, a dict of them, or batches"
DATA_OPTIONS = frozenset(f.name for f in fields(ImageOptions))
"""How image files become input (evaluate's --scale ... --layout): options of the data, not of a method."""


@dataclass
class CompressResult:
    """The emitted model, its config and the report (the same object the CLI prints)."""

    model: onnx.ModelProto = field(repr=False)
    config: CompressionConfig | None
    report: dict
    out_dir: Path | None = None

    @property
    def ratio(self) -> float:
        return self.report["size"]["ratio"]

    @property
    def test_score(self) -> float | None:
        return self.report["accuracy"].get("compressed") if self.report.get("accuracy") else None


def compress(model_path: str | os.PathLike, *, method: str = "hirelc", data: Any = None, target: str = "storage",
             seed: int = 0, out_dir: str | os.PathLike | None = None, latency_runs: int = 20,
             output_model: str | os.PathLike | None = None, overwrite: bool = False,
             started: Callable[[], None] | None = None,
             progress: ProgressFn | None = None,
             input_shape: Mapping[str, Sequence[int]] | None = None, output_kind: str | dict | None = None,
             metric: str | None = None, metric_mode: str = "max", workers: int = 1, ray: str | None = None,
             split_fractions: Sequence[float] | str | None = None, **options: Any) -> CompressResult:
    """Compress `model_path` and (with `out_dir`) write model.onnx, config.json, report.json, report.html.

    out_dir: a folder of this run's own; one holding another run's files (report/outputs.py
    RUN_FILES) is refused unless `overwrite` (those files are then removed first, nobody else's) or
    `resume` (continuing the run whose state it holds). output_model: a file path where the model
    alone is written as well (or instead, without out_dir), replacing what is there. started: called
    once every check has passed (model, data, options, folder), just before the method runs.


    data: a spec string or path (a .npz, an image folder, 'digits', a plugin package.module:func),
    a Dataset, an input array x, (x, y), a dict of input arrays keyed by input name (labels under
    'y'), or an iterable of batches of these; fitted to the graph's inputs (evaluate/loaders.py
    check_fits: a single-input model takes any one array, dtypes are cast). Without it the run is
    data-free: inputs are synthesised from the graph (evaluate/synthetic.py), the score is fidelity
    to the fp32 model, nothing is fine-tuned, and the report says task accuracy was not measured
    (methods marked needs_data refuse to run).
    latency_runs: timed runs per batch size for the report's latency rows and per-kernel profile (the
    fp32 and compressed models side by side); 0 skips both (report["latency"] is empty and
    report["per_node"] says so), for a pipeline that times the model itself or a bench that reads
    only sizes and scores.
    progress: `progress(phase, done, total)` (hirelc_onnx/progress.py), called by every method.
    split_fractions: the shares of the data (or of the synthesised inputs) that go to calibration,
    fine-tuning, validation (what the search picks its winner on) and the test split (what the report
    scores), default DEFAULT_FRACTIONS (0.1, 0.5, 0.15, 0.25); seeded by `seed`. A larger validation share
    makes the pick among close candidates less noisy.
    input_shape: full shapes (batch first) of inputs with symbolic dims, {name: (1, 3, 224, 224)}:
    they size the synthesised inputs and the latency rows (with data, its shapes do that).
    Image options (DATA_OPTIONS: resize, center_crop, scale, offset, mean, std, channels,
    channel_order, layout; see evaluate/loaders.py ImageOptions) apply to an image-folder --data,
    exactly as `evaluate` applies them; the report records them.
    output_kind: what the outputs hold, overriding their classification (evaluate/output_kinds.py):
      one kind for all ("embedding") or per output ("name=kind,..." or a dict).
    metric: a task metric `package.module:func(outputs, labels) -> float` the search optimises and
      the report gives on the test split (higher is better; metric_mode "min" for a loss); needs --data.
    workers / ray: where a method's batches of real evaluations run (search/executors.py): `workers`
      local processes (1: in this process), or tasks on the Ray cluster at `ray` ("auto" or
      HOST:PORT; needs the `ray` extra). The answer is the same on any of them.
    options: the chosen method's own, each taken by the methods in its row of search/methods.py
    METHODS (a value of None counts as not given; one the method would ignore is a UserError):
      budget: true-bytes ratio such as '6x' (None: the method's METHODS default_budget, if any, searched
      and reported with goal.budget_default); max_drop: largest
      accepted accuracy drop in points; time_limit: seconds for the search; evaluations: real
      (fine-tuned) evaluations; finetune_seconds: the fine-tuning clock of each (default 20);
      finetune_epochs: instead of the clock, exactly this many epochs (at most; patience may end
      sooner), so every candidate gets the same training and a run is repeatable, 0 disables it;
      resume: continue a killed search from the state in `out_dir`; bits / keep / qtype /
      granularity: uniform's choice (keep also l1-int8's); flops / params: graph-rl's limits; prior: its start;
      settings: a method's settings dataclass (HiReLCSettings, GraphRLSettings, TwoStageSettings);
      channel_multiple: every method that prunes rounds its kept channel counts to a multiple of it
      (default `default_channel_multiple`: 16 under ort-cpu or a speedup, else 8; 1: any count),
      recorded in the emitted config.
      weight_range: "mse" (default) clamps each quantized weight group to the part of its range its
      grid fits with the least squared error before fine-tuning and quantization (passes/clip_weights.py);
      "minmax" keeps every weight's full range; recorded in the emitted config.
    Checks that can fail (options, file, data, budget, target) run before any long work.
    """
    start = time.perf_counter()
    chosen = get_method(method)
    given = {name: value for name, value in options.items() if value is not None}
    options_given = set(given)
    image = {name: given.pop(name) for name in sorted(DATA_OPTIONS & set(given))}
    check_options(chosen, given)
    if image and data is None:
        raise InvalidOptionError(f"{flag(next(iter(image)))} sets how image files become input: give {option('data')} "
                                 "(an image folder)")
    if target not in TARGETS:
        raise InvalidOptionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if data is None and chosen.needs_data:
        free = ", ".join(m.name for m in METHODS.values() if not m.needs_data)
        raise InvalidOptionError(f"{option('method', method)} needs {option('data')} (a .npz, an image folder, "
                                 f"'digits', a plugin{_PYTHON_DATA if current_interface() == 'python' else ''}); "
                                 f"without data these run: {free}")
    if not _integer_at_least(latency_runs, 0):
        raise InvalidOptionError(f"{option('latency_runs')} must be an integer >= 0 (0: no latency rows), "
                                 f"got {latency_runs!r}")
    if metric_mode not in METRIC_MODES:
        raise InvalidOptionError(f"{option('metric_mode')} must be one of {', '.join(METRIC_MODES)}, "
                                 f"got {metric_mode!r}")
    if metric_mode != "max" and metric is None:
        raise InvalidOptionError(f"{option('metric_mode')} only matters with {option('metric')}: give "
                                 f"{option('metric')}, or drop it")
    if metric is not None and data is None:
        raise InvalidOptionError(f"{option('metric')} only matters with {option('data')} (it scores the model's "
                                 f"outputs against the data's labels): give {option('data')}, or drop it")
    scoring = {"output_kind": output_kind, "metric": metric, "metric_mode": metric_mode}
    try:
        fractions = DEFAULT_FRACTIONS if split_fractions is None else check_fractions(split_fractions)
    except ValueError as exc:
        raise InvalidOptionError(f"{option('split_fractions')}: {exc}") from None
    finetune = {name: given.pop(name) for name in sorted(FINETUNE_OPTIONS & set(given))}
    if finetune and data is None:
        raise InvalidOptionError(f"{flag(next(iter(finetune)))} only matters with {option('data')} (it sets how each "
                                 f"measured candidate is fine-tuned): give {option('data')}, or drop it")
    if finetune.get("finetune_epochs", 0) < 0:
        raise InvalidOptionError(f"{flag('finetune_epochs')} must be >= 0, got {finetune['finetune_epochs']}")
    ranges = given.pop("weight_range", DEFAULT_WEIGHT_RANGE)
    if ranges not in WEIGHT_RANGES:
        raise InvalidOptionError(f"{option('weight_range')} must be one of {', '.join(WEIGHT_RANGES)}, got {ranges!r}")
    multiple = given.pop("channel_multiple", None)
    if multiple is not None and not _integer_at_least(multiple, 1):
        raise InvalidOptionError(f"{option('channel_multiple')} must be an integer >= 1, got {multiple!r}")
    speedup = parse_speedup(given.pop("speedup", None))
    multiple = default_channel_multiple(target, speedup) if multiple is None else multiple
    speed_batch = given.pop("batch", None)
    if speed_batch is not None and speedup is None:
        raise InvalidOptionError(f"{option('batch')} sets the batch size {option('speedup')} is measured at: give {option('speedup')}, or drop it")
    if speed_batch is not None and (not isinstance(speed_batch, int) or speed_batch < 1):
        raise InvalidOptionError(f"{option('batch')} must be an integer >= 1, got {speed_batch!r}")
    if given.get("resume") and out_dir is None:
        raise InvalidOptionError(f"{option('resume')} needs {option('out_dir')} (the folder where the interrupted run "
                                 "kept its state)")
    if given.get("resume") and overwrite:
        raise InvalidOptionError(f"{option('resume')} continues the run in {option('out_dir')} and "
                                 f"{option('overwrite')} clears it: give one of them")
    if "budget" in given:
        given["budget"] = parse_budget(given["budget"])
    elif chosen.default_budget is not None:  # the method's own size goal, made explicit: searched and reported
        given["budget"] = chosen.default_budget
    if out_dir is not None:
        check_out_dir(Path(out_dir), Path(model_path), resume=bool(given.get("resume")), overwrite=overwrite)
    if output_model is not None:
        check_output_model(Path(output_model), Path(model_path))

    executor = make_executor(workers, ray)  # a Ray cluster is reached (or refused) before any long work
    with executor_closed(executor), hold_out_dir(out_dir) if out_dir is not None else nullcontext():
        notify(progress, "loading the model")
        original = load_model(model_path)
        _check_domains(original, model_path)
        bg = build_block_graph(original, inplace=True)  # the weights held once: `original` is given up
        del original
        if PRUNING_OPTIONS <= chosen.options:  # the one place pruned counts are rounded: specs.group_keep_counts
            bg = replace(bg, channel_multiple=multiple)
        if QUANT_OPTIONS <= chosen.options:  # the one place weight ranges are set: apply.clip_ranges
            bg = replace(bg, weight_range=ranges)
        if "budget" in options_given:  # a method's default is its own to reach (two-stage prunes weights too)
            check_reachable(bg, given["budget"], target)
        sample_shapes = _sample_shapes(bg, input_shape)
        notify(progress, "loading the data" if data is not None else "synthesising inputs (data-free)")
        if data is not None:
            ds = _load_data(data, bg, image, fractions)
            bg = with_input_dims(bg, ds.sample_shapes)  # MACs at the data's sequence length / image size
            ctx = SearchContext(bg, split_dataset(ds, seed, fractions), target, seed=seed, **finetune, **scoring)
        else:  # data-free: inputs from the graph, fidelity to fp32, no fine-tuning
            ds, _ = synthesize(bg.model, sample_shapes, seed=seed)
            _check_split(len(ds), fractions)
            bg = with_input_dims(bg, ds.sample_shapes)
            ctx = SearchContext(bg, split_dataset(ds, seed, fractions), target, seed=seed, finetune_epochs=0, data_free=True,
                                output_kind=output_kind)
        ctx.executor = executor
        configured = PRUNING_OPTIONS <= chosen.options  # the method hands back a config (not ort-int8)
        if target == "ort-cpu" and configured:  # kernels ORT runs slower in int8 stay fp32 (search/ort_speed.py)
            bg, latency_table, speed_record = ort_speed.prepare(bg, ctx.calib_batches, ctx.sample_shapes)
            ctx.bg = bg
        if speedup is not None:  # measured latency as a constraint the methods read (search/speed.py)
            ctx.speed_goal = ort_speed.speed_goal(bg, ctx, speedup, speed_batch or 1,
                                                  latency_table if target == "ort-cpu" and configured else None)
            if "budget" not in options_given and given.get("budget") is not None:  # pruning is the speed goal's
                given["budget"] = speed_budget(bg, target, given["budget"])
        state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None  # for --resume
        notify(progress, f"{method}: searching")
        own = {"seed": seed, "progress": progress, "state_path": state_path}
        if out_dir is not None and overwrite:  # the folder is ours and every check passed: the earlier run goes
            clear_run_files(Path(out_dir))
        if started is not None:
            started()
        result = chosen.load()(bg, ctx, target, **given,
                               **{k: v for k, v in own.items() if k in chosen.receives})

        if target == "ort-cpu" and configured and result.config is not None:  # never slower than fp32, timed whole
            result.model, speed_record["whole_model_fallbacks"] = ort_speed.whole_model_check(
                bg.model, result.model, latency_table, ctx.sample_shapes)
        if result.config is not None and result.config.channel_multiple is None:
            result.config.channel_multiple = bg.channel_multiple  # config.json reproduces the counts anywhere
        if result.config is not None and result.config.weight_range is None:
            result.config.weight_range = bg.weight_range  # and the weights' ranges
        notify(progress, "measuring the emitted model")
        report = build_report(bg, model_path, result, ctx, method=method, target=target,
                              budget=given.get("budget"), max_drop=given.get("max_drop"),
                              seconds=time.perf_counter() - start, latency_runs=latency_runs,
                              input_shapes={**ctx.sample_shapes, **sample_shapes},
                              data={**_data_record(data, ds), "split_seed": seed,
                                    "split": _split_record(len(ds), fractions)})
        if given.get("budget") is not None and "budget" not in options_given:
            report["goal"]["budget_default"] = True  # the method's default, not the user's: the summary says so
            report["goal"]["sentence"] = goal_sentence(report)
        if target == "ort-cpu" and configured:
            report["ort_cpu_speed"] = speed_record
        if speedup is not None:
            goal = ctx.speed_goal
            reached = goal.timed(result.model)  # as the search times its candidates: a miss timed twice, the faster kept
            report["speed_goal"] = {"speedup": speedup, "batch": goal.batch, "measured_speedup": reached,
                                    "met": reached >= speedup, **goal.record()}
        if out_dir is not None:
            notify(progress, "writing the outputs")
            write_outputs(Path(out_dir), Path(model_path), result.model, result.config, report,
                          output_model=None if output_model is None else Path(output_model))
        elif output_model is not None:
            write_model(Path(output_model), result.model)
            report["outputs"] = {"output_model": str(output_model)}
    return CompressResult(result.model, result.config, report, Path(out_dir) if out_dir is not None else None)


def _integer_at_least(value: Any, low: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least `low`: a count option's check."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _split_record(n: int, fractions: Sequence[float]) -> dict:
    """The report's record of the split: its fractions (`evaluate` splits the same way) and each part's samples."""
    return {"fractions": list(fractions), "samples": dict(zip(("calib", "finetune", "val", "test"), split_counts(n, fractions)))}


def _load_data(data: Any, bg: BlockGraph, image: Mapping[str, Any], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Dataset:
    """The data (a spec, a Dataset or arrays) read for the model's inputs, checked to fit them (keyed by their names)."""
    specs = graph_inputs(bg.model)
    single = tuple(specs[0].shape) if len(specs) == 1 else None
    if isinstance(data, (str, os.PathLike)):
        ds = load_data(str(data), input_shape=single, **image)
    else:
        if image:
            raise InvalidOptionError(f"{flag(next(iter(image)))} applies to an image folder, not to arrays given in Python")
        ds = data if isinstance(data, Dataset) else dataset_from_python(data, option("data"), "data")
    out_shape = bg.model.graph.output[0].type.tensor_type.shape.dim
    classes = out_shape[-1].dim_value if out_shape and out_shape[-1].HasField("dim_value") else None
    if classify([d.dim_value if d.HasField("dim_value") else None for d in out_shape]) != "class-scores":
        classes = None  # labels of other outputs are not class indices: they go to the metric only
    ds = check_fits(ds, specs, None, classes)
    if len(ds) < 8:
        raise DataError(f"need at least 8 samples to split into calibration / fine-tune / validation / test, got {len(ds)}")
    _check_split(len(ds), fractions)
    return ds


def _check_split(n: int, fractions: Sequence[float]) -> None:
    """Refuse a split that leaves a part empty (a small dataset under small --split-fractions)."""
    counts = split_counts(n, fractions)
    if min(counts) < 1:
        raise DataError(f"{n} samples split {','.join(f'{f:g}' for f in fractions)} leave a part empty "
                        f"(calibration / fine-tune / validation / test: {' / '.join(map(str, counts))}): give more "
                        f"samples or larger fractions ({option('split_fractions')})")


def _sample_shapes(bg: BlockGraph, input_shape: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """--input-shape's full shapes as one sample's dims (the batch axis dropped), checked against the inputs."""
    if not input_shape:
        return {}
    names = [s.name for s in graph_inputs(bg.model)]
    unknown = sorted(set(input_shape) - set(names))
    if unknown:
        raise InvalidOptionError(f"{option('input_shape')} names {', '.join(unknown)}, which the model has no input of "
                                 f"(inputs: {', '.join(names)})")
    out = {}
    for name, dims in input_shape.items():
        dims = tuple(int(d) for d in dims)
        if len(dims) < 1 or min(dims) < 1:
            raise InvalidOptionError(f"{option('input_shape')} {name} must be positive dims, batch first, got {dims}")
        out[name] = dims[1:]
    return out


def _data_record(data: Any, ds: Dataset) -> dict:
    """What the report says about the data: where it came from, how it was preprocessed, its labels."""
    if data is None:
        return {"source": None, "data_free": True, "preprocessing": dict(ds.preprocessing or {}), "samples": len(ds)}
    if ds.y is None:
        labels = "none"
    elif ds.classes is not None:
        labels = "class indices"
    else:
        labels = f"{ds.y.dtype} (not class indices: they reach only the metric; without one, fidelity to fp32 is scored)"
    if isinstance(data, (str, os.PathLike)):  # a file or folder by its full path: evaluate finds it from anywhere
        source = str(Path(data).resolve()) if Path(data).exists() else str(data)
    else:
        source = ds.name
    return {"source": source,
            "data_free": False, "samples": len(ds), "labels": labels,
            "inputs": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in ds.inputs.items()},
            "preprocessing": dict(ds.preprocessing) if ds.preprocessing else {"kind": "arrays used as given"}}


# operator domains ONNX Runtime runs without a custom-op library
_ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _check_domains(model: onnx.ModelProto, path: Any) -> None:
    """Refuse a model with ops ONNX Runtime cannot run: the emitted model must load in ORT."""
    for node in model.graph.node:
        if node.domain not in _ORT_DOMAINS:
            raise UserError(f"{path}: op {node.op_type!r} ({node.name or 'unnamed'}) is from domain {node.domain!r}, "
                            "which ONNX Runtime does not run; compress emits models ORT runs, so it is refused")
