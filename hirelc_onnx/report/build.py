"""report.json's content: every figure measured on the emitted model, never taken from the search's estimates.

Sizes are the emitted model's initializer bytes and file bytes; accuracy is its score on the held-out
test split through ONNX Runtime; latency is timed side by side with the fp32 model in one process.
"""
from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnxruntime

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.evaluate.per_node import per_node_rows
from hirelc_onnx.evaluate.runner import (benchmark_side_by_side, evict_big_sessions, fit_together, get_runner,
                                         model_file_size, predict_outputs)
from hirelc_onnx.graph import BlockGraph, ModelCost, model_cost
from hirelc_onnx.report.html import pareto_front
from hirelc_onnx.search.baselines import MethodResult
from hirelc_onnx.search.budget import bits_ladder
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.specs import weight_range
from hirelc_onnx.units import fmt_speed
from passes.storage import initializer_nbytes

__all__ = ["build_report", "per_kernel_rows", "reference_points", "versions", "sample_warning", "DATA_FREE_NOTE",
           "goal_verdict", "goal_sentence", "latency_note", "sensitivity_shares", "footprints"]

# report["search"] keys left out of report.json: the search's own log-scaled sensitivity features
# (the report gives sensitivity once, as shares: "sensitivity")
_SEARCH_INTERNAL = ("kernel_sensitivity", "block_sensitivity", "kernel_sensitivity_share")


def build_report(bg: BlockGraph, model_path: str | os.PathLike, result: MethodResult,
                 ctx: SearchContext | None, *, method: str, target: str, budget: float | None,
                 max_drop: float | None, seconds: float, latency_runs: int = 20,
                 input_shapes: Mapping[str, Sequence[int]] | None = None, data: dict | None = None) -> dict:
    """Measure the emitted model and assemble the report (all figures from the emitted model).

    input_shapes: one sample's dims per input (from the data, or --input-shape): they fill the
    symbolic dims of the latency feeds. data: what compress read (source, preprocessing, labels)."""
    emitted = result.model
    file_bytes = model_file_size(emitted)
    original_file = model_file_size(model_path)  # with its external-data files
    true_bytes = initializer_nbytes(emitted)
    size = {"original_weight_bytes": bg.weight_bytes, "weight_bytes": true_bytes,
            "ratio": bg.weight_bytes / max(true_bytes, 1), "original_file_bytes": original_file,
            "file_bytes": file_bytes, "file_ratio": original_file / max(file_bytes, 1)}
    cost = model_cost(bg, result.config) if result.config is not None else None
    if cost is not None:
        size.update(predicted_weight_bytes=cost.total_bytes, macs_fraction=cost.macs_fraction,
                    nominal_ratio_unweighted_bits_times_keep=cost.nominal_ratio)
    report: dict[str, Any] = {
        "method": method, "target": target, "budget": budget, "max_drop": max_drop,
        # how quantized weights' grid ranges were set (--weight-range; passes/clip_weights.py)
        "weight_range": None if result.config is None else weight_range(bg, result.config),
        "input": {"path": str(model_path), "kernels": len(bg.kernels), "params": bg.total_params,
                  "macs": bg.total_macs, "blocks": len(bg.blocks)},
        "size": size,
        "goal": {"budget_met": None if budget is None else size["ratio"] >= budget - 1e-9},
        "data": data,
        "accuracy": None,
        "kernels": per_kernel_rows(bg, result.config, emitted, cost),
        "history": [{k: v for k, v in h.items() if k != "config"} for h in result.history],  # configs: footprints
        "search": {"seconds": seconds, **{k: v for k, v in result.extra.items() if k not in _SEARCH_INTERNAL},
                   **_execution(ctx), **winner_source(result.history, result.extra)},
        "sensitivity": sensitivity_shares(bg, result.extra),
        # what produced the emitted candidate (graph-rl: "policy" or a ranking's cut), when the method says
        "source": result.extra.get("source"),
        "versions": versions(),
    }
    if ctx is not None:
        test, objective = ctx.splits.test, ctx.objective
        ref, outputs = ctx.reference(test), predict_outputs(emitted, test)
        fp32_test, comp_test = ctx.score(ref, test), ctx.score(outputs, test)

        def shown(score: float | None) -> float | None:  # a --metric-mode min metric: shown as itself, searched negated
            return score if score is None else objective.value(score)

        report["history"] = [{**h, "score": shown(h["score"])} if isinstance(h.get("score"), (int, float)) else h
                             for h in report["history"]]
        n = len(test)
        report["accuracy"] = {
            "metric": objective.name(test.classes is not None) + (" on synthesised inputs" if ctx.data_free else ""),
            "split": "test (held out, never seen by the search)", "n": n,
            "points_per_sample": 100.0 / max(n, 1), "sample_warning": sample_warning(n),
            "task_accuracy_measured": objective.uses_labels and test.y is not None and not ctx.data_free,
            "data_free_note": DATA_FREE_NOTE if ctx.data_free else None,
            "fp32": shown(fp32_test), "compressed": shown(comp_test),
            # points of the metric's own units (x100) it got worse by, whichever way it is better
            "drop_points": 100.0 * (fp32_test - comp_test),
            "val_compressed": shown(result.val_score), "fp32_val": shown(ctx.fp32_val_score),
            "outputs": objective.per_output(outputs, ref, test.y),
            "evaluations": ctx.evaluations, "finetune_warning": ctx.bridge_error,
            "finetune_budget": ({"epochs": ctx.finetune_epochs} if ctx.finetune_epochs is not None
                                else {"seconds": ctx.finetune_seconds}),
        }
        if max_drop is not None:
            report["goal"]["max_drop_met"] = report["accuracy"]["drop_points"] <= max_drop + 1e-9
        report["baselines"] = reference_points(bg, ctx, target)
    if latency_runs > 0:
        report["latency"] = _latency(bg.model, emitted, latency_runs, input_shapes)
        report["per_node"] = _per_node(bg.model, emitted, ctx, latency_runs)
    else:  # --latency-runs 0: a pipeline that times the model itself skips both profiles
        report["latency"] = {}
        report["per_node"] = {"error": f"skipped by {option('latency_runs', 0)}", "skipped": True}
    report["latency_note"] = latency_note(report["latency"], report["per_node"])
    report["goal"]["sentence"] = goal_sentence(report)
    report["footprints"] = footprints(report, result, shown if ctx is not None else (lambda v: v))
    return report


