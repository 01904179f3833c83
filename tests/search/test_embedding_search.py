"""A token-id model end to end at the method level: uniform 4-bit quantizes the embedding tables with
every other kernel, the emitted bytes are the cost model's, and budgets count the tables.

(`compress --data ids.npz` cannot feed int64 ids yet: the data loader casts x to float; this runs
the same method through a SearchContext on an int64 Dataset, without fine-tuning, which casts too.)
"""
from __future__ import annotations

import onnx
import pytest

from hirelc_onnx.evaluate.data import Dataset, split_dataset
from hirelc_onnx.graph.blockgraph import build_block_graph
from hirelc_onnx.search.baselines import run_uniform
from hirelc_onnx.search.budget import repair
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.features import WeightPerturbation, kernel_features
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph.cost import model_cost
from passes.storage import initializer_nbytes
from tests.embedding_model import embedding_model, token_ids


@pytest.fixture(scope="module")
def setup():
    bg = build_block_graph(embedding_model())
    ctx = SearchContext(bg, split_dataset(Dataset(token_ids(240), None, "ids"), seed=0), "storage", finetune_epochs=0)
    return bg, ctx


def test_uniform_4bit_compresses_the_tables(setup):
    bg, ctx = setup
    result = run_uniform(bg, ctx, "storage", bits=4)
    tables = [k for k in bg.kernels.values() if k.op == "Gather"]
    assert all(result.config.get(k.name).bits == 4 for k in tables)
    emitted = initializer_nbytes(result.model)
    assert emitted == model_cost(bg, result.config).total_bytes
    assert bg.weight_bytes / emitted > 6.0  # fp32 tables would cap it near 1.3x
    assert result.val_score > 0.5  # top-1 agreement with the fp32 model on validation ids
    onnx.checker.check_model(result.model, full_check=True)


def test_search_signals_see_the_tables(setup):
    bg, _ = setup
    features = kernel_features(bg)
    word = next(k for k in bg.kernels.values() if k.weight == "Wword")
    assert features[word.name][5] == 0.0  # not prunable
    assert features[word.name][6] > 0.7  # most of the kernel bytes
    pert = WeightPerturbation(bg)
    config = CompressionConfig.uniform(bg.kernels, bits=2)
    assert pert.quant(word.name, config.get(word.name)) > pert.quant(word.name, CompressionConfig.uniform(
        bg.kernels, bits=8).get(word.name)) > 0.0
    assert pert.prune(word.name, 0.5) == 0.0


@pytest.mark.parametrize("target,budget", [("storage", 8.0), ("ort-cpu", 6.0)])
def test_repair_reaches_budgets_only_the_tables_allow(setup, target, budget):
    bg, _ = setup
    config = repair(bg, CompressionConfig({}, target=target), budget)
    cost = model_cost(bg, config)
    assert cost.ratio >= budget
    word = next(k.name for k in bg.kernels.values() if k.weight == "Wword")
    assert config.get(word).bits < 8
