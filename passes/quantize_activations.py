"""Static int8 activation quantization (QDQ) with onnxruntime.quantization, safe on AVX2 CPUs without VNNI.

Used as the ORT int8 baseline and for the `ort-cpu` target on top of the fp32 (pruned) model.

Schemes (activation type / weight type; weights are symmetric per ORT's default):
  u8s8-reduced  uint8 activations, int8 weights on a 7-bit grid (`reduce_range=True`).
  u8u8          uint8 activations, uint8 (asymmetric) weights.
  u8s8          uint8 activations, full-range int8 weights: fine on VNNI / ARM only. On AVX2
                without VNNI the fused kernel sums pairs of u8*s8 products in saturating int16
                (255 * 127 * 2 > 32767): docs/ARCHITECTURE.md measured a ResNet-20 fall from 99.3% to 65.6%.
  s8s8          ORT's own default; x86 leaves parts of it unfused (docs/ARCHITECTURE.md: slower than fp32).

Why the default is u8s8-reduced (measured with ORT 1.32, ORT_ENABLE_ALL, MinMax, per-channel, on
a 5-conv + Gemm CNN trained on sklearn digits to 99.4% on 497 held-out images; every scheme
fuses into QLinearConv; latency is the median over 1-thread runs, relative to fp32):
  scheme         accuracy  top-1 agreement  logit rel-L2  speed b64 / b1
  u8s8-reduced   99.6%     99.8%            0.019         1.86x / 1.33x
  u8u8           99.4%     100%             0.011         0.93x / 0.83x   (slower than fp32)
  u8s8           99.4%     100%             0.011         1.88x / 1.33x
  s8s8           99.4%     100%             0.011         1.86x / 1.33x   (this CPU has VNNI)
u8u8 is accurate but slower than fp32, which the ort-cpu target must not emit; u8s8 is only
safe with VNNI, and s8s8 is left partly unfused on x86 without it (docs/ARCHITECTURE.md). The sandbox CPU
reports avx512_vnni, so the saturation was emulated (vpmaddubsw: adjacent pairs of u8*s8
products summed in saturating int16): with full-range int8 weights 3.4% of the first conv's
product pairs saturate, a 17% accumulator error; 7-bit weights (|w| <= 64) cannot saturate
(2 * 255 * 64 < 32767). The reduced range costs fidelity (rel-L2 0.019 vs 0.011; 0.025 vs
0.013 on a random-weight 4-conv net), not accuracy.

With `weight_grids`, the kernels' weights keep grids chosen elsewhere (a sub-8-bit
`passes.quantize` spec per weight): each weight is first replaced by fake_quantize(W, spec) and
its scale / zero point are handed to ORT as TensorQuantOverrides, so ORT re-derives exactly the
integers `quantize()` gives (checked after quantization; a mismatch raises) and quantizes the
bias with the matching scale. Grids that are one 8-bit DequantizeLinear per tensor or per
channel are accepted (uniform per-tensor / per-channel, and log2 with bits <= 4, stored as in
rule 5 of `passes.quantize_weights`); per-group and wider log2 grids are refused.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper, version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from passes.clip_weights import mse_clipped
from passes.quantize import WeightQuantSpec, fake_quantize, quantize
from passes.quantize_weights import encoding, stored_tensors

__all__ = ["CALIBRATORS", "DEFAULT_SCHEME", "OPENVINO_UNSAFE_OPS", "SCHEMES", "quantize_activations"]

log = logging.getLogger(__name__)

SCHEMES = {  # name -> (activation type, weight type, reduce_range)
    "u8s8-reduced": (QuantType.QUInt8, QuantType.QInt8, True),
    "u8u8": (QuantType.QUInt8, QuantType.QUInt8, False),
    "u8s8": (QuantType.QUInt8, QuantType.QInt8, False),
    "s8s8": (QuantType.QInt8, QuantType.QInt8, False),
}
DEFAULT_SCHEME = "u8s8-reduced"
OPENVINO_UNSAFE_OPS = frozenset({"ReduceMean"})
"""Ops that read their inputs in fp32 (the Quantize / Dequantize ORT puts before them dropped) unless
`op_types` names them: OpenVINO 2026.4 computes ReduceMean behind a Dequantize wrongly (the ViT's
token mean: 22.7% top-1 agreement with ORT on 256 digits, 99.6% with its input fp32; every other
op of the reference models quantized alone agrees 100%); ORT runs ReduceMean in fp32 either way."""
CALIBRATORS = {  # quantize_activations(method=...) -> the ORT calibrator
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class _Batches(CalibrationDataReader):
    """Feeds a list of input dicts to ORT's calibrator, once."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._it = iter([dict(b) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