def goal_verdict(report: dict) -> tuple[bool | None, str]:
    """Whether the run met its goals (None: it had none) and one sentence saying so, with the limits
    and the figures reached: the one wording of the goal (the summary's first line, report.json's
    goal.sentence, report.html's headline)."""
    goal, size, acc = report.get("goal") or {}, report["size"], report.get("accuracy") or {}
    budget, max_drop = report.get("budget"), report.get("max_drop")
    parts, missed = [], False
    if goal.get("budget_met") is not None:
        default = " (the method's default)" if goal.get("budget_default") else ""
        if goal["budget_met"]:
            parts.append(f"{size['ratio']:.2f}x reaches the budget {budget:g}x{default}")
        else:
            missed = True
            parts.append(f"budget {budget:g}x{default} NOT reached: {size['ratio']:.2f}x")
    if goal.get("max_drop_met") is not None:
        if goal["max_drop_met"]:
            parts.append(f"a drop of {acc['drop_points']:.2f} points (test split) is within --max-drop {max_drop:g}")
        else:
            missed = True
            parts.append(f"--max-drop {max_drop:g} points NOT met: dropped {acc['drop_points']:.2f} points (test split)")
    if not parts:
        return None, f"no goal was set (no budget or --max-drop): {size['ratio']:.2f}x"
    return (not missed), ("goal MISSED: " if missed else "goal met: ") + "; ".join(parts)


def goal_sentence(report: dict) -> str:
    """The goal as one line a user reads (`goal_verdict`'s sentence)."""
    return goal_verdict(report)[1]


_QUANTIZED_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulNBits",
                      "GatherBlockQuantized")


