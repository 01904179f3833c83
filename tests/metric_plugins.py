"""Task-metric plugins the compress tests name with --metric (imported only when named)."""
from __future__ import annotations

import numpy as np

CALLS: list[int] = []
"""Rows of every call, so a test can tell the search really called the metric."""


def error_rate(outputs, labels) -> float:
    """Fraction of rows whose arg-max class is not the label: a loss (--metric-mode min)."""
    CALLS.append(len(labels))
    return float(np.mean(np.asarray(outputs).argmax(1) != np.asarray(labels)))


def positions_read(outputs, labels) -> float:
    """Per-position scores read as digit strings: the fraction of characters equal to the label's."""
    read = np.asarray(outputs).argmax(-1)
    return float(np.mean([[str(d) == c for d, c in zip(row, text)] for row, text in zip(read, labels)]))
