"""The one user-error type: bad input a person can fix, shown as one line (no traceback)."""
from __future__ import annotations


class UserInputError(ValueError):
    """A bad option, file, dataset or model from the user; its message names the bad value
    and what is allowed. The CLI prints `first_line(exc)` and exits non-zero."""


class TrainError(UserInputError):
    """A training option or run folder that cannot be used."""


class DatasetError(UserInputError):
    """A dataset that cannot be loaded: unknown name, missing folder, failed download, bad file."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else the exception's type name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def op_error_line(exc: BaseException) -> str:
    """The informative line of a TensorFlow op error (not the 'Graph execution error' banner)."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(("File ", "Detected at", "[[", "Graph execution", "Cf. "))]
    return useful[-1] if useful else type(exc).__name__
