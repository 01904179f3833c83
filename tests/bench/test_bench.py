"""A small version of `make bench`: it runs, writes the table, and the table holds measured rows."""
from __future__ import annotations

import json

import pytest

from bench.run import main


@pytest.mark.slow
def test_quick_bench_writes_table(tmp_path, reference_models):
    reference_models("resnet20")
    rc = main(["--quick", "--finetune-epochs", "2", "--extra-seeds", "1", "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "2 epochs fine-tuning each" in text
    assert "| resnet20 | uniform4 | storage |" in text and "| resnet20 | ort-int8 | ort-cpu |" in text
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["uniform4"]["ratio"] > 7.0  # 4-bit weights, measured on the emitted model
    assert abs(rows["ort-int8"]["drop_points"]) <= 0.5
    # every emitted model runs in OpenVINO too, agreeing with ORT
    assert all(isinstance(r["openvino_agreement"], float) and r["openvino_agreement"] >= 0.99 for r in data["rows"])
    assert {r["batch"] for r in data["latency"]} == {1, 32}
    for r in data["latency"]:  # speedups: the median per-round ratios, inside their interquartile range
        for name in ("pruned", "int8"):
            q1, q3 = r[f"{name}_speedup_iqr"]
            assert 0 < q1 <= r[f"{name}_speedup"] <= q3
        assert f"| {r['model']} | {r['batch']} | {r['fp32_ms']:.3f} | {r['pruned50_ms']:.3f} |" in text
    # the table over seeds: seed 0 is the main row, seed 1 a compress run of its own on another split
    seeds = {r["method"]: r for r in data["seed_rows"]}
    assert set(seeds) == {"uniform4", "ort-int8"} and {r["seed"] for r in seeds.values()} == {1}
    assert seeds["uniform4"]["ratio"] > 7.0 and 0.9 < seeds["uniform4"]["score"] <= 1.0
    mean = (rows["uniform4"]["score"] + seeds["uniform4"]["score"]) / 2
    assert f"| resnet20 | uniform4 | {rows['uniform4']['score']:.4f} | {seeds['uniform4']['score']:.4f} |" in text
    assert f"{mean:.4f}" in text
    # the graph-rl vs L1 table: both at the MACs limit, scored and timed on the emitted models
    (pruning,) = data["pruning"]
    assert pruning["model"] == "resnet20" and pruning["epochs"] == 1
    # one epoch after half the MACs are gone: well above chance (0.1) but machine-dependent (the reference
    # model is trained where the suite runs): L1 0.61 / graph-rl 0.71 where a 0.5 floor was set, 0.37 / 0.89 on
    # an AVX2 AMD EPYC
    for name in ("l1", "graph-rl"):
        assert pruning[f"{name}_macs"] <= 0.5 + 1e-9 and 0.25 < pruning[f"{name}_score"] <= 1.0
    assert "graph-rl vs uniform L1" in text and "| resnet20 | 1 | 0 |" in text
    # the table prints the speedups the JSON holds, for both methods
    speedups = " | ".join(f"{pruning[f'{n}_b1']:.2f}x / {pruning[f'{n}_b32']:.2f}x" for n in ("l1", "graph-rl"))
    assert speedups in text


@pytest.mark.slow
def test_memory_bench_measures_both_cases(tmp_path):
    """`make bench-memory` at toy sizes: both commands run in a child, the table holds their peaks."""
    from bench.memory import main as memory_main

    memory_main(["--out", str(tmp_path), "--compress-d", "64", "--compress-layers", "1", "--inspect-d", "64",
                 "--inspect-layers", "2", "--samples", "16"])
    data = json.loads((tmp_path / "memory.json").read_text())
    cases = {r["case"].split()[0]: r for r in data["rows"]}
    assert set(cases) == {"inspect", "compress"}
    for r in cases.values():
        assert r["peak_bytes"] >= r["peak_rss_bytes"] > 50e6  # a Python process with onnx and ORT loaded
        assert r["peak_over_fp32"] == pytest.approx(r["peak_bytes"] / r["fp32_bytes"])
        assert f"| {r['case']} |" in (tmp_path / "memory.md").read_text()
    assert cases["compress"]["output_bytes"] > 0
    assert data["machine"]["cores"] >= 1


def test_a_partial_table_says_it_is_partial_and_holds_its_rows(tmp_path):
    """`make bench` rewrites its table after every row: a run stopped early keeps what it measured, and
    its header says how far it got (and never claims a total time)."""
    from bench.run import _versions, write_results

    row = {"model": "resnet20", "method": "uniform4", "target": "storage", "ratio": 7.66, "file_ratio": 7.07,
           "fp32": 0.9777, "score": 0.9777, "drop_points": 0.0, "speedup_b1": 1.01, "speedup_b32": 1.05,
           "evaluations": 1, "seconds": 11.0, "openvino_agreement": 1.0}
    meta = {"date": "2026-11-29 02:00 UTC", "versions": _versions(), "evaluations": 4, "finetune_seconds": 10.0,
            "finetune_epochs": 20, "model_settings": {"efficientnet-lite0": {"evaluations": 3, "finetune_epochs": 4,
                                                                             "crops": 400}},
            "seconds": 42.0, "plan": {}, "partial": True}
    write_results(tmp_path, [row], [], meta)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "PARTIAL: 1 rows so far, 42 s." in text and "total" not in text
    assert "20 epochs fine-tuning each; efficientnet-lite0: 3 evaluations, 4 epochs each, 400 crops" in text
    assert "| resnet20 | uniform4 | storage | 7.66x | 7.07x | 0.9777 |" in text
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == [row]


def test_the_table_over_seeds_takes_seed_0_from_the_main_row_and_bolds_the_best_mean():
    """The speed rows over seeds: a method measured at every seed gets a mean, the model's best in bold,
    a method missing a seed gets none; the goal's verdicts per seed."""
    from bench.run import seeds_table

    rows = [{"model": "vgg", "method": "a", "score": 0.98, "speed_goal": {"met": True}, "macs_fraction": 1.0},
            {"model": "vgg", "method": "b", "score": 0.99, "speed_goal": {"met": False}, "macs_fraction": 0.8},
            {"model": "vgg", "method": "c", "score": 0.97},
            {"model": "vgg", "method": "not-in-seeds", "score": 0.5}]
    seed_rows = [{"model": "vgg", "method": "a", "seed": 1, "score": 0.99, "goal_met": True, "macs_fraction": 1.0},
                 {"model": "vgg", "method": "b", "seed": 1, "score": 0.97, "goal_met": True, "macs_fraction": 0.7}]
    text = "\n".join(seeds_table(rows, seed_rows))
    assert "| vgg | a | 0.9800 | 0.9900 | **0.9850** | yes yes | 1.00 1.00 |" in text
    assert "| vgg | b | 0.9900 | 0.9700 | 0.9800 | no yes | 0.80 0.70 |" in text
    assert "not-in-seeds" not in text and "| vgg | c |" not in text
    # a failed run: its seed blank, no mean for its method, the others' means unchanged
    failed = [*seed_rows, {"model": "vgg", "method": "b", "seed": 2, "error": "RuntimeError: boom"},
              {"model": "vgg", "method": "a", "seed": 2, "score": 0.98, "goal_met": True, "macs_fraction": 1.0}]
    text = "\n".join(seeds_table(rows, failed))
    assert "| vgg | b | 0.9900 | 0.9700 |  |  | no yes - |" in text
    assert "| vgg | a | 0.9800 | 0.9900 | 0.9800 | **0.9833** |" in text


def test_extra_seeds_must_be_integers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--extra-seeds", "one"])  # refused before anything runs
    assert exc.value.code == 2 and "--extra-seeds takes comma-separated integers" in capsys.readouterr().err


def test_ort_reference_agreement_compares_the_deployed_session_with_the_unoptimised_one(monkeypatch):
    """The "ORT ref." column: top-1 of ORT's deployed session (ORT_ENABLE_ALL) against the same file
    run unoptimised (ORT_DISABLE_ALL, the QDQ reference arithmetic), on the first 256 rows."""
    import numpy as np

    from bench.run import ort_reference_agreement
    from hirelc_onnx.evaluate import runner
    from hirelc_onnx.evaluate.data import Dataset

    levels = []

    def fake_predict(model, x, batch_size=64, config=None):  # the unoptimised run differs on rows 0..63
        level = (config or runner.default_session_config()).graph_optimization_level
        levels.append(level)
        logits = np.zeros((len(x), 2), np.float32)
        logits[:, 1] = 1.0
        if level == "disabled":
            logits[:64, 0] = 2.0
        return logits

    monkeypatch.setattr(runner, "predict", fake_predict)
    data = Dataset(np.zeros((300, 3), np.float32), None, "rows")
    assert ort_reference_agreement(object(), data) == (256 - 64) / 256
    assert sorted(levels) == ["all", "disabled"]


@pytest.mark.slow
def test_efficientnet_rows_are_scored_on_held_out_crops_the_search_never_saw(monkeypatch):
    """bench-speed's EfficientNet-Lite0 rows: compress() sees its crops, the row's score comes from
    other images' crops (`MODEL_SETTINGS["held_out"]`), where fp32 agrees with itself and a model that
    changes the logits does not everywhere."""
    import numpy as np
    import onnx

    from bench import run
    from hirelc_onnx.graph.loader import load_model

    monkeypatch.setitem(run.MODEL_SETTINGS, "efficientnet-lite0", {**run.MODEL_SETTINGS["efficientnet-lite0"],
                                                                   "crops": 16, "held_out": 24})
    path, data, score = run._model_and_data("efficientnet-lite0", quick=False)
    assert len(data) == 16
    model = load_model(path)
    assert score(model) == 1.0
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(0)
    for init in noisy.graph.initializer:
        if init.name.endswith("weight") or len(init.dims) == 4:
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array((w + rng.normal(0, 0.5 * w.std(), w.shape)).astype(w.dtype),
                                                       init.name))
    assert score(noisy) < 0.9
    assert run._model_and_data("efficientnet-lite0", quick=True)[2] is None
