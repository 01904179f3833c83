"""MSE-fitted weight ranges: never worse than min-max, only clamps, and picks the best fraction per group."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from passes.clip_weights import RANGE_FRACTIONS, best_fractions, clamped_to, clip_weights, mse_clipped
from passes.quantize import WeightQuantSpec, fake_quantize

SPECS = [WeightQuantSpec(4, True, "per-channel"), WeightQuantSpec(4, False, "per-channel"),
         WeightQuantSpec(3, False, "per-group", 16, 0), WeightQuantSpec(4, True, "per-group", 32, 1),
         WeightQuantSpec(8, False, "per-tensor"), WeightQuantSpec(2, True, "per-channel", axis=1)]


def _heavy_tailed(seed: int, shape=(12, 20, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32)


def _err(w: np.ndarray, ranged: np.ndarray, spec: WeightQuantSpec) -> float:
    return float(np.sum((fake_quantize(ranged, spec) - w) ** 2))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.granularity}-{s.bits}-{'sym' if s.symmetric else 'asym'}")
def test_clipping_never_raises_the_quantization_error_and_only_clamps(spec):
    w = _heavy_tailed(0)
    c = mse_clipped(w, spec)
    assert c.shape == w.shape and c.dtype == np.float32
    assert _err(w, c, spec) <= _err(w, w, spec)
    moved = c != w
    assert np.all(np.abs(c[moved]) < np.abs(w[moved]))  # clamped toward the group's range, never beyond
    assert np.all(np.sign(c[moved]) * np.sign(w[moved]) >= 0)


def test_heavy_tails_at_low_bits_are_clipped_and_the_error_drops():
    w = _heavy_tailed(1)
    spec = WeightQuantSpec(4, True, "per-channel")
    c = mse_clipped(w, spec)
    assert (c != w).any()
    assert _err(w, c, spec) < 0.9 * _err(w, w, spec)  # 0.83 of it for this draw


def test_each_channel_gets_the_best_fraction_searched_one_channel_at_a_time():
    """Two ways: the vectorised search against a loop over channels and fractions with fake_quantize."""
    w = _heavy_tailed(2, (6, 50))
    spec = WeightQuantSpec(3, False, "per-channel")
    c = mse_clipped(w, spec)
    for row, got in zip(w, c):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        errors = []
        for a in RANGE_FRACTIONS:
            clamped = np.clip(row, a * lo, a * hi)[None]
            errors.append((_err(row[None], clamped, spec), clamped[0]))
        best = min(errors, key=lambda e: e[0])
        assert _err(row[None], got[None], spec) == pytest.approx(best[0], rel=1e-6)


def test_log2_grids_are_left_alone():
    w = _heavy_tailed(3)
    assert np.array_equal(mse_clipped(w, WeightQuantSpec(4, True, "log2")), w)


def test_clip_weights_copies_and_touches_only_the_named_weights():
    rng = np.random.default_rng(4)
    a, b = rng.standard_t(3, size=(8, 16)).astype(np.float32), rng.standard_t(3, size=(16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(a.T.copy(), "A"), numpy_helper.from_array(b.T.copy(), "B")])
    model = helper.make_model(graph)
    before = model.SerializeToString()
    spec = WeightQuantSpec(2, True, "per-channel", axis=1)
    out = clip_weights(model, {"A": spec})
    assert model.SerializeToString() == before
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert np.array_equal(got["A"], mse_clipped(a.T.copy(), spec)) and not np.array_equal(got["A"], a.T)
    assert np.array_equal(got["B"], b.T)


def test_chunks_of_groups_give_the_whole_weight_s_answer(monkeypatch):
    import passes.clip_weights as clip

    w = _heavy_tailed(5, (40, 30))
    spec = WeightQuantSpec(4, False, "per-group", 8, 0)
    whole = mse_clipped(w, spec)
    monkeypatch.setattr(clip, "CHUNK_VALUES", 24)  # three 8-value groups per chunk
    assert np.array_equal(mse_clipped(w, spec), whole)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.granularity}-{s.bits}-{'sym' if s.symmetric else 'asym'}")
def test_the_in_place_search_matches_uniform_groups_trial_by_trial(spec):
    """Two ways: the buffered search against each fraction quantized by `uniform_groups` itself, on
    the same rows (heavy tails, an all-zero group and an all-positive one included)."""
    from passes.clip_weights import _range, _rows
    from passes.quantize import uniform_groups

    w = _heavy_tailed(6, (16, 40))
    w[3] = 0
    w[5] = np.abs(w[5])
    rows = _rows(w, spec)
    lo, hi = _range(rows, spec)
    errors = []
    for a in RANGE_FRACTIONS:
        clamped = np.clip(rows, a * lo, a * hi)
        q, scale, zp = uniform_groups(clamped, spec)
        deq = ((q - (0 if zp is None else zp[:, None])) * scale[:, None]).astype(np.float32)
        errors.append(np.sum(np.square(deq - rows), axis=1))
    expected = np.argmin(np.stack(errors), axis=0)  # the first of equal errors, as the search keeps
    assert np.array_equal(best_fractions(w, spec), expected)
    assert np.array_equal(clamped_to(w, spec, expected.astype(np.uint8)), mse_clipped(w, spec))


def test_clamped_to_refuses_fractions_for_another_weight():
    spec = WeightQuantSpec(4, True, "per-channel")
    with pytest.raises(ValueError, match="range fractions for 12 groups"):
        clamped_to(_heavy_tailed(7), spec, np.zeros(5, np.uint8))
