"""Apply a list of passes in order; in checking mode validate the model after each one.

A pass here is any callable `ModelProto -> ModelProto` with a `__name__` (or a `name`), so plain
functions (`prune_channels` bound with functools.partial, `quantize_weights`, `cleanup`) compose
with onnx-ir pass objects wrapped by `ir_pass`.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import onnx

__all__ = ["PassCheckError", "run_passes", "check_model", "ir_pass"]

log = logging.getLogger(__name__)
ModelPass = Callable[[onnx.ModelProto], onnx.ModelProto]


class PassCheckError(RuntimeError):
    """A pass produced a model that fails the checker or does not load in ONNX Runtime."""


def _name(p: ModelPass) -> str:
    if isinstance(p, functools.partial):
        return _name(p.func)
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """Full onnx checker (with shape inference) and an ORT session; raise PassCheckError on failure."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise PassCheckError(f"{where}: onnx checker failed: {str(exc).splitlines()[0]}") from exc
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassCheckError(f"{where}: ONNX Runtime refused the model: {str(exc).splitlines()[0]}") from exc


def run_passes(model: onnx.ModelProto, passes: Sequence[ModelPass], checking: bool = False) -> onnx.ModelProto:
    """Run `passes` in order on `model`; with `checking`, validate after every pass."""
    for p in passes:
        model = p(model)
        log.debug("ran pass %s", _name(p))
        if checking:
            check_model(model, f"after pass {_name(p)}")
    return model


def ir_pass(pass_obj) -> ModelPass:
    """Wrap an onnx-ir pass object as a ModelProto -> ModelProto callable."""
    import onnx_ir as ir

    def run(model: onnx.ModelProto) -> onnx.ModelProto:
        ir_model = ir.from_proto(model)
        pass_obj(ir_model)
        return ir.to_proto(ir_model)

    run.__name__ = type(pass_obj).__name__
    return run
