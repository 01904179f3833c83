"""Output kinds, their metrics (against hand computations) and the Objective built on them."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr, softmax

from hirelc_onnx.errors import DataError, UserError
from hirelc_onnx.evaluate.metrics import (
    cosine_similarity,
    per_position_agreement,
    per_position_kl,
    snr_db,
    top1_agreement,
)
from hirelc_onnx.evaluate.objective import Objective, class_labels, expected_score
from hirelc_onnx.evaluate.output_kinds import KINDS, classify, parse_overrides, resolve_kinds

RNG = np.random.default_rng(0)


def test_classify_by_shape_and_sample():
    assert classify(["N", 10]) == "class-scores"
    assert classify([1, 10, 1, 1]) == "class-scores"  # a (N, C, 1, 1) head
    assert classify(["N", "T", 37]) == "sequence-scores"
    assert classify(["N", 3, 32, 32]) == "dense-map"
    assert classify(["N", 1]) == "embedding"  # one regression value per sample
    assert classify(["N"]) == "embedding"
    assert classify(["N", 5, 1]) == "class-scores"  # trailing 1-dims fold as a (N, C, 1, 1) head does
    emb = RNG.normal(size=(6, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert classify(["N", 8], emb) == "embedding"  # unit-norm vectors: a normalised embedding
    assert classify(["N", 8], 3 * emb) == "class-scores"
    probs = np.eye(8)[[0, 3, 5, 1, 2, 7]] * 0.9999 + 0.0001 / 8  # confident softmax: nearly one-hot
    assert classify(["N", 8], probs) == "class-scores"
    assert classify(None, RNG.normal(size=(4, 7, 5))) == "sequence-scores"  # the data's shape decides


def test_overrides_parse_and_refuse():
    names = ["logits", "emb"]
    assert parse_overrides("embedding", names) == {"logits": "embedding", "emb": "embedding"}
    assert parse_overrides("emb=embedding", names) == {"emb": "embedding"}
    assert parse_overrides({"logits": "dense-map"}, names) == {"logits": "dense-map"}
    with pytest.raises(UserError, match="unknown output kind 'words'"):
        parse_overrides("words", names)
    with pytest.raises(UserError, match="does not have; its outputs: logits, emb"):
        parse_overrides("nope=embedding", names)
    assert resolve_kinds(names, [["N", 4], ["N", 3]], None, "emb=embedding") == ("class-scores", "embedding")


def test_per_position_metrics_by_hand():
    ref = np.zeros((2, 3, 4))
    ref[0, :, 1] = ref[1, :, 2] = 5.0  # reference reads class 1 at every position of sample 0, 2 of sample 1
    cand = ref.copy()
    cand[0, 2] = [0, 0, 0, 9]  # one of six positions changed
    assert per_position_agreement(cand, ref) == pytest.approx(5 / 6)
    p, q = softmax(ref.reshape(-1, 4), axis=1), softmax(cand.reshape(-1, 4), axis=1)
    assert per_position_kl(cand, ref) == pytest.approx(rel_entr(p, q).sum(axis=1).mean(), rel=1e-9)
    assert per_position_kl(ref, ref) == 0.0


def test_flattened_top1_was_wrong_on_sequences():
    """The CTC bug: one arg-max over (N, T*C) reads one position; per-position agreement reads all."""
    ref = RNG.normal(size=(50, 12, 6))
    cand = ref.copy()
    flat_max = ref.reshape(50, -1).argmax(1)
    # damage every position except the one the flattened arg-max looks at
    for i in range(50):
        t_keep = flat_max[i] // 6
        for t in range(12):
            if t != t_keep:
                cand[i, t] = np.roll(ref[i, t], 1)
    old = np.mean(cand.reshape(50, -1).argmax(1) == ref.reshape(50, -1).argmax(1))
    assert old == 1.0  # the flattened metric sees nothing wrong
    assert per_position_agreement(cand, ref) < 0.2
    with pytest.raises(DataError, match="per-position or map"):
        top1_agreement(cand, ref)  # class-score metrics refuse sequences instead of flattening them


def test_snr_and_cosine_by_hand():
    ref = np.array([[3.0, 4.0], [0.0, 2.0]])
    cand = np.array([[3.0, 3.0], [0.0, 2.0]])
    assert snr_db(cand, ref) == pytest.approx(10 * np.log10(29 / 1))
    assert snr_db(ref, ref) > 250  # no error: the eps floor, a finite figure a JSON report can hold
    cos0 = (9 + 12) / (5 * np.sqrt(18))
    assert cosine_similarity(cand, ref) == pytest.approx((cos0 + 1) / 2)
    maps = RNG.normal(size=(3, 2, 4, 4))
    assert cosine_similarity(maps, maps) == pytest.approx(1.0)  # maps: each sample flattened
    assert set(KINDS["dense-map"].fidelity(maps * 0.9, maps)) == {"cosine_similarity", "normalised_mse", "snr_db"}


def test_objective_single_outputs():
    ref = RNG.normal(size=(40, 5))
    y = ref.argmax(1)
    obj = Objective.build(["out"], [["N", 5]], ref, y)
    assert obj.label_output == 0 and obj.uses_labels and obj.name(True) == "top-1 accuracy"
    worse = ref + RNG.normal(scale=2, size=ref.shape)
    assert obj.score(worse, ref, y) == pytest.approx(np.mean(worse.argmax(1) == y))
    seq = RNG.normal(size=(10, 7, 4))
    obj = Objective.build(["out"], [None], seq, None)
    assert obj.kinds == ("sequence-scores",) and not obj.uses_labels
    assert obj.score(seq, seq, None) == 1.0
    damage, agreement = obj.proxy(seq + RNG.normal(size=seq.shape), seq)
    assert damage > 0 and 0 < agreement < 1
    strings = np.array(["ab"] * 40)
    assert not class_labels(strings, None) and Objective.build(["out"], [None], ref, strings).label_output is None
    assert Objective.build(["out"], [None], ref, y + 5).label_output is None  # labels beyond the classes


def test_objective_multi_output_is_worst_normalised():
    logits = RNG.normal(size=(30, 4))
    emb = RNG.normal(size=(30, 6))
    y = logits.argmax(1)
    obj = Objective.build(["logits", "emb"], [None, None], [logits, emb], y)
    assert obj.kinds == ("class-scores", "class-scores")
    obj = Objective.build(["logits", "emb"], [None, None], [logits, emb], y, output_kind="emb=embedding")
    assert obj.kinds == ("class-scores", "embedding") and obj.label_output == 0
    bad_emb = emb + RNG.normal(scale=3, size=emb.shape)
    score = obj.score([logits, bad_emb], [logits, emb], y)
    assert score == pytest.approx(cosine_similarity(bad_emb, emb))  # accuracy 1.0 relative, emb is worse
    rows = obj.per_output([logits, bad_emb], [logits, emb], y)
    assert [r["kind"] for r in rows] == ["class-scores", "embedding"] and rows[0]["accuracy"] == 1.0
    assert rows[1]["snr_db"] < 10
    with pytest.raises(DataError, match="1 output arrays for a model with 2 outputs"):
        obj.score(logits, logits, y)


def _char_error(outputs, labels):
    return float(np.mean(np.asarray(outputs).argmax(-1) != labels))


def test_objective_metric_plugin_and_min_mode(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("hirelc_test_metric_mod")
    mod.err = _char_error
    monkeypatch.setitem(sys.modules, "hirelc_test_metric_mod", mod)
    ref = RNG.normal(size=(20, 3))
    y = ref.argmax(1)
    obj = Objective.build(["out"], [None], ref, y, metric="hirelc_test_metric_mod:err", metric_mode="min")
    worse = -ref
    assert obj.score(worse, ref, y) == -1.0 and obj.value(obj.score(worse, ref, y)) == 1.0
    assert obj.score(ref, ref, y) == 0.0 and "lower is better" in obj.name(True)
    with pytest.raises(UserError, match="metric mode must be one of max, min"):
        Objective.build(["out"], [None], ref, y, metric="hirelc_test_metric_mod:err", metric_mode="low")
    with pytest.raises(UserError, match="only matters with metric="):
        Objective.build(["out"], [None], ref, y, metric_mode="min")


def test_expected_score_moves_the_right_way():
    assert expected_score(0.9, 0.5) == pytest.approx(0.45)
    assert expected_score(-2.0, 0.5) == pytest.approx(-3.0)  # a loss grows as agreement falls


def test_the_ctc_plugin_is_an_objective_with_string_labels():
    """examples/ctc_metric.py through the Objective: string labels go to the metric, not to accuracy."""
    from examples.text_lines import ALPHABET

    a = ALPHABET.index("a") + 1
    ref = np.zeros((3, 4, len(ALPHABET) + 1))
    ref[:, [0, 2], a] = 3.0  # "a", blank, "a", blank at every line: decodes "aa"
    ref[:, [1, 3], 0] = 3.0
    obj = Objective.build(["scores"], [None], ref, np.array(["aa"] * 3), metric="examples.ctc_metric:char_accuracy")
    assert obj.kinds == ("sequence-scores",) and obj.label_output is None
    assert obj.score(ref, ref, np.array(["aa"] * 3)) == 1.0
    assert obj.score(ref, ref, np.array(["ab"] * 3)) == pytest.approx(0.5)  # one substitution in two characters


def test_evaluate_compares_a_sequence_model_per_position():
    """`evaluate` with digit labels and a reference: the labels are not per-position classes, so no
    accuracy (and no refusal for labels beyond the 5 classes); fidelity is per position."""
    from hirelc_onnx.evaluate.data import load_digits
    from hirelc_onnx.evaluate.runner import evaluate
    from tests.kind_models import sequence_model

    data = load_digits()
    got = evaluate(sequence_model(), data, reference=sequence_model())
    assert got["per_position_agreement"] == 1.0 and got["per_position_kl"] == 0.0 and "accuracy" not in got
