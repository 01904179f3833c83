"""Turn QDQ kernels of a quantized model back into fp32 kernels, their weight integers kept.

ORT fuses a kernel whose activation and weight both arrive through DequantizeLinear into an int8
kernel (QLinearConv, QGemm, ...); some of those run slower than the fp32 kernel. This pass takes
named kernels out of that pattern: the activation input bypasses its Quantize -> Dequantize pair,
the weight's DequantizeLinear becomes `Cast -> Sub -> Mul` by its scale (the storage decode, which a
default ORT session constant-folds at load: an fp32 weight, the same integers in the file), and an
int32 bias is dequantized into an fp32 initializer. The kernel's output and its neighbours are
untouched. The input model is not modified.
"""
from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.cleanup import cleanup

__all__ = ["KERNEL_OPS", "int8_kernels", "fp32_kernels", "fp32_outside_kernels"]

KERNEL_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """tensor name -> every (node, input index) that reads it."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    return readers


def _is_weight_dq(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto]) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits


def int8_kernels(model: onnx.ModelProto) -> list[str]:
    """Names of the kernels ORT can fuse into int8 kernels: activation and weight both dequantized."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = _producers(g)
    out = []
    for node in g.node:
        if node.op_type not in KERNEL_OPS or len(node.input) < 2:
            continue
        act, weight = producers.get(node.input[0]), producers.get(node.input[1])
        if _is_weight_dq(weight, inits) and act is not None and act.op_type == "DequantizeLinear":
            out.append(node.name)
    return out


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _dequantize(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
          if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale))
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[_axis(dq) % q.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


_QRANGE = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}


_NON_NEGATIVE = frozenset({"Softmax", "Sigmoid", "Relu"})  # outputs a Clip at 0 would not change


def _reference_activations(reference: onnx.ModelProto | None) -> dict[str, tuple[str, float | None, float | None]]:
    """Per tensor of `reference` (the fp32 model the quantized one was made from): the op that
    writes it, and a Clip's constant bounds (else None). The quantizer keeps a dropped activation's
    output name on the tensor its Quantize reads, so this says which op a clamp stands in for."""
    if reference is None:
        return {}
    g = reference.graph
    # the tensors, not arrays: only a Clip's scalar bounds are ever read (the fp32 model's weights
    # are not converted, once per fallback step of `whole_model_check`)
    consts = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    out: dict[str, tuple[str, float | None, float | None]] = {}
    for node in g.node:
        out.update({name: (node.op_type, None, None) for name in node.output})
        names = (list(node.input[1:3]) + ["", ""])[:2]
        if node.op_type == "Clip" and all(not n or (n in consts and int(np.prod(consts[n].dims)) == 1) for n in names):
            lo, hi = (float(numpy_helper.to_array(consts[n]).reshape(())) if n else d
                      for n, d in zip(names, (-np.inf, np.inf)))
            out[node.output[0]] = ("Clip", lo, hi)
    return out


def _clamp(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto], new_inits: list[onnx.TensorProto],
           produced: Mapping[str, onnx.NodeProto],
           activations: Mapping[str, tuple[str, float | None, float | None]] | None = None) -> onnx.NodeProto | None:
    """The activation a bypassed Quantize -> Dequantize pair must leave behind, or None. ORT's
    quantizer drops a Relu (or a Clip) before a Quantize whose range starts at 0, the clamp at the
    zero point doing its work: bypassing that pair without it would drop the activation too. After
    an op whose output is never negative (a Softmax) no Relu was dropped, and none is left.
    Where `activations` (`_reference_activations` of the fp32 model) names the op that was dropped,
    that op comes back as it was (a Relu, or a Clip with its own bounds): ORT fuses it into the
    Conv before it, or into the Conv + Add of a residual block, as in the fp32 model; where the fp32
    model wrote the tensor with the op that writes it here (a GlobalAveragePool of non-negative
    values, its range starting at 0 too), nothing was dropped and nothing is left. Else a Clip to
    the quantization range, which ORT leaves as a node of its own (and, in its NCHWc layout, a
    Reorder each side: ResNet-20 ran 0.77x of fp32 at batch 1 with every kernel fp32 and them left)."""
    if q.input[1] not in inits:
        return None
    source = produced.get(q.input[0])
    if source is not None and source.op_type in _NON_NEGATIVE:
        return None
    scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
    zp_t = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    zp = numpy_helper.to_array(zp_t).astype(np.int64) if zp_t is not None else np.zeros((), np.int64)
    lo, hi = _QRANGE.get(zp_t.data_type if zp_t is not None else onnx.TensorProto.UINT8, (0, 255))
    if scale.size != 1 or zp.size != 1 or int(zp.reshape(())) != lo:
        return None
    base = f"{q.output[0]}_fp32_clamp"
    dropped = (activations or {}).get(q.input[0])
    if dropped is not None and dropped[0] == "Relu":
        return helper.make_node("Relu", [q.input[0]], [base], name=base)
    if dropped is not None and source is not None and dropped[0] == source.op_type:
        return None
    if dropped is not None and (dropped[0] != "Clip" or dropped[1] is None):
        dropped = None  # an op this pass cannot restore: the quantization range's clamp
    clip = helper.make_node("Clip", [q.input[0], f"{base}_min", f"{base}_max"], [base], name=base)
    if base in produced:  # an earlier pass made it: read, not made again (the caller inserts nothing)
        return clip
    low, high = dropped[1:] if dropped is not None else (0.0, (hi - lo) * float(scale.reshape(())))
    new_inits.append(numpy_helper.from_array(np.asarray(low, np.float32), f"{base}_min"))
    new_inits.append(numpy_helper.from_array(np.asarray(high, np.float32), f"{base}_max"))
    return clip


