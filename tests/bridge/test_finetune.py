"""Fine-tuning recovers pruned + quantized accuracy, keeps the best epoch, and is repeatable."""
from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hirelc_onnx.bridge import BridgeError, finetune, quant_specs
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.runner import evaluate
from hirelc_onnx.graph import build_block_graph
from passes.prune_channels import prune_channels
from passes.quantize import WeightQuantSpec
from tests.bridge import digits, tiny_cnn

quantize_weights = pytest.importorskip("passes.quantize_weights").quantize_weights


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@functools.lru_cache(maxsize=1)
def _trained_tiny() -> onnx.ModelProto:
    """The tiny CNN trained in fp32 for a few epochs (labels only matter here, not quality)."""
    s = digits()
    return finetune(tiny_cnn(), None, s.finetune, s.val, max_epochs=6, lr=3e-3, kd_weight=0.0, patience=99).model


def _unlabelled(ds: Dataset) -> Dataset:
    return Dataset(ds.x, None, ds.name + ":unlabelled")


def test_recovery_resnet20_pruned_half_and_4bit(reference_models):
    """ResNet-20, 50% of every prunable channel group (L1), 4-bit per-channel symmetric weights."""
    s = digits()
    bg = build_block_graph(onnx.load(str(reference_models("resnet20"))))
    weights = _weights(bg.model)
    keep = {}
    for group in bg.prunable_groups():
        score = np.zeros(group.length)
        for producer in group.producers:
            k = bg.kernels[producer]
            score += np.abs(np.moveaxis(weights[k.weight], k.out_axis, 0)).reshape(group.length, -1).sum(1)
        keep[group.id] = np.sort(np.argsort(-score, kind="stable")[: group.length // 2])
    pruned = prune_channels(bg.model, keep, bg.analysis)
    config = CompressionConfig.uniform(bg.kernels, bits=4, qtype="symmetric", granularity="per-channel")
    specs = quant_specs(pruned, config)
    assert len(specs) == len(bg.kernels)

    fp32 = evaluate(bg.model, s.test)["accuracy"]
    before = evaluate(quantize_weights(pruned, specs, target="storage"), s.test)["accuracy"]
    result = finetune(pruned, config, s.finetune, s.val, teacher=bg.model, time_budget_s=60.0)
    emitted = quantize_weights(result.model, specs, target="storage")
    after = evaluate(emitted, s.test)["accuracy"]
    print(f"\nresnet20 50% channels + int4 per-channel: test accuracy fp32 {fp32:.4f}, before fine-tune "
          f"{before:.4f}, after {after:.4f} ({100 * (after - fp32):+.2f} points); {len(result.history) - 1} epochs, "
          f"best {result.best_epoch}, stopped by {result.stopped}, {result.seconds:.1f} s")
    assert result.seconds <= 60.0 + 10.0  # the budget is checked per batch; one validation may overrun
    assert list(result.model.graph.node) == list(pruned.graph.node)
    assert after >= fp32 - 0.015


def test_same_seed_same_weights_other_seed_differs():
    s = digits()
    specs = quant_specs(tiny_cnn(), CompressionConfig.uniform(build_block_graph(tiny_cnn(), normalized=True).kernels,
                                                              bits=3, qtype="asymmetric", granularity="per-group",
                                                              group_size=8))
    runs = [finetune(tiny_cnn(), specs, s.finetune, s.val, max_epochs=2, time_budget_s=1e9, seed=seed).model
            for seed in (0, 0, 1)]
    a, b, c = (_weights(m) for m in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_diverging_training_keeps_the_starting_weights():
    s = digits()
    start = _trained_tiny()
    result = finetune(start, None, s.finetune, s.val, optimizer="sgd", lr=50.0, max_epochs=2, patience=1,
                      lr_probe_steps=0)
    assert result.best_epoch == 0
    assert result.history[1]["val_score"] < result.history[0]["val_score"]
    before, after = _weights(start), _weights(result.model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_probe_lowers_a_learning_rate_that_raises_the_loss():
    s = digits()
    start = _trained_tiny()
    result = finetune(start, None, s.finetune, s.val, optimizer="sgd", lr=50.0, max_epochs=2, patience=9)
    assert result.lr < 50.0
    assert result.best_val >= result.history[0]["val_score"]
    assert all(h["lr"] == result.lr for h in result.history[1:])


def test_diverged_epoch_restarts_from_the_best_weights_at_a_smaller_rate():
    s = digits()
    start = _trained_tiny()
    result = finetune(start, None, s.finetune, s.val, optimizer="sgd", lr=50.0, max_epochs=3, patience=9,
                      lr_probe_steps=0, backoff=0.01)
    rates = [h["lr"] for h in result.history[1:]]
    assert rates[0] == 50.0 and rates[1] == pytest.approx(0.5)
    assert result.history[1]["val_loss"] > 2 * result.history[0]["val_loss"]
    assert result.best_epoch != 1


def test_unlabelled_data_distils_the_teacher():
    s = digits()
    teacher = _trained_tiny()
    specs = {k.weight: WeightQuantSpec(2, True, "per-channel", axis=k.out_axis)
             for k in build_block_graph(teacher, normalized=True).kernels.values()}
    result = finetune(teacher, specs, _unlabelled(s.finetune), _unlabelled(s.val), teacher=teacher, max_epochs=4,
                      patience=99)
    scores = [h["val_score"] for h in result.history]
    assert all(v <= 0 for v in scores)  # -KL
    assert result.best_val == max(scores) > scores[0]


def test_without_a_clock_max_epochs_ends_training():
    s = digits()
    result = finetune(tiny_cnn(), None, s.finetune, s.val, time_budget_s=math.inf, max_epochs=3, patience=99)
    assert result.stopped == "max_epochs" and [h["epoch"] for h in result.history] == [0, 1, 2, 3]


def test_time_budget_stops_training():
    s = digits()
    result = finetune(tiny_cnn(), None, s.finetune, s.val, time_budget_s=0.0)
    assert result.stopped == "time_budget" and result.best_epoch == 0 and len(result.history) == 1


def test_teacher_logits_need_labelled_val_and_settings_are_checked():
    s = digits()
    with pytest.raises(BridgeError, match="epochs_max"):
        finetune(tiny_cnn(), None, s.finetune, s.val, epochs_max=3)
    with pytest.raises(BridgeError, match="kd_weight"):
        finetune(tiny_cnn(), None, s.finetune, s.val, kd_weight=1.5)
    with pytest.raises(BridgeError, match="backoff"):
        finetune(tiny_cnn(), None, s.finetune, s.val, backoff=1.0)
    with pytest.raises(BridgeError, match="teacher"):
        finetune(tiny_cnn(), None, s.finetune, _unlabelled(s.val), teacher=np.zeros((len(s.finetune), 10), np.float32))


def test_config_kernels_map_to_weight_specs():
    model = tiny_cnn()
    bg = build_block_graph(model, normalized=True)
    names = list(bg.kernels)
    config = CompressionConfig({names[0]: KernelConfig(bits=5, qtype="asymmetric", granularity="log2"),
                                names[-1]: KernelConfig(bits=32)})
    specs = quant_specs(model, config)
    first = bg.kernels[names[0]]
    assert specs == {first.weight: WeightQuantSpec(5, False, "log2", 32, first.out_axis)}
