"""ONNX -> BlockGraph: kernels, blocks, channel groups, and the cost model."""
from hirelc_onnx.graph.blockgraph import Block, BlockGraph, Kernel, build_block_graph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.graph.loader import load_model

__all__ = ["Block", "BlockGraph", "Kernel", "ModelCost", "build_block_graph", "load_model", "model_cost",
           "import_model"]


def import_model(path) -> BlockGraph:
    """Load an ONNX file and build its BlockGraph (the entry point most callers want)."""
    return build_block_graph(load_model(path))
