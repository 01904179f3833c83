"""CompressionConfig -> the ordered passes -> the emitted ONNX model.

Order: prune channels (every prunable group keeps the channels chosen by importance, or the
indices given), then quantize weights for the target, each weight's range clipped first
(`passes.clip_weights`, unless the config's weight range is `minmax`), then (ort-cpu / qdq with
calibration data) quantize activations. A fine-tune runs between pruning and quantization: it starts
from the clipped weights (`clip_ranges`) and its result is quantized without clipping again, so the
grids it trained against are the ones emitted. The BlockGraph's normalised model is never modified.
"""
from __future__ import annotations

import functools
import logging
from typing import Mapping, Sequence

import numpy as np
import onnx

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.importance import kept_channels
from hirelc_onnx.specs import fits_ranges, group_keep_counts, int8_kernel, weight_spec, weight_target
from passes.cleanup import cleanup
from passes.clip_weights import clip_weights
from passes.prune_channels import prune_channels
from passes.quantize import WeightQuantSpec
from passes.quantize_activations import quantize_activations
from passes.quantize_weights import quantize_weights
from passes.runner import run_passes

__all__ = ["choose_channels", "clipped_specs", "clip_ranges", "apply_pruning", "quantization_passes",
           "apply_quantization", "apply_config", "finalize"]

log = logging.getLogger(__name__)


def choose_channels(bg: BlockGraph, config: CompressionConfig) -> dict[int, np.ndarray]:
    """Kept channel indices per pruned group: the highest-L1 channels (`importance.channel_ranking`),
    as many as the config keeps."""
    return {gid: kept_channels(bg, gid, count) for gid, count in group_keep_counts(bg, config).items()}


def clipped_specs(bg: BlockGraph, config: CompressionConfig) -> dict[str, WeightQuantSpec]:
    """Weight name -> spec of the weights whose range `config` clips (none under weight range `minmax`;
    log2 grids never)."""
    if not fits_ranges(bg, config):
        return {}
    return {k.weight: spec for name, k in bg.kernels.items()
            if (spec := weight_spec(k, config.get(name))) is not None and not spec.is_log2}


