"""Each weight's MSE-fitted range fractions, found once per search and shared.

Under weight range `mse` every quantized weight is clamped before its grid is fitted
(`passes.clip_weights`), and finding each group's fraction is the dear part: 21 trial
quantizations of the whole weight. A search asks for the same (weight, spec) twice over: the
estimator's error table (`features.WeightPerturbation`) and the proxy's fake-quantized models
(`fake_quant_proxy.FakeQuantModels`). Profiled on one MiniLM HiReLC search, the two spent about
140 s and 130 s repeating each other's answers on the 30522x384 embedding table among others.
The answer is a byte a group, so it is kept for every (weight, spec) asked; clamping again is one
pass over the weight.
"""
from __future__ import annotations

import numpy as np

from passes.clip_weights import best_fractions, clamped_to
from passes.quantize import WeightQuantSpec

__all__ = ["RangeFits"]


class RangeFits:
    """`clipped(name, w, spec)`: `passes.clip_weights.mse_clipped(w, spec)`, its search done once per
    (weight name, shape, spec). The weight's sum is kept beside the answer and checked, so a caller
    that hands a different array under the same name gets a fresh search, never a stale one."""

    def __init__(self) -> None:
        self._fits: dict[tuple, tuple[float, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    def clipped(self, name: str, w: np.ndarray, spec: WeightQuantSpec) -> np.ndarray:
        if spec.is_log2:
            return w
        w = np.asarray(w, np.float32)
        key = (name, w.shape, spec)
        checksum = float(np.sum(w, dtype=np.float64))
        known = self._fits.get(key)
        if known is not None and known[0] == checksum:
            self.hits += 1
            fractions = known[1]
        else:
            self.misses += 1
            fractions = best_fractions(w, spec)
            self._fits[key] = (checksum, fractions)
        return clamped_to(w, spec, fractions)
