"""`compress` on data of any model: one array per graph input (token ids and masks stay integers),
labels that are not class indices, evaluate's image options, and data-free runs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from hirelc_onnx.cli import main
from hirelc_onnx.compress import compress
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import split_dataset
from hirelc_onnx.evaluate.loaders import load_data
from hirelc_onnx.evaluate.synthetic import DEFAULT_DIM, synthesize
from hirelc_onnx.search import hirelc
from hirelc_onnx.search.hirelc import QUICK_SETTINGS
from tests.light import light_path
from tests.quick_cli import with_quick_settings

VOCAB, SEQ, FEATS, HIDDEN, CLASSES = 20, 4, 8, 64, 5


def _two_input_model(seq: int | str = SEQ) -> onnx.ModelProto:
    """feats (N, 8) float + masked mean of Gather(table, ids) -> MatMul -> Relu -> MatMul -> (N, 5)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, FEATS)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((FEATS, HIDDEN)).astype(np.float32) / 3, "w1"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32) / 8, "w2"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
             helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Add", ["pooled", "feats"], ["h0"]),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["logits"], name="fc2")]
    graph = helper.make_graph(
        nodes, "two_input",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["N", FEATS]),
         helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture()
def two_input(tmp_path):
    path = tmp_path / "two_input.onnx"
    onnx.save(_two_input_model(), path)
    return path


def _arrays(n: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, SEQ), np.int64)
    mask[:, -1] = rng.integers(0, 2, n)
    return {"feats": rng.standard_normal((n, FEATS)).astype(np.float32),
            "input_ids": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64), "attention_mask": mask}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "250"})