def clip_ranges(bg: BlockGraph, config: CompressionConfig, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (bg's graph, pruned or trained) with the ranges of the weights `config`
    quantizes clipped (`passes.clip_weights`); `model` itself when nothing is clipped. Fine-tuning
    starts from it, and its result is quantized with `clip=False`: the grids it trained against."""
    specs = clipped_specs(bg, config)
    return clip_weights(model, specs) if specs else model


def apply_pruning(bg: BlockGraph, config: CompressionConfig, keep: Mapping[int, Sequence[int]] | None = None,
                  checking: bool = False) -> onnx.ModelProto:
    """The fp32 model with channels pruned (a copy; fine-tuning works on this graph). When nothing is
    pruned it is `bg.model` itself, not a copy of every weight: callers never modify it."""
    config.validate(bg.kernels)
    keep = choose_channels(bg, config) if keep is None else keep
    if not keep and not checking:
        return bg.model
    return run_passes(bg.model, [functools.partial(prune_channels, keep=keep, analysis=bg.analysis)], checking)


def quantization_passes(bg: BlockGraph, config: CompressionConfig,
                        calib_batches: list[dict[str, np.ndarray]] | None = None, clip: bool = True) -> list:
    """The quantization passes for `config`, in order.

    clip: each weight's range is clipped (`passes.clip_weights`, as the config's weight range says)
    just before it is quantized, one weight at a time (no copy of the model); False for weights
    clipped already (`clip_ranges`, before a fine-tune).

    Each weight is written in its kernel's encoding (`specs.weight_target`: the config's target,
    except embedding tables under ort-cpu, which get the storage encoding). Without activation
    quantization (storage, or no calibration batches) every chosen weight grid is written by the
    weight pass. With it (ort-cpu / qdq and calibration batches), grids ORT can fuse into
    QLinearConv / QGemm (per-tensor, per-channel, log2 up to 4 bits, never an embedding table) are
    pinned inside ORT's static quantization, so ORT stores exactly our integers; the others
    (per-group, log2 above 4 bits, tables) are written by the weight pass and their kernels, like
    the ones the config leaves fp32, are excluded from activation quantization.
    """
    specs, targets = {}, {}
    for name, kernel in bg.kernels.items():
        spec = weight_spec(kernel, config.get(name))
        if spec is not None:
            specs[kernel.weight] = spec
            targets[kernel.weight] = weight_target(kernel, config.target)
    clipped = {w for w, s in specs.items() if not s.is_log2} if clip and fits_ranges(bg, config) else set()
    if not (config.target in ("ort-cpu", "qdq") and calib_batches):
        return _weight_passes(specs, targets, clipped)
    # tables and kernels ORT runs slower in int8 get the storage encoding (specs.int8_kernel)
    int8 = {k.weight for k in bg.kernels.values() if k.weight in specs
            and int8_kernel(k, specs[k.weight], config.target)}
    pinned = {w: s for w, s in specs.items() if w in int8}
    weight_only = {w: s for w, s in specs.items() if w not in int8}
    if config.target == "ort-cpu":  # no int8 kernel for them: the encoding ORT folds at load, not a
        # DequantizeLinear it keeps (a per-group one ran every call: ResNet-20 at 0.5x; OpenVINO
        # refuses one whose blocks do not divide the axis)
        targets = {w: "storage" if w in weight_only else t for w, t in targets.items()}
    unpinned_kernels = [name for name in bg.kernels if bg.kernels[name].weight not in pinned]
    if not pinned:
        return _weight_passes(weight_only, targets, clipped)

    def quantize_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
        known = {n.name for n in model.graph.node}
        model = run_passes(model, _weight_passes(weight_only, targets, clipped))
        decode_nodes = [n.name for n in model.graph.node if n.name not in known]
        return quantize_activations(model, calib_batches, weight_grids=pinned,
                                    nodes_to_exclude=unpinned_kernels + decode_nodes,
                                    clip_grids=sorted(clipped & set(pinned)))

    return [quantize_for_ort]


def _weight_passes(specs: Mapping, targets: Mapping[str, str], clipped: set[str]) -> list:
    """One weight pass per encoding target, for the weights in `specs` (those in `clipped` range-clipped first)."""
    passes = []
    for target in dict.fromkeys(targets[w] for w in specs):
        chosen = {w: s for w, s in specs.items() if targets[w] == target}
        passes.append(functools.partial(quantize_weights, specs=chosen, target=target,
                                        clip=sorted(clipped & set(chosen))))
    return passes


def apply_quantization(bg: BlockGraph, pruned: onnx.ModelProto, config: CompressionConfig,
                       calib_batches: list[dict[str, np.ndarray]] | None = None,
                       checking: bool = False, clip: bool = True) -> onnx.ModelProto:
    """Quantize the (pruned, possibly fine-tuned) fp32 model and finalise it for writing. clip: False
    when its weights were range-clipped before a fine-tune (`clip_ranges`), see `quantization_passes`."""
    passes = quantization_passes(bg, config, calib_batches, clip) + [cleanup, finalize]
    return run_passes(pruned, passes, checking)


def apply_config(bg: BlockGraph, config: CompressionConfig, keep: Mapping[int, Sequence[int]] | None = None,
                 calib_batches: list[dict[str, np.ndarray]] | None = None, checking: bool = False) -> onnx.ModelProto:
    """Prune then quantize: the emitted model for `config` with no fine-tuning in between."""
    return apply_quantization(bg, apply_pruning(bg, config, keep, checking), config, calib_batches, checking)


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as written for the user: value_info dropped (every runtime re-infers shapes,
    and it would cost bytes the report must account for)."""
    del model.graph.value_info[:]
    return model