def latency_note(latency: dict, per_node: dict) -> str | None:
    """Why the compressed model is as fast as it is, from what ORT ran per kernel (`per_node`): weights
    dequantized on every run, int8 kernels, or the fp32 kernels of weights decoded once at load."""
    timed = {k: v for k, v in latency.items() if isinstance(v, dict) and "speedup" in v}
    slower = [f"{k.replace('batch', 'batch ')} ({fmt_speed(v['speedup'])})" for k, v in timed.items()
              if v["speedup"] < 1]
    head = (f"Slower than fp32 at {', '.join(slower)}." if slower
            else "As fast as fp32 or faster." if timed else "Latency was not measured.")
    if per_node.get("skipped"):  # --latency-runs 0: nothing was timed
        return f"Latency was not measured ({per_node['error']})."
    rows = per_node.get("rows") or []
    if not rows:
        why = per_node.get("error") or "no compressed kernel"
        return f"{head} What ONNX Runtime ran per kernel was not measured ({why})." if slower else None
    n = len(rows)
    dq = [r for r in rows if "DequantizeLinear" in r["executed"]]
    int8 = [r for r in rows if r not in dq and r["executed"].split(" + ")[-1] in _QUANTIZED_KERNELS]
    folded = [r for r in rows if r["executed"] == r["op_type"]]
    parts = [head]
    if dq:
        parts.append(f"{len(dq)} of {n} compressed kernels ran DequantizeLinear + {dq[0]['executed'].split(' + ')[-1]}: "
                     "ONNX Runtime dequantizes their weights on every run instead of fusing them (no fused kernel "
                     "for this grid); --target storage decodes weights once, at load.")
    if int8:
        ops = ", ".join(sorted({r["executed"].split(" + ")[-1] for r in int8}))
        slow = sum(1 for r in int8 if r.get("slower_than_fp32"))
        parts.append(f"{len(int8)} of {n} ran int8 kernels ({ops}), {slow} of them slower than their fp32 kernel "
                     "on this CPU (int8 speed depends on VNNI).")
    if folded:
        parts.append(f"{len(folded)} of {n} ran the same fp32 {folded[0]['op_type']} as the original: their "
                     "weights were decoded once, at load, so they cost what fp32 costs.")
    ms = [r["ms"] for r in rows if r.get("ms") is not None and r.get("fp32_ms") is not None]
    ref = [r["fp32_ms"] for r in rows if r.get("ms") is not None and r.get("fp32_ms") is not None]
    if ms:
        parts.append(f"Those kernels took {sum(ms):.3f} ms against {sum(ref):.3f} ms in fp32 (ORT's profile).")
    if slower and len(folded) == n:
        parts.append("Every kernel runs as in fp32, so the difference is timing noise or the rest of the graph, "
                     "not the encoding.")
    return " ".join(parts)


def sensitivity_shares(bg: BlockGraph, extra: Mapping) -> dict | None:
    """The search's per-kernel sensitivity as shares of the total (summing to 1), per kernel and per
    block: the scale `inspect --sensitivity` prints. None when the method measured none."""
    share = extra.get("kernel_sensitivity_share")
    if not share:
        return None
    per_block = {str(b.id): sum(share.get(k, 0.0) for k in b.kernels) for b in bg.blocks}
    return {"scale": "share of the total (sums to 1), as `hirelc-onnx inspect --sensitivity` gives it",
            "source": extra.get("sensitivity_source"), "per_kernel": dict(share), "per_block": per_block}


