"""Import normalisation: make every weight a named initializer the later passes can find.

Rules, applied in order:
  1. Initializers listed as graph inputs (IR < 4 style) become plain constants: they are
     removed from `graph.input`, so no runtime may override them (IR version raised to 7).
  2. Nodes whose inputs are all constants (Constant, ConstantOfShape, Unsqueeze, Reshape,
     Cast, ... of initializers) are evaluated once with onnx's reference runtime and replaced
     by initializers. Shape-dependent nodes (Shape, Size) are folded only when the shape is
     static.
  3. BatchNormalization right after a Conv / ConvTranspose / Gemm is folded into its weights
     (onnxscript's rewrite rules), as every runtime does before running it.
  4. An initializer consumed by more than one kernel (Conv, ConvTranspose, Gemm, MatMul) is
     copied per kernel, so each kernel owns its weight and can be pruned or quantized alone.
  5. Every node gets a unique, non-empty name (`<op>_<index>` where missing or repeated).
  6. Shapes are inferred (stale value_info dropped first).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.ir_build import fresh_name
from passes.storage import initializer_nbytes

__all__ = ["normalize", "KERNEL_OPS", "name_nodes", "infer_shapes", "opset_of", "remove_unused_initializers"]

log = logging.getLogger(__name__)

KERNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "Dropout"}


def normalize(model: onnx.ModelProto, fold: bool = True, fold_batchnorm: bool = True,
              inplace: bool = False) -> onnx.ModelProto:
    """Return a normalised copy of `model` (the input is not modified), or with `inplace`, normalise
    `model` itself (no second copy of the weights; it may still be replaced by BatchNorm folding,
    so use the returned model)."""
    model = model if inplace else _copy(model)
    _drop_initializer_inputs(model)
    if fold:
        _fold_constants(model)
    if fold_batchnorm and any(n.op_type == "BatchNormalization" for n in model.graph.node):
        model = _fold_batchnorm(model)
    _unshare_kernel_weights(model.graph)
    name_nodes(model.graph)
    return infer_shapes(model)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    model.ir_version = max(model.ir_version, 7)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in inits]
    if len(keep) != len(graph.input):
        del graph.input[:]
        graph.input.extend(keep)


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _eval_node(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    sess = ReferenceEvaluator(
        helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                 for n, a in inputs.items()],
                [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
            ),
            opset_imports=[helper.make_opsetid("", opset)],
        )
    )
    return sess.run(None, inputs)


def _fold_constants(model: onnx.ModelProto) -> None:
    graph = model.graph
    opset = opset_of(model)
    const: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type in _NOT_FOLDABLE
            or any(o in graph_outputs for o in node.output)
            or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            or not all(i == "" or i in const for i in node.input)
        ):
            kept.append(node)
            continue
        try:
            if node.op_type == "ConstantOfShape":  # fast path: big weights in old model zoos
                values = [_constant_of_shape(node, numpy_helper.to_array(const[node.input[0]]))]
            else:
                values = _eval_node(node, {i: numpy_helper.to_array(const[i]) for i in node.input if i}, opset)
        except Exception as exc:  # a node the reference runtime cannot fold stays in the graph
            log.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(tensor)
            const[name] = tensor
    del graph.node[:]
    graph.node.extend(kept)
    remove_unused_initializers(graph)


def _fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
    folded = rewriter.rewrite(model, pattern_rewrite_rules=rules)
    folded.ir_version = max(folded.ir_version, model.ir_version)
    return folded


def _constant_of_shape(node: onnx.NodeProto, shape: np.ndarray) -> np.ndarray:
    value = np.zeros(1, np.float32)
    for attr in node.attribute:
        if attr.name == "value":
            value = numpy_helper.to_array(attr.t).reshape(-1)
    return np.full(tuple(int(d) for d in shape), value[0], dtype=value.dtype)


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Delete initializers no node reads and no output names (in place, without copying the rest)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for idx in reversed(range(len(graph.initializer))):
        if graph.initializer[idx].name not in used:
            del graph.initializer[idx]


def _unshare_kernel_weights(graph: onnx.GraphProto) -> None:
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits)
    seen: set[str] = set()
    for node in graph.node:
        if node.op_type not in KERNEL_OPS:
            continue
        for idx, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = fresh_name(taken, f"{name}__{node.name or node.op_type}")
                graph.initializer.append(copy)
                inits[copy.name] = copy
                node.input[idx] = copy.name
            else:
                seen.add(name)


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique non-empty name (passes address nodes by name)."""
    seen: set[str] = set()
    for idx, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = fresh_name(seen, f"{node.op_type}_{idx}")
        seen.add(node.name)


_SMALL = 4096  # initializers up to this many elements keep their values for data propagation


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop stale value_info and re-run onnx shape inference (data propagation on), in place.

    Inference runs on a light copy in which large initializers are declared as typed graph
    inputs instead of carrying data, so a 500 MB model is not serialised for it.
    """
    graph = model.graph
    del graph.value_info[:]
    light = onnx.ModelProto()
    weight_bytes = initializer_nbytes(model)
    light.CopyFrom(model) if weight_bytes < (64 << 20) else _light_copy(model, light)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:  # unusual models: keep going without inferred shapes
        log.warning("shape inference failed: %s", exc)
        return model
    known = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
    outputs = {o.name: o for o in inferred.graph.output}
    for out in graph.output:
        if out.name in outputs and not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(outputs[out.name])
    return model


def _light_copy(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    for field in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= _SMALL:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
