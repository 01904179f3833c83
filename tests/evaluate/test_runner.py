"""ORT runner: accuracy equals a hand-written session loop, sessions are cached, latency and size are real."""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hirelc_onnx.errors import DataError, ModelLoadError, UserError
from hirelc_onnx.evaluate.data import Dataset, load_digits
import hirelc_onnx.evaluate.runner as runner_module
from hirelc_onnx.evaluate.runner import (
    TASK_CPUS_ENV,
    TIMING_BUDGET_ENV,
    SessionConfig,
    benchmark_latency,
    benchmark_side_by_side,
    evaluate,
    get_runner,
    load_onnx,
    measure_peak_memory,
    model_file_size,
    predict,
    ratio_stats,
    timing_config,
)


def gemm_classifier(w: np.ndarray, b: np.ndarray, batch: int | str = "N", name: str = "digits_lr") -> onnx.ModelProto:
    """(batch, 1, 8, 8) -> Flatten -> Gemm(W (64, C), b) -> (batch, C) logits."""
    c = w.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@functools.cache
def fitted_digits_lr() -> tuple[np.ndarray, np.ndarray]:
    """(W (64, 10), b) of a logistic regression on flattened digits; fitted once per process."""
    from sklearn.linear_model import LogisticRegression

    ds = load_digits()
    clf = LogisticRegression(max_iter=300).fit(ds.x.reshape(len(ds), -1), ds.y)
    return clf.coef_.T.copy(), clf.intercept_.copy()


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_digits()


@pytest.fixture(scope="session")
def lr_weights() -> tuple[np.ndarray, np.ndarray]:
    return fitted_digits_lr()


@pytest.fixture()
def model_path(tmp_path, lr_weights):
    path = tmp_path / "lr.onnx"
    onnx.save(gemm_classifier(*lr_weights), path)
    return path


@pytest.fixture()
def perturbed_path(tmp_path, lr_weights):
    w, b = lr_weights
    noisy = w + np.random.default_rng(1).normal(0, 1.5 * w.std(), w.shape)
    path = tmp_path / "lr_noisy.onnx"
    onnx.save(gemm_classifier(noisy, b), path)
    return path


def _plain_ort_accuracy(path, ds: Dataset) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(len(ds)):
        logits = sess.run(None, {"x": ds.x[i : i + 1]})[0]
        correct += int(logits.argmax(axis=1)[0] == ds.y[i])
    return correct / len(ds)


def test_accuracy_equals_plain_session_loop(model_path, digits):
    got = evaluate(model_path, digits, batch_size=100)
    assert got["n"] == 1797
    assert got["accuracy"] == _plain_ort_accuracy(model_path, digits)
    assert got["accuracy"] > 0.95  # the fitted classifier is real, so the number means something


