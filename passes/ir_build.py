"""Small builders for passes that add nodes and initializers to an onnx-ir graph under fresh names."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import numpy_helper

__all__ = ["taken_names", "fresh_name", "add_constant", "new_node"]


def taken_names(graph: ir.Graph) -> set[str]:
    """Every name already used in `graph`: initializers, inputs, node outputs and node names."""
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in graph.all_nodes():
        names.update(v.name for v in node.outputs if v.name)
        if node.name:
            names.add(node.name)
    return names


def fresh_name(taken: set[str], base: str) -> str:
    """`base`, or `base_<i>` for the first free i; the name is added to `taken`."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def add_constant(graph: ir.Graph, taken: set[str], base: str, array: np.ndarray) -> ir.Value:
    """Register `array` (already in its storage dtype) as an initializer, serialized by onnx's helpers."""
    tensor = ir.from_proto(numpy_helper.from_array(array, fresh_name(taken, base)))
    value = ir.Value(name=tensor.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def new_node(taken: set[str], base: str, op: str, inputs: list[ir.Value | None], **attrs) -> ir.Node:
    """A node named `<base>_<op>` with one output named `<base>_<op in lower case>` (both fresh)."""
    return ir.node(op, inputs, attrs, name=fresh_name(taken, f"{base}_{op}"),
                   outputs=[ir.Value(name=fresh_name(taken, f"{base}_{op.lower()}"))])
