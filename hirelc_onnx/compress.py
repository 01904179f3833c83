"""`compress`: the main job, from an ONNX file to a smaller ONNX file with a report that is true of it.

Orchestration only: check every option first (the method and its options: search/methods.py), load
the model and the data, run the method, measure the emitted model (report/build.py) and write the
outputs (report/outputs.py), holding --out (lock.py) throughout. The input file is never modified.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from hirelc_onnx.config import TARGETS, CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import Dataset, split_dataset
from hirelc_onnx.evaluate.loaders import check_fits, load_data
from hirelc_onnx.evaluate.objective import METRIC_MODES
from hirelc_onnx.evaluate.output_kinds import classify
from hirelc_onnx.graph import BlockGraph, build_block_graph, load_model
from hirelc_onnx.lock import hold_out_dir
from hirelc_onnx.report.build import build_report
from hirelc_onnx.report.outputs import check_out_dir, write_outputs
from hirelc_onnx.search.budget import check_reachable, parse_budget
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.methods import FINETUNE_OPTIONS, check_options, flag, get_method

__all__ = ["CompressResult", "compress"]


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
             progress: Callable[[int, int], None] | None = None, output_kind: str | dict | None = None,
             metric: str | None = None, metric_mode: str = "max", **options: Any) -> CompressResult:
    """Compress `model_path` and (with `out_dir`) write model.onnx, config.json, report.json, report.html.

    data: a --data spec or a Dataset; needed by every method that measures or calibrates.
    output_kind: what the outputs hold, overriding their classification (evaluate/output_kinds.py):
      one kind for all ("embedding") or per output ("name=kind,..." or a dict).
    metric: a task metric `package.module:func(outputs, labels) -> float` the search optimises and
      the report gives on the test split (higher is better; metric_mode "min" for a loss).
    options: the chosen method's own, each taken by the methods in its row of search/methods.py
    METHODS (a value of None counts as not given; one the method would ignore is a UserError):
      budget: true-bytes ratio such as '6x' (None: the method's own default choice); max_drop: largest
      accepted accuracy drop in points; time_limit: seconds for the search; evaluations: real
      (fine-tuned) evaluations; finetune_seconds: the fine-tuning clock of each (default 20);
      finetune_epochs: instead of the clock, exactly this many epochs (at most; patience may end
      sooner), so every candidate gets the same training and a run is repeatable, 0 disables it;
      resume: continue a killed search from the state in `out_dir`; bits / keep / qtype /
      granularity: uniform's choice (keep also l1-int8's); flops / params: graph-rl's limits;
      settings: a method's settings dataclass (HiReLCSettings, GraphRLSettings, TwoStageSettings).
    Checks that can fail (options, file, data, budget, target) run before any long work.
    """
    start = time.perf_counter()
    chosen = get_method(method)
    given = {name: value for name, value in options.items() if value is not None}
    check_options(chosen, given)
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if data is None and chosen.needs_data:
        raise UserError(f"--method {method} needs --data (a .npz, an image folder, 'digits' or a plugin)")
    if metric_mode not in METRIC_MODES:
        raise UserError(f"--metric-mode must be one of {', '.join(METRIC_MODES)}, got {metric_mode!r}")
    if metric_mode != "max" and metric is None:
        raise UserError("--metric-mode only matters with --metric: give --metric, or drop it")
    scoring = {"output_kind": output_kind, "metric": metric, "metric_mode": metric_mode}
    for name, value in scoring.items():
        if data is None and value not in (None, "max"):
            raise UserError(f"--{name.replace('_', '-')} only matters with --data (it says how candidates are "
                            "scored): give --data, or drop it")
    finetune = {name: given.pop(name) for name in sorted(FINETUNE_OPTIONS & set(given))}
    if finetune and data is None:
        raise UserError(f"{flag(next(iter(finetune)))} only matters with --data (it sets how each measured "
                        "candidate is fine-tuned): give --data, or drop it")
    if finetune.get("finetune_epochs", 0) < 0:
        raise UserError(f"finetune_epochs must be >= 0, got {finetune['finetune_epochs']}")
    if given.get("resume") and out_dir is None:
        raise UserError("--resume needs --out (the folder where the interrupted run kept its state)")
    if "budget" in given:
        given["budget"] = parse_budget(given["budget"])
    if out_dir is not None:
        check_out_dir(Path(out_dir), Path(model_path))

    with hold_out_dir(out_dir) if out_dir is not None else nullcontext():  # one compress per --out
        original = load_model(model_path)
        _check_domains(original, model_path)
        bg = build_block_graph(original)
        if given.get("budget"):
            check_reachable(bg, given["budget"], target)
        ctx = None
        if data is not None:
            ctx = SearchContext(bg, split_dataset(_load_data(data, bg), seed), target, seed=seed, **finetune,
                                **scoring)
        state_path = Path(out_dir) / "search_state.json" if out_dir is not None else None  # for --resume
        own = {"seed": seed, "progress": progress, "state_path": state_path}
        result = chosen.load()(bg, ctx, target, **given,
                               **{k: v for k, v in own.items() if k in chosen.receives})

        report = build_report(bg, original, model_path, result, ctx, method=method, target=target,
                              budget=given.get("budget"), max_drop=given.get("max_drop"),
                              seconds=time.perf_counter() - start, latency_runs=latency_runs)
        if out_dir is not None:
            write_outputs(Path(out_dir), Path(model_path), result.model, result.config, report)
    return CompressResult(result.model, result.config, report, Path(out_dir) if out_dir is not None else None)


def _load_data(data: Any, bg: BlockGraph) -> Dataset:
    """The --data spec (or a Dataset) read for the model's input shape, checked to fit it."""
    shape = next(iter(bg.input_shapes.values()))
    ds = data if isinstance(data, Dataset) else load_data(str(data), input_shape=tuple(shape))
    out_shape = bg.model.graph.output[0].type.tensor_type.shape.dim
    classes = out_shape[-1].dim_value if out_shape and out_shape[-1].HasField("dim_value") else None
    if classify([d.dim_value if d.HasField("dim_value") else None for d in out_shape]) != "class-scores":
        classes = None  # labels of other outputs are not class indices: they go to the metric only
    ds = check_fits(ds, shape, None, classes)
    if len(ds) < 8:
        raise UserError(f"need at least 8 samples to split into calibration / fine-tune / validation / test, got {len(ds)}")
    return ds


# operator domains ONNX Runtime runs without a custom-op library
_ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _check_domains(model: onnx.ModelProto, path: Any) -> None:
    """Refuse a model with ops ONNX Runtime cannot run: the emitted model must load in ORT."""
    for node in model.graph.node:
        if node.domain not in _ORT_DOMAINS:
            raise UserError(f"{path}: op {node.op_type!r} ({node.name or 'unnamed'}) is from domain {node.domain!r}, "
                            "which ONNX Runtime does not run; compress emits models ORT runs, so it is refused")
