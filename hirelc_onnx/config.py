"""The one currency between search and rewrites: a per-kernel compression choice."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from hirelc_onnx.errors import UserError
from passes.quantize import GRANULARITIES  # the quantizer's grids, defined with it
from passes.quantize_weights import TARGETS  # the weight pass's encodings, defined with it

__all__ = [
    "BITS_CHOICES",
    "QTYPES",
    "WEIGHT_RANGES",
    "DEFAULT_WEIGHT_RANGE",
    "GRANULARITIES",
    "TARGETS",
    "ConfigError",
    "KernelConfig",
    "CompressionConfig",
]

BITS_CHOICES = (2, 3, 4, 5, 6, 7, 8, 32)
QTYPES = ("symmetric", "asymmetric")
WEIGHT_RANGES = ("mse", "minmax")
"""How each quantized weight's range is set before its min-max grid is fitted: `mse` clamps each
group to the fraction of its range that minimises the squared error (`passes.clip_weights`),
`minmax` keeps the full range."""
DEFAULT_WEIGHT_RANGE = "mse"


class ConfigError(UserError, ValueError):
    """A compression config that cannot be applied; the message names the kernel and the field."""


@dataclass(frozen=True)
class KernelConfig:
    """What to do to one compressible kernel.

    bits: 2-8 quantizes the weight to that many bits; 32 leaves it fp32.
    keep_ratio: fraction of the kernel's output channels kept by structured pruning (0, 1].
        Pruning acts on channel groups: the effective keep of a group is decided from the
        ratios of the kernels that produce it.
    qtype: symmetric (zero point 0) or asymmetric (min/max grid with a zero point).
    granularity: per-tensor, per-channel (one scale per output channel), per-group (one scale
        per `group_size` consecutive weights of an output channel's fan-in), or log2
        (power-of-two levels times a per-channel scale).
    """

    bits: int = 32
    keep_ratio: float = 1.0
    qtype: str = "symmetric"
    granularity: str = "per-channel"
    group_size: int = 32

    def validate(self, name: str = "<kernel>") -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in BITS_CHOICES:
            raise ConfigError(f"kernel {name!r}: bits must be one of 2..8 or 32, got {self.bits!r}")
        if (
            not isinstance(self.keep_ratio, (int, float))
            or isinstance(self.keep_ratio, bool)
            or math.isnan(self.keep_ratio)
            or not (0.0 < self.keep_ratio <= 1.0)
        ):
            raise ConfigError(f"kernel {name!r}: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.qtype not in QTYPES:
            raise ConfigError(f"kernel {name!r}: qtype must be one of {QTYPES}, got {self.qtype!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"kernel {name!r}: granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"kernel {name!r}: group_size must be an integer >= 2, got {self.group_size!r}")

    @property
    def quantized(self) -> bool:
        return self.bits < 32

    @property
    def pruned(self) -> bool:
        return self.keep_ratio < 1.0


_UNTOUCHED = KernelConfig()
"""What `CompressionConfig.get` returns for a kernel the config does not name."""


@dataclass
class CompressionConfig:
    """One KernelConfig per kernel name, plus the deployment target the model is emitted for.

    channel_multiple: pruned channel counts are rounded to a multiple of it (`specs.group_keep_counts`);
    None: the run's (--channel-multiple, held by the BlockGraph). compress writes the run's value here.
    weight_range: one of WEIGHT_RANGES (`specs.weight_range`); None: the run's (--weight-range, held by
    the BlockGraph). compress writes the run's value here too.
    """

    kernels: dict[str, KernelConfig] = field(default_factory=dict)
    target: str = "storage"
    channel_multiple: int | None = None
    weight_range: str | None = None

    def validate(self, known_kernels: Iterable[str] | None = None) -> "CompressionConfig":
        """Check every field; with `known_kernels`, refuse names the model does not have."""
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        multiple = self.channel_multiple
        if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1):
            raise ConfigError(f"channel_multiple must be an integer >= 1, got {multiple!r}")
        if self.weight_range is not None and self.weight_range not in WEIGHT_RANGES:
            raise ConfigError(f"weight_range must be one of {WEIGHT_RANGES}, got {self.weight_range!r}")
        if known_kernels is not None:
            known = set(known_kernels)
            unknown = sorted(set(self.kernels) - known)
            if unknown:
                raise ConfigError(
                    f"unknown kernel {unknown[0]!r} (the model's kernels are listed by `hirelc-onnx inspect`)"
                )
        for name, kc in self.kernels.items():
            if not isinstance(kc, KernelConfig):
                raise ConfigError(f"kernel {name!r}: expected a KernelConfig, got {type(kc).__name__}")
            kc.validate(name)
        return self

    def get(self, name: str) -> KernelConfig:
        kc = self.kernels.get(name)
        return _UNTOUCHED if kc is None else kc  # shared (frozen): a reward calls this ~10^5 times a round

    @classmethod
    def uniform(cls, names: Iterable[str], target: str = "storage", **fields) -> "CompressionConfig":
        kc = KernelConfig(**fields)
        return cls({n: kc for n in names}, target=target).validate()

    # --- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"target": self.target, "kernels": {n: asdict(k) for n, k in self.kernels.items()}}
        if self.channel_multiple is not None:
            out["channel_multiple"] = self.channel_multiple
        if self.weight_range is not None:
            out["weight_range"] = self.weight_range
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "CompressionConfig":
        if not isinstance(data, Mapping) or not isinstance(data.get("kernels", {}), Mapping):
            raise ConfigError("config JSON must be an object with a 'kernels' object")
        kernels = {}
        allowed = set(KernelConfig.__dataclass_fields__)
        for name, fields in data.get("kernels", {}).items():
            if not isinstance(fields, Mapping):
                raise ConfigError(f"kernel {name!r}: expected an object, got {fields!r}")
            extra = set(fields) - allowed
            if extra:
                raise ConfigError(f"kernel {name!r}: unknown field {sorted(extra)[0]!r}")
            kernels[name] = KernelConfig(**fields)
        return cls(kernels, target=data.get("target", "storage"),
                   channel_multiple=data.get("channel_multiple"), weight_range=data.get("weight_range")).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CompressionConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)
