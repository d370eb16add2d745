"""What every `vitcli` command shares: the one-line user error."""
from __future__ import annotations

import functools
import json
from typing import Sequence

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


MODEL_OPTION_HELP = ("A model option (a ViTConfig field), repeatable: e.g. qk_norm=true, num_registers=4, "
                     "layer_scale_init=1e-5, mlp=swiglu, activation=quick_gelu, classifier=map, class_token=false, "
                     "fc_norm=true, pixel_mean=[0.485,0.456,0.406]. VALUE is read as JSON, else as text.")


def parse_model_options(pairs: Sequence[str]) -> dict:
    """--model-option KEY=VALUE pairs as a dict: VALUE as JSON (numbers, true/false/null, lists), else text;
    UserError for a pair without "=" or a key given twice. The keys are checked by TrainConfig.validate."""
    model: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--model-option takes KEY=VALUE (e.g. qk_norm=true), got {pair!r}")
        if key in model:
            raise UserError(f"--model-option {key} is given twice")
        try:
            value = json.loads(text)
        except ValueError:
            lowered = text.strip().lower()
            value = {"true": True, "false": False, "none": None}.get(lowered, text.strip())
        model[key] = tuple(value) if isinstance(value, list) else value
    return model
