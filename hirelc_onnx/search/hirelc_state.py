"""HiReLC's memory between rounds (`HiReLCState`): what `run_hirelc` has learnt so far, saved after every
round so that `resume=True` continues with the next one exactly as the uninterrupted run would have.

On disk it is one JSON document and two companion files, each written atomically:
  <state>.json            rounds done, probes, proxy results, measurements, history, working config
                          and levels, the proxy estimator's calibration, the fine-tuning learning rate
  <state>.agents.r<N>.pt  the ensembles' weights, optimizer states and counters after round N
                          (agents.save_ensembles; read back with torch's weights_only loader)
  <state>.best.r<N>.onnx  the emitted model of the best measurement (made in round N), so a resumed
                          run need not measure it again
The companions are written first, under names no earlier round used, then the JSON that names them
(the commit point), then older companions are removed: a run killed at any instant leaves a JSON
whose companions exist and belong to it. A state only resumes the run it was written for: same
kernels, budget, target and seed, same STATE_VERSION.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError, option
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost
from hirelc_onnx.graph.loader import load_model
from hirelc_onnx.io import write_atomic, write_json
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.features import config_key
from hirelc_onnx.search.surrogate import ProxyObservation, prune_probe_configs

__all__ = ["STATE_VERSION", "PROBE", "RealPoint", "HiReLCState", "best_model_path", "agents_path", "observe",
           "probe_configs", "measure_probes"]

log = logging.getLogger(__name__)

STATE_VERSION = 4  # 2: probes at 4 bits; 3: ensembles, estimator and fine-tuning rate saved (resume replays);
# 4: pruning probes
# The single-kernel proxy probe. 4 bits, not 2: at 2 bits the most sensitive kernels saturate the
# logits (EfficientNet-Lite0: their 2-bit / 4-bit damage ratio is 2-8, against 20-100 for the rest),
# which flattens the very differences the estimator needs; 4 bits is also where the decisions lie.
PROBE = KernelConfig(bits=4, granularity="per-channel")


def observe(ctx: SearchContext, config: CompressionConfig) -> ProxyObservation:
    """One real proxy evaluation of `config` (ONNX Runtime on the proxy batch, no fine-tuning)."""
    p = ctx.proxy(config)
    return ProxyObservation(config, p.logit_mse, p.agreement)


def probe_configs(bg: BlockGraph, target: str) -> list[CompressionConfig]:
    """Every probe a fresh search scores, in order: each kernel alone at PROBE, then each prunable channel
    group's producers pruned (`surrogate.prune_probe_configs`)."""
    return [CompressionConfig({name: PROBE}, target) for name in bg.kernels] + prune_probe_configs(bg, target)


def measure_probes(ctx: SearchContext, bg: BlockGraph, configs: list[CompressionConfig],
                   step: Callable[[], None] | None = None, first_probe: Callable[[float], None] | None = None
                   ) -> tuple[list[ProxyObservation], list[ProxyObservation]]:
    """`probe_configs` scored by the real proxy: (the kernels' quantization probes, the groups' pruning
    probes), what `ProxyEstimator.from_probes` takes. step: called after each; first_probe: told the
    seconds the first took (what every later candidate will cost)."""
    observed = []
    for config in configs:
        start = time.perf_counter()
        observed.append(observe(ctx, config))
        if len(observed) == 1 and first_probe is not None:
            first_probe(time.perf_counter() - start)
        if step is not None:
            step()
    return observed[:len(bg.kernels)], observed[len(bg.kernels):]


@dataclass
class RealPoint:
    """One real measurement as the search keeps it (the emitted model only while it is the best)."""

    round: int
    config: CompressionConfig
    key: str
    score: float
    cost: ModelCost
    finetuned: bool
    seconds: float
    source: str
    predicted: float
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"round": self.round, "config": self.config.to_dict(), "key": self.key, "score": self.score,
                "finetuned": self.finetuned, "seconds": self.seconds, "source": self.source,
                "predicted": self.predicted}

    @classmethod
    def from_json(cls, r: dict, cost: Callable[[CompressionConfig], ModelCost]) -> RealPoint:
        """The point saved by `to_json`; its cost is not saved but recomputed by `cost`."""
        config = CompressionConfig.from_dict(r["config"])
        return cls(r["round"], config, r["key"], r["score"], cost(config), r["finetuned"], r["seconds"], r["source"],
                   r["predicted"])


