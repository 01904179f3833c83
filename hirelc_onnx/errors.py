"""The one exception family of hirelc-onnx, and how its messages name an option.

Every error a user can cause is a `UserError` (the CLI prints it as one `error:` line and exits 2,
never a traceback); the subclasses say which kind. A message names options through `option()`,
which spells them for the interface in use: `budget=` from Python, `--budget` on the command line
(the CLI switches the wording with `interface("cli")`), so no API error quotes a flag.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["UserError", "InvalidOptionError", "ModelLoadError", "DataError", "NothingToCompressError",
           "BudgetError", "option", "interface", "current_interface"]


class UserError(Exception):
    """Bad input from the user (file, data, option); the message says what and what to do."""


class InvalidOptionError(UserError):
    """An option (argument) has a bad value, is unknown, or does not apply to the chosen method."""


class ModelLoadError(UserError):
    """The model file is missing, unreadable, not ONNX or not valid."""


class DataError(UserError):
    """The data does not exist, cannot be read or does not fit the model."""


class NothingToCompressError(UserError):
    """The model has no kernel this tool can compress."""


class BudgetError(UserError):
    """The budget cannot be met by any config this tool can emit for the model and target."""


# the command line's spelling where it is not the parameter name with dashes
_CLI_NAMES = {"out_dir": "--out", "as_json": "--json"}
_interface = "python"


def current_interface() -> str:
    """"python" (the default) or "cli": whose spelling `option()` uses."""
    return _interface


@contextmanager
def interface(name: str) -> Iterator[None]:
    """Word option names for `name` ("python" or "cli") inside the block."""
    global _interface
    if name not in ("python", "cli"):
        raise ValueError(f"interface must be 'python' or 'cli', got {name!r}")
    before, _interface = _interface, name
    try:
        yield
    finally:
        _interface = before


def option(name: str, value: Any = None, *, api_only: bool = False) -> str:
    """An option as the user spelled it: `budget=` / `--budget`; with `value`, `method='uniform'` / `--method uniform`.

    api_only: an option the command line does not have (a settings object): always `name=`.
    """
    if _interface == "cli" and not api_only:
        flag = _CLI_NAMES.get(name, "--" + name.replace("_", "-"))
        return flag if value is None else f"{flag} {value}"
    return f"{name}=" if value is None else f"{name}={value!r}"
