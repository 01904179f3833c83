"""The graph-rl ablation's tables: per-seed rows, means in points, the merge of parallel runs."""
from __future__ import annotations

import json

from bench.ablation_graph_rl import main


def _row(model: str, arm: str, seed: int, score: float) -> dict:
    row = {"model": model, "arm": arm, "seed": seed, "epochs": 3, "fp32": 0.99, "test_n": 400, "score": score,
           "val": score, "macs": 0.49, "seconds": 10.0, "source": "uniform-l1" if arm == "l1" else "policy"}
    if arm != "l1":
        row.update({"rl_seconds": 5.0, "measure_seconds": 4.0, "episodes": 16, "learning_curve": [-0.2, -0.1],
                    "best_proxy_curve": [-0.2, -0.1], "proxy_first": -0.2, "proxy_last": -0.1,
                    "policy_shift": {"mean_kl": 0.1, "flipped_fraction": 0.3, "mean_abs_prob_change": 0.2},
                    "candidates": [{"source": "policy", "score": score, "proxy": -0.1}]})
    return row


def test_merge_joins_parallel_runs_into_one_table_with_means(tmp_path):
    files = []
    for seed in (0, 1):
        rows = [_row("vgg", "l1", seed, 0.95), _row("vgg", "none", seed, 0.95 + 0.0025 * (seed + 1)),
                _row("vgg", "l1-fisher", seed, 0.95)]
        meta = {"date": "d", "versions": {}, "command": f"--seeds {seed}", "seconds": 5.0 + seed}
        spec = {"models": ["vgg"], "seeds": [seed], "epochs": 3, "evaluations": 4}
        path = tmp_path / f"{seed}.json"
        path.write_text(json.dumps({"meta": meta, "spec": spec, "rows": rows}))
        files.append(str(path))
    assert main(["--merge", *files, "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ABLATION_GRAPH_RL.md").read_text()
    assert "| vgg | 0 | 0.9900 | 0.9500 | 0.9525 | 0.9500 | +0.25 | +0.00 | policy | policy |" in md
    assert "| vgg | 1 | 0.9900 | 0.9500 | 0.9550 | 0.9500 | +0.50 | +0.00 | policy | policy |" in md
    assert "| vgg | **mean** | 0.9900 | 0.9500 | 0.9537 | 0.9500 | +0.37 | +0.00 | | |" in md
    joined = json.loads((tmp_path / "out" / "ablation_graph_rl.json").read_text())
    order = [(s, a) for s in (0, 1) for a in ("l1", "none", "l1-fisher")]
    assert [(r["seed"], r["arm"]) for r in joined["rows"]] == order


def test_an_arm_not_run_is_shown_as_not_available():
    from bench.ablation_graph_rl import tables

    rows = [_row("vgg", "l1", s, 0.95) for s in (0, 1)] + [_row("vgg", "none", s, 0.9525) for s in (0, 1)]
    md = "\n".join(tables(rows, {"epochs": 3, "evaluations": 4}))
    assert "| vgg | 0 | 0.9900 | 0.9500 | 0.9525 | n/a | +0.25 | n/a | policy | n/a |" in md
    assert "| vgg | **mean** | 0.9900 | 0.9500 | 0.9525 | n/a | +0.25 | n/a | | |" in md


def test_candidates_show_their_selection_figures_when_recorded():
    from bench.ablation_graph_rl import tables

    old = _row("vgg", "none", 0, 0.95)  # a run from before the selection figures were recorded
    new = _row("vgg", "none", 1, 0.95)
    new["candidates"] = [{"source": "ranking-l1-fisher", "score": 0.9852, "proxy": -0.06, "selection_score": 0.98889,
                          "selection_loss": 0.0412, "macs": 0.5},
                         {"source": "policy", "score": 0.9926, "proxy": -0.05, "selection_score": 0.99111,
                          "selection_loss": 0.0388, "macs": 0.49}]
    md = "\n".join(tables([_row("vgg", "l1", 0, 0.95), old, _row("vgg", "l1", 1, 0.95), new],
                          {"epochs": 3, "evaluations": 4}))
    assert "| policy: 0.950 |" in md
    assert "| ranking-l1-fisher: 0.985 / 0.9889 / 0.041, policy: 0.993 / 0.9911 / 0.039 |" in md


def test_uniform_l1_meets_the_macs_limit_with_the_counts_compress_rounds(reference_models):
    from dataclasses import replace

    from bench.run import l1_keep
    from hirelc_onnx.compress import default_channel_multiple
    from hirelc_onnx.graph import build_block_graph, load_model, model_cost
    from hirelc_onnx.search.baselines import _uniform_config

    path = reference_models("vgg")
    bg = replace(build_block_graph(load_model(path)), channel_multiple=default_channel_multiple("ort-cpu", None))
    keep = l1_keep(path)
    macs = model_cost(bg, _uniform_config(bg, "ort-cpu", 7, keep)).macs_fraction
    assert macs <= 0.5
    # the next rounded step up breaks the limit: the keep is the largest that meets it
    assert model_cost(bg, _uniform_config(bg, "ort-cpu", 7, min(1.0, keep + 0.05))).macs_fraction > 0.5
