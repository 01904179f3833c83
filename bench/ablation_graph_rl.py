"""`make bench-ablation-graph-rl`: is it the learned graph-attention policy that beats uniform L1, or
its starting ranking?

Per model and seed, three runs at 50% of the MACs, each fine-tuned for the same fixed number of
epochs, 7-bit weights under ort-cpu (bench/run.py's "l1-flops50" and "graph-rl-flops50" rows), on
the digits references (ResNet-20, VGG; scored on compress's held-out test split) and on a real model,
the CTC text recognizer (scored by character accuracy on 1000 held-out rendered lines):
  * l1        -- uniform L1 channel pruning at the keep ratio that lands on the MACs limit;
  * none      -- graph-rl --prior none: uninformative starting logits, only the policy's episodes measured;
  * l1-fisher -- graph-rl --prior l1-fisher: started from the L1 + Fisher ranking (its cut measured where
                 the proxy ranks it among the best).
Each seed re-splits the data. Writes bench/ABLATION_GRAPH_RL.md (tables, with the source of every
emitted graph-rl model, the policy's shift from its start and the timings) and
bench/ablation_graph_rl.json (every figure, the learning curves too), rewritten after every run so
a killed bench keeps what it measured.

    python -m bench.ablation_graph_rl [--models resnet20,vgg,recognizer] [--seeds 0,1,2] [--epochs 3] [--out bench]
    python -m bench.ablation_graph_rl --merge a/ablation_graph_rl.json b/ablation_graph_rl.json --out bench

`--merge` joins runs made in parallel (one process per model and seed: on a shared machine each
process gets its own share of the cores) into one table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.run import _compress_args, _taken, _versions

log = logging.getLogger("bench")

ABLATION = {"models": ("resnet20", "vgg", "recognizer"), "seeds": (0, 1, 2), "epochs": 3, "evaluations": 4}
ARMS = ("l1", "none", "l1-fisher")


def run_one(model_name: str, arm: str, seed: int, spec: dict) -> dict:
    """One compress run of `arm` ("l1" or a graph-rl prior) and the figures the tables want."""
    from hirelc_onnx.compress import compress

    path, data, extra, held_out, fp32_held = _task(model_name)
    kind, target, budget, options = _compress_args("l1-flops50" if arm == "l1" else "graph-rl-flops50", path)
    if arm != "l1":  # l1's keep is fitted on rounded channel counts (`l1_keep`, in _compress_args)
        options = {**options, "prior": arm}
    t0 = time.perf_counter()
    result = compress(path, data=data, method=kind, target=target, budget=budget, seed=seed, latency_runs=10,
                      **_taken(kind, evaluations=spec["evaluations"], finetune_epochs=spec["epochs"]),
                      **extra, **options)
    rep = result.report
    search = rep["search"]
    row = {"model": model_name, "arm": arm, "seed": seed, "epochs": spec["epochs"], "fp32": rep["accuracy"]["fp32"],
           "test_n": rep["accuracy"]["n"], "score": rep["accuracy"]["compressed"],
           "val": rep["accuracy"]["val_compressed"], "macs": rep["size"]["macs_fraction"],
           "seconds": time.perf_counter() - t0, "source": rep.get("source") or ("uniform-l1" if arm == "l1" else None)}
    if held_out is not None:  # a real model: scored on held-out samples the search never saw
        row["score"], row["test_n"] = held_out(result.model)
        row["fp32"] = fp32_held
    if arm != "l1":
        curve = search["learning_curve"]
        tenth = max(1, len(curve) // 10)
        row.update({"rl_seconds": search["rl_seconds"], "measure_seconds": search["measure_seconds"],
                    "episodes": search["episodes"], "policy_shift": search["policy_shift"],
                    "learning_curve": curve, "best_proxy_curve": search["best_proxy_curve"],
                    "proxy_first": float(np.mean(curve[:tenth])), "proxy_last": float(np.mean(curve[-tenth:])),
                    "candidates": [{"source": h["source"], "score": h["score"], "proxy": h["proxy_score"],
                                    "selection_score": h.get("selection_score"),
                                    "selection_loss": h.get("selection_loss"), "macs": h.get("macs_fraction")}
                                   for h in rep["history"] if h.get("kind") == "real"]})
    return row


_TASKS: dict[str, tuple] = {}
_WORK: list[tempfile.TemporaryDirectory] = []  # the recognizer's rendered lines, kept while the process runs


def _task(model_name: str) -> tuple:
    """(model path, compress data, compress extras, held-out scorer or None, fp32 held-out score or None),
    built once per process. The digits references are scored on the test split compress holds out; the
    CTC recognizer (a real model: CNN + self-attention) on held-out rendered lines by character
    accuracy, as bench.ablation_two_stage scores it."""
    if model_name not in _TASKS:
        if model_name == "recognizer":
            from bench.ablation_two_stage import _data
            from hirelc_onnx.graph.loader import load_model

            _WORK.append(tempfile.TemporaryDirectory(prefix="hirelc-ablation-"))
            path, data, extra, held_out = _data("recognizer", Path(_WORK[-1].name))
            _TASKS[model_name] = (path, data, extra, held_out, held_out(load_model(path))[0])
        else:
            from examples.reference_models import build_reference_model

            _TASKS[model_name] = (build_reference_model(model_name), "digits", {}, None, None)
    return _TASKS[model_name]


def tables(rows: list[dict], spec: dict) -> list[str]:
    """The per-seed table with mean rows, and the policy / timing table."""
    lines = [f"## Graph-rl with and without its prior vs uniform L1 at 0.5 of the MACs ({spec['epochs']} epochs)", "",
             "Score: held-out test accuracy on the digits references (449 digits: one image is 0.22 points), "
             "character accuracy on 1000 held-out rendered lines on the recognizer. l1: uniform L1 channel pruning; "
             "none: graph-rl --prior none (uninformative start, only the policy's episodes measured); l1-fisher: "
             f"graph-rl --prior l1-fisher (L1 + Fisher ranked start). graph-rl measures "
             f"{spec['evaluations']} candidates; every run fine-tunes {spec['epochs']} epochs, 7-bit weights, "
             "ort-cpu. Points: difference with l1 in percentage points. Source: where the emitted candidate came from.", "",
             "| model | seed | fp32 | l1 | none | l1-fisher | none - l1 (points) | l1-fisher - l1 (points) "
             "| source (none) | source (l1-fisher) |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["seed"], r["arm"]): r for r in rows}

    def cell(r: dict | None, fmt: str = ".4f") -> str:
        return "n/a" if r is None else format(r["score"], fmt)

    def points(r: dict | None, l1: dict) -> str:
        return "n/a" if r is None else f"{(r['score'] - l1['score']) * 100:+.2f}"

    for model in dict.fromkeys(r["model"] for r in rows):
        seeds = [s for s in dict.fromkeys(r["seed"] for r in rows if r["model"] == model) if (model, s, "l1") in by]
        for seed in seeds:
            l1, none, prior = (by.get((model, seed, a)) for a in ARMS)
            lines.append(f"| {model} | {seed} | {l1['fp32']:.4f} | {l1['score']:.4f} | {cell(none)} | {cell(prior)} "
                         f"| {points(none, l1)} | {points(prior, l1)} | {none['source'] if none else 'n/a'} "
                         f"| {prior['source'] if prior else 'n/a'} |")
        if len(seeds) > 1:
            fp32 = np.mean([by[(model, s, "l1")]["fp32"] for s in seeds])
            mean = {a: (np.mean([by[(model, s, a)]["score"] for s in seeds])
                        if all((model, s, a) in by for s in seeds) else None) for a in ARMS}

            def shown(a: str, diff: bool = False) -> str:
                if mean[a] is None:
                    return "n/a"
                return f"{(mean[a] - mean['l1']) * 100:+.2f}" if diff else f"{mean[a]:.4f}"

            lines.append(f"| {model} | **mean** | {fp32:.4f} | {shown('l1')} | {shown('none')} | {shown('l1-fisher')} "
                         f"| {shown('none', True)} | {shown('l1-fisher', True)} | | |")
    lines += ["", "## The policy: how far it moved, what it learned, what it cost", "",
              "MACs: the emitted model's fraction of fp32's (the limit is 0.5; uniform L1 lands below it, its "
              "channel counts rounded to multiples of 8). Shift: along the policy's greedy episode, mean Bernoulli KL from the starting policy and the share of "
              "channels whose keep decision flipped. Proxy: the batch's mean proxy score (minus the normalised logit "
              "MSE on the RL rows, recalibrated plus raw: `GraphRLSettings.raw_weight`) over the first and last tenth of the updates. Seconds: the whole run, its RL "
              "phase, its real evaluations. Candidates: in the order measured; the emitted one has the best selection "
              "score or, within one standard error of it, the lowest selection loss (`search/selection.py`).", "",
              "| model | arm | seed | MACs | episodes | shift KL | flipped | proxy first -> last | seconds | RL s "
              "| measure s | candidates (source: val / selection score / selection loss) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["arm"] == "l1":
            lines.append(f"| {r['model']} | l1 | {r['seed']} | {r['macs']:.3f} | | | | | {r['seconds']:.0f} | | | |")
            continue
        cands = ", ".join(_candidate(c) for c in r["candidates"])
        shift = r["policy_shift"]
        lines.append(f"| {r['model']} | {r['arm']} | {r['seed']} | {r['macs']:.3f} | {r['episodes']} | {shift['mean_kl']:.3f} "
                     f"| {shift['flipped_fraction']:.2f} | {r['proxy_first']:.3f} -> {r['proxy_last']:.3f} "
                     f"| {r['seconds']:.0f} | {r['rl_seconds']:.0f} | {r['measure_seconds']:.0f} | {cands} |")
    return lines


def _candidate(c: dict) -> str:
    """One measured candidate: its source and validation score, and (runs that recorded them) the
    selection score and loss on validation + calibration rows that picked the emitted one."""
    text = f"{c['source']}: {c['score']:.3f}"
    if c.get("selection_score") is not None:
        text += f" / {c['selection_score']:.4f} / {c['selection_loss']:.3f}"
    return text


def write(out: Path, rows: list[dict], spec: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation_graph_rl.json").write_text(json.dumps({"meta": meta, "spec": spec, "rows": rows}, indent=1,
                                                           default=float))
    head = ["# Graph-rl ablation: the learned policy vs its prior vs uniform L1", "",
            f"{meta['date']}; {meta['versions']}; command: `{meta['command']}`; "
            f"{meta.get('seconds', 0):.0f} s of wall time (the longest process).", ""]
    (out / "ABLATION_GRAPH_RL.md").write_text("\n".join(head + tables(rows, spec)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ABLATION["models"]))
    ap.add_argument("--seeds", default=",".join(map(str, ABLATION["seeds"])))
    ap.add_argument("--epochs", type=int, default=ABLATION["epochs"])
    ap.add_argument("--evaluations", type=int, default=ABLATION["evaluations"])
    ap.add_argument("--arms", default=",".join(ARMS), help="which of l1, none, l1-fisher to run")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--merge", nargs="+", help="ablation_graph_rl.json files of parallel runs: join them into --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = sorted((r for p in parts for r in p["rows"]),
                      key=lambda r: (ABLATION["models"].index(r["model"]) if r["model"] in ABLATION["models"] else 99,
                                     r["seed"], ARMS.index(r["arm"])))
        meta = {**parts[0]["meta"], "command": "; ".join(p["meta"]["command"] for p in parts),
                "seconds": max(p["meta"].get("seconds", 0) for p in parts)}
        write(Path(args.out), rows, parts[0]["spec"], meta)
        print("\n".join(tables(rows, parts[0]["spec"])))
        return 0
    spec = {"models": args.models.split(","), "seeds": [int(s) for s in args.seeds.split(",")],
            "epochs": args.epochs, "evaluations": args.evaluations}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": _versions(),
            "command": "python -m bench.ablation_graph_rl " + " ".join(sys.argv[1:] if argv is None else argv)}
    out, rows, t0 = Path(args.out), [], time.perf_counter()
    for model in spec["models"]:
        for seed in spec["seeds"]:
            for arm in args.arms.split(","):
                rows.append(run_one(model, arm, seed, spec))
                r = rows[-1]
                print(f"{model} seed {seed} {arm}: test {r['score']:.4f} source {r['source']} {r['seconds']:.0f} s",
                      flush=True)
                meta["seconds"] = time.perf_counter() - t0
                write(out, rows, spec, meta)
    print("\n".join(tables(rows, spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
