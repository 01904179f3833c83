"""Which runtimes load a model file: tried for real where the runtime is installed, else stated from the file.

A compressed file may need a recent opset and sub-byte element types (INT4, INT2) that a runtime
refuses. ONNX Runtime (a dependency) is always tried: a session at its default (full) graph
optimisation, as a user deploys it. OpenVINO (the optional `openvino` extra) is tried when it can
be imported (read and compiled for its CPU plugin); otherwise the answer is inferred from the
element types, from what docs/ARCHITECTURE.md records of OpenVINO 2026.4 (it refuses INT2 / UINT2,
runs the INT4 / INT8 casts and the 2-bit unpacking), and says it was not tried.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import onnxruntime as ort

__all__ = ["OPENVINO_F32", "runtime_support"]

_OPENVINO_REFUSES = frozenset({"INT2", "UINT2"})
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
"""OpenVINO CPU plugin config for comparing outputs with ONNX Runtime. On a CPU with native bf16 and
int8 matrix units (an AMX Xeon) the plugin's defaults compute an fp32 graph in bf16 (the fp32 ResNet-20
differed from ORT by ~5e-3; within 1e-4 on an AVX2 EPYC) and quantize the activations of layers whose
weights are stored as integers (`storage` models: 3.4e-2 from ORT's logits at 8 bits); these two
settings turn both off, so what is compared is the model, not the plugin's own approximations."""


def runtime_support(path: str | os.PathLike, element_types: Iterable[str]) -> list[dict]:
    """One entry per runtime: {"runtime", "version", "loads" (True / False / None: not tried),
    "how" (what was done), "error" (the first line of a refusal, when one came)}."""
    types = set(element_types)
    return [_onnxruntime(path), _openvino(path, types)]


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def _onnxruntime(path: str | os.PathLike) -> dict:
    entry = {"runtime": "onnxruntime", "version": ort.__version__,
             "how": "tried: an InferenceSession on the CPU provider at the default graph optimisation"}
    try:
        ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own assorted types for a model it refuses
        return {**entry, "loads": False, "error": _first_line(exc)}
    return {**entry, "loads": True}


def _openvino(path: str | os.PathLike, types: set[str]) -> dict:
    try:
        import openvino
    except ImportError:
        refused = sorted(types & _OPENVINO_REFUSES)
        if refused:
            how = (f"not installed, not tried; the file holds {', '.join(refused)} tensors, which OpenVINO 2026.4 "
                   "refuses (\"Unsupported type\")")
            return {"runtime": "openvino", "version": None, "loads": None, "expected": False, "how": how}
        return {"runtime": "openvino", "version": None, "loads": None, "expected": True,
                "how": "not installed, not tried (pip install 'hirelc-onnx[openvino]'); its element types are ones "
                       "OpenVINO 2026.4 runs"}
    entry = {"runtime": "openvino", "version": openvino.__version__.split("-")[0],
             "how": "tried: read_model and compile_model for the CPU plugin"}
    try:
        core = openvino.Core()
        core.compile_model(core.read_model(os.fspath(path)), "CPU")
    except Exception as exc:  # OpenVINO raises RuntimeError (and others) for what it refuses
        return {**entry, "loads": False, "error": _first_line(exc)}
    return {**entry, "loads": True}
