"""The numpy reference quantizer against hand computations and grid properties."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from passes.quantize import (
    WeightQuantSpec,
    dequantize,
    fake_quantize,
    from_2d,
    log2_codebook,
    quantize,
    to_2d,
)

GRANULARITIES = ("per-tensor", "per-channel", "per-group", "log2")


def test_symmetric_per_channel_int8_by_hand():
    w = np.array([[-1.0, 0.5, 0.25], [2.0, -0.1, 0.0]], np.float32)
    qw = quantize(w, WeightQuantSpec(8, True, "per-channel"))
    np.testing.assert_array_equal(qw.scale, np.array([1 / 127, 2 / 127], np.float32))
    # 0.5 * 127 = 63.5 rounds half to even -> 64; 0.25 * 127 = 31.75 -> 32; -0.1 * 63.5 = -6.35 -> -6
    np.testing.assert_array_equal(qw.q, [[-127, 64, 32], [127, -6, 0]])
    assert qw.zero_point is None
    np.testing.assert_array_equal(dequantize(qw), qw.q.astype(np.float32) * qw.scale[:, None])


def test_symmetric_per_tensor_uses_restricted_range():
    w = np.array([-3.0, 1.0, 3.0], np.float32)
    qw = quantize(w, WeightQuantSpec(4, True, "per-tensor"))
    assert qw.scale == np.float32(3.0 / 7)
    np.testing.assert_array_equal(qw.q, [-7, 2, 7])  # 1 / (3/7) = 2.333 -> 2


def test_asymmetric_per_tensor_uint8_by_hand():
    w = np.array([-1.0, 0.0, 3.0], np.float32)
    qw = quantize(w, WeightQuantSpec(8, False, "per-tensor"))
    assert qw.scale == np.float32(4.0 / 255)
    assert qw.zero_point == 64  # rint(63.75)
    np.testing.assert_array_equal(qw.q, [0, 64, 255])  # rint(-63.75) + 64, 64, rint(191.25) + 64
    assert fake_quantize(w, qw.spec)[1] == 0.0  # zero is exactly representable


def test_asymmetric_range_always_contains_zero():
    w = np.array([[1.0, 2.0, 3.0]], np.float32)
    qw = quantize(w, WeightQuantSpec(2, False, "per-channel"))
    assert qw.zero_point[0] == 0 and qw.scale[0] == np.float32(1.0)
    np.testing.assert_array_equal(qw.q, [[1, 2, 3]])


def test_per_group_blocks_by_hand_with_partial_last_block():
    w = np.array([[1.0, -2.0, 0.5, 4.0, -1.0]], np.float32)
    qw = quantize(w, WeightQuantSpec(8, True, "per-group", group_size=2))
    np.testing.assert_array_equal(qw.scale, np.array([[2 / 127, 4 / 127, 1 / 127]], np.float32))
    np.testing.assert_array_equal(qw.q, [[64, -127, 16, 127, -127]])  # 63.5 -> 64, 15.875 -> 16


def test_per_group_follows_the_output_axis_fan_in():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 11.0
    spec = WeightQuantSpec(4, False, "per-group", group_size=3, axis=2)
    qw = quantize(w, spec)
    assert qw.scale.shape == (4, 2)  # 4 output channels, fan-in 6 in blocks of 3
    for o in range(4):
        fan_in = w[:, :, o].reshape(-1)
        for j in range(2):
            block = fan_in[3 * j: 3 * j + 3]
            expect = quantize(block[None], WeightQuantSpec(4, False, "per-tensor"))
            assert qw.scale[o, j] == expect.scale
            np.testing.assert_array_equal(qw.q[:, :, o].reshape(-1)[3 * j: 3 * j + 3], expect.q[0])


def test_log2_by_hand():
    w = np.array([[1.0, 0.8, 0.7, 0.4, 0.3, 0.13, 0.12, -0.6, 0.0]], np.float32)
    qw = quantize(w, WeightQuantSpec(3, True, "log2"))
    # 3 bits: qmax 3, levels 0, +-1, +-1/2, +-1/4; log-domain midpoints 2^-0.5, 2^-1.5; zero below 1/8
    np.testing.assert_array_equal(qw.q, [[3, 3, 2, 2, 1, 1, 0, -2, 0]])
    np.testing.assert_array_equal(log2_codebook(3), np.array([0, 0.25, 0.5, 1, -1, -0.5, -0.25], np.float32))
    np.testing.assert_array_equal(dequantize(qw), [[1, 1, 0.5, 0.5, 0.25, 0.25, 0, -0.5, 0]])


def test_log2_ignores_qtype_and_two_bits_equals_symmetric_per_channel():
    w = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)
    a = quantize(w, WeightQuantSpec(5, True, "log2"))
    b = quantize(w, WeightQuantSpec(5, False, "log2"))
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(fake_quantize(w, WeightQuantSpec(2, True, "log2")),
                                  fake_quantize(w, WeightQuantSpec(2, True, "per-channel")))


def test_all_zero_and_tiny_groups_stay_zero():
    w = np.zeros((3, 4), np.float32)
    w[1] = 1e-35
    for gran in GRANULARITIES:
        for sym in (True, False):
            out = fake_quantize(w, WeightQuantSpec(4, sym, gran, group_size=2))
            assert np.all(np.isfinite(out))
            assert np.all(out[[0, 2]] == 0), gran
    assert np.all(quantize(w, WeightQuantSpec(4, True, "log2")).q[1] == 0)


@pytest.mark.parametrize("bits,symmetric,granularity", itertools.product(range(2, 9), (True, False), GRANULARITIES))
def test_grid_properties(bits, symmetric, granularity):
    rng = np.random.default_rng(bits * 10 + symmetric)
    w = (rng.standard_normal((5, 3, 3, 3)) * rng.uniform(0.1, 3, (5, 1, 1, 1)) + 0.3).astype(np.float32)
    spec = WeightQuantSpec(bits, symmetric, granularity, group_size=10, axis=0)
    qw = quantize(w, spec)
    out = dequantize(qw)
    assert out.dtype == np.float32 and out.shape == w.shape
    assert qw.q.min() >= spec.qmin and qw.q.max() <= spec.qmax
    if granularity == "log2":
        s = np.abs(w).reshape(5, -1).max(1)
        ratio = np.abs(out).reshape(5, -1) / s[:, None]
        levels = np.concatenate([[0.0], 2.0 ** -np.arange(2 ** (bits - 1) - 1)])
        assert np.all(np.isin(ratio, levels))
        return
    # every value sits on the grid (q - zp) * scale, and rounding moved it by at most scale / 2
    if granularity == "per-tensor":
        step = np.broadcast_to(qw.scale, w.shape)
    elif granularity == "per-channel":
        step = np.broadcast_to(qw.scale[:, None, None, None], w.shape)
    else:
        step = from_2d(np.repeat(qw.scale, 10, axis=1)[:, :27], w.shape, 0)
    assert np.all(np.abs(out - w) <= step / 2 * (1 + 1e-5) + 1e-7)


def test_to_2d_round_trip_and_axis():
    w = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for axis in range(3):
        w2 = to_2d(w, axis)
        assert w2.shape == (w.shape[axis], 60 // w.shape[axis])
        np.testing.assert_array_equal(from_2d(w2, w.shape, axis), w)
        np.testing.assert_array_equal(w2[1], np.take(w, 1, axis=axis).reshape(-1))


def test_float64_input_is_computed_in_float32():
    w = np.random.default_rng(2).standard_normal((4, 8))
    spec = WeightQuantSpec(6, False, "per-channel")
    np.testing.assert_array_equal(fake_quantize(w, spec), fake_quantize(w.astype(np.float32), spec))


@pytest.mark.parametrize("kwargs", [
    dict(bits=1, symmetric=True, granularity="per-channel"),
    dict(bits=9, symmetric=True, granularity="per-channel"),
    dict(bits=4, symmetric=True, granularity="per-row"),
    dict(bits=4, symmetric=True, granularity="per-group", group_size=0),
    dict(bits=4, symmetric=True, granularity="per-channel", axis=-1),
])
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        WeightQuantSpec(**kwargs)


def test_refuses_bad_weights():
    spec = WeightQuantSpec(4, True, "per-channel", axis=2)
    with pytest.raises(ValueError, match="axis 2"):
        quantize(np.ones((3, 4), np.float32), spec)
    with pytest.raises(ValueError, match="float"):
        quantize(np.ones((3, 4), np.int8), WeightQuantSpec(4, True, "per-channel"))
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([[np.nan, 1.0]], np.float32), WeightQuantSpec(4, True, "per-channel"))
