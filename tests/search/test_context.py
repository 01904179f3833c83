"""SearchContext's real evaluations: the learning rate the first fine-tune settles on is the later ones'."""
from __future__ import annotations

import logging

import numpy as np

from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.search.baselines import random_config
from hirelc_onnx.search.budget import repair
from hirelc_onnx.search.context import SearchContext


def test_only_the_first_fine_tune_probes_the_learning_rate(reference_models, caplog):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), finetune_epochs=1)
    rng = np.random.default_rng(0)
    configs = [repair(bg, random_config(bg, "storage", rng), 6.0, fill=True) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="hirelc_onnx.bridge.training"):
        ctx.measure(configs[0])
        first = [r for r in caplog.records if r.getMessage().startswith("probe lr")]
        settled = ctx.finetune_lr
        caplog.clear()
        second = ctx.measure(configs[1])
    assert first and settled is not None  # the first fine-tune probed and settled a rate
    assert not [r for r in caplog.records if r.getMessage().startswith("probe lr")]  # the second did not probe
    assert [r for r in caplog.records if r.getMessage().startswith("epoch 1")]  # it trained
    assert second.finetuned and ctx.finetune_lr == settled