ORT_OPSET = 13
"""The opset a model is raised to before ORT quantizes it: per-channel DequantizeLinear takes its `axis`
from opset 13 on, and ORT's quantizer writes that attribute into an older model as it is (the onnx
wheel's light SqueezeNet, opset 9: "Unrecognized attribute: axis for operator DequantizeLinear")."""


def _ort_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` at ORT_OPSET at least (onnx's version converter; the input is not modified)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), ORT_OPSET)
    if version >= ORT_OPSET:
        return model
    try:
        return version_converter.convert_version(model, ORT_OPSET)
    except Exception as exc:  # the converter's own errors are of several kinds
        raise ValueError(f"quantize_activations: the model is at opset {version} and onnx's version converter "
                         f"cannot raise it to {ORT_OPSET}, which int8 per-channel quantization needs: {exc}") from exc


_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
_PROBABILITY_OPS = frozenset({"Softmax", "LogSoftmax"})


def _output_probabilities(model: onnx.ModelProto) -> list[str]:
    """Names of the Softmax / LogSoftmax nodes whose result is a graph output (through shape-only ops),
    and of those shape ops: left in fp32. ORT quantizes a Softmax output on a fixed [0, 1] uint8 grid
    (step 1/255), so every probability under 0.002 comes out 0: the onnx wheel's light SqueezeNet, 1000
    classes, returned all zeros. No int8 kernel reads a graph output, so the pair only loses precision."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for out in model.graph.output:
        walked, node = [], producers.get(out.name)
        while node is not None and node.op_type in _SHAPE_OPS:
            walked.append(node)
            node = producers.get(node.input[0]) if node.input else None
        if node is not None and node.op_type in _PROBABILITY_OPS:
            names += [n.name for n in (*walked, node) if n.name]
    return names


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every node named (a copy when one was not): ORT excludes nodes by name."""
    if all(n.name for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            node.name = next(f"_node{i}_{k}" for k in range(len(taken) + 1) if f"_node{i}_{k}" not in taken)
            taken.add(node.name)
    return out


def _fixed_batch(model: onnx.ModelProto, names: Iterable[str]) -> int | None:
    """The batch size fixed by the model's first dim of any fed input, or None when it is symbolic."""
    names = set(names)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in names and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def _rows(batches: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    """Every batch's rows joined per input, and their count."""
    rows = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    return rows, len(next(iter(rows.values())))


def _model_batches(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The same rows in batches of the size the model fixes (ORT's calibrator runs the model on each
    batch as given: a batch-1 model fed 11 rows fails "Got invalid dimensions"); a last short batch is
    completed by repeating its last row, which leaves min/max as they are. Symbolic batch: unchanged."""
    size = _fixed_batch(model, batches[0])
    if size is None or all(len(next(iter(b.values()))) == size for b in batches):
        return [dict(b) for b in batches]
    rows, total = _rows(batches)
    out = []
    for i in range(0, total, size):
        chunk = {name: v[i:i + size] for name, v in rows.items()}
        short = size - len(next(iter(chunk.values())))
        if short:
            chunk = {name: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for name, v in chunk.items()}
        out.append(chunk)
    return out


def _even_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The same rows in batches of one size. ORT's histogram calibrators (percentile, entropy) stack
    every batch's outputs into one array, and batches of different sizes (a last short one: 71 rows
    as 32 + 32 + 7) fail inside ORT with "inhomogeneous shape". The size is the largest divisor of the
    row count no larger than the largest batch given, so every row is still read and none twice."""
    sizes = {len(next(iter(b.values()))) for b in batches}
    if len(sizes) <= 1:
        return [dict(b) for b in batches]
    rows, total = _rows(batches)
    size = max(d for d in range(1, max(sizes) + 1) if total % d == 0)
    return [{name: v[i:i + size] for name, v in rows.items()} for i in range(0, total, size)]


def quantize_activations(
    model: onnx.ModelProto,
    calib_batches: Sequence[Mapping[str, np.ndarray]],
    method: str = "minmax",
    per_channel: bool = True,
    scheme: str = DEFAULT_SCHEME,
    weight_grids: Mapping[str, WeightQuantSpec] | None = None,
    op_types: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    clip_grids: Collection[str] = (),
) -> onnx.ModelProto:
    """Return a QDQ copy of `model` with int8 activations calibrated on `calib_batches`.

    method: minmax, percentile or entropy (ORT's calibrators). per_channel: per-output-channel
    weight scales. scheme: see the module docstring. weight_grids: pre-chosen weight grids kept
    bit for bit (module docstring); those named in `clip_grids` have their range clipped first
    (`passes.clip_weights.mse_clipped`). op_types / nodes_to_exclude: passed to ORT to limit what is
    quantized; ops in OPENVINO_UNSAFE_OPS read fp32 inputs unless op_types names them, and a Softmax
    that gives a graph output stays fp32 (`_output_probabilities`). A model below opset 13 is raised
    to it, and a model with a fixed batch size gets its calibration rows in batches of that size. The
    input model is not modified.
    """
    if method not in CALIBRATORS:
        raise ValueError(f"quantize_activations: method must be one of {sorted(CALIBRATORS)}, got {method!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_activations: scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if not calib_batches:
        raise ValueError("quantize_activations: calib_batches is empty; give at least one input batch")
    act_type, weight_type, reduce_range = SCHEMES[scheme]
    model = _named(_ort_opset(model))
    calib_batches = _model_batches(model, calib_batches)
    log.debug("quantize_activations: scheme %s, method %s, per_channel %s", scheme, method, per_channel)
    grids = dict(weight_grids or {})
    extra: dict = {}
    expected: dict[str, np.ndarray] = {}
    if grids:
        model, extra, expected = _pin_weight_grids(model, grids, per_channel, scheme, frozenset(clip_grids))
    with tempfile.TemporaryDirectory(prefix="hirelc-actq-") as tmp:
        src, pre, dst = Path(tmp, "in.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "out.onnx")
        onnx.save(model, src)
        # ORT's recommended pre-processing (shape inference + basic graph optimisation). With
        # pinned grids the optimiser is skipped: it could fold or rename the pinned weights.
        quant_pre_process(src, pre, skip_optimization=bool(grids))
        quantize_static(
            pre,
            dst,
            _Batches(calib_batches if method == "minmax" else _even_batches(calib_batches)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=act_type,
            weight_type=weight_type,
            nodes_to_exclude=[*(nodes_to_exclude or ()), *_output_probabilities(model)] or None,
            calibrate_method=CALIBRATORS[method],
            extra_options=extra,
        )
        out = onnx.load(dst)
    _check_pinned(out, expected)
    return _fp32_inputs(out, OPENVINO_UNSAFE_OPS - set(op_types or ()))


def _fp32_inputs(model: onnx.ModelProto, op_types: Iterable[str]) -> onnx.ModelProto:
    """`model` with the nodes of `op_types` reading their inputs before the Quantize / Dequantize
    pair ORT put in front of them (the fp32 tensor), and the pairs nothing reads any more removed."""
    op_types = set(op_types)
    producers = {o: n for n in model.graph.node for o in n.output}
    changed = False
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                changed = True
    if not changed:
        return model
    outputs = {o.name for o in model.graph.output}
    while True:  # dead Q / DQ nodes, consumers first
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    for init in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(init)
    return model


DEAD_CHANNEL_SCALE = 1e-4
"""A channel whose grid step is below this share of its weight's largest step is a dead channel."""


def _floor_dead_channels(fq: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                         axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dead channels (weights ~0, a bias left: EfficientNet-Lite0's stem has channels at 3e-9 against
    0.19, bias -1.2..3.8) written as exact zeros on a grid step of DEAD_CHANNEL_SCALE x the weight's
    largest: ORT quantizes a bias on the step input scale x weight scale, which for such a channel
    is below 1e-12, so the bias overflows int32 and is clipped to a constant it never had (26 such
    biases in every EfficientNet-Lite0 int8 build; there the dead channels' biases are negative
    behind a ReLU6, so its outputs did not change, but a positive one would have); ORT's own weight-scale
    adjustment for this is off because the grids are pinned. The weights' error is at most the dead
    channel's own (< 1e-4 of the weight's range). Returns (fake-quantized weight, stored integers,
    per-channel scales)."""
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if scale.size < 2:
        return fq, q, scale
    floor = np.float32(DEAD_CHANNEL_SCALE * float(scale.max()))
    dead = scale < floor
    if not dead.any():
        return fq, q, scale
    shape = [1] * fq.ndim
    shape[axis] = -1
    mask = dead.reshape(shape)
    zp = np.broadcast_to(np.asarray(zero_point).reshape(-1), scale.shape).reshape(shape)
    q = np.where(mask, zp, q).astype(q.dtype)
    fq = np.where(mask, np.zeros_like(fq), fq)
    return fq, q, np.where(dead, floor, scale).astype(np.float32)


def _pin_weight_grids(model: onnx.ModelProto, grids: Mapping[str, WeightQuantSpec], per_channel: bool,
                      scheme: str, clip: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, dict, dict[str, np.ndarray]]:
    """Fake-quantize the pinned weights (in a copy) and build ORT overrides reproducing their integers.

    Returns the copy, ORT's extra_options, and the integers each weight must end up with.
    """
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    inits = {t.name: t for t in pinned.graph.initializer}
    overrides: dict[str, list[dict]] = {}
    expected: dict[str, np.ndarray] = {}
    full_range: list[str] = []  # one warning for all of them, not one per weight
    for name, spec in grids.items():
        enc = encoding(spec, "ort-cpu")
        if name not in inits:
            raise ValueError(f"quantize_activations: weight {name!r} of weight_grids is not an initializer")
        if enc.decode != "dq" or enc.blocked:
            raise ValueError(
                f"quantize_activations: weight {name!r}: a {spec.granularity} {spec.bits}-bit grid is not one "
                "8-bit DequantizeLinear; use per-tensor, per-channel, or log2 with bits <= 4"
            )
        if spec.granularity != "per-tensor" and not per_channel:
            raise ValueError(f"quantize_activations: weight {name!r} has a per-channel grid; pass per_channel=True")
        if spec.symmetric and not spec.is_log2 and spec.bits == 8 and SCHEMES[scheme][0] == QuantType.QUInt8:
            full_range.append(name)
        w = numpy_helper.to_array(inits[name])
        if name in clip:
            w = mse_clipped(w, spec)
        stored = stored_tensors(quantize(w, spec), "ort-cpu")
        fq, q, scales = fake_quantize(w, spec), stored.q, stored.scale
        if spec.granularity != "per-tensor" and not spec.is_log2:
            fq, q, scales = _floor_dead_channels(fq, q, np.asarray(stored.scale), np.asarray(stored.zero_point),
                                                 spec.axis)
        inits[name].CopyFrom(numpy_helper.from_array(fq.astype(w.dtype), name))
        expected[name] = q
        qtype = QuantType.QInt8 if spec.signed else QuantType.QUInt8
        if spec.granularity == "per-tensor":
            overrides[name] = [{"quant_type": qtype, "scale": float(stored.scale),
                                "zero_point": int(stored.zero_point)}]
        else:
            overrides[name] = [{"quant_type": qtype, "scale": float(sc), "zero_point": int(z), "axis": spec.axis}
                               for sc, z in zip(scales, stored.zero_point)]
    if full_range:
        log.warning("%d weight(s) have 8-bit symmetric grids spanning -127..127 (%s); uint8 x int8 kernels saturate "
                    "on AVX2 CPUs without VNNI (use <= 7 bits there)", len(full_range),
                    ", ".join(full_range[:3]) + (", ..." if len(full_range) > 3 else ""))
    extra = {"TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": True}
    return pinned, extra, expected


def _check_pinned(model: onnx.ModelProto, expected: Mapping[str, np.ndarray]) -> None:
    """Each pinned weight's stored integers must be exactly passes.quantize's; else raise."""
    inits = {t.name: t for t in model.graph.initializer}
    for name, want in expected.items():
        stored = inits.get(f"{name}_quantized")
        if stored is None:
            raise ValueError(f"quantize_activations: ORT left weight {name!r} unquantized (excluded node or op type?)")
        if not np.array_equal(numpy_helper.to_array(stored).astype(np.int32), want):
            raise ValueError(f"quantize_activations: ORT's integers for weight {name!r} differ from passes.quantize")
