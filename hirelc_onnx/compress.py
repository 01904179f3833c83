"""`compress`: the main job, from an ONNX file to a smaller ONNX file with a report that is true of it.

Orchestration only: check every option first (the method and its options: search/methods.py), load
the model and the data, run the method, measure the emitted model (report/build.py) and write the
outputs (report/outputs.py), holding --out (lock.py) throughout. The input file is never modified.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import onnx

from hirelc_onnx.config import TARGETS, CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import Dataset, split_dataset
from hirelc_onnx.evaluate.loaders import ImageOptions, check_fits, graph_inputs, load_data
from hirelc_onnx.evaluate.objective import METRIC_MODES
from hirelc_onnx.evaluate.output_kinds import classify
from hirelc_onnx.evaluate.synthetic import synthesize
from hirelc_onnx.graph import BlockGraph, build_block_graph, load_model
from hirelc_onnx.graph.blockgraph import with_input_dims
from hirelc_onnx.lock import hold_out_dir
from hirelc_onnx.report.build import build_report
from hirelc_onnx.report.outputs import check_out_dir, write_outputs
from hirelc_onnx.search.budget import check_reachable, parse_budget
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.methods import FINETUNE_OPTIONS, METHODS, check_options, flag, get_method

__all__ = ["CompressResult", "compress", "DATA_OPTIONS"]

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
             progress: Callable[[int, int], None] | None = None,
             input_shape: Mapping[str, Sequence[int]] | None = None, output_kind: str | dict | None = None,
             metric: str | None = None, metric_mode: str = "max", **options: Any) -> CompressResult:
    """Compress `model_path` and (with `out_dir`) write model.onnx, config.json, report.json, report.html.

    data: a --data spec or a Dataset. Without it the run is data-free: inputs are synthesised from
    the graph (evaluate/synthetic.py), the score is fidelity to the fp32 model, nothing is
    fine-tuned, and the report says task accuracy was not measured (methods marked needs_data
    refuse to run).
    input_shape: full shapes (batch first) of inputs with symbolic dims, {name: (1, 3, 224, 224)}:
    they size the synthesised inputs and the latency rows (with data, its shapes do that).
    Image options (DATA_OPTIONS: resize, center_crop, scale, offset, mean, std, channels,
    channel_order, layout; see evaluate/loaders.py ImageOptions) apply to an image-folder --data,
    exactly as `evaluate` applies them; the report records them.
    output_kind: what the outputs hold, overriding their classification (evaluate/output_kinds.py):
      one kind for all ("embedding") or per output ("name=kind,..." or a dict).
    metric: a task metric `package.module:func(outputs, labels) -> float` the search optimises and
      the report gives on the test split (higher is better; metric_mode "min" for a loss); needs --data.
    options: the chosen method's own, each taken by the methods in its row of search/methods.py
    METHODS (a value of None counts as not given; one the method would ignore is a UserError):
      budget: true-bytes ratio such as '6x' (None: the method's own default choice); max_drop: largest
      accepted accuracy drop in points; time_limit: seconds for the search; evaluations: real
      (fine-tuned) evaluations; finetune_seconds: the fine-tuning clock of each (default 20);
      finetune_epochs: instead of the clock, exactly this many epochs (at most; patience may end
      sooner), so every candidate gets the same training and a run is repeatable, 0 disables it;
      resume: continue a killed search from the state in `out_dir`; bits / keep / qtype /
      granularity: uniform's choice (keep also l1-int8's); flops / params: graph-rl's limits; prior: its start;
      settings: a method's settings dataclass (HiReLCSettings, GraphRLSettings, TwoStageSettings).
    Checks that can fail (options, file, data, budget, target) run before any long work.
    """
    start = time.perf_counter()
    chosen = get_method(method)
    given = {name: value for name, value in options.items() if value is not None}
    image = {name: given.pop(name) for name in sorted(DATA_OPTIONS & set(given))}
    check_options(chosen, given)
    if image and data is None:
        raise UserError(f"{flag(next(iter(image)))} sets how image files become input: give --data (an image folder)")
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if data is None and chosen.needs_data:
        free = ", ".join(m.name for m in METHODS.values() if not m.needs_data)
        raise UserError(f"--method {method} needs --data (a .npz, an image folder, 'digits' or a plugin); "
                        f"without data these run: {free}")
    if metric_mode not in METRIC_MODES:
        raise UserError(f"--metric-mode must be one of {', '.join(METRIC_MODES)}, got {metric_mode!r}")
    if metric_mode != "max" and metric is None:
        raise UserError("--metric-mode only matters with --metric: give --metric, or drop it")
    if metric is not None and data is None:
        raise UserError("--metric only matters with --data (it scores the model's outputs against the data's "
                        "labels): give --data, or drop it")
    scoring = {"output_kind": output_kind, "metric": metric, "metric_mode": metric_mode}
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
        bg = build_block_graph(original, inplace=True)  # the weights held once: `original` is given up
        del original
        if given.get("budget"):
            check_reachable(bg, given["budget"], target)
        sample_shapes = _sample_shapes(bg, input_shape)
        if data is not None:
            ds = _load_data(data, bg, image)
            bg = with_input_dims(bg, ds.sample_shapes)  # MACs at the data's sequence length / image size
            ctx = SearchContext(bg, split_dataset(ds, seed), target, seed=seed, **finetune, **scoring)
        else:  # data-free: inputs from the graph, fidelity to fp32, no fine-tuning
            ds, _ = synthesize(bg.model, sample_shapes, seed=seed)
            bg = with_input_dims(bg, ds.sample_shapes)
            ctx = SearchContext(bg, split_dataset(ds, seed), target, seed=seed, finetune_epochs=0, data_free=True,
                                output_kind=output_kind)
        state_path = Path(out_dir) / "search_state.json" if out_dir is not None else None  # for --resume
        own = {"seed": seed, "progress": progress, "state_path": state_path}
        result = chosen.load()(bg, ctx, target, **given,
                               **{k: v for k, v in own.items() if k in chosen.receives})

        report = build_report(bg, model_path, result, ctx, method=method, target=target,
                              budget=given.get("budget"), max_drop=given.get("max_drop"),
                              seconds=time.perf_counter() - start, latency_runs=latency_runs,
                              input_shapes={**ctx.sample_shapes, **sample_shapes},
                              data=_data_record(data, ds))
        if out_dir is not None:
            write_outputs(Path(out_dir), Path(model_path), result.model, result.config, report)
    return CompressResult(result.model, result.config, report, Path(out_dir) if out_dir is not None else None)


def _load_data(data: Any, bg: BlockGraph, image: Mapping[str, Any]) -> Dataset:
    """The --data spec (or a Dataset) read for the model's inputs, checked to fit them (keyed by their names)."""
    specs = graph_inputs(bg.model)
    single = tuple(specs[0].shape) if len(specs) == 1 else None
    if isinstance(data, Dataset):
        if image:
            raise UserError(f"{flag(next(iter(image)))} applies to an image folder, not to a Dataset given in Python")
        ds = data
    else:
        ds = load_data(str(data), input_shape=single, **image)
    out_shape = bg.model.graph.output[0].type.tensor_type.shape.dim
    classes = out_shape[-1].dim_value if out_shape and out_shape[-1].HasField("dim_value") else None
    if classify([d.dim_value if d.HasField("dim_value") else None for d in out_shape]) != "class-scores":
        classes = None  # labels of other outputs are not class indices: they go to the metric only
    ds = check_fits(ds, specs, None, classes)
    if len(ds) < 8:
        raise UserError(f"need at least 8 samples to split into calibration / fine-tune / validation / test, got {len(ds)}")
    return ds


def _sample_shapes(bg: BlockGraph, input_shape: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """--input-shape's full shapes as one sample's dims (the batch axis dropped), checked against the inputs."""
    if not input_shape:
        return {}
    names = [s.name for s in graph_inputs(bg.model)]
    unknown = sorted(set(input_shape) - set(names))
    if unknown:
        raise UserError(f"--input-shape names {', '.join(unknown)}, which the model has no input of (inputs: {', '.join(names)})")
    out = {}
    for name, dims in input_shape.items():
        dims = tuple(int(d) for d in dims)
        if len(dims) < 1 or min(dims) < 1:
            raise UserError(f"--input-shape {name} must be positive dims, batch first, got {dims}")
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
        labels = f"{ds.y.dtype} (not class indices: they reach only --metric; without one, fidelity to fp32 is scored)"
    return {"source": str(data) if isinstance(data, (str, os.PathLike)) else ds.name,
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
