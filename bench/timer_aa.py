"""`make bench-timer`: an A/A check of the side-by-side latency timer.

Each reference model (fp32) is timed against a byte-different copy of itself (one metadata entry
added: the same graph and weights, but its own ORT session) with
`evaluate/runner.py: benchmark_side_by_side`, several times per batch size. A perfect timer says
1.00 every time; how far the "speedups" stray from 1.00 is the noise a real comparison (the report's
latency rows, the --speedup goal check, ort-cpu's whole-model check) cannot tell from an effect.
Writes `<out>.md` (table, machine, load) and `<out>.json`.

    python -m bench.timer_aa [--models resnet20,vit,vgg] [--batches 1,32] [--repeats 5]
                             [--budget SECONDS] [--runs 30] [--out bench/timer_aa]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import onnx
import onnxruntime

from examples.reference_models import build_reference_model
from hirelc_onnx.evaluate.runner import benchmark_side_by_side

GOAL = (0.97, 1.03)
"""Every A/A ratio should fall inside this band."""


def twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with one more metadata entry: equal work, different bytes, its own session."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    entry = copy.metadata_props.add()
    entry.key, entry.value = "timer_aa", "copy"
    return copy


def aa_ratio(model: onnx.ModelProto, copy: onnx.ModelProto, batch: int, runs: int,
             budget_s: float | None) -> dict:
    """One A/A timing: the timer's own ratio (and spread) when it reports one, else fp32 / copy medians."""
    kwargs = {}
    if budget_s is not None and "budget_s" in inspect.signature(benchmark_side_by_side).parameters:
        kwargs["budget_s"] = budget_s
    a, b = benchmark_side_by_side([model, copy], batch_size=batch, runs=runs, warmup=3, **kwargs)
    out = {"fp32_ms": a["median_ms"], "copy_ms": b["median_ms"], "runs": b["runs"]}
    if "speedup" in b:  # the timer's median per-round ratio
        out.update(ratio=b["speedup"], iqr=b.get("speedup_iqr"), rounds=b.get("rounds"))
    else:
        out["ratio"] = a["median_ms"] / b["median_ms"]
    return out


def run(models: list[str], batches: list[int], repeats: int, runs: int, budget_s: float | None) -> list[dict]:
    rows = []
    for name in models:
        model = onnx.load(str(build_reference_model(name)))
        copy = twin(model)
        for batch in batches:
            timings = [aa_ratio(model, copy, batch, runs, budget_s) for _ in range(repeats)]
            ratios = [t["ratio"] for t in timings]
            rows.append({"model": name, "batch": batch, "timings": timings, "ratios": ratios,
                         "worst_deviation": max(abs(r - 1.0) for r in ratios),
                         "within_goal": all(GOAL[0] <= r <= GOAL[1] for r in ratios)})
            print(_row_md(rows[-1]), flush=True)
    return rows


def _row_md(r: dict) -> str:
    fp32 = sum(t["fp32_ms"] for t in r["timings"]) / len(r["timings"])
    iqrs = [t.get("iqr") for t in r["timings"]]
    spread = " ".join(f"{q[0]:.2f}-{q[1]:.2f}" for q in iqrs) if all(iqrs) else "-"
    return (f"| {r['model']} | {r['batch']} | {fp32:.3f} | {' '.join(f'{x:.3f}' for x in r['ratios'])} "
            f"| {r['worst_deviation']:.3f} | {'yes' if r['within_goal'] else 'no'} | {spread} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vit,vgg")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="runs (the timer's minimum timed runs per model)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per timing (the timer's budget_s; default: the timer's own)")
    parser.add_argument("--out", default="bench/timer_aa", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    start = datetime.now(timezone.utc)
    load = os.getloadavg()[0]
    header = ["| model | batch | fp32 ms | A/A ratios | worst abs(ratio - 1) | all within "
              f"{GOAL[0]:.2f}-{GOAL[1]:.2f} | per-timing IQR of round ratios |", "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = run(models, batches, args.repeats, args.runs, args.budget)
    meta = {"started": start.isoformat(timespec="seconds"), "load_1min_at_start": load,
            "seconds": (datetime.now(timezone.utc) - start).total_seconds(), "repeats": args.repeats,
            "runs": args.runs, "budget_s": args.budget, "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# A/A check of the side-by-side latency timer", "",
             f"fp32 against a byte-different copy of itself, {args.repeats} timings per row "
             f"(`python -m bench.timer_aa`); a perfect timer gives 1.000. Started {meta['started']}, "
             f"load {load:.2f}, {meta['seconds']:.0f} s, {meta['cpus']} CPUs, onnxruntime {meta['onnxruntime']}.", "",
             *header, *(_row_md(r) for r in rows)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
