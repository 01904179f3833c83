"""Graph-RL's final pick among its measured candidates: who wins, on which rows, and what counts as a tie."""
from __future__ import annotations

import math

import numpy as np
import onnx

from hirelc_onnx.evaluate.runner import predict_outputs
from hirelc_onnx.search.context import Measurement, SearchContext

__all__ = ["Selection"]


class Selection:
    """What picks the returned candidate among the measured ones: score and loss on the validation
    rows plus the calibration rows the proxy never read.

    Each candidate's fine-tuning already kept its best epoch by validation accuracy, so validation
    alone flatters every candidate a little; calibration rows never gave a label or a gradient, so
    they add unbiased rows -- but only those outside the proxy batch (`SearchContext.proxy_calib_rows`).
    The search optimises fidelity to fp32 on the proxy rows, so its candidates agree with fp32 there
    more than anywhere else, and the harder it optimises, the more those rows flatter it: on the
    digits VGG at 50% MACs (graph-rl with its prior, 3 seeds) the emitted candidates scored
    0.9956-0.9978 on validation plus proxy rows and 0.982-0.989 on the test split. On the digits the
    proxy batch takes every calibration row, so validation alone (270 rows) selects. Score: the run's
    objective (`ctx.objective`); loss: its tie-break (cross-entropy with class labels, else the worst
    output's divergence from fp32).

    What counts as a tie (`tolerance`): a top-1 accuracy p on n rows has a binomial standard error
    of sqrt(p (1 - p) / n), and two candidates closer than that are not told apart by their
    scores (the one-standard-error rule). Near the ceiling it matters: on the digits VGG at 50%
    MACs graph-rl's candidates score 0.98-0.996 on validation, where a standard error on 270 rows
    is about 1.6 rows, so a one-row band let one or two misclassified images pick the winner; the
    loss reads every row's confidence and decides among them. Other scores (a --metric, or
    relative scores without labels) have no such formula: one row.
    """

    def __init__(self, ctx: SearchContext) -> None:
        unseen = np.setdiff1d(np.arange(len(ctx.splits.calib)), ctx.proxy_calib_rows)
        calib = (ctx.splits.calib if len(unseen) == len(ctx.splits.calib)
                 else ctx.splits.calib.subset(unseen, "calibration rows the proxy never read"))
        parts = [ctx.splits.val] + [calib] * (len(calib) > 0)
        self.labelled = all(p.y is not None for p in parts)  # class indices, or labels for --metric
        if not self.labelled:
            parts = [ctx.splits.val]
        self.objective = ctx.objective
        outputs = len(ctx.bg.model.graph.output)
        self.accuracy = (self.labelled and ctx.objective.metric is None and ctx.objective.label_output == 0
                         and outputs == 1)  # the score is top-1 accuracy (`Objective.score`)
        # one array per graph input (token ids and masks as they are), rows of every part in turn
        self.x = {name: np.concatenate([p.inputs[name] for p in parts]) for name in parts[0].inputs}
        self.y = np.concatenate([p.y for p in parts]) if self.labelled else None
        self.rows = sum(len(p) for p in parts)
        refs = [ctx.reference(p) for p in parts]
        self.ref = [np.concatenate(column) for column in zip(*refs)]

    def __call__(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(score, loss) of an emitted model on the selection rows."""
        outs = predict_outputs(model, self.x)
        return self.objective.score(outs, self.ref, self.y), self.objective.loss(outs, self.ref, self.y)

    def pick(self, measured: list[tuple[Measurement, float, float]]) -> Measurement | None:
        """The winner among (measurement, score, loss) triples, None when there are none.

        The score decides, but a score within `tolerance(best)` of the best is a tie, and among the
        tied the lower loss wins.
        """
        if not measured:
            return None
        top = max(score for _, score, _ in measured)
        band = self.tolerance(top)
        return min((c for c in measured if c[1] >= top - band - 1e-9), key=lambda c: c[2])[0]

    def tolerance(self, score: float) -> float:
        """How far below `score` a candidate's score still ties with it: one binomial standard error
        of an accuracy (at least one row), one row for any other score (class docstring: why)."""
        row = 1.0 / self.rows
        if not self.accuracy:
            return row
        p = min(max(score, 0.0), 1.0)
        return max(row, math.sqrt(p * (1.0 - p) / self.rows))
