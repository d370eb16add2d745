"""What every `vitcli` command shares: the one-line user error."""
from __future__ import annotations

import functools

import click

from keras_vit.errors import first_line


class UserError(click.ClickException):
    """A user mistake: printed as one line `Error: ...`, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn):
    """Run the command `fn`, turning ValueError (bad option, dataset, file; keras_vit raises
    keras_vit.errors.UserInputError and ValueError for those) and OSError about a named file
    (no space left, read-only or refused folder) into a one-line UserError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise UserError(first_line(exc)) from None
        except OSError as exc:
            if exc.filename is None:  # not about a file the user named or made room for: a bug, keep the traceback
                raise
            raise UserError(f"{exc.filename}: {exc.strerror or first_line(exc)}") from None

    return wrapper
