"""The reference models: trained for real, exported cleanly, cached safely, and accurate."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hirelc_onnx.bridge.convert import onnx2torch_imported
from examples import reference_models as rm
from hirelc_onnx.evaluate.data import load_digits, split_dataset

# Measured test accuracies (ORT, held-out split): resnet20 0.980, vgg 0.973, mobilenetv2 0.982,
# vit 0.971. The floors leave room for a different CPU's float rounding changing training a little.
MIN_TEST_ACCURACY = {"resnet20": 0.95, "vgg": 0.95, "mobilenetv2": 0.95, "vit": 0.92}


@pytest.fixture(scope="module")
def digits_test():
    return split_dataset(load_digits(), seed=0).test


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_names_are_the_public_tuple():
    assert rm.REFERENCE_MODELS == ("resnet20", "vgg", "mobilenetv2", "vit")
    assert set(MIN_TEST_ACCURACY) == set(rm.REFERENCE_MODELS)


@pytest.mark.parametrize("name", rm.REFERENCE_MODELS)
def test_model_is_valid_onnx_with_the_agreed_interface(reference_models, name):
    path = reference_models(name)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    # weights are initializers, never Constant nodes; nothing dead left behind
    assert "Constant" not in _ops(model)
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)


@pytest.mark.parametrize("name", rm.REFERENCE_MODELS)
def test_model_accuracy_measured_in_ort(reference_models, digits_test, name):
    path = reference_models(name)
    sess = _session(path)
    logits = sess.run(["logits"], {"input": digits_test.x})[0]
    assert logits.shape == (len(digits_test), 10)
    acc = float((logits.argmax(1) == digits_test.y).mean())
    info = rm.reference_model_info(path)
    assert acc == pytest.approx(info["test_accuracy"], abs=1e-9)
    assert acc >= MIN_TEST_ACCURACY[name], f"{name}: test accuracy {acc:.4f}"
    # the model was picked on val and trained on finetune only: sizes of the shared split
    assert info["split_sizes"] == {"calib": 180, "finetune": 898, "val": 270, "test": 449}
    assert info["params"] > 10_000 and info["ort_max_abs_diff"] <= 1e-4
    # dynamic batch: batch 1 and an odd batch give the same rows as the big batch
    one = sess.run(["logits"], {"input": digits_test.x[:1]})[0]
    seven = sess.run(["logits"], {"input": digits_test.x[3:10]})[0]
    np.testing.assert_allclose(one, logits[:1], atol=1e-5)
    np.testing.assert_allclose(seven, logits[3:10], atol=1e-5)


@pytest.mark.parametrize("name", rm.REFERENCE_MODELS)
def test_model_converts_back_with_onnx2torch(reference_models, digits_test, name):
    path = reference_models(name)
    model = onnx.load(str(path))
    with onnx2torch_imported() as onnx2torch:
        back = onnx2torch.convert(model).eval()
    with torch.no_grad():
        out = back(torch.from_numpy(digits_test.x[:64])).numpy()
    ref = _session(path).run(["logits"], {"input": digits_test.x[:64]})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_graphs_have_the_structures_the_compressor_must_handle(reference_models):
    res = onnx.load(str(reference_models("resnet20")))
    assert _ops(res)["Conv"] == 21 and _ops(res)["Add"] == 9  # 19 3x3 convs + 2 projections; 9 residuals
    assert "BatchNormalization" not in _ops(res)  # eval-mode export folds BN into Conv

    vgg = onnx.load(str(reference_models("vgg")))
    nodes = list(vgg.graph.node)
    flat = next(n for n in nodes if n.op_type == "Flatten")
    assert any(n.op_type == "Gemm" and n.input[0] == flat.output[0] for n in nodes)
    gemm_w = {t.name: t.dims for t in vgg.graph.initializer}
    first_gemm = next(n for n in nodes if n.op_type == "Gemm")
    assert list(gemm_w[first_gemm.input[1]]) == [256, 128 * 2 * 2]

    mnv2 = onnx.load(str(reference_models("mobilenetv2")))
    inits = {t.name: t for t in mnv2.graph.initializer}
    depthwise = [
        n for n in mnv2.graph.node
        if n.op_type == "Conv"
        and next((a.i for a in n.attribute if a.name == "group"), 1) == inits[n.input[1]].dims[0] > 1
    ]
    assert len(depthwise) == 7 and _ops(mnv2)["Add"] == 3

    vit = onnx.load(str(reference_models("vit")))
    inits = {t.name for t in vit.graph.initializer}
    const_matmuls = [n for n in vit.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(const_matmuls) == 2 * 6  # q, k, v, out, fc1, fc2 per layer
    assert _ops(vit)["LayerNormalization"] == 5 and _ops(vit)["Erf"] == 2 and _ops(vit)["Softmax"] == 2


def test_cache_hit_returns_the_same_file_without_rebuilding(reference_models, monkeypatch):
    path = reference_models("vgg")
    before = path.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("cache miss: the model was rebuilt")

    monkeypatch.setattr(rm, "_build_digits_model", no_build)
    assert rm.build_reference_model("vgg") == path
    assert rm.build_reference_model("vgg", cache_dir=path.parent.parent) == path
    assert path.stat().st_mtime_ns == before


def test_concurrent_builders_build_once_and_write_atomically(tmp_path, monkeypatch, reference_models):
    real = onnx.load(str(reference_models("vgg")))
    calls = []

    def slow_build(name, recipe):
        calls.append(name)
        time.sleep(0.5)  # long enough that the second caller arrives while the first builds
        return real, {"name": name, "test_accuracy": 0.5, "params": 1}

    monkeypatch.setattr(rm, "_build_digits_model", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(rm.build_reference_model("vgg", tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["vgg"] and len(set(results)) == 1
    path = results[0]
    assert path.parent == tmp_path / "models" and path.suffix == ".onnx"
    assert json.loads(path.with_suffix(".json").read_text())["test_accuracy"] == 0.5
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_small_builds_are_the_full_recipes_for_fewer_epochs_cached_apart(monkeypatch, tmp_path):
    """The suite's MobileNetV2 (tests/conftest.py) is `build_reference_model(name, small=True)`: the
    benchmark's recipe for SMALL_EPOCHS epochs under its own cache name; names without a small build
    get the full one either way."""
    builds = []
    monkeypatch.setattr(rm, "_cached_build", lambda stem, cache_dir, build: builds.append((stem, build())) or tmp_path)
    monkeypatch.setattr(rm, "_build_digits_model", lambda name, recipe: recipe)
    assert set(rm.SMALL_EPOCHS) == {"mobilenetv2"}
    for name in rm.REFERENCE_MODELS:
        rm.build_reference_model(name, small=True)
        rm.build_reference_model(name)
    stems = dict(builds)
    full = rm._RECIPES["mobilenetv2"]
    assert stems[f"mobilenetv2-small-v{full.version}"] == replace(full, epochs=rm.SMALL_EPOCHS["mobilenetv2"])
    assert stems[f"mobilenetv2-v{full.version}"] == full and rm.SMALL_EPOCHS["mobilenetv2"] < full.epochs
    # resnet20, vgg, vit: the full build when asked small
    assert [stem for stem, _ in builds] == [f"{n}-{kind}v{rm._RECIPES[n].version}" for n in rm.REFERENCE_MODELS
                                            for kind in (("small-", "") if n == "mobilenetv2" else ("", ""))]


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown reference model"):
        rm.build_reference_model("resnet1000", tmp_path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HIRELC_CACHE", str(tmp_path))
    assert rm.default_cache_dir() == tmp_path
    monkeypatch.delenv("HIRELC_CACHE")
    assert rm.default_cache_dir().name == ".cache"


def test_effnet_crops_are_deterministic_and_preprocessed():
    a = rm.effnet_crops(3, size=64, seed=0)
    assert a.shape == (3, 3, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, rm.effnet_crops(3, size=64, seed=0))
    assert not np.array_equal(a, rm.effnet_crops(3, size=64, seed=1))
    assert a.min() >= -127 / 128 - 1e-6 and a.max() <= 128 / 128 + 1e-6  # (x - 127) / 128 of 0..255
    assert a.std() > 0.1  # real photo content, not a constant


@pytest.mark.slow
def test_efficientnet_lite0_recognises_the_bundled_photos(reference_models):
    path = reference_models("efficientnet_lite0")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "input" and dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert set(_ops(model)) == {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    sess = _session(path)

    def top(x: np.ndarray, k: int = 1) -> np.ndarray:
        return np.argsort(sess.run(["logits"], {"input": x})[0], axis=1)[:, ::-1][:, :k]

    center = np.stack([rm.effnet_center_crop(p) for p in ("chelsea", "coffee", "rocket")])
    cat, coffee, rocket = top(center, 3)
    # ImageNet: 281-285 domestic cats (measured: 285 Egyptian cat), 967 espresso, 657 missile,
    # 744 projectile.
    assert 281 <= cat[0] <= 285
    assert coffee[0] == 967
    assert rocket[0] in (657, 744) and {657, 744} <= set(rocket)
    # random crops: every chelsea crop is a cat, every coffee crop an espresso
    crops = rm.effnet_crops(2 * len(rm.EFFNET_PHOTOS), seed=0)
    labels = top(crops)[:, 0]
    photos = [rm.EFFNET_PHOTOS[i % len(rm.EFFNET_PHOTOS)] for i in range(len(crops))]
    assert all(281 <= c <= 285 for c, p in zip(labels, photos) if p == "chelsea")
    assert all(c == 967 for c, p in zip(labels, photos) if p == "coffee")
    assert rm.reference_model_info(path)["center_crop_top1"]["chelsea"] == int(cat[0])
