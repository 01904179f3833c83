"""`make bench-scale`: real evaluations per minute in-process, on 2 local workers and on a 2-node Ray cluster.

One run, one model (ResNet-20 on digits), one search (random: its candidates are one batch), the
same seed and fine-tuning epochs for every executor, so each executor does the same work and must
emit the same bytes (checked). Throughput is evaluations / seconds spent inside `measure_batch`
(the batches' wall time, from the report), beside the whole command's wall time. The Ray cluster
runs on loopback in a namespace of its own (bench/loopback_ray.py), one CPU per node.

Then a projection, not a measurement: evaluations per minute on 1..16 nodes for the batch sizes
the methods propose, from the measured per-evaluation wall time on Ray and the measured per-batch
overhead (batch time minus its evaluations' longest chain), assuming every node as fast as this
machine's and the first evaluation of a fine-tuned run alone (it settles the learning rate).

    python -m bench.scale [--evaluations 12] [--finetune-epochs 2] [--out bench]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES = (1, 2, 4, 8, 16)


def _compress_argv(model: Path, out: Path, evaluations: int, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hirelc_onnx", "compress", str(model), "--method", "random", "--data", "digits",
            "--budget", "6x", "--evaluations", str(evaluations), "--finetune-epochs", str(epochs), "--seed", "0",
            "--out", str(out), "--json", *extra]


def _row(name: str, report: dict, wall: float, out: Path) -> dict:
    batches = report["search"]["batches"]
    runs = report["search"]["evaluations"]
    batch_seconds = sum(b["seconds"] for b in batches)
    n = sum(b["size"] for b in batches)
    return {"executor": name, "evaluations": n, "batch_seconds": batch_seconds,
            "evaluations_per_minute": 60.0 * n / batch_seconds, "command_seconds": wall,
            "mean_evaluation_seconds": sum(r["wall_seconds"] for r in runs) / len(runs),
            "mean_queue_seconds": sum(r["queue_seconds"] for r in runs) / len(runs),
            "workers": sorted({r["worker"] for r in runs}), "nodes": sorted({r["node"] for r in runs}),
            "model_bytes": (out / "model.onnx").read_bytes()}


def _projection(eval_seconds: float, overhead: float, batch_sizes: dict[str, int]) -> list[dict]:
    """Evaluations per minute on k one-task nodes: a batch of b takes ceil(b / k) evaluation times
    (its first alone when fine-tuned) plus the measured overhead per batch."""
    rows = []
    for method, b in batch_sizes.items():
        row = {"method": method, "batch": b}
        for k in NODES:
            seconds = eval_seconds * (1 + math.ceil((b - 1) / k)) + overhead if b > 1 else eval_seconds + overhead
            row[str(k)] = 60.0 * b / seconds
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    from bench.loopback_ray import namespaces_available, run_in_namespace
    from examples.reference_models import reference_model_path

    model = reference_model_path("resnet20")
    load_before = os.getloadavg()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"hirelc-bench-scale-{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    for name, extra in (("in-process (--workers 1)", ()), ("2 local workers", ("--workers", "2"))):
        out = work / name.split()[0]
        t0 = time.perf_counter()
        res = subprocess.run(_compress_argv(model, out, args.evaluations, args.finetune_epochs, *extra),
                             capture_output=True, text=True, env=env, timeout=3600)
        if res.returncode:
            raise SystemExit(f"{name}: {res.stderr[-2000:]}")
        rows.append(_row(name, json.loads(res.stdout), time.perf_counter() - t0, out))
    why = namespaces_available()
    ray_note = None
    if why is None:
        out = work / "ray"
        seen = run_in_namespace({"commands": [_compress_argv(model, out, args.evaluations, args.finetune_epochs,
                                                             "--ray", "ADDRESS")], "cpus": [1, 1]}, timeout=3600)
        (run,) = seen["commands"]
        if run["rc"]:
            raise SystemExit(f"ray: {run['stderr'][-2000:]}")
        rows.append(_row("Ray, 2 nodes x 1 CPU (loopback)", json.loads(run["stdout"][run["stdout"].index("{"):]),
                         run["seconds"], out))
        ray_note = (f"cluster start {seen['cluster_start_seconds']:.0f} s (not counted); sockets seen: "
                    f"{', '.join(seen['sockets'])}")
    else:
        ray_note = f"Ray row skipped: {why}"
    same = len({r.pop("model_bytes") for r in rows}) == 1
    base = rows[-1]
    batches = base["evaluations"]
    overhead = max(0.0, base["batch_seconds"] - base["mean_evaluation_seconds"]
                   * (1 + math.ceil((batches - 1) / 2)))
    projection = _projection(base["mean_evaluation_seconds"], overhead,
                             {"random (--evaluations 8)": 8, "random (--evaluations 64)": 64,
                              "uniform-l1 (one per bit width)": 7, "hirelc (default: 1 per round)": 1,
                              "hirelc (batch_size 4 per round)": 4})
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
              "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
              "evaluations": args.evaluations, "finetune_epochs": args.finetune_epochs, "rows": rows,
              "identical_models": same, "ray_note": ray_note, "projection_basis": {
                  "evaluation_seconds": base["mean_evaluation_seconds"], "batch_overhead_seconds": overhead,
                  "from": base["executor"]}, "projection": projection}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    (args.out / "scale.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    lines = ["# Scale-out: real evaluations per minute (`make bench-scale`)", "",
             f"{r['date']}, {r['machine']}, {r['cpus']} CPUs, shared with other jobs (load average "
             f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after). ResNet-20 on digits, "
             f"`--method random --evaluations {r['evaluations']} --finetune-epochs {r['finetune_epochs']} --seed 0`; "
             "throughput = evaluations / seconds inside the batches.", "",
             "| executor | evaluations / min | batch s | command s | mean evaluation s | mean queue s | workers | nodes |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['executor']} | {row['evaluations_per_minute']:.2f} | {row['batch_seconds']:.1f} | "
                     f"{row['command_seconds']:.1f} | {row['mean_evaluation_seconds']:.1f} | "
                     f"{row['mean_queue_seconds']:.1f} | {len(row['workers'])} | {len(row['nodes'])} |")
    b = r["evaluations"]
    best = b / (1 + math.ceil((b - 1) / 2)) if r["finetune_epochs"] else min(b, 2)
    lines += ["", f"Emitted models byte-identical across executors: {'yes' if r['identical_models'] else 'NO'}. "
              f"{r['ray_note']}. At equal evaluation times, two workers or nodes run at most {best:.2f}x the "
              "evaluations per minute of one here: the first evaluation of a fine-tuned run runs alone (it settles "
              "the learning rate the others start from). Beyond that, a worker's evaluation can be shorter than "
              "in-process (one ORT thread per worker on a 2-core machine shared with other jobs).", "",
              "## Projection (not measured): evaluations per minute on k nodes, one task per node", "",
              f"From the {r['projection_basis']['from']} row: {r['projection_basis']['evaluation_seconds']:.1f} s per "
              f"evaluation and {r['projection_basis']['batch_overhead_seconds']:.1f} s overhead per batch; a batch of "
              "b takes (1 + ceil((b - 1) / k)) evaluations' time plus the overhead (the first evaluation of a "
              "fine-tuned run alone; conservative for HiReLC's later rounds, whose rate is settled). Assumes nodes "
              "as fast as this one and no contention; HiReLC rows count its measuring only, not each round's RL.", "",
              "| method (batch size) | " + " | ".join(f"{k} node{'s' if k > 1 else ''}" for k in NODES) + " |",
              "|---|" + "---|" * len(NODES)]
    for row in r["projection"]:
        lines.append(f"| {row['method']} | " + " | ".join(f"{row[str(k)]:.1f}" for k in NODES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
