"""What every `vitcli` command shares: the one-line user error."""
from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import signal
import sys
import threading
from typing import Any, Iterator, Sequence

import click

from keras_vit.config import MAX_IMAGE_SIDE
from keras_vit.errors import first_line


class UserError(click.ClickException):
    """A user mistake: printed as one line `Error: ...`, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn):
    """Run the command `fn`, turning ValueError (bad option, dataset, file; keras_vit raises
    keras_vit.errors.UserInputError and ValueError for those), OSError about a named file (read-only or
    refused folder) and a full disk (OSError or TensorFlow's ResourceExhaustedError) into a one-line UserError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _refuse_empty(kwargs)
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise UserError(first_line(exc)) from None
        except OSError as exc:
            if exc.filename is None and exc.errno in _DISK_FULL:  # a write() failing: no file name to give
                raise UserError(_DISK_FULL_LINE.format(os.strerror(exc.errno))) from None
            if exc.filename is None:  # not about a file the user named or made room for: a bug, keep the traceback
                raise
            in_the_way = _file_in_the_way(exc) if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
            if in_the_way:  # a folder was to be made (or gone through) where a file is
                raise UserError(f"{in_the_way}: a file is where a folder is needed") from None
            raise UserError(f"{exc.filename}: {exc.strerror or first_line(exc)}") from None
        except Exception as exc:  # TensorFlow's writers (TFRecord shards) say it with an op error, not an OSError
            if type(exc).__name__ == "ResourceExhaustedError" and "No space left" in str(exc):
                raise UserError(_DISK_FULL_LINE.format(os.strerror(errno.ENOSPC))) from None
            raise

    return wrapper


def _refuse_empty(values: dict) -> None:
    """UserError for an option given as the empty string (an unset $VAR in a script): it would read as not
    given, and a default (a fresh model, runs/latest) would be used without a word."""
    empty = [name for name, value in values.items() if isinstance(value, str) and value == ""]
    if not empty:
        return
    ctx = click.get_current_context(silent=True)
    flags = {p.name: max(p.opts, key=len) for p in (ctx.command.params if ctx else []) if isinstance(p, click.Option)}
    flag = flags.get(empty[0], "--" + empty[0].replace("_", "-"))
    raise UserError(f"{flag} is empty; give a value or leave the option out")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_LINE = "{} while writing the output; free some space and run again (finished files are kept as they were)"


def _file_in_the_way(exc: OSError):
    """The file on the path of `exc.filename` that stands where a folder is needed; None if none."""
    path = os.path.abspath(os.fsdecode(exc.filename))
    while path != os.path.dirname(path):
        if os.path.exists(path) and not os.path.isdir(path):
            return path if os.path.isabs(os.fsdecode(exc.filename)) else os.path.relpath(path)
        path = os.path.dirname(path)
    return None


def check_writable(path: str, option: str) -> None:
    """UserError unless a file can be written at `path` (its folder, or the nearest folder above it that
    exists, is writable), checked before any work; nothing is created here."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path!r}: {folder!r} is a file, where a folder is needed")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path!r}: the folder {folder!r} is not writable")


MODEL_OPTION_HELP = ("A model option (a ViTConfig field), repeatable: e.g. qk_norm=true, num_registers=4, "
                     "layer_scale_init=1e-5, mlp=swiglu, activation=quick_gelu, classifier=map, class_token=false, "
                     "fc_norm=true, pixel_mean=[0.485,0.456,0.406]. VALUE is read as JSON, else as text.")


_NONE_IS_A_VALUE = ("pos_embedding",)  # options whose allowed values include the text "none"


class ImageSize(click.ParamType):
    """--image-size: the side in pixels (224) or HEIGHTxWIDTH (224x320) of a non-square model."""

    name = "N|HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, list)):
            return value
        parts = str(value).lower().replace(" ", "").split("x")
        # ASCII digits: "²".isdigit() is True, and int("²") a ValueError traceback
        if 1 <= len(parts) <= 2 and all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
            sides = [int(p) for p in parts]
            if max(sides) > MAX_IMAGE_SIDE:
                self.fail(f"{value!r} is larger than {MAX_IMAGE_SIDE} pixels a side", param, ctx)
            return sides[0] if len(set(sides)) == 1 else sides
        self.fail(f"{value!r} is not a side in pixels (e.g. 224) or HEIGHTxWIDTH (e.g. 224x320)", param, ctx)


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
            if value is None and key in _NONE_IS_A_VALUE:  # pos_embedding=none: the option's value "none"
                value = lowered
        model[key] = tuple(value) if isinstance(value, list) else value
    return model


_RECEIVED: list = []  # the SIGTERMs sigterm_cleans_up turned into Terminated


def terminated() -> bool:
    """Whether a SIGTERM arrived while a command ran under sigterm_cleans_up."""
    return bool(_RECEIVED)


class Terminated(BaseException):
    """SIGTERM (timeout, kill, Kubernetes, systemd) raised where a command that writes files runs
    (sigterm_cleans_up), so that what it writes under a temporary name is removed, as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the block runs (the `finally` clauses
    that remove temporary files then run), and neither it nor Ctrl-C is lost in a __del__; elsewhere,
    and after it, the handler is as it was.
    Not for training: a worker blocked in a collective would not stop until it returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        _RECEIVED.append(signum)  # whatever the exception becomes (Keras and tf2onnx wrap what a call raises)
        raise Terminated()

    pending: list = []  # the exception to raise again

    def raise_at_next_call(frame, event, arg):
        sys.settrace(None)
        raise pending.pop() if pending else Terminated()

    def raise_again(unraisable) -> None:
        """Terminated or Ctrl-C's KeyboardInterrupt raised where Python cannot propagate it (a gc callback
        such as JAX's, a __del__ such as TensorFlow's AtomicFunction): Python would print a traceback and go
        on with the export (which then wrote its file and exited 0); it is raised again instead, at the
        next line or call of this thread (a trace function for one event)."""
        if isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
            pending[:] = [type(unraisable.exc_value)()]
            frame = sys._getframe(1)
            while frame is not None:  # the line events of the code it interrupted, and every new call
                frame.f_trace, frame.f_trace_lines = raise_at_next_call, True
                frame = frame.f_back
            sys.settrace(raise_at_next_call)
        else:
            previous_hook(unraisable)

    previous, previous_hook = signal.signal(signal.SIGTERM, raise_terminated), sys.unraisablehook
    sys.unraisablehook = raise_again
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        if not _DECIDED:  # else outcome_decided's handler stays
            signal.signal(signal.SIGTERM, previous)


_CONSOLE: list = []  # set by the vitcli entry point (a process of its own, not a test's CliRunner)
_DECIDED: list = []  # the status outcome_decided fixed


def console_process() -> None:
    """Mark this process as vitcli's own (outcome_decided then acts on its signals)."""
    _CONSOLE.append(True)


def outcome_decided(code: Any = 0) -> None:
    """The command's outcome is fixed (an export renamed into place, the command returned): from here on
    Ctrl-C or SIGTERM, during the last lines or Python's and TensorFlow's teardown (seconds), end the
    process with that status (at once; ignored once Python finalises, when C++ teardown is all that is
    left), instead of reporting finished work as killed. Only in vitcli's own process."""
    if not _CONSOLE or _DECIDED or threading.current_thread() is not threading.main_thread():
        return
    status = 0 if code is None else code if isinstance(code, int) else 1
    _DECIDED.append(status)

    def leave(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
                stream.flush()
        os._exit(status)

    def ignore() -> None:  # Python's finalisation resets its handlers to the default: ignored instead
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, leave)
    atexit.register(ignore)  # the last registered, so the first to run at exit
