"""Datasets as plain arrays, and the seeded splits every method and reference model share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "Splits", "SPLIT_NAMES", "split_dataset", "select_split", "load_digits"]

# Fractions of the data for (calibration, fine-tune, validation, test). The test split is held
# out: the search never sees it, and the final report is measured on it.
DEFAULT_FRACTIONS = (0.1, 0.5, 0.15, 0.25)
SPLIT_NAMES = ("all", "calib", "finetune", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """Inputs `x` (N, ...) float32 and optional integer labels `y` (N,)."""

    x: np.ndarray
    y: np.ndarray | None = None
    name: str = "data"

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: np.ndarray, name: str) -> "Dataset":
        return Dataset(self.x[idx], None if self.y is None else self.y[idx], name)

    def batches(self, batch_size: int):
        """Yield (x, y) batches in order; y is None when unlabelled."""
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size], None if self.y is None else self.y[i : i + batch_size]


@dataclass(frozen=True)
class Splits:
    calib: Dataset
    finetune: Dataset
    val: Dataset
    test: Dataset


def split_dataset(ds: Dataset, seed: int = 0, fractions=DEFAULT_FRACTIONS) -> Splits:
    """Deterministic seeded split into calibration / fine-tune / validation / held-out test."""
    n = len(ds)
    perm = np.random.default_rng(seed).permutation(n)
    counts = [int(round(f * n)) for f in fractions[:-1]]
    bounds = np.cumsum([0] + counts + [n - sum(counts)])
    parts = [perm[bounds[i] : bounds[i + 1]] for i in range(4)]
    names = ("calib", "finetune", "val", "test")
    return Splits(*(ds.subset(np.sort(p), f"{ds.name}:{nm}") for p, nm in zip(parts, names)))


def select_split(ds: Dataset, split: str = "all", seed: int = 0) -> Dataset:
    """One named part of the seeded split ("all" is the whole dataset), as the CLI's --split picks."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    return ds if split == "all" else getattr(split_dataset(ds, seed), split)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset(x, bunch.target.astype(np.int64), "digits")
