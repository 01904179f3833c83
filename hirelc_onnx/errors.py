"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""
from __future__ import annotations

__all__ = ["UserError", "ModelLoadError", "DataError", "NothingToCompressError"]


class UserError(Exception):
    """Bad input from the user (file, data, option); the message says what and what to do."""


class ModelLoadError(UserError):
    """The model file is missing, unreadable, not ONNX or not valid."""


class DataError(UserError):
    """The data does not exist, cannot be read or does not fit the model."""


class NothingToCompressError(UserError):
    """The model has no kernel this tool can compress."""
