"""`make bench-neighbourhood`: is there anything to find around HiReLC's prior?

At 6x the knapsack prior (fp32 fitted to the budget by the estimator's damage-per-byte greedy, round 0
of HiReLC and of knapsack) won every seed on EfficientNet-Lite0 and MiniLM (bench/SEARCH.md), so the
agents' refinements of it lost. This bench measures what a search refining the prior could gain at
best, with the real proxy (ONNX Runtime, no fine-tuning) as its guide instead of the estimator:

    a greedy hill-climb from the prior: each step scores every one-kernel change of the incumbent
    (each bit width of the target's ladder in each of the knapsack's grids; a prunable kernel's keep
    one rung down), the other kernels re-fitted to the budget by the estimator with the changed one
    held, and moves to the change with the least measured logit-MSE; it stops when none is better.

Then every config on the path is measured as a search measures one (fine-tuned for the bench's epochs,
scored on the validation split) and scored on the held-out samples `bench.search` uses. A path whose
configs score no better held out than the prior says the 6x neighbourhood has nothing for the agents to
find, whatever they learn; one that does says what the estimator misses. Writes
`bench/NEIGHBOURHOOD.md` and `bench/neighbourhood.json`.

    python -m bench.neighbourhood [--models text-recognizer,minilm-l6,efficientnet-lite0] [--seeds 0,1,2]
                                  [--steps 6] [--budget 6] [--out bench/] [--quick]

The climb runs inside `compress` (a method entry added to the registry for the run), so its context
is exactly a search's: the same splits, fine-tuning, weight ranges and metric.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from hirelc_onnx.config import CompressionConfig, KernelConfig
    from hirelc_onnx.graph.blockgraph import BlockGraph
    from hirelc_onnx.search.budget import Damage
    from hirelc_onnx.search.baselines import MethodResult
    from hirelc_onnx.search.context import SearchContext

log = logging.getLogger("bench.neighbourhood")

METHOD = "prior-neighbourhood"
DEFAULTS = {"models": "text-recognizer,minilm-l6,efficientnet-lite0", "seeds": "0,1,2", "steps": 6, "budget": 6.0}
STEPS = {"minilm-l6": 1, "efficientnet-lite0": 2}
SEEDS = {"minilm-l6": 1, "efficientnet-lite0": 1}
"""Steps and seeds per model at most, so the run takes about 17 minutes (994 s, bench/NEIGHBOURHOOD.md): a
MiniLM step scores about 330 neighbours at 1.1 s each, an EfficientNet-Lite0 one about 460 at 0.6 s; the
recognizer's 0.05 s."""
QUICK = {"models": "text-recognizer", "seeds": "0", "steps": 1, "held_out": 64, "search_samples": 64,
         "finetune_epochs": 0}

_climb: dict[str, Any] = {}
"""The last climb's record, filled by `run_neighbourhood` (the registry calls it by name)."""


def neighbours(bg: BlockGraph, config: CompressionConfig, target: str, budget: float,
               damage: Damage) -> Iterator[tuple[str, KernelConfig, CompressionConfig]]:
    """(kernel, choice, fitted config) for every one-kernel change of `config`, the others re-fitted to
    `budget` by the damage-per-byte repair with that kernel held (a fit that moves it is put back when the
    budget still holds, else dropped)."""
    from hirelc_onnx.config import CompressionConfig
    from hirelc_onnx.graph.cost import model_cost
    from hirelc_onnx.search.budget import GRID_VARIANTS, KEEP_STEP, MIN_KEEP, bits_ladder, repair
    from hirelc_onnx.specs import weight_target

    for name, kernel in bg.kernels.items():
        current = config.get(name)
        storage = weight_target(kernel, target) == "storage"
        choices = []
        for bits in bits_ladder(weight_target(kernel, target)):
            grids = GRID_VARIANTS if storage and bits != 32 else [(current.qtype, current.granularity)]
            choices += [replace(current, bits=bits, qtype=q, granularity=g) for q, g in grids]
        if bg.prunable_kernel(name) and current.keep_ratio - KEEP_STEP >= MIN_KEEP - 1e-9:
            choices.append(replace(current, keep_ratio=round(current.keep_ratio - KEEP_STEP, 6)))
        for choice in dict.fromkeys(c for c in choices if c != current):
            def held(n, kc, name=name, choice=choice):  # the changed kernel stays as changed
                return damage(n, kc) if n != name else (0.0 if kc == choice else 1e9)

            fitted = repair(bg, CompressionConfig({**config.kernels, name: choice}, target=target), budget,
                            damage=held, fill=True)
            if fitted.get(name) != choice and fitted.get(name).keep_ratio == choice.keep_ratio:
                # the fill spent the last slack raising the held kernel again (a rung up always fits a
                # small kernel): put it back; the config then stores less and still meets the budget
                fitted = CompressionConfig({**fitted.kernels, name: choice}, target=target)
                if model_cost(bg, fitted).ratio < budget:
                    continue
            if fitted.get(name) == choice:
                yield name, choice, fitted