def footprints(report: dict, result: MethodResult, shown=lambda v: v) -> dict:
    """Every measured candidate with its per-kernel config and figures (footprints.json): pick another
    point and re-apply it with `hirelc-onnx apply MODEL footprints.json --candidate ID`.

    Candidates are scored on the validation split (the search's); the emitted model's test score is
    in "emitted". `shown` turns a searched score into the metric's own (a --metric-mode min loss)."""
    emitted_config = result.config.to_dict() if result.config is not None else None
    # the run's rounding and weight ranges, so `apply` reproduces a point
    run_wide = {k: v for k, v in (emitted_config or {}).items() if k in ("channel_multiple", "weight_range")}
    candidates = []
    for h in result.history:
        if h.get("config") is None or h.get("kind", "real") != "real":
            continue
        config = {**run_wide, **h["config"]}
        entry = {"id": len(candidates),
                 **{k: v for k, v in h.items() if k not in ("config", "kind", "timing", "levels", "score")},
                 "score": shown(h["score"]) if isinstance(h.get("score"), (int, float)) else h.get("score"),
                 "config": config}
        candidates.append(entry)
    front = set(pareto_front([(c["ratio"], c["score"]) for c in candidates if c.get("score") is not None]))
    chosen = None
    for c in candidates:
        c["pareto"] = (c["ratio"], c.get("score")) in front
        if emitted_config is not None and c["config"] == emitted_config:
            chosen = c["id"]  # the last equal one: a config measured twice is the same point
    acc = report.get("accuracy") or {}
    if chosen is None and emitted_config is not None:  # a method whose history holds no configs (two-stage)
        chosen = len(candidates)
        candidates.append({"id": chosen, "method": report["method"], "source": "the emitted model",
                           "ratio": report["size"]["ratio"], "bytes": report["size"]["weight_bytes"],
                           "score": acc.get("val_compressed", result.val_score), "pareto": None,
                           "config": emitted_config})
    return {
        "model": report["input"]["path"], "method": report["method"], "target": report["target"],
        "budget": report.get("budget"), "original_weight_bytes": report["size"]["original_weight_bytes"],
        "score": {"metric": acc.get("metric"), "split": "validation (the search's; the test split is only "
                  "scored for the emitted model)"},
        "ratio": "original fp32 weight bytes / the candidate's true stored bytes",
        "emitted": {"candidate": chosen, "ratio": report["size"]["ratio"], "test_score": acc.get("compressed"),
                    "config": emitted_config},
        "candidates": candidates,
    }


def winner_source(history: list[dict], extra: dict) -> dict:
    """Which source produced the emitted candidate (hirelc, knapsack: prior, vote, vote-repaired, pool,
    ...) and how many real evaluations each source made: shows whether the agents decided."""
    if "winner_source" not in extra:
        return {}
    counts: dict[str, int] = {}
    for h in history:
        if h.get("kind", "real") == "real" and "source" in h:
            counts[h["source"]] = counts.get(h["source"], 0) + 1
    return {"winner": {"source": extra["winner_source"], "evaluations_by_source": counts}}


DATA_FREE_NOTE = ("no --data: task accuracy was NOT measured; inputs were synthesised from the graph and the "
                  "score is fidelity to the fp32 model, with no fine-tuning. --data gives better results.")
"""What the report and the printed summary say about a data-free run."""


def sample_warning(n: int) -> str | None:
    """A warning when one test sample is worth more than half a point (n < 200), else None."""
    if n >= 200:
        return None
    return (f"the test score rests on {n} samples: one sample is worth {100.0 / max(n, 1):.2f} points; "
            "differences of a few points are noise (give more data)")


def _per_node(fp32: onnx.ModelProto, emitted: onnx.ModelProto, ctx: SearchContext | None, runs: int) -> dict:
    """What ORT ran for each compressed kernel, its time and output SNR against fp32 (calibration rows,
    synthesised ones in a data-free run, at the data's shapes); an error says why not.

    Not for models too big for two sessions at once (`fit_together`): profiling holds both, each
    built from serialized bytes with extra outputs (several copies of every weight).
    """
    if not fit_together([fp32, emitted]):
        return {"error": "the model is too big to hold its fp32 and compressed sessions at once "
                         "(run `hirelc-onnx benchmark --per-node` on the written model)"}
    try:
        feed = ctx.calib_batches[0] if ctx is not None and ctx.calib_batches else \
            get_runner(fp32).random_feed(1, seed=0)
        fixed = get_runner(fp32).fixed_batch
        if fixed:  # a model exported for batch 1 takes exactly that many rows
            feed = {k: v[:fixed] for k, v in feed.items()}
        rows = per_node_rows(emitted, feed, reference=fp32, runs=runs)
    except UserError as exc:
        return {"error": str(exc)}
    source = "random input" if ctx is None else "synthesised inputs" if ctx.data_free else "calibration rows"
    return {"input": source, "rows": [r.as_dict() for r in rows]}


