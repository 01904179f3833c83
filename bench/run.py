"""`make bench`: methods x models, every figure measured side by side in one run.

Writes `bench/RESULTS.md` (a markdown table with machine and versions in its header) and
`bench/results.json`. Columns: true-bytes ratio, file ratio, held-out score and its drop vs fp32,
ORT latency ratio vs fp32 at batch 1 and 32 (fp32 and candidate timed interleaved in one process),
and the method's wall time. A second table compares graph-rl with uniform L1 channel pruning at
50% of the MACs, both fine-tuned for the same fixed number of epochs, over several seeds (`PRUNING`).
A third gives the pass-level latency check: fp32 vs 50% channels pruned vs int8 `ort-cpu`, on each
reference model.

    python -m bench.run [--quick] [--models resnet20,vgg] [--methods uniform4,hirelc] [--out bench/]
    python -m bench.run --pruning-only [--models vgg]     # the graph-rl vs L1 table alone
    python -m bench.run --finetune-epochs 20              # digits rows fine-tune by epochs: repeatable
    python -m bench.run --plan speed --extra-seeds 1,2    # the speed rows, and on the digits models over seeds
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


log = logging.getLogger("bench")

# bench row name -> (compress() method, target, budget, options); "l1-flops50" is filled in per model
# (`_compress_args`)
METHOD_SPECS: dict[str, tuple[str, str, str | None, dict]] = {
    "uniform8": ("uniform", "storage", None, {"bits": 8}),
    "uniform6": ("uniform", "storage", None, {"bits": 6}),
    "uniform4": ("uniform", "storage", None, {"bits": 4}),
    "l1-int8": ("l1-int8", "ort-cpu", None, {"keep": 0.5}),
    "ort-int8": ("ort-int8", "ort-cpu", None, {}),
    "random": ("random", "storage", "6x", {}),
    "uniform-l1": ("uniform-l1", "storage", "6x", {}),
    "hirelc": ("hirelc", "storage", "6x", {}),
    "hirelc-12x": ("hirelc", "storage", "12x", {}),
    "l1-flops50": ("uniform", "ort-cpu", None, {"bits": 7}),
    "graph-rl-flops50": ("graph-rl", "ort-cpu", None, {"flops": 0.5}),
    "two-stage": ("two-stage", "storage", "30x", {}),
    # ort-cpu never slower than fp32 (issue 15): hirelc at 4x (7-bit kernels store about 3.9x, so a
    # little pruning), every kernel ORT runs slower in int8 kept fp32
    "hirelc-ort": ("hirelc", "ort-cpu", "4x", {}),
    # --speedup 1.5x --batch 32 (issue 15), every method under the same constraint, the latency limit
    # alone (hirelc's size goal then defaults to what 7-bit kernels reach unpruned: speed.speed_budget;
    # at 4x it had to prune EfficientNet-Lite0 for bytes alone); "l1-speed" is uniform L1
    # pruning, 7-bit ort-cpu, at the largest keep meeting it by the same calibrated estimate and
    # whole-model timing (search/baselines.py: _uniform_keep_for_speed)
    "hirelc-speed": ("hirelc", "ort-cpu", None, {"speedup": "1.5x", "batch": 32}),
    "graph-rl-speed": ("graph-rl", "ort-cpu", None, {"speedup": "1.5x", "batch": 32}),
    "random-speed": ("random", "ort-cpu", None, {"speedup": "1.5x", "batch": 32}),
    "l1-speed": ("uniform", "ort-cpu", None, {"bits": 7, "speedup": "1.5x", "batch": 32}),
}
SPEED_ROWS = ("hirelc-speed", "graph-rl-speed", "random-speed", "l1-speed")
DIGIT_MODELS = ("resnet20", "vgg", "mobilenetv2", "vit")
# What each model is benchmarked with (the issues' acceptance rows; bench/SPEED.md: what they cost).
FULL_PLAN = {
    "resnet20": ["uniform8", "uniform4", "l1-int8", "ort-int8", "random", "uniform-l1", "hirelc", "hirelc-12x",
                 "hirelc-ort"],
    "vgg": ["uniform4", "ort-int8", "two-stage", "hirelc-ort"],
    "mobilenetv2": ["uniform4", "ort-int8", "hirelc", "graph-rl-flops50", "hirelc-ort"],
    "vit": ["uniform4", "ort-int8", "hirelc", "hirelc-ort"],
    "efficientnet-lite0": ["ort-int8", "hirelc"],
}
# The `--speedup` rows and EfficientNet-Lite0's ort-cpu rows: `make bench-speed` (`--plan speed`), not
# `make bench`, which with them ran 67 minutes (2026-11-29 03:30 run: the ResNet-20 and VGG speed rows
# 1094 s; EfficientNet-Lite0's ort-cpu search with one evaluation ran over 13 minutes, bench/SPEED.md).
SPEED_PLAN = {"resnet20": list(SPEED_ROWS), "vgg": list(SPEED_ROWS),
              "efficientnet-lite0": ["hirelc-ort", *SPEED_ROWS]}
PLANS = {"full": FULL_PLAN, "speed": SPEED_PLAN}
# Per-model departures from the run's evaluations / fine-tuning budget. EfficientNet-Lite0: 400 photo
# crops (100 held out, so one crop is a point, not 2.5), and fine-tuning for a few epochs of a 224x224
# network on 2 cores (an epoch of 200 crops takes about 17 s: 4 epochs, or 75 s on the clock when the
# run fine-tunes by seconds), with fewer rounds to pay.
# The score of its rows is top-1 agreement on 1000 held-out crops (bench-search's, `bench.search.make_task`:
# other images' seed, one crop a tenth of a point): on the test split's 100 the speed rows' methods
# landed within 2 crops of each other, too few to rank them (issue 15's third line).
MODEL_SETTINGS = {"efficientnet-lite0": {"crops": 400, "evaluations": 3, "finetune_seconds": 75.0,
                                         "finetune_epochs": 4, "held_out": 1000}}
QUICK_PLAN = {"resnet20": ["uniform4", "ort-int8"]}
# The speed rows on the digits models, again at more seeds (`--plan speed`): on 449 test digits one image
# is 0.22 points and the speed rows' methods land within two images of each other, so which method scores
# best on one split says little (bench/speed/RESULTS.md: VGG's seed 0). Each seed re-splits the data; the
# main table's row is seed 0, these add the others (score and goal only: no latency rows, no OpenVINO).
SPEED_SEEDS = {"models": ("resnet20", "vgg"), "seeds": (1, 2)}
# Graph-RL vs uniform L1 channel pruning at the same MACs (issue 7's acceptance), on its own table:
# both fine-tuned for the same fixed number of epochs (no clock, so the comparison is the same on a
# busy machine and a run is repeatable), at a short and a long budget, over seeds that each re-split
# the data (on 449 test digits one image is 0.22 points; one seed cannot separate two methods).
# The two rows compared are METHOD_SPECS' "l1-flops50" and "graph-rl-flops50".
PRUNING = {"models": ("resnet20", "vgg"), "seeds": (0, 1, 2), "epochs": (3, 30), "evaluations": 4}
QUICK_PRUNING = {"models": ("resnet20",), "seeds": (0,), "epochs": (1,), "evaluations": 1,
                 "episodes": 16}


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def _model_and_data(name: str, quick: bool):
    """(model path, compress()'s data, held-out scorer or None): the scorer maps an emitted model to
    its score on samples the search never saw (`MODEL_SETTINGS[name]["held_out"]` of them)."""
    from examples.reference_models import build_reference_model

    held_out = 0 if quick else MODEL_SETTINGS.get(name, {}).get("held_out", 0)
    if name == "efficientnet-lite0":
        from bench.search import make_task

        crops = 48 if quick else MODEL_SETTINGS[name]["crops"]
        task = make_task(name, Path("."), held_out or 1, crops)  # the search's crops: effnet_crops(crops, seed=0)
        return task.path, task.data, (lambda model: task.score(model, None)) if held_out else None
    return build_reference_model(name), "digits", None


def l1_keep(path) -> float:
    """The largest uniform L1 keep ratio whose model, its channel counts rounded to the multiple
    compress() rounds them to under the row's target (`default_channel_multiple`), has at most the MACs
    graph-rl is held to (fitted on unrounded counts, the VGG reference kept 0.534 of the MACs, above the
    0.5 limit)."""
    from dataclasses import replace

    from hirelc_onnx.compress import default_channel_multiple
    from hirelc_onnx.graph import build_block_graph, load_model
    from hirelc_onnx.search.baselines import keep_for_flops

    multiple = default_channel_multiple(METHOD_SPECS["l1-flops50"][1], None)
    bg = replace(build_block_graph(load_model(path)), channel_multiple=multiple)
    return keep_for_flops(bg, METHOD_SPECS["graph-rl-flops50"][3]["flops"])


def _compress_args(method: str, path) -> tuple[str, str, str | None, dict]:
    """METHOD_SPECS[method] with per-model options filled in: "l1-flops50" gets the uniform L1 keep
    ratio that lands on the MACs limit "graph-rl-flops50" is held to."""
    kind, target, budget, options = METHOD_SPECS[method]
    if method == "l1-flops50":
        options = {**options, "keep": l1_keep(path)}
    return kind, target, budget, options


def _taken(kind: str, **run_wide) -> dict:
    """The run-wide settings (evaluations, fine-tuning budget) that method `kind` takes: compress()
    refuses an option a method would ignore, and None counts as not given."""
    from hirelc_onnx.search.methods import METHODS

    return {name: value for name, value in run_wide.items() if name in METHODS[kind].options and value is not None}


def run_methods(plan: dict[str, list[str]], evaluations: int, finetune_seconds: float, quick: bool,
                finetune_epochs: int | None = None, on_row=None) -> list[dict]:
    """The methods table. finetune_epochs: fine-tune by epochs instead of the clock (repeatable rows,
    whatever the machine's load); a model in MODEL_SETTINGS takes its own epochs (an EfficientNet epoch
    costs what 20 digits epochs do). on_row(rows) after every row: the bench rewrites its table, so a
    run stopped early keeps what it measured."""
    from hirelc_onnx.compress import compress

    rows = []
    for model_name, methods in plan.items():
        path, data, held_out = _model_and_data(model_name, quick)
        own = {} if quick else MODEL_SETTINGS.get(model_name, {})
        for method in methods:
            kind, target, budget, options = _compress_args(method, path)
            t0 = time.perf_counter()
            try:
                result = compress(path, data=data, method=kind, target=target, budget=budget, seed=0,
                                  latency_runs=10 if quick or model_name == "efficientnet-lite0" else 30,
                                  **_taken(kind, evaluations=own.get("evaluations", evaluations),
                                           finetune_seconds=own.get("finetune_seconds", finetune_seconds),
                                           finetune_epochs=None if finetune_epochs is None
                                           else own.get("finetune_epochs", finetune_epochs)),
                                  **options)
            except Exception as exc:  # a failing method is a row, not the end of the benchmark
                log.exception("%s on %s failed", method, model_name)
                rows.append({"model": model_name, "method": method, "error": f"{type(exc).__name__}: {exc}"})
                if on_row:
                    on_row(rows)
                continue
            rep = result.report
            ov = openvino_agreement(result.model, data)
            ref = ort_reference_agreement(result.model, data)
            acc = dict(rep.get("accuracy") or {})
            if held_out is not None:  # the held-out samples' score; the test split's stays beside it
                acc.update(test_split=acc.get("compressed"), compressed=held_out(result.model),
                           held_out=own["held_out"])
                acc["drop_points"] = 100 * (acc["fp32"] - acc["compressed"])  # agreement: fp32 scores 1
            lat = rep.get("latency", {})
            rows.append({
                "model": model_name, "method": method, "target": target, "ratio": rep["size"]["ratio"],
                "file_ratio": rep["size"]["file_ratio"], "metric": acc.get("metric"), "fp32": acc.get("fp32"),
                "score": acc.get("compressed"), "drop_points": acc.get("drop_points"),
                "held_out": acc.get("held_out"), "score_test_split": acc.get("test_split"),
                "speedup_b1": lat.get("batch1", {}).get("speedup"), "speedup_b32": lat.get("batch32", {}).get("speedup"),
                "evaluations": acc.get("evaluations"), "seconds": time.perf_counter() - t0,
                "macs_fraction": rep["size"].get("macs_fraction"), "stages": rep["search"].get("stages"),
                "openvino_agreement": ov, "ort_reference_agreement": ref, "speed_goal": rep.get("speed_goal"),
                "ort_cpu_kept_fp32": sorted((rep.get("ort_cpu_speed") or {}).get("kept_fp32", {})),
                "ort_cpu_fallbacks": [f["kernel"] for f in (rep.get("ort_cpu_speed") or {}).get("whole_model_fallbacks", [])],
            })
            print(_row_md(rows[-1]), flush=True)
            if on_row:
                on_row(rows)
            if rep.get("speed_goal"):  # the goal's final whole timing, beside the table (stderr)
                g = rep["speed_goal"]
                print(f"{model_name} {method}: speedup goal {g['speedup']:g}x at batch {g['batch']} "
                      f"{'met' if g['met'] else 'NOT met'}, measured {g['measured_speedup']:.2f}x, MACs "
                      f"{_fmt(rep['size'].get('macs_fraction'))}, scale {g.get('scale', 1.0):.3f}, "
                      f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return rows


def _seed_row(model_name: str, method: str, seed: int, rep: dict, seconds: float) -> dict:
    goal = rep.get("speed_goal") or {}
    return {"model": model_name, "method": method, "seed": seed, "score": rep["accuracy"]["compressed"],
            "test_n": rep["accuracy"].get("n"), "ratio": rep["size"]["ratio"],
            "macs_fraction": rep["size"].get("macs_fraction"), "goal_met": goal.get("met"),
            "measured_speedup": goal.get("measured_speedup"), "seconds": seconds}


def run_speed_seeds(plan: dict[str, list[str]], seeds, evaluations: int, finetune_epochs: int | None,
                    finetune_seconds: float, on_row=None) -> list[dict]:
    """The plan's rows on the digits models at each of `seeds` (each re-splits the data): score, ratio,
    MACs and the speed goal's verdict. latency_runs=0: the report's latency rows are not needed, and the
    search's own timings (the goal, the per-kernel table) do not depend on them."""
    from examples.reference_models import build_reference_model
    from hirelc_onnx.compress import compress

    rows = []
    for model_name, methods in plan.items():
        if model_name not in DIGIT_MODELS:
            continue
        path = build_reference_model(model_name)
        for seed in seeds:
            for method in methods:
                kind, target, budget, options = _compress_args(method, path)
                t0 = time.perf_counter()
                try:
                    rep = compress(path, data="digits", method=kind, target=target, budget=budget, seed=seed,
                                   latency_runs=0,
                                   **_taken(kind, evaluations=evaluations, finetune_seconds=finetune_seconds,
                                            finetune_epochs=finetune_epochs), **options).report
                except Exception as exc:  # as in run_methods: a failing run is a row (its cell gets no mean)
                    log.exception("%s on %s, seed %d, failed", method, model_name, seed)
                    rows.append({"model": model_name, "method": method, "seed": seed,
                                 "error": f"{type(exc).__name__}: {exc}"})
                else:
                    rows.append(_seed_row(model_name, method, seed, rep, time.perf_counter() - t0))
                    print(f"{model_name} {method} seed {seed}: {rows[-1]['score']:.4f}", file=sys.stderr, flush=True)
                if on_row:
                    on_row(rows)
    return rows


def seeds_table(rows: list[dict], seed_rows: list[dict]) -> list[str]:
    """Per model and method: the score at every seed (seed 0 from the main table's row), their mean,
    and the speed goal's verdicts; the best mean per model in bold. Only methods measured at every seed
    get a mean."""
    by_cell: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if "error" not in r and any(s["model"] == r["model"] and s["method"] == r["method"] for s in seed_rows):
            goal = r.get("speed_goal") or {}
            by_cell.setdefault((r["model"], r["method"]), {})[0] = {
                "score": r["score"], "goal_met": goal.get("met"), "macs_fraction": r.get("macs_fraction")}
    for s in seed_rows:
        by_cell.setdefault((s["model"], s["method"]), {})
        if "error" not in s:
            by_cell[(s["model"], s["method"])][s["seed"]] = s
    seeds = sorted({seed for cell in by_cell.values() for seed in cell} | {s["seed"] for s in seed_rows})
    lines = ["## The digits rows over seeds", "",
             "The same compress call as the main table's row at each seed; each seed re-splits the digits data "
             "(calibration, fine-tune, validation, test), seed 0 is the main table's row. Score: test accuracy "
             "(one image of 449 is 0.22 points); a run that failed is left blank, and its method gets no mean. "
             "Goal: a speed goal met (yes) or not (no) per seed, - without one. Bold: the best mean of the "
             "model's methods.", "",
             "| model | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | goal met | MACs kept |",
             "|---|---|" + "---|" * (len(seeds) + 3)]
    means = {key: (sum(c[s]["score"] for s in seeds) / len(seeds) if all(s in c for s in seeds) else None)
             for key, c in by_cell.items()}
    best: dict[str, float] = {}
    for (model, _), mean in means.items():
        if mean is not None:
            best[model] = max(mean, best.get(model, mean))
    for (model, method), cell in by_cell.items():
        mean = means[(model, method)]
        shown = "" if mean is None else f"**{mean:.4f}**" if mean >= best[model] - 1e-12 else f"{mean:.4f}"
        lines.append(f"| {model} | {method} | " + " | ".join(_fmt(cell.get(s, {}).get("score"), ".4f") for s in seeds)
                     + f" | {shown} | "
                     + " ".join({True: "yes", False: "no"}.get(cell.get(s, {}).get("goal_met"), "-") for s in seeds)
                     + " | " + " ".join(_fmt(cell.get(s, {}).get("macs_fraction"), ".2f") for s in seeds) + " |")
    return lines


def run_pruning_comparison(spec: dict) -> list[dict]:
    """"l1-flops50" (uniform L1 keep at the MACs limit, bits 7 as graph-rl's default) and
    "graph-rl-flops50", side by side at each fine-tuning budget and seed of `spec`."""
    from examples.reference_models import build_reference_model
    from hirelc_onnx.compress import compress
    from hirelc_onnx.search.graph_rl import GraphRLSettings

    rows = []
    settings = {"settings": GraphRLSettings(episodes=spec["episodes"])} if "episodes" in spec else {}
    print("\n".join(pruning_table([], spec)[-2:]), flush=True)
    for model_name in spec["models"]:
        path = build_reference_model(model_name)
        runs = {"l1": _compress_args("l1-flops50", path), "graph-rl": _compress_args("graph-rl-flops50", path)}
        for epochs in spec["epochs"]:
            for seed in spec["seeds"]:
                row = {"model": model_name, "epochs": epochs, "seed": seed}
                for name, (kind, target, budget, options) in runs.items():
                    t0 = time.perf_counter()
                    rep = compress(path, data="digits", method=kind, target=target, budget=budget, seed=seed,
                                   latency_runs=30,
                                   **_taken(kind, evaluations=spec["evaluations"], finetune_epochs=epochs),
                                   **options, **(settings if kind == "graph-rl" else {})).report
                    row.update({"fp32": rep["accuracy"]["fp32"], "test_n": rep["accuracy"]["n"],
                                f"{name}_score": rep["accuracy"]["compressed"],
                                f"{name}_macs": rep["size"]["macs_fraction"],
                                f"{name}_b1": rep["latency"]["batch1"]["speedup"],
                                f"{name}_b32": rep["latency"]["batch32"]["speedup"],
                                f"{name}_seconds": time.perf_counter() - t0})
                rows.append(row)
                print(_pruning_md(row), flush=True)
    return rows


def _pruning_md(r: dict, label: str | None = None) -> str:
    images = round((r["graph-rl_score"] - r["l1_score"]) * r["test_n"])
    return (f"| {r['model']} | {r['epochs']} | {label or r['seed']} | {r['fp32']:.4f} | {r['l1_score']:.4f} "
            f"| {r['graph-rl_score']:.4f} | {images:+d} | {r['l1_macs']:.3f} | {r['graph-rl_macs']:.3f} "
            f"| {r['l1_b1']:.2f}x / {r['l1_b32']:.2f}x | {r['graph-rl_b1']:.2f}x / {r['graph-rl_b32']:.2f}x |")


def pruning_table(rows: list[dict], spec: dict) -> list[str]:
    """Per-seed rows and a mean row per model and fine-tuning budget."""
    flops = METHOD_SPECS["graph-rl-flops50"][3]["flops"]
    lines = [f"## Channel pruning at {flops:g} of the MACs: graph-rl vs uniform L1", "",
             "Both prune channels to the same MACs limit (L1: every group at one keep ratio, its smallest-L1 "
             "channels removed; graph-rl: the search, "
             f"{spec['evaluations']} real evaluations), store weights at 7 bits (ort-cpu), and fine-tune for the "
             "same fixed number of epochs. Each seed re-splits the digits data. Score: held-out test accuracy; "
             "the difference is in test images. Speedup: fp32 / emitted ORT latency at batch 1 / 32.", "",
             "| model | fine-tune epochs | seed | fp32 | L1 | graph-rl | graph-rl - L1 (images) | L1 MACs "
             "| graph-rl MACs | L1 speedup | graph-rl speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["epochs"]), []).append(r)
    for group in groups.values():
        lines += [_pruning_md(r) for r in group]
        if len(group) > 1:
            mean = {k: (sum(r[k] for r in group) / len(group) if isinstance(v, float) else v)
                    for k, v in group[0].items()}
            lines.append(_pruning_md(mean, label="**mean**"))
    return lines


def run_pass_latency(models, runs: int) -> list[dict]:
    """fp32 vs every prunable group at 50% vs int8 ort-cpu, timed in alternating rounds."""
    from examples.reference_models import build_reference_model
    from hirelc_onnx.apply import apply_config
    from hirelc_onnx.config import CompressionConfig
    from hirelc_onnx.evaluate.data import load_digits
    from hirelc_onnx.evaluate.runner import benchmark_side_by_side
    from hirelc_onnx.graph import build_block_graph, load_model

    rows = []
    calib = load_digits().x[:64]
    for name in models:
        bg = build_block_graph(load_model(build_reference_model(name)))
        pruned = apply_config(bg, CompressionConfig.uniform(bg.kernels, keep_ratio=0.5))
        int8 = apply_config(bg, CompressionConfig.uniform(bg.kernels, bits=7, target="ort-cpu"),
                            calib_batches=[{bg.model.graph.input[0].name: calib}])
        for batch in (1, 32):
            fp, pr, q = benchmark_side_by_side([bg.model, pruned, int8], batch_size=batch, runs=runs, warmup=3)
            rows.append({"model": name, "batch": batch, "fp32_ms": fp["median_ms"], "pruned50_ms": pr["median_ms"],
                         "int8_ms": q["median_ms"], "pruned_speedup": pr["speedup"], "int8_speedup": q["speedup"],
                         "pruned_speedup_iqr": pr["speedup_iqr"], "int8_speedup_iqr": q["speedup_iqr"]})
    return rows


def _agreement_rows(data) -> np.ndarray:
    from hirelc_onnx.evaluate.data import load_digits

    return (load_digits() if data == "digits" else data).x[:256]


def openvino_agreement(model, data) -> float | str | None:
    """Top-1 agreement of OpenVINO's CPU plugin with ORT (the deployed session) on 256 rows of the
    model's data: every model the bench emits must run in a second runtime. None without the extra."""
    try:
        import openvino
    except ImportError:
        return None
    from hirelc_onnx.evaluate.runner import predict
    from hirelc_onnx.evaluate.runtimes import OPENVINO_F32

    x = _agreement_rows(data)
    try:
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", OPENVINO_F32)
        theirs = np.asarray(compiled({model.graph.input[0].name: x})[compiled.output(0)])
    except Exception as exc:  # a model OpenVINO refuses is a finding of the bench, not its end
        return f"refused: {' '.join(str(exc).split())[:80]}"
    return float(np.mean(theirs.argmax(-1) == predict(model, x).argmax(-1)))


def ort_reference_agreement(model, data) -> float:
    """Top-1 agreement of ORT's deployed session (fused int8 kernels) with ORT running the same file
    unoptimised (ORT_DISABLE_ALL: every QuantizeLinear, DequantizeLinear and fp32 op as written, the
    QDQ format's reference arithmetic), on the rows `openvino_agreement` uses: how far the model's own
    top-1 is defined. An int8 model whose rounding flips cascade (EfficientNet-Lite0's high-gain
    depthwise and expand convs on low-margin photo crops) disagrees with itself here, and no second
    runtime can agree with ORT better than ORT agrees with its reference (bench/RESULTS.md)."""
    from hirelc_onnx.evaluate.runner import SessionConfig, default_session_config, predict

    x = _agreement_rows(data)
    reference = SessionConfig(graph_optimization_level="disabled",
                              intra_op_threads=default_session_config().intra_op_threads)
    return float(np.mean(predict(model, x, config=reference).argmax(-1) == predict(model, x).argmax(-1)))


def _fmt(v, spec=".3f"):
    return "" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _row_md(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['method']} | error: {r['error'][:80]} |||||||||||"
    return (f"| {r['model']} | {r['method']} | {r['target']} | {_fmt(r['ratio'], '.2f')}x | {_fmt(r['file_ratio'], '.2f')}x "
            f"| {_fmt(r['score'], '.4f')} | {_fmt(r['drop_points'], '+.2f')} | {_fmt(r['speedup_b1'], '.2f')}x "
            f"| {_fmt(r['speedup_b32'], '.2f')}x | {_fmt(r['evaluations'], 'd')} | {_fmt(r['seconds'], '.0f')} "
            f"| {_fmt(r.get('openvino_agreement'), '.3f')} | {_fmt(r.get('ort_reference_agreement'), '.3f')} |")


def write_results(out_dir: Path, rows: list[dict], latency: list[dict], meta: dict,
                  pruning: list[dict] | None = None, seed_rows: list[dict] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# hirelc-onnx benchmark",
        "",
        f"Run {meta['date']} on {meta['versions']['cpu']} ({meta['versions']['cores']} cores), Python "
        f"{meta['versions']['python']}, onnx {meta['versions']['onnx']}, onnxruntime {meta['versions']['onnxruntime']}; "
        f"searches: {meta['evaluations']} real evaluations, "
        + (f"{meta['finetune_epochs']} epochs" if meta.get("finetune_epochs") is not None
           else f"{meta['finetune_seconds']} s")
        + " fine-tuning each"
        + "".join(f"; {m}: {o.get('evaluations')} evaluations, "
                  + (f"{o.get('finetune_epochs')} epochs" if meta.get("finetune_epochs") is not None
                     else f"{o.get('finetune_seconds')} s")
                  + f" each, {o.get('crops')} crops" + (f", scored on {o['held_out']} held-out crops" if o.get("held_out") else "")
                  for m, o in meta.get("model_settings", {}).items())
        + (f"; PARTIAL: {len(rows)} rows" + (f" and {len(seed_rows)} seed rows" if seed_rows else "")
           + f" so far, {meta['seconds']:.0f} s." if meta.get("partial")
           else f"; total {meta['seconds']:.0f} s."),
        "",
        "Ratios: true stored bytes (fp32 weights / emitted initializers) and file size. Score: held-out top-1",
        "accuracy (digits) or top-1 agreement with fp32 (EfficientNet on held-out photo crops, other images than",
        "the search's; the test split's score is results.json's score_test_split), measured through ORT on",
        "the emitted model. Speedup: fp32 / emitted latency, the median of per-round ratios (alternating rounds).",
        "OpenVINO: top-1 agreement of OpenVINO's CPU plugin with ORT on the same emitted model (256 rows).",
        "ORT ref.: top-1 agreement of the same ORT session with ORT running the file unoptimised (QDQ as written,",
        "the reference arithmetic), same rows: how far the int8 model's own top-1 is defined; OpenVINO cannot",
        "be expected to agree with ORT better than this.",
        "",
        "| model | method | target | ratio | file ratio | score | drop (pts) | speedup b1 | speedup b32 | real evals | seconds "
        "| OpenVINO | ORT ref. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32_rows = {}
    for r in rows:
        if r.get("fp32") is not None and r["model"] not in fp32_rows:
            fp32_rows[r["model"]] = r["fp32"]
    for model, score in fp32_rows.items():
        lines.append(f"| {model} | fp32 | - | 1.00x | 1.00x | {score:.4f} | +0.00 | 1.00x | 1.00x | - | - | - | - |")
    lines += [_row_md(r) for r in rows]
    if seed_rows:
        lines += [""] + seeds_table(rows, seed_rows)
    if pruning:
        lines += [""] + pruning_table(pruning, meta["pruning_spec"])
    if latency:
        lines += ["", "## Pass-level latency (ms, median; fp32 vs 50% channels pruned vs int8 ort-cpu)", "",
                  "| model | batch | fp32 | pruned 50% | int8 ort-cpu | pruned speedup | int8 speedup |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['fp32_ms']:.3f} | {r['pruned50_ms']:.3f} | {r['int8_ms']:.3f} "
                  f"| {r['pruned_speedup']:.2f}x | {r['int8_speedup']:.2f}x |" for r in latency]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "latency": latency,
                                                      "pruning": pruning or [], "seed_rows": seed_rows or []},
                                                     indent=2,
                                                     default=float) + "\n")


