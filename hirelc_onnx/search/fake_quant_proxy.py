"""The proxy's model for a config, built by swapping weights instead of running the emitted rewrite.

`SearchContext.proxy` needs the function the compressed model computes, not its stored encoding.
The emitted rewrite (`apply.apply_config`) writes each quantized weight as integers plus decode
nodes, raises the opset, runs the checker and cleans up: about 1 s per candidate on
EfficientNet-Lite0, a third of a proxy score, paid ~100 times a HiReLC search. The decode computes
exactly `passes.quantize.fake_quantize(weight, spec)` of the weight as the pass clipped its range
(`passes.clip_weights`, under weight range `mse`) (both are (q - zp) * scale in float32, or a
log2 codebook times a scale), and ORT folds it into that float32 constant at load. So the proxy
model here is the fp32 graph (channels pruned by the same pass when the config prunes) with each
quantized weight initializer replaced by its fake-quantized values: the same logits, with no decode
nodes, checker or version converter. An unpruned weight's fake-quantized tensor depends only on
(weight, spec), so it is cached across candidates (a byte-bounded LRU): probes and later candidates
share most kernels' choices. A test checks the proxy figures against the rewrite's. Under ort-cpu
and qdq the proxy's rewrite has no calibration batches, so its activations stay float and only the
weights are quantized, as here: on EfficientNet-Lite0 (4 random configs at 4-8 and 32 bits, 32 photo
crops) the logits differed by at most 8.6e-6 (7.5e-7 of the largest) and top-1 agreed on every crop.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
from onnx import numpy_helper

from hirelc_onnx.apply import apply_pruning
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.specs import fits_ranges, weight_spec
from hirelc_onnx.search.range_fits import RangeFits
from passes.clip_weights import mse_clipped
from passes.quantize import WeightQuantSpec, fake_quantize

__all__ = ["FakeQuantModels"]

CACHE_BYTES = 256 << 20
"""Fake-quantized tensors kept at most (float32 bytes); the oldest used is dropped first."""


class FakeQuantModels:
    """Builds `model(config)`: the function of `apply_config(bg, config)` as an fp32 graph (module docstring)."""

    def __init__(self, bg: BlockGraph, cache_bytes: int = CACHE_BYTES, fits: RangeFits | None = None) -> None:
        """fits: the search's shared range fits (the estimator's error table asks for the same)."""
        self.bg = bg
        self.fits = fits if fits is not None else RangeFits()
        self.cache_bytes = cache_bytes
        self._shapes = {init.name: tuple(init.dims) for init in bg.model.graph.initializer}
        self._cache: OrderedDict[tuple[str, WeightQuantSpec, bool], onnx.TensorProto] = OrderedDict()
        self._cached_bytes = 0
        self.hits = 0
        self.misses = 0

    def model(self, config: CompressionConfig) -> onnx.ModelProto:
        """The (pruned) fp32 model with every weight `config` quantizes replaced by its fake-quantized values."""
        specs = {k.weight: spec for name, k in self.bg.kernels.items()
                 if (spec := weight_spec(k, config.get(name))) is not None}
        clip = fits_ranges(self.bg, config)  # mse_clipped leaves a log2 grid's weight as it is
        pruned = apply_pruning(self.bg, config)  # bg.model itself when nothing is pruned: copied below
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
        for init in out.graph.initializer:
            spec = specs.get(init.name)
            if spec is not None:
                init.CopyFrom(self._fake_quantized(init, spec, clip))
        return out

    def _fake_quantized(self, init: onnx.TensorProto, spec: WeightQuantSpec, clip: bool) -> onnx.TensorProto:
        """`init` fake-quantized by `spec`, its range clipped first when `clip` (as the weight pass does);
        cached when the weight is unpruned (its values are then fixed)."""
        if tuple(init.dims) != self._shapes.get(init.name):  # pruned: values depend on the kept channels
            return numpy_helper.from_array(self._values(init, spec, clip, fixed=False), init.name)
        key = (init.name, spec, clip)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        tensor = numpy_helper.from_array(self._values(init, spec, clip, fixed=True), init.name)
        size = len(tensor.raw_data)
        if size <= self.cache_bytes:
            while self._cache and self._cached_bytes + size > self.cache_bytes:
                self._cached_bytes -= len(self._cache.popitem(last=False)[1].raw_data)
            self._cache[key] = tensor
            self._cached_bytes += size
        return tensor

    def _values(self, init: onnx.TensorProto, spec: WeightQuantSpec, clip: bool, fixed: bool) -> np.ndarray:
        """The fake-quantized values; a `fixed` (unpruned) weight's range search is shared (`self.fits`),
        a pruned one's is searched for these channels alone."""
        w = numpy_helper.to_array(init)
        if clip:
            w = self.fits.clipped(init.name, w, spec) if fixed else mse_clipped(w, spec)
        return np.ascontiguousarray(fake_quantize(w, spec))
