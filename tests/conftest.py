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
    "text_recognizer" (CTC, 1x32x160 lines -> (40, 37) scores). Models live in the on-disk cache
    ($HIRELC_CACHE or <repo>/.cache), whose file lock makes concurrent pytest-xdist workers wait
    for one build instead of racing.
    Treat the returned file as read-only: copy it before rewriting.
    """
    from examples.reference_models import reference_model_path

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = reference_model_path(name)
        return built[name]

    return get
