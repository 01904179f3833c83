"""`hirelc-onnx compress`: search a compression config, emit the model, print and write the report."""
from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from hirelc_onnx.commands.data_options import image_option_values, image_options, input_shape_option, parse_input_shapes
from hirelc_onnx.compress import compress as run_compress
from hirelc_onnx.config import GRANULARITIES, QTYPES, TARGETS
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.loaders import graph_inputs
from hirelc_onnx.graph import load_model
from hirelc_onnx.search.methods import METHODS, takers

__all__ = ["compress", "print_summary"]


def print_summary(report: dict, out_dir: Path | None) -> None:
    """The final table: size, ratio, accuracy and drop, latency vs fp32."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 120)
    size, acc, lat = report["size"], report.get("accuracy"), report.get("latency", {})
    t = Table(title=f"{report['method']} -> target {report['target']}")
    t.add_column("")
    t.add_column("fp32", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio / change", justify="right")
    t.add_row("weight bytes", f"{size['original_weight_bytes']:,}", f"{size['weight_bytes']:,}", f"{size['ratio']:.2f}x")
    t.add_row("file bytes", f"{size['original_file_bytes']:,}", f"{size['file_bytes']:,}", f"{size['file_ratio']:.2f}x")
    if acc:
        t.add_row(f"{acc['metric']} (test, n={acc['n']})", f"{acc['fp32']:.4f}", f"{acc['compressed']:.4f}",
                  f"{-acc['drop_points']:+.2f} pts")
        outputs = acc.get("outputs") or []
        if len(outputs) > 1 or any(o["kind"] != "class-scores" for o in outputs):
            for o in outputs:  # which kind each output was scored as, and its score (accuracy, else against fp32)
                name = "accuracy" if "accuracy" in o else next(k for k in o if k not in ("name", "kind", "shape"))
                fp32 = o["fp32_accuracy"] if name == "accuracy" else 1.0
                t.add_row(f"output {o['name']} ({o['kind']}): {name}", f"{fp32:.4f}", f"{o[name]:.4f}", "")
    for key, v in lat.items():
        if "speedup" in v:
            t.add_row(f"latency {key} (median ms)", f"{v['fp32_ms']:.3f}", f"{v['compressed_ms']:.3f}",
                      f"{v['speedup']:.2f}x faster" if v["speedup"] >= 1 else f"{1 / v['speedup']:.2f}x slower")
    console.print(t)
    goal = report.get("goal", {})
    if goal.get("budget_met") is False:
        console.print(f"[yellow]budget {report['budget']:g}x NOT met: reached {size['ratio']:.2f}x[/]")
    if goal.get("max_drop_met") is False:
        console.print(f"[yellow]max drop {report['max_drop']} points NOT met: dropped {acc['drop_points']:.2f}[/]")
    if acc and acc.get("finetune_warning"):
        console.print(f"[yellow]warning: {acc['finetune_warning']}[/]")
    if acc and acc.get("sample_warning"):
        console.print(f"[yellow]warning: {acc['sample_warning']}[/]", highlight=False)
    if acc and acc.get("data_free_note"):
        console.print(f"[yellow]{acc['data_free_note']}[/]", highlight=False)
    elif acc and not acc.get("task_accuracy_measured", True):
        console.print("[yellow]the data have no class labels: the score is fidelity to the fp32 model, "
                      "not task accuracy[/]", highlight=False)
    if out_dir:
        console.print(f"outputs in {out_dir}/: model.onnx, config.json, report.json, report.html")


@click.command(epilog="\b\nMethods:\n" + "\n".join(f"  {m.name:<11} {m.summary}" for m in METHODS.values()))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", help=f"Compression ratio to reach in true stored bytes, e.g. 6x ({takers('budget')}).")
@click.option("--data", help="A .npz (one array per model input named after it, or x; optional labels y), an image "
                             "folder, 'digits', or a plugin package.module:func. Without it: a data-free run "
                             "(inputs synthesised from the graph, fidelity to fp32, no fine-tuning).")
@image_options
@input_shape_option("[name=]1x3x224x224, batch first, for inputs with symbolic dims (repeatable or comma-separated): "
                    "sizes synthesised inputs without --data and the latency rows (with --data its shapes do).")
@click.option("--method", type=click.Choice(list(METHODS)), default="hirelc", show_default=True,
              help="Each method takes only its own options (listed in their help); another is refused.")
@click.option("--target", type=click.Choice(TARGETS), default="storage", show_default=True,
              help="storage: smallest file (packed int4/int2); ort-cpu: int8 kernels ORT fuses; qdq: plain QDQ.")
@click.option("--max-drop", type=float, help=f"Largest accepted accuracy drop, in points ({takers('max_drop')}).")
@click.option("--time-limit", type=float,
              help=f"Seconds for the search; the best candidate so far is returned ({takers('time_limit')}).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder (created).")
@click.option("--bits", type=click.IntRange(2, 32),
              help="Weight bits: uniform (default 8), graph-rl (default 8, 7 under ort-cpu; 32 prunes only).")
@click.option("--keep", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Channel keep ratio: uniform (default 1.0), l1-int8 (default 0.5).")
@click.option("--qtype", type=click.Choice(QTYPES), default="symmetric", show_default=True,
              help="uniform: symmetric or asymmetric weight grid.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="per-channel", show_default=True,
              help="uniform: one scale per tensor, channel or group, or log2 levels.")
@click.option("--evaluations", type=int, default=8, show_default=True,
              help=f"Real (fine-tuned) evaluations ({takers('evaluations')}).")
@click.option("--finetune-seconds", type=float, default=20.0, show_default=True,
              help=f"Per real evaluation ({takers('finetune_seconds')}; with --data).")
@click.option("--finetune-epochs", type=click.IntRange(0), default=None,
              help="Fine-tune each real evaluation for this many epochs instead of --finetune-seconds: "
                   f"the same training for every candidate, and a repeatable run ({takers('finetune_epochs')}; "
                   "with --data).")
@click.option("--flops", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="graph-rl: keep at most this fraction of the original MACs (0.5 when no limit is given).")
@click.option("--params", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="graph-rl: keep at most this fraction of the original kernel parameters.")
@click.option("--prior", type=click.Choice(["l1-fisher", "none"]),
              help="graph-rl: start the policy from the L1 + Fisher channel ranking and measure its cuts "
                   "(l1-fisher), or from uninformative logits, measuring only the policy's episodes (none).")
@click.option("--output-kind", help="What the outputs hold, overriding their classification: one kind for all, "
              "or name=kind,... (class-scores, sequence-scores, dense-map, embedding).")
@click.option("--metric", help="A task metric package.module:func(outputs, labels) -> float to optimise and report "
              "(higher is better; see --metric-mode).")
@click.option("--metric-mode", type=click.Choice(["max", "min"]), default="max", show_default=True,
              help="max: --metric is a score; min: it is a loss.")
@click.option("--resume", is_flag=True, help=f"Continue a killed run from the state in --out ({takers('resume')}).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@click.pass_context
def compress(ctx: click.Context, model, data, method, target, seed, out_dir, as_json, input_shape, output_kind,
             metric, metric_mode, **method_options) -> None:
    """Compress MODEL and write the smaller model with its report."""
    image = {k: v for k, v in image_option_values(method_options).items() if v is not None}
    shapes = parse_input_shapes(input_shape, _input_names(model) if input_shape else None)
    # only the options typed on the command line reach compress(), never a default: an option the
    # method would ignore is then an error instead of a silent no-op
    options = {name: value for name, value in method_options.items()
               if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    if "bits" in options and options["bits"] not in (2, 3, 4, 5, 6, 7, 8, 32):
        raise click.BadParameter("bits must be 2..8 or 32", param_hint="--bits")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True, disable=as_json) as bar:
        task = bar.add_task(f"{method}: real evaluations (prune, fine-tune, quantize, measure)",
                            total=method_options["evaluations"])

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = run_compress(model, method=method, data=data, target=target, seed=seed, out_dir=out_dir,
                                  progress=progress, input_shape=shapes or None, output_kind=output_kind,
                                  metric=metric, metric_mode=metric_mode, **image, **options)
        except KeyboardInterrupt:
            hint = f"; continue with the same command plus --resume (state in {out_dir})" if out_dir else ""
            click.echo(f"interrupted{hint}", err=True)
            raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        print_summary(result.report, out_dir)


def _input_names(model: Path) -> list[str] | None:
    """The model's input names (for a bare --input-shape 1x3x224x224), None when it cannot be read here
    (compress then says why)."""
    try:
        return [spec.name for spec in graph_inputs(load_model(model, load_external_data=False))]
    except UserError:
        return None
