"""Numbers the search learns from: kernel features, weight-perturbation tables, config encodings.

Three consumers share them:
  * the environments observe each kernel through `kernel_features` (static shape facts) and
    `encode_choice` (what is currently chosen for it);
  * the cold-start accuracy estimator (`surrogate.ProxyEstimator`) needs how much a choice
    perturbs a weight: `WeightPerturbation` measures it on the real weights with the same numpy
    quantizer the quantization pass uses, so "4 bits per-group" means exactly what will be emitted;
  * the MLP surrogate reads a fixed-length summary of a whole config (`config_features`).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import replace

import numpy as np
from onnx import numpy_helper

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost
from hirelc_onnx.importance import channel_ranking
from hirelc_onnx.search.range_fits import RangeFits
from hirelc_onnx.specs import fits_ranges, group_keep_counts, keep_count, weight_spec
from passes.quantize import fake_quantize

__all__ = ["STATIC_FEATURES", "CHOICE_FEATURES", "config_key", "is_prunable", "kernel_features", "encode_choice",
           "aggressiveness", "effective_keep", "WeightPerturbation", "config_features"]

log = logging.getLogger(__name__)

STATIC_FEATURES = 7  # columns of kernel_features
CHOICE_FEATURES = 4  # columns of encode_choice
_LOG2_FP32 = 5.0  # log2(32): bits are encoded on a log scale, 32 bits -> 1


def config_key(config: CompressionConfig) -> str:
    """A stable hash of a config: the cache key of every evaluation (proxy, surrogate, real).

    Kernels left at the fp32 default are skipped, so an explicit and an omitted fp32 entry hash
    alike. Built from tuples rather than `to_dict`: agents compute thousands of keys a round.
    """
    items = sorted((n, k.bits, float(k.keep_ratio), k.qtype, k.granularity, k.group_size)
                   for n, k in ((n, effective_kernel(k)) for n, k in config.kernels.items()) if k != _FP32)
    return hashlib.sha1(repr((config.target, items)).encode()).hexdigest()


def model_key(bg: BlockGraph, config: CompressionConfig) -> str:
    """`config_key` of the model `config` emits on `bg`: each kernel's keep ratio replaced by what its
    channel group really keeps (the largest its producers ask for, rounded to the channel multiple;
    1 for a kernel whose group is not pruned). Two configs with one model_key are one model: a search
    checks it before it spends a real evaluation (EfficientNet-Lite0: a pool config whose one changed
    keep ratio rounded to the prior's channel count was the prior, measured again)."""
    counts = group_keep_counts(bg, config)
    kernels = {}
    for name, kc in config.kernels.items():
        group = bg.kernels[name].group if name in bg.kernels else None
        if group is not None and bg.groups[group].prunable and name in bg.groups[group].producers:
            length = bg.groups[group].length
            keep = counts.get(group, length) / length
        else:
            keep = 1.0
        kernels[name] = kc if kc.keep_ratio == keep else replace(kc, keep_ratio=keep)
    return config_key(CompressionConfig(kernels, target=config.target))


_FP32 = KernelConfig()


def effective_kernel(k: KernelConfig) -> KernelConfig:
    """`k` with the fields that cannot change the emitted model at their defaults: an fp32 kernel's grid
    (qtype, granularity, group size), a group size outside per-group granularity. Configs that differ
    only there are one model: one key, so a search never measures (or proxy-scores) it twice."""
    grid = (k.qtype, k.granularity, k.group_size)
    if k.bits == 32 and grid != (_FP32.qtype, _FP32.granularity, _FP32.group_size):
        return replace(k, qtype=_FP32.qtype, granularity=_FP32.granularity, group_size=_FP32.group_size)
    if k.granularity != "per-group" and k.group_size != _FP32.group_size:
        return replace(k, group_size=_FP32.group_size)
    return k


def is_prunable(bg: BlockGraph, name: str) -> bool:
    """Whether a kernel's output channels lie in a channel group that may be pruned."""
    group = bg.kernels[name].group
    return group is not None and bg.groups[group].prunable


def kernel_features(bg: BlockGraph) -> dict[str, np.ndarray]:
    """Per kernel, in [0, 1]: log params, MACs share, log fan-in, log fan-out, position, prunable, bytes share.

    Log scales and shares make the features comparable across models of very different sizes,
    so an agent's observation means the same thing on ResNet-20 and on EfficientNet.
    """
    kernels = bg.kernel_list()
    max_params = max(k.params for k in kernels)
    max_macs = max(max(k.macs for k in kernels), 1)
    max_in = max(k.fan_in for k in kernels)
    max_out = max(k.fan_out for k in kernels)
    kernel_bytes = sum(bg.initializer_bytes[k.weight] for k in kernels)
    last = max(len(kernels) - 1, 1)
    return {
        k.name: np.array([
            math.log1p(k.params) / math.log1p(max_params),
            k.macs / max_macs,
            math.log1p(k.fan_in) / math.log1p(max_in),
            math.log1p(k.fan_out) / math.log1p(max_out),
            k.index / last,
            float(is_prunable(bg, k.name)),
            bg.initializer_bytes[k.weight] / max(kernel_bytes, 1),
        ], dtype=np.float32)
        for k in kernels
    }


def encode_choice(kc: KernelConfig, granularities: tuple[str, ...]) -> np.ndarray:
    """A kernel's current choice as numbers: log2(bits)/5, keep ratio, asymmetric flag, granularity index."""
    gran = granularities.index(kc.granularity) if kc.granularity in granularities else 0
    return np.array([math.log2(kc.bits) / _LOG2_FP32, kc.keep_ratio, float(kc.qtype == "asymmetric"),
                     gran / max(len(granularities) - 1, 1)], dtype=np.float32)


def aggressiveness(kc: KernelConfig, min_keep: float) -> float:
    """How hard a choice compresses a kernel, in [0, 1]: half from bits (32 -> 0, 2 -> 0.5), half from pruning.

    The sensitivity penalty multiplies this by the kernel's sensitivity, so aggressive choices
    cost most where Fisher (or the probe) says the model is fragile.
    """
    bits_part = (_LOG2_FP32 - math.log2(kc.bits)) / (_LOG2_FP32 - 1.0)
    keep_part = (1.0 - kc.keep_ratio) / max(1.0 - min_keep, 1e-9)
    return 0.5 * min(max(bits_part, 0.0), 1.0) + 0.5 * min(max(keep_part, 0.0), 1.0)


def effective_keep(bg: BlockGraph, config: CompressionConfig) -> dict[str, float]:
    """The fraction of output channels each kernel really keeps: a group keeps its producers' largest ratio."""
    counts = group_keep_counts(bg, config)
    keep = {}
    for name, k in bg.kernels.items():
        if k.group is not None and k.group in counts:
            keep[name] = counts[k.group] / bg.groups[k.group].length
        else:
            keep[name] = 1.0
    return keep


class WeightPerturbation:
    """Relative squared weight error ||W' - W||^2 / ||W||^2 that a choice inflicts on one kernel.

    Quantization error comes from `passes.quantize.fake_quantize` of the weight with its range clipped
    as the run's weight range says (the emitted arithmetic, `passes.clip_weights`);
    pruning error is the energy of the output channels `apply` removes: the tail of the group's
    `importance.channel_ranking`, the channel choice pruning itself uses. Both are cached per
    (kernel, choice): the table is what makes a reward evaluation cost microseconds instead of an
    ONNX Runtime session.
    """

    def __init__(self, bg: BlockGraph, fits: RangeFits | None = None) -> None:
        """fits: the search's shared range fits (the proxy's fake-quantized models ask for the same)."""
        self.bg = bg
        self.fits = fits if fits is not None else RangeFits()
        inits = {t.name: t for t in bg.model.graph.initializer}
        self._weights = {name: numpy_helper.to_array(inits[k.weight]).astype(np.float32)
                         for name, k in bg.kernels.items()}
        self._quant: dict[tuple, float] = {}
        self._dropped_energy: dict[str, np.ndarray] = {}

    def quant(self, name: str, kc: KernelConfig) -> float:
        """Relative error of quantizing kernel `name` as `kc` says (0 for fp32)."""
        if not kc.quantized:
            return 0.0
        key = (name, kc.bits, kc.qtype, kc.granularity, kc.group_size)
        if key not in self._quant:
            w = self._weights[name]
            spec = weight_spec(self.bg.kernels[name], kc)
            weight = self.bg.kernels[name].weight
            ranged = self.fits.clipped(weight, w, spec) if fits_ranges(self.bg) else w  # log2: w itself
            err = float(np.sum((w - fake_quantize(ranged, spec)) ** 2))
            self._quant[key] = err / max(float(np.sum(w * w)), 1e-30)
        return self._quant[key]

    def prune(self, name: str, keep: float) -> float:
        """Relative energy of kernel `name`'s output channels dropped when its group keeps `keep` of them
        (0 when the kernel's channels cannot be pruned)."""
        if keep >= 1.0 or not is_prunable(self.bg, name):
            return 0.0
        if name not in self._dropped_energy:
            k = self.bg.kernels[name]
            w = np.moveaxis(self._weights[name], k.channel_axis, 0).reshape(k.weight_shape[k.channel_axis], -1)
            least_first = channel_ranking(self.bg, k.group)[::-1]  # the order pruning drops them in
            energy = (w * w).sum(axis=1)[least_first]
            self._dropped_energy[name] = np.concatenate([[0.0], np.cumsum(energy)]) / max(energy.sum(), 1e-30)
        cum = self._dropped_energy[name]
        channels = len(cum) - 1
        return float(cum[channels - keep_count(keep, channels)])

    def kernel(self, name: str, kc: KernelConfig, keep: float) -> tuple[float, float]:
        """(quantization error on the kept weights, pruning error) of kernel `name` under choice `kc`,
        its group keeping `keep` of its channels."""
        pruned = self.prune(name, keep)
        return (1.0 - pruned) * self.quant(name, kc), pruned

    def components(self, config: CompressionConfig) -> dict[str, tuple[float, float]]:
        """Per kernel `kernel(...)` under `config`, each group keeping what `apply` keeps of it."""
        keep = effective_keep(self.bg, config)
        return {name: self.kernel(name, config.get(name), keep[name]) for name in self.bg.kernels}


def config_features(bg: BlockGraph, config: CompressionConfig, cost: ModelCost, proxy_mse: float,
                    proxy_agreement: float, sensitivity: dict[str, float], min_keep: float) -> np.ndarray:
    """A fixed-length summary of a config for the MLP surrogate.

    Global: log10 of the estimated proxy logit-MSE, the estimated agreement, log ratio, MACs
    fraction, bytes-weighted mean bits and keep, sensitivity-weighted aggressiveness, shares of
    asymmetric / per-group / log2 kernels; then per block its bytes-weighted mean bits and keep.
    The surrogate learns the gap between what the cold-start proxy predicts and what fine-tuning
    really recovers, so the proxy's own estimate is a feature.
    """
    weights = {n: bg.initializer_bytes[k.weight] for n, k in bg.kernels.items()}
    total = max(sum(weights.values()), 1)
    bits = {n: math.log2(config.get(n).bits) / _LOG2_FP32 for n in bg.kernels}
    keep = {n: config.get(n).keep_ratio for n in bg.kernels}
    sens_total = max(sum(sensitivity.get(n, 0.0) for n in bg.kernels), 1e-9)
    glob = [
        math.log10(max(proxy_mse, 1e-6)) / 6.0,
        proxy_agreement,
        math.log(max(cost.ratio, 1e-9)) / math.log(32.0),
        cost.macs_fraction,
        sum(weights[n] * bits[n] for n in bg.kernels) / total,
        sum(weights[n] * keep[n] for n in bg.kernels) / total,
        sum(sensitivity.get(n, 0.0) * aggressiveness(config.get(n), min_keep) for n in bg.kernels) / sens_total,
        float(np.mean([config.get(n).qtype == "asymmetric" for n in bg.kernels])),
        float(np.mean([config.get(n).granularity == "per-group" for n in bg.kernels])),
        float(np.mean([config.get(n).granularity == "log2" for n in bg.kernels])),
    ]
    per_block = []
    for block in bg.blocks:
        w = max(sum(weights[n] for n in block.kernels), 1)
        per_block.append(sum(weights[n] * bits[n] for n in block.kernels) / w)
        per_block.append(sum(weights[n] * keep[n] for n in block.kernels) / w)
    return np.asarray(glob + per_block, dtype=np.float64)
