"""Distillation per output kind: the losses by hand, and fine-tuning models whose outputs are not class scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hirelc_onnx.bridge import BridgeError, finetune, quant_specs
from hirelc_onnx.bridge.convert import to_torch
from hirelc_onnx.bridge.training import Distillation, kd_loss, validate
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.metrics import cosine_similarity, per_position_kl
from hirelc_onnx.evaluate.runner import predict_outputs
from hirelc_onnx.graph import build_block_graph
from passes.quantize_weights import quantize_weights
from tests.bridge import digits
from tests.kind_models import embedding_model, sequence_model, two_output_model

G = torch.Generator().manual_seed(0)


def test_kd_losses_by_hand():
    t = torch.randn(4, 6, 5, generator=G)
    s = torch.randn(4, 6, 5, generator=G)
    for kind in ("class-scores", "sequence-scores", "dense-map", "embedding"):
        same = t if kind != "class-scores" else t[:, 0]
        assert float(kd_loss(same, same, 2.0, kind)) == pytest.approx(0.0, abs=1e-6)
    # per position: T^2 * mean over the 24 positions of KL(softmax(t/T) || softmax(s/T)) over the last axis
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    by_hand = 4 * (p * (p.log() - q.log())).sum(-1).mean()
    assert float(kd_loss(s, t, 2.0, "sequence-scores")) == pytest.approx(float(by_hand), rel=1e-5)
    maps = torch.randn(3, 2, 4, 4, generator=G)
    noisy = maps + 0.1 * torch.randn(3, 2, 4, 4, generator=G)
    nmse = ((noisy - maps) ** 2).mean() / (maps ** 2).mean()
    assert float(kd_loss(noisy, maps, 4.0, "dense-map")) == pytest.approx(float(nmse), rel=1e-5)
    e, f = torch.randn(5, 8, generator=G), torch.randn(5, 8, generator=G)
    cos = (e * f).sum(1) / (e.norm(dim=1) * f.norm(dim=1))
    expected = ((f - e) ** 2).mean() / (e ** 2).mean() + (1 - cos).mean()
    assert float(kd_loss(f, e, 4.0, "embedding")) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(BridgeError, match="no distillation loss for outputs of kind 'boxes'"):
        kd_loss(f, e, 4.0, "boxes")


def test_sequence_validation_is_the_per_position_kl():
    s = digits()
    model = sequence_model()
    student = to_torch(model)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.8)  # a student that differs from the teacher
    data = Distillation.from_teacher(model, s.finetune, s.val)
    assert data.kinds == ("sequence-scores",) and data.label_output is None  # digit labels are not per-position
    got = validate(student, data, 64)
    out = student(torch.from_numpy(s.val.x)).detach().numpy()
    assert got.loss == pytest.approx(per_position_kl(out, data.teacher_val[0]), rel=1e-4)
    assert got.score == -got.loss


def test_embedding_model_fine_tunes_toward_the_fp32_embedding():
    """2-bit weights on a unit-norm embedding: distillation on cosine + MSE recovers most of the damage;
    the digit labels are not class indices of any output, so they are not trained on."""
    s = digits()
    model = embedding_model()
    config = CompressionConfig.uniform(build_block_graph(model).kernels, bits=2)
    specs = quant_specs(model, config)
    ref = predict_outputs(model, s.test.x)[0]
    before = cosine_similarity(predict_outputs(quantize_weights(model, specs, target="storage"), s.test.x)[0], ref)
    result = finetune(model, config, s.finetune, s.val, teacher=model, max_epochs=2, time_budget_s=60)
    after = cosine_similarity(predict_outputs(quantize_weights(result.model, specs, target="storage"), s.test.x)[0], ref)
    assert result.best_epoch > 0 and after > before + 0.05


def test_two_output_model_distils_both_and_trains_on_labels():
    s = digits()
    model = two_output_model()
    data = Distillation.from_teacher(model, s.finetune, s.val, kinds=("class-scores", "embedding"))
    assert data.label_output == 0 and data.teacher_val is None and len(data.teacher_train) == 2
    result = finetune(model, None, s.finetune, s.val, teacher=model, kinds=("class-scores", "embedding"),
                      max_epochs=1, time_budget_s=60)
    assert len(result.history) == 2 and 0.0 <= result.best_val <= 1.0  # accuracy on the labelled output
    unlabelled = Dataset(s.val.x, None, "val")
    data = Distillation.from_teacher(model, s.finetune, unlabelled, kinds=("class-scores", "embedding"))
    student = to_torch(model)
    assert validate(student, data, 64).loss == pytest.approx(0.0, abs=1e-5)  # both outputs equal the teacher's
    with pytest.raises(BridgeError, match="3 output kinds for 2 teacher outputs"):
        Distillation.from_teacher(model, s.finetune, s.val, kinds=("class-scores",) * 3)
    strings = Dataset(s.finetune.x, np.array(["seven"] * len(s.finetune)), "strings")
    data = Distillation.from_teacher(model, strings, unlabelled)
    assert data.label_output is None  # labels that are not class indices go to the metric only


def test_fisher_follows_the_output_kind():
    """Per-position pseudo-labels for sequences (the digit labels are not theirs); no Fisher for embeddings."""
    from hirelc_onnx.bridge.fisher import fisher_sensitivity

    s = digits()
    seq = fisher_sensitivity(build_block_graph(sequence_model()), s.calib, n_samples=8)
    assert seq.loss == "self" and sum(seq.per_kernel.values()) == pytest.approx(1.0)
    assert all(v > 0 for v in seq.raw.values())
    with pytest.raises(BridgeError, match="needs class scores; the first output holds embedding"):
        fisher_sensitivity(build_block_graph(embedding_model()), s.calib, n_samples=8)
