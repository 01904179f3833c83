"""The MiniLM and CTC recognizer references: real models, exported faithfully, accurate."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from examples import reference_models as rm

# Measured: the recognizer's held-out character accuracy (ORT, 1000 lines of seed 1) was 0.99, the suite's
# small build's (SMALL_RECIPE) 0.968.
MIN_CHAR_ACCURACY = 0.95


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_minilm_onnx_agrees_with_torch_and_has_the_agreed_interface(reference_models, tmp_path):
    from examples import minilm

    path = reference_models("minilm_l6")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    for inp in model.graph.input:
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param for d in inp.type.tensor_type.shape.dim)  # dynamic batch and sequence
    (out,) = model.graph.output
    assert out.name == "embedding" and out.type.tensor_type.shape.dim[1].dim_value == 384
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and inits.get(n.input[0]) == (30522, 384)]
    assert len(gathers) == 1  # the word-embedding table is a Gather on a constant
    assert "Constant" not in Counter(n.op_type for n in model.graph.node)

    sentences = ["The cat sat on the mat.", "Compute the mean of an array along an axis.",
                 "A kitten rested on the rug.", "Return the inverse of a matrix."]
    npz = minilm.write_sentences_npz(tmp_path / "s.npz", sentences)
    with np.load(npz, allow_pickle=False) as data:
        feeds = {n: data[n] for n in data.files}
    assert set(feeds) == {"input_ids", "attention_mask"}
    assert feeds["input_ids"].shape == (4, minilm.SEQ_LEN) and feeds["input_ids"].dtype == np.int64
    got = _session(path).run(["embedding"], feeds)[0]
    _, bert = minilm.load_minilm()
    with torch.no_grad():
        ref = minilm.SentenceEmbedder(bert)(*(torch.from_numpy(feeds[n]) for n in minilm.MINILM_INPUTS)).numpy()
    cos = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in the graph
    # a real sentence encoder: the paraphrase pairs are each other's nearest neighbours
    sim = got @ got.T
    np.fill_diagonal(sim, -1)
    assert sim.argmax(axis=1).tolist() == [2, 3, 0, 1]
    # padding does not change the embedding (the mask is honoured)
    longer = minilm.tokenize(sentences, max_length=48)
    np.testing.assert_allclose(_session(path).run(["embedding"], longer)[0], got, atol=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("text_recognizer")  # one worker builds it in a fresh clone while the other runs on
def test_text_recognizer_reads_held_out_lines(reference_models):
    from examples.ctc_metric import char_accuracy
    from examples.text_lines import render_lines
    from examples.text_recognizer import TEST_SEED

    # the tests' build: the benchmark's network, seeds and training loop on less data (the full build's
    # wiring: test_full_and_small_recognizers_are_one_recipe)
    path = reference_models("text_recognizer_small")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Conv"] == 4 and ops["Softmax"] == 1 and not {"LSTM", "GRU", "RNN", "Constant"} & set(ops)
    x, y = render_lines(300, seed=TEST_SEED)  # the first 300 of the held-out lines the build scored
    scores = _session(path).run(["logits"], {"input": x})[0]
    assert scores.shape == (300, 40, 37)
    acc = char_accuracy(scores, y)
    assert acc >= MIN_CHAR_ACCURACY, f"held-out character accuracy {acc:.4f}"
    info = rm.reference_model_info(path)
    assert info["test_char_accuracy"] >= MIN_CHAR_ACCURACY and info["ort_max_abs_diff"] <= 1e-3
    # fresh lines of a seed the build never rendered read as well
    x2, y2 = render_lines(200, seed=12345)
    assert char_accuracy(_session(path).run(["logits"], {"input": x2})[0], y2) >= MIN_CHAR_ACCURACY - 0.02


def test_full_and_small_recognizers_are_one_recipe(monkeypatch, tmp_path):
    """`text_recognizer()` trains the full recipe into its own cache entry, `small=True` the same
    builder on SMALL_RECIPE into another: the small build tested above is the full one, less trained."""
    import examples.text_recognizer as rec

    builds = []
    monkeypatch.setattr(rec, "_cached_build", lambda stem, cache_dir, build: builds.append((stem, build)) or tmp_path)
    monkeypatch.setattr(rec, "_build_recognizer", lambda train_lines=rec.TRAIN_LINES, epochs=rec.EPOCHS:
                        (train_lines, epochs))
    assert rec.text_recognizer() == rec.text_recognizer(small=True) == tmp_path
    (full, full_build), (small, small_build) = builds
    assert full == f"text_recognizer-v{rec.RECOGNIZER_VERSION}" and small == f"text_recognizer-small-v{rec.RECOGNIZER_VERSION}"
    assert full_build() == (8000, 6)  # the benchmark's: 8000 lines, 6 epochs
    assert small_build() == (rec.SMALL_RECIPE["train_lines"], rec.SMALL_RECIPE["epochs"])
    assert rec.SMALL_RECIPE["train_lines"] < rec.TRAIN_LINES
    assert rm.reference_model_path("text_recognizer") == tmp_path and builds[-1][0] == full


def test_every_reference_name_has_a_builder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(rm, "efficientnet_lite0", lambda cache_dir=None: calls.append("effnet") or tmp_path)
    monkeypatch.setattr(rm, "build_reference_model", lambda name, cache_dir=None: calls.append(name) or tmp_path)
    import examples.minilm as minilm
    import examples.text_recognizer as rec

    monkeypatch.setattr(minilm, "minilm_l6", lambda cache_dir=None: calls.append("minilm") or tmp_path)
    monkeypatch.setattr(rec, "text_recognizer", lambda cache_dir=None: calls.append("rec") or tmp_path)
    for name in (*rm.REFERENCE_MODELS, *rm.OTHER_REFERENCE_MODELS):
        assert rm.reference_model_path(name) == tmp_path
    assert calls == [*rm.REFERENCE_MODELS, "effnet", "minilm", "rec"]
