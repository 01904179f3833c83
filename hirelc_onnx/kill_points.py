"""Named points where the kill-and-resume tests make a run die (`SIGKILL`, as a crash or an OOM kill would).

Off unless the environment sets `HIRELC_TEST_KILL_AT=<point>` or `<point>#<n>`: the process kills
itself the n-th time (default: the first) it reaches that point. The points:

  rl                 a HiReLC round's RL, between the high level's and the low level's learning
  finetune           a fine-tune, after its first training step
  write:<file name>  `io.write_atomic`, halfway through writing that file's temporary copy
  measure-task       a local worker of `--workers N` (search/executors.py), as it takes an evaluation

`HIRELC_TEST_KILL_SIGNAL=INT` sends SIGINT instead, as Ctrl-C would (the interrupt tests,
tests/test_cli_exit_codes.py). A point costs one dictionary lookup when the variable is unset. Used by tests/test_resume.py,
tests/test_cli_exit_codes.py and tests/search/test_executors.py only.
"""
from __future__ import annotations

import os
import signal

__all__ = ["ENV_VAR", "SIGNAL_VAR", "kill_point", "default_sigint"]

ENV_VAR = "HIRELC_TEST_KILL_AT"
SIGNAL_VAR = "HIRELC_TEST_KILL_SIGNAL"

_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Die here (SIGKILL, no cleanup; SIGINT under HIRELC_TEST_KILL_SIGNAL=INT) when HIRELC_TEST_KILL_AT
    names this point and this is its n-th visit."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGINT if os.environ.get(SIGNAL_VAR) == "INT" else signal.SIGKILL)


def default_sigint() -> None:
    """`preexec_fn` for a child the tests Ctrl-C: a shell's background job (`make test &`) starts with
    SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
