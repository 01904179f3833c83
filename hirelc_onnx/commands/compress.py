"""`hirelc-onnx compress`: search a compression config, emit the model, print and write the report.

Built for pipelines: the exit status says whether the goals were met (EXIT_CODES), every default is
shown in --help and printed when it decides something (the output folder, a method's default
budget), and the last lines list every file the run left.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from hirelc_onnx.commands.data_options import image_option_values, image_options, input_shape_option, parse_input_shapes
from hirelc_onnx.commands.feedback import progress_display
from hirelc_onnx.compress import compress as run_compress
from hirelc_onnx.config import DEFAULT_WEIGHT_RANGE, GRANULARITIES, QTYPES, TARGETS, WEIGHT_RANGES
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.loaders import graph_inputs
from hirelc_onnx.graph import load_model
from hirelc_onnx.report.build import goal_verdict
from hirelc_onnx.report.outputs import STATE_FILE, run_files
from hirelc_onnx.search.methods import METHODS, takers
from hirelc_onnx.units import fmt_bytes, fmt_speed

__all__ = ["compress", "print_summary", "goal_line", "file_lines", "default_out_dir", "resume_hint", "EXIT_CODES",
           "GOAL_MISSED"]

GOAL_MISSED = 3
"""The exit status of a run that wrote its best model but missed the budget or --max-drop."""
EXIT_CODES = {0: "the goals were met (or none was set)",
              GOAL_MISSED: "the budget or --max-drop was missed; the best model is still written and the "
                           "miss is the first line printed",
              2: "bad input: an option, the model, the data or --out (one error: line)",
              130: "interrupted (Ctrl-C)",
              1: "an internal error (a bug: one error: line; -v shows the traceback)"}


def default_out_dir(model: Path) -> Path:
    """The output folder when neither --out nor --output-model is given: `<model name>.hirelc` here."""
    return Path(f"{Path(model).stem}.hirelc")


def goal_line(report: dict) -> tuple[bool | None, str]:
    """Whether the run met its goals (None: it had none) and one sentence saying so, with the limits
    (report/build.py: goal_verdict, the wording report.json and report.html use too)."""
    return goal_verdict(report)


def resume_hint(method: str, out_dir: Path | None) -> str:
    """What an interrupted run can do next: --resume only when the method resumes and its state is there."""
    if out_dir is None or "resume" not in METHODS[method].options:
        return ""
    if (Path(out_dir) / STATE_FILE).is_file():
        return f"; the rounds done are saved in {Path(out_dir) / STATE_FILE}: continue with the same command plus --resume"
    return "; no round had finished, so nothing was saved to resume"


def print_summary(report: dict, out_dir: Path | None) -> None:
    """The goal line first (met or missed, with the limits), then the table: size, ratio, accuracy and
    drop, latency vs fp32; then warnings and every file the run left."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 120)
    met, line = goal_line(report)
    console.print(line, style="bold red" if met is False else None, highlight=False)
    size, acc, lat = report["size"], report.get("accuracy"), report.get("latency", {})
    t = Table(title=f"{report['method']} -> target {report['target']}")
    t.add_column("")
    t.add_column("fp32", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio / change", justify="right")
    t.add_row("weights", fmt_bytes(size['original_weight_bytes']), fmt_bytes(size['weight_bytes']),
              f"{size['ratio']:.2f}x smaller")
    t.add_row("file", fmt_bytes(size['original_file_bytes']), fmt_bytes(size['file_bytes']),
              f"{size['file_ratio']:.2f}x smaller")
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
                      fmt_speed(v["speedup"]))
    console.print(t)
    if (report.get("per_node") or {}).get("skipped"):
        console.print(f"latency: not measured ({report['per_node']['error']})", highlight=False)
    speed = report.get("ort_cpu_speed") or {}
    kept = len(speed.get("kept_fp32", {})) + sum(not f["kernel"].startswith("(")  # "(activation ...)": no kernel
                                                 for f in speed.get("whole_model_fallbacks", []))
    if kept:
        console.print(f"ort-cpu: {kept} kernel(s) run as fp32 kernels, ORT being slower with their int8 version "
                      "(report.json: ort_cpu_speed)", highlight=False)
    goal = report.get("speed_goal")
    if goal:
        console.print(f"{'[yellow]' if not goal['met'] else ''}speedup goal {goal['speedup']:g}x at batch {goal['batch']}: "
                      f"{'met' if goal['met'] else 'NOT met'} (measured {goal['measured_speedup']:.2f}x)"
                      f"{'[/]' if not goal['met'] else ''}", highlight=False)
    if acc and acc.get("finetune_warning"):
        console.print(f"[yellow]warning: {acc['finetune_warning']}[/]")
    if acc and acc.get("sample_warning"):
        console.print(f"[yellow]warning: {acc['sample_warning']}[/]", highlight=False)
    if acc and acc.get("data_free_note"):
        console.print(f"[yellow]{acc['data_free_note']}[/]", highlight=False)
    elif acc and not acc.get("task_accuracy_measured", True):
        console.print("[yellow]the data have no class labels: the score is fidelity to the fp32 model, "
                      "not task accuracy[/]", highlight=False)
    console.print("\n".join(file_lines(report, out_dir)), highlight=False)