def run_neighbourhood(bg: BlockGraph, ctx: SearchContext, target: str, *, budget: float, **_: Any) -> MethodResult:
    """The climb (see the module), as a method's run function: returns the path config best on validation."""
    from hirelc_onnx.config import CompressionConfig
    from hirelc_onnx.search.baselines import MethodResult
    from hirelc_onnx.search.budget import repair
    from hirelc_onnx.search.features import model_key
    from hirelc_onnx.search.knapsack import probed_estimator

    start = time.perf_counter()
    estimator = probed_estimator(bg, ctx, target)  # knapsack's, so the climb starts from its prior
    current = repair(bg, CompressionConfig({}, target=target), budget, damage=estimator.kernel_mse, fill=True)
    proxy = ctx.proxy(current).logit_mse
    path = [{"step": 0, "change": "prior", "logit_mse": proxy, "config": current}]
    seen, scored = {model_key(bg, current)}, 0
    first_step: dict[str, int] = {}
    for step in range(1, _climb["steps"] + 1):
        best = None
        better = total = 0
        for name, choice, fitted in neighbours(bg, current, target, budget, estimator.kernel_mse):
            key = model_key(bg, fitted)
            if key in seen:
                continue
            seen.add(key)
            mse = ctx.proxy(fitted).logit_mse
            scored, total, better = scored + 1, total + 1, better + (mse < proxy)
            if best is None or mse < best[0]:
                best = (mse, name, choice, fitted)
        if step == 1:
            first_step = {"neighbours": total, "better_by_proxy": better}
        log.warning("step %d: %d neighbours, %d better by the proxy (%.0f s)", step, total, better,
                    time.perf_counter() - start)
        if best is None or best[0] >= proxy:
            break
        proxy, current = best[0], best[3]
        c = best[2]
        path.append({"step": step, "change": f"{best[1]} -> {c.bits} bits {c.qtype} {c.granularity} keep {c.keep_ratio:g}",
                     "logit_mse": proxy, "config": current})
    climb_seconds = time.perf_counter() - start
    measured = [ctx.measure(p["config"]) for p in path]
    _climb.update(path=path, measured=measured, proxies=scored, climb_seconds=climb_seconds, **first_step)
    best_m = max(measured, key=lambda m: (m.score, m.cost.ratio))
    return MethodResult(best_m.config, best_m.model, best_m.score, [], {"budget": budget, "winner_source": "path"})


@contextmanager
def registered(steps: int):
    """The climb as a method compress can run, for the duration of the block."""
    import importlib

    from hirelc_onnx.search.methods import METHODS, Method

    climb = importlib.import_module(__spec__.name)._climb  # the module the registry imports (not __main__'s copy)
    # knapsack's options: compress sets up the run (channel multiple, weight ranges) as for knapsack's
    METHODS[METHOD] = Method(METHOD, "bench.neighbourhood:run_neighbourhood", True, METHODS["knapsack"].options,
                             "bench: a proxy hill-climb from the prior")
    climb.clear()
    climb["steps"] = steps
    try:
        yield climb
    finally:
        METHODS.pop(METHOD, None)