def _seed_list(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        parser.error(f"--extra-seeds takes comma-separated integers, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A small version (used by the test suite).")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full",
                        help="full: the methods table (`make bench`); speed: the --speedup rows and EfficientNet-Lite0's "
                             "ort-cpu rows (`make bench-speed`).")
    parser.add_argument("--models", default=None)
    parser.add_argument("--methods", default=None)
    parser.add_argument("--evaluations", type=int, default=None)
    parser.add_argument("--finetune-seconds", type=float, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="Digits models fine-tune this many epochs instead of --finetune-seconds (repeatable rows).")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--latency-only", action="store_true",
                        help="Only the pass-level table: fp32 vs 50%% pruned vs int8 ort-cpu latency.")
    parser.add_argument("--pruning-only", action="store_true",
                        help="Only the graph-rl vs L1 table (50%% MACs, fixed-epoch fine-tuning, several seeds).")
    parser.add_argument("--skip-pruning", action="store_true",
                        help="Leave out the graph-rl vs L1 table (`make bench` does: `make bench-ablation-graph-rl` "
                             "measures that comparison with both priors, and the table costs ~15 min).")
    parser.add_argument("--extra-seeds", default=None,
                        help="Seeds (comma-separated) at which the plan's digits rows are run again for the table over "
                             "seeds; default: 1,2 on ResNet-20 and VGG with --plan speed, none otherwise; '' none.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    extra_seeds = (SPEED_SEEDS["seeds"] if args.plan == "speed" and not args.quick else ()) \
        if args.extra_seeds is None else _seed_list(parser, args.extra_seeds)

    plan = dict(QUICK_PLAN if args.quick else PLANS[args.plan])
    if args.models:
        plan = {m: plan.get(m, FULL_PLAN.get(m, [])) for m in args.models.split(",")}
    if args.methods:
        plan = {m: args.methods.split(",") for m in plan}
    unknown = [m for methods in plan.values() for m in methods if m not in METHOD_SPECS]
    if unknown or any(m not in FULL_PLAN for m in plan):
        parser.error(f"unknown method or model; methods: {', '.join(METHOD_SPECS)}; models: {', '.join(FULL_PLAN)}")
    models = list(plan)
    evaluations = args.evaluations or (2 if args.quick else 4)
    finetune = args.finetune_seconds if args.finetune_seconds is not None else (2.0 if args.quick else 10.0)
    start = time.perf_counter()
    print("| model | method | target | ratio | file ratio | score | drop (pts) | speedup b1 | speedup b32 | real evals | seconds "
          "| OpenVINO | ORT ref. |")
    only = args.latency_only or args.pruning_only

    def meta_now(**extra) -> dict:
        return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": _versions(),
                "evaluations": evaluations, "finetune_seconds": finetune, "finetune_epochs": args.finetune_epochs,
                "model_settings": {} if args.quick else {m: o for m, o in MODEL_SETTINGS.items() if m in plan},
                "seconds": time.perf_counter() - start, "plan": plan, **extra}

    rows = [] if only else run_methods(plan, evaluations, finetune, args.quick, args.finetune_epochs,
                                       on_row=lambda so_far: write_results(Path(args.out), so_far, [],
                                                                           meta_now(partial=True)))
    # run_speed_seeds takes the digits models of the plan; by default only SPEED_SEEDS' among them
    seed_plan = {m: methods for m, methods in plan.items() if args.extra_seeds is not None or m in SPEED_SEEDS["models"]}
    seed_rows = [] if only or not extra_seeds else run_speed_seeds(
        seed_plan, extra_seeds, evaluations, args.finetune_epochs, finetune,
        on_row=lambda so_far: write_results(Path(args.out), rows, [], meta_now(partial=True), seed_rows=so_far))
    spec = QUICK_PRUNING if args.quick else PRUNING
    if args.models:
        spec = {**spec, "models": tuple(m for m in spec["models"] if m in plan)}
    pruning = [] if args.latency_only or args.methods or args.skip_pruning else run_pruning_comparison(spec)
    digit_models = [m for m in models if m in DIGIT_MODELS]
    latency = [] if args.pruning_only else run_pass_latency(digit_models, runs=10 if args.quick else 50)
    meta = meta_now(pruning_spec=spec)
    write_results(Path(args.out), rows, latency, meta, pruning, seed_rows)
    print(f"wrote {Path(args.out) / 'RESULTS.md'} in {meta['seconds']:.0f} s")
    return 1 if any("error" in r for r in [*rows, *seed_rows]) else 0


if __name__ == "__main__":
    sys.exit(main())
