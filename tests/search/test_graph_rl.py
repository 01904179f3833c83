"""Graph-RL pruning: the graph observation, the GAT policy, constraint handling, the proxy, end to end."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from hirelc_onnx.apply import apply_pruning
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import Dataset, load_digits, split_dataset
from hirelc_onnx.evaluate.runner import predict
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.budget import BudgetError
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.gat import (CHANNEL_FEATURES, EDGE_TYPES, NODE_FEATURES, STATE_COLUMNS, ChannelPolicy,
                                    GATEncoder, build_observation)
from hirelc_onnx.search.graph_rl import GraphRLSettings, run_graph_rl
from hirelc_onnx.search.masked_proxy import MaskedProxy
from hirelc_onnx.search.pruning_space import Constraint, PruningSpace, resource_constraints

TINY = GraphRLSettings(episodes=8, batch=4, hidden=16, heads=2, fisher_samples=8)


@pytest.fixture(scope="module")
def resnet(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    return bg, build_observation(bg)


def _edges(obs, kind: str) -> set[tuple[str, str]]:
    t = EDGE_TYPES.index(kind)
    return {(obs.node_names[a], obs.node_names[b])
            for a, b, e in zip(*obs.edge_index, obs.edge_attr.argmax(1)) if e == t}


def test_observation_nodes_edges_and_features_on_resnet20(resnet):
    bg, obs = resnet
    assert obs.num_nodes == len(bg.kernels) + len(bg.groups) == 22 + 13
    assert obs.x.shape == (35, NODE_FEATURES) and np.isfinite(obs.x).all()
    assert obs.edge_index.shape[1] == obs.edge_attr.shape[0]
    assert (obs.edge_attr.sum(1) == 1).all() and obs.edge_index.max() < obs.num_nodes
    # every edge has its reverse, so attention flows both ways
    pairs = set(zip(*obs.edge_index))
    assert all((b, a) in pairs for a, b in pairs)
    # data flow follows the network, through ReLU and the residual Add
    flow = _edges(obs, "dataflow")
    stem, l0c1, l0c2 = "/stem/stem.0/Conv", "/layers/layers.0/conv1/Conv", "/layers/layers.0/conv2/Conv"
    assert (stem, l0c1) in flow and (l0c1, l0c2) in flow
    assert {(stem, "/layers/layers.1/conv1/Conv"), (l0c2, "/layers/layers.1/conv1/Conv")} <= flow
    # the residual stream is one group with four producers, read by the first conv of each unit
    stream = bg.kernels[stem].group
    produced = {k for k, g in _edges(obs, "produces") if g == f"group:{stream}"}
    assert produced == set(bg.groups[stream].producers) and len(produced) == 4
    assert (f"group:{stream}", l0c1) in _edges(obs, "consumes")
    # only prunable groups are decided, in topological order, with per-channel features
    assert len(obs.groups) == 12 and stream == obs.groups[0]
    assert [f.shape for f in obs.channel_features] == [(int(n), CHANNEL_FEATURES) for n in obs.lengths]


def test_keep_state_reaches_group_producers_and_consumers(resnet):
    bg, obs = resnet
    kept = obs.lengths[None, :].copy()
    kept[0, 0] = obs.lengths[0] / 2  # the residual stream keeps half its channels
    decided = np.zeros_like(kept, bool)
    decided[0, 0] = True
    x = obs.states(kept, decided, current=1)[0]
    index = {n: i for i, n in enumerate(obs.node_names)}
    out_col, in_col, done_col, now_col = STATE_COLUMNS
    stream = obs.groups[0]
    assert x[index[f"group:{stream}"], out_col] == 0.5 and x[index[f"group:{stream}"], done_col] == 1
    assert x[index["/stem/stem.0/Conv"], out_col] == 0.5
    assert x[index["/layers/layers.0/conv1/Conv"], in_col] == 0.5
    assert x[index["/layers/layers.0/conv1/Conv"], out_col] == 1.0
    current = obs.groups[1]
    assert x[index[f"group:{current}"], now_col] == 1 and x[index["/layers/layers.0/conv1/Conv"], now_col] == 1
    assert x[index["/fc/Gemm"], now_col] == 0


def test_gat_encoder_is_permutation_consistent_and_finite(resnet):
    _, obs = resnet
    torch.manual_seed(0)
    enc = GATEncoder(NODE_FEATURES, len(EDGE_TYPES), hidden=16, heads=4).eval()
    x = torch.from_numpy(obs.x)[None]
    ei, ea = torch.from_numpy(obs.edge_index), torch.from_numpy(obs.edge_attr)
    perm = torch.randperm(obs.num_nodes)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(obs.num_nodes)
    with torch.no_grad():
        nodes, glob = enc(x, ei, ea)
        nodes_p, glob_p = enc(x[:, perm], inverse[ei], ea)
    assert torch.isfinite(nodes).all() and torch.isfinite(glob).all()
    assert torch.allclose(nodes_p, nodes[:, perm], atol=1e-5)
    assert torch.allclose(glob_p, glob, atol=1e-5)
    # a batch encodes each copy independently
    with torch.no_grad():
        batched, _ = enc(torch.cat([x, x[:, perm][:, inverse]]), ei, ea)
    assert torch.allclose(batched[0], batched[1], atol=1e-5)


def test_policy_starts_at_the_prior_with_one_logit_per_channel(resnet):
    _, obs = resnet
    policy = ChannelPolicy(obs, prior_keep=0.7, hidden=16, heads=2)
    states = torch.from_numpy(obs.states(obs.lengths[None, :].repeat(3, 0), np.zeros((3, 12), bool), 2))
    logits = policy(states, 2)
    assert logits.shape == (3, int(obs.lengths[2]))
    assert torch.allclose(torch.sigmoid(logits), torch.full_like(logits, 0.7), atol=1e-5)
    # given starting logits (an importance ranking), the untrained policy reproduces them in any state
    start = [np.linspace(-3, 3, int(n)) for n in obs.lengths]
    ranked = ChannelPolicy(obs, prior_keep=0.7, hidden=16, heads=2, channel_logits=start)
    assert np.allclose(ranked(states, 2).detach().numpy(), start[2][None].repeat(3, 0), atol=1e-5)


def _producer_scaled(bg, gid: int, channel: int, factor: float):
    """The ONNX model with channel `channel` of group `gid` scaled by `factor` at every producer (weights and bias)."""
    from onnx import numpy_helper

    model = bg.model.__class__()
    model.CopyFrom(bg.model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for name in bg.groups[gid].producers:
        k = bg.kernels[name]
        for j, tensor in enumerate(nodes[name].input[1:3]):
            w = numpy_helper.to_array(inits[tensor]).copy()
            axis = k.out_axis if j == 0 else 0
            index = [slice(None)] * w.ndim
            index[axis] = channel
            w[tuple(index)] *= factor
            inits[tensor].CopyFrom(numpy_helper.from_array(w, tensor))
    return model


@pytest.mark.parametrize("name, step", [("vgg", 2), ("resnet20", 0)])  # a plain conv; the residual stream
def test_channel_importance_is_the_squared_loss_derivative_of_the_channel(reference_models, name, step):
    """Oracle: central differences of the per-sample loss through ORT, scaling the channel at every producer."""
    bg = build_block_graph(load_model(reference_models(name)))
    obs = build_observation(bg)
    x = load_digits().x[:6]
    proxy = MaskedProxy(bg, obs, x)
    labels = (predict(bg.model, x).argmax(1) + 1) % 10  # wrong labels: large, well-conditioned gradients
    gid, eps = obs.groups[step], 0.002  # ReLU kinks: at 0.01 a sample of ResNet-20 crossed one (8% off)
    for channel in (0, 5):
        def losses(factor, channel=channel):
            logits = predict(_producer_scaled(bg, gid, channel, factor), x).astype(np.float64)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            return -logp[np.arange(len(x)), labels]
        derivative = (losses(1 + eps) - losses(1 - eps)) / (2 * eps)
        fisher = proxy.channel_importance(x, labels, chunk=4)  # two chunks: per-sample sums across them
        assert np.isclose(fisher[step][channel], np.mean(derivative ** 2), rtol=3e-2)
    assert [f.shape for f in fisher] == [(int(n),) for n in obs.lengths] and all((f >= 0).all() for f in fisher)
    assert proxy.recalibrate  # restored after scoring


@pytest.mark.parametrize("constraints, multiple", [
    ([Constraint("flops", 0.5)], 1),
    ([Constraint("flops", 0.5)], 4),
    ([Constraint("params", 0.4)], 8),
    ([Constraint("flops", 0.6), Constraint("bytes", 1 / 6)], 4),
])
def test_projection_returns_only_feasible_masks_on_the_boundary(resnet, constraints, multiple):
    bg, obs = resnet
    space = PruningSpace(bg, obs, constraints, "storage", 8, min_keep=0.125, channel_multiple=multiple)
    rng = np.random.default_rng(0)
    for keep_p in (0.1, 0.5, 0.9, 1.0):
        masks = [rng.random(int(n)) < keep_p for n in obs.lengths]
        probs = [rng.random(int(n)) for n in obs.lengths]
        projected, cost = space.project(masks, probs)
        counts = np.array([m.sum() for m in projected])
        exact = model_cost(bg, space.config(counts))
        usage = np.array([c.usage(bg, exact) for c in constraints])
        assert (usage <= [c.limit for c in constraints]).all(), (keep_p, usage)
        assert exact.total_bytes == cost.total_bytes
        assert (counts >= space.floors).all() and (counts % multiple == 0).all()
        # on the boundary: one more unit of any group that can grow would break a limit
        grow = [i for i in range(len(counts)) if counts[i] < obs.lengths[i]]
        bigger = [space.usage(counts + multiple * np.eye(len(counts), dtype=int)[i])[0] for i in grow]
        assert not all(space.feasible(u) for u in bigger)
        if constraints[0].kind == "flops" and multiple == 1:
            assert constraints[0].limit - 0.02 < cost.macs_fraction <= constraints[0].limit


@pytest.mark.parametrize("sampled", [True, False])
def test_projection_moves_the_least_probable_channels_first(resnet, sampled):
    """From everything kept it drops the least probable channels; from nothing it adds the most probable."""
    bg, obs = resnet
    space = PruningSpace(bg, obs, [Constraint("flops", 0.5)], "storage", 8, 0.125, channel_multiple=4)
    rng = np.random.default_rng(2)
    probs = [rng.permutation(int(n)) / n for n in obs.lengths]
    masks = [np.full(int(n), sampled) for n in obs.lengths]
    projected, cost = space.project(masks, probs)
    assert cost.macs_fraction <= 0.5
    for m, p in zip(projected, probs):
        assert set(np.flatnonzero(m)) == set(np.argsort(-p)[: m.sum()])


def test_uniform_counts_are_the_largest_uniform_allocation_meeting_the_limit(resnet):
    """The uniform allocation the policy starts from: rounded to the unit, above the floors, on the limit."""
    bg, obs = resnet
    space = PruningSpace(bg, obs, [Constraint("flops", 0.5)], "storage", 8, 0.125, channel_multiple=4)
    keep = space.uniform_keep()
    counts = space.uniform_counts(keep)
    assert 0.5 < keep < 1.0 and (counts % 4 == 0).all() and (counts >= space.floors).all()
    assert space.feasible(space.usage(counts)[0])  # the largest uniform keep meets the limit ...
    assert not space.feasible(space.usage(space.uniform_counts(min(1.0, keep + 0.05)))[0])  # ... a larger one does not
    assert (space.uniform_counts(1.0) == obs.lengths).all() and (space.uniform_counts(0.0) == space.floors).all()


def test_resource_constraints_and_unreachable_targets(resnet):
    bg, obs = resnet
    assert resource_constraints() == [Constraint("flops", 0.5)]
    assert resource_constraints(budget=6.0, params=0.5) == [Constraint("params", 0.5), Constraint("bytes", 1 / 6)]
    with pytest.raises(UserError, match="flops="):
        resource_constraints(flops=1.5)
    with pytest.raises(BudgetError, match="unreachable"):
        PruningSpace(bg, obs, [Constraint("flops", 0.001)], "storage", 8, 0.125).check_reachable()


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_masked_proxy_computes_what_the_pruning_pass_emits(reference_models, name):
    """Oracle: the torch masks equal the ONNX pruning pass run through ORT (depthwise groups included)."""
    bg = build_block_graph(load_model(reference_models(name)))
    obs = build_observation(bg)
    space = PruningSpace(bg, obs, [Constraint("flops", 0.5)], "storage", 32, 0.125)
    rng = np.random.default_rng(1)
    masks, _ = space.project([rng.random(int(n)) < 0.6 for n in obs.lengths],
                             [rng.random(int(n)) for n in obs.lengths])
    x = load_digits().x[:64]
    proxy = MaskedProxy(bg, obs, x, recalibrate=False)
    _, mse, _ = proxy(masks)
    pruned = apply_pruning(bg, space.config(np.array([m.sum() for m in masks])), space.keep(masks))
    ort_logits = predict(pruned, x)
    var = proxy.ref[0].var()
    assert np.isclose(mse, np.mean((ort_logits - proxy.ref[0]) ** 2) / var, rtol=1e-4)
    # recalibration leaves the unpruned model untouched and changes a pruned one
    recal = MaskedProxy(bg, obs, x)
    assert recal([np.ones(int(n), bool) for n in obs.lengths])[1] < 1e-10
    recalibrated = recal(masks)[1]
    assert recalibrated != mse
    # raw_weight adds the raw pruned model's damage (the pruning pass's, above) to the recalibrated one
    recal.raw_weight = 0.5
    score, damage, _ = recal(masks)
    assert np.isclose(damage, recalibrated + 0.5 * mse, rtol=1e-4) and score == -damage
    assert recal([np.ones(int(n), bool) for n in obs.lengths])[1] < 1e-10


def test_end_to_end_on_resnet20_returns_a_feasible_measured_model(reference_models):
    bg = replace(build_block_graph(load_model(reference_models("resnet20"))), channel_multiple=4)  # 16-wide groups: 8 steps of 4
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "storage", finetune_epochs=1, proxy_size=64)
    steps = []
    wall = time.perf_counter()
    result = run_graph_rl(bg, ctx, "storage", flops=0.5, evaluations=2, seed=0, prior="l1-fisher",
                          settings=replace(TINY, measure_start=True),
                          progress=lambda phase, i, n: steps.append((phase, i, n)))
    wall = time.perf_counter() - wall
    assert model_cost(bg, result.config).macs_fraction <= 0.5
    real = [h for h in result.history if h["kind"] == "real"]
    proxy = [h for h in result.history if h["kind"] == "proxy"]
    assert len(real) == 2 and all(h["feasible"] and h["finetuned"] and h["macs_fraction"] <= 0.5 for h in real)
    assert proxy and all(h["macs_fraction"] <= 0.5 for h in proxy)
    # measure_start: the policy's starting cut (L1 + Fisher ranks) is measured first; the second slot is the trained
    # policy's greedy episode, or, where training left it on the start, the best by proxy
    assert real[0]["source"] == "ranking-l1-fisher"
    assert real[1]["greedy"] or not real[0]["greedy"]
    assert result.extra["channel_importance"] == "l1+group-fisher" and result.extra["prior"] == "l1-fisher"
    # the winner: within one binomial standard error (at least one row) of the best accuracy on
    # validation + calibration rows, then the lowest loss
    # (calibration rows the proxy read are left out: here the proxy batch took 64 of the 180)
    unseen = np.setdiff1d(np.arange(len(ctx.splits.calib)), ctx.proxy_calib_rows)
    assert len(unseen) == len(ctx.splits.calib) - 64
    rows = np.concatenate([ctx.splits.val.y, ctx.splits.calib.y[unseen]])
    logits = predict(result.model, np.concatenate([ctx.splits.val.x, ctx.splits.calib.x[unseen]]))
    top = max(r["selection_score"] for r in real)
    band = max(1 / len(rows), np.sqrt(top * (1 - top) / len(rows)))
    tied = [h for h in real if h["selection_score"] >= top - band - 1e-9]
    chosen = min(tied, key=lambda h: h["selection_loss"])
    assert result.val_score == chosen["score"] and result.extra["source"] == chosen["source"]
    assert np.isclose(chosen["selection_score"], (logits.argmax(1) == rows).mean())
    times = result.extra
    # the phases are consecutive parts of the run, and measuring holds every candidate's own time
    phases = times["importance_seconds"] + times["rl_seconds"] + times["measure_seconds"]
    assert phases <= wall and times["measure_seconds"] >= sum(h["seconds"] for h in real)
    assert ctx.test_score(result.model) > 0.3  # 50% of MACs gone: about 0.1 before fine-tuning
    assert len(result.extra["lagrange_multipliers"]) == len(result.extra["best_proxy_curve"]) == 2
    assert len(result.extra["learning_curve"]) == 2
    assert all(c >= m for c, m in zip(result.extra["best_proxy_curve"], result.extra["learning_curve"]))
    assert result.extra["best_proxy_curve"] == sorted(result.extra["best_proxy_curve"])
    assert steps[-1] == ("graph-rl: policy updates, then real evaluations", 4, 4)


def test_without_the_torch_bridge_the_proxy_falls_back_to_ort(reference_models, monkeypatch):
    import hirelc_onnx.search.masked_proxy as masked_proxy

    def no_bridge(*args, **kwargs):
        raise UserError("onnx2torch cannot convert this graph")

    monkeypatch.setattr(masked_proxy, "MaskedProxy", no_bridge)
    bg = build_block_graph(load_model(reference_models("vgg")))
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "ort-cpu", finetune_seconds=0, proxy_size=32)
    result = run_graph_rl(bg, ctx, "ort-cpu", params=0.5, evaluations=1, settings=TINY, prior="l1-fisher")
    proxy = [h for h in result.history if h["kind"] == "proxy"]
    assert proxy and all(h["logit_mse"] >= 0 for h in proxy)
    assert result.extra["channel_importance"] == "l1"  # no bridge, no gradients: channels ranked by magnitude
    real = [h for h in result.history if h["kind"] == "real"]
    # no ranked cut is forced (measure_start off): the one evaluation is the trained policy's greedy
    # episode, recorded as the L1 cut only where training left it there
    assert len(real) == 1 and real[0]["greedy"] and real[0]["source"] in ("ranking-l1", "policy")
    assert result.extra["bits"] == 7 and result.config.get("/features/features.0/Conv").bits == 7
    assert result.extra["constraints"][0]["kind"] == "params"


def test_without_a_prior_only_the_trained_policy_is_measured_and_it_moves(reference_models):
    bg = build_block_graph(load_model(reference_models("vgg")))
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "ort-cpu", finetune_seconds=0, proxy_size=32)
    with pytest.raises(UserError, match="--prior must be one of l1-fisher, none"):
        run_graph_rl(bg, ctx, "ort-cpu", prior="fisher", settings=TINY)
    settings = GraphRLSettings(episodes=48, batch=4, hidden=16, heads=2, fisher_samples=8, proxy_rows=16, rescore=4)
    result = run_graph_rl(bg, ctx, "ort-cpu", flops=0.5, evaluations=3, prior="none", settings=settings)
    real = [h for h in result.history if h["kind"] == "real"]
    # no ranking was computed, scored or measured: every candidate is one of the policy's episodes
    assert result.extra["prior"] == "none" and result.extra["channel_importance"] is None
    assert result.extra["proxy_metric"].endswith("+ 1 x that without")  # the raw pruned model's damage counts too
    assert len(real) == 3 and {h["source"] for h in real} == {"policy"} and result.extra["source"] == "policy"
    assert real[0]["greedy"] and model_cost(bg, result.config).macs_fraction <= 0.5
    # 12 updates move every channel's keep probability from the uniform start (0.047 measured; frozen: 0)
    assert len(result.extra["learning_curve"]) == 12
    assert result.extra["policy_shift"]["mean_abs_prob_change"] > 0.02
    frozen = GraphRLSettings(episodes=8, batch=4, hidden=16, heads=2, fisher_samples=0, proxy_rows=16, rescore=2,
                             lr=0.0, bias_lr=0.0)
    still = run_graph_rl(bg, ctx, "ort-cpu", flops=0.5, evaluations=1, prior="none", settings=frozen)
    assert still.extra["policy_shift"]["mean_abs_prob_change"] < 1e-6


@pytest.mark.slow
def test_runs_on_light_resnet50():
    from tests.light import light_path

    bg = build_block_graph(load_model(str(light_path("resnet50"))))
    # its Reshape is exported for batch 1: torch forwards of 2 rows fail, so the Fisher feature, the
    # channel importance and the recalibrated proxy step aside (ORT proxy, L1 ranking) instead of failing
    data = Dataset(np.random.default_rng(0).random((16, 3, 224, 224), dtype=np.float32), None, "noise")
    ctx = SearchContext(bg, split_dataset(data, 0), "storage", proxy_size=2, calib_size=2, finetune_seconds=0)
    settings = GraphRLSettings(episodes=2, batch=2, hidden=16, heads=2, fisher_samples=2, importance_samples=2)
    result = run_graph_rl(bg, ctx, "storage", flops=0.5, evaluations=1, settings=settings, prior="l1-fisher")
    assert model_cost(bg, result.config).macs_fraction <= 0.5
    assert [h["kind"] for h in result.history].count("real") == 1
    assert result.extra["channel_importance"] == "l1"


def test_the_command_line_offers_every_prior():
    from hirelc_onnx.commands.compress import compress
    from hirelc_onnx.search.graph_rl import PRIORS

    option = next(p for p in compress.params if p.name == "prior")
    assert tuple(option.type.choices) == PRIORS


def test_selection_ties_within_one_standard_error_and_the_loss_decides(reference_models):
    from hirelc_onnx.search.selection import Selection

    bg = build_block_graph(load_model(reference_models("vgg")))
    select = Selection(SearchContext(bg, split_dataset(load_digits(), 0), "ort-cpu", finetune_seconds=0,
                                     proxy_size=32))
    n = select.rows
    assert select.accuracy and n > 300
    # near the ceiling one standard error is about two rows: two rows behind ties, the lower loss wins
    se = np.sqrt(0.99 * 0.01 / n)
    assert np.isclose(select.tolerance(0.99), se) and 1.5 / n < se < 2.5 / n
    assert select.pick([("best", 0.99, 0.30), ("close", 0.99 - 2 / n, 0.10)]) == "close"
    # further than one standard error behind: the higher score wins whatever the loss
    assert select.pick([("best", 0.99, 0.30), ("behind", 0.99 - 3 / n, 0.01)]) == "best"
    # a perfect score has no spread: the band is still one row
    assert select.tolerance(1.0) == 1 / n and select.pick([("a", 1.0, 0.2), ("b", 1.0 - 1 / n, 0.1)]) == "b"
    # a score that is not an accuracy (here: a metric) ties within one row only
    select.accuracy = False
    assert select.tolerance(0.99) == 1 / n
    assert select.pick([("best", 0.99, 0.30), ("close", 0.99 - 2 / n, 0.10)]) == "best"


def test_graph_rl_recalibrates_and_prunes_when_its_only_cut_is_timed_too_slow(reference_models, monkeypatch):
    """--speedup where the latency table says no pruning is needed: every episode projects onto the
    unpruned cut, one distinct candidate for three evaluations. Timed whole too slow (1.49x for 1.5x:
    ResNet-20 in bench/speed), it is not the end: the estimate is recalibrated on the timing and the
    greedy episode projected again under it, pruned, and that one (timed clearly over the goal) wins."""
    from hirelc_onnx.evaluate.kernel_latency import KernelLatency
    from hirelc_onnx.search.speed import SpeedGoal

    bg = build_block_graph(load_model(reference_models("resnet20")))
    n = len(bg.kernels)  # a made-up table: all-int8 unpruned is estimated at 1.85x, so nothing needs cutting
    table = {name: KernelLatency({32: 1.0}, {32: 0.5}, {32: n + 2.0}) for name in bg.kernels}
    goal = SpeedGoal(1.5, 32, table, bg.model)
    timings, sizes = [], []

    def measure(model):  # the first model timed (the unpruned cut) runs 1.49x, one with fewer weights 1.8x
        sizes.append(sum(int(np.prod(t.dims)) for t in model.graph.initializer))
        timings.append(1.8 if sizes[-1] < sizes[0] else 1.49)
        return timings[-1]

    monkeypatch.setattr(goal, "measure", measure)
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), "ort-cpu", finetune_seconds=0, proxy_size=32)
    ctx.speed_goal = goal
    result = run_graph_rl(bg, ctx, "ort-cpu", evaluations=3, settings=TINY, prior="none")
    real = [h for h in result.history if h["kind"] == "real"]
    assert timings[0] == 1.49 and real[0]["macs_fraction"] == pytest.approx(1.0)  # the one distinct cut, too slow
    assert real[-1]["source"] == "recalibrated" and real[-1]["speedup"] == 1.8 and real[-1]["feasible"]
    assert goal.scale < 1.0 and len(real) <= 3
    assert model_cost(bg, result.config).macs_fraction < 1.0  # the pruned one is returned, not the slow one
