"""Load an ONNX file with one-line errors for every way a user's file can be wrong."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from hirelc_onnx.errors import ModelLoadError

__all__ = ["load_model"]

log = logging.getLogger(__name__)


def load_model(path: str | Path, load_external_data: bool = True, check: bool = True) -> onnx.ModelProto:
    """Read `path` (external-data files next to it too) and check it is a usable ONNX model.

    Every failure is a ModelLoadError whose message names the file and the problem.
    """
    path = Path(path)
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
    if load_external_data:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{path}: external weight file missing: {exc.filename}") from None
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read external weights ({exc})") from None
    if not check:
        return model
    try:
        onnx.checker.check_model(model) if model.ByteSize() < (2 << 30) - 1 else None
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{path} is not a valid ONNX model: {first}") from None
    log.debug("loaded %s (ir %d, opsets %s)", path, model.ir_version,
              {o.domain or "ai.onnx": o.version for o in model.opset_import})
    return model
