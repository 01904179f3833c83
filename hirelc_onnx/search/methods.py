"""Every compression method in one table: what runs it, whether it needs data, which options it takes.

`compress` looks a method up here and nowhere else. Each run function takes the BlockGraph, the
SearchContext (on synthesised inputs without data) and the target, then exactly the keyword options listed in its
row (`options`, less the fine-tuning ones the context spends) plus the values compress hands every
method that wants them (`receives`); tests/search/test_methods.py holds each signature to its row.
An option a method would ignore is refused before any work (`check_options`), so `--resume` with
`--method random` is an error, not a silent no-op.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from hirelc_onnx.errors import InvalidOptionError, option

if TYPE_CHECKING:
    from hirelc_onnx.search.baselines import MethodResult

__all__ = ["Method", "METHODS", "FINETUNE_OPTIONS", "PRUNING_OPTIONS", "QUANT_OPTIONS", "SPEED_OPTIONS", "SPENT_OPTIONS", "OPTIONS", "check_options", "flag", "get_method", "takers"]

FINETUNE_OPTIONS = frozenset({"finetune_seconds", "finetune_epochs"})
"""Options the SearchContext spends (the fine-tuning of every real evaluation), never passed to a run."""

PRUNING_OPTIONS = frozenset({"channel_multiple"})
"""Options compress spends on the BlockGraph (pruned channel counts rounded to a multiple,
`specs.group_keep_counts`), taken by every method that prunes, never passed to a run."""

QUANT_OPTIONS = frozenset({"weight_range"})
"""Options compress spends on the BlockGraph (how quantized weights' ranges are set, `specs.weight_range`),
taken by every method whose config our passes quantize, never passed to a run."""

SPEED_OPTIONS = frozenset({"speedup", "batch"})
"""Options compress spends on the SearchContext (`ctx.speed_goal`, search/speed.py): a measured-latency
constraint the methods that take them read from there."""

SPENT_OPTIONS = FINETUNE_OPTIONS | PRUNING_OPTIONS | QUANT_OPTIONS | SPEED_OPTIONS
"""Options a method takes that compress spends itself: its run function never receives them."""

API_ONLY = frozenset({"settings"})
"""Options only the Python API can give (a method's settings dataclass); the CLI has no flag for them."""


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    name: str
    run: str
    """Where the run function lives, "module:function": imported when the method is chosen (hirelc and
    graph-rl pull in torch and stable-baselines3, which `hirelc-onnx --help` should not pay for)."""
    needs_data: bool
    """It needs real data (--data). Without it, the others run data-free: on inputs synthesised from
    the graph (evaluate/synthetic.py), scored by fidelity to fp32, without fine-tuning."""
    options: frozenset[str]
    """The options a user may give it (compress() keywords; --kebab-case on the command line)."""
    summary: str
    receives: frozenset[str] = frozenset()
    """compress's own values its run function takes as well: seed, progress, state_path."""
    default_budget: float | None = None
    """The size goal (true-bytes ratio) searched when no budget is given; compress passes it explicitly
    and says so (the run function's settings hold the same figure for direct calls)."""

    def load(self) -> Callable[..., MethodResult]:
        """The run function (imports its module)."""
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


_SEARCH = frozenset({"budget", "evaluations", *FINETUNE_OPTIONS, *PRUNING_OPTIONS, *QUANT_OPTIONS})

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("hirelc", "hirelc_onnx.search.hirelc:run_hirelc", False,
           _SEARCH | {"max_drop", "time_limit", "resume", "settings", *SPEED_OPTIONS},
           "hierarchical RL ensembles pick bits / keep / qtype / granularity per kernel (default)",
           frozenset({"seed", "progress", "state_path"}), default_budget=4.0),
    Method("graph-rl", "hirelc_onnx.search.graph_rl:run_graph_rl", True,
           _SEARCH | {"flops", "params", "bits", "prior", "time_limit", "settings", *SPEED_OPTIONS},
           "a graph-attention policy keeps or prunes each channel under a MACs / params / bytes limit",
           frozenset({"seed", "progress"})),
    Method("two-stage", "hirelc_onnx.search.two_stage:run_two_stage", True,
           frozenset({"budget", "evaluations", "max_drop", "time_limit", "settings", *PRUNING_OPTIONS,
                      *QUANT_OPTIONS}),
           "an agent prunes channels, learned masks prune weights, a second agent picks bit widths",
           frozenset({"seed", "progress"}), default_budget=30.0),
    Method("uniform", "hirelc_onnx.search.baselines:run_uniform", False,
           frozenset({"bits", "keep", "qtype", "granularity", *FINETUNE_OPTIONS, *PRUNING_OPTIONS, *QUANT_OPTIONS,
                      *SPEED_OPTIONS}),
           "the same bits and keep ratio for every kernel (under --speedup the largest keep that meets it)"),
    Method("uniform-l1", "hirelc_onnx.search.baselines:run_uniform_l1", True, _SEARCH,
           "uniform bits, uniform L1 pruning fitted to the budget; one candidate per bit width",
           frozenset({"progress"})),
    Method("l1-int8", "hirelc_onnx.search.baselines:run_l1_int8", False, frozenset({"keep", *FINETUNE_OPTIONS, *PRUNING_OPTIONS, *QUANT_OPTIONS}),
           "L1-magnitude uniform channel pruning, then 8-bit weights"),
    Method("ort-int8", "hirelc_onnx.search.baselines:run_ort_int8", True, frozenset(),
           "ONNX Runtime's own static int8 quantization of the fp32 model"),
    Method("knapsack", "hirelc_onnx.search.knapsack:run_knapsack", True, _SEARCH,
           "HiReLC without agents: the proxy estimator's damage-per-byte greedy fit, recalibrated each round",
           frozenset({"seed", "progress"})),
    Method("random", "hirelc_onnx.search.baselines:run_random", True, _SEARCH | SPEED_OPTIONS,
           "random configs fitted to the budget, each measured for real; the best on validation wins",
           frozenset({"seed", "progress"})),
)}

OPTIONS: frozenset[str] = frozenset().union(*(m.options for m in METHODS.values()))
"""Every method option there is (compress's own arguments -- data, target, seed, out_dir, ... -- aside)."""


def get_method(name: str) -> Method:
    """The row of `name`, or a UserError listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidOptionError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def flag(name: str) -> str:
    """How an option is spelled where the user gave it: --max-drop on the command line, max_drop= from
    Python (a Python-only one: settings= everywhere)."""
    return option(name, api_only=name in API_ONLY)


def takers(option: str) -> str:
    """The methods that take `option`, comma-separated (for help texts)."""
    return ", ".join(m.name for m in METHODS.values() if option in m.options)


def check_options(method: Method, given: Iterable[str]) -> None:
    """Refuse, in one line, an option no method knows or one `method` would ignore."""
    for name in given:
        if name not in OPTIONS:
            raise InvalidOptionError(f"unknown option {name!r}; the method options are {', '.join(sorted(OPTIONS))}")
        if name not in method.options:
            takes = ", ".join(flag(o) for o in sorted(method.options, key=lambda o: (o in API_ONLY, o)))
            raise InvalidOptionError(f"{option('method', method.name)} does not take {flag(name)} "
                            + (f"(it takes: {takes})" if takes else "(it takes no method options)"))
