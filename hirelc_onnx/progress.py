"""The one progress callback every method and `compress` call, and the logger of round-by-round lines.

`progress(phase, done, total)`: `phase` is a short label of what runs now ("loading the model",
"hirelc: real evaluations", "measuring the emitted model", ...), `done` of `total` its steps
(total >= 1; a phase without steps is reported as 0 of 1 when it starts). A phase starts with
done = 0, so a caller can show the label before its first step ends.

Lines worth reading while a run goes (one per real evaluation: "round 1/2: ... measured 0.9815")
are logged at INFO on `PROGRESS_LOGGER`: the CLI shows them by default when stderr is not a
terminal (a terminal gets a progress bar instead), and under -v. A long phase of many equal steps
(one proxy probe per kernel of a big model) goes through `PhaseSteps`, which also logs a line there
every `SLOW_STEP_SECONDS` or so with its count and an estimate of the time left, so a run on a big
model is never silent for minutes.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

__all__ = ["ProgressFn", "PROGRESS_LOGGER", "progress_log", "notify", "PhaseSteps", "SLOW_STEP_SECONDS"]

ProgressFn = Callable[[str, int, int], None]
"""progress(phase, done, total) -> None."""

PROGRESS_LOGGER = "hirelc_onnx.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)


def notify(progress: Optional[ProgressFn], phase: str, done: int = 0, total: int = 1) -> None:
    """Call `progress` (when given) with one step of `phase`."""
    if progress is not None:
        progress(phase, int(done), max(int(total), 1))


SLOW_STEP_SECONDS = 10.0
"""A phase still running after this many seconds since its last line gets another one."""


class PhaseSteps:
    """The steps of one phase: `progress` at each, and, once the phase has run SLOW_STEP_SECONDS
    since its start or its last line, a line on the progress logger ("hirelc: sensitivity probes
    3/8 after 27s, about 45s left"); a phase of quick steps logs nothing."""

    def __init__(self, progress: Optional[ProgressFn], phase: str, total: int,
                 every: float = SLOW_STEP_SECONDS) -> None:
        self.progress, self.phase, self.total, self.every = progress, phase, max(int(total), 1), every
        self.done = 0
        self.start = self.last = time.perf_counter()
        notify(progress, phase, 0, self.total)

    def step(self, n: int = 1) -> None:
        """`n` more steps done."""
        self.done += n
        notify(self.progress, self.phase, min(self.done, self.total), self.total)
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            elapsed = now - self.start
            left = elapsed / self.done * max(self.total - self.done, 0)
            progress_log.info("%s %d/%d after %.0fs%s", self.phase, self.done, self.total, elapsed,
                              f", about {left:.0f}s left" if self.done < self.total else "")
