"""Baselines and budgets on the ResNet-20 reference: real models, real numbers."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.baselines import (random_config, run_ort_int8, run_uniform, run_uniform_l1,
                                          uniform_keep_for_budget)
from hirelc_onnx.search import budget as budget_module
from hirelc_onnx.search.budget import MIN_KEEP, BudgetError, check_reachable, max_ratio, parse_budget, repair
from hirelc_onnx.search.context import SearchContext


@pytest.fixture(scope="module")
def resnet(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "ort-cpu", finetune_seconds=0)
    return bg, ctx


def _plain_ort_accuracy(model, x, y) -> float:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, {"input": x[i:i + 50]})[0].argmax(1) for i in range(0, len(x), 50)])
    return float((pred == y).mean())


def test_ort_int8_keeps_accuracy_through_the_optimised_session(resnet):
    bg, ctx = resnet
    result = run_ort_int8(bg, ctx, "ort-cpu")
    test = ctx.splits.test
    fp32 = _plain_ort_accuracy(bg.model, test.x, test.y)
    int8 = _plain_ort_accuracy(result.model, test.x, test.y)
    assert fp32 - int8 <= 0.005, (fp32, int8)
    assert ctx.test_score(result.model) == int8  # the tool's number is the plain ORT number
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


def test_uniform_without_data_emits_what_the_cost_model_says(resnet):
    bg, _ = resnet
    result = run_uniform(bg, None, "storage", bits=4, keep=0.5)
    stored = sum(len(t.raw_data) for t in result.model.graph.initializer)
    assert stored == model_cost(bg, result.config).total_bytes
    assert result.val_score is None


def test_budget_parsing_and_reachability(resnet):
    bg, _ = resnet
    assert parse_budget("6x") == 6.0 and parse_budget("12") == 12.0 and parse_budget(None) is None
    for bad in ("six", "0.5x", "1x", "-3x"):
        with pytest.raises(Exception, match="budget"):
            parse_budget(bad)
    with pytest.raises(BudgetError, match="unreachable"):
        check_reachable(bg, 200.0, "storage")
    check_reachable(bg, 6.0, "storage")
    assert max_ratio(bg, "ort-cpu") < max_ratio(bg, "storage")


@pytest.mark.parametrize("budget", [6.0, 12.0, 20.0])
def test_repair_meets_the_budget_least_sensitive_first(resnet, budget):
    bg, _ = resnet
    names = [k.name for k in bg.kernel_list()]
    sensitivity = {n: float(i) for i, n in enumerate(names)}  # later kernels more sensitive
    config = repair(bg, CompressionConfig.uniform(names), budget, sensitivity)
    assert model_cost(bg, config).ratio >= budget
    again = repair(bg, CompressionConfig.uniform(names), budget, sensitivity)
    assert again.to_dict() == config.to_dict()  # deterministic
    bits = [config.get(n).bits for n in names]
    assert bits[0] <= bits[-1]  # the least sensitive kernel is lowered first


def _random_configs(bg, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [random_config(bg, "storage", rng) for _ in range(n)]


@pytest.mark.parametrize("budget", [6.0, 12.0])
def test_fill_lands_just_above_the_budget(resnet, budget):
    bg, _ = resnet
    for config in _random_configs(bg, 4):
        lowered = repair(bg, config, budget)
        filled = repair(bg, config, budget, fill=True)
        ratio = model_cost(bg, filled).ratio
        assert budget <= ratio <= model_cost(bg, lowered).ratio
        assert ratio < budget * 1.05, ratio  # every affordable rung up was taken
        assert repair(bg, config, budget, fill=True).to_dict() == filled.to_dict()


def test_damage_guides_both_directions(resnet):
    bg, _ = resnet
    names = [k.name for k in bg.kernel_list()]
    precious = max(names, key=lambda n: model_cost(bg).kernels[n].fp32_weight_bytes)

    def damage(name: str, kc) -> float:  # the precious kernel suffers a thousand times more
        return (1000.0 if name == precious else 1.0) * (32 - kc.bits + 10 * (1 - kc.keep_ratio))

    fitted = repair(bg, CompressionConfig.uniform(names), 6.0, damage=damage, fill=True)
    assert model_cost(bg, fitted).ratio >= 6.0
    assert fitted.get(precious) == KernelConfig()  # fp32, unpruned: the bytes came from the others
    for config in _random_configs(bg, 3, seed=1):
        fitted = repair(bg, config, 6.0, damage=damage, fill=True)
        assert model_cost(bg, fitted).ratio >= 6.0
        before, after = config.get(precious), fitted.get(precious)
        assert after.bits >= before.bits and after.keep_ratio >= before.keep_ratio


class _RepricingTable(budget_module._MoveTable):
    """The move table without its memory: every step prices every kernel's every move anew."""

    def moves(self, kernels, name, cost):
        return budget_module._moves(self.bg, kernels, name, self.target, cost, self.down, self.damage is not None)

    def delta(self, kernels, move):
        return budget_module._damage_delta(self.bg, self.damage, kernels, move)


