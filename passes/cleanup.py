"""Clean-up passes: dead nodes, unused initializers and opsets, identities (onnx-ir's own passes).

BatchNorm folding lives in `passes.normalize` (onnxscript's rewrite rules), where it runs on import.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

__all__ = ["cleanup"]


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy without identities, nodes nothing depends on, unused initializers and opsets.

    RemoveUnusedNodesPass also drops initializers no node reads (graph inputs are kept).
    """
    ir_model = ir.from_proto(model)
    ir.passes.Sequential(IdentityEliminationPass(), RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass())(ir_model)
    return ir.to_proto(ir_model)
