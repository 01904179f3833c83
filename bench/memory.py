"""`make bench-memory`: peak RSS of the CLI on generated big transformers with external data.

Each case generates its model (`examples.big_models`) in a temporary folder, runs one CLI command in
a child process, samples the RSS of that process and its children every 20 ms and reads its
ru_maxrss when it ends, and deletes the folder. Goals (issue 18): `compress --method uniform --bits 4`
of a 100M-parameter model under 3x its fp32 bytes; `inspect` of a 1B-parameter model (4 GB of
weights, written sparse: never read) under 1 GB. Writes `memory.md` (table, machine, versions) and
`memory.json` into --out.

    python -m bench.memory [--out bench] [--compress-d 1024 --compress-layers 12]
                           [--inspect-d 2048 --inspect-layers 30] [--samples 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

from examples.big_models import random_inputs, write_transformer

_CLI = "from hirelc_onnx.cli import main; main()"
_ROOT = Path(__file__).resolve().parent.parent


def peak_rss(argv: list[str], timeout_s: float = 900) -> dict:
    """Run `argv`; its peak RSS (ru_maxrss, and the sampled RSS of the process tree) and seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampled = [0]
    done = threading.Event()

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while not done.is_set():
                tree = [p] + p.children(recursive=True)
                sampled[0] = max(sampled[0], sum(q.memory_info().rss for q in tree if q.is_running()))
                time.sleep(0.02)
        except psutil.Error:  # the process ended between two samples
            pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    done.set()
    thread.join()
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:])} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_rss_bytes": usage.ru_maxrss * scale, "sampled_tree_rss_bytes": sampled[0], "seconds": seconds}


def _case(name: str, command: str, model, limit_bytes: int, limit_text: str, measured: dict) -> dict:
    peak = max(measured["peak_rss_bytes"], measured["sampled_tree_rss_bytes"])
    return {"case": name, "command": command, "params": model.params, "fp32_bytes": model.weight_bytes,
            **measured, "peak_bytes": peak, "peak_over_fp32": peak / model.weight_bytes,
            "goal": limit_text, "goal_bytes": limit_bytes, "met": peak < limit_bytes}


def run_compress(d: int, layers: int, samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hirelc-bench-memory-") as tmp:
        model = write_transformer(Path(tmp) / "model.onnx", d_model=d, layers=layers)
        data = Path(tmp) / "data.npz"
        np.savez(data, x=random_inputs(model, samples))
        args = ["compress", str(model.path), "--method", "uniform", "--bits", "4", "--data", str(data),
                "--finetune-epochs", "0", "--out", str(Path(tmp) / "out")]
        measured = peak_rss([sys.executable, "-c", _CLI, *args])
        out_bytes = sum(p.stat().st_size for p in (Path(tmp) / "out").iterdir() if p.name.startswith("model.onnx"))
        shown = "compress model.onnx --method uniform --bits 4 --data data.npz --finetune-epochs 0 --out out"
        row = _case(f"compress {model.params / 1e6:.0f}M", shown,
                    model, 3 * model.weight_bytes, "< 3x fp32 bytes", measured)
        row["output_bytes"] = out_bytes
        return row


def run_inspect(d: int, layers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hirelc-bench-memory-") as tmp:
        model = write_transformer(Path(tmp) / "model.onnx", d_model=d, layers=layers, sparse=True)
        measured = peak_rss([sys.executable, "-c", _CLI, "inspect", str(model.path), "--json"])
        name = f"inspect {model.params / 1e9:.1f}B" if model.params >= 1e9 else f"inspect {model.params / 1e6:.0f}M"
        return _case(name, "inspect model.onnx --json", model, 1 << 30, "< 1 GiB", measured)


def machine() -> dict:
    import onnx
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "os": platform.platform(), "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def write_results(rows: list[dict], out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "memory.json").write_text(json.dumps({"when": stamp, "machine": info, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory on big models (`make bench-memory`)", "",
        f"{stamp}; {info['cpu']}, {info['cores']} cores, {info['memory_bytes'] / 2**30:.0f} GiB; "
        f"Python {info['python']}, onnx {info['onnx']}, ONNX Runtime {info['onnxruntime']}.", "",
        "Generated transformers (`examples/big_models.py`: LayerNorm + MLP blocks, random weights, every "
        "weight in one external-data file). Peak RSS: the larger of the child's ru_maxrss and its process "
        "tree's RSS sampled every 20 ms. The 1B model is written sparse (4 GB of zeros, no disk blocks): "
        "inspect must not read it.", "",
        "| case | params | fp32 bytes | peak RSS | peak / fp32 | goal | met | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['fp32_bytes'] / 1e6:.0f} MB | "
                     f"{r['peak_bytes'] / 1e6:.0f} MB | {r['peak_over_fp32']:.2f}x | {r['goal']} | "
                     f"{'yes' if r['met'] else 'NO'} | {r['seconds']:.0f} |")
    lines += ["", "Commands (in the generated model's folder):", ""]
    lines += [f"- {r['case']}: `hirelc-onnx {r['command']}`" for r in rows]
    (out / "memory.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--compress-d", type=int, default=1024)
    ap.add_argument("--compress-layers", type=int, default=12)
    ap.add_argument("--inspect-d", type=int, default=2048)
    ap.add_argument("--inspect-layers", type=int, default=30)
    ap.add_argument("--samples", type=int, default=32, help="inputs in the generated --data (split four ways)")
    args = ap.parse_args(argv)
    rows = [run_inspect(args.inspect_d, args.inspect_layers),
            run_compress(args.compress_d, args.compress_layers, args.samples)]
    write_results(rows, args.out, machine())
    print((args.out / "memory.md").read_text())
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
