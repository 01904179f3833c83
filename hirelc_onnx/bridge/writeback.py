"""Trained torch weights back into the ONNX initializers, by name, leaving the graph untouched.

A re-export would rename tensors, change the op set and lose the passes' work; writing the
latent fp32 tensors into the initializers they came from keeps every node, name and attribute,
so the caller can run the quantization pass on the trained weights as on any fp32 model.
"""
from __future__ import annotations

import logging

import onnx
from onnx import helper, numpy_helper
from torch import nn

from hirelc_onnx.bridge.convert import BridgeError, bindings, latent, onnx_layout

__all__ = ["write_back"]

log = logging.getLogger(__name__)


def write_back(model: onnx.ModelProto, module: nn.Module) -> onnx.ModelProto:
    """A copy of `model` whose bound float initializers hold `module`'s latent (unquantized) weights.

    `module` must come from `to_torch` on this model (or one with the same initializer names and
    shapes: the pruned graph it was converted from). Fake-quant parametrizations are looked
    through: the fp32 latent weight is written, not its quantized value.
    """
    table = bindings(module)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    written = 0
    for init in out.graph.initializer:
        b = table.get(init.name)
        if b is None:
            continue
        arr = onnx_layout(b, latent(module, b)).detach().cpu().numpy()
        if arr.shape != tuple(init.dims):
            raise BridgeError(f"cannot write {init.name!r} back: the module holds shape {arr.shape}, "
                              f"the model {tuple(init.dims)} (convert the model you write back into)")
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(numpy_helper.from_array(arr.astype(dtype, order="C"), init.name))
        written += 1
    log.debug("wrote %d initializers back", written)
    return out
