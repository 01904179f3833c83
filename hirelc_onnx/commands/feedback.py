"""What the CLI tells a user while it works: log levels by -v, a repeated warning once, progress as a bar or lines.

Quiet by default: warnings only, each distinct one once (`RepeatFilter`; the count of repeats is
printed when the command ends), plus, when stderr is not a terminal (a log file, CI), the
round-by-round lines of `hirelc_onnx.progress` (a terminal gets a progress bar instead).
-v: hirelc-onnx's own INFO lines; -vv: DEBUG of everything, third-party libraries included.
-v / -vv / --verbose may stand anywhere on the command line (`split_verbosity`).
"""
from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from hirelc_onnx.progress import PROGRESS_LOGGER, ProgressFn, progress_log

__all__ = ["split_verbosity", "configure_logging", "RepeatFilter", "report_repeats", "progress_display",
           "OWN_LOGGERS"]

OWN_LOGGERS = ("hirelc_onnx", "passes", "examples")
"""Loggers of this project (its INFO lines show under -v); every other logger is third-party."""

_FORMAT = "%(levelname)s %(name)s: %(message)s"
_handler: logging.Handler | None = None


def split_verbosity(args: Sequence[str]) -> tuple[list[str], int]:
    """`args` without their -v / -vv / --verbose (anywhere before a `--`), and how many v's they held."""
    rest, count, literal = [], 0, False
    for arg in args:
        if not literal and arg == "--":
            literal = True
        elif not literal and arg == "--verbose":
            count += 1
            continue
        elif not literal and len(arg) > 1 and arg[0] == "-" and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
            continue
        rest.append(arg)
    return rest, count


class RepeatFilter(logging.Filter):
    """Passes the first of identical WARNING-or-worse records and counts the rest (`repeats`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key] == 1

    def repeats(self) -> list[tuple[str, int]]:
        """(message, times in all) of every warning that came more than once."""
        return [(message, n) for (_, _, message), n in self.counts.items() if n > 1]


class _ProgressLines(logging.Filter):
    """Lets INFO of the progress logger through at the default verbosity (nothing else below WARNING)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith(PROGRESS_LOGGER)


def configure_logging(verbosity: int, stream: IO[str] | None = None, tty: bool | None = None) -> RepeatFilter:
    """One stderr handler for the run: levels by `verbosity` (0, 1, 2+), repeated warnings once.

    tty: whether `stream` is a terminal (None: ask it). Not a terminal and verbosity 0: the
    progress logger's INFO lines are shown too. Returns the filter counting repeats.
    """
    global _handler
    stream = sys.stderr if stream is None else stream
    if tty is None:
        tty = bool(getattr(stream, "isatty", lambda: False)())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream)
    _handler.setFormatter(logging.Formatter(_FORMAT))
    repeats = RepeatFilter()
    _handler.addFilter(repeats)
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    own_level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 or not tty else logging.WARNING
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level)
    if verbosity == 0:
        _handler.addFilter(_ProgressLines())  # INFO of our modules reaches the handler; only progress lines pass
    logging.captureWarnings(True)  # Python warnings (numpy, torch, ...) through the same handler: once each
    if verbosity < 2:
        warnings.simplefilter("default")
    return repeats


def report_repeats(repeats: RepeatFilter, stream: IO[str] | None = None) -> None:
    """One line per warning that came more than once: how many times in all."""
    stream = sys.stderr if stream is None else stream
    for message, n in repeats.repeats():
        first = message.splitlines()[0] if message else ""
        short = first if len(first) <= 100 else first[:97] + "..."
        print(f"WARNING (the warning above came {n} times in all: {short})", file=stream)


@contextmanager
def progress_display(enabled: bool = True, stream: IO[str] | None = None) -> Iterator[ProgressFn]:
    """A progress callback for the run: a bar with the phase's label on a terminal, else one log line
    per phase (the method's own round lines come on the progress logger)."""
    stream = sys.stderr if stream is None else stream
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if not enabled or not tty:
        seen: dict[str, Any] = {"phase": None}

        def lines(phase: str, done: int, total: int) -> None:
            if phase != seen["phase"]:
                seen["phase"] = phase
                progress_log.info("%s%s", phase, f" (0/{total})" if total > 1 else "")

        yield lines if enabled else (lambda phase, done, total: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True, console=Console(file=stream)) as bar:
        task = bar.add_task("starting", total=1)

        def update(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        yield update
