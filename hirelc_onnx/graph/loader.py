"""Load an ONNX file with one-line errors for every way a user's file can be wrong.

The one loader for a user's model: external-data locations are checked to stay inside the model's
folder (symlinks followed) before any external byte is read, so a downloaded model cannot make the
tool read another file of the user's.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx.helper
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_tensor

from hirelc_onnx.errors import ModelLoadError
from hirelc_onnx.graph.external_data import serialized_nbytes
from hirelc_onnx.memory import bound_heap

__all__ = ["load_model", "all_tensors", "check_external_locations", "check_file_external_locations",
           "check_tensor_payloads"]

log = logging.getLogger(__name__)


def load_model(path: str | Path, load_external_data: bool = True, check: bool = True,
               weights: bool = True) -> onnx.ModelProto:
    """Read `path` (external-data files next to it too) and check it is a usable ONNX model.

    weights=False leaves the big kernel weights kept in external data unread: they become shells
    (dims and type, no bytes, `graph.external_data.is_shell`), enough for shapes, params, MACs
    and bytes (inspect) but not for running or rewriting the model. Every other external tensor
    is read. Every failure is a ModelLoadError whose message names the file and the problem.
    """
    path = Path(path)
    bound_heap()  # each weight is read into a bytes object, then copied into the model: free it for real
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not an ONNX model (protobuf decode failed: {exc or 'truncated?'})") from None
    except Exception as exc:  # protobuf's C++ layer raises assorted types on garbage
        raise ModelLoadError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph found; truncated or another format?)")
    if not model.opset_import:
        raise ModelLoadError(f"{path} has no opset_import; not a valid ONNX model")
    check_external_locations(model, path)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model.graph))
    shells = set() if weights else _unread_weights(model)
    if load_external_data:
        try:
            for tensor in all_tensors(model.graph):  # each external tensor read once, straight into place
                if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name not in shells:
                    load_external_data_for_tensor(tensor, str(path.parent))
                    tensor.ClearField("data_location")  # as if it had been inline (onnx sets DEFAULT)
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{path}: external weight file missing: {exc.filename}") from None
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read external weights ({exc})") from None
    check_tensor_payloads(model, path)
    if check:
        try:
            # the checker copies a ModelProto it is given twice (serialized, then parsed in C++): a
            # big model is checked from its file instead (external weights are not read at all)
            if external or serialized_nbytes(model) > _CHECK_FROM_FILE_BYTES:
                onnx.checker.check_model(str(path))
            else:
                onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, UnicodeDecodeError) as exc:  # the latter: names that are not UTF-8
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
            raise ModelLoadError(f"{path} is not a valid ONNX model: {first}") from None
    if load_external_data:
        for tensor in model.graph.initializer:
            if tensor.name in shells:
                del tensor.external_data[:]  # a shell: no reader can follow it to a file
    log.debug("loaded %s (ir %d, opsets %s, %d weights unread)", path, model.ir_version,
              {o.domain or "ai.onnx": o.version for o in model.opset_import}, len(shells))
    return model


_CHECK_FROM_FILE_BYTES = 64 << 20

# ops whose second input is the weight the BlockGraph reads only the shape of
_KERNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_SHELL_MIN_BYTES = 64 << 10


def _unread_weights(model: onnx.ModelProto) -> set[str]:
    """Names of external initializers of at least 64 KiB used only as a kernel's weight input, by
    kernels no BatchNormalization follows (folding one reads the weight): left unread."""
    graph = model.graph
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))
    outputs = {o.name for o in graph.output}
    chosen = set()
    for t in graph.initializer:
        uses = consumers.get(t.name, [])
        if (t.data_location != onnx.TensorProto.EXTERNAL or t.name in outputs or not uses
                or 4 * math.prod(t.dims) < _SHELL_MIN_BYTES):
            continue
        if all(node.op_type in _KERNEL_OPS and node.domain in ("", "ai.onnx") and idx == 1
               and not any(c.op_type == "BatchNormalization" for out in node.output for c, _ in consumers.get(out, []))
               for node, idx in uses):
            chosen.add(t.name)
    return chosen


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers (sparse ones too) and tensor attributes, subgraphs included: where external data can live."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_tensors(sub)


def check_external_locations(model: onnx.ModelProto, path: str | Path) -> None:
    """Refuse (ModelLoadError) any external-data location that resolves outside the folder of `path`.

    `../x`, absolute paths and symlinks leading out of the folder are all refused; nothing is read.
    """
    path = Path(path)
    folder = path.parent.resolve()
    for tensor in all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} keeps its data externally but names no location")
        try:
            target = (folder / location).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has an unusable external-data location "
                                 f"{location!r} ({exc}); refused") from None
        if target == folder or not target.is_relative_to(folder):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                                 f"model's folder {folder}; refused (external data must stay beside the model)")


def check_file_external_locations(path: str | Path) -> None:
    """check_external_locations for a file another reader (ONNX Runtime) will open itself.

    A file protobuf cannot parse is left to that reader, whose error the caller already reports.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX protobuf (e.g. an ORT-format file): nothing here to check
        return
    check_external_locations(model, path)


# element types narrower than a byte: raw_data holds ceil(n * bits / 8) bytes
_SUB_BYTE_BITS = {name: bits for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2),
                                                ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
                  if hasattr(onnx.TensorProto, name)}
_SUB_BYTE = {getattr(onnx.TensorProto, name): bits for name, bits in _SUB_BYTE_BITS.items()}
_COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)


def _payload_problem(t: onnx.TensorProto) -> str | None:
    """Why `t`'s stored data cannot be its dims of its element type, or None when it fits."""
    try:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        itemsize = 0 if t.data_type == onnx.TensorProto.STRING else onnx.helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return f"has an unknown element type ({t.data_type})"
    if any(d < 0 for d in t.dims):
        return f"has negative dims {list(t.dims)}"
    numel = math.prod(t.dims)
    if t.HasField("raw_data"):
        if t.data_type == onnx.TensorProto.STRING:
            return "is a string tensor stored as raw bytes"
        bits = _SUB_BYTE.get(t.data_type)
        want = (numel * bits + 7) // 8 if bits else numel * itemsize
        if len(t.raw_data) != want:
            return (f"holds {len(t.raw_data)} bytes but dims {list(t.dims)} of "
                    f"{onnx.helper.tensor_dtype_to_string(t.data_type)} need {want}")
        return None
    count = len(getattr(t, field))
    if t.data_type in _SUB_BYTE:
        return None if (numel == 0) == (count == 0) and count <= numel else \
            f"holds {count} values, which cannot be dims {list(t.dims)}"
    want = numel * (2 if t.data_type in _COMPLEX else 1)
    if count != want:
        return (f"holds {count} values but dims {list(t.dims)} of "
                f"{onnx.helper.tensor_dtype_to_string(t.data_type)} need {want}")
    return None


def check_tensor_payloads(model: onnx.ModelProto, path: str | Path) -> None:
    """Refuse (ModelLoadError) a tensor (initializer, constant, subgraph's) whose data disagrees with its dims or type.

    The checker lets some of these through (a FLOAT initializer relabelled BFLOAT16, dims doubled),
    and the passes would then fail deep inside with a traceback. Sizes are compared, nothing is copied;
    tensors whose data is still external (not loaded) are skipped.
    """
    for t in all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        problem = _payload_problem(t)
        if problem:
            raise ModelLoadError(f"{path}: tensor {t.name!r} {problem}; the file is damaged or mislabelled")
