"""What each graph output holds, decided once, and how a compressed model's output is compared with fp32's.

One registry (`KINDS`): per kind, the label-free score the search maximises (1.0 = the fp32 output),
the damage the cheap proxy reports (0.0 = identical) and the figures the report adds. Kinds:

* class-scores    (N, C) (or a (N, C, 1, 1) head): top-1 agreement; proxy: logit MSE / variance.
* sequence-scores (N, T, C), class scores per position (softmax over the last axis): per-position
                  top-1 agreement; proxy: per-position KL. One arg-max over the flattened sequence
                  (what a class-score metric would take) says nothing about a CTC recognizer.
* dense-map       (N, C, H, W) and higher ranks: mean cosine similarity; proxy: MSE / variance; SNR.
* embedding       embeddings and regression: everything else, (N,), (N, 1), and (N, D) or (N, T, D)
                  whose fp32 vectors all have unit L2 norm (a normalised embedding, not probabilities):
                  mean cosine similarity; proxy: MSE / variance; SNR in dB.

`classify` reads the declared shape, or better the data's actual output; `--output-kind` overrides
(`parse_overrides`). The training losses of each kind live in the bridge (`bridge/training.py`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hirelc_onnx.errors import UserError, option
from hirelc_onnx.evaluate.metrics import (
    cosine_similarity,
    kl_divergence,
    logit_mse_proxy,
    per_position_agreement,
    per_position_kl,
    snr_db,
    top1_agreement,
    top5_containment,
)

__all__ = ["OutputKind", "KINDS", "KIND_NAMES", "classify", "parse_overrides", "resolve_kinds", "fidelity_of"]

Compare = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class OutputKind:
    """How outputs of one kind are compared with the fp32 model's."""

    name: str
    description: str
    score_name: str
    score: Compare
    """Label-free score against the fp32 output: 1.0 when identical, higher is better."""
    damage_name: str
    damage: Compare
    """The proxy's damage against the fp32 output: 0.0 when identical, lower is better."""
    loss: Compare | None = None
    """A smooth divergence from fp32 that breaks ties between close scores (None: the damage)."""
    extras: Mapping[str, Compare] = field(default_factory=dict)
    """Further figures the report gives for outputs of this kind."""

    def fidelity(self, outputs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        """The score, the damage and the extras of `outputs` against the fp32 `ref`."""
        figures = {self.score_name: self.score(outputs, ref), self.damage_name: self.damage(outputs, ref)}
        figures.update({name: fn(outputs, ref) for name, fn in self.extras.items()})
        return figures


KINDS: dict[str, OutputKind] = {k.name: k for k in (
    OutputKind("class-scores", "class scores (N, C)", "top1_agreement", top1_agreement,
               "normalised_logit_mse", logit_mse_proxy, kl_divergence,
               {"top5_containment": top5_containment, "kl_divergence": kl_divergence,
                "cosine_similarity": cosine_similarity}),
    OutputKind("sequence-scores", "per-position class scores (N, T, C)", "per_position_agreement",
               per_position_agreement, "per_position_kl", per_position_kl),
    OutputKind("dense-map", "dense maps (N, C, H, W)", "cosine_similarity", cosine_similarity,
               "normalised_mse", logit_mse_proxy, None, {"snr_db": snr_db}),
    OutputKind("embedding", "embeddings / regression", "cosine_similarity", cosine_similarity,
               "normalised_mse", logit_mse_proxy, None, {"snr_db": snr_db}),
)}
KIND_NAMES = tuple(KINDS)

# a vector counts as unit-norm within this distance of 1 (fp32 normalisation is exact to ~1e-6)
_UNIT_NORM_TOL = 1e-3


def _unit_norm_not_probabilities(sample: np.ndarray) -> bool:
    """True when every vector along the last axis has L2 norm 1 and they are not probability rows
    (non-negative, summing to 1: a confident softmax is nearly one-hot, hence nearly unit-norm too)."""
    a = np.asarray(sample, dtype=np.float64)
    if a.size == 0 or a.shape[-1] < 2:
        return False
    unit = np.all(np.abs(np.linalg.norm(a, axis=-1) - 1.0) < _UNIT_NORM_TOL)
    probabilities = np.all(a >= 0) and np.all(np.abs(a.sum(axis=-1) - 1.0) < _UNIT_NORM_TOL)
    return bool(unit and not probabilities)


def classify(shape: Sequence | None, sample: np.ndarray | None = None) -> str:
    """The kind of one output, from its declared shape (ints fixed, anything else symbolic) or, better,
    an actual output `sample` (N, ...) of the fp32 model on the data."""
    if sample is not None:
        dims: list = list(np.shape(sample))
    elif shape is not None:
        dims = list(shape)
    else:
        return "embedding"
    if len(dims) > 2 and all(d == 1 for d in dims[2:]):  # a (N, C, 1, 1) head holds class scores
        dims = dims[:2]
    rank = len(dims)
    if rank <= 1 or (rank == 2 and dims[1] == 1):
        return "embedding"  # one value per sample: regression
    if sample is not None and rank <= 3 and _unit_norm_not_probabilities(np.reshape(sample, (len(sample), *dims[1:]))):
        return "embedding"
    if rank == 2:
        return "class-scores"
    if rank == 3:
        return "sequence-scores"
    return "dense-map"


def parse_overrides(spec: str | Mapping[str, str] | None, names: Sequence[str]) -> dict[str, str]:
    """--output-kind: one kind for every output ("embedding") or per output ("out=kind,other=kind"),
    or a {name: kind} mapping; every name and kind checked."""
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if len(parts) == 1 and "=" not in parts[0]:
            return {name: _kind(parts[0]) for name in names}
        pairs = {}
        for part in parts:
            name, sep, kind = part.partition("=")
            if not sep:
                raise UserError(f"{option('output_kind')}: {part!r} is not name=kind (or give one kind for every output)")
            pairs[name.strip()] = kind.strip()
        spec = pairs
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise UserError(f"{option('output_kind')} names output(s) {', '.join(map(repr, unknown))} the model does not have; "
                        f"its outputs: {', '.join(names)}")
    return {name: _kind(kind) for name, kind in spec.items()}


def _kind(name: str) -> str:
    if name not in KINDS:
        raise UserError(f"unknown output kind {name!r}; choose one of {', '.join(KIND_NAMES)}")
    return name


def resolve_kinds(names: Sequence[str], shapes: Sequence[Sequence | None], samples: Sequence[np.ndarray] | None = None,
                  overrides: str | Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every output's kind: the override when given, else `classify` of its shape and fp32 sample."""
    chosen = parse_overrides(overrides, names)
    samples = list(samples) if samples is not None else [None] * len(names)
    return tuple(chosen.get(n, classify(shape, sample)) for n, shape, sample in zip(names, shapes, samples))


def fidelity_of(outputs: np.ndarray, ref: np.ndarray, kind: str | None = None) -> dict[str, float]:
    """Every label-free figure of one output against fp32's; `kind` None classifies the reference."""
    return KINDS[kind or classify(None, ref)].fidelity(outputs, ref)
