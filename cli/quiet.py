"""A quiet terminal: TensorFlow's C++ start-up lines and known harmless warnings stay hidden.

TensorFlow and XLA log through absl before `absl::InitializeLog()`, which ignores
TF_CPP_MIN_LOG_LEVEL for those lines (oneDNN notices, CUDA probing, the cuInit "failed call"
on a machine without a GPU), so stderr is filtered at the file-descriptor level: informational
and warning lines in absl's format are dropped, error lines only when they are one of the
known harmless ones; everything else (tracebacks, real errors) passes through unchanged.

Once the command has ended (`finished`), every absl line is dropped: TensorFlow's teardown logs
errors of its own as the process exits (after a multi-worker run, an `E0000 ... StartAbort
UNAVAILABLE` line once the peers' servers are gone), the last ones from C++ after Python's own
teardown, when no Python thread can filter any more: from then on file descriptor 2 points at
/dev/null. `vitcli --verbose` installs none of this and shows every line.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings

# absl's prefix: severity, MMDD, time, thread id, file:line]
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] ?(.*)$")
_HARMLESS_ERRORS = re.compile(rb"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|"
                              rb"computation placer already registered|cuda_(dnn|fft|blas)\.cc|"
                              # an int64 op (Keras' sparse labels) runs on Eigen instead of oneDNN: same values
                              rb"oneDNN supports DT_\w+ only on platforms with|"
                              # TensorFlow's JPEG decoder on a damaged file; the one-line error that follows names it
                              rb"^Premature end of JPEG data|^Corrupt JPEG data")
_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR|"
                    rb".*rebuild TensorFlow with the appropriate compiler flags\.?|"
                    rb"This TensorFlow binary is optimized to use available CPU instructions.*|"
                    rb"To enable the following instructions: .*|"
                    rb"WARNING:absl:.*|"
                    # onnxruntime's quantizer's generic advice to every caller (not about this file)
                    rb"WARNING:root:Please consider to run pre-processing before quantization.*|"
                    # The TFLite converter's and LiteRT's own progress notes.
                    rb"fully_quantize: \d+, inference_type: \d+, .*|"
                    rb"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.|"
                    # libjpeg's own words for a damaged JPEG; the one-line error that follows names the file
                    rb"Improper call to JPEG library in state \d+|Corrupt JPEG data: .*|Premature end of JPEG file)$")


STDERR_FD_ENV = "KERAS_VIT_STDERR_FD"
_FINISHED = b"\x00vitcli: the command has finished\x00"  # sent down the pipe, so it arrives in order


def finished() -> None:
    """The command has ended: absl lines from now on are TensorFlow's teardown, not the run's."""
    if _restores:
        sys.stderr.flush()
        os.write(2, _FINISHED + b"\n")


def _hidden(line: bytes, late: bool) -> bool:
    """`is_noise`, and once the command has finished (`late`), any line in absl's format."""
    return is_noise(line) or (late and bool(_ABSL_LINE.match(line.rstrip(b"\r\n"))))


def is_noise(line: bytes) -> bool:
    """True for a stderr line the quiet CLI hides (without its line ending)."""
    line = line.rstrip(b"\r\n")
    m = _ABSL_LINE.match(line)
    if m:
        return m.group(1) in (b"I", b"W") or bool(_HARMLESS_ERRORS.search(m.group(2)))
    return bool(_NOISE.match(line))


def quiet_python_warnings() -> None:
    """Hide warnings known to be harmless here: Keras' shuffle note for tf.data input, its "ran out
    of data" note at the end of the first epoch of a pipeline of unknown length (image files with
    bad ones skipped, record shards: the epoch is meant to end there), NumPy FutureWarnings from
    the libraries, and Python-side absl/TensorFlow info logs."""
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
    warnings.filterwarnings("ignore", message=r"Your input ran out of data")
    # `vitcli export` prints this note of to_tflite itself, once, as a line of its output.
    warnings.filterwarnings("ignore", message=r"full-int8 TFLite is not faster")
    # ... and the note that ONNX files are verified without onnxruntime.
    warnings.filterwarnings("ignore", message=r"onnxruntime is not installed")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("absl", "tensorflow", "tf2onnx", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def filter_stderr() -> None:
    """Route file descriptor 2 through a thread that drops `is_noise` lines (until exit)."""
    try:
        target = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:  # no usable stderr: nothing to filter
        return

    def pump() -> None:
        pending, late = b"", False
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b""
            for line in lines:
                if line.endswith(_FINISHED):
                    line, late = line[: -len(_FINISHED)], True
                    if not line:
                        continue
                if not _hidden(line, late):
                    out += line + b"\n"
            if b"\r" in pending:  # progress bars redraw with \r: show them as they come
                cut = pending.rindex(b"\r") + 1
                out, pending = out + pending[:cut], pending[cut:]
            if out:
                os.write(target, out)
        if pending and not _hidden(pending, late):
            os.write(target, pending)
        os.close(read_end)

    # Helpers that must write after this process stops (keras_vit.train.cluster_env's start-up
    # guard) write to the real stderr, not into the pipe this thread can no longer drain.
    os.environ[STDERR_FD_ENV] = str(target)
    thread = threading.Thread(target=pump, name="vitcli-stderr", daemon=True)
    thread.start()

    def restore(at_exit: bool = False) -> None:
        os.environ.pop(STDERR_FD_ENV, None)
        sys.stderr.flush()
        if at_exit:  # the last atexit handler: what C++ prints after it reaches no terminal
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # closes the pipe's last write end: the pump drains and stops
            os.close(devnull)
        else:
            os.dup2(target, 2)
        thread.join(timeout=5)

    # Registered before TensorFlow is imported, so it runs after TensorFlow's own atexit handlers.
    atexit.register(lambda: _restores and _restores.pop()(at_exit=True))
    _restores.append(restore)


_restores: list = []


def release() -> None:
    """Give file descriptor 2 back to the real stderr now (before `os.exec*`, which would leave the
    new program writing into a pipe nobody reads)."""
    while _restores:
        _restores.pop()()


def install(verbose: bool) -> None:
    """Quiet start-up unless `verbose`: before TensorFlow is imported."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_python_warnings()
    filter_stderr()
