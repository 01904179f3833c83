"""`python -m tests.quick_cli compress ...`: the real command line, with HiReLC's default settings swapped for
`QUICK_SETTINGS`, for the tests that run the CLI (kills, interrupts, workers, exit statuses).

What those tests prove -- resume replays byte for byte, exit statuses, workers emit the in-process model --
does not depend on how long the agents train; the default-sized agents made them the suite's slowest.
The swap happens under `__main__` only, so the spawned evaluation workers, which import this module as
`__mp_main__`, neither pay for the RL imports nor see it. In-process CLI tests use `with_quick_settings`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable


def with_quick_settings(run: Callable) -> Callable:
    """`run` (hirelc's run_hirelc) with `settings=QUICK_SETTINGS` when the caller gives none."""

    @functools.wraps(run)
    def run_quick(*args, settings=None, **kwargs):
        from hirelc_onnx.search.hirelc import QUICK_SETTINGS

        return run(*args, settings=settings or QUICK_SETTINGS, **kwargs)

    return run_quick


if __name__ == "__main__":
    from hirelc_onnx.search import hirelc

    hirelc.run_hirelc = with_quick_settings(hirelc.run_hirelc)  # compress looks the run function up when chosen

    from hirelc_onnx.cli import main

    main(prog_name="hirelc-onnx")