@dataclass
class HiReLCState:
    """Everything `run_hirelc` carries from one round to the next.

    The first four fields say whose state it is; `rng` records how the loop seeds its random
    streams (for inspection, never read back). The working config, block levels, estimator
    calibration and agents are None until the first round is saved.
    """

    kernels: list[str]
    budget: float
    target: str
    seed: int
    rng: dict[str, Any]
    probes: list[ProxyObservation]
    """One per kernel: that kernel alone at PROBE, the estimator's calibration and the fallback sensitivity."""
    prune_probes: list[ProxyObservation]
    """One per prunable channel group: its producers at PRUNE_PROBE_KEEP (the estimator's pruning costs)."""
    kernel_sensitivity: dict[str, float]
    block_sensitivity: dict[int, float]
    sensitivity_source: str
    next_round: int = 0
    proxies: dict[str, ProxyObservation] = field(default_factory=dict)
    """Config key -> proxy result of every config the real proxy has scored."""
    real: list[RealPoint] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    kernel_share: dict[str, float] = field(default_factory=dict)
    """Each kernel's share of the total sensitivity (sums to 1; the report's scale, as `inspect --sensitivity`)."""
    current: CompressionConfig | None = None
    """The working config the agents refine (SearchProblem.current)."""
    levels: list[int] | None = None
    """The budget level of each block (SearchProblem.block_levels)."""
    estimator: dict[str, float] | None = None
    """The proxy estimator's calibration (ProxyEstimator.state()): each round's refit starts from it."""
    finetune_lr: float | None = None
    """The learning rate the first fine-tune settled on (SearchContext.finetune_lr): later ones start there."""
    agents: bytes | None = field(default=None, repr=False)
    """The ensembles' learning so far (agents.save_ensembles), kept in the `agents_path` companion."""

    def save(self, path: Path, features: Callable[[CompressionConfig, ModelCost], np.ndarray]) -> None:
        """Write the companions, then the JSON document naming them, then remove older companions.

        features: the surrogate's feature function. Its training rows are kept too (features as
        computed at save time), for inspection; on resume the surrogate is retrained from the
        measurements' configs, since the features depend on the estimator's calibration.
        """
        best = next((p for p in self.real if p.model is not None), None)
        best_file = None if best is None else best_model_path(path, best.round)
        # the best made this round is written (a killed attempt at this round may have left another);
        # an older best is already on disk unless its file was lost
        if best is not None and (best.round >= self.next_round - 1 or not best_file.exists()):
            write_atomic(best_file, best.model.SerializeToString())
        agents_file = None if self.agents is None else agents_path(path, self.next_round)
        if agents_file is not None:
            write_atomic(agents_file, self.agents)
        data = {
            **_identity(self.kernels, self.budget, self.target, self.seed),
            "next_round": self.next_round,
            "rng": self.rng,
            "probes": [{"kernel": next(iter(p.config.kernels)), "logit_mse": p.logit_mse, "agreement": p.agreement}
                       for p in self.probes],
            "prune_probes": [{"config": p.config.to_dict(), "logit_mse": p.logit_mse, "agreement": p.agreement}
                             for p in self.prune_probes],
            "proxies": [{"config": o.config.to_dict(), "logit_mse": o.logit_mse, "agreement": o.agreement}
                        for o in self.proxies.values()],
            "measurements": [p.to_json() for p in self.real],
            "surrogate_data": {"x": [features(p.config, p.cost).tolist() for p in self.real],
                               "y": [p.score for p in self.real]},
            "history": self.history,
            "current": None if self.current is None else self.current.to_dict(),
            "levels": self.levels,
            "sensitivity": {"source": self.sensitivity_source, "kernel": self.kernel_sensitivity,
                            "block": {str(b): s for b, s in self.block_sensitivity.items()},
                            "share": self.kernel_share},
            "round_seconds": self.round_seconds,
            "estimator": self.estimator,
            "finetune_lr": self.finetune_lr,
            "best_model": {"key": None if best is None else best.key,
                           "path": None if best_file is None else best_file.name},
            "agents": None if agents_file is None else agents_file.name,
        }
        write_json(path, data, indent=1)
        _remove_companions(path, keep={best_file, agents_file})

    @classmethod
    def load(cls, path: Path | None, bg: BlockGraph, budget: float, target: str, seed: int,
             ctx: SearchContext) -> HiReLCState | None:
        """The state saved at `path` for this very run (None when there is none), its best model reattached.

        Raises UserError when the file is unreadable or was written for another model, budget,
        target, seed or state version. ctx recomputes the measurements' costs.
        """
        if path is None or not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot resume: the search state {path} is unreadable ({exc}); delete it to start "
                            f"afresh") from None
        for key, value in _identity(sorted(bg.kernels), budget, target, seed).items():
            if data.get(key) != value:
                raise UserError(f"cannot resume from {path}: it was written for {key}={data.get(key)!r}, this run "
                                f"has {value!r}; delete it (or drop {option('resume')}) to start afresh")
        state = cls.from_json(data, ctx.cost)
        state.restore_best_model(path, data["best_model"])
        if data["agents"] is not None:
            agents_file = path.with_name(data["agents"])
            if agents_file.is_file():
                state.agents = agents_file.read_bytes()
            else:
                log.warning("the ensembles' saved state %s is missing: they start afresh, so this resumed run "
                            "will differ from an uninterrupted one", agents_file)
        return state

    @classmethod
    def from_json(cls, data: dict, cost: Callable[[CompressionConfig], ModelCost]) -> HiReLCState:
        """The state in a document written by `save` (unchecked: `load` checks); `cost` recomputes costs."""
        target, sensitivity = data["target"], data["sensitivity"]
        proxies = (ProxyObservation(CompressionConfig.from_dict(p["config"]), p["logit_mse"], p["agreement"])
                   for p in data["proxies"])
        return cls(
            kernels=data["kernels"], budget=data["budget"], target=target, seed=data["seed"], rng=data["rng"],
            probes=[ProxyObservation(CompressionConfig({p["kernel"]: PROBE}, target), p["logit_mse"], p["agreement"])
                    for p in data["probes"]],
            prune_probes=[ProxyObservation(CompressionConfig.from_dict(p["config"]), p["logit_mse"], p["agreement"])
                          for p in data["prune_probes"]],
            kernel_sensitivity=sensitivity["kernel"],
            block_sensitivity={int(b): s for b, s in sensitivity["block"].items()},
            sensitivity_source=sensitivity["source"], kernel_share=sensitivity.get("share", {}),
            next_round=data["next_round"],
            proxies={config_key(o.config): o for o in proxies},
            real=[RealPoint.from_json(r, cost) for r in data["measurements"]],
            history=data["history"], round_seconds=data["round_seconds"],
            current=None if data["current"] is None else CompressionConfig.from_dict(data["current"]),
            levels=data["levels"], estimator=data["estimator"], finetune_lr=data["finetune_lr"])

    def restore_best_model(self, path: Path, best: dict[str, str | None]) -> None:
        """Reattach the saved emitted model of the best measurement, so a resumed run need not re-measure it.

        best: the document's "best_model" entry (the measurement's key, the companion's file name).
        """
        if best["path"] is None:
            return
        model_path = path.with_name(best["path"])
        for p in self.real:
            if p.key == best["key"] and model_path.is_file():
                p.model = load_model(model_path, check=False)


def _identity(kernels: list[str], budget: float, target: str, seed: int) -> dict[str, Any]:
    """What a saved state must match to be resumed by a run."""
    return {"version": STATE_VERSION, "method": "hirelc", "kernels": kernels, "budget": budget, "target": target,
            "seed": seed}


def best_model_path(state_path: Path, round_: int) -> Path:
    """Where the emitted model of the best measurement, made in round `round_`, is kept beside the state."""
    return state_path.with_name(f"{state_path.stem}.best.r{round_}.onnx")


def agents_path(state_path: Path, next_round: int) -> Path:
    """Where the ensembles' state is kept once round `next_round - 1` is done, beside the state."""
    return state_path.with_name(f"{state_path.stem}.agents.r{next_round}.pt")


def _remove_companions(state_path: Path, keep: set[Path | None]) -> None:
    """Remove the companion files of earlier saves (those the document just written does not name)."""
    for pattern in (f"{state_path.stem}.best.r*.onnx", f"{state_path.stem}.agents.r*.pt"):
        for old in state_path.parent.glob(pattern):
            if old not in keep:
                old.unlink(missing_ok=True)
