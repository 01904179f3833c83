"""The one progress callback every method and `compress` call, and the logger of round-by-round lines.

`progress(phase, done, total)`: `phase` is a short label of what runs now ("loading the model",
"hirelc: real evaluations", "measuring the emitted model", ...), `done` of `total` its steps
(total >= 1; a phase without steps is reported as 0 of 1 when it starts). A phase starts with
done = 0, so a caller can show the label before its first step ends.

Lines worth reading while a run goes (one per real evaluation: "round 1/2: ... measured 0.9815")
are logged at INFO on `PROGRESS_LOGGER`: the CLI shows them by default when stderr is not a
terminal (a terminal gets a progress bar instead), and under -v.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

__all__ = ["ProgressFn", "PROGRESS_LOGGER", "progress_log", "notify"]

ProgressFn = Callable[[str, int, int], None]
"""progress(phase, done, total) -> None."""

PROGRESS_LOGGER = "hirelc_onnx.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)


def notify(progress: Optional[ProgressFn], phase: str, done: int = 0, total: int = 1) -> None:
    """Call `progress` (when given) with one step of `phase`."""
    if progress is not None:
        progress(phase, int(done), max(int(total), 1))
