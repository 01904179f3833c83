"""report.json / report.html / footprints.json of a real (cheap) run: the goal as a sentence with its
limits, shapes after pruning for every kernel, every measured candidate's config, one sensitivity scale."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from hirelc_onnx.compress import compress
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph import import_model, model_cost
from hirelc_onnx.report.build import goal_sentence, latency_note, sensitivity_shares


@pytest.fixture(scope="module")
def run(reference_models, tmp_path_factory):
    """random search: two real evaluations without fine-tuning (each config keeps 0.5-1 of the
    prunable channels), repaired to a budget."""
    tmp = tmp_path_factory.mktemp("report")
    model = tmp / "resnet20.onnx"
    shutil.copy(reference_models("resnet20"), model)
    out = tmp / "out"
    result = compress(model, method="random", data="digits", budget="8x", evaluations=2, finetune_epochs=0,
                      latency_runs=2, out_dir=out, seed=1)
    return model, out, result


def test_goal_is_a_sentence_with_its_limits(run):
    _, out, result = run
    report = json.loads((out / "report.json").read_text())
    size, goal = report["size"], report["goal"]
    assert goal["budget_met"] and goal["sentence"] == f"goal met: {size['ratio']:.2f}x reaches the budget 8x"
    page = (out / "report.html").read_text()
    assert goal["sentence"] in page and "budget_met" not in page  # not the raw dict


def test_every_kernel_has_its_shape_after_pruning(run):
    model, out, result = run
    rows = json.loads((out / "report.json").read_text())["kernels"]
    cost = model_cost(import_model(model), result.config)
    assert all("shape_after" in r for r in rows)
    pruned = [r for r in rows if r["shape_after"] != r["shape"]]
    assert pruned, "random configs keep 0.5, 0.75 or all channels per kernel: some kernel must be pruned"
    for r in rows:
        assert r["shape_after"] == list(cost.kernels[r["kernel"]].shape)
        assert all(a <= b for a, b in zip(r["shape_after"], r["shape"]))


def test_footprints_hold_every_measured_candidate(run):
    model, out, result = run
    fp = json.loads((out / "footprints.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert "footprints" not in report and report["outputs"]["footprints.json"] == str(out / "footprints.json")
    real = [h for h in report["history"] if h["kind"] == "real"]
    assert len(fp["candidates"]) == len(real) == 2
    bg = import_model(model)
    for c, h in zip(fp["candidates"], real):
        config = CompressionConfig.from_dict(c["config"]).validate(bg.kernels)
        assert c["ratio"] == pytest.approx(model_cost(bg, config).ratio) == pytest.approx(h["ratio"])
        assert c["score"] == h["score"] and c["method"] == "random" and c["step"] == h["step"]
        assert isinstance(c["pareto"], bool)
    assert any(c["pareto"] for c in fp["candidates"])
    emitted = fp["candidates"][fp["emitted"]["candidate"]]
    assert emitted["config"] == json.loads((out / "config.json").read_text())
    assert fp["emitted"]["test_score"] == report["accuracy"]["compressed"]
    assert "validation" in fp["score"]["split"]


def test_report_gives_sensitivity_on_one_scale(run, reference_models):
    _, out, _ = run
    report = json.loads((out / "report.json").read_text())
    assert not {"kernel_sensitivity", "block_sensitivity"} & set(report["search"])  # the search's own features
    assert report["sensitivity"] is None  # random measures none
    bg = import_model(reference_models("resnet20"))
    raw = {k: float(i + 1) for i, k in enumerate(bg.kernels)}
    share = {k: v / sum(raw.values()) for k, v in raw.items()}
    sens = sensitivity_shares(bg, {"kernel_sensitivity_share": share, "sensitivity_source": "fisher (8 samples)"})
    assert "inspect --sensitivity" in sens["scale"] and sens["per_kernel"] == share
    assert sens["per_block"] == {str(b.id): pytest.approx(sum(share[k] for k in b.kernels)) for b in bg.blocks}
    assert sum(sens["per_block"].values()) == pytest.approx(1.0)


def test_plots_name_kernels_and_mark_the_emitted_model():
    from hirelc_onnx.report.html import _plots

    kernels = [{"kernel": f"/layer{i}/Conv", "bits": b, "keep_ratio": 1.0} for i, b in enumerate((4, 32, 2))]
    report = {"history": [{"kind": "real", "ratio": 5.0, "score": 0.9}, {"kind": "real", "ratio": 7.0, "score": 0.8}],
              "size": {"ratio": 6.5}, "budget": 6.0, "kernels": kernels,
              "accuracy": {"metric": "top-1 accuracy", "val_compressed": 0.85, "compressed": 0.84, "fp32_val": 0.95},
              "sensitivity": {"per_kernel": {"/layer0/Conv": 0.5, "/layer1/Conv": 0.3, "/layer2/Conv": 0.2},
                              "source": "fisher"}}
    titles = [t for t, _ in _plots(report)]
    assert any("validation" in t and "test" in t for t in titles)
    assert any("shares of the total" in t for t in titles)
    assert "Bits and keep ratio per kernel" in titles


@pytest.mark.parametrize("budget, max_drop, ratio, drop, expect", [
    (6.0, 0.5, 6.06, 0.67, "goal MISSED: 6.06x reaches the budget 6x; --max-drop 0.5 points NOT met: dropped "
                           "0.67 points (test split)"),
    (100.0, None, 31.4, 66.8, "goal MISSED: budget 100x NOT reached: 31.40x"),
    (None, None, 7.66, 0.67, "no goal was set (no budget or --max-drop): 7.66x"),
])
def test_goal_sentence_cases(budget, max_drop, ratio, drop, expect):
    """One wording of the goal: the CLI's first line (commands/compress.py: goal_line) is the report's."""
    from hirelc_onnx.commands.compress import goal_line

    report = {"budget": budget, "max_drop": max_drop, "size": {"ratio": ratio}, "accuracy": {"drop_points": drop},
              "goal": {"budget_met": None if budget is None else ratio >= budget,
                       **({"max_drop_met": drop <= max_drop} if max_drop is not None else {})}}
    assert goal_sentence(report) == expect == goal_line(report)[1]


def test_latency_note_names_what_ort_ran():
    rows = [{"kernel": f"k{i}", "op_type": "Conv", "executed": "DequantizeLinear + Conv", "ms": 0.3, "fp32_ms": 0.1,
             "slower_than_fp32": True} for i in range(3)]
    rows.append({"kernel": "k3", "op_type": "Conv", "executed": "Conv", "ms": 0.1, "fp32_ms": 0.1,
                 "slower_than_fp32": False})
    note = latency_note({"batch1": {"fp32_ms": 1.0, "compressed_ms": 2.0, "speedup": 0.5}}, {"rows": rows})
    assert note.startswith("Slower than fp32 at batch 1 (2.00x slower).")
    assert "3 of 4 compressed kernels ran DequantizeLinear + Conv" in note and "1 of 4 ran the same fp32 Conv" in note
    assert re.search(r"took 1\.000 ms against 0\.400 ms", note)
    assert latency_note({"batch1": {"speedup": 1.1, "fp32_ms": 1, "compressed_ms": 0.9}}, {"rows": []}) is None
