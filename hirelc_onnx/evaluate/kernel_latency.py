"""Per-kernel ORT latency of a model's kernels, fp32 against their int8 (`ort-cpu`) version, measured
once per model and machine and cached.

Why: ORT runs some int8 kernels slower than fp32 (a small or depthwise convolution's QLinearConv, a
narrow GEMM, the Quantize / Dequantize around it); a model that quantizes them is slower than its
fp32 input. Only a measurement on this CPU and this ORT says which: the table holds, per kernel and
per batch size, the kernel's time in ORT's profile (`evaluate/per_node.py`) in the fp32 model and
in the same model with every kernel int8. It is cached under $HIRELC_CACHE/kernel-latency, keyed
by both models' contents, the CPU's flags and the ORT version, so a second run on the same
machine does not measure again.

Pruned, a kernel's time is not its full time times the share of MACs left: measured on this AMX
Xeon, ResNet-20's 16-channel int8 convolutions at batch 32 took 52 us and the same convolutions cut to
8 channels 71 us (ORT's int8 kernels pack channels in blocks; fp32's NCHWc convolutions shrank with
the cut), so the whole int8 model with every group at half its channels ran slower than unpruned
(0.67 vs 0.55 ms), where the table's proportional estimate had promised 1.5x. So the table also holds
each kernel's time in a probe: both models with every prunable group at `PROBE_KEEP` of its
channels (`KernelLatency.time` interpolates between the probe and the full kernel).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hirelc_onnx.evaluate.per_node import match_kernels, profile_nodes

__all__ = ["KernelLatency", "LatencyTable", "Probe", "PROBE_KEEP", "cpu_signature", "table_key", "measure_table",
           "kernel_table", "cache_dir"]

PROBE_KEEP = 0.5
"""The keep fraction of every prunable group in the pruned probe the table also times."""

SLOWER_MARGIN = 0.002
"""A kernel counts as slower in int8 when, over the batch sizes, its int8 version adds more than this
share of the fp32 model's time (profile times of tiny kernels scatter on a busy machine)."""


BUSY_LOAD = 1.5
"""Load average per core above which a measured table is not cached: profile times taken while
other processes share the cores scatter (measured here: speedups of the same models from 0.8x to
6x under a load of 3-4 on 2 cores), and a cached table steers every later run on the machine."""


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform
        return 0.0


@dataclass(frozen=True)
class KernelLatency:
    """One kernel's median profile time (ms) per batch size, fp32 and int8, and the whole fp32
    model's profile time per batch size (what a kernel's change is weighed against)."""

    fp32_ms: dict[int, float]
    int8_ms: dict[int, float]
    model_ms: dict[int, float]
    probe_share: float | None = None
    """The share of this kernel's MACs left in the pruned probe (None: not pruned there, no probe)."""
    fp32_probe_ms: dict[int, float] = field(default_factory=dict)
    int8_probe_ms: dict[int, float] = field(default_factory=dict)

    def time(self, batch: int, int8: bool, share: float) -> float:
        """Estimated ms of this kernel at `batch` with `share` of its MACs left, in int8 or fp32.
        Without a probe: the full time times the share. With one: linear between the probe's point
        and the full kernel; below the probe, the larger of proportional-from-the-probe and the line's
        extension (a kernel the probe ran slower than full, as ORT's int8 convolutions cut below 16
        channels, is not promised to get faster by cutting further), at most its slower measured point."""
        full = (self.int8_ms if int8 else self.fp32_ms)[batch]
        probe = (self.int8_probe_ms if int8 else self.fp32_probe_ms).get(batch)
        p = self.probe_share
        if probe is None or p is None or not 0.0 < p < 1.0:
            return full * share
        line = probe + (share - p) * (full - probe) / (1.0 - p)
        if share >= p:
            return line
        return max(probe * share / p, min(line, max(full, probe)))

    def ratio(self, batch: int) -> float:
        """int8 time / fp32 time at `batch` (above 1: int8 is slower)."""
        return self.int8_ms[batch] / max(self.fp32_ms[batch], 1e-9)

    @property
    def worst_ratio(self) -> float:
        return max(self.ratio(b) for b in self.fp32_ms)

    @property
    def cost_share(self) -> float:
        """What the int8 version adds to the model's time, as a share of the fp32 model's time,
        summed over the batch sizes (negative: it saves time). At batch 1 a tiny int8 kernel may be
        a few microseconds slower while at batch 32 it halves a large share: the sum weighs both
        as the model's latency at each batch sees them."""
        return sum((self.int8_ms[b] - self.fp32_ms[b]) / max(self.model_ms[b], 1e-9) for b in self.fp32_ms)

    @property
    def slower(self) -> bool:
        return self.cost_share > SLOWER_MARGIN

    def why(self) -> str:
        """The reason a slower kernel stays fp32, in numbers."""
        parts = [f"batch {b}: int8 {self.int8_ms[b]:.3f} ms vs fp32 {self.fp32_ms[b]:.3f} ms of {self.model_ms[b]:.3f}"
                 for b in sorted(self.fp32_ms)]
        return (f"ORT runs its int8 version slower: +{100 * self.cost_share:.1f}% of the fp32 model's time over "
                "batch sizes (" + "; ".join(parts) + ")")

    def as_dict(self) -> dict:
        out = {key: {str(b): v for b, v in getattr(self, key).items()}
               for key in ("fp32_ms", "int8_ms", "model_ms", "fp32_probe_ms", "int8_probe_ms")}
        out["probe_share"] = self.probe_share
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "KernelLatency":
        times = ({int(b): float(v) for b, v in d.get(key, {}).items()}
                 for key in ("fp32_ms", "int8_ms", "model_ms", "fp32_probe_ms", "int8_probe_ms"))
        fp, q, model, fp_probe, q_probe = times
        share = d.get("probe_share")
        return cls(fp, q, model, None if share is None else float(share), fp_probe, q_probe)