def file_lines(report: dict, out_dir: Path | None) -> list[str]:
    """`files:` and every file the run left, one path a line (the outputs, the search state, --output-model)."""
    paths = [str(p) for p in run_files(out_dir)] if out_dir is not None else []
    extra = (report.get("outputs") or {}).get("output_model")
    if extra:
        paths += [extra] + ([f"{extra}.data"] if Path(f"{extra}.data").is_file() else [])
    return ["files:"] + [f"  {p}" for p in paths]


_BUDGET_DEFAULTS = ", ".join(f"{m.default_budget:g}x for {m.name}" for m in METHODS.values() if m.default_budget)
_EPILOG = ("\b\nMethods:\n" + "\n".join(f"  {m.name:<11} {m.summary}" for m in METHODS.values())
           + "\n\n\b\nExit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items()))


@click.command(epilog=_EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", show_default=f"{_BUDGET_DEFAULTS}, printed when used; none for the others",
              help=f"Compression ratio to reach in true stored bytes, e.g. 6x ({takers('budget')}).")
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
@click.option("--max-drop", type=float, show_default="none: no accuracy goal",
              help=f"Largest accepted accuracy drop on the test split, in points; missed: exit status 3 "
                   f"({takers('max_drop')}).")
@click.option("--time-limit", type=float, show_default="none",
              help=f"Seconds for the search; the best candidate so far is returned ({takers('time_limit')}).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the search and the split of --data.")
@click.option("--split-fractions", metavar="CALIB,FINETUNE,VAL,TEST", show_default="0.1,0.5,0.15,0.25",
              help="Shares of --data for calibration, fine-tuning, validation (the search picks its winner on it) "
                   "and the test split the report scores; a larger VAL makes the pick among close candidates "
                   "less noisy.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              show_default="MODEL's name + .hirelc in the current folder, unless only --output-model is given",
              help="Output folder (created): model.onnx, config.json, report.json, report.html. One holding "
                   "another run's files is refused unless --overwrite (or --resume, to continue that run).")
@click.option("--output-model", type=click.Path(path_type=Path), show_default="none",
              help="Also write the compressed model to this file (replacing it), for a pipeline; alone, "
                   "without --out, only this file is written.")
@click.option("--overwrite", is_flag=True,
              help="Replace the earlier run in --out: its files (model.onnx, report*, config.json, "
                   "search_state*) are removed first; other files there are left alone.")
@click.option("--bits", type=click.IntRange(2, 32),
              help="Weight bits: uniform (default 8, 7 under ort-cpu), graph-rl (default 8, 7 under ort-cpu; 32 prunes only).")
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
@click.option("--finetune-epochs", type=click.IntRange(0), default=None, show_default="none: --finetune-seconds",
              help="Fine-tune each real evaluation for this many epochs instead of --finetune-seconds: "
                   f"the same training for every candidate, and a repeatable run ({takers('finetune_epochs')}; "
                   "with --data).")
@click.option("--channel-multiple", type=click.IntRange(1), default=None,
              show_default="16 with --target ort-cpu or --speedup, else 8",
              help="Pruned channel counts are rounded to a multiple of this (a group whose width it does not "
                   f"divide: its largest half that does); 1 rounds nothing ({takers('channel_multiple')}). ORT's "
                   "fp32 convolutions work in blocks of 16 channels on AVX-512 and pad a cut inside one.")
@click.option("--weight-range", type=click.Choice(WEIGHT_RANGES), default=DEFAULT_WEIGHT_RANGE, show_default=True,
              help="How each quantized weight's grid range is set: mse clamps each channel or group to the part "
                   "of its range the grid fits with the least squared error (fine-tuning starts from it); "
                   f"minmax spans every weight ({takers('weight_range')}).")
@click.option("--speedup", help="Only accept candidates whose ORT latency, measured on this machine, is at least this "
              f"factor below fp32's, e.g. 1.5x; combinable with --budget ({takers('speedup')}).")
@click.option("--batch", type=click.IntRange(1), help="The batch size --speedup is measured at (default 1).")
@click.option("--flops", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="graph-rl: keep at most this fraction of the original MACs (0.5 when no limit is given).")
@click.option("--params", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="graph-rl: keep at most this fraction of the original kernel parameters.")
@click.option("--prior", type=click.Choice(["l1-fisher", "none"]),
              help="graph-rl: start the policy from the L1 + Fisher channel ranking, its cut measured where the "
                   "proxy ranks it among the best (l1-fisher, the default), or from uninformative logits, "
                   "measuring only the policy's episodes (none).")
@click.option("--output-kind", help="What the outputs hold, overriding their classification: one kind for all, "
              "or name=kind,... (class-scores, sequence-scores, dense-map, embedding).")
@click.option("--metric", help="A task metric package.module:func(outputs, labels) -> float to optimise and report "
              "(higher is better; see --metric-mode).")
@click.option("--metric-mode", type=click.Choice(["max", "min"]), default="max", show_default=True,
              help="max: --metric is a score; min: it is a loss.")
@click.option("--resume", is_flag=True, help=f"Continue a killed run from the state in --out ({takers('resume')}).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Run each batch of real evaluations on this many local processes (1: in this process).")
@click.option("--ray", metavar="auto|HOST:PORT",
              help="Run real evaluations as tasks on an existing Ray cluster (needs: pip install hirelc-onnx[ray]).")
@click.option("--latency-runs", type=click.IntRange(0), default=20, show_default=True,
              help="Timed runs per batch size for the report's latency rows and per-kernel profile (fp32 and "
                   "compressed side by side); 0 skips both, for a pipeline that times the model itself.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@click.pass_context
def compress(ctx: click.Context, model, data, method, target, seed, split_fractions, out_dir, output_model, overwrite,
             as_json, input_shape, output_kind, metric, metric_mode, workers, ray, latency_runs,
             **method_options) -> None:
    """Compress MODEL and write the smaller model with its report."""
    image = {k: v for k, v in image_option_values(method_options).items() if v is not None}
    shapes = parse_input_shapes(input_shape, _input_names(model) if input_shape else None)
    # only the options typed on the command line reach compress(), never a default: an option the
    # method would ignore is then an error instead of a silent no-op
    options = {name: value for name, value in method_options.items()
               if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    if "bits" in options and options["bits"] not in (2, 3, 4, 5, 6, 7, 8, 32):
        raise click.BadParameter("bits must be 2..8 or 32", param_hint="--bits")
    if overwrite and out_dir is None and output_model is not None:
        raise click.UsageError("--overwrite replaces an earlier run in an --out folder: give --out, or drop it")
    chosen = METHODS[method]
    said = []  # the defaults this run decides, said once its checks pass (a refusal stays one line)
    if out_dir is None and output_model is None:
        out_dir = default_out_dir(model)
        said.append(f"output folder: {out_dir}/ (the default; --out chooses)")
    if chosen.default_budget is not None and "budget" not in options:
        said.append(f"budget: {chosen.default_budget:g}x (the {method} default; --budget chooses)")
    with progress_display(enabled=not as_json) as progress:  # a bar on a terminal, else one line per phase
        try:
            result = run_compress(model, method=method, data=data, target=target, seed=seed, out_dir=out_dir,
                                  output_model=output_model, overwrite=overwrite,
                                  started=lambda: _started(said),
                                  progress=progress, input_shape=shapes or None, output_kind=output_kind,
                                  metric=metric, metric_mode=metric_mode, workers=workers, ray=ray,
                                  split_fractions=split_fractions, latency_runs=latency_runs, **image, **options)
        except KeyboardInterrupt:
            click.echo(f"interrupted{resume_hint(method, out_dir)}", err=True)
            raise SystemExit(130) from None
    if as_json:  # stdout is the report alone; the goal and the files go to stderr
        click.echo(json.dumps(result.report, indent=2, default=str))
        click.echo("\n".join([goal_line(result.report)[1], *file_lines(result.report, out_dir)]), err=True)
    else:
        print_summary(result.report, out_dir)
    if goal_line(result.report)[0] is False:
        ctx.exit(GOAL_MISSED)


def _started(said: list[str]) -> None:
    """Every check passed: say the defaults this run decided."""
    if said:
        click.echo("\n".join(said), err=True)


def _input_names(model: Path) -> list[str] | None:
    """The model's input names (for a bare --input-shape 1x3x224x224), None when it cannot be read here
    (compress then says why)."""
    try:
        return [spec.name for spec in graph_inputs(load_model(model, load_external_data=False))]
    except UserError:
        return None
