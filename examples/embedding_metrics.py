"""How faithful a compressed sentence encoder is to its fp32 original, on the same sentences.

Two figures the issue's acceptance names: mean cosine similarity of each sentence's embedding to
its fp32 embedding, and top-k neighbour overlap: for each sentence, the share of its k nearest
neighbours (cosine, itself excluded) under fp32 that are still among its k nearest under the
compressed model, averaged. The second is what retrieval users feel.
"""
from __future__ import annotations

import numpy as np

__all__ = ["mean_cosine", "neighbour_overlap", "embedding_fidelity"]


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {a.shape}")
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ua, ub = _unit_rows(a), _unit_rows(b)
    if ua.shape != ub.shape:
        raise ValueError(f"embeddings differ in shape: {ua.shape} vs {ub.shape}")
    return ua, ub


def mean_cosine(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows of cos(embeddings[i], reference[i])."""
    a, b = _check_pair(embeddings, reference)
    return float(np.mean(np.sum(a * b, axis=1)))


def _neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k most similar other rows, (N, k); ties broken by lower index."""
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def neighbour_overlap(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's top-k cosine neighbours under `reference` kept under `embeddings`."""
    a, b = _check_pair(embeddings, reference)
    if not 1 <= k < len(a):
        raise ValueError(f"k={k} needs at least k + 1 rows, got {len(a)}")
    got, want = _neighbours(a, k), _neighbours(b, k)
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got.tolist(), want.tolist())]))


def embedding_fidelity(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> dict[str, float]:
    """{"mean_cosine": ..., "top{k}_overlap": ...} of `embeddings` against the fp32 `reference`."""
    return {"mean_cosine": mean_cosine(embeddings, reference),
            f"top{k}_overlap": neighbour_overlap(embeddings, reference, k)}
