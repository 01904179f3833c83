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


def test_the_fine_tune_reads_a_bounded_draw_of_the_validation_split(reference_models, monkeypatch):
    """The candidate is scored on every validation sample; the fine-tune's own checks on FINETUNE_VAL_SAMPLES
    of them, drawn across the split (a split keeps the data's order, which may be by class)."""
    import hirelc_onnx.bridge as bridge
    from hirelc_onnx.search.context import FINETUNE_VAL_SAMPLES

    bg = build_block_graph(load_model(reference_models("resnet20")))
    splits = split_dataset(load_digits(), 0, (0.05, 0.25, 0.5, 0.2))  # 898 validation samples
    ctx = SearchContext(bg, splits, finetune_epochs=1)
    seen = {}

    def fake_finetune(model, specs, train, val, **kw):
        seen["val"] = val
        raise bridge.BridgeError("stop here")  # a UserError: the context then measures untuned

    monkeypatch.setattr(bridge, "finetune", fake_finetune)
    m = ctx.measure(repair(bg, random_config(bg, "storage", np.random.default_rng(0)), 6.0, fill=True))
    val = seen["val"]
    assert len(splits.val) > FINETUNE_VAL_SAMPLES == len(val)
    where = {bytes(x): i for i, x in enumerate(splits.val.x)}
    positions = [where[bytes(x)] for x in val.x]  # validation samples only (a KeyError otherwise)
    assert max(positions) > 0.9 * len(splits.val)  # drawn across the split, not its first rows
    assert not m.finetuned and 0 < m.score <= 1  # scored on the whole validation split all the same
