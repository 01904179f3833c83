"""knapsack: HiReLC's accuracy signal and greedy fit without agents, on the ResNet-20 reference."""
from __future__ import annotations

import pytest

from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.knapsack import run_knapsack
from hirelc_onnx.search.methods import get_method
from passes.storage import initializer_nbytes


@pytest.fixture(scope="module")
def resnet(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    return bg, SearchContext(bg, split_dataset(load_digits(), 0), "storage", finetune_seconds=0)


def test_knapsack_measures_distinct_fits_and_emits_the_best(resnet):
    bg, ctx = resnet
    result = run_knapsack(bg, ctx, "storage", budget=8.0, evaluations=3, seed=0)
    real = [h for h in result.history if h["kind"] == "real"]
    assert len(real) == 3
    assert real[0]["source"] == "prior"
    assert all(h["ratio"] >= 8.0 for h in real)
    assert result.val_score == max(h["score"] for h in real)
    assert model_cost(bg, result.config).ratio >= 8.0
    assert initializer_nbytes(result.model) == model_cost(bg, result.config).total_bytes
    assert result.extra["winner_source"] in {"prior", "recalibrated", "restart"}
    # each round measured a different config
    assert len({(h["ratio"], h["score"], h["bytes"]) for h in real}) >= 2 or len({h["source"] for h in real}) == 3


def test_knapsack_is_a_registered_method_that_needs_data():
    method = get_method("knapsack")
    assert method.needs_data and "budget" in method.options
    assert method.load() is run_knapsack


@pytest.mark.parametrize("method", ["knapsack", "random"])
def test_no_real_evaluation_is_refused_before_any_work(method):
    bg = object()  # never reached: the refusal comes first
    with pytest.raises(UserError, match="at least one real evaluation"):
        get_method(method).load()(bg, object(), "storage", budget=6.0, evaluations=0)
