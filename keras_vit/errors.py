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
    """The first non-empty line of an exception's message (with the next one where it ends in ":", as Keras'
    "... Example error message for object <Conv2D ...>:" does), else the exception's type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        detail = lines[1] if len(lines[1]) <= _DETAIL else lines[1][:_DETAIL].rsplit(" ", 1)[0] + " ..."
        return f"{lines[0]} {detail}"
    return lines[0]


_DETAIL = 200  # characters of the line first_line adds (Keras' shape errors go on to print the variable's values)


def op_error_line(exc: BaseException) -> str:
    """The informative line of a TensorFlow op error (not the 'Graph execution error' banner)."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(("File ", "Detected at", "[[", "Graph execution", "Cf. "))]
    return useful[-1] if useful else type(exc).__name__
