"""`make bench-ablation-two-stage`: two-stage with its agents against the same pipeline with uniform choices.

Issue 20's ablation. Both arms run `--method two-stage` at the same true-bytes goal with the same
fine-tuning epochs (`TwoStageSettings.finetune_epochs` and `mask_epochs`) and seed; the agent arm
lets the SAC agents choose keep ratio, density and bits per kernel (`choices="agent"`), the
uniform arm gives every kernel one keep ratio (the MACs target), one density and one bit width,
the density and width chosen so the exact bytes meet the goal (`choices="uniform"`). Models:
  * the VGG digits reference at 30x, scored on the held-out digits split (its size in the table);
  * the CTC text-line recognizer (a real model: CNN + self-attention) with `--metric
    examples.ctc_metric:char_accuracy`, searched on rendered lines and scored afterwards by
    character accuracy on 1000 held-out lines the search never saw.
Every row names the source of the emitted candidate per stage (agent episode, agent policy, a
fallback, uniform). Writes `ablation_two_stage.md` and `ablation_two_stage.json` (rewritten after
every run, so a stopped run keeps its rows).

    python -m bench.ablation_two_stage [--models recognizer,vgg] [--seeds 0,1,2] [--epochs N]
        [--evaluations 2] [--out bench/]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.ablation")

# model -> true-bytes goal and fine-tuning epochs (every fine-tune and the mask training, both arms);
# the recognizer's goal is what its attention and head (fp32 biases, norms, positions) leave
# reachable at 2-8 bits with a quarter of the weights
MODELS = {"recognizer": {"budget": "10x", "epochs": 3}, "vgg": {"budget": "30x", "epochs": 4}}
LINES = {"search_seed": 3, "held_out_seed": 1, "search": 1000, "held_out": 1000}
VARIANTS = ("agent", "uniform")


def _data(model: str, work: Path):
    """(model path, compress data, compress extras, held-out scorer or None)."""
    if model == "vgg":
        from examples.reference_models import build_reference_model

        return build_reference_model("vgg"), "digits", {}, None
    from examples.ctc_metric import char_accuracy
    from examples.reference_models import reference_model_path
    from examples.text_lines import render_lines, write_lines_npz
    from hirelc_onnx.evaluate.runner import predict

    search = write_lines_npz(work / "lines.npz", n=LINES["search"], seed=LINES["search_seed"])
    x, y = render_lines(LINES["held_out"], seed=LINES["held_out_seed"])

    def held_out(model) -> tuple[float, int]:
        return float(char_accuracy(predict(model, x), y)), len(y)

    return (reference_model_path("text_recognizer"), str(search),
            {"metric": "examples.ctc_metric:char_accuracy"}, held_out)


def run(models: list[str], seeds: list[int], epochs: int | None, evaluations: int, out: Path,
        variants: tuple[str, ...] = VARIANTS, weight_range: str = "mse") -> dict:
    """epochs: of every fine-tune and the mask training (None: each model's own, `MODELS`)."""
    from hirelc_onnx.compress import compress
    from hirelc_onnx.graph.loader import load_model
    from hirelc_onnx.search.two_stage import TwoStageSettings

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "cores": os.cpu_count(), "load_average_start": os.getloadavg(), "seeds": seeds,
            "finetune_epochs": {m: epochs or MODELS[m]["epochs"] for m in models}, "evaluations": evaluations,
            "episodes_per_stage": TwoStageSettings().episodes_per_evaluation * evaluations,
            "weight_range": weight_range}
    result = {"meta": meta, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            path, data, extra, held_out = _data(model, Path(tmp))
            fp32_held = held_out(load_model(path)) if held_out else None
            for seed in seeds:
                for variant in variants:
                    n_epochs = epochs or MODELS[model]["epochs"]
                    settings = TwoStageSettings(choices=variant, finetune_epochs=n_epochs, mask_epochs=n_epochs)
                    t0 = time.perf_counter()
                    result_ = compress(str(path), data=data, method="two-stage", budget=MODELS[model]["budget"],
                                       seed=seed, evaluations=evaluations, latency_runs=2, settings=settings,
                                       weight_range=weight_range, **extra)
                    seconds = time.perf_counter() - t0
                    rep, search = result_.report, result_.report["search"]
                    row = {"model": model, "seed": seed, "variant": variant, "goal": MODELS[model]["budget"],
                           "ratio": rep["size"]["ratio"], "metric": rep["accuracy"]["metric"],
                           "fp32": rep["accuracy"]["fp32"], "score": rep["accuracy"]["compressed"],
                           "test_n": rep["accuracy"]["n"], "source": search["source"],
                           "densities": search["densities"], "keep_ratios": search["keep_ratios"],
                           "bits": search["stages"]["stage2"]["bits"], "episodes": search["episodes"],
                           "evaluations": rep["accuracy"].get("evaluations"), "seconds": seconds,
                           "stages": {name: {k: stage.get(k) for k in ("ratio", "val_score", "test_score", "source",
                                                                         "candidates", "reward_curve", "density_budget",
                                                                         "probe_epochs", "uniform_tried")}
                                      for name, stage in search["stages"].items()}}
                    if held_out:
                        row["score"], row["test_n"] = held_out(result_.model)
                        row["fp32"], row["metric"] = fp32_held[0], "char accuracy (held-out lines)"
                    result["rows"].append(row)
                    print(_row_md(row), flush=True)
                    write(result, out)
    return result


def _row_md(r: dict) -> str:
    return (f"| {r['model']} | {r['seed']} | {r['variant']} | {r['ratio']:.2f}x | {r['fp32']:.4f} | {r['score']:.4f} "
            f"| {r['test_n']} | {r['source']['stage1']} / {r['source']['stage2']} | {r['episodes']} "
            f"| {r['seconds']:.0f} |")


def table(result: dict) -> list[str]:
    m = result["meta"]
    lines = ["# Two-stage: agents vs uniform choices at the same true-bytes goal", "",
             f"{m['date']}; {m['cores']} cores (load average at start {m['load_average_start'][0]:.1f}); "
             f"seeds {m['seeds']}; fine-tuning epochs per fine-tune and of mask training {m['finetune_epochs']}, "
             f"the same in both arms; {m['episodes_per_stage']} agent episodes per stage "
             f"({m['evaluations']} evaluations); weight ranges {m.get('weight_range', 'minmax')}. Score: held-out digits (VGG, top-1) or character accuracy on "
             "held-out rendered lines (recognizer); n: samples it rests on. Source: where the emitted candidate "
             "came from, stage 1 / stage 2.", "",
             "| model | seed | choices | ratio | fp32 | score | n | source | episodes | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_md(r) for r in result["rows"]]
    lines += ["", "| model | goal | agent mean | uniform mean | agent - uniform (points) | agent ratio | uniform ratio "
              "| agent bytes / uniform bytes (per seed) | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        arms = {v: [r for r in result["rows"] if r["model"] == model and r["variant"] == v] for v in VARIANTS}
        seeds = sorted({r["seed"] for r in arms["agent"]} & {r["seed"] for r in arms["uniform"]})
        if not seeds:
            continue
        mean = {v: float(np.mean([r["score"] for r in arms[v] if r["seed"] in seeds])) for v in VARIANTS}
        ratio = {v: float(np.mean([r["ratio"] for r in arms[v] if r["seed"] in seeds])) for v in VARIANTS}
        # the same size: each seed's agent bytes over its uniform bytes (1.000 = the same true bytes)
        by_seed = {v: {r["seed"]: r["ratio"] for r in arms[v]} for v in VARIANTS}
        bytes_ratio = " ".join(f"{by_seed['uniform'][sd] / by_seed['agent'][sd]:.3f}" for sd in seeds)
        lines.append(f"| {model} | {arms['agent'][0]['goal']} | {mean['agent']:.4f} | {mean['uniform']:.4f} "
                     f"| {100 * (mean['agent'] - mean['uniform']):+.2f} | {ratio['agent']:.2f}x "
                     f"| {ratio['uniform']:.2f}x | {bytes_ratio} | {len(seeds)} |")
    return lines


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation_two_stage.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "ablation_two_stage.md").write_text("\n".join(table(result)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every fine-tune and of mask training (default: each model's own)")
    parser.add_argument("--evaluations", type=int, default=2, help="agent episodes per stage / 25")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the arms to run (both by default)")
    parser.add_argument("--weight-range", choices=("mse", "minmax"), default="mse",
                        help="compress's --weight-range in both arms (minmax: grids span every weight)")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or any(v not in VARIANTS for v in variants):
        print(f"error: --variants takes {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    run(models, [int(s) for s in args.seeds.split(",")], args.epochs, args.evaluations, Path(args.out), variants,
        args.weight_range)
    return 0


if __name__ == "__main__":
    sys.exit(main())