def per_kernel_rows(bg: BlockGraph, config: CompressionConfig | None, emitted: onnx.ModelProto,
                    cost: ModelCost | None = None) -> list[dict]:
    """What was done to every kernel, with its bytes before and after (`cost`: model_cost of `config`)."""
    cost = cost or (model_cost(bg, config) if config else None)
    shapes = {t.name: list(t.dims) for t in emitted.graph.initializer}  # weights left fp32 keep their names
    rows = []
    for k in bg.kernel_list():
        kc = config.get(k.name) if config else None
        row = {"kernel": k.name, "op": k.op, "block": k.block, "shape": list(k.weight_shape),
               "params": k.params, "macs": k.macs, "bytes_before": bg.initializer_bytes[k.weight],
               "group": k.group}
        if kc is not None:
            row.update(bits=kc.bits, keep_ratio=kc.keep_ratio, qtype=kc.qtype, granularity=kc.granularity,
                       bytes_after=cost.kernels[k.name].weight_bytes, params_after=cost.kernels[k.name].params)
        if cost is not None and cost.kernels[k.name].shape:  # pruned and quantized weights too (renamed in the file)
            row["shape_after"] = list(cost.kernels[k.name].shape)
        elif k.weight in shapes:
            row["shape_after"] = shapes[k.weight]
        rows.append(row)
    return rows


def reference_points(bg: BlockGraph, ctx: SearchContext, target: str) -> dict:
    """Uniform 8- and 4-bit weights without fine-tuning, on the validation split: the points every
    search result is plotted against (cheap: one rewrite and one ORT pass each)."""
    points = {}
    for bits in sorted(b for b in bits_ladder(target) if 4 <= b < 32):
        config = CompressionConfig.uniform(bg.kernels, target=target, bits=bits)
        evict_big_sessions()  # a big model: its rewrite's copies never stack on a session
        model = apply_config(bg, config, calib_batches=ctx.calib_batches)
        points[f"uniform {bits}-bit, no fine-tuning"] = {
            "ratio": model_cost(bg, config).ratio, "score": ctx.objective.value(ctx.score_model(model, ctx.splits.val))}
        del model
    return points


def _latency(fp32: onnx.ModelProto, emitted: onnx.ModelProto, runs: int,
             input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Median ORT latency of both models at batch 1 and 32 (a fixed-batch model: its batch), timed
    in alternating rounds: the speedup is the median per-round ratio, with its interquartile range
    ("speedup_iqr"); symbolic dims from `input_shapes` (one sample's dims). An error says why not.

    Models too big for two sessions at once (`fit_together`) are timed one after the other instead,
    and the entry says so ("interleaved": false).
    """
    latency = {}
    together = fit_together([fp32, emitted])
    fixed = get_runner(fp32).fixed_batch
    for batch in (fixed,) if fixed else (1, 32):
        try:
            if together:
                fp, comp = benchmark_side_by_side([fp32, emitted], batch_size=batch, runs=runs, warmup=3,
                                                  sample_shapes=input_shapes)
            else:
                fp, comp = (benchmark_side_by_side([m], batch_size=batch, runs=runs, warmup=3,
                                                   sample_shapes=input_shapes)[0] for m in (fp32, emitted))
        except UserError as exc:
            latency[f"batch{batch}"] = {"error": str(exc)}
            continue
        # timed together: the median of per-round ratios and their spread; else the ratio of medians
        speedup = comp["speedup"] if together else fp["median_ms"] / max(comp["median_ms"], 1e-9)
        latency[f"batch{batch}"] = {"fp32_ms": fp["median_ms"], "compressed_ms": comp["median_ms"],
                                    "speedup": speedup, "speed": fmt_speed(speedup)}
        if together:
            latency[f"batch{batch}"].update(speedup_iqr=comp["speedup_iqr"], rounds=comp["rounds"])
        else:
            latency[f"batch{batch}"]["interleaved"] = False
    return latency


def versions() -> dict:
    """The software and machine the figures were measured on."""
    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def _execution(ctx: Any) -> dict:
    """Where the real evaluations ran (search/executors.py), and per batched evaluation its worker,
    node, wall and queue seconds and attempts (a failed one with its reason)."""
    executor = getattr(ctx, "executor", None)
    if executor is None:
        return {}
    return {"executor": executor.describe(), "evaluations": list(ctx.evaluation_log),
            "batches": list(getattr(ctx, "batch_log", []))}
