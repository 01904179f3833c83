"""CompressionConfig -> the ordered passes -> the emitted ONNX model.

Order: prune channels (every prunable group keeps the channels chosen by importance, or the
indices given), then quantize weights for the target, then (ort-cpu / qdq with calibration data)
quantize activations. The BlockGraph's normalised model is never modified.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import onnx

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.importance import l1_channel_scores, top_channels
from hirelc_onnx.specs import group_keep_counts, weight_spec
from passes.prune_channels import prune_channels

__all__ = ["choose_channels", "apply_pruning", "apply_quantization", "apply_config", "finalize"]

log = logging.getLogger(__name__)


def choose_channels(bg: BlockGraph, config: CompressionConfig) -> dict[int, np.ndarray]:
    """Kept channel indices per pruned group: the highest-L1 channels, as many as the config keeps."""
    return {gid: top_channels(l1_channel_scores(bg, gid), count)
            for gid, count in group_keep_counts(bg, config).items()}


def apply_pruning(bg: BlockGraph, config: CompressionConfig,
                  keep: Mapping[int, Sequence[int]] | None = None) -> onnx.ModelProto:
    """The fp32 model with channels pruned (a copy; fine-tuning works on this graph)."""
    config.validate(bg.kernels)
    keep = choose_channels(bg, config) if keep is None else keep
    return prune_channels(bg.model, keep, bg.analysis)


def apply_quantization(bg: BlockGraph, pruned: onnx.ModelProto, config: CompressionConfig,
                       calib_batches: list[dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """Quantize the (pruned, possibly fine-tuned) fp32 model's weights, then its activations.

    Activations are quantized for `ort-cpu` and `qdq` only when calibration batches are given;
    without them the weights alone are quantized (weight-only QDQ).
    """
    from passes.quantize_weights import quantize_weights

    specs = {}
    for name, kernel in bg.kernels.items():
        spec = weight_spec(kernel, config.get(name))
        if spec is not None:
            specs[kernel.weight] = spec
    model = quantize_weights(pruned, specs, config.target) if specs else pruned
    if config.target in ("ort-cpu", "qdq") and calib_batches:
        from passes.quantize_activations import quantize_activations

        model = quantize_activations(model, calib_batches)
    return model


def apply_config(bg: BlockGraph, config: CompressionConfig, keep: Mapping[int, Sequence[int]] | None = None,
                 calib_batches: list[dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """Prune then quantize: the emitted model for `config` with no fine-tuning in between."""
    return finalize(apply_quantization(bg, apply_pruning(bg, config, keep), config, calib_batches))


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as written for the user: value_info dropped (every runtime re-infers shapes,
    and it would cost bytes the report must account for)."""
    del model.graph.value_info[:]
    return model