def test_two_input_npz_with_string_labels_through_uniform(two_input, tmp_path):
    """Arrays named after the inputs, labels that are strings: compress scores fidelity to fp32 and
    says so; the integer inputs reach ORT as integers; n < 200 is flagged."""
    npz = tmp_path / "d.npz"
    np.savez(npz, y=np.array([f"s{i % 3}" for i in range(120)]), **_arrays())
    res = _run("compress", two_input, "--method", "uniform", "--bits", "4", "--data", npz, "--finetune-epochs", "1",
               "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output + res.stderr
    assert "n=30" in res.output and "one sample is worth 3.33 points" in res.output
    assert "fidelity to the fp32 model" in res.output  # string labels: not task accuracy
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    acc, data = report["accuracy"], report["data"]
    assert acc["metric"] == "top-1 agreement with fp32" and acc["n"] == 30 and not acc["task_accuracy_measured"]
    assert 0.0 <= acc["compressed"] <= 1.0 and acc["fp32"] == 1.0
    assert data["inputs"]["input_ids"]["dtype"] == "int64" and data["labels"].startswith("<U")
    # the score is the emitted model's, fed the test split's arrays as they are (ids int64)
    test = split_dataset(load_data(str(npz)), 0).test
    sess = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"))
    ref = ort.InferenceSession(str(two_input))
    agree = np.mean(sess.run(None, test.inputs)[0].argmax(1) == ref.run(None, test.inputs)[0].argmax(1))
    assert acc["compressed"] == pytest.approx(agree)
    assert all("error" not in row for row in report["latency"].values())


def test_two_input_hirelc_fine_tunes_through_the_bridge(two_input, tmp_path):
    """Class labels and fine-tuning: the bridge takes the int64 ids and mask as they are."""
    arrays = _arrays(160)
    ref = ort.InferenceSession(str(two_input)).run(None, arrays)[0].argmax(1)
    npz = tmp_path / "d.npz"
    np.savez(npz, y=ref, **arrays)
    result = compress(two_input, method="hirelc", data=str(npz), budget="2x", evaluations=2, finetune_epochs=1,
                      settings=QUICK_SETTINGS, latency_runs=2)
    acc = result.report["accuracy"]
    assert acc["metric"] == "top-1 accuracy" and acc["task_accuracy_measured"]
    assert acc["finetune_warning"] is None  # fine-tuning ran: the bridge took the integer inputs
    assert result.ratio >= 2.0 and acc["n"] == 40 and acc["sample_warning"]


def test_data_free_two_input_run(two_input, tmp_path, monkeypatch):
    """No --data: ids below the table's rows, masks all ones, fidelity to fp32, no fine-tuning, said plainly."""
    monkeypatch.setattr(hirelc, "run_hirelc", with_quick_settings(hirelc.run_hirelc))  # small agents, same path
    ds, plans = synthesize(onnx.load(two_input), seed=3)
    assert ds.inputs["input_ids"].dtype == np.int64 and ds.inputs["input_ids"].max() < VOCAB
    assert ds.inputs["input_ids"].max() > VOCAB // 2  # drawn across the table, not zeros
    assert (ds.inputs["attention_mask"] == 1).all() and ds.y is None and 200 <= len(ds) <= 500
    assert [p.values.split()[0] for p in plans] == ["standard", "token", "ones"]
    res = _run("compress", two_input, "--budget", "2x", "--evaluations", "1", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output + res.stderr
    assert "task accuracy was NOT measured" in res.output and "--data gives better results" in res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["data"]["data_free"] and report["accuracy"]["metric"].endswith("on synthesised inputs")
    assert report["accuracy"]["finetune_budget"] == {"epochs": 0}
    assert report["size"]["ratio"] >= 2.0
    ort.InferenceSession(str(tmp_path / "o" / "model.onnx"))


def test_data_free_symbolic_dims_from_input_shape(tmp_path):
    path = tmp_path / "seq.onnx"
    onnx.save(_two_input_model(seq="seq"), path)
    ds, _ = synthesize(onnx.load(path))
    assert ds.inputs["input_ids"].shape[1:] == (DEFAULT_DIM,)
    result = compress(path, method="uniform", bits=8, input_shape={"input_ids": (1, 7), "attention_mask": (1, 7)},
                      latency_runs=2)
    assert result.report["data"]["preprocessing"]["inputs"]["input_ids"]["shape"] == [7]
    assert set(result.report["latency"]) == {"batch1", "batch32"}
    assert all("error" not in row for row in result.report["latency"].values())
    with pytest.raises(UserError, match="no input of"):
        compress(path, method="uniform", input_shape={"ids": (1, 7)})


def test_latency_takes_symbolic_dims_from_the_data(tmp_path):
    path = tmp_path / "seq.onnx"
    onnx.save(_two_input_model(seq="seq"), path)
    npz = tmp_path / "d.npz"
    np.savez(npz, **_arrays(40))
    result = compress(path, method="uniform", bits=8, data=str(npz), finetune_epochs=0, latency_runs=2)
    assert all("fp32_ms" in row for row in result.report["latency"].values())


def _bad_npz(tmp_path, kind: str):
    arrays = _arrays(20)
    if kind == "missing":
        del arrays["attention_mask"]
        match = ("no array 'attention_mask'", "input_ids")
    elif kind == "dtype":
        arrays["input_ids"] = arrays["input_ids"].astype(np.float32)
        match = ("input 'input_ids' is float32", "int64")
    elif kind == "shape":
        arrays["input_ids"] = arrays["input_ids"][:, :3]
        match = ("input 'input_ids' expects shape (N, 4)", "got (N, 3)")
    else:
        arrays["feats"] = arrays["feats"][:19]
        match = ("differ in length", "feats 19", "input_ids 20")
    np.savez(tmp_path / "bad.npz", **arrays)
    return tmp_path / "bad.npz", match


@pytest.mark.parametrize("kind", ["missing", "dtype", "shape", "lengths"])
def test_bad_npz_is_one_error_line(two_input, tmp_path, kind):
    npz, match = _bad_npz(tmp_path, kind)
    # an output folder of its own: the default, two_input.hirelc in the working directory, is the same
    # for every case, and one on the other test worker held its lock ("is in use by another ... compress")
    res = _run("compress", two_input, "--method", "uniform", "--data", npz, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(m in lines[0] for m in match), lines[0]


def _conv_model(path):
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("MatMul", ["f", "fc"], ["logits"], name="head")],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_image_options_act_in_compress_as_in_evaluate(tmp_path):
    """compress reads an image folder with evaluate's options: the report's fp32 test score is what
    `evaluate --split test` measures with the same options, and the report records them."""
    rng = np.random.default_rng(2)
    for i in range(24):
        folder = tmp_path / "imgs" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    _conv_model(tmp_path / "m.onnx")
    opts = ["--scale", "0.0078125", "--offset", "-0.9921875", "--resize", "9", "--center-crop", "8",
            "--channel-order", "bgr", "--mean", "0.1,0.2,0.3", "--std", "0.5,0.6,0.7"]
    res = _run("compress", tmp_path / "m.onnx", "--method", "uniform", "--bits", "8", "--data", tmp_path / "imgs",
               "--finetune-epochs", "0", "--out", tmp_path / "o", *opts)
    assert res.exit_code == 0, res.output + res.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    pre = report["data"]["preprocessing"]
    assert pre["scale"] == 0.0078125 and pre["channel_order"] == "bgr" and pre["center_crop"] == 8
    for model, key in ((tmp_path / "m.onnx", "fp32"), (tmp_path / "o" / "model.onnx", "compressed")):
        ev = _run("evaluate", model, "--data", tmp_path / "imgs", "--split", "test", "--json", *opts)
        assert ev.exit_code == 0, ev.stderr
        assert json.loads(ev.stdout)["accuracy"] == pytest.approx(report["accuracy"][key])
    # the options reach the data: other options, other inputs
    plain = load_data(str(tmp_path / "imgs"), (None, 3, 8, 8))
    tuned = load_data(str(tmp_path / "imgs"), (None, 3, 8, 8), scale=0.0078125, offset=-0.9921875)
    assert not np.allclose(plain.x, tuned.x)
    with pytest.raises(UserError, match="give data="):
        compress(tmp_path / "m.onnx", method="uniform", scale=0.5)


def test_data_free_on_a_light_zoo_model():
    """A model nobody here wrote, no data: inputs from its graph, a model ORT loads, a plain note."""
    result = compress(light_path("squeezenet"), method="uniform", bits=8, latency_runs=1)
    acc = result.report["accuracy"]
    assert acc["data_free_note"] and acc["metric"].endswith("on synthesised inputs")
    assert acc["n"] == 27 and acc["sample_warning"]  # 111 ImageNet-size samples: fewer for a large input
    assert 0.0 <= acc["compressed"] <= 1.0 and acc["fp32"] == 1.0
    assert result.report["latency"] and all("fp32_ms" in row for row in result.report["latency"].values())
    assert result.report["per_node"]["input"] == "synthesised inputs"  # fixed batch 1: one synthesised row
    ort.InferenceSession(result.model.SerializeToString())


def test_kernel_macs_take_symbolic_dims_from_the_data(tmp_path):
    """A MatMul over a symbolic sequence: the per-kernel table counts MACs at the data's length
    (or --input-shape's without data); the emitted model keeps the symbolic dim."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         helper.make_node("ReduceMean", ["h"], ["logits"], axes=[1], keepdims=0)],
        "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "seq", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "seq.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((40, 5, 8)).astype(np.float32))
    with_data = compress(path, method="uniform", data=str(tmp_path / "d.npz"), finetune_epochs=0, latency_runs=1)
    assert with_data.report["kernels"][0]["macs"] == 5 * 8 * 16
    free = compress(path, method="uniform", input_shape={"x": (1, 7, 8)}, latency_runs=1)
    assert free.report["kernels"][0]["macs"] == 7 * 8 * 16
    dims = free.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param == "seq"


def test_two_input_graph_rl_proxy_and_importance_take_integer_inputs(two_input, tmp_path):
    """graph-rl's torch proxy, group-Fisher channel ranking and final selection on int64 ids and mask."""
    from hirelc_onnx.search.graph_rl import GraphRLSettings

    arrays = _arrays(160)
    np.savez(tmp_path / "d.npz", y=ort.InferenceSession(str(two_input)).run(None, arrays)[0].argmax(1), **arrays)
    result = compress(two_input, method="graph-rl", data=str(tmp_path / "d.npz"), flops=0.7, evaluations=1,
                      finetune_epochs=1, settings=GraphRLSettings(episodes=4, batch=2, hidden=8, heads=1,
                                                                  fisher_samples=8), latency_runs=1)
    assert result.report["search"]["channel_importance"] == "l1+group-fisher"  # the torch path, not the fallback
    assert result.report["accuracy"]["finetune_warning"] is None
    assert result.report["size"]["macs_fraction"] <= 0.7 + 1e-9


def test_data_free_refuses_an_input_too_large_to_synthesise(tmp_path):
    path = tmp_path / "big.onnx"
    _conv_model(path)
    model = onnx.load(path)
    for d in list(model.graph.input[0].type.tensor_type.shape.dim)[2:]:
        d.dim_value = 20000
    onnx.save(model, path)
    with pytest.raises(UserError, match="cannot synthesise input 'x'.*3x20000x20000"):
        compress(path, method="uniform")