def _weight_decode(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto], out: str,
                   new_inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Cast -> (Sub zero point) -> Mul scale, producing `out` from the DQ's integers."""
    q = inits[dq.input[0]]
    rank = len(q.dims)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
    shape = [1] * rank
    if scale.ndim == 1 and scale.size > 1:
        shape[_axis(dq) % rank] = scale.size
    base = f"{out}_decode"
    new_inits.append(numpy_helper.from_array(scale.reshape(shape if scale.size > 1 else []), f"{base}_scale"))
    nodes = [helper.make_node("Cast", [q.name], [f"{base}_float"], name=f"{base}_cast", to=onnx.TensorProto.FLOAT)]
    current = f"{base}_float"
    if zp is not None and np.any(zp != 0):
        new_inits.append(numpy_helper.from_array(zp.astype(np.float32).reshape(shape if zp.size > 1 else []),
                                                 f"{base}_zero_point"))
        nodes.append(helper.make_node("Sub", [current, f"{base}_zero_point"], [f"{base}_centered"], name=f"{base}_sub"))
        current = f"{base}_centered"
    nodes.append(helper.make_node("Mul", [current, f"{base}_scale"], [out], name=f"{base}_mul"))
    return nodes


def fp32_kernels(model: onnx.ModelProto, names: Iterable[str],
                 reference: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of `model` whose kernels `names` (from `int8_kernels`) run as fp32 kernels (module
    docstring); `reference`, the fp32 model it was quantized from, says which activation the
    quantizer dropped in front of a bypassed pair (`_clamp`)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    wanted = set(names)
    inits = {t.name: t for t in g.initializer}
    producers = _producers(g)
    new_inits: list[onnx.TensorProto] = []
    decodes: dict[int, list[onnx.NodeProto]] = {}  # index of the kernel -> nodes inserted before it
    clamps: dict[str, onnx.NodeProto | None] = {}  # Quantize output -> the activation standing in for its pair
    activations = _reference_activations(reference)
    for index, node in enumerate(g.node):
        if node.name not in wanted or node.op_type not in KERNEL_OPS:
            continue
        act = producers.get(node.input[0])
        if act is not None and act.op_type == "DequantizeLinear":
            q = producers.get(act.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                if q.output[0] not in clamps:
                    clamps[q.output[0]] = _clamp(q, inits, new_inits, producers, activations)
                    if clamps[q.output[0]] is not None and clamps[q.output[0]].output[0] not in producers:
                        decodes.setdefault(index, []).append(clamps[q.output[0]])
                clamp = clamps[q.output[0]]
                node.input[0] = clamp.output[0] if clamp is not None else q.input[0]
        weight = producers.get(node.input[1])
        if _is_weight_dq(weight, inits):
            out = f"{node.name}_fp32_weight"
            decodes.setdefault(index, []).extend(_weight_decode(weight, inits, out, new_inits))
            node.input[1] = out
        if len(node.input) > 2 and node.input[2]:
            bias = producers.get(node.input[2])
            if _is_weight_dq(bias, inits):
                name = f"{node.name}_fp32_bias"
                new_inits.append(numpy_helper.from_array(_dequantize(bias, inits), name))
                node.input[2] = name
    if not decodes and not new_inits:
        return m
    nodes = []
    for index, node in enumerate(g.node):
        nodes.extend(decodes.get(index, []))
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    out = cleanup(m)
    if not model.graph.value_info:  # onnx-ir writes a value_info per tensor: keep the file as lean as it was
        del out.graph.value_info[:]
    return out


def fp32_outside_kernels(model: onnx.ModelProto, reference: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of `model` where only the int8 kernels (`int8_kernels`) keep their Quantize /
    Dequantize: the activation pairs into and out of them stay (ORT fuses those into QLinearMatMul,
    QLinearConv, ...), every other pair is bypassed, and every other constant's DequantizeLinear (a
    LayerNormalization's scale, an Add's bias, a position table ORT's quantizer stored in 8 bits)
    becomes `Cast -> Sub -> Mul`, which a default session folds at load (a DequantizeLinear of a
    constant it keeps for QDQ fusion, and runs every call). On a small ViT those pairs around Add,
    LayerNormalization and Softmax and the constants' dequantization cost more than the int8
    MatMuls gain. The same bytes: the constants' integers, scales and zero points are kept as they
    are. Returns `model` itself when there is nothing to change.
    With int8 kernels left, OpenVINO 2026.4 crashed (SIGFPE) compiling the result on the ViT:
    `search/ort_speed.py` calls it once every kernel is fp32 (then every pair goes). `reference`: as
    for `fp32_kernels`."""
    g = model.graph
    kernels = {n.name: n for n in g.node if n.name in set(int8_kernels(model))}
    producers = _producers(g)
    consumers = _consumers(g)
    keep = set()  # the Quantize nodes of the pairs an int8 kernel reads or writes
    for node in kernels.values():
        dq = producers[node.input[0]]
        if dq.input[0] in producers and producers[dq.input[0]].op_type == "QuantizeLinear":
            keep.add(producers[dq.input[0]].name)
        keep.update(q.name for out in node.output for q, _ in consumers.get(out, []) if q.op_type == "QuantizeLinear")
    out = _bypass_pairs(model, keep, _reference_activations(reference))
    return _decode_constants(out, set(kernels))


def _decode_constants(model: onnx.ModelProto, kernels: Container[str]) -> onnx.ModelProto:
    """Every DequantizeLinear of a constant that is not an int8 kernel's weight or bias (of
    `kernels`) written as Cast -> (Cast zero point, Sub) -> Mul by its scale, its stored tensors kept."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers = _consumers(g)
    decodes = {}
    for node in g.node:
        if not _is_weight_dq(node, inits):
            continue
        readers = consumers.get(node.output[0], [])
        if readers and all(r.name in kernels and i in (1, 2) for r, i in readers):
            continue
        decodes[node.name] = node
    if not decodes:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for node in g.node:
        if node.name not in decodes:
            nodes.append(node)
            continue
        q = inits[node.input[0]]
        base = f"{node.output[0]}_decode"
        shape = [1] * len(q.dims)
        scale = inits[node.input[1]]
        if len(scale.dims) == 1 and scale.dims[0] > 1:
            shape[_axis(node) % len(q.dims)] = scale.dims[0]
            for t in [scale] + ([inits[node.input[2]]] if len(node.input) > 2 and node.input[2] else []):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(shape), t.name))
        nodes.append(helper.make_node("Cast", [q.name], [f"{base}_float"], name=f"{base}_cast", to=onnx.TensorProto.FLOAT))
        current = f"{base}_float"
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Cast", [node.input[2]], [f"{base}_zp"], name=f"{base}_zp_cast",
                                          to=onnx.TensorProto.FLOAT))
            nodes.append(helper.make_node("Sub", [current, f"{base}_zp"], [f"{base}_centered"], name=f"{base}_sub"))
            current = f"{base}_centered"
        nodes.append(helper.make_node("Mul", [current, node.input[1]], [node.output[0]], name=f"{base}_mul"))
    del g.node[:]
    g.node.extend(nodes)
    return m


