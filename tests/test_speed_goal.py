"""--speedup: the estimate from the per-kernel latency table, the repair that prunes to it, the
option checks. Latency itself is never asserted (a busy machine); the table is given."""
from __future__ import annotations

import pytest

from hirelc_onnx.compress import compress
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.kernel_latency import KernelLatency
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.budget import BudgetError
from hirelc_onnx.search.pruning_space import resource_constraints
from hirelc_onnx.search.speed import SpeedGoal, parse_speedup, speed_repair


@pytest.fixture(scope="module")
def resnet(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    # a made-up table: every kernel 1 ms in fp32 and 0.5 ms in int8, the model 2 ms beyond its kernels
    n = len(bg.kernels)
    table = {name: KernelLatency({32: 1.0}, {32: 0.5}, {32: n + 2.0}) for name in bg.kernels}
    return bg, SpeedGoal(1.5, 32, table, bg.model)


def test_parse_speedup():
    assert parse_speedup("1.5x") == 1.5 and parse_speedup(2) == 2.0 and parse_speedup(None) is None
    with pytest.raises(UserError, match="--speedup must look like"):
        parse_speedup("fast")


def test_estimate_follows_the_table(resnet):
    bg, goal = resnet
    n = len(bg.kernels)
    fp32 = CompressionConfig.uniform(bg.kernels, target="storage")
    assert goal.estimate(bg, fp32) == pytest.approx(1.0)
    int8 = CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=7)
    assert goal.int8(bg, int8) == set(bg.kernels)
    assert goal.estimate(bg, int8) == pytest.approx((n + 2) / (n / 2 + 2))
    # pruning scales each kernel's time by the share of its MACs left
    half = CompressionConfig.uniform(bg.kernels, target="storage", keep_ratio=0.5)
    cost = model_cost(bg, half)
    kept = sum(cost.kernels[k].macs / bg.kernels[k].macs for k in bg.kernels)
    assert goal.estimate(bg, half) == pytest.approx((n + 2) / (kept + 2))


def test_speed_repair_prunes_until_the_estimate_meets_the_goal(resnet):
    bg, goal = resnet
    start = CompressionConfig.uniform(bg.kernels, target="storage", bits=8)
    assert goal.estimate(bg, start) < 1.5
    fitted = speed_repair(bg, start, goal)
    assert goal.estimate(bg, fitted) >= 1.5
    assert all(fitted.get(k).bits == 8 for k in bg.kernels)  # only keep ratios move
    assert model_cost(bg, fitted).total_bytes < model_cost(bg, start).total_bytes  # a budget met stays met
    with pytest.raises(BudgetError, match="beyond pruning"):
        speed_repair(bg, start, SpeedGoal(50.0, 32, goal.table, bg.model))


def test_graph_rl_latency_constraint_uses_the_estimate(resnet):
    bg, goal = resnet
    (c,) = resource_constraints(goal=goal, int8=frozenset(bg.kernels))
    cost = model_cost(bg, CompressionConfig.uniform(bg.kernels, target="ort-cpu", bits=7))
    assert c.kind == "latency" and c.limit == pytest.approx(1 / 1.5)
    assert c.usage(bg, cost) == pytest.approx(1 / goal.estimate(bg, CompressionConfig.uniform(
        bg.kernels, target="ort-cpu", bits=7)))


def test_speedup_options_are_checked(reference_models):
    path = reference_models("resnet20")
    with pytest.raises(UserError, match="batch= sets the batch size speedup="):
        compress(path, method="random", data="digits", batch=32)
    with pytest.raises(UserError, match="does not take speedup="):
        compress(path, method="knapsack", data="digits", speedup="1.5x")
