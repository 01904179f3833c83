"""`make bench-search`: do the search methods separate? HiReLC against its own prior and the baselines.

On models where compression really costs accuracy (EfficientNet-Lite0 on photo crops, MiniLM on
sentences, the CTC recognizer on rendered lines), at one true-bytes budget: `hirelc`, `knapsack`
(HiReLC's estimator and greedy fit without the agents), `random`, `uniform-l1`, each with the same
real evaluations and the same fixed fine-tuning epochs, over several seeds; ORT's own int8 (static
for the CNNs, dynamic for MiniLM) once, as it has no seed. Every score is measured on held-out data
the search never saw (1000 samples by default: one is worth 0.1 point). Writes `bench/SEARCH.md`
(mean, spread and range per cell; HiReLC's winning source per seed) and `bench/search.json` (rows
with the fields of `bench/results.json`: model, method, seed, ratio, score, seconds).

    python -m bench.search [--quick] [--models efficientnet-lite0,minilm-l6,text-recognizer]
                           [--methods hirelc,knapsack] [--seeds 0,1,2] [--budget 6] [--evaluations 4]
                           [--finetune-epochs 1] [--held-out 1000] [--search-samples 800]
                           [--split-fractions 0.05,0.25,0.5,0.2] [--out bench/]

The digits references (`resnet20`, `vgg`) are accepted too, as a cheap check (scored on the
test split compress holds out).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("bench.search")

MODELS = ("efficientnet-lite0", "minilm-l6", "text-recognizer")
SEARCHED = ("hirelc", "knapsack", "random", "uniform-l1")
METHODS = (*SEARCHED, "ort-int8", "hirelc-before", "hirelc-minmax", "hirelc-unanchored", "hirelc-local",
           "hirelc-acquisition", "hirelc-prior-first")
"""hirelc-before (not run by default): HiReLC as it was before issue 17 (2-step episodes, 16-sample
rollouts, no surrogate warm-up, every vote filled by the greedy knapsack and measured whatever its
prediction), to measure what the changes moved. hirelc-minmax (not run by default): HiReLC with
`--weight-range minmax` (every quantized weight's grid spans its full range, as before fitted ranges).
hirelc-unanchored (not run by default): HiReLC whose agents refine their own working config instead of
the incumbent (`HiReLCSettings.refine_incumbent=False`, as before it existed). hirelc-local (not run by
default): HiReLC whose surrogate warm-up is mostly the prior's neighbours (`warmup_local=0.75`).
hirelc-acquisition (not run by default): HiReLC choosing its fine-tunes as it did before screen_rank and
restarts (the acquisition's first four screened, their predictions corrected by the screen, which reads the
proxy's logit-MSE as now; restarts only as the last resort). hirelc-prior-first (not run by default): HiReLC
whose first fine-tune is the estimator's prior, unscreened (`screen_first=False`, as before it existed)."""
SETTINGS_VARIANTS = {"hirelc-unanchored": {"refine_incumbent": False}, "hirelc-local": {"warmup_local": 0.75},
                     "hirelc-acquisition": {"screen_candidates": 4, "screen_rank": "corrected", "restarts": False},
                     "hirelc-prior-first": {"screen_first": False}}
"""The ablations that are HiReLC with some of its settings changed (HiReLCSettings' fields)."""
DEFAULT_METHODS = (*SEARCHED, "ort-int8")
DEFAULTS = {"seeds": "0,1,2", "budget": 6.0, "evaluations": 4, "finetune_epochs": 1, "held_out": 1000,
            "search_samples": 800, "split_fractions": "0.05,0.25,0.5,0.2"}
"""800 search samples split 40 / 200 / 400 / 160 (calibration / fine-tune / validation / compress's test):
each search picks its winner among its real evaluations on 400 validation samples. compress's default
split (0.1,0.5,0.15,0.25) of 400 samples left 60, where one sample is 1.7 points: a knapsack restart two
crops better than its prior there was 10 points worse on the 1000 held-out crops (EfficientNet-Lite0)."""
LATENCY_RUNS = 0
"""compress's latency_runs: the table reads sizes and scores, never the report's latency rows or per-kernel
profile, which cost an EfficientNet-Lite0 compress about 31 s of its 310 (cProfile, knapsack seed 0); each
cell's seconds are the search and the report without them."""
QUICK = {"models": "text-recognizer", "methods": "hirelc,knapsack,ort-int8", "seeds": "0", "evaluations": 2,
         "finetune_epochs": 0, "held_out": 64, "search_samples": 64}


@dataclass
class Task:
    """One model: its file, the data the search sees, and how an emitted model is scored on held-out data."""

    path: Any
    data: Any
    metric: str
    n: int
    score: Callable[[Any, Any], float] | None  # (emitted model, compress result) -> held-out score
    extra: dict


def _predict(model, inputs) -> np.ndarray:
    from hirelc_onnx.evaluate.runner import predict

    return predict(model, inputs)


def _once_per_model(score: Callable[[Any, Any], float]) -> Callable[[Any, Any], float]:
    """`score`, run once per distinct model file: a search's winner is one of its measured candidates,
    and a seed's knapsack prior is every method's round 0 at that seed, so the bench met the same model
    up to five times (EfficientNet-Lite0: 1000 crops, about 6 s each)."""
    import hashlib

    seen: dict[str, float] = {}

    def scored(model, result):
        key = hashlib.sha256(model.SerializeToString()).hexdigest()
        if key not in seen:
            seen[key] = score(model, result)
        return seen[key]

    return scored


def make_task(name: str, work: Path, held_out: int, search_samples: int) -> Task:
    """The data and held-out scoring of `name` (bench/real_models.py's and bench/run.py's sources)."""
    from hirelc_onnx.evaluate.data import Dataset
    from hirelc_onnx.graph.loader import load_model

    if name == "efficientnet-lite0":
        from examples.reference_models import effnet_crops, efficientnet_lite0
        from hirelc_onnx.evaluate.metrics import top1_agreement

        path = efficientnet_lite0()
        held = Dataset(effnet_crops(held_out, seed=1), None, "held-out photo crops")
        ref = _predict(load_model(path), held)
        return Task(path, Dataset(effnet_crops(search_samples, seed=0), None, "photo crops"),
                    "top-1 agreement with fp32", len(held),
                    _once_per_model(lambda m, r: top1_agreement(_predict(m, held), ref)), {})
    if name == "minilm-l6":
        from examples.embedding_metrics import mean_cosine
        from examples.minilm import minilm_l6, tokenize, write_sentences_npz
        from examples.sentences import sentence_corpus

        from bench.real_models import SENTENCES

        path, corpus = minilm_l6(), sentence_corpus()
        lo = SENTENCES["held_out"][0]
        held = Dataset(tokenize(corpus[lo:lo + held_out]), None, "held-out sentences")
        ref = _predict(load_model(path), held)
        data = str(write_sentences_npz(work / "sentences.npz", corpus[:search_samples]))
        return Task(path, data, "mean cosine to fp32", len(held),
                    _once_per_model(lambda m, r: mean_cosine(_predict(m, held), ref)), {})
    if name == "text-recognizer":
        from examples.ctc_metric import char_accuracy
        from examples.reference_models import reference_model_path
        from examples.text_lines import render_lines, write_lines_npz

        from bench.real_models import LINES

        path = reference_model_path("text_recognizer")
        data = str(write_lines_npz(work / "lines.npz", n=search_samples, seed=LINES["search_seed"]))
        x, y = render_lines(held_out, seed=LINES["held_out_seed"])
        return Task(path, data, "character accuracy", len(y),
                    _once_per_model(lambda m, r: char_accuracy(_predict(m, x), y)),
                    {"metric": "examples.ctc_metric:char_accuracy"})
    from examples.reference_models import build_reference_model

    return Task(build_reference_model(name), "digits", "accuracy (compress's test split)", 0,
                lambda m, r: r.report["accuracy"]["compressed"], {})


def _minilm_dynamic(task: Task) -> tuple[Any, float]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from hirelc_onnx.graph.loader import load_model
    from passes.storage import initializer_nbytes

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dyn.onnx"
        quantize_dynamic(str(task.path), str(out), weight_type=QuantType.QInt8)
        model = load_model(out)
        return model, initializer_nbytes(load_model(task.path)) / initializer_nbytes(model)


def _before():
    from hirelc_onnx.search.agents import AgentSettings
    from hirelc_onnx.search.hirelc import HiReLCSettings

    return HiReLCSettings(episode_steps=2, high_steps=96, low_steps=48, agent=AgentSettings(n_steps=4),
                          warmup_configs=0, warmup_weight=0.0, fill_votes=True,
                          select_by_prediction=False, refine_incumbent=False, screen_first=False)


@contextmanager
def _every_measurement():
    """Every real evaluation's Measurement while the block runs (in this process): the bench scores each
    on the held-out data, so whether a method's other candidates were better than its winner is seen
    apart from how well the validation split picked."""
    from hirelc_onnx.search.context import SearchContext

    seen: list = []
    original = SearchContext.measure

    def measure(self, *a, **kw):
        m = original(self, *a, **kw)
        seen.append(m)
        return m

    SearchContext.measure = measure
    try:
        yield seen
    finally:
        SearchContext.measure = original


def _digest(model) -> str:
    """The emitted weights' hash: two candidates with one digest are one model measured twice."""
    import hashlib

    h = hashlib.sha1()
    for t in model.graph.initializer:
        h.update(t.name.encode())
        h.update(t.raw_data)
    return h.hexdigest()[:12]


def run_cell(name: str, task: Task, method: str, seed: int, args, work: Path) -> dict:
    """One (model, method, seed) row."""
    from hirelc_onnx.compress import compress

    row: dict[str, Any] = {"model": name, "method": method, "seed": seed, "metric": task.metric, "budget": args.budget}
    t0 = time.perf_counter()
    if method == "ort-int8" and name == "minilm-l6":
        model, ratio = _minilm_dynamic(task)
        row.update(method="ort-int8 (dynamic)", ratio=ratio, score=task.score(model, None), evaluations=0)
    else:
        kw: dict[str, Any] = dict(method=method, data=task.data, seed=seed, latency_runs=LATENCY_RUNS,
                                  split_fractions=args.split_fractions,
                                  out_dir=str(work / f"{name}-{method}-{seed}"), **task.extra)
        if method == "ort-int8":
            kw.update(target="ort-cpu")
            row["method"] = "ort-int8 (static)"
        else:
            if method == "hirelc-before":
                kw.update(method="hirelc", settings=_before())
            if method in SETTINGS_VARIANTS:
                from hirelc_onnx.search.hirelc import HiReLCSettings

                kw.update(method="hirelc", settings=HiReLCSettings(**SETTINGS_VARIANTS[method]))
            if method == "hirelc-minmax":
                kw.update(method="hirelc", weight_range="minmax")
            kw.update(budget=f"{args.budget:g}x", evaluations=args.evaluations, finetune_epochs=args.finetune_epochs)
        with _every_measurement() as measured:
            result = compress(task.path, **kw)
        row["seconds"] = time.perf_counter() - t0  # the compress run alone: what a user waits for
        rep = result.report
        row.update(ratio=rep["size"]["ratio"], score=task.score(result.model, result),
                   evaluations=(rep.get("accuracy") or {}).get("evaluations"))
        winner = rep["search"].get("winner")
        if winner:
            row.update(winner_source=winner["source"], evaluations_by_source=winner["evaluations_by_source"])
            # each real evaluation's validation score beside its source: how far the agents' picks were from the winner
            row["real_evaluations"] = [{k: h.get(k) for k in ("round", "source", "predicted", "score", "ratio",
                                                              "refined_from", "timing")}
                                       for h in rep.get("history", []) if h.get("kind", "real") == "real"]
            if task.n:  # each candidate's held-out score beside its validation score (same Measurement)
                from hirelc_onnx.search.features import effective_kernel

                t1 = time.perf_counter()
                # in the order they were measured (candidates' scores and ratios tie: matching by them is not enough);
                # one that does not line up with its record is left unscored
                for ev, m in zip(row["real_evaluations"], measured):
                    same = m.score == ev["score"] and m.cost.ratio == ev["ratio"]
                    ev["held_out"] = task.score(m.model, None) if same else None
                    if same:  # how far from the first (the prior), and whether it is the same model again
                        ev["kernels_changed"] = sum(effective_kernel(m.config.get(n)) != effective_kernel(measured[0].config.get(n))
                                                    for n in {*m.config.kernels, *measured[0].config.kernels})
                        ev["model_digest"] = _digest(m.model)
                row["scoring_seconds"] = time.perf_counter() - t1  # the bench's, not the search's
        if task.n == 0:
            row["n"] = (rep.get("accuracy") or {}).get("n")
    row.setdefault("seconds", time.perf_counter() - t0)
    row.setdefault("n", task.n)
    row.update(finetune_epochs=None if method == "ort-int8" else args.finetune_epochs)
    return row


def label(row: dict) -> str:
    """The model as the tables name it: with its budget when that is not the default's (a 10x run joined
    beside the 6x one is its own set of cells)."""
    budget = row.get("budget", DEFAULTS["budget"])
    return row["model"] if budget == DEFAULTS["budget"] else f"{row['model']} at {budget:g}x"


def cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(model, method) -> mean, spread (sample standard deviation; 0 for one seed), range and seeds."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if "score" in r:
            key = (label(r), r["method"])
            out.setdefault(key, {"scores": [], "rows": []})
            out[key]["scores"].append(r["score"])
            out[key]["rows"].append(r)
    for c in out.values():
        s = c["scores"]
        c.update(mean=statistics.fmean(s), spread=statistics.stdev(s) if len(s) > 1 else 0.0, lo=min(s), hi=max(s),
                 ratio=statistics.fmean(r["ratio"] for r in c["rows"]),
                 seconds=statistics.fmean(r["seconds"] for r in c["rows"]))
    return out


def verdicts(table: dict[tuple[str, str], dict]) -> list[str]:
    """Per model: is HiReLC's mean >= every baseline's at its compression (within 5% of its ratio), and above
    knapsack's by more than the larger spread? Baselines that compress less, and HiReLC's ablations, are
    listed apart."""
    lines = []
    for model in dict.fromkeys(m for m, _ in table):
        h, k = table.get((model, "hirelc")), table.get((model, "knapsack"))
        if h is None:
            continue
        # HiReLC's own ablations (hirelc-*) are not baselines: they are listed apart
        others = [(meth, c) for (m, meth), c in table.items() if m == model and not meth.startswith("hirelc")]
        ablations = [f"{meth} {c['mean']:.4f}" for (m, meth), c in table.items() if m == model and meth.startswith("hirelc-")]
        # a baseline compared on score compresses as much (ORT's int8 stops at about 3.8x: said apart)
        level = [(meth, c["mean"]) for meth, c in others if c["ratio"] >= 0.95 * h["ratio"]]
        lower = [f"{meth} {c['mean']:.4f} at {c['ratio']:.2f}x" for meth, c in others if c["ratio"] < 0.95 * h["ratio"]]
        best_other = max(level, key=lambda o: o[1], default=None)
        line = f"- {model}: hirelc {h['mean']:.4f}"
        if best_other:
            standing = ("hirelc ahead" if h["mean"] > best_other[1] else "level" if h["mean"] == best_other[1]
                        else "hirelc behind")
            line += f"; best baseline {best_other[0]} {best_other[1]:.4f} ({standing})"
        if k is not None:
            margin, spread = h["mean"] - k["mean"], max(h["spread"], k["spread"])
            line += (f"; vs knapsack {100 * margin:+.2f} pts, larger spread {100 * spread:.2f} pts "
                     f"({'separates' if margin > spread else 'does not separate'})")
        if lower:
            line += f"; compressing less: {', '.join(lower)}"
        if ablations:
            line += f"; HiReLC ablations: {', '.join(ablations)}"
        lines.append(line)
    return lines


def candidate_lines(rows: list[dict]) -> list[str]:
    """Per searched row, every real evaluation: its source, validation score and held-out score (the winner
    marked), so a better candidate the validation split did not pick is seen."""
    scored = [r for r in rows if any(ev.get("held_out") is not None for ev in r.get("real_evaluations", []))]
    if not scored:
        return []
    lines = ["", "## Every real evaluation: source, validation -> held out (* the winner's held-out score: the winner, or a tie)", "",
             "| model | method | seed | candidates |", "|---|---|---|---|"]
    for r in scored:
        cands = []
        for ev in r["real_evaluations"]:
            held = "?" if ev.get("held_out") is None else f"{ev['held_out']:.4f}"
            won = ev.get("held_out") is not None and ev["held_out"] == r.get("score")  # the emitted model is one of them
            moved = f" ({ev['kernels_changed']} kernels changed)" if ev.get("round") and "kernels_changed" in ev else ""
            cands.append(f"{ev['round']} {ev['source']}{moved} {ev['score']:.4f} -> {held}{'*' if won else ''}")
        lines.append(f"| {label(r)} | {r['method']} | {r['seed']} | {'; '.join(cands)} |")
    return lines


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    table = cells(rows)
    a = meta["settings"]
    v = meta["versions"]
    lines = ["# hirelc-onnx: do the search methods separate?", "",
             f"Run {meta['date']} on {v['cpu']} ({v['cores']} cores), onnxruntime {v['onnxruntime']}"
             f"{' (--quick: a smoke run, not the benchmark)' if meta['quick'] else ''}; total {meta['seconds']:.0f} s"
             f"{'' if not meta.get('runs') else ' in ' + str(len(meta['runs'])) + ' invocations (meta.runs in search.json)'}"
             f"{'; code ' + meta['commit'] if meta.get('commit') else ''}.",
             f"Budget {a['budget'] if isinstance(a['budget'], str) else format(a['budget'], 'g')}x true bytes (a cell at "
             f"another budget says so); seeds {a['seeds']}; {a['evaluations']} real evaluations and "
             f"{a['finetune_epochs']} fine-tuning epoch(s) each for every searched method; ORT int8 once (no seed).",
             f"Search data: {a['search_samples']} samples per model, split {a.get('split_fractions', 'by default')} "
             "(calibration, fine-tune, validation, compress's test); scores on "
             f"{a['held_out']} held-out samples "
             "(never seen by the search; digits models: compress's own test split).",
             "spread: sample standard deviation over seeds. seconds: the compress call, search and report "
             f"(compress latency_runs={a.get('latency_runs', 2)}; 0 skips the report's latency rows).", "",
             "| model | method | seeds | ratio | mean score | spread | min..max | n | mean seconds | HiReLC winner per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, method), c in table.items():
        winners = ", ".join(f"{r['seed']}: {r['winner_source']}" for r in c["rows"] if "winner_source" in r)
        lines.append(f"| {model} | {method} | {len(c['scores'])} | {c['ratio']:.2f}x | {c['mean']:.4f} | "
                     f"{c['spread']:.4f} | {c['lo']:.4f}..{c['hi']:.4f} | {c['rows'][0].get('n')} | "
                     f"{c['seconds']:.0f} | {winners if method.startswith('hirelc') or method == 'knapsack' else ''} |")
    lines += ["", "## Verdicts", ""] + verdicts(table)
    lines += candidate_lines(rows)
    errors = [r for r in rows if "error" in r]
    lines += [""] + [f"- {r['model']} {r['method']} seed {r['seed']}: error: {r['error']}" for r in errors]
    out.mkdir(parents=True, exist_ok=True)
    (out / "SEARCH.md").write_text("\n".join(lines).rstrip() + "\n")
    (out / "search.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")


def _commit() -> str | None:
    """The code a run measured (the checkout's HEAD, + when it has uncommitted changes), or None outside git."""
    import subprocess

    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+" if dirty else "")) or None


_UNRECORDED = {"latency_runs": 2}
"""Settings runs before a given commit did not record, with the value they ran at."""


def join(paths: list[Path], out: Path) -> None:
    """One table from several runs' search.json (a bench split over invocations): rows in the runs' order,
    each run's date, code, models, methods, seeds and seconds kept in meta.runs (a joined file brings its own)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    metas = [run["meta"] for run in runs]
    settings = {k: v for m in reversed(metas) for k, v in m["settings"].items()}
    for key in settings:  # a setting a run did not record had its value of before (_UNRECORDED)
        values = list(dict.fromkeys(str(m["settings"].get(key, _UNRECORDED.get(key))) for m in metas))
        if len(values) > 1:  # the same value stays as it was (a number the table formats as one)
            settings[key] = " / ".join(values)
    meta = {"date": max(m["date"] for m in metas), "versions": metas[0]["versions"], "settings": settings,
            "quick": any(m.get("quick") for m in metas), "seconds": sum(m["seconds"] for m in metas),
            "models": list(dict.fromkeys(x for m in metas for x in m["models"])),
            "methods": list(dict.fromkeys(x for m in metas for x in m["methods"])),
            "runs": [run for m in metas for run in (m.get("runs") or [{k: m.get(k) for k in (
                "date", "commit", "models", "methods", "seconds")} | {"seeds": m["settings"]["seeds"]}])]}
    write_results(out, rows, meta)


def main(argv: list[str] | None = None) -> int:
    from bench.run import _versions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="A smoke run (the test suite's): recognizer, one seed, tiny data.")
    ap.add_argument("--models", default=None, help=f"Comma-separated (default {','.join(MODELS)}; resnet20, vgg too).")
    ap.add_argument("--methods", default=None, help=f"Comma-separated, of {','.join(METHODS)} "
                                                    f"(default {','.join(DEFAULT_METHODS)}).")
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--budget", type=float, default=None, help="True-bytes ratio (default 6).")
    ap.add_argument("--evaluations", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--held-out", type=int, default=None)
    ap.add_argument("--search-samples", type=int, default=None, help="Samples each search is given (default 800).")
    ap.add_argument("--split-fractions", default=None,
                    help="compress's --split-fractions for them (default 0.05,0.25,0.5,0.2: 400 validation samples).")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--join", default=None, help="Comma-separated search.json files of earlier runs: write one "
                                                 "table of their rows to --out, running nothing.")
    args = ap.parse_args(argv)
    if args.join:
        join([Path(p) for p in args.join.split(",") if p], args.out)
        print(f"wrote {args.out / 'SEARCH.md'}")
        return 0
    base = {**DEFAULTS, "models": ",".join(MODELS), "methods": ",".join(DEFAULT_METHODS), **(QUICK if args.quick else {})}
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models, methods = [m for m in args.models.split(",") if m], [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hirelc-bench-search-") as tmp:
        for name in models:
            task = make_task(name, Path(tmp), args.held_out, args.search_samples)
            for method in methods:
                for seed in (seeds[:1] if method == "ort-int8" else seeds):
                    try:
                        row = run_cell(name, task, method, seed, args, Path(tmp))
                    except Exception as exc:  # a failing cell is a line of the table, not the end of the bench
                        log.exception("%s %s seed %d failed", name, method, seed)
                        row = {"model": name, "method": method, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                    print(json.dumps(row, default=float), flush=True)
                    rows.append(row)
    settings = {**{k: getattr(args, k) for k in ("seeds", "budget", "evaluations", "finetune_epochs", "held_out",
                                                 "search_samples", "split_fractions")}, "latency_runs": LATENCY_RUNS}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": _versions(), "commit": _commit(),
            "settings": settings, "quick": args.quick, "seconds": time.perf_counter() - start,
            "models": models, "methods": methods}
    write_results(args.out, rows, meta)
    print(f"wrote {args.out / 'SEARCH.md'} in {meta['seconds']:.0f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
