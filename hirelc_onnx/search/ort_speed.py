"""`ort-cpu` never slower than fp32: which kernels keep their int8 kernel, from measured latency.

Before a search: every kernel's int8 version (7-bit per-channel weights, int8 activations, what
ort-cpu emits) is timed against its fp32 version in ORT's profile at batch 1 and 32
(`evaluate/kernel_latency.py`, cached per model and machine); a kernel ORT runs slower in int8 is
flagged (`Kernel.int8_slower`), and `specs.weight_target` then writes its weight in the storage
encoding, decoded at load into an fp32 kernel: every method, the cost model and the passes see the
same choice. The flags stand only when, timed whole, the model with those kernels fp32 is faster
than with every kernel int8 (one kept fp32 between int8 neighbours adds a Quantize, a Dequantize
and layout changes the table does not see). After the search, the emitted model is timed whole against fp32 (`whole_model_check`);
while it is slower, the int8 kernel that costs most relative to its fp32 time is turned back into an
fp32 one (`passes/fp32_kernels.py`), its integers kept; when every kernel is fp32 and the model is
still slower, the activations' Quantize / Dequantize pairs left are removed too.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import onnx

from hirelc_onnx.apply import apply_config
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.kernel_latency import PROBE_KEEP, LatencyTable, Probe, kernel_table
from hirelc_onnx.evaluate.runner import benchmark_side_by_side, get_runner
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import model_cost
from hirelc_onnx.graph.ort_cpu_bytes import ort_cpu_bytes
from hirelc_onnx.search.speed import SpeedGoal, calibrate
from passes.fp32_kernels import fp32_kernels, fp32_outside_kernels, int8_kernels

__all__ = ["BATCHES", "int8_latency_table", "flag_slow_kernels", "whole_model_check", "prepare", "speed_goal"]

log = logging.getLogger(__name__)

BATCHES = (1, 32)
"""The batch sizes ort-cpu must not be slower than fp32 at (the report's latency rows)."""


def _feeds(model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]] | None,
           batches: Sequence[int]) -> dict[int, dict]:
    runner = get_runner(model)
    fixed = runner.fixed_batch
    return {b: runner.random_feed(b, sample_shapes=sample_shapes) for b in ((fixed,) if fixed else batches)}


def _int8_config(bg: BlockGraph) -> CompressionConfig:
    """Every kernel (embedding tables aside) int8 as ort-cpu emits it: 7-bit per-channel weights."""
    return CompressionConfig.uniform([n for n, k in bg.kernels.items() if k.op != "Gather"], target="ort-cpu", bits=7)


def _probe(bg: BlockGraph, config: CompressionConfig, calib_batches: list[dict]) -> Probe | None:
    """The table's pruned probe (`kernel_latency.Probe`): `config` and its fp32 twin with every prunable
    group at PROBE_KEEP of its channels (in the model's channel multiple); None when nothing is cut."""
    keep = {n for n in bg.kernels if bg.prunable_kernel(n)}
    if not keep:
        return None
    cut = {n: replace(kc, keep_ratio=PROBE_KEEP) if n in keep else kc for n, kc in config.kernels.items()}
    int8 = CompressionConfig(cut, target=config.target, channel_multiple=bg.channel_multiple)
    fp32 = CompressionConfig({n: replace(kc, bits=32) for n, kc in cut.items()}, target="storage",
                             channel_multiple=bg.channel_multiple)
    cost = model_cost(bg, fp32)
    shares = {n: cost.kernels[n].macs / max(bg.kernels[n].macs, 1) for n in config.kernels if n in cost.kernels}
    shares = {n: s for n, s in shares.items() if s < 0.99}
    if not shares:
        return None
    return Probe(apply_config(bg, fp32), apply_config(bg, int8, calib_batches=calib_batches), shares)


def int8_latency_table(bg: BlockGraph, calib_batches: list[dict] | None,
                       sample_shapes: Mapping[str, Sequence[int]] | None = None,
                       batches: Sequence[int] = BATCHES, runs: int = 20,
                       int8: onnx.ModelProto | None = None) -> tuple[LatencyTable, bool]:
    """Per kernel (embedding tables aside): its profile time in the fp32 model and in the model with
    every kernel int8 as ort-cpu emits it (`int8`, else built), and in both with every prunable group
    cut to PROBE_KEEP (`_probe`); (table, whether it came from the cache)."""
    config = _int8_config(bg)
    if not config.kernels or not calib_batches:
        return {}, False
    int8 = int8 if int8 is not None else apply_config(bg, config, calib_batches=calib_batches)
    return kernel_table(bg.model, int8, _feeds(bg.model, sample_shapes, batches), list(config.kernels), runs=runs,
                        probe=_probe(bg, config, calib_batches))


