"""`hirelc-onnx evaluate`: accuracy (labels) or fidelity (vs an fp32 reference) through ORT."""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from hirelc_onnx.commands.data_options import image_option_values, image_options
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import SPLIT_NAMES, select_split
from hirelc_onnx.evaluate.loaders import load_data
from hirelc_onnx.evaluate.runner import SessionConfig, evaluate as run_evaluate, get_runner, model_file_size

__all__ = ["evaluate", "session_options", "fmt_bytes"]

log = logging.getLogger(__name__)


def fmt_bytes(n: int) -> str:
    """Human-readable size, exact bytes kept in --json output."""
    units = ("B", "KiB", "MiB", "GiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


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
@click.option("--data", "data_spec", required=True, help=".npz (one array per input named after it, or x; optional y), image folder, 'digits' or package.module:func.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--split", type=click.Choice(SPLIT_NAMES), default="all", show_default=True, help="Part of the seeded split to use."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--reference", help="fp32 model: report fidelity (agreement, KL, MSE, cosine) against it.")
@click.option("--metric", "metrics", multiple=True, help="Plugin metric package.module:func(logits, labels_or_ref); repeatable.")
@image_options
@session_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(
    model: str,
    data_spec: str,
    batch_size: int,
    split: str,
    seed: int,
    reference: str | None,
    metrics: tuple[str, ...],
    threads: int,
    opt_level: str,
    as_json: bool,
    **image: Any,
) -> None:
    """Measure MODEL on --data through the ONNX Runtime session a user would deploy."""
    config = SessionConfig(graph_optimization_level=opt_level, intra_op_threads=threads)
    runner = get_runner(model, config)
    if reference is not None:
        get_runner(reference, config)  # a bad reference fails before the data is read
    image_opts = image_option_values(image)
    ds = load_data(data_spec, runner.input_shape if len(runner.inputs) == 1 else None, **image_opts)
    ds = select_split(runner.fit(ds), split, seed)  # fits first: a wrong input name beats a missing label
    if len(ds) == 0:
        raise UserError(f"split {split!r} of {data_spec} is empty ({len(ds)} samples)")
    if ds.classes is None and reference is None:
        what = "no labels" if ds.y is None else f"labels ({ds.y.dtype}) that are not class indices"
        raise UserError(f"{data_spec} has {what}: give --reference fp32.onnx to measure fidelity instead")
    result: dict[str, Any] = {"model": model, "data": data_spec, "split": split}
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
    table = Table(title=f"{result['model']} on {result['data']} ({result['split']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key in ("model", "data", "split", "reference"):
            continue
        if key.endswith("file_size_bytes"):
            shown = fmt_bytes(value)
        elif key in ("accuracy", "reference_accuracy", "top1_agreement", "top5_containment"):
            shown = f"{100 * value:.2f}%"
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        else:
            shown = str(value)
        label = _LABELS.get(key, key.replace("_bytes", "").replace("_", " "))
        table.add_row(label, shown)
    Console().print(table)
