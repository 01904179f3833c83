"""`make bench-scale`'s projection: a batch of b on k nodes takes its first evaluation alone, then ceil((b-1)/k) rounds."""
from __future__ import annotations

import pytest

from bench.scale import NODES, _projection


def test_projection_counts_rounds_of_k_and_the_overhead():
    rows = {r["method"]: r for r in _projection(10.0, 2.0, {"eight": 8, "one": 1})}
    # 8 on 1 node: 1 + 7 evaluations and the overhead: 82 s for 8
    assert rows["eight"]["1"] == pytest.approx(60 * 8 / 82)
    # on 4 nodes: 1 + ceil(7 / 4) = 3 evaluation times; on 8 and 16 nodes: 2
    assert rows["eight"]["4"] == pytest.approx(60 * 8 / 32)
    assert rows["eight"]["8"] == rows["eight"]["16"] == pytest.approx(60 * 8 / 22)
    # one per batch never gains from more nodes
    assert [rows["one"][str(k)] for k in NODES] == pytest.approx([60 / 12] * len(NODES))
