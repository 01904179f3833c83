"""graph/stored.py: a file's kernels as stored, on weights the sparse pass rewrote (an independent
oracle: the initializers that pass names after each weight)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hirelc_onnx.graph import import_model
from hirelc_onnx.graph.stored import stored_model
from passes.sparse_weights import sparse_weights
from passes.storage import initializer_nbytes, tensor_nbytes


def test_sparse_weights_are_read_as_sparse_with_their_bytes(reference_models):
    bg = import_model(reference_models("resnet20"))
    model = onnx.ModelProto()
    model.CopyFrom(bg.model)
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    thinned = {}
    for i, name in enumerate(list(bg.kernels)[:4]):  # 95% zeros (a delta index) and 60% (a bitmask)
        w = inits[bg.kernels[name].weight]
        a = numpy_helper.to_array(w).copy()
        a[rng.random(a.shape) < (0.95 if i % 2 else 0.6)] = 0
        w.CopyFrom(numpy_helper.from_array(a, w.name))
        thinned[name] = (w.name, int(np.count_nonzero(a)), a.size)
    written = sparse_weights(model)
    stored = stored_model(written)
    assert stored.compressed and stored.weight_bytes == initializer_nbytes(written)
    rows = {k.node: k for k in stored.kernels}
    for name, (weight, nonzero, size) in thinned.items():
        row = rows[name]
        expected = sum(tensor_nbytes(t) for t in written.graph.initializer if t.name.startswith(weight + "_sparse"))
        assert row.sparse and row.encoding.startswith("sparse fp32") and row.bits == 32
        assert row.bytes == expected < 4 * size and row.elements == size
        stored_values = int(row.encoding.split(", ")[1].split("%")[0]) / 100
        assert nonzero / size - 0.005 <= stored_values <= nonzero / size + 0.02  # fillers and a trailing 0 add few
    assert all(not rows[n].sparse and rows[n].encoding == "fp32" for n in bg.kernels if n not in thinned)