@pytest.mark.parametrize("target", ["storage", "ort-cpu"])
def test_repair_reprices_only_what_a_step_changed_and_chooses_the_same(resnet, target, monkeypatch):
    bg, _ = resnet
    names = sorted(bg.kernels)
    calls = {"damage": 0}

    def damage(name: str, kc) -> float:  # uneven across kernels and grids, so ties are rare
        calls["damage"] += 1
        weight = 1 + names.index(name) % 5 + (kc.granularity == "per-group") * 0.3 + (kc.qtype == "asymmetric") * 0.2
        return weight * 2.0 ** (-kc.bits / 2) * (1 + 4 * (1 - kc.keep_ratio) ** 2)

    rng = np.random.default_rng(3)
    starts = [CompressionConfig({}, target=target)] + [random_config(bg, target, rng) for _ in range(4)]
    sensitivity = {n: i % 3 for i, n in enumerate(names)}

    def fits() -> list[dict]:
        return [repair(bg, start, 8.0, sensitivity, damage=guided, fill=True).to_dict()
                for start in starts for guided in (damage, None)]

    cached = fits()
    cached_calls, calls["damage"] = calls["damage"], 0
    monkeypatch.setattr(budget_module, "_MoveTable", _RepricingTable)
    assert cached == fits()
    assert len({str(c) for c in cached}) > 2  # the starts lead to different fits
    assert cached_calls < calls["damage"] / 3, (cached_calls, calls["damage"])


def test_uniform_keep_for_budget_is_the_largest_that_fits(resnet):
    bg, _ = resnet
    keep = uniform_keep_for_budget(bg, "storage", 8, 6.0)
    assert MIN_KEEP <= keep < 1.0
    at = lambda k: model_cost(bg, CompressionConfig.uniform(  # noqa: E731
        bg.kernels, bits=8, keep_ratio=k)).ratio
    assert at(keep) >= 6.0 > at(keep + 0.01)
    assert uniform_keep_for_budget(bg, "storage", 4, 6.0) == 1.0  # int4 alone already gives ~7.7x
    assert uniform_keep_for_budget(bg, "storage", 8, 200.0) is None


def test_uniform_l1_measures_one_candidate_per_bit_width(resnet):
    bg, _ = resnet
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "storage", finetune_seconds=0)
    result = run_uniform_l1(bg, ctx, "storage", budget=6.0, evaluations=8)
    assert [h["bits"] for h in result.history] == [8, 4, 2]
    assert all(h["ratio"] >= 6.0 for h in result.history)
    assert result.val_score == max(h["score"] for h in result.history)
    stored = sum(len(t.raw_data) for t in result.model.graph.initializer)
    assert stored == model_cost(bg, result.config).total_bytes
    with pytest.raises(Exception, match="budget"):
        run_uniform_l1(bg, ctx, "storage", budget=None)


@pytest.mark.parametrize("favoured", [("asymmetric", "per-group"), ("symmetric", "per-channel")])
def test_damage_guided_repair_chooses_grids_too(resnet, favoured):
    bg, _ = resnet
    names = [k.name for k in bg.kernel_list()]

    def damage(name: str, kc) -> float:  # the favoured grid does a tenth of the damage at any width
        grid = 0.1 if (kc.qtype, kc.granularity) == favoured else 1.0
        return (0.0 if kc.bits == 32 else grid * 2.0 ** (8 - kc.bits)) + 10 * (1 - kc.keep_ratio)

    fitted = repair(bg, CompressionConfig({}, target="storage"), 6.0, damage=damage, fill=True)
    ratio = model_cost(bg, fitted).ratio
    assert 6.0 <= ratio < 6.0 * 1.05
    grids = {(fitted.get(n).qtype, fitted.get(n).granularity) for n in names if fitted.get(n).quantized}
    assert grids == {favoured}
    assert repair(bg, CompressionConfig({}, target="storage"), 6.0, damage=damage, fill=True).to_dict() == fitted.to_dict()


@pytest.mark.parametrize("target", ["ort-cpu", "qdq", "storage"])
def test_random_configs_draw_only_grids_the_target_offers(resnet, target):
    """Random search, knapsack's restarts and HiReLC's draw from random_config: under ort-cpu an
    asymmetric or per-group weight was a kernel ORT runs off its int8 fast path (a restart ran 0.25x
    of fp32 on EfficientNet-Lite0); storage keeps every grid it packs."""
    bg, _ = resnet
    rng = np.random.default_rng(3)
    kernels = [kc for _ in range(20) for kc in random_config(bg, target, rng).kernels.values()]
    grids = {(kc.qtype, kc.granularity) for kc in kernels}
    if target == "storage":
        assert {"symmetric", "asymmetric"} == {q for q, _ in grids}
        assert {"per-tensor", "per-channel", "per-group"} == {g for _, g in grids}
    else:
        assert grids == {("symmetric", "per-channel"), ("symmetric", "per-tensor")}


def test_uniform_says_when_its_grid_leaves_orts_int8_fast_path(resnet, caplog):
    bg, _ = resnet
    with caplog.at_level("WARNING", logger="hirelc_onnx.search.baselines"):
        run_uniform(bg, None, "ort-cpu", qtype="asymmetric")
    assert "off its int8 fast path" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hirelc_onnx.search.baselines"):
        run_uniform(bg, None, "ort-cpu")
        run_uniform(bg, None, "storage", qtype="asymmetric", granularity="per-group")
    assert "fast path" not in caplog.text
