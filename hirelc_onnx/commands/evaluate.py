"""`hirelc-onnx evaluate`: accuracy (labels) or fidelity (vs an fp32 reference) through ORT."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from hirelc_onnx.commands.data_options import image_option_values, image_options
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import DEFAULT_FRACTIONS, SPLIT_NAMES, select_split
from hirelc_onnx.evaluate.loaders import load_data
from hirelc_onnx.evaluate.runner import SessionConfig, evaluate as run_evaluate, get_runner, model_file_size
from hirelc_onnx.units import fmt_bytes

__all__ = ["evaluate", "session_options", "compress_run"]

log = logging.getLogger(__name__)


def session_options(fn: Callable) -> Callable:
    """--threads and --opt-level, shared by evaluate and benchmark so both measure the same session."""
    fn = click.option("--threads", type=int, default=0, show_default=True, help="ORT intra-op threads (0: ORT decides).")(fn)
    fn = click.option(
        "--opt-level",
        type=click.Choice(["disabled", "basic", "extended", "all"]),
        default="all",
        show_default=True,
        help="ORT graph optimisation level (deployments use 'all').",
    )(fn)
    return fn


@click.command("evaluate")
@click.argument("model")
@click.option("--data", "data_spec", help=".npz (one array per input named after it, or x; optional y), image folder, "
              "'digits' or package.module:func. Default for a compress output: the data that run used.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--split", type=click.Choice(SPLIT_NAMES), default=None,
    help="Part of the seeded split to use. Default: 'test' for a compress output (the run's held-out test split, "
         "the one its report gives), else 'all'."
)
@click.option("--seed", type=int, default=None,
              help="Seed of the split. Default: the compress run's seed for its output, else 0.")
@click.option("--reference", help="fp32 model: report fidelity (agreement, KL, MSE, cosine) against it.")
@click.option("--metric", "metrics", multiple=True, help="Plugin metric package.module:func(logits, labels_or_ref); repeatable.")
@image_options
@session_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(
    model: str,
    data_spec: str | None,
    batch_size: int,
    split: str | None,
    seed: int | None,
    reference: str | None,
    metrics: tuple[str, ...],
    threads: int,
    opt_level: str,
    as_json: bool,
    **image: Any,
) -> None:
    """Measure MODEL on --data through the ONNX Runtime session a user would deploy.

    MODEL may be a compress output folder (or its model.onnx): the run's report.json then gives the
    default data, split ('test'), the split's fractions and seed, so the figure is the report's own test figure.
    """
    model, run = compress_run(model)
    fractions = DEFAULT_FRACTIONS
    if run is not None:
        data_spec, split, seed = _run_defaults(run, data_spec, split, seed)
        fractions = tuple(((run.get("data") or {}).get("split") or {}).get("fractions") or DEFAULT_FRACTIONS)
    if data_spec is None:
        raise UserError("give --data (only a compress output folder, with its report.json, has a default)")
    split, seed = split or "all", 0 if seed is None else seed
    config = SessionConfig(graph_optimization_level=opt_level, intra_op_threads=threads)
    runner = get_runner(model, config)
    if reference is not None:
        get_runner(reference, config)  # a bad reference fails before the data is read
    image_opts = image_option_values(image)
    ds = load_data(data_spec, runner.input_shape if len(runner.inputs) == 1 else None, **image_opts)
    ds = select_split(runner.fit(ds), split, seed, fractions)  # fits first: a wrong input name beats a missing label
    if len(ds) == 0:
        raise UserError(f"split {split!r} of {data_spec} is empty ({len(ds)} samples)")
    if ds.classes is None and reference is None:
        what = "no labels" if ds.y is None else f"labels ({ds.y.dtype}) that are not class indices"
        raise UserError(f"{data_spec} has {what}: give --reference fp32.onnx to measure fidelity instead")
    result: dict[str, Any] = {"model": model, "data": data_spec, "split": split, "seed": seed}
    result.update(run_evaluate(model, ds, batch_size, reference, metrics, config))
    result["file_size_bytes"] = model_file_size(model)
    if reference is not None:
        result["reference"] = reference
        result["reference_file_size_bytes"] = model_file_size(reference)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_table(result)


_LABELS = {
    "n": "samples",
    "accuracy": "top-1 accuracy",
    "reference_accuracy": "reference top-1 accuracy",
    "top1_agreement": "top-1 agreement vs reference",
    "top5_containment": "reference top-1 in top-5",
    "kl_divergence": "KL(reference || model)",
    "logit_mse": "logit MSE",
    "cosine_similarity": "logit cosine similarity",
}


def _print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['model']} on {result['data']} ({result['split']} split, seed {result['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key in ("model", "data", "split", "seed", "reference"):
            continue
        if key.endswith("file_size_bytes"):
            shown = fmt_bytes(value)
        elif key in ("accuracy", "reference_accuracy", "top1_agreement", "top5_containment"):
            shown = f"{value:.4f}"  # a fraction, as compress and the report write it
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        else:
            shown = str(value)
        label = _LABELS.get(key, key.replace("_bytes", "").replace("_", " "))
        table.add_row(label, shown)
    Console().print(table)


def compress_run(model: str) -> tuple[str, dict | None]:
    """(the model file, the report of the compress run that wrote it, or None).

    A compress output folder stands for its model.onnx; a model.onnx with a report.json beside it
    whose outputs name that file is a compress output too."""
    path = Path(model)
    if path.is_dir() and (path / "report.json").is_file() and (path / "model.onnx").is_file():
        path = path / "model.onnx"
    report_path = path.parent / "report.json"
    if not path.is_file() or not report_path.is_file():
        return model, None
    try:
        report = json.loads(report_path.read_text())
        written = Path(report["outputs"]["model.onnx"])
    except (OSError, ValueError, KeyError, TypeError):
        return model, None
    if written.name != path.name:
        return model, None
    return str(path), report


def _run_defaults(run: dict, data_spec: str | None, split: str | None,
                  seed: int | None) -> tuple[str | None, str | None, int | None]:
    """The compress run's data, 'test' and its seed, where the user gave none."""
    data = run.get("data") or {}
    source = data.get("source") if not data.get("data_free") else None
    if data_spec is None and source is not None and data.get("preprocessing", {}).get("kind") != "image folder":
        data_spec = source  # an image folder needs its image options again: the user gives them
    if seed is None and "split_seed" in data:
        seed = int(data["split_seed"])
    if split is None and source is not None:
        split = "test"
        if data_spec != source:
            log.warning("the compress run used data %s; the test split of %s is not its test split", source, data_spec)
    return data_spec, split, seed