def test_predict_independent_of_batch_size_and_model_form(model_path, digits):
    a = predict(model_path, digits.x, batch_size=7)
    b = predict(onnx.load(model_path), digits.x, batch_size=500)
    assert a.shape == (1797, 10)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fixed_batch_model_is_padded(tmp_path, lr_weights, digits):
    fixed = tmp_path / "fixed.onnx"
    onnx.save(gemm_classifier(*lr_weights, batch=4), fixed)
    x = digits.x[:10]  # 10 is not a multiple of 4: the last batch is padded and trimmed
    np.testing.assert_allclose(predict(fixed, x, batch_size=64), predict(onnx.load(fixed), x, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="fixed batch size of 4"):
        benchmark_latency(fixed, batch_size=1, runs=1)


def test_fidelity_vs_self_is_perfect_and_vs_perturbed_degrades(model_path, perturbed_path, digits):
    same = evaluate(model_path, digits, reference=model_path)
    assert same["top1_agreement"] == 1.0 and same["top5_containment"] == 1.0
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    assert same["logit_mse"] == 0.0
    assert same["cosine_similarity"] == pytest.approx(1.0, abs=1e-9)
    assert same["reference_accuracy"] == same["accuracy"]

    worse = evaluate(perturbed_path, digits, reference=model_path)
    assert worse["top1_agreement"] < 0.95
    assert worse["kl_divergence"] > 0.05
    assert worse["logit_mse"] > 0.1
    assert worse["cosine_similarity"] < 0.99
    assert worse["accuracy"] < same["accuracy"]

    cached_ref = predict(model_path, digits.x)
    assert evaluate(perturbed_path, digits, reference=cached_ref)["kl_divergence"] == pytest.approx(worse["kl_divergence"])


def test_labels_out_of_range_and_shape_mismatch(model_path, digits):
    bad = Dataset(digits.x[:5], np.array([0, 1, 2, 3, 12]), "bad")
    with pytest.raises(DataError, match=r"labels in \[0, 12\] but the model has 10 outputs"):
        evaluate(model_path, bad)
    flat = Dataset(digits.x.reshape(len(digits), 64), digits.y, "flat")
    with pytest.raises(DataError, match=r"expected input shape \(N, 1, 8, 8\), got \(N, 64\)"):
        evaluate(model_path, flat)


def test_float64_input_is_narrowed(model_path, digits):
    ds64 = Dataset(digits.x[:50].astype(np.float64), digits.y[:50], "f64")
    assert evaluate(model_path, ds64)["accuracy"] == evaluate(model_path, Dataset(digits.x[:50], digits.y[:50]))["accuracy"]


def test_plugin_metric(tmp_path, monkeypatch, model_path, digits):
    (tmp_path / "mymetric.py").write_text(
        "import numpy as np\n"
        "def error_rate(logits, labels):\n"
        "    return float(np.mean(logits.argmax(1) != labels))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    got = evaluate(model_path, digits, metrics=["mymetric:error_rate"])
    assert got["mymetric:error_rate"] == pytest.approx(1 - got["accuracy"])


def test_session_cache_follows_file_and_settings(model_path, perturbed_path):
    r1 = get_runner(model_path)
    assert get_runner(str(model_path)) is r1
    assert get_runner(model_path, SessionConfig(intra_op_threads=1)) is not r1
    model_path.write_bytes(perturbed_path.read_bytes())  # same size: the mtime must tell them apart
    st = os.stat(model_path)
    os.utime(model_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert get_runner(model_path) is not r1
    proto = onnx.load(model_path)
    assert get_runner(proto) is get_runner(onnx.load(model_path))
    changed = onnx.ModelProto()  # one weight a step apart: the key is the bytes the session reads
    changed.CopyFrom(proto)
    w = next(t for t in changed.graph.initializer if t.raw_data)
    w.raw_data = bytes([w.raw_data[0] ^ 1]) + w.raw_data[1:]
    assert get_runner(changed) is not get_runner(proto)
    assert get_runner(changed) is get_runner(changed)


def test_session_uses_requested_settings(model_path):
    with pytest.raises(UserError, match="graph optimization level"):
        get_runner(model_path, SessionConfig(graph_optimization_level="max"))
    with pytest.raises(UserError, match="NoSuchExecutionProvider"):
        get_runner(model_path, SessionConfig(providers=("NoSuchExecutionProvider",)))
    assert get_runner(model_path).session.get_providers() == ["CPUExecutionProvider"]


def test_benchmark_latency_reports_real_timings(model_path, perturbed_path):
    st = benchmark_latency(model_path, batch_size=8, warmup=1, runs=5)
    assert st["runs"] >= 5 and st["batch_size"] == 8 and st["rounds"] >= runner_module.MIN_ROUNDS
    assert 0 < st["median_ms"] <= st["p90_ms"]
    assert st["throughput_per_s"] == pytest.approx(8e3 / st["median_ms"])
    assert "speedup" not in st  # one model: nothing to compare with
    pair = benchmark_side_by_side([model_path, perturbed_path], batch_size=2, warmup=0, runs=3)
    assert pair[0]["runs"] == pair[1]["runs"] >= 3 and pair[0]["rounds"] == pair[1]["rounds"]
    assert "speedup" not in pair[0]
    q1, q3 = pair[1]["speedup_iqr"]
    assert 0 < q1 <= pair[1]["speedup"] <= q3


def _spy_on_runs(monkeypatch, paths, config) -> list[int]:
    """The index of the model each session.run call went to, in order."""
    calls: list[int] = []
    for i, path in enumerate(paths):
        runner = get_runner(path, config)

        class Spy:
            def __init__(self, real, i):
                self.real, self.i = real, i

            def run(self, *args, **kwargs):
                calls.append(self.i)
                return self.real.run(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(self.real, name)

        monkeypatch.setattr(runner, "session", Spy(runner.session, i))
    return calls


def test_side_by_side_alternates_rounds_with_one_setting(model_path, perturbed_path, monkeypatch):
    """Rounds run A B B A, each slot one untimed run then SLOT_RUNS timed ones; both sessions get the
    same settings: threads fixed to the CPUs given, spinning stopped after each run."""
    monkeypatch.delenv(TASK_CPUS_ENV, raising=False)
    config = timing_config()
    assert config == timing_config(SessionConfig())
    assert config.intra_op_threads == len(os.sched_getaffinity(0)) and config.stop_spinning_after_run
    calls = _spy_on_runs(monkeypatch, (model_path, perturbed_path), config)
    pair = benchmark_side_by_side([model_path, perturbed_path], batch_size=2, warmup=2, runs=1, budget_s=0)
    slot = 1 + runner_module.SLOT_RUNS
    rounds = runner_module.MIN_ROUNDS
    assert pair[1]["rounds"] == rounds and pair[0]["runs"] == pair[1]["runs"] == rounds * 2 * runner_module.SLOT_RUNS
    assert calls == [0, 0, 1, 1] + ([0] * slot + [1] * slot * 2 + [0] * slot) * rounds
    for path in (model_path, perturbed_path):
        options = get_runner(path, config).session.get_session_options()
        assert options.intra_op_num_threads == config.intra_op_threads
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    monkeypatch.setenv(TASK_CPUS_ENV, "3")  # a scaled-out search's worker: its task's CPUs
    assert timing_config().intra_op_threads == 3 and timing_config(SessionConfig(intra_op_threads=1)).intra_op_threads == 1


def _matmul_chain(layers: int, seed: int = 0) -> onnx.ModelProto:
    """x (N, 256) through `layers` MatMuls by 256x256 weights: work proportional to `layers`."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, f"chain{layers}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 256])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_side_by_side_sees_double_work_and_keeps_its_budget():
    """A model doing twice the work measures clearly slower than the first (its whole spread below
    1), and the timing lasts at least the budget it was given."""
    single, double = _matmul_chain(6), _matmul_chain(12)
    start = time.perf_counter()
    first, second = benchmark_side_by_side([single, double], batch_size=32, warmup=2, runs=1, budget_s=0.5)
    assert time.perf_counter() - start >= 0.5
    assert second["rounds"] >= runner_module.MIN_ROUNDS
    assert second["speedup"] < 0.9 and second["speedup_iqr"][0] <= second["speedup"] <= second["speedup_iqr"][1]
    assert second["median_ms"] > first["median_ms"]


def test_timing_budget_and_ratio_figures():
    stats = ratio_stats([0.5, 2.0, 1.25, 0.8])
    back = ratio_stats([1 / r for r in (0.5, 2.0, 1.25, 0.8)])  # reciprocal ratios: reciprocal figures
    assert stats["speedup"] == pytest.approx(1.0) and back["speedup"] == pytest.approx(1 / stats["speedup"])
    assert back["speedup_iqr"] == pytest.approx([1 / stats["speedup_iqr"][1], 1 / stats["speedup_iqr"][0]])
    assert ratio_stats([0.9, 1.1, 1.0])["speedup"] == pytest.approx(1.0)


def test_timing_budget_from_the_environment(model_path, monkeypatch):
    monkeypatch.setenv(TIMING_BUDGET_ENV, "2.5")
    assert runner_module.timing_budget_s() == 2.5
    monkeypatch.delenv(TIMING_BUDGET_ENV)
    assert runner_module.timing_budget_s() == runner_module.DEFAULT_BUDGET_S
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(TIMING_BUDGET_ENV, bad)
        with pytest.raises(UserError, match=TIMING_BUDGET_ENV):
            benchmark_latency(model_path, runs=1)
    with pytest.raises(UserError, match="timing budget"):
        benchmark_latency(model_path, runs=1, budget_s=-0.5)


def test_benchmark_symbolic_dims_need_a_shape(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "seq", 4])],
    )
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(DataError, match="symbolic dim 'seq' at axis 1"):
        benchmark_latency(path, runs=1)
    assert benchmark_latency(path, runs=1, input_shapes={"x": (2, 5, 4)})["runs"] >= 1


def test_multi_input_model_takes_one_array_per_input(tmp_path, digits):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Flatten", ["s"], ["y"], axis=1)],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, 8, 8]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(DataError, match="has no array 'a'"):
        evaluate(path, digits)  # one array named x cannot feed inputs a and b
    a, b = digits.x[:10], digits.x[10:20]
    out = evaluate(path, Dataset({"b": b, "a": a}, np.arange(10) % 64, "ab"))
    expected = (a + b).reshape(10, -1).argmax(1)
    assert out["n"] == 10 and out["accuracy"] == float(np.mean(expected == np.arange(10) % 64))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "model file not found"),
        (b"", "model file is empty"),
        (b"this is not a protobuf at all \xff\xfe", "not a valid ONNX model|not an ONNX model"),
        ("truncate", "not a valid ONNX model|not an ONNX model|cannot load"),
    ],
)
def test_bad_model_files(tmp_path, model_path, content, message):
    bad = tmp_path / "bad.onnx"
    if content == "truncate":
        data = model_path.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif content is not None:
        bad.write_bytes(content)
    for load in (load_onnx, get_runner):
        with pytest.raises(ModelLoadError, match=message) as info:
            load(bad)
        assert "\n" not in str(info.value)


def test_file_size_counts_external_data(tmp_path, model_path, lr_weights):
    assert model_file_size(model_path) == model_path.stat().st_size
    ext = tmp_path / "ext.onnx"
    onnx.save(gemm_classifier(*lr_weights), ext, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert model_file_size(ext) == ext.stat().st_size + (tmp_path / "ext.data").stat().st_size
    assert model_file_size(ext) > model_file_size(model_path) - 100
    proto = onnx.load(model_path)
    assert model_file_size(proto) == len(proto.SerializeToString())


def test_peak_memory_counts_a_known_allocation_whatever_the_parent_holds(tmp_path):
    """A model whose one weight is 32 MiB: its fresh process must count at least most of it, however
    much this (parent) process holds; ru_maxrss, inherited through fork and exec, read +0 here."""
    n = 2048
    weight = np.random.default_rng(0).standard_normal((n, 2 * n)).astype(np.float32)  # 32 MiB
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, n])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2 * n])],
        [onnx.numpy_helper.from_array(weight, "w")])
    path = tmp_path / "big.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    ballast = np.ones(96 * 2**20, dtype=np.uint8) * 2  # the parent holds far more than the child will
    mem = measure_peak_memory(path, batch_size=1)
    assert int(ballast.sum()) > 0
    assert 0.8 * weight.nbytes <= mem["delta_bytes"] <= 4 * weight.nbytes + 64 * 2**20, mem
    assert mem["delta_bytes"] == pytest.approx(mem["delta_mb"] * 2**20, abs=1)


def test_peak_memory_measured_in_subprocess(model_path):
    mem = measure_peak_memory(model_path, batch_size=16)
    assert mem["baseline_rss_mb"] > 10  # python + numpy + onnxruntime
    assert mem["peak_rss_mb"] >= mem["after_load_rss_mb"] >= mem["baseline_rss_mb"]
    assert mem["delta_mb"] == pytest.approx(mem["peak_rss_mb"] - mem["baseline_rss_mb"])
