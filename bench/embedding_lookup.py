"""Which quantized embedding lookup ONNX Runtime runs fastest: the measurement behind `specs.weight_target`.

One 30522x384 table (all-MiniLM-L6-v2's word embeddings, random values), 128 ids per sequence, batch 1
and 32, one intra-op thread, median of interleaved runs in a shuffled order. Candidates: fp32 Gather; int8 per-row
DequantizeLinear -> Gather (ORT keeps the DequantizeLinear of a constant for QDQ fusion, so it
dequantizes the whole table every run); the storage decode Cast -> Mul -> Gather (folded at load);
com.microsoft GatherBlockQuantized with uint8 (bits=8) and int4 data, blocks of 32. The two
GatherBlockQuantized outputs are checked against numpy's dequantized rows.

    python -m bench.embedding_lookup [--runs 200]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROWS, HIDDEN, BLOCK, TOKENS = 30522, 384, 32, 128


def _model(nodes: list, inits: list, contrib: bool = False) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def candidates(table: np.ndarray) -> dict[str, tuple[onnx.ModelProto, np.ndarray | None]]:
    """name -> (model, the table it must look up, or None when not checked)."""
    scale = (np.abs(table).max(1) / 127).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    blocks = table.reshape(ROWS, HIDDEN // BLOCK, BLOCK)
    s8 = (np.abs(blocks).max(2) / 127).astype(np.float32)
    q8 = (np.clip(np.rint(blocks / s8[..., None]), -127, 127) + 128).astype(np.uint8)
    s4 = (np.abs(blocks).max(2) / 7).astype(np.float32)
    q4 = np.clip(np.rint(blocks / s4[..., None]), -7, 7).astype(np.int8)
    gbq = dict(domain="com.microsoft", block_size=BLOCK, gather_axis=0, quantize_axis=1)
    return {
        "fp32 Gather": (_model([helper.make_node("Gather", ["W", "ids"], ["y"])], [numpy_helper.from_array(table, "W")]),
                        table),
        "DequantizeLinear int8 -> Gather": (_model(
            [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["W"], axis=0), helper.make_node("Gather", ["W", "ids"], ["y"])],
            [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.zeros(ROWS, np.int8), "z")]), None),
        "Cast -> Mul -> Gather (storage, folded)": (_model(
            [helper.make_node("Cast", ["q"], ["f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["f", "s"], ["W"]),
             helper.make_node("Gather", ["W", "ids"], ["y"])],
            [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale[:, None], "s")]), None),
        "GatherBlockQuantized uint8": (_model(
            [helper.make_node("GatherBlockQuantized", ["q8", "ids", "s8", "z8"], ["y"], bits=8, **gbq)],
            [numpy_helper.from_array(q8.reshape(ROWS, HIDDEN), "q8"), numpy_helper.from_array(s8, "s8"),
             numpy_helper.from_array(np.full(s8.shape, 128, np.uint8), "z8")], contrib=True),
            ((q8.astype(np.float32) - 128) * s8[..., None]).reshape(ROWS, HIDDEN)),
        "GatherBlockQuantized int4": (_model(
            [helper.make_node("GatherBlockQuantized", ["q4", "ids", "s4"], ["y"], **gbq)],
            [helper.make_tensor("q4", TensorProto.INT4, [ROWS, HIDDEN], q4.reshape(-1).tolist()),
             numpy_helper.from_array(s4, "s4")], contrib=True),
            (q4.astype(np.float32) * s4[..., None]).reshape(ROWS, HIDDEN)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((ROWS, HIDDEN)) * 0.05).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = {}
    for name, (model, want) in candidates(table).items():
        sessions[name] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        if want is not None:
            ids = rng.integers(0, ROWS, (2, TOKENS)).astype(np.int64)
            np.testing.assert_allclose(sessions[name].run(None, {"ids": ids})[0], want[ids], rtol=0, atol=1e-6)
    for batch in (1, 32):
        ids = {"ids": rng.integers(0, ROWS, (batch, TOKENS)).astype(np.int64)}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(5):
            for s in sessions.values():
                s.run(None, ids)
        order = list(sessions)
        for _ in range(args.runs):
            rng.shuffle(order)  # a candidate that sweeps the whole table evicts caches for the next one
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, ids)
                times[name].append(time.perf_counter() - start)
        fp32 = np.median(times["fp32 Gather"])
        for name, t in times.items():
            print(f"batch {batch:2d}  {name:42s} {np.median(t) * 1e3:8.3f} ms  {fp32 / np.median(t):6.2f}x of fp32")


if __name__ == "__main__":
    main()