def _bypass_pairs(model: onnx.ModelProto, keep: Container[str],
                  activations: Mapping[str, tuple[str, float | None, float | None]] | None = None) -> onnx.ModelProto:
    """A copy of `model` with every activation Quantize -> Dequantize pair but those whose Quantize
    is named in `keep` bypassed (the activation left where the pair's range did its work, `_clamp`)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producers = _producers(g)
    inits = {t.name: t for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    bypass, clamps = {}, {}
    for node in g.node:
        if node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.name not in keep:
                if q.name not in clamps:
                    clamps[q.name] = _clamp(q, inits, new_inits, producers, activations)
                clamp = clamps[q.name]
                bypass[node.output[0]] = clamp.output[0] if clamp is not None else q.input[0]
    if not bypass:
        return model
    ordered = []
    for node in g.node:  # each Clip right after its Quantize (its input is ready there)
        ordered.append(node)
        if (node.op_type == "QuantizeLinear" and clamps.get(node.name) is not None
                and clamps[node.name].output[0] not in producers):
            ordered.append(clamps[node.name])
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    producers = _producers(g)
    outputs = {o.name for o in g.output}
    renamed = {}  # a pair in front of a graph output: its fp32 producer writes the output's name
    for dq, src in list(bypass.items()):
        if dq in outputs:
            del bypass[dq]
            if src in producers and src not in outputs:
                renamed[src] = dq
    for node in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in renamed.values()]:
        g.node.remove(node)  # its Quantize, read by nothing now, goes in the cleanup
    for node in g.node:
        for i, name in enumerate(node.input):
            name = bypass.get(name, name)
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
    out = cleanup(m)
    if not model.graph.value_info:
        del out.graph.value_info[:]
    return out
