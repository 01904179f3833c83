"""Big transformer-shaped models with external data, generated offline for memory tests and the bench.

The model is a stack of pre-norm MLP blocks over a float input [N, seq, d]: LayerNormalization ->
MatMul [d, 4d] -> Add -> Relu -> MatMul [4d, d] -> Add -> residual Add, then a mean over the
sequence and a MatMul head to `classes` logits. 8 d^2 weights per layer: d 1024 x 12 layers is
100M parameters (400 MB fp32), d 2048 x 30 layers is 1B (4 GB).

Weights are streamed into one external-data file beside the model, tensor by tensor, so writing a
4 GB model never holds more than one weight in memory. `sparse=True` writes no weight bytes at all
(the data file is extended to its size, a hole that reads as zeros): a valid file in seconds, for
commands that must not read the weights (inspect).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BigModel", "write_transformer", "transformer_params", "random_inputs"]

_ALIGN = 4096  # weight offsets page-aligned, as runtimes that map external data want


@dataclass(frozen=True)
class BigModel:
    """What `write_transformer` wrote."""

    path: Path  # the .onnx file (graph and small tensors)
    data_path: Path  # its external-data file
    params: int  # every initializer element
    weight_bytes: int  # fp32 bytes of every initializer
    d_model: int
    seq: int
    classes: int


def transformer_params(d_model: int, layers: int, classes: int = 10) -> int:
    """Parameters of `write_transformer`'s model (weights, biases, norms, head)."""
    per_layer = 8 * d_model * d_model + 4 * d_model + d_model + 2 * d_model
    return layers * per_layer + d_model * classes + classes


def write_transformer(path: str | Path, *, d_model: int, layers: int, seq: int = 8, classes: int = 10,
                      seed: int = 0, sparse: bool = False, location: str | None = None,
                      inline_below: int = 1024) -> BigModel:
    """Write the model to `path` with every tensor of at least `inline_below` bytes in `location`
    (default `<stem>.data`) beside it; random weights scaled by 1/sqrt(fan-in) (zeros when sparse)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    location = location or f"{path.stem}.data"
    data_path = path.parent / location
    rng = np.random.default_rng(seed)
    d, hidden = d_model, 4 * d_model
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    params = 0

    end = 0  # bytes of the data file so far
    with open(data_path, "wb") as fh:
        def add(name: str, shape: tuple[int, ...], scale: float | None) -> str:
            """One initializer: normal(0, scale) values, or ones (scale None); external when big."""
            nonlocal params, end
            n = math.prod(shape)
            params += n
            values = None
            if not sparse or 4 * n < inline_below:
                values = np.ones(shape, np.float32) if scale is None else \
                    rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            if 4 * n < inline_below:
                inits.append(numpy_helper.from_array(values, name))
                return name
            offset = -(-end // _ALIGN) * _ALIGN
            end = offset + 4 * n
            if values is not None:
                fh.seek(offset)
                fh.write(values.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            for key, value in (("location", location), ("offset", offset), ("length", 4 * n)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = TensorProto.EXTERNAL
            inits.append(tensor)
            return name

        h = "x"
        for i in range(layers):
            p = f"layer{i}"
            nodes.append(helper.make_node("LayerNormalization", [h, add(f"{p}.ln.gamma", (d,), None),
                                                                 add(f"{p}.ln.beta", (d,), 0.0)],
                                          [f"{p}.ln"], axis=-1, epsilon=1e-5, name=f"{p}.ln"))
            nodes.append(helper.make_node("MatMul", [f"{p}.ln", add(f"{p}.fc1.weight", (d, hidden), d ** -0.5)],
                                          [f"{p}.fc1.mm"], name=f"{p}.fc1"))
            nodes.append(helper.make_node("Add", [f"{p}.fc1.mm", add(f"{p}.fc1.bias", (hidden,), 0.02)],
                                          [f"{p}.fc1.out"], name=f"{p}.fc1.add"))
            nodes.append(helper.make_node("Relu", [f"{p}.fc1.out"], [f"{p}.act"], name=f"{p}.act"))
            nodes.append(helper.make_node("MatMul", [f"{p}.act", add(f"{p}.fc2.weight", (hidden, d), hidden ** -0.5)],
                                          [f"{p}.fc2.mm"], name=f"{p}.fc2"))
            nodes.append(helper.make_node("Add", [f"{p}.fc2.mm", add(f"{p}.fc2.bias", (d,), 0.02)],
                                          [f"{p}.fc2.out"], name=f"{p}.fc2.add"))
            nodes.append(helper.make_node("Add", [h, f"{p}.fc2.out"], [f"{p}.out"], name=f"{p}.residual"))
            h = f"{p}.out"
        nodes.append(helper.make_node("ReduceMean", [h], ["pooled"], axes=[1], keepdims=0, name="pool"))
        nodes.append(helper.make_node("MatMul", ["pooled", add("head.weight", (d, classes), d ** -0.5)],
                                      ["head.mm"], name="head"))
        nodes.append(helper.make_node("Add", ["head.mm", add("head.bias", (classes,), 0.02)], ["logits"],
                                      name="head.add"))
        fh.truncate(end)

    graph = helper.make_graph(nodes, "big_transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hirelc-bigmodel")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return BigModel(path, data_path, params, 4 * params, d, seq, classes)


def random_inputs(model: BigModel, n: int, seed: int = 1) -> np.ndarray:
    """`n` standard-normal inputs [n, seq, d] for `model` (float32)."""
    return np.random.default_rng(seed).standard_normal((n, model.seq, model.d_model), dtype=np.float32)