def flag_slow_kernels(bg: BlockGraph, table: LatencyTable) -> tuple[BlockGraph, dict[str, str]]:
    """`bg` with every kernel ORT runs slower in int8 flagged (`Kernel.int8_slower`); and the reasons."""
    reasons = {name: row.why() for name, row in table.items() if row.slower and name in bg.kernels}
    if not reasons:
        return bg, {}
    kernels = {n: replace(k, int8_slower=reasons[n]) if n in reasons else k for n, k in bg.kernels.items()}
    return replace(bg, kernels=kernels), reasons


def _speedups(fp32: onnx.ModelProto, model: onnx.ModelProto, sample_shapes, batches, runs: int) -> dict[int, float]:
    out = {}
    fixed = get_runner(fp32).fixed_batch
    for b in (fixed,) if fixed else batches:
        try:
            _, comp = benchmark_side_by_side([fp32, model], batch_size=b, runs=runs, warmup=3,
                                             sample_shapes=sample_shapes)
        except UserError:
            continue
        out[b] = comp["speedup"]  # the median of per-round ratios
    return out


def whole_model_check(fp32: onnx.ModelProto, model: onnx.ModelProto, table: LatencyTable,
                      sample_shapes: Mapping[str, Sequence[int]] | None = None, batches: Sequence[int] = BATCHES,
                      runs: int = 20, tolerance: float = 1.0) -> tuple[onnx.ModelProto, list[dict]]:
    """Time `model` against `fp32` at each batch; while it is slower (speedup below `tolerance`:
    1.0, the issue's "never slower than fp32"; at 0.97 a VGG at parity in int8 was kept at 0.99x / 0.97x
    at batch 1 in two quiet bench runs), the int8 kernel with the worst int8 / fp32 time in `table` becomes an fp32
    kernel (its integers decoded at load), and the model is timed again (after four steps, several
    kernels a step); with none left, the Q/DQ pairs go and the constants' DequantizeLinear become
    decodes folded at load (`fp32_outside_kernels`), and that model is timed too. When none of the
    models timed met `tolerance`, the fastest of them (by its slowest batch) is returned, not the
    last: a kernel turned back between int8 neighbours adds a standalone Quantize and Dequantize the
    per-kernel table does not see (ResNet-20 at batch 1: 0.94x with every kernel int8, 0.61x with 15
    of its 18 turned back). Returns the model and one record per kernel turned back in it (and one for the
    pairs), with the speedups that made it so."""
    fallbacks: list[dict] = []
    if not int8_kernels(model):  # no int8 kernel (all kept fp32 by the table): the pairs ORT's quantizer
        bare = fp32_outside_kernels(model, fp32)  # put around Add / LayerNorm / Softmax are time for nothing
        if bare is not model:  # (the ViT in D2: 0.88x at batch 1 with every kernel fp32 and them left)
            fallbacks.append({"kernel": "(activation Quantize / Dequantize pairs)",
                              "reason": "no kernel runs in int8: the pairs and constant decodes left only cost time",
                              "speedups_before": {}})
            model = bare
    speed = _speedups(fp32, model, sample_shapes, batches, runs)
    timed = []  # (slowest batch's speedup, model, how many records it carries)
    while speed and min(speed.values()) < tolerance:
        timed.append((min(speed.values()), model, len(fallbacks)))
        left = int8_kernels(model)
        if not left:  # every kernel fp32: the activations' Quantize / Dequantize pairs left cost the time
            bare = fp32_outside_kernels(model, fp32)
            if bare is model:
                break
            slow_at = min(speed, key=speed.get)
            fallbacks.append({"kernel": "(activation Quantize / Dequantize pairs)",
                              "reason": f"with every kernel fp32 the model still ran {1 / speed[slow_at]:.2f}x "
                                        f"slower than fp32 at batch {slow_at}: the pairs left were removed",
                              "speedups_before": {str(b): v for b, v in speed.items()}})
            model = bare
            speed = _speedups(fp32, model, sample_shapes, batches, runs)
            break
        # the slowest-relative first: one a step, then a quarter of those already turned back (a big
        # model's whole timing is dear; the steps grow geometrically)
        step = max(1, len(fallbacks) // 4)
        worst = sorted(left, key=lambda n: (-(table[n].worst_ratio if n in table else 0.0), n))[:step]
        model = fp32_kernels(model, worst, fp32)
        slow_at = min(speed, key=speed.get)
        for name in worst:
            why = (f"the whole model ran {1 / speed[slow_at]:.2f}x slower than fp32 at batch {slow_at}; this "
                   "kernel's int8 / fp32 time was among the worst left"
                   + (f" ({table[name].worst_ratio:.2f}x)" if name in table else ""))
            fallbacks.append({"kernel": name, "reason": why, "speedups_before": {str(b): v for b, v in speed.items()}})
            log.info("ort-cpu: %s back to fp32: %s", name, why)
        speed = _speedups(fp32, model, sample_shapes, batches, runs)
    if speed and min(speed.values()) < tolerance:
        timed.append((min(speed.values()), model, len(fallbacks)))
        best, model, kept = max(timed, key=lambda t: t[0])  # the first of equals: fewest kernels turned back
        if kept < len(fallbacks):
            log.info("ort-cpu: no model met %.2fx of fp32; the fastest timed (%.2fx at its slowest batch) is kept",
                     tolerance, best)
        fallbacks = fallbacks[:kept]
    return model, fallbacks


def prepare(bg: BlockGraph, calib_batches: list[dict] | None,
            sample_shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[BlockGraph, LatencyTable, dict]:
    """Before an ort-cpu search: the latency table, `bg` with the kernels ORT runs slower in int8
    flagged, and what the report says about it."""
    config = _int8_config(bg)
    int8 = apply_config(bg, config, calib_batches=calib_batches) if config.kernels and calib_batches else None
    table, cached = int8_latency_table(bg, calib_batches, sample_shapes, int8=int8)
    if int8 is not None:  # the bytes ORT's quantizer adds, for the cost model (graph/ort_cpu_bytes.py)
        bg = replace(bg, ort_cpu_bytes=ort_cpu_bytes(bg.model, int8, bg.kernels.values(),
                                                     {bg.kernels[n].weight for n in config.kernels}))
    flagged, reasons = flag_slow_kernels(bg, table)
    record = {"kernel_latency": {n: row.as_dict() for n, row in table.items()}, "table_from_cache": cached,
              "kept_fp32": reasons, "whole_model_fallbacks": []}
    if reasons and int8 is not None:
        dropped = _flags_cost_more(bg.model, int8, reasons, sample_shapes)
        if dropped is not None:
            record["kept_fp32"], record["kept_fp32_dropped"] = {}, dropped
            return bg, table, record
    return flagged, table, record


def _flags_cost_more(fp32: onnx.ModelProto, int8: onnx.ModelProto, reasons: Mapping[str, str],
                     sample_shapes: Mapping[str, Sequence[int]] | None, runs: int = 20) -> dict | None:
    """The per-kernel table weighs a kernel alone; kept fp32 between int8 neighbours it adds what the
    table does not see: a standalone Quantize and Dequantize and, around ORT's NHWC int8 kernels,
    Transposes (ResNet-20 with its stem, two 1x1 shortcuts and head kept fp32: 74 nodes, 18 of them
    Transposes, against 37 with every kernel int8; 0.80-0.85x of fp32 at batch 1 against 1.02-1.08x).
    So the all-int8 model and the one with the flagged kernels fp32 are timed whole against fp32;
    when the flags do not make it faster at its slowest batch, they are dropped. Returns what the
    report says about it then, else None."""
    with_flags = fp32_kernels(int8, list(reasons), fp32)
    if not int8_kernels(with_flags):  # every kernel flagged: the pairs would go too (whole_model_check)
        with_flags = fp32_outside_kernels(with_flags, fp32)
    all_int8 = _speedups(fp32, int8, sample_shapes, BATCHES, runs)
    flagged = _speedups(fp32, with_flags, sample_shapes, BATCHES, runs)
    if not all_int8 or not flagged or min(flagged.values()) > min(all_int8.values()):
        return None
    log.info("ort-cpu: the kernels the latency table flagged stay int8: kept fp32 the model ran %.2fx of fp32, "
             "all int8 %.2fx (at its slowest batch)", min(flagged.values()), min(all_int8.values()))
    return {"kernels": dict(reasons),
            "reason": "timed whole, the model with these kernels fp32 was not faster than with every kernel int8 "
                      "(the Quantize / Dequantize and layout changes around them cost more than they save)",
            "speedups_all_int8": {str(b): v for b, v in all_int8.items()},
            "speedups_kept_fp32": {str(b): v for b, v in flagged.items()}}


def speed_goal(bg: BlockGraph, ctx, factor: float, batch: int, table: LatencyTable | None = None) -> SpeedGoal:
    """The --speedup goal of a run: `table` (ort-cpu's, at batch 1 and 32) when it holds `batch`, else
    the table measured at `batch` (a fixed-batch model: at its own batch); its estimate calibrated
    against whole-model timings (`speed.calibrate`)."""
    fixed = get_runner(bg.model).fixed_batch
    batch = fixed or batch
    if table is None or not all(batch in row.model_ms for row in table.values()):
        table, _ = int8_latency_table(bg, ctx.calib_batches, ctx.sample_shapes,
                                      batches=BATCHES if batch in BATCHES else (batch,))
    goal = SpeedGoal(factor, batch, table, bg.model, ctx.sample_shapes)
    calib = ctx.calib_batches if ctx.target in ("ort-cpu", "qdq") else None
    return calibrate(bg, goal, ctx.target, lambda config: apply_config(bg, config, calib_batches=calib))
