"""`hirelc-onnx compress`: search a compression config, emit the model, print and write the report."""
from __future__ import annotations

import json
from pathlib import Path

import click

from hirelc_onnx.compress import METHODS
from hirelc_onnx.config import GRANULARITIES, QTYPES, TARGETS

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
    if out_dir:
        console.print(f"outputs in {out_dir}/: model.onnx, config.json, report.json, report.html")


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", help="Compression ratio to reach in true stored bytes, e.g. 6x.")
@click.option("--data", help="A .npz (x, y), an image folder, 'digits', or a plugin package.module:func.")
@click.option("--method", type=click.Choice(METHODS), default="hirelc", show_default=True)
@click.option("--target", type=click.Choice(TARGETS), default="storage", show_default=True,
              help="storage: smallest file (packed int4/int2); ort-cpu: int8 kernels ORT fuses; qdq: plain QDQ.")
@click.option("--max-drop", type=float, help="Largest accepted accuracy drop, in points.")
@click.option("--time-limit", type=float, help="Seconds for the search; the best candidate so far is returned.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder (created).")
@click.option("--bits", type=click.IntRange(2, 32), default=8, show_default=True, help="uniform: weight bits.")
@click.option("--keep", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="uniform / l1-int8: channel keep ratio.")
@click.option("--qtype", type=click.Choice(QTYPES), default="symmetric", show_default=True)
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="per-channel", show_default=True)
@click.option("--evaluations", type=int, default=8, show_default=True, help="Real (fine-tuned) evaluations.")
@click.option("--finetune-seconds", type=float, default=20.0, show_default=True, help="Per real evaluation.")
@click.option("--finetune-epochs", type=click.IntRange(0), default=None,
              help="Fine-tune each real evaluation for this many epochs instead of --finetune-seconds: "
                   "the same training for every candidate, and a repeatable run.")
@click.option("--flops", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="graph-rl: keep at most this fraction of the original MACs.")
@click.option("--params", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="graph-rl: keep at most this fraction of the original kernel parameters.")
@click.option("--resume", is_flag=True, help="Continue a killed run from the state in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def compress(model, budget, data, method, target, max_drop, time_limit, seed, out_dir, bits, keep, qtype,
             granularity, evaluations, finetune_seconds, finetune_epochs, flops, params, resume, as_json) -> None:
    """Compress MODEL and write the smaller model with its report."""
    from hirelc_onnx.compress import compress as run

    options = {}
    if method == "uniform":
        if bits not in (2, 3, 4, 5, 6, 7, 8, 32):
            raise click.BadParameter("bits must be 2..8 or 32", param_hint="--bits")
        options.update(bits=bits, keep=keep, qtype=qtype, granularity=granularity)
    elif method == "l1-int8":
        options.update(keep=keep if keep < 1.0 else 0.5)
    if flops is not None or params is not None:
        if method != "graph-rl":
            raise click.BadParameter("--flops / --params constrain --method graph-rl")
        options.update(flops=flops, params=params)
    if resume:
        if out_dir is None:
            raise click.BadParameter("--resume needs --out (where the killed run kept its state)")
        options["resume"] = True
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True, disable=as_json) as bar:
        task = bar.add_task(f"{method}: real evaluations (prune, fine-tune, quantize, measure)", total=evaluations)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = run(model, budget=budget, data=data, method=method, target=target, max_drop=max_drop,
                         time_limit=time_limit, seed=seed, out_dir=out_dir, evaluations=evaluations,
                         finetune_seconds=finetune_seconds, finetune_epochs=finetune_epochs, progress=progress,
                         **options)
        except KeyboardInterrupt:
            hint = f"; continue with the same command plus --resume (state in {out_dir})" if out_dir else ""
            click.echo(f"interrupted{hint}", err=True)
            raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        print_summary(result.report, out_dir)
