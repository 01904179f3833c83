"""Datasets as plain arrays (one per model input), and the seeded splits every method and reference model share."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Dataset", "Splits", "SPLIT_NAMES", "split_dataset", "select_split", "split_counts", "check_fractions",
           "load_digits", "is_class_labels"]

# Fractions of the data for (calibration, fine-tune, validation, test). The test split is held
# out: the search never sees it, and the final report is measured on it.
DEFAULT_FRACTIONS = (0.1, 0.5, 0.15, 0.25)
SPLIT_NAMES = ("all", "calib", "finetune", "val", "test")
SINGLE_INPUT = "x"
"""The name a single-input model's array goes by when it is not named after the graph input."""


def is_class_labels(y: np.ndarray | None) -> bool:
    """Labels the accuracy scoring can use: 1-D integer class indices (others feed a metric only)."""
    return y is not None and y.ndim == 1 and np.issubdtype(y.dtype, np.integer)


@dataclass(frozen=True)
class Dataset:
    """Model inputs (one array per graph input, same first dim N) and optional labels `y` (N, ...).

    `inputs` may be given as one array: it is stored under "x", the single-input convention (any
    single-input model takes it whatever its input is called). Token ids and masks stay integers:
    nothing here casts. `y` may be of any dtype numpy saves without pickle; only 1-D integer labels
    are class labels (`classes`), the others are for a metric only.
    `preprocessing` records how the arrays were made from the user's files (for the report).
    """

    inputs: Mapping[str, np.ndarray]
    y: np.ndarray | None = None
    name: str = "data"
    preprocessing: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Mapping):
            object.__setattr__(self, "inputs", {SINGLE_INPUT: self.inputs})
        else:
            object.__setattr__(self, "inputs", dict(self.inputs))
        if not self.inputs:
            raise ValueError("a dataset needs at least one input array")

    @property
    def x(self) -> np.ndarray:
        """The input array of a single-input dataset (a multi-input one has none: use `inputs`)."""
        if len(self.inputs) != 1:
            raise ValueError(f"dataset {self.name!r} has {len(self.inputs)} inputs ({', '.join(self.inputs)}); use .inputs")
        return next(iter(self.inputs.values()))

    @property
    def classes(self) -> np.ndarray | None:
        """`y` when it holds class indices, else None (no labels, or labels for a metric only)."""
        return self.y if is_class_labels(self.y) else None

    @property
    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per input, the shape of one sample (the dims after the batch axis)."""
        return {k: tuple(int(d) for d in v.shape[1:]) for k, v in self.inputs.items()}

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def rows(self, idx: Any) -> dict[str, np.ndarray]:
        """The inputs at `idx` (an index array or a slice), one array per input."""
        return {k: v[idx] for k, v in self.inputs.items()}

    def subset(self, idx: np.ndarray, name: str) -> "Dataset":
        return Dataset(self.rows(idx), None if self.y is None else self.y[idx], name, self.preprocessing)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Yield (inputs, y) batches in order; y is None when unlabelled."""
        for i in range(0, len(self), batch_size):
            sl = slice(i, i + batch_size)
            yield self.rows(sl), None if self.y is None else self.y[sl]


@dataclass(frozen=True)
class Splits:
    calib: Dataset
    finetune: Dataset
    val: Dataset
    test: Dataset


def check_fractions(fractions: Any) -> tuple[float, float, float, float]:
    """Four split fractions (calibration, fine-tune, validation, test) as floats, or ValueError saying what is wrong.

    Accepts a sequence or the CLI's "0.1,0.5,0.15,0.25"; each must be > 0 and they must add up to 1."""
    if isinstance(fractions, str):
        try:
            fractions = [float(part) for part in fractions.split(",")]
        except ValueError:
            raise ValueError(f"expected four numbers CALIB,FINETUNE,VAL,TEST, got {fractions!r}") from None
    values = tuple(float(f) for f in fractions)
    if len(values) != 4:
        raise ValueError(f"expected four fractions (calibration, fine-tune, validation, test), got {len(values)}")
    if any(not np.isfinite(f) or f <= 0 for f in values):
        raise ValueError(f"every fraction must be > 0, got {','.join(f'{f:g}' for f in values)}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"the fractions must add up to 1, got {','.join(f'{f:g}' for f in values)} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def split_counts(n: int, fractions=DEFAULT_FRACTIONS) -> tuple[int, int, int, int]:
    """How many of `n` samples each part of `split_dataset` gets (the test part takes the rounding rest)."""
    counts = [int(round(f * n)) for f in fractions[:-1]]
    return (*counts, n - sum(counts))  # type: ignore[return-value]


def split_dataset(ds: Dataset, seed: int = 0, fractions=DEFAULT_FRACTIONS) -> Splits:
    """Deterministic seeded split into calibration / fine-tune / validation / held-out test."""
    n = len(ds)
    perm = np.random.default_rng(seed).permutation(n)
    counts = split_counts(n, fractions)[:-1]
    bounds = np.cumsum([0, *counts, n - sum(counts)])
    parts = [perm[bounds[i] : bounds[i + 1]] for i in range(4)]
    names = ("calib", "finetune", "val", "test")
    return Splits(*(ds.subset(np.sort(p), f"{ds.name}:{nm}") for p, nm in zip(parts, names)))


def select_split(ds: Dataset, split: str = "all", seed: int = 0, fractions=DEFAULT_FRACTIONS) -> Dataset:
    """One named part of the seeded split ("all" is the whole dataset), as the CLI's --split picks."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    return ds if split == "all" else getattr(split_dataset(ds, seed, fractions), split)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset(x, bunch.target.astype(np.int64), "digits")
