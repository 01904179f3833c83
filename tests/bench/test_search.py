"""A small version of `make bench-search`: rows measured, cells tabled, HiReLC's winning source named."""
from __future__ import annotations

import json

import pytest

from bench.search import cells, main, verdicts
from hirelc_onnx.search import hirelc as hirelc_module
from tests.quick_cli import with_quick_settings


def test_cells_and_verdicts_from_rows():
    rows = [{"model": "m", "method": meth, "seed": s, "ratio": 6.0, "score": score, "seconds": 1.0}
            for meth, scores in (("hirelc", (0.9, 0.92)), ("knapsack", (0.8, 0.8))) for s, score in enumerate(scores)]
    rows.append({"model": "m", "method": "random", "seed": 0, "error": "boom"})
    table = cells(rows)
    assert set(table) == {("m", "hirelc"), ("m", "knapsack")}
    assert table[("m", "hirelc")]["mean"] == pytest.approx(0.91)
    assert table[("m", "knapsack")]["spread"] == 0.0
    assert "separates" in verdicts(table)[0] and "+11.00 pts" in verdicts(table)[0]
    rows.append({"model": "m", "method": "ort-int8 (static)", "seed": 0, "ratio": 3.8, "score": 0.99, "seconds": 1.0})
    line = verdicts(cells(rows))[0]
    assert "best baseline knapsack 0.8000 (hirelc ahead)" in line and "compressing less: ort-int8 (static) 0.9900 at 3.80x" in line
    level = [dict(r, score=0.8) if r["method"] == "hirelc" else r for r in rows]
    assert "best baseline knapsack 0.8000 (level)" in verdicts(cells(level))[0]  # the same models: not "ahead"
    rows.append({"model": "m", "method": "hirelc-prior-first", "seed": 0, "ratio": 6.0, "score": 0.95, "seconds": 1.0})
    line = verdicts(cells(rows))[0]  # an ablation of HiReLC is not a baseline it must beat
    assert "best baseline knapsack 0.8000 (hirelc ahead)" in line and line.endswith("HiReLC ablations: hirelc-prior-first 0.9500")


