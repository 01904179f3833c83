"""A small transformer-like model whose input is token ids: word and position embedding tables
(Gather on constant 2-D tables), LayerNorm, a residual feed-forward block, mean pooling, a head."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, parser

VOCAB, HIDDEN, MAX_LEN, CLASSES = 1000, 64, 16, 10

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
embed (int64[N,S] ids) => (float[N,10] y) {
  length = Shape <start=1, end=2> (ids)
  count = Squeeze (length)
  positions = Range (zero, count, one)
  word = Gather <axis=0> (Wword, ids)
  place = Gather <axis=0> (Wpos, positions)
  summed = Add (word, place)
  h = LayerNormalization <axis=-1> (summed, gamma, beta)
  up = MatMul (h, W1)
  act = Relu (up)
  down = MatMul (act, W2)
  res = Add (down, h)
  pooled = ReduceMean <axes=[1], keepdims=0> (res)
  y = MatMul (pooled, Whead)
}
"""


def embedding_model(seed: int = 0) -> onnx.ModelProto:
    """The model with seeded random weights (tables ~N(0, 1), others scaled by fan-in)."""
    rng = np.random.default_rng(seed)
    model = parser.parse_model(_TEXT)
    weights = {
        "Wword": rng.standard_normal((VOCAB, HIDDEN)),
        "Wpos": rng.standard_normal((MAX_LEN, HIDDEN)) * 0.1,
        "gamma": 1.0 + 0.1 * rng.standard_normal(HIDDEN),
        "beta": 0.1 * rng.standard_normal(HIDDEN),
        "W1": rng.standard_normal((HIDDEN, 128)) / 8.0,
        "W2": rng.standard_normal((128, HIDDEN)) / 11.0,
        "Whead": rng.standard_normal((HIDDEN, CLASSES)) / 8.0,
    }
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), n) for n, v in weights.items())
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "zero"),
                                    numpy_helper.from_array(np.array(1, np.int64), "one")])
    onnx.checker.check_model(model, full_check=True)
    return model


def token_ids(n: int, length: int = 12, seed: int = 0) -> np.ndarray:
    """n rows of `length` int64 ids below the vocabulary size."""
    return np.random.default_rng(seed).integers(0, VOCAB, (n, length)).astype(np.int64)
