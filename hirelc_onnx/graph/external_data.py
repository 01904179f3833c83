"""Models whose weights do not fit one protobuf (2 GiB), or should not be copied: external data.

A ModelProto can only be serialized whole below 2 GiB, and serializing a big one copies every
weight into one bytes object. `save_external` streams each big initializer of the main graph into
one data file beside the model (page-aligned offsets, so ONNX Runtime maps it instead of copying),
and writes a header that refers to it; the model in memory is left untouched (onnx.save would
strip its data). `weight_shells` turns big kernel weights of a model loaded without its external
data into shells (dims and type, no bytes), for commands that only look at shapes.
"""
from __future__ import annotations

import math
import os

import onnx
from onnx import TensorProto

__all__ = ["PROTOBUF_LIMIT", "light_copy", "save_external", "append_initializer", "serialized_nbytes", "is_shell", "decoded_nbytes"]

PROTOBUF_LIMIT = (2 << 30) - 1  # bytes: the most one serialized protobuf message may hold
_ALIGN = 4096


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its main graph's initializers (everything else copied): the structure."""
    out = onnx.ModelProto()
    _copy_all_but_graph(model, out)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    return out


def _copy_field(message, field, value) -> None:
    if not isinstance(value, (str, bytes)) and hasattr(value, "extend"):  # a repeated field
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def save_external(model: onnx.ModelProto, data_path: str | os.PathLike, location: str, *,
                  inline_below: int = 1024) -> onnx.ModelProto:
    """Write the data of every main-graph initializer of at least `inline_below` bytes to `data_path`,
    one tensor at a time, and return the header (the model referring to it as `location`, a name
    relative to the header's folder); the caller writes the header. `model` is not modified."""
    header = light_copy(model)
    with open(data_path, "wb") as fh:
        for t in model.graph.initializer:
            append_initializer(header, t, fh, location, inline_below)
    return header


def append_initializer(header: onnx.ModelProto, tensor: TensorProto, fh, location: str,
                       inline_below: int = 1024) -> None:
    """`tensor` into `header`'s initializers: inline when under `inline_below` bytes (or not raw),
    else its bytes appended page-aligned to the open data file `fh` and a reference to them."""
    if not tensor.HasField("raw_data") or len(tensor.raw_data) < inline_below:
        header.graph.initializer.append(tensor)
        return
    offset = -(-fh.tell() // _ALIGN) * _ALIGN
    fh.seek(offset)
    data = tensor.raw_data  # one tensor's bytes at a time
    fh.write(data)
    ref = header.graph.initializer.add()
    ref.name, ref.data_type = tensor.name, tensor.data_type
    ref.dims.extend(tensor.dims)
    if tensor.doc_string:
        ref.doc_string = tensor.doc_string
    for key, value in (("location", location), ("offset", offset), ("length", len(data))):
        ref.external_data.add(key=key, value=str(value))
    ref.data_location = TensorProto.EXTERNAL


def serialized_nbytes(model: onnx.ModelProto) -> int:
    """`model.ByteSize()` without its cost: protobuf's upb computes a size by serializing the whole
    message (a transient copy of every weight); here only one tensor at a time is."""
    graph = light_copy(model).graph
    graph_size = graph.ByteSize() + sum(_field_nbytes(t.ByteSize()) for t in model.graph.initializer)
    rest = onnx.ModelProto()
    _copy_all_but_graph(model, rest)
    return rest.ByteSize() + (_field_nbytes(graph_size) if model.HasField("graph") else 0)


def _copy_all_but_graph(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)


def _field_nbytes(size: int) -> int:
    """Bytes of a length-delimited field (tag under 16: one byte) holding `size` bytes."""
    return 1 + max(1, -(-size.bit_length() // 7)) + size


def is_shell(tensor: TensorProto) -> bool:
    """A weight left unread by the loader (`load_model(..., weights=False)`): external, no location."""
    return tensor.data_location == TensorProto.EXTERNAL and not any(e.key == "location" for e in tensor.external_data)


def decoded_nbytes(model: onnx.ModelProto) -> int:
    """4 bytes per element of every main-graph initializer: roughly what a runtime holds once the
    weights' decodes are folded back into float32 (ORT does this for the storage target)."""
    return sum(4 * math.prod(t.dims) for t in model.graph.initializer)