@pytest.mark.slow
@pytest.mark.xdist_group("text_recognizer")  # one worker builds it in a fresh clone while the other runs on
def test_quick_search_bench(tmp_path, small_recognizer_in_benches, monkeypatch):
    # the bench's machinery, not HiReLC's quality: the smoke-size agents
    monkeypatch.setattr(hirelc_module, "run_hirelc", with_quick_settings(hirelc_module.run_hirelc))
    assert main(["--quick", "--methods", "hirelc,ort-int8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "search.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["hirelc", "ort-int8 (static)"]
    hirelc = rows[0]
    assert hirelc["ratio"] >= 6.0 - 1e-6 and 0.0 < hirelc["score"] <= 1.0 and hirelc["n"] == 64
    assert hirelc["winner_source"] in hirelc["evaluations_by_source"]
    assert sum(hirelc["evaluations_by_source"].values()) == 2
    real = hirelc["real_evaluations"]  # each real evaluation's source and validation score
    assert len(real) == 2 and real[0]["refined_from"] is None  # the first round's pick: the best screened
    assert {r["source"] for r in real} <= {"prior", "vote", "vote-repaired", "vote-filled", "pool", "restart"}
    assert max(real, key=lambda r: (r["score"], r["ratio"]))["source"] == hirelc["winner_source"]  # ties: smaller
    # every candidate scored on the held-out data too: the winner's is the emitted model's score
    assert all(0.0 < r["held_out"] <= 1.0 for r in real)
    winner = max(real, key=lambda r: (r["score"], r["ratio"]))
    assert winner["held_out"] == hirelc["score"]
    text = (tmp_path / "SEARCH.md").read_text()
    assert f"{hirelc['score']:.4f}" in text and f"0: {hirelc['winner_source']}" in text
    assert f"-> {hirelc['score']:.4f}*" in text


def test_hirelc_minmax_is_hirelc_with_full_range_grids(monkeypatch, tmp_path):
    import importlib
    import types

    from bench.search import Task, run_cell

    compress_module = importlib.import_module("hirelc_onnx.compress")  # the module (the package exports the function)

    seen = {}

    def fake_compress(path, **kw):
        seen.update(kw)
        report = {"size": {"ratio": 6.0}, "accuracy": {"evaluations": 1}, "search": {}}
        return types.SimpleNamespace(report=report, model=None)

    monkeypatch.setattr(compress_module, "compress", fake_compress)
    task = Task("m.onnx", None, "top-1", 10, lambda m, r: 0.5, {})
    args = types.SimpleNamespace(budget=6.0, evaluations=2, finetune_epochs=0, split_fractions="0.05,0.25,0.5,0.2")
    row = run_cell("m", task, "hirelc-minmax", 0, args, tmp_path)
    assert seen["method"] == "hirelc" and seen["weight_range"] == "minmax"
    assert seen["split_fractions"] == args.split_fractions  # every cell searches on the same split
    assert row["method"] == "hirelc-minmax" and row["score"] == 0.5


def test_join_tables_several_runs(tmp_path):
    from bench.search import join, write_results

    def run(name, method, scores, date, **recorded):
        rows = [{"model": "m", "method": method, "seed": s, "ratio": 6.0, "score": x, "seconds": 2.0, "n": 10}
                for s, x in enumerate(scores)]
        meta = {"date": date, "versions": {"cpu": "x", "cores": 2, "onnxruntime": "1"}, "commit": name,
                "settings": {"seeds": ",".join(str(i) for i in range(len(scores))), "budget": 6.0, "evaluations": 4,
                             "finetune_epochs": 1, "held_out": 10, "search_samples": 800,
                             "split_fractions": "0.05,0.25,0.5,0.2", **recorded},
                "quick": False, "seconds": 5.0, "models": ["m"], "methods": [method]}
        write_results(tmp_path / name, rows, meta)
        return tmp_path / name / "search.json"

    join([run("a", "hirelc", (0.9, 0.92), "2026-01-01 10:00 UTC"),
          run("b", "knapsack", (0.8,), "2026-01-01 11:00 UTC", latency_runs=0)], tmp_path / "all")
    joined = json.loads((tmp_path / "all" / "search.json").read_text())
    assert [r["method"] for r in joined["rows"]] == ["hirelc", "hirelc", "knapsack"]
    meta = joined["meta"]
    assert meta["seconds"] == 10.0 and meta["date"] == "2026-01-01 11:00 UTC" and meta["settings"]["seeds"] == "0,1 / 0"
    assert [r["commit"] for r in meta["runs"]] == ["a", "b"]
    assert meta["settings"]["latency_runs"] == "2 / 0"  # run a recorded none: it timed them, as runs did then
    assert "in 2 invocations" in (tmp_path / "all" / "SEARCH.md").read_text()
    assert "compress latency_runs=2 / 0" in (tmp_path / "all" / "SEARCH.md").read_text()
    join([tmp_path / "all" / "search.json", run("c", "random", (0.1,), "2026-01-01 12:00 UTC")], tmp_path / "again")
    again = json.loads((tmp_path / "again" / "search.json").read_text())["meta"]
    assert [r["commit"] for r in again["runs"]] == ["a", "b", "c"]  # a joined file brings its own runs


def test_a_run_at_another_budget_joins_as_its_own_cells(tmp_path):
    from bench.search import join, write_results

    def run(name, budget, score):
        rows = [{"model": "m", "method": meth, "seed": 0, "ratio": budget, "score": score + d, "seconds": 2.0, "n": 10,
                 "budget": budget} for meth, d in (("hirelc", 0.01), ("knapsack", 0.0))]
        meta = {"date": "2026-01-01 10:00 UTC", "versions": {"cpu": "x", "cores": 2, "onnxruntime": "1"},
                "settings": {"seeds": "0", "budget": budget, "evaluations": 4, "finetune_epochs": 1, "held_out": 10,
                             "search_samples": 800}, "quick": False, "seconds": 5.0, "models": ["m"],
                "methods": ["hirelc", "knapsack"]}
        write_results(tmp_path / name, rows, meta)
        return tmp_path / name / "search.json"

    join([run("six", 6.0, 0.9), run("ten", 10.0, 0.5)], tmp_path / "all")
    table = cells(json.loads((tmp_path / "all" / "search.json").read_text())["rows"])
    assert table[("m", "hirelc")]["mean"] == pytest.approx(0.91)
    assert table[("m at 10x", "knapsack")]["mean"] == pytest.approx(0.5)
    text = (tmp_path / "all" / "SEARCH.md").read_text()
    assert "Budget 6.0 / 10.0x" in text and "- m at 10x: hirelc 0.5100" in text


def test_held_out_score_runs_once_per_distinct_model():
    """The winner is one of the measured candidates and a seed's prior is every method's round 0: the
    bench scores each distinct file once, and a changed file anew."""
    import onnx
    from onnx import TensorProto, helper

    from bench.search import _once_per_model

    def model(value: float) -> onnx.ModelProto:
        w = helper.make_tensor("w", TensorProto.FLOAT, [1], [value])
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
        return helper.make_model(graph)

    calls = []

    def score(m, result):
        calls.append(m)
        return float(onnx.numpy_helper.to_array(m.graph.initializer[0])[0])

    scored = _once_per_model(score)
    assert [scored(model(v), None) for v in (1.0, 1.0, 2.0, 1.0)] == [1.0, 1.0, 2.0, 1.0]
    assert len(calls) == 2
