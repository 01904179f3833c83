"""HiReLC's memory between rounds (`HiReLCState`): what `run_hirelc` has learnt so far, saved after every
round so that `resume=True` continues with the next one.

On disk it is one JSON document, written atomically, beside the emitted model of the best
measurement (`<state>.best.onnx`), so a resumed run need not measure that one again. A state only
resumes the run it was written for: same kernels, budget, target and seed, same STATE_VERSION.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph.blockgraph import BlockGraph
from hirelc_onnx.graph.cost import ModelCost
from hirelc_onnx.graph.loader import load_model
from hirelc_onnx.io import write_json
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.features import config_key
from hirelc_onnx.search.surrogate import ProxyObservation

__all__ = ["STATE_VERSION", "PROBE", "RealPoint", "HiReLCState", "best_model_path"]

STATE_VERSION = 2  # 2: probes at 4 bits
# The single-kernel proxy probe. 4 bits, not 2: at 2 bits the most sensitive kernels saturate the
# logits (EfficientNet-Lite0: their 2-bit / 4-bit damage ratio is 2-8, against 20-100 for the rest),
# which flattens the very differences the estimator needs; 4 bits is also where the decisions lie.
PROBE = KernelConfig(bits=4, granularity="per-channel")


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
    streams (for inspection, never read back). The working config and block levels are None until
    the first round is saved.
    """

    kernels: list[str]
    budget: float
    target: str
    seed: int
    rng: dict[str, Any]
    probes: list[ProxyObservation]
    """One per kernel: that kernel alone at PROBE, the estimator's calibration and the fallback sensitivity."""
    kernel_sensitivity: dict[str, float]
    block_sensitivity: dict[int, float]
    sensitivity_source: str
    next_round: int = 0
    proxies: dict[str, ProxyObservation] = field(default_factory=dict)
    """Config key -> proxy result of every config the real proxy has scored."""
    real: list[RealPoint] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    current: CompressionConfig | None = None
    """The working config the agents refine (SearchProblem.current)."""
    levels: list[int] | None = None
    """The budget level of each block (SearchProblem.block_levels)."""

    def save(self, path: Path, features: Callable[[CompressionConfig, ModelCost], np.ndarray]) -> None:
        """Write the state as one JSON document, atomically.

        features: the surrogate's feature function. Its training rows are kept too (features as
        computed at save time), for inspection; on resume the surrogate is retrained from the
        measurements' configs, since the features depend on the estimator's calibration.
        """
        data = {
            **_identity(self.kernels, self.budget, self.target, self.seed),
            "next_round": self.next_round,
            "rng": self.rng,
            "probes": [{"kernel": next(iter(p.config.kernels)), "logit_mse": p.logit_mse, "agreement": p.agreement}
                       for p in self.probes],
            "proxies": [{"config": o.config.to_dict(), "logit_mse": o.logit_mse, "agreement": o.agreement}
                        for o in self.proxies.values()],
            "measurements": [p.to_json() for p in self.real],
            "surrogate_data": {"x": [features(p.config, p.cost).tolist() for p in self.real],
                               "y": [p.score for p in self.real]},
            "history": self.history,
            "current": None if self.current is None else self.current.to_dict(),
            "levels": self.levels,
            "sensitivity": {"source": self.sensitivity_source, "kernel": self.kernel_sensitivity,
                            "block": {str(b): s for b, s in self.block_sensitivity.items()}},
            "round_seconds": self.round_seconds,
            "best_model": {"key": next((p.key for p in self.real if p.model is not None), None),
                           "path": best_model_path(path).name},
        }
        write_json(path, data, indent=1)

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
                                f"has {value!r}; delete it (or drop --resume) to start afresh")
        state = cls.from_json(data, ctx.cost)
        state.restore_best_model(path, data["best_model"]["key"])
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
            kernel_sensitivity=sensitivity["kernel"],
            block_sensitivity={int(b): s for b, s in sensitivity["block"].items()},
            sensitivity_source=sensitivity["source"],
            next_round=data["next_round"],
            proxies={config_key(o.config): o for o in proxies},
            real=[RealPoint.from_json(r, cost) for r in data["measurements"]],
            history=data["history"], round_seconds=data["round_seconds"],
            current=None if data["current"] is None else CompressionConfig.from_dict(data["current"]),
            levels=data["levels"])

    def restore_best_model(self, path: Path, key: str | None) -> None:
        """Reattach the saved emitted model of the best measurement, so a resumed run need not re-measure it."""
        model_path = best_model_path(path)
        for p in self.real:
            if p.key == key and model_path.exists():
                p.model = load_model(model_path, check=False)


def _identity(kernels: list[str], budget: float, target: str, seed: int) -> dict[str, Any]:
    """What a saved state must match to be resumed by a run."""
    return {"version": STATE_VERSION, "method": "hirelc", "kernels": kernels, "budget": budget, "target": target,
            "seed": seed}


def best_model_path(state_path: Path) -> Path:
    """Where the emitted model of the best measurement is kept, beside the state."""
    return state_path.with_name(state_path.stem + ".best.onnx")
