"""Inputs synthesised from the graph, for a data-free `compress`: the model's own input shapes and
dtypes, with values each kind of input can take.

  * floats: standard normal (what a normalised image or feature vector roughly is);
  * integer inputs that feed a Gather on a constant table (token ids, through Cast / Reshape /
    Unsqueeze / Squeeze / Flatten / Identity): uniform below the table's row count;
  * inputs named like *mask*: all ones (every position attended);
  * other integers (e.g. token-type ids): 0 or 1; booleans: True.

Symbolic dims come from `input_shapes` (one sample's dims per input) or DEFAULT_DIM; the batch
axis is the sample axis. The result is a seeded Dataset of a few hundred samples without labels:
a search on it measures fidelity to the fp32 model, never task accuracy.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from hirelc_onnx.errors import DataError, option
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.evaluate.loaders import InputSpec, graph_inputs

__all__ = ["DEFAULT_DIM", "DEFAULT_SAMPLES", "SyntheticPlan", "plan_inputs", "synthesize"]

log = logging.getLogger(__name__)

DEFAULT_DIM = 16
"""A symbolic non-batch dim (a sequence length, an image side) that --input-shape does not fix."""
DEFAULT_SAMPLES = 320
"""Samples synthesised (fewer for large inputs), split like real data: calibration 32, fine-tune 160,
validation 48, test 80."""
_MAX_ELEMENTS = 1 << 24  # per input over all samples (64 MiB of float32): fewer samples beyond it (an
# ImageNet-size image gets 111), so a data-free search on a large input stays affordable
_MIN_SAMPLES = 16
_MAX_SAMPLE_ELEMENTS = 1 << 23  # one sample larger than this (a 1600x1600 RGB image) is refused, not allocated
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


@dataclass(frozen=True)
class SyntheticPlan:
    """How one input is synthesised (the report lists these)."""

    name: str
    shape: tuple[int, ...]
    """One sample's dims."""
    dtype: str
    values: str
    """What the values are, in words: "standard normal", "token ids below 30522", "ones", ..."""
    high: int | None = None


def _table_rows(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the smallest constant table `name` indexes through a Gather (following shape-only ops), else None."""
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.attribute:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                consts[node.output[0]] = attr.t
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            consumers.setdefault(inp, []).append(node)
    rows: list[int] = []
    frontier, seen = [name], {name}
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor \
                    and node.input[0] in consts and len(consts[node.input[0]].dims) >= 1:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = list(consts[node.input[0]].dims)
                rows.append(int(dims[axis % len(dims)]))
            elif node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return min(rows) if rows else None


def plan_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[SyntheticPlan]:
    """What `synthesize` makes for each graph input. input_shapes: one sample's dims per input name
    (the batch axis excluded), for inputs with symbolic dims."""
    input_shapes = dict(input_shapes or {})
    specs = graph_inputs(model)
    unknown = sorted(set(input_shapes) - {s.name for s in specs})
    if unknown:
        raise DataError(f"{option('input_shape')} names {', '.join(unknown)}, which the model has no input of "
                        f"(inputs: {', '.join(s.name for s in specs)})")
    return [_plan(model, spec, input_shapes.get(spec.name)) for spec in specs]


def _plan(model: onnx.ModelProto, spec: InputSpec, given: Sequence[int] | None) -> SyntheticPlan:
    dims = list(spec.shape[1:])
    if given is not None:
        if len(given) != len(dims):
            raise DataError(f"{option('input_shape')} for {spec.name!r} has {len(given) + 1} dims, the model's input "
                            f"{len(spec.shape)}")
        for axis, (want, got) in enumerate(zip(dims, given), start=1):
            if isinstance(want, int) and want > 0 and want != got:
                raise DataError(f"{option('input_shape')} for {spec.name!r} gives {got} at axis {axis}, where the model "
                                f"fixes {want}")
        shape = tuple(int(d) for d in given)
    else:
        shape = tuple(d if isinstance(d, int) and d > 0 else DEFAULT_DIM for d in dims)
    dtype = spec.dtype
    if dtype.kind == "f":
        return SyntheticPlan(spec.name, shape, dtype.name, "standard normal")
    if dtype.kind == "b":
        return SyntheticPlan(spec.name, shape, dtype.name, "all True")
    if "mask" in spec.name.lower():
        return SyntheticPlan(spec.name, shape, dtype.name, "ones (a mask)", 2)
    rows = _table_rows(model, spec.name)
    if rows is not None:
        return SyntheticPlan(spec.name, shape, dtype.name, f"token ids below {rows} (the embedding table's rows)", rows)
    return SyntheticPlan(spec.name, shape, dtype.name, "0 or 1", 2)


def synthesize(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
               samples: int = DEFAULT_SAMPLES, seed: int = 0) -> tuple[Dataset, list[SyntheticPlan]]:
    """A seeded, unlabelled Dataset of inputs made from the graph (see the module docstring), and its plan."""
    plans = plan_inputs(model, input_shapes)
    sizes = {p.name: int(np.prod(p.shape, dtype=object)) for p in plans}
    big = max(sizes, key=sizes.get)
    if sizes[big] > _MAX_SAMPLE_ELEMENTS:
        raise DataError(f"cannot synthesise input {big!r}: one sample of shape {_dims(plans, big)} has "
                        f"{sizes[big]:.3g} elements (the limit is {_MAX_SAMPLE_ELEMENTS:.3g}); "
                        f"give {option('data')}, or {option('input_shape')} {big}=1x... for its symbolic dims")
    per_sample = max(sizes[big], 1)
    n = max(_MIN_SAMPLES, min(samples, _MAX_ELEMENTS // per_sample))
    if n < samples:
        log.info("synthesising %d samples instead of %d: one sample has %d elements", n, samples, per_sample)
    rng = np.random.default_rng(seed)
    arrays = {}
    for p in plans:
        shape = (n,) + p.shape
        if p.values == "standard normal":
            arrays[p.name] = rng.standard_normal(shape, dtype=np.float32).astype(p.dtype, copy=False)
        elif p.dtype == "bool":
            arrays[p.name] = np.ones(shape, bool)
        elif p.values.startswith("ones"):
            arrays[p.name] = np.ones(shape, p.dtype)
        else:
            arrays[p.name] = rng.integers(0, p.high, shape).astype(p.dtype)
    for p in plans:
        log.info("data-free: input %s %s %s: %s", p.name, p.shape, p.dtype, p.values)
    preprocessing = {"kind": "synthesised from the graph (no --data)", "samples": n, "seed": seed,
                     "inputs": {p.name: {"shape": list(p.shape), "dtype": p.dtype, "values": p.values} for p in plans}}
    return Dataset(arrays, None, "synthetic", preprocessing), plans


def _dims(plans: list[SyntheticPlan], name: str) -> str:
    return "x".join(str(d) for d in next(p.shape for p in plans if p.name == name)) or "()"
