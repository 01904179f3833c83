"""A big model handed to ONNX Runtime with its weight decodes already folded, one weight at a time.

ORT folds constant subgraphs (the storage target's Cast -> Sub -> Mul decodes) when a session is
built, holding the folded float32 weights as graph tensors and again as session values: about
twice the model's float32 bytes at load, on top of the caller's copy. `write_folded` evaluates each
decode here instead, one weight at a time, and streams the result into the scratch file ORT loads
(mapped, `graph/external_data.py`), so the session holds the weights once. The decodes are
elementwise integer-to-float casts, exact shifts and masks, gathers, reshapes and single float32
multiplies (correctly rounded in numpy as in ORT), so the folded weights are the bytes ORT's own
folding computes and the optimised graph is the same; a model with Q/DQ nodes (whose
DequantizeLinear ORT deliberately keeps for fusion) or with any other constant op is left as it is.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hirelc_onnx.graph.external_data import append_initializer, light_copy, save_external

__all__ = ["FOLDED_OPS", "write_folded"]

# ops whose constant instances are folded here: exact, elementwise or data movement
FOLDED_OPS = frozenset({"Cast", "Sub", "Mul", "Add", "Reshape", "Transpose", "BitwiseAnd", "BitwiseXor", "Gather",
                        "Expand", "Slice", "Unsqueeze", "Squeeze", "Concat", "Identity"})
_COLLECT_BYTES = 8 << 20
_KEPT_BY_ORT = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def write_folded(model: onnx.ModelProto, folder: str | os.PathLike) -> Path:
    """Write `model` into `folder` as model.onnx + model.data with its constant decodes folded (see
    the module docstring; a model that has none is written as it is). Returns the model's path."""
    folder = Path(folder)
    path, data = folder / "model.onnx", folder / "model.data"
    graph = model.graph
    constant_nodes = _constant_nodes(model)
    if not constant_nodes:
        header = save_external(model, data, data.name)
        path.write_bytes(header.SerializeToString())
        return path
    folded = {id(n) for n in constant_nodes}
    kept_nodes = [n for n in graph.node if id(n) not in folded]
    needed = {i for n in kept_nodes for i in n.input if i} | {o.name for o in graph.output}
    produced = {o: n for n in constant_nodes for o in n.output}
    inits = {t.name: t for t in graph.initializer}

    header = light_copy(model)
    del header.graph.node[:]
    header.graph.node.extend(kept_nodes)
    folded_names = {o for o in produced if o in needed}
    del header.graph.value_info[:]
    header.graph.value_info.extend(v for v in graph.value_info if v.name not in folded_names)
    with open(data, "wb") as fh:
        for t in graph.initializer:
            if t.name in needed:
                append_initializer(header, t, fh, data.name)
        for name in (o for n in constant_nodes for o in n.output if o in folded_names):
            value = _evaluate(name, produced, inits, model.opset_import)
            append_initializer(header, numpy_helper.from_array(value, name), fh, data.name)
            big = value.nbytes >= _COLLECT_BYTES
            del value
            if big:  # the reference evaluator's cycles hold the decode's float32 intermediates
                gc.collect()  # (a full collection costs most of the fold in a search's big heap: big weights only)
    path.write_bytes(header.SerializeToString())
    return path


def _constant_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of FOLDED_OPS whose inputs are all initializers or outputs of such nodes (none when
    the model holds a node ORT keeps unfolded on purpose)."""
    graph = model.graph
    if any(n.op_type in _KEPT_BY_ORT for n in graph.node):
        return []
    constant = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    nodes = []
    for node in graph.node:
        if (node.op_type in FOLDED_OPS and node.domain in ("", "ai.onnx") and node.input
                and all(i in constant for i in node.input if i) and not any(o in outputs for o in node.output)
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            nodes.append(node)
            constant.update(node.output)
    return nodes


def _evaluate(name: str, produced: dict, inits: dict, opset_import) -> np.ndarray:
    """The value of `name`: its constant ancestors alone, run by onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    order: list[onnx.NodeProto] = []
    sources: dict[str, TensorProto] = {}
    seen: set[int] = set()

    def visit(value: str) -> None:
        node = produced.get(value)
        if node is None:
            sources[value] = inits[value]
            return
        if id(node) in seen:
            return
        seen.add(id(node))
        for i in node.input:
            if i:
                visit(i)
        order.append(node)

    visit(name)
    sub = helper.make_graph(order, "fold", [], [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)],
                            initializer=list(sources.values()))
    (value,) = ReferenceEvaluator(helper.make_model(sub, opset_imports=list(opset_import))).run(None, {})
    return np.asarray(value)