def run_model(name: str, seed: int, steps: int, args, work: Path) -> dict:
    """One (model, seed) row: the path's configs with proxy, validation and held-out scores."""
    from bench.search import LATENCY_RUNS, make_task
    from hirelc_onnx.compress import compress

    task = make_task(name, work, args.held_out, args.search_samples)
    t0 = time.perf_counter()
    with registered(steps) as climb:
        compress(task.path, method=METHOD, data=task.data, seed=seed, latency_runs=LATENCY_RUNS,
                 split_fractions=args.split_fractions, budget=f"{args.budget:g}x",
                 finetune_epochs=args.finetune_epochs, out_dir=str(work / f"{name}-{seed}"), **task.extra)
        path = [{"step": p["step"], "change": p["change"], "logit_mse": p["logit_mse"], "validation": m.score,
                 "ratio": m.cost.ratio, "held_out": task.score(m.model, None)}
                for p, m in zip(climb["path"], climb["measured"])]
        return {"model": name, "seed": seed, "metric": task.metric, "n": task.n, "budget": args.budget,
                "steps_allowed": steps, "neighbours": climb.get("neighbours"),
                "better_by_proxy": climb.get("better_by_proxy"), "proxies": climb["proxies"],
                "climb_seconds": climb["climb_seconds"], "seconds": time.perf_counter() - t0, "path": path}


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    a = meta["settings"]
    lines = ["# hirelc-onnx: what is there to find around the prior?", "",
             f"Run {meta['date']} on {meta['cpu']} ({meta['cores']} cores){' (--quick: a smoke run)' if meta['quick'] else ''}"
             f"; code {meta.get('commit')}; total {meta['seconds']:.0f} s. `python -m bench.neighbourhood` "
             f"(bench/neighbourhood.py says what it does).",
             f"Budget {a['budget']:g}x true bytes; {a['finetune_epochs']} fine-tuning epoch(s) per measured config; "
             f"search data {a['search_samples']} samples split {a['split_fractions']}; held out {a['held_out']} "
             "samples (bench.search's).", "",
             "Per model and seed: the one-kernel neighbours of the prior (each re-fitted to the budget) and how "
             "many the proxy scores better; then the climb's path, each config fine-tuned and measured: "
             "logit-MSE on the proxy batch (lower is better), validation score (what a search picks by), "
             "held-out score (the table's).", "",
             "| model | seed | neighbours | better by proxy | path: step (change): logit-MSE, validation -> held out | "
             "best held out - prior's | climb s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['seed']} | error: {r['error']} | | | | |")
            continue
        cells = "; ".join(f"{p['step']}: {p['logit_mse']:.5f}, {p['validation']:.4f} -> {p['held_out']:.4f}"
                          for p in r["path"])
        gain = max(p["held_out"] for p in r["path"][1:]) - r["path"][0]["held_out"] if len(r["path"]) > 1 else None
        lines.append(f"| {r['model']} | {r['seed']} | {r['neighbours']} | {r['better_by_proxy']} | {cells} | "
                     f"{'-' if gain is None else format(100 * gain, '+.3f') + ' pts'} | {r['climb_seconds']:.0f} |")
    lines += ["", "Each step's change:", ""]
    lines += [f"- {r['model']} seed {r['seed']} step {p['step']}: {p['change']}"
              for r in rows if "path" in r for p in r["path"][1:]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "NEIGHBOURHOOD.md").write_text("\n".join(lines).rstrip() + "\n")
    (out / "neighbourhood.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")


def main(argv: list[str] | None = None) -> int:
    import os
    import platform

    from bench.search import DEFAULTS as SEARCH, _commit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="A smoke run (the test suite's): recognizer, one step, tiny data.")
    ap.add_argument("--models", default=None)
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--steps", type=int, default=None, help="Climb steps at most (default 6; MiniLM 1, EfficientNet-Lite0 2 at most).")
    ap.add_argument("--held-out", type=int, default=None)
    ap.add_argument("--search-samples", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--split-fractions", default=None)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args(argv)
    base = {**SEARCH, **DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="hirelc-bench-neighbourhood-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
            for seed in seeds[:SEEDS.get(name, len(seeds))]:
                try:
                    row = run_model(name, seed, min(args.steps, STEPS.get(name, args.steps)), args, Path(tmp))
                except Exception as exc:  # a failing model is a line of the table, not the end of the bench
                    log.exception("%s seed %d failed", name, seed)
                    row = {"model": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(row, default=float), flush=True)
                rows.append(row)
    settings = {k: getattr(args, k) for k in ("seeds", "steps", "budget", "finetune_epochs", "held_out",
                                              "search_samples", "split_fractions")}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "settings": settings,
            "quick": args.quick, "seconds": time.perf_counter() - start}
    write_results(args.out, rows, meta)
    print(f"wrote {args.out / 'NEIGHBOURHOOD.md'} in {meta['seconds']:.0f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
