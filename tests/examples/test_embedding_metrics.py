"""Mean cosine and top-k neighbour overlap against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from examples.embedding_metrics import embedding_fidelity, mean_cosine, neighbour_overlap


def test_mean_cosine_by_hand():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    # row 0 at 45 degrees (cos = 1/sqrt 2), row 1 same direction at another length (cos = 1)
    got = np.array([[1.0, 1.0], [0.0, 0.5]])
    assert mean_cosine(got, ref) == pytest.approx((2 ** -0.5 + 1.0) / 2)
    assert mean_cosine(-ref, ref) == pytest.approx(-1.0)


def test_neighbour_overlap_by_hand():
    # four points on a line of angles: each one's nearest other point is known
    angles = np.array([0.0, 0.1, 1.0, 1.15])
    ref = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert neighbour_overlap(ref, ref, k=1) == 1.0
    # move point 1 to 1.3 and point 2 to 0.05: every nearest neighbour changes
    moved = np.stack([np.cos([0.0, 1.3, 0.05, 1.15]), np.sin([0.0, 1.3, 0.05, 1.15])], axis=1)
    # fp32 nearest: 0->1, 1->0, 2->3, 3->2; moved nearest: 0->2, 1->3, 2->0, 3->1: none kept
    assert neighbour_overlap(moved, ref, k=1) == 0.0
    # k=2: fp32 sets {1,2},{0,2},{3,1},{2,1}; moved sets {2,3},{3,2},{0,3},{1,2}: kept 1,1,1,2 of 2
    assert neighbour_overlap(moved, ref, k=2) == pytest.approx((1 + 1 + 1 + 2) / 8)


def test_fidelity_and_refusals():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 8))
    out = embedding_fidelity(ref * 3.0, ref, k=10)  # scale does not matter
    assert out == {"mean_cosine": pytest.approx(1.0), "top10_overlap": 1.0}
    with pytest.raises(ValueError, match="differ in shape"):
        mean_cosine(ref[:5], ref)
    with pytest.raises(ValueError, match="k=30"):
        neighbour_overlap(ref, ref, k=30)
