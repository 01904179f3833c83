"""The one number a search maximises for a model's outputs, and the figures the report gives per output.

Built once per run (`Objective.build`) from the model's outputs, the fp32 outputs on the data and its
labels. The score, higher always better:
  * a user metric (`--metric package.module:func`): func(outputs, labels) -> float, where outputs is
    the output array (a list of arrays for a multi-output model) and labels the data's `y` (any
    dtype) or None; with `--metric-mode min` (a loss) the score is its negative;
  * else, one output: top-1 accuracy when the labels are class indices of a class-score output,
    otherwise its kind's label-free score against fp32 (`output_kinds`);
  * else, several outputs: the worst of them, each normalised by the fp32 model's own (1.0 = fp32),
    so that no output can be traded away for another.
Labels that are not class indices of a class-score output reach only the metric.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hirelc_onnx.errors import DataError, InvalidOptionError, UserError, option
from hirelc_onnx.evaluate.data import is_class_labels
from hirelc_onnx.evaluate.metrics import call_metric, cross_entropy, load_metric, top1_accuracy
from hirelc_onnx.evaluate.output_kinds import KINDS, resolve_kinds

__all__ = ["METRIC_MODES", "Objective", "class_labels", "expected_score"]

METRIC_MODES = ("max", "min")

def class_labels(labels: Any, classes: int | None) -> bool:
    """True when `labels` are class indices (integers, one per sample) in [0, classes)."""
    y = None if labels is None else np.asarray(labels)
    if not is_class_labels(y) or y.size == 0:
        return False
    return classes is None or (int(y.min()) >= 0 and int(y.max()) < classes)


def expected_score(fp32_score: float, agreement: float) -> float:
    """A score estimated from the fp32 score and a label-free agreement in [0, 1]: fp32 * agreement
    for a positive score, and as far below fp32 for a negative one (a loss under --metric-mode min)."""
    return fp32_score - abs(fp32_score) * (1.0 - agreement)


def _as_list(outputs: Any) -> list[np.ndarray]:
    return [np.asarray(o) for o in outputs] if isinstance(outputs, (list, tuple)) else [np.asarray(outputs)]


@dataclass(frozen=True)
class Objective:
    """How a model's outputs are scored (see the module docstring)."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    label_output: int | None = None
    """The class-score output whose accuracy the labels give, None when the labels are not its class indices."""
    metric: str | None = None
    metric_mode: str = "max"
    metric_fn: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, names: Sequence[str], shapes: Sequence[Sequence | None], ref_outputs: Any = None,
              labels: Any = None, *, output_kind: str | Mapping[str, str] | None = None, metric: str | None = None,
              metric_mode: str = "max") -> "Objective":
        """Classify every output (overrides first, then the fp32 `ref_outputs`, then `shapes`), find the
        output the labels score, and import the metric plugin when one is named."""
        if metric_mode not in METRIC_MODES:
            raise UserError(f"metric mode must be one of {', '.join(METRIC_MODES)}, got {metric_mode!r}")
        if metric_mode != "max" and metric is None:
            raise InvalidOptionError(f"{option('metric_mode')} only matters with {option('metric')}: give {option('metric')}, "
                                     "or drop it")
        samples = None if ref_outputs is None else _as_list(ref_outputs)
        kinds = resolve_kinds(list(names), list(shapes), samples, output_kind)
        label_output = None
        for i, kind in enumerate(kinds):
            if kind == "class-scores":
                classes = samples[i].reshape(len(samples[i]), -1).shape[1] if samples is not None else None
                label_output = i if class_labels(labels, classes) else None
                break
        fn = load_metric(metric) if metric is not None else None
        return cls(tuple(names), kinds, label_output, metric, metric_mode, fn)

    # --- what the report and the search say ------------------------------------------------------
    @property
    def uses_labels(self) -> bool:
        """True when the score reads the labels (accuracy; a metric plugin always gets them)."""
        return self.metric is not None or self.label_output is not None

    def name(self, labelled: bool) -> str:
        """What the score is, in words (`labelled`: whether the data being scored has labels)."""
        if self.metric is not None:
            return f"{self.metric} ({'higher' if self.metric_mode == 'max' else 'lower'} is better)"
        if len(self.kinds) > 1:
            return f"worst of {len(self.kinds)} outputs, each relative to fp32"
        if labelled and self.label_output is not None:
            return "top-1 accuracy"
        return {"class-scores": "top-1 agreement with fp32", "sequence-scores": "per-position top-1 agreement with fp32",
                }.get(self.kinds[0], "mean cosine similarity to fp32")

    def value(self, score: float) -> float:
        """The metric's own value of a score (a loss is shown as the loss, not its negative)."""
        return -score if self.metric is not None and self.metric_mode == "min" else score

    # --- scoring -------------------------------------------------------------------------------------
    def score(self, outputs: Any, ref: Any, labels: Any) -> float:
        """The score of `outputs` (one array or a list, one per output), higher is better.

        ref: the fp32 model's outputs on the same rows (needed unless the score reads only labels).
        """
        outs = self._check(outputs)
        if self.metric is not None:
            value = call_metric(self.metric_fn, self.metric, outs[0] if len(outs) == 1 else outs, labels)
            return value if self.metric_mode == "max" else -value
        if len(outs) == 1 and self.label_output == 0 and labels is not None:
            return top1_accuracy(outs[0], labels)
        return min(self._relative(outs, self._check(ref), labels))

    def per_output(self, outputs: Any, ref: Any, labels: Any) -> list[dict[str, Any]]:
        """Per output: name, kind, its kind's figures against fp32 (and accuracy on the labelled one)."""
        outs, refs = self._check(outputs), self._check(ref)
        rows = []
        for i, (name, kind, out, r) in enumerate(zip(self.names, self.kinds, outs, refs)):
            row: dict[str, Any] = {"name": name, "kind": kind, "shape": list(out.shape[1:])}
            row.update(KINDS[kind].fidelity(out, r))
            if i == self.label_output and labels is not None:
                row.update(accuracy=top1_accuracy(out, labels), fp32_accuracy=top1_accuracy(r, labels))
            rows.append(row)
        return rows

    def proxy(self, outputs: Any, ref: Any) -> tuple[float, float]:
        """(damage, agreement) against fp32 for the cheap proxy: the worst output of each."""
        outs, refs = self._check(outputs), self._check(ref)
        damage = max(KINDS[k].damage(o, r) for k, o, r in zip(self.kinds, outs, refs))
        agreement = min(KINDS[k].score(o, r) for k, o, r in zip(self.kinds, outs, refs))
        return damage, float(min(max(agreement, 0.0), 1.0))

    def loss(self, outputs: Any, ref: Any, labels: Any) -> float:
        """A smooth figure to break ties between close scores, lower is better: cross-entropy on the
        labelled output, else the worst output's divergence from fp32 (KL for class scores)."""
        outs = self._check(outputs)
        if self.label_output is not None and labels is not None:
            return cross_entropy(outs[self.label_output], labels)
        return max((KINDS[k].loss or KINDS[k].damage)(o, r) for k, o, r in zip(self.kinds, outs, self._check(ref)))

    # --- helpers -------------------------------------------------------------------------------------
    def _check(self, outputs: Any) -> list[np.ndarray]:
        if outputs is None:
            raise DataError("scoring without labels needs the fp32 model's outputs")
        outs = _as_list(outputs)
        if len(outs) != len(self.names):
            raise DataError(f"{len(outs)} output arrays for a model with {len(self.names)} outputs")
        return outs

    def _relative(self, outs: list[np.ndarray], refs: list[np.ndarray], labels: Any) -> list[float]:
        """Every output's score relative to the fp32 model's (label-free scores already are)."""
        scores = []
        for i, (kind, out, ref) in enumerate(zip(self.kinds, outs, refs)):
            if i == self.label_output and labels is not None:
                fp32 = top1_accuracy(ref, labels)
                scores.append(top1_accuracy(out, labels) / fp32 if fp32 > 0 else 1.0)
            else:
                scores.append(KINDS[kind].score(out, ref))
        return scores
