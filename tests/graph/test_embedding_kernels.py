"""Embedding tables are kernels: found, never pruned, costed exactly in every target, counted by budgets."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import build_block_graph
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.search.budget import max_ratio
from passes.clip_weights import mse_clipped
from passes.quantize import fake_quantize
from passes.storage import initializer_nbytes
from tests.embedding_model import HIDDEN, MAX_LEN, VOCAB, embedding_model, token_ids

TABLES = {"Wword": (VOCAB, HIDDEN), "Wpos": (MAX_LEN, HIDDEN)}


@pytest.fixture(scope="module")
def bg():
    return build_block_graph(embedding_model())


def _session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_tables_are_kernels_with_per_row_axis_and_no_macs(bg):
    tables = {k.weight: k for k in bg.kernels.values() if k.op == "Gather"}
    assert {w: k.weight_shape for w, k in tables.items()} == TABLES
    for k in tables.values():
        assert k.out_axis == 0 and k.macs == 0 and k.bias is None
        assert k.params == int(np.prod(k.weight_shape))
    assert [k.op for k in bg.kernel_list()] == ["Gather", "Gather", "MatMul", "MatMul", "MatMul"]


def test_hidden_dimension_under_layernorm_is_not_prunable_and_rows_are_kept(bg):
    tables = [k for k in bg.kernels.values() if k.op == "Gather"]
    group = bg.groups[tables[0].group]
    assert tables[1].group == group.id  # word + position embeddings are added: one hidden dimension
    assert not group.prunable and "LayerNormalization" in group.refusal
    config = CompressionConfig({n: KernelConfig(keep_ratio=0.5) for n in bg.kernels})
    out = apply_config(bg, config)
    inits = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert {w: inits[w] for w in TABLES} == TABLES  # vocabulary rows and hidden columns all kept
    assert inits["W1"] == (HIDDEN, 64)  # the feed-forward inner dimension was pruned
    ids = token_ids(3)
    assert _session(out).run(None, {"ids": ids})[0].shape == (3, 10)


def test_hidden_dimension_is_pruned_where_the_analysis_proves_it():
    """Lookup -> MatMul: the table's columns and the MatMul's rows are one group; pruning it keeps
    every vocabulary row and computes what the unpruned model computes with those channels masked."""
    from tests.oracles import masked_model, run_ort

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "W"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 4])],
        [numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "T"),
         numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W2")])
    bg = build_block_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    table = next(k for k in bg.kernels.values() if k.op == "Gather")
    group = bg.groups[table.group]
    assert group.prunable and group.length == 16
    from hirelc_onnx.apply import choose_channels

    config = CompressionConfig({table.name: KernelConfig(keep_ratio=0.5)})
    keep = choose_channels(bg, config)
    column_l1 = np.abs(numpy_helper.to_array(next(t for t in bg.model.graph.initializer if t.name == "T"))).sum(axis=0)
    np.testing.assert_array_equal(keep[group.id], np.sort(np.argsort(-column_l1)[:8]))  # the table's strongest columns
    out = apply_config(bg, config, checking=True)
    assert {t.name: tuple(t.dims) for t in out.graph.initializer}["T"] == (50, 8)
    ids = {"ids": rng.integers(0, 50, (3, 5)).astype(np.int64)}
    np.testing.assert_allclose(run_ort(out, ids)[0], run_ort(masked_model(bg.model, bg.analysis, keep), ids)[0],
                               rtol=1e-5, atol=1e-5)
    assert model_cost(bg, config).total_bytes == initializer_nbytes(out)
    from hirelc_onnx.search.features import WeightPerturbation

    energy = (numpy_helper.to_array(next(t for t in bg.model.graph.initializer if t.name == "T")) ** 2).sum(axis=0)
    dropped = np.setdiff1d(np.arange(16), keep[group.id])
    assert WeightPerturbation(bg).prune(table.name, 0.5) == pytest.approx(energy[dropped].sum() / energy.sum())


def _shared_table_model(axis: int = 0, readers: int = 2) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["T", "ids"], [f"g{i}"], axis=axis) for i in range(readers)]
    nodes.append(helper.make_node("MatMul", ["g0", "W"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
        + [helper.make_tensor_value_info(f"g{i}", onnx.TensorProto.FLOAT, None) for i in range(1, readers)],
        [numpy_helper.from_array(np.ones((8, 8), np.float32), "T"), numpy_helper.from_array(np.ones((8, 4), np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("axis,readers", [(0, 2), (1, 1)])
def test_shared_or_column_gathers_are_not_kernels(axis, readers):
    """A table read twice cannot be rewritten for one reader; a Gather along axis 1 is not a row lookup."""
    bg = build_block_graph(_shared_table_model(axis, readers))
    assert [k.op for k in bg.kernel_list()] == ["MatMul"]


@pytest.mark.parametrize("target", ["storage", "ort-cpu", "qdq"])
@pytest.mark.parametrize("bits,granularity", [(2, "per-channel"), (4, "per-group"), (8, "per-channel"),
                                              (4, "per-tensor")])
def test_cost_model_predicts_the_emitted_bytes(bg, target, bits, granularity):
    config = CompressionConfig.uniform(bg.kernels, target=target, bits=bits, granularity=granularity)
    out = apply_config(bg, config, checking=True)
    assert model_cost(bg, config).total_bytes == initializer_nbytes(out)
    ids = token_ids(4)
    fq = {w: fake_quantize(mse_clipped(numpy_helper.to_array(t), s), s) for w, t, s in _table_specs(bg, config)}  # --weight-range mse
    fake = onnx.ModelProto()
    fake.CopyFrom(bg.model)
    for t in fake.graph.initializer:
        if t.name in fq:
            t.CopyFrom(numpy_helper.from_array(fq[t.name], t.name))
    only_tables = CompressionConfig({n: config.get(n) for n, k in bg.kernels.items() if k.op == "Gather"},
                                    target=target)
    got = _session(apply_config(bg, only_tables)).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, _session(fake).run(None, {"ids": ids})[0], rtol=1e-5, atol=1e-5)


def _table_specs(bg, config):
    from hirelc_onnx.specs import weight_spec

    inits = {t.name: t for t in bg.model.graph.initializer}
    return [(k.weight, inits[k.weight], weight_spec(k, config.get(n))) for n, k in bg.kernels.items() if k.op == "Gather"]


@pytest.mark.parametrize("table", [KernelConfig(4), KernelConfig(2, qtype="asymmetric", granularity="per-group")])
def test_ort_cpu_tables_fold_into_an_fp32_lookup(bg, tmp_path, table):
    """Under ort-cpu a table is stored in integers ORT folds at load: the optimised graph gathers from
    an fp32 initializer (no DequantizeLinear, no GatherBlockQuantized: both measured slower than fp32),
    next to the MatMuls ORT's static quantization turns into integer kernels."""
    config = CompressionConfig({n: table if k.op == "Gather" else KernelConfig(7) for n, k in bg.kernels.items()},
                               target="ort-cpu")
    out = apply_config(bg, config, calib_batches=[{"ids": token_ids(8)}], checking=True)
    assert initializer_nbytes(out) < 0.3 * bg.weight_bytes
    ops = {n.op_type for n in out.graph.node}
    assert "GatherBlockQuantized" not in ops
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    gathers = [n for n in out.graph.node if n.op_type == "Gather" and n.input[0] in producers
               and n.input[0] not in {i.name for i in out.graph.input}]
    assert len(gathers) == 2 and {producers[n.input[0]] for n in gathers} <= {"Mul", "Reshape"}  # the storage decode
    path = str(tmp_path / "optimized.onnx")
    _session(out, path)
    optimized_model = onnx.load(path)
    assert any(n.op_type == "QLinearMatMul" for n in optimized_model.graph.node)
    optimized = {t.name: t for t in optimized_model.graph.initializer}
    for name, shape in TABLES.items():  # the decode's output keeps the table's name
        assert tuple(optimized[name].dims) == shape and optimized[name].data_type == onnx.TensorProto.FLOAT
        assert f"{name}_quantized" not in optimized


def test_budget_reachability_counts_the_tables(bg):
    """The tables hold most of the bytes: leaving them fp32 would cap the ratio near 1.3x."""
    table_bytes = sum(4 * int(np.prod(s)) for s in TABLES.values())
    assert table_bytes > 0.7 * bg.weight_bytes
    assert max_ratio(bg, "storage") > 10.0
    assert max_ratio(bg, "ort-cpu") > 8.0  # tables in storage's 2-bit encoding, the rest int7