@dataclass(frozen=True)
class Probe:
    """The pruned probe: the fp32 and int8 models with every prunable group at PROBE_KEEP, and each
    kernel's share of its MACs left there (kernels not cut are left out)."""

    fp32: onnx.ModelProto
    int8: onnx.ModelProto
    shares: Mapping[str, float]


LatencyTable = dict[str, KernelLatency]


def cpu_signature() -> str:
    """The CPU as ORT's kernels see it: model name and instruction-set flags (AVX2, VNNI, ...) where
    the OS tells them, else the platform's processor string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features") and key not in fields:
            fields[key] = " ".join(sorted(value.split())) if key != "model name" else value.strip()
    return json.dumps(fields, sort_keys=True) if fields else f"{platform.machine()} {platform.processor()}"


def table_key(fp32: onnx.ModelProto, int8: onnx.ModelProto, batches: Sequence[int], probe: Probe | None = None) -> str:
    """Cache key: the models' bytes (the probe's too), the batch sizes, the CPU's signature and ORT's version."""
    h = hashlib.sha256()
    for model in (fp32, int8) + ((probe.fp32, probe.int8) if probe is not None else ()):
        h.update(model.SerializeToString(deterministic=True))
    h.update(repr((tuple(batches), cpu_signature(), ort.__version__)).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    """$HIRELC_CACHE/kernel-latency (default: ~/.cache/hirelc-onnx/kernel-latency)."""
    root = os.environ.get("HIRELC_CACHE") or str(Path.home() / ".cache" / "hirelc-onnx")
    return Path(root) / "kernel-latency"


def _kernel_ms(model: onnx.ModelProto, names: set[str], feed: Mapping[str, np.ndarray], runs: int,
               threads: int) -> tuple[dict[str, float], float]:
    """Per kernel node name: the ms ORT's profile gives the node(s) it became (its compute node plus
    an unfolded weight decode, `per_node.match_kernels`); and the ms of every node together."""
    optimized, profile = profile_nodes(model, feed, runs=runs, threads=threads)
    nodes = [n for n in model.graph.node if n.name in names]
    per_kernel = {name: sum(profile.get(n.name, ("", 0.0))[1] for n in found) / 1000.0
                  for name, found in match_kernels(model, optimized, nodes).items()}
    return per_kernel, sum(us for _, us in profile.values()) / 1000.0


def measure_table(fp32: onnx.ModelProto, int8: onnx.ModelProto, feeds: Mapping[int, Mapping[str, np.ndarray]],
                  kernels: Sequence[str], runs: int = 20, threads: int = 0, probe: Probe | None = None) -> LatencyTable:
    """The table for `kernels` (node names in both models), one feed per batch size; with `probe`,
    each cut kernel's probe times too."""
    wanted = set(kernels)
    fp, q, total, fp_probe, q_probe = {}, {}, {}, {}, {}
    for batch, feed in feeds.items():
        fp[batch], total[batch] = _kernel_ms(fp32, wanted, feed, runs, threads)
        q[batch], _ = _kernel_ms(int8, wanted, feed, runs, threads)
        if probe is not None:
            cut = wanted & set(probe.shares)
            fp_probe[batch], _ = _kernel_ms(probe.fp32, cut, feed, runs, threads)
            q_probe[batch], _ = _kernel_ms(probe.int8, cut, feed, runs, threads)
    table = {}
    for name in kernels:
        if not all(name in fp[b] and name in q[b] for b in feeds):
            continue
        row = KernelLatency({b: fp[b][name] for b in feeds}, {b: q[b][name] for b in feeds}, dict(total))
        if probe is not None and all(name in fp_probe[b] and name in q_probe[b] for b in feeds):
            row = replace(row, probe_share=float(probe.shares[name]), fp32_probe_ms={b: fp_probe[b][name] for b in feeds},
                          int8_probe_ms={b: q_probe[b][name] for b in feeds})
        table[name] = row
    return table


def kernel_table(fp32: onnx.ModelProto, int8: onnx.ModelProto, feeds: Mapping[int, Mapping[str, np.ndarray]],
                 kernels: Sequence[str], runs: int = 20, threads: int = 0,
                 cache: Path | None = None, probe: Probe | None = None) -> tuple[LatencyTable, bool]:
    """`measure_table`, read from the cache when this machine measured the same models before;
    returns (table, whether it came from the cache). A cache that cannot be written is skipped, and
    so is a table measured on a busy machine (load average above BUSY_LOAD per core)."""
    path = (cache or cache_dir()) / f"{table_key(fp32, int8, sorted(feeds), probe)}.json"
    try:
        data = json.loads(path.read_text())
        return {name: KernelLatency.from_dict(row) for name, row in data["kernels"].items()}, True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    load = _load()
    table = measure_table(fp32, int8, feeds, kernels, runs, threads, probe)
    load = max(load, _load())
    if load > BUSY_LOAD * (os.cpu_count() or 1):  # used once, not kept: it would steer every later run
        return table, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"cpu": cpu_signature(), "onnxruntime": ort.__version__, "load_average": load,
                                   "kernels": {n: k.as_dict() for n, k in table.items()}}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return table, False
