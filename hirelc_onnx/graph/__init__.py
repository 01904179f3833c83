"""ONNX -> BlockGraph: kernels, blocks, channel groups, and the cost model."""
from hirelc_onnx.graph.blockgraph import Block, BlockGraph, Kernel, build_block_graph
from hirelc_onnx.graph.cost import ModelCost, model_cost
from hirelc_onnx.graph.loader import load_model

__all__ = ["Block", "BlockGraph", "Kernel", "ModelCost", "build_block_graph", "load_model", "model_cost",
           "import_model"]


def import_model(path, weights: bool = True) -> BlockGraph:
    """Load an ONNX file and build its BlockGraph (the entry point most callers want).

    weights=False leaves big external kernel weights unread (`load_model`): shapes and sizes only.
    """
    return build_block_graph(load_model(path, weights=weights), inplace=True)
