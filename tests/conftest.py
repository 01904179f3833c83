"""Shared pytest fixtures for the whole suite.

Keep each fixture small, documented and lazily importing (so collecting a test module does not pay
for torch unless a test asks for it).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# latency timings in tests stop after their minimum rounds (`evaluate/runner.py: benchmark_side_by_side`),
# not after the seconds of rounds a real comparison gets; a test that needs a budget passes one
os.environ.setdefault("HIRELC_TIMING_BUDGET_S", "0")


@pytest.fixture(scope="session")
def reference_models() -> Callable[[str], Path]:
    """`get(name) -> Path` of a trained, exported reference model, built at most once.

    Names: "resnet20", "vgg", "mobilenetv2", "vit" (digits, 1x8x8 input), "efficientnet_lite0"
    (ImageNet, 3x224x224), "minilm_l6" (sentence embeddings; inputs input_ids, attention_mask) and
    "text_recognizer" (CTC, 1x32x160 lines -> (40, 37) scores), and "text_recognizer_small": the same
    recognizer trained on less (`examples/text_recognizer.py: SMALL_RECIPE`), for the tests that need a
    trained recognizer but not the benchmark's (its full training is the longest build of a fresh
    clone). "mobilenetv2" is the suite's shortened build too (`examples/reference_models.py:
    SMALL_EPOCHS`): no test needs the benchmark's, and its full training is the longest of the digits
    models; every other name is the benchmark's model. Models live in the on-disk cache ($HIRELC_CACHE or
    <repo>/.cache), whose file lock makes concurrent pytest-xdist workers wait for one build instead
    of racing.
    Treat the returned file as read-only: copy it before rewriting.
    """
    from examples.reference_models import SMALL_EPOCHS, build_reference_model, reference_model_path

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name == "text_recognizer_small":
                from examples.text_recognizer import text_recognizer

                built[name] = text_recognizer(small=True)
            elif name in SMALL_EPOCHS:
                built[name] = build_reference_model(name, small=True)
            else:
                built[name] = reference_model_path(name)
        return built[name]

    return get


@pytest.fixture()
def small_recognizer_in_benches(reference_models, monkeypatch) -> Path:
    """The benches' `reference_model_path("text_recognizer")` gives the small recognizer (the quick
    bench tests check the benches' machinery, which does not depend on how long it trained)."""
    import examples.reference_models as rm

    small = reference_models("text_recognizer_small")
    real = rm.reference_model_path

    def path(name: str, cache_dir=None) -> Path:
        return small if name == "text_recognizer" else real(name, cache_dir)

    monkeypatch.setattr(rm, "reference_model_path", path)
    return small


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make `--dist loadgroup` group again (pytest-xdist issue 1386): xdist 3.8 marks an xdist_group
    test by appending "@<group>" to the legacy `_nodeid`, which pytest 9.2 no longer reads, so the
    group's tests were spread over the workers (the recognizer's tests waited on one another's build).
    Until xdist sets the structured id itself, set it here; a no-op once the id carries the group."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # a pytest without structured ids: xdist's own suffix works there
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and not item.nodeid.rpartition("]")[2].count("@") and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
