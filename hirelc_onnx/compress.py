"""`compress`: the main job, from an ONNX file to a smaller ONNX file with a report that is true of it.

Every figure in the report is measured on the emitted model: its bytes, its held-out score through
ONNX Runtime, its latency side by side with the fp32 model. The input file is never modified and
outputs are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from hirelc_onnx.config import TARGETS, CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.io import write_atomic, write_json
from hirelc_onnx.graph import ModelCost, build_block_graph, load_model, model_cost
from hirelc_onnx.graph.blockgraph import BlockGraph

__all__ = ["CompressResult", "compress", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("hirelc", "graph-rl", "two-stage", "uniform", "uniform-l1", "l1-int8", "ort-int8", "random")
_NEEDS_DATA = {"hirelc", "graph-rl", "two-stage", "ort-int8", "random", "uniform-l1"}


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


def _method(name: str) -> Callable:
    from hirelc_onnx.search.baselines import BASELINES

    if name in BASELINES:
        return BASELINES[name]
    if name == "hirelc":
        from hirelc_onnx.search.hirelc import run_hirelc

        return run_hirelc
    if name == "graph-rl":
        from hirelc_onnx.search.graph_rl import run_graph_rl

        return run_graph_rl
    if name == "two-stage":
        from hirelc_onnx.search.two_stage import run_two_stage

        return run_two_stage
    raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def _load_data(data: Any, bg: BlockGraph):
    from hirelc_onnx.evaluate.data import Dataset
    from hirelc_onnx.evaluate.loaders import check_fits, load_data

    shape = next(iter(bg.input_shapes.values()))
    ds = data if isinstance(data, Dataset) else load_data(str(data), input_shape=tuple(shape))
    out_shape = bg.model.graph.output[0].type.tensor_type.shape.dim
    classes = out_shape[-1].dim_value if out_shape and out_shape[-1].HasField("dim_value") else None
    ds = check_fits(ds, shape, None, classes)
    if len(ds) < 8:
        raise UserError(f"need at least 8 samples to split into calibration / fine-tune / validation / test, got {len(ds)}")
    return ds


def compress(model_path: str | os.PathLike, *, budget: str | float | None = None, data: Any = None,
             method: str = "hirelc", target: str = "storage", max_drop: float | None = None,
             time_limit: float | None = None, seed: int = 0, out_dir: str | os.PathLike | None = None,
             finetune_seconds: float = 20.0, evaluations: int = 8, latency_runs: int = 20,
             finetune_epochs: int | None = None, progress: Callable[[str, int, int], None] | None = None,
             **method_options) -> CompressResult:
    """Compress `model_path` and (with `out_dir`) write model.onnx, config.json, report.json, report.html.

    budget: true-bytes ratio such as '6x' (None: the method's own default choice).
    data: a --data spec or a Dataset; needed by every method that measures or calibrates.
    finetune_seconds: the fine-tuning clock of each real evaluation; finetune_epochs: instead of the
        clock, exactly this many epochs (at most; patience may end sooner) -- every candidate gets the
        same training and a run is repeatable on one machine; 0 disables fine-tuning.
    Checks that can fail (file, data, budget, target) run before any long work.
    """
    from hirelc_onnx.search.budget import check_reachable, parse_budget

    start = time.perf_counter()
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    ratio_goal = parse_budget(budget)
    if finetune_epochs is not None and finetune_epochs < 0:
        raise UserError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    if out_dir is not None:
        _check_out_dir(Path(out_dir), Path(model_path))
    original = load_model(model_path)
    bg = build_block_graph(original)
    if ratio_goal:
        check_reachable(bg, ratio_goal, target)
    if data is None and method in _NEEDS_DATA:
        raise UserError(f"--method {method} needs --data (a .npz, an image folder, 'digits' or a plugin)")
    ctx = None
    if data is not None:
        from hirelc_onnx.evaluate.data import split_dataset
        from hirelc_onnx.search.context import SearchContext

        ds = _load_data(data, bg)
        ctx = SearchContext(bg, split_dataset(ds, seed), target, finetune_seconds=finetune_seconds, seed=seed,
                            finetune_epochs=finetune_epochs)
    run = _method(method)
    if out_dir is not None:  # searches keep their state here after each round, for --resume
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        method_options.setdefault("state_path", Path(out_dir) / "search_state.json")
    elif method_options.get("resume"):
        raise UserError("--resume needs --out (the folder where the interrupted run kept its state)")
    result = run(bg, ctx, target, budget=ratio_goal, max_drop=max_drop, time_limit=time_limit, seed=seed,
                 evaluations=evaluations, progress=progress, **method_options)
    report = build_report(bg, original, model_path, result, ctx, method=method, target=target, budget=ratio_goal,
                          max_drop=max_drop, seconds=time.perf_counter() - start, latency_runs=latency_runs)
    out = CompressResult(result.model, result.config, report, Path(out_dir) if out_dir else None)
    if out_dir is not None:
        write_outputs(out, Path(out_dir), Path(model_path))
    return out


# --- the report ---------------------------------------------------------------------------

def _versions() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def per_kernel_rows(bg: BlockGraph, config: CompressionConfig | None, emitted: onnx.ModelProto,
                    cost: ModelCost | None = None) -> list[dict]:
    """What was done to every kernel, with its bytes before and after (`cost`: model_cost of `config`)."""
    cost = cost or (model_cost(bg, config) if config else None)
    shapes = {t.name: list(t.dims) for t in emitted.graph.initializer}
    rows = []
    for k in bg.kernel_list():
        kc = config.get(k.name) if config else None
        row = {"kernel": k.name, "op": k.op, "block": k.block, "shape": list(k.weight_shape),
               "params": k.params, "macs": k.macs, "bytes_before": bg.initializer_bytes[k.weight],
               "group": k.group}
        if kc is not None:
            row.update(bits=kc.bits, keep_ratio=kc.keep_ratio, qtype=kc.qtype, granularity=kc.granularity,
                       bytes_after=cost.kernels[k.name].weight_bytes, params_after=cost.kernels[k.name].params)
        if k.weight in shapes:
            row["shape_after"] = shapes[k.weight]
        rows.append(row)
    return rows


def build_report(bg: BlockGraph, original: onnx.ModelProto, model_path, result, ctx, *, method: str, target: str,
                 budget: float | None, max_drop: float | None, seconds: float, latency_runs: int = 20) -> dict:
    """Measure the emitted model and assemble the report (all figures from the emitted model)."""
    from hirelc_onnx.evaluate.runner import benchmark_side_by_side

    emitted = result.model
    file_bytes = len(emitted.SerializeToString())
    original_file = Path(model_path).stat().st_size
    true_bytes = _initializer_bytes(emitted)
    size = {"original_weight_bytes": bg.weight_bytes, "weight_bytes": true_bytes,
            "ratio": bg.weight_bytes / max(true_bytes, 1), "original_file_bytes": original_file,
            "file_bytes": file_bytes, "file_ratio": original_file / max(file_bytes, 1)}
    cost = model_cost(bg, result.config) if result.config is not None else None
    if cost is not None:
        size.update(predicted_weight_bytes=cost.total_bytes, macs_fraction=cost.macs_fraction,
                    nominal_ratio_unweighted_bits_times_keep=cost.nominal_ratio)
    report: dict[str, Any] = {
        "method": method, "target": target, "budget": budget, "max_drop": max_drop,
        "input": {"path": str(model_path), "kernels": len(bg.kernels), "params": bg.total_params,
                  "macs": bg.total_macs, "blocks": len(bg.blocks)},
        "size": size,
        "goal": {"budget_met": None if budget is None else size["ratio"] >= budget - 1e-9},
        "accuracy": None,
        "kernels": per_kernel_rows(bg, result.config, emitted, cost),
        "history": result.history,
        "search": {"seconds": seconds, **result.extra},
        "versions": _versions(),
    }
    if ctx is not None:
        fp32_test = ctx.test_score(bg.model)
        comp_test = ctx.test_score(emitted)
        report["accuracy"] = {
            "metric": "top-1 accuracy" if ctx.labelled else "top-1 agreement with fp32",
            "split": "test (held out, never seen by the search)", "n": len(ctx.splits.test),
            "fp32": fp32_test, "compressed": comp_test, "drop_points": 100.0 * (fp32_test - comp_test),
            "val_compressed": result.val_score, "fp32_val": ctx.fp32_val_score,
            "evaluations": ctx.evaluations, "finetune_warning": ctx.bridge_error,
            "finetune_budget": ({"epochs": ctx.finetune_epochs} if ctx.finetune_epochs is not None
                                else {"seconds": ctx.finetune_seconds}),
        }
        if max_drop is not None:
            report["goal"]["max_drop_met"] = report["accuracy"]["drop_points"] <= max_drop + 1e-9
        report["baselines"] = _reference_points(bg, ctx, target)
    latency = {}
    for batch in (1, 32):
        try:
            fp, comp = benchmark_side_by_side([bg.model, emitted], batch_size=batch, runs=latency_runs, warmup=3)
        except UserError as exc:
            latency[f"batch{batch}"] = {"error": str(exc)}
            continue
        latency[f"batch{batch}"] = {"fp32_ms": fp["median_ms"], "compressed_ms": comp["median_ms"],
                                    "speedup": fp["median_ms"] / max(comp["median_ms"], 1e-9)}
    report["latency"] = latency
    return report


def _reference_points(bg: BlockGraph, ctx, target: str) -> dict:
    """Uniform 8- and 4-bit weights without fine-tuning, on the validation split: the points every
    search result is plotted against (cheap: one rewrite and one ORT pass each)."""
    from hirelc_onnx.apply import apply_config
    from hirelc_onnx.evaluate.runner import predict
    from hirelc_onnx.search.budget import bits_ladder

    points = {}
    for bits in sorted(b for b in bits_ladder(target) if 4 <= b < 32):
        config = CompressionConfig.uniform(bg.kernels, target=target, bits=bits)
        model = apply_config(bg, config, calib_batches=ctx.calib_batches)
        points[f"uniform {bits}-bit, no fine-tuning"] = {
            "ratio": model_cost(bg, config).ratio, "score": ctx.score(predict(model, ctx.splits.val.x), ctx.splits.val)}
    return points


# --- writing outputs ------------------------------------------------------------------------

def _check_out_dir(out_dir: Path, model_path: Path) -> None:
    if (out_dir / "model.onnx").resolve() == model_path.resolve():
        raise UserError(f"--out {out_dir} would overwrite the input model; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")


def write_outputs(result: CompressResult, out_dir: Path, model_path: Path) -> None:
    """model.onnx, config.json, report.json, report.html into `out_dir` (never over the input)."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, Path(model_path))
    write_atomic(out_dir / "model.onnx", result.model.SerializeToString())
    if result.config is not None:
        write_json(out_dir / "config.json", result.config.to_dict())
    result.report["outputs"] = {name: str(out_dir / name) for name in ("model.onnx", "config.json", "report.json",
                                                                      "report.html")}
    write_json(out_dir / "report.json", result.report)
    from hirelc_onnx.report.html import render_html

    write_atomic(out_dir / "report.html", render_html(result.report).encode())
    result.out_dir = out_dir
