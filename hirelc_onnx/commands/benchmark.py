"""`hirelc-onnx benchmark`: ORT latency, throughput, size and memory, side by side with --against."""
from __future__ import annotations

import json
import logging
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from hirelc_onnx.commands.data_options import input_shape_option, parse_input_shapes
from hirelc_onnx.commands.evaluate import compress_run, session_options
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.loaders import load_data
from hirelc_onnx.evaluate.per_node import NodeRow, per_node_rows
from hirelc_onnx.evaluate.runner import (OrtRunner, SessionConfig, benchmark_side_by_side, get_runner, load_onnx, measure_peak_memory,
                                         model_file_size)
from hirelc_onnx.units import fmt_bytes, fmt_speed

__all__ = ["benchmark"]

log = logging.getLogger(__name__)


def _batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {value!r}") from exc
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {value!r}")
    return sizes


@click.command("benchmark")
@click.argument("model")
@click.option("--against", help="Another model (e.g. the fp32 original) measured side by side.")
@click.option("--batch-sizes", default="1", show_default=True, help="Comma-separated, e.g. 1,32.")
@click.option("--runs", type=int, default=30, show_default=True, help="At least this many timed runs per model and batch size.")
@click.option("--time-budget", type=float, default=None,
              help="Seconds of alternating timing rounds per batch size [default: $HIRELC_TIMING_BUDGET_S or 3].")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs first.")
@input_shape_option("[name=]1x3x224x224 for inputs with symbolic dims (repeatable or comma-separated).")
@click.option("--memory/--no-memory", default=True, show_default=True, help="Peak RSS over its baseline, measured in a fresh process per model.")
@click.option("--per-node", is_flag=True,
              help="Per compressed kernel: the op ORT ran after its optimisations, its time (ORT profile) and, "
                   "with --against, its output SNR against that model (random input at the first batch size).")
@click.option("--data", "data_spec", help="--per-node: data for the SNR (first 64 rows; default random input).")
@session_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def benchmark(
    model: str,
    against: str | None,
    batch_sizes: str,
    runs: int,
    time_budget: float | None,
    warmup: int,
    input_shape: tuple[str, ...],
    memory: bool,
    per_node: bool,
    data_spec: str | None,
    threads: int,
    opt_level: str,
    as_json: bool,
) -> None:
    """Time MODEL in ONNX Runtime on random input of its shape; with --against, compare.

    Peak memory: each model loaded and run in a fresh process, its peak RSS over that process's own
    baseline (Python, numpy and ONNX Runtime imported)."""
    config = SessionConfig(graph_optimization_level=opt_level, intra_op_threads=threads)
    model = compress_run(model)[0]  # a compress output folder stands for its model.onnx
    against = None if against is None else compress_run(against)[0]
    sizes = _batch_sizes(batch_sizes)
    models = [model] + ([against] if against else [])
    runners = [get_runner(m, config) for m in models]
    shapes = parse_input_shapes(input_shape, [i.name for i in runners[0].inputs])
    entries = [{"path": m, "file_size_bytes": model_file_size(m), "results": []} for m in models]
    for bs in sizes:
        stats = benchmark_side_by_side(models, bs, warmup, runs, config, shapes, budget_s=time_budget)
        for entry, st in zip(entries, stats):
            if memory:
                st.update(measure_peak_memory(entry["path"], bs, config, shapes))
            entry["results"].append(st)
    report: dict[str, Any] = {"model": entries[0]}
    if against:
        report["against"] = entries[1]
        report["size_ratio"] = entries[1]["file_size_bytes"] / max(1, entries[0]["file_size_bytes"])
        # MODEL's speed against --against: the reciprocal of the timer's --against / MODEL figures
        # (the median of per-round ratios and their interquartile range)
        against_results = entries[1]["results"]
        report["speedup"] = {str(a["batch_size"]): 1 / a["speedup"] for a in against_results}
        report["speedup_iqr"] = {str(a["batch_size"]): [1 / a["speedup_iqr"][1], 1 / a["speedup_iqr"][0]]
                                 for a in against_results}
        report["speed"] = {batch: fmt_speed(v) for batch, v in report["speedup"].items()}  # as the table says it
    rows: list[NodeRow] = []
    if per_node:
        feed = _per_node_feed(runners[0], data_spec, sizes[0], shapes)
        rows = per_node_rows(load_onnx(model), feed, load_onnx(against) if against else None, runs=runs, threads=threads)
        report["per_node"] = [r.as_dict() for r in rows]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_table(report, memory)
    if per_node:
        _print_per_node(rows, against is not None)


def _per_node_feed(runner: OrtRunner, data_spec: str | None, batch: int,
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Real rows when --data is given (the SNR of random input says little about a calibrated model)."""
    if data_spec is None:
        return runner.random_feed(batch, shapes, seed=0)
    ds = runner.fit(load_data(data_spec, runner.input_shape if len(runner.inputs) == 1 else None))
    return ds.rows(slice(0, 64))  # one array per input, keyed by its name (ids stay integers)


def _print_per_node(rows: list[NodeRow], against: bool) -> None:
    console = Console()
    if not rows:
        console.print("per node: no compressed kernel in the model (no quantized op, no in-graph weight decode)")
        return
    table = Table(title="Compressed kernels: what ONNX Runtime ran (after its graph optimisations)")
    columns = ["kernel", "op", "ORT ran", "ms"] + (["fp32 ms", "SNR dB", ""] if against else [])
    for col in columns:
        table.add_column(col, justify="right" if col in ("ms", "fp32 ms", "SNR dB") else "left")
    for r in rows:
        row = [r.kernel, r.op_type, r.executed, "-" if r.ms is None else f"{r.ms:.3f}"]
        if against:
            snr = r.note or "-" if r.snr_db is None else f"{r.snr_db:.1f}"
            row += ["-" if r.fp32_ms is None else f"{r.fp32_ms:.3f}", snr, "slower than fp32" if r.slower else ""]
        table.add_row(*row)
    console.print(table)


def _print_table(report: dict[str, Any], memory: bool) -> None:
    roles = ["model"] + (["against"] if "against" in report else [])
    table = Table(title="ONNX Runtime latency on random input")
    columns = ["batch", "", "median ms", "p90 ms", "items/s"]
    columns += (["peak memory"] if memory else []) + (["speed vs --against"] if len(roles) > 1 else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "" else "right")
    for i, first in enumerate(report["model"]["results"]):
        for role in roles:
            r = report[role]["results"][i]
            row = [str(r["batch_size"]), role, f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['throughput_per_s']:,.0f}"]
            if memory:
                row.append(fmt_bytes(r["delta_bytes"], exact=False))
            if len(roles) > 1:
                batch = str(first["batch_size"])
                q1, q3 = report["speedup_iqr"][batch]
                spread = f"IQR of rounds: {fmt_speed(q1)} to {fmt_speed(q3)}"
                row.append(f"{fmt_speed(report['speedup'][batch])} ({spread})" if role == "model" else "")
            table.add_row(*row)
    console = Console()
    console.print(table)
    for role in roles:
        console.print(f"{role}: {report[role]['path']}, {fmt_bytes(report[role]['file_size_bytes'])}", highlight=False)
    if memory:
        console.print("peak memory: the peak RSS of loading and running the model in a fresh process, over that "
                      "process's own baseline", highlight=False)
    if len(roles) > 1:
        ratio = report["size_ratio"]
        console.print(f"model is {ratio:.2f}x smaller on disk than --against", highlight=False)
