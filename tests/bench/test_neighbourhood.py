"""`make bench-neighbourhood` in small: the climb from the prior, its neighbours and its table."""
from __future__ import annotations

import json

import pytest

from bench.neighbourhood import METHOD, main, neighbours


def test_each_neighbour_holds_its_change_and_meets_the_budget(reference_models):
    from hirelc_onnx.config import CompressionConfig
    from hirelc_onnx.graph import build_block_graph, load_model
    from hirelc_onnx.graph.cost import model_cost
    from hirelc_onnx.search.budget import repair

    bg = build_block_graph(load_model(reference_models("text_recognizer_small")))
    damage = lambda name, kc: (32 - kc.bits) * (1.0 + len(name) % 3) + 4.0 * (1.0 - kc.keep_ratio)
    prior = repair(bg, CompressionConfig({}, target="storage"), 6.0, damage=damage, fill=True)
    found = list(neighbours(bg, prior, "storage", 6.0, damage))
    assert len(found) > len(bg.kernels)  # several choices per kernel survive the fit
    for name, choice, fitted in found:
        assert choice != prior.get(name) and fitted.get(name) == choice
        assert model_cost(bg, fitted).ratio >= 6.0 - 1e-9
    assert {name for name, _, _ in found} == set(bg.kernels)


@pytest.mark.slow
@pytest.mark.xdist_group("text_recognizer")
def test_quick_neighbourhood_bench(tmp_path, small_recognizer_in_benches):
    from hirelc_onnx.search.methods import METHODS

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    assert METHOD not in METHODS  # the climb's registry entry lasts for the run only
    (row,) = json.loads((tmp_path / "neighbourhood.json").read_text())["rows"]
    path = row["path"]
    assert path[0]["change"] == "prior" and row["neighbours"] >= row["better_by_proxy"]
    # each step moved to a config the proxy scores better, measured for real at the budget
    assert all(b["logit_mse"] < a["logit_mse"] for a, b in zip(path, path[1:]))
    assert len(path) == 1 + min(1, row["better_by_proxy"])
    assert all(p["ratio"] >= 6.0 - 1e-6 and 0.0 < p["held_out"] <= 1.0 and 0.0 < p["validation"] <= 1.0 for p in path)
    text = (tmp_path / "NEIGHBOURHOOD.md").read_text()
    assert f"{path[0]['validation']:.4f} -> {path[0]['held_out']:.4f}" in text
