"""Independent oracles shared by tests: masked-channel models, random weights, ORT runs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from passes.channel_groups import ChannelAnalysis


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace float initializers with seeded random values so channel mix-ups show.

    BatchNorm variances stay positive; weights are scaled by fan-in so activations stay finite.
    """
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    bn_var = {n.input[4] for n in out.graph.node if n.op_type == "BatchNormalization" and len(n.input) > 4}
    for idx, t in enumerate(out.graph.initializer):
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) == 0:
            continue
        shape = tuple(t.dims)
        if t.name in bn_var:
            arr = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
            arr = rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
        else:
            arr = rng.uniform(-0.5, 0.5, shape) + (1.0 if "scale" in t.name or "_s_" in t.name else 0.0)
        out.graph.initializer[idx].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), t.name))
    return out


def masked_model(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> onnx.ModelProto:
    """The unpruned model with every tensor of each pruned group multiplied by a 0/1 channel mask."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    masks: dict[str, np.ndarray] = {}
    for gid, kept in keep.items():
        group = analysis.groups[gid]
        dropped = np.setdiff1d(np.arange(group.length), kept)
        for t in group.tensors:
            cmap = analysis.maps[t]
            m = masks.setdefault(t, np.ones(cmap.channels * cmap.repeat, np.float32))
            for off, seg in cmap.offsets():
                if seg.source in group.sources:
                    pos = ((off + dropped)[:, None] * cmap.repeat + np.arange(cmap.repeat)).reshape(-1)
                    m[pos] = 0.0
    new_nodes = []
    for node in g.node:
        new_nodes.append(node)
        for o in node.output:
            if o not in masks:
                continue
            cmap = analysis.maps[o]
            shape = [1] * cmap.rank
            shape[cmap.axis] = masks[o].size
            g.initializer.append(numpy_helper.from_array(masks[o].reshape(shape), f"{o}__mask"))
            new_nodes.append(helper.make_node("Mul", [o, f"{o}__mask"], [f"{o}__masked"], name=f"{o}__maskmul"))
    renames = {o: f"{o}__masked" for o in masks}
    for node in new_nodes:
        if node.op_type == "Mul" and node.name.endswith("__maskmul"):
            continue
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    del g.node[:]
    g.node.extend(new_nodes)
    for o in g.output:
        assert o.name not in renames, "a masked tensor is a graph output"
    del g.value_info[:]
    return out


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds
