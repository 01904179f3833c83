"""HiReLC's resumable state: a HiReLCState round-trips through save/load, best model and agents included,
the companions of earlier saves are removed, and only the run it was written for may load it."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph import build_block_graph, load_model, model_cost
from hirelc_onnx.search.features import config_key
from hirelc_onnx.search.hirelc_state import (PROBE, STATE_VERSION, HiReLCState, RealPoint, agents_path,
                                             best_model_path)
from hirelc_onnx.search.surrogate import ProxyObservation


@pytest.fixture(scope="module")
def bg(reference_models):
    return build_block_graph(load_model(reference_models("resnet20")))


def _state(bg) -> HiReLCState:
    kernels = sorted(bg.kernels)
    probes = [ProxyObservation(CompressionConfig({k: PROBE}, "storage"), 0.1 * i, 1.0 - 0.01 * i)
              for i, k in enumerate(kernels)]
    config = CompressionConfig({kernels[0]: KernelConfig(bits=4), kernels[1]: KernelConfig(keep_ratio=0.5)},
                               "storage")
    other = CompressionConfig({kernels[2]: KernelConfig(bits=6)}, "storage")
    points = [RealPoint(0, config, config_key(config), 0.91, model_cost(bg, config), True, 1.5, "prior", 0.9,
                        model=bg.model),
              RealPoint(1, other, config_key(other), 0.89, model_cost(bg, other), False, 0.5, "voted", 0.92)]
    prune_probes = [ProxyObservation(CompressionConfig({kernels[0]: KernelConfig(keep_ratio=0.75)}, "storage"),
                                     0.3, 0.7)]
    return HiReLCState(kernels, 6.0, "storage", 3, {"seed": 3}, probes, prune_probes,
                       kernel_sensitivity={k: i / len(kernels) for i, k in enumerate(kernels)},
                       block_sensitivity={b.id: 0.5 for b in bg.blocks}, sensitivity_source="proxy probe",
                       kernel_share={k: 1 / len(kernels) for k in kernels},
                       next_round=2, proxies={config_key(c): ProxyObservation(c, 0.2, 0.8) for c in (config, other)},
                       real=points, history=[{"kind": "real", "round": 0}], round_seconds=[3.0, 2.0],
                       current=other, levels=[1] * len(bg.blocks),
                       estimator={"scale_q": 1.25, "scale_p": 0.5, "decay": 3.0}, finetune_lr=2e-4,
                       agents=b"saved ensembles")


def test_state_round_trips_through_save_and_load(bg, tmp_path):
    path = tmp_path / "search_state.json"
    state = _state(bg)
    state.save(path, lambda config, cost: np.array([cost.ratio, float(len(config.kernels))]))
    data = json.loads(path.read_text())
    assert data["version"] == STATE_VERSION and data["best_model"]["key"] == state.real[0].key
    assert data["best_model"]["path"] == best_model_path(path, 0).name  # the best was measured in round 0
    assert data["agents"] == agents_path(path, 2).name and agents_path(path, 2).read_bytes() == b"saved ensembles"
    assert data["surrogate_data"]["y"] == [0.91, 0.89] and len(data["surrogate_data"]["x"]) == 2

    loaded = HiReLCState.load(path, bg, 6.0, "storage", 3, SimpleNamespace(cost=lambda c: model_cost(bg, c)))
    for name in ("kernels", "budget", "target", "seed", "rng", "probes", "prune_probes", "kernel_sensitivity", "block_sensitivity",
                 "sensitivity_source", "next_round", "proxies", "history", "round_seconds", "current", "levels",
                 "estimator", "finetune_lr", "agents", "kernel_share"):
        assert getattr(loaded, name) == getattr(state, name), name
    assert [p.to_json() for p in loaded.real] == [p.to_json() for p in state.real]
    assert [p.cost for p in loaded.real] == [p.cost for p in state.real]
    # the best measurement's emitted model comes back from its file; the others hold none
    assert loaded.real[0].model.SerializeToString() == bg.model.SerializeToString()
    assert loaded.real[1].model is None
    assert isinstance(loaded.real[0].model, onnx.ModelProto)


def test_load_is_none_without_a_file_and_refuses_another_run(bg, tmp_path):
    path = tmp_path / "search_state.json"
    no_ctx = object()  # the checks come before any cost is computed
    assert HiReLCState.load(path, bg, 6.0, "storage", 3, no_ctx) is None
    assert HiReLCState.load(None, bg, 6.0, "storage", 3, no_ctx) is None
    _state(bg).save(path, lambda config, cost: np.zeros(1))
    with pytest.raises(UserError, match="seed=3"):
        HiReLCState.load(path, bg, 6.0, "storage", 4, no_ctx)
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        HiReLCState.load(path, bg, 6.0, "storage", 3, no_ctx)


def test_a_save_replaces_the_companions_of_the_previous_one(bg, tmp_path):
    path = tmp_path / "search_state.json"
    state = _state(bg)
    state.save(path, lambda config, cost: np.zeros(1))
    # the next round: a new best (round 2) and new agents; the previous round's files go
    state.next_round = 3
    state.real.append(RealPoint(2, state.real[1].config, "k2", 0.95, state.real[1].cost, True, 1.0, "pool", 0.9,
                                model=bg.model))
    state.real[0].model = None
    state.agents = b"round three"
    state.save(path, lambda config, cost: np.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, best_model_path(path, 2).name, agents_path(path, 3).name])
    loaded = HiReLCState.load(path, bg, 6.0, "storage", 3, SimpleNamespace(cost=lambda c: model_cost(bg, c)))
    assert loaded.agents == b"round three" and loaded.real[2].model is not None
    assert loaded.real[0].model is None


def test_a_missing_agents_file_resumes_with_fresh_agents(bg, tmp_path):
    path = tmp_path / "search_state.json"
    _state(bg).save(path, lambda config, cost: np.zeros(1))
    agents_path(path, 2).unlink()
    loaded = HiReLCState.load(path, bg, 6.0, "storage", 3, SimpleNamespace(cost=lambda c: model_cost(bg, c)))
    assert loaded.agents is None and loaded.next_round == 2


def test_a_save_killed_before_its_document_leaves_the_previous_state_whole(bg, tmp_path, monkeypatch):
    path = tmp_path / "search_state.json"
    state = _state(bg)
    state.save(path, lambda config, cost: np.zeros(1))

    def die(*args, **kwargs):
        raise SystemExit("killed")  # the process dies where the document would be written

    state.next_round, state.agents = 3, b"round three"
    monkeypatch.setattr("hirelc_onnx.search.hirelc_state.write_json", die)
    with pytest.raises(SystemExit):
        state.save(path, lambda config, cost: np.zeros(1))
    monkeypatch.undo()
    assert agents_path(path, 3).exists()  # the new round's companion, which no document names yet
    loaded = HiReLCState.load(path, bg, 6.0, "storage", 3, SimpleNamespace(cost=lambda c: model_cost(bg, c)))
    assert loaded.next_round == 2 and loaded.agents == b"saved ensembles"
    assert loaded.real[0].model is not None
