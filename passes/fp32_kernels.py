"""Turn QDQ kernels of a quantized model back into fp32 kernels, their weight integers kept.

ORT fuses a kernel whose activation and weight both arrive through DequantizeLinear into an int8
kernel (QLinearConv, QGemm, ...); some of those run slower than the fp32 kernel. This pass takes
named kernels out of that pattern: the activation input bypasses its Quantize -> Dequantize pair
through a Clip to the pair's range (the quantizer may have folded a Relu into that range),
the weight's DequantizeLinear becomes `Cast -> Sub -> Mul` by its scale (the storage decode, which a
default ORT session constant-folds at load: an fp32 weight, the same integers in the file), and an
int32 bias is dequantized into an fp32 initializer. The kernel's output and its neighbours are
untouched. The input model is not modified.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.cleanup import cleanup

__all__ = ["KERNEL_OPS", "int8_kernels", "fp32_kernels"]

KERNEL_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


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


_INT_RANGES = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
               onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}


def _activation_clip(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto], out: str,
                     new_inits: list[onnx.TensorProto]) -> onnx.NodeProto | None:
    """`Clip` to the range a per-tensor QuantizeLinear -> DequantizeLinear pair can represent.

    The quantizer folds a Relu or Clip in front of a QuantizeLinear into its range (zero point at the
    integer minimum): bypassing the pair without that clamp would drop the activation. The Clip keeps
    the pair's saturation and drops only its rounding. None when the pair is not a per-tensor one
    with constant parameters (the kernel then keeps its dequantized input)."""
    if q.op_type != "QuantizeLinear" or q.input[1] not in inits:
        return None
    scale = numpy_helper.to_array(inits[q.input[1]])
    has_zp = len(q.input) > 2 and bool(q.input[2])
    if has_zp and q.input[2] not in inits:
        return None
    zp_t = inits[q.input[2]] if has_zp else None
    elem = zp_t.data_type if zp_t is not None else onnx.TensorProto.UINT8
    if scale.size != 1 or elem not in _INT_RANGES:
        return None
    zp = float(numpy_helper.to_array(zp_t).reshape(-1)[0]) if zp_t is not None else 0.0
    qmin, qmax = _INT_RANGES[elem]
    s = float(scale.reshape(-1)[0])
    new_inits.append(numpy_helper.from_array(np.array((qmin - zp) * s, np.float32), f"{out}_min"))
    new_inits.append(numpy_helper.from_array(np.array((qmax - zp) * s, np.float32), f"{out}_max"))
    return helper.make_node("Clip", [q.input[0], f"{out}_min", f"{out}_max"], [out], name=f"{out}_clip")


def fp32_kernels(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose kernels `names` (from `int8_kernels`) run as fp32 kernels (module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    wanted = set(names)
    inits = {t.name: t for t in g.initializer}
    producers = _producers(g)
    new_inits: list[onnx.TensorProto] = []
    decodes: dict[int, list[onnx.NodeProto]] = {}  # index of the kernel -> nodes inserted before it
    for index, node in enumerate(g.node):
        if node.name not in wanted or node.op_type not in KERNEL_OPS:
            continue
        act = producers.get(node.input[0])
        if act is not None and act.op_type == "DequantizeLinear":
            q = producers.get(act.input[0])
            clip = _activation_clip(q, inits, f"{node.name}_fp32_input", new_inits) if q is not None else None
            if clip is not None:
                decodes[index] = [clip]
                node.input[0] = clip.output[0]
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
