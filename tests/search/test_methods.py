"""The method registry: one row per method, and each run function takes exactly what its row says."""
from __future__ import annotations

import inspect

import pytest

from hirelc_onnx.commands.compress import compress as compress_command
from hirelc_onnx.commands.data_options import IMAGE_OPTION_NAMES
from hirelc_onnx.errors import UserError, interface
from hirelc_onnx.search.methods import METHODS, SPENT_OPTIONS, OPTIONS, check_options, get_method

GENERAL = {"model", "data", "method", "target", "seed", "split_fractions", "out_dir", "output_model", "overwrite", "as_json",  # compress's own
           "input_shape", *IMAGE_OPTION_NAMES,  # data options: how inputs are read or synthesised
           "output_kind", "metric", "metric_mode",  # scoring options: how outputs are scored
           "workers", "ray",  # where real evaluations run (search/executors.py)
           "latency_runs"}  # how the report times the emitted model


@pytest.mark.parametrize("name", list(METHODS))
def test_run_function_takes_exactly_its_options(name):
    method = METHODS[name]
    params = inspect.signature(method.load()).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == ["bg", "ctx", "target"]
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)  # nothing is swallowed
    keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert keywords == (method.options - SPENT_OPTIONS) | method.receives
    assert method.receives <= {"seed", "progress", "state_path"}


def test_the_cli_offers_every_method_and_only_known_options():
    params = {p.name for p in compress_command.params}
    choices = next(p for p in compress_command.params if p.name == "method").type.choices
    assert list(choices) == list(METHODS)
    assert params - GENERAL == OPTIONS - {"settings"}  # settings: a dataclass, Python only


def test_default_budgets_are_the_methods_own():
    """compress passes a method's default budget explicitly (and says so): the same figure its settings hold."""
    from hirelc_onnx.search.hirelc import HiReLCSettings
    from hirelc_onnx.search.two_stage import TwoStageSettings

    assert METHODS["hirelc"].default_budget == HiReLCSettings().default_budget
    assert METHODS["two-stage"].default_budget == TwoStageSettings().default_ratio
    assert all(m.default_budget is None or "budget" in m.options for m in METHODS.values())


def test_unknown_method_lists_the_choices():
    with pytest.raises(UserError, match="unknown method 'magic'; choose one of hirelc, graph-rl, "):
        get_method("magic")


def test_options_are_checked_against_the_row():
    check_options(METHODS["random"], ["budget", "evaluations"])
    with pytest.raises(UserError, match=r"^method='random' does not take resume= \(it takes: batch=, budget=, "
                                        r"channel_multiple=, evaluations=, finetune_epochs=, finetune_seconds=, "
                                        r"speedup=, weight_range=\)$"):
        check_options(METHODS["random"], ["budget", "resume"])
    with interface("cli"), pytest.raises(UserError, match=r"^--method random does not take --resume \(it takes: "
                                                          r"--batch, --budget, --channel-multiple, --evaluations, "
                                                          r"--finetune-epochs, --finetune-seconds, --speedup, "
                                                          r"--weight-range\)$"):
        check_options(METHODS["random"], ["budget", "resume"])
    with pytest.raises(UserError, match=r"^method='ort-int8' does not take keep= \(it takes no method options\)$"):
        check_options(METHODS["ort-int8"], ["keep"])
    with pytest.raises(UserError, match="^unknown option 'bitz'; the method options are "):
        check_options(METHODS["uniform"], ["bitz"])
