"""Write, verify, then promote: an export never replaces a good file with one that failed.

`export_verified` writes the file (or SavedModel folder) under a temporary name beside the
output, verifies it there, and renames it over the output only when every check passes. A file
that fails is kept beside the output as NAME.failed.EXT (a SavedModel folder as NAME.failed),
with its own report (NAME.failed.EXT.report.json / .png), replacing an earlier failed one; the
file already at the output and its report stay as they were. On an exception or Ctrl-C the
temporary file is removed. Side files move with the file (the TFLite labels); an ONNX file is
self-contained (the exporter writes no external .onnx.data: a graph over protobuf's 2 GB fails
in tf2onnx or onnx.save, an error before anything is written), so one rename moves all of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from typing import Dict, Iterator, List, Optional

from keras_vit.export._common import ExportError, PathLike, check_output_path
from keras_vit.export.tflite import labels_path
from keras_vit.files import replace_path, signals_held

FORMATS = ("onnx", "tflite", "saved_model")
_SUFFIXES = {"onnx": ".onnx", "tflite": ".tflite"}


def export_format(path: PathLike, fmt: Optional[str] = None) -> str:
    """`fmt`, or the format a path names: .onnx, .tflite, anything else a SavedModel folder."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        return fmt
    path = os.fspath(path)
    return next((f for f, suffix in _SUFFIXES.items() if path.endswith(suffix)), "saved_model")


def _split(path: str) -> tuple:
    """(folder, stem, extension) of an export path; a SavedModel folder has no extension."""
    folder, name = os.path.split(os.path.abspath(path).rstrip("/\\"))
    ext = next((s for s in _SUFFIXES.values() if name.endswith(s)), "")
    return folder, name[: len(name) - len(ext)], ext


def _host() -> str:
    """4 hex digits of the host name: with the pid in a staging name, a later export tells the staging files
    of a process that is gone (SIGKILL, the OOM killer) from those of an export running now, here or on
    another host sharing the folder."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def staging_path(path: PathLike) -> str:
    """A temporary name beside `path` that keeps its extension (runtimes check it):
    folder/.NAME.EXT.tmp-HOST-PID-XXXXXXXX.EXT, or folder/.NAME.tmp-HOST-PID-XXXXXXXX for a folder."""
    folder, stem, ext = _split(os.fspath(path))
    return os.path.join(folder, f".{stem}{ext}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}{ext}")


def remove_stale_staging(path: PathLike) -> List[str]:
    """Remove what exports to `path` that were killed (SIGKILL cannot be caught) left beside it: staging
    files and folders, their reports and the reports' own temporaries, of a process of this host that no
    longer runs. Returns the names removed."""
    folder, stem, ext = _split(os.fspath(path))
    pattern = re.compile(r"^\.{1,2}" + re.escape(f"{stem}{ext}.tmp-{_host()}-") + r"(\d+)-[0-9a-f]{8}")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if not match or _running(int(match.group(1))):
            continue
        full = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            removed.append(name)
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` exists on this host (this process's own staging files are never stale)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def failed_path(path: PathLike) -> str:
    """Where a file that failed verification is kept: NAME.failed.EXT (a folder: NAME.failed)."""
    folder, stem, ext = _split(os.fspath(path))
    return os.path.join(folder, f"{stem}.failed{ext}")


def sidecars(path: PathLike) -> List[str]:
    """Files written beside the exported file itself: the TFLite labels file, the report and its plot."""
    from keras_vit.export.verify import plot_path, report_path

    labels = [labels_path(path)] if os.fspath(path).endswith(".tflite") else []
    return labels + [report_path(path), plot_path(path)]


def remove_export(path: PathLike) -> None:
    """Remove an exported file or folder and its side files, where they exist."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
    for side in sidecars(path):
        if os.path.lexists(side):
            os.remove(side)


def move_export(src: PathLike, dst: PathLike) -> str:
    """Rename the export at `src` (file or folder, with its side files: labels, report, plot) over
    `dst`, replacing what is there (`keras_vit.files.replace_path`); a side file `src` lacks is
    removed at `dst`. Ctrl-C and SIGTERM wait until all are in place (`signals_held`), so a report
    always describes the file beside it."""
    src, dst = os.fspath(src), os.fspath(dst)
    with signals_held():
        replace_path(src, dst)
        for src_side, dst_side in zip(sidecars(src), sidecars(dst)):
            if os.path.lexists(src_side):
                os.replace(src_side, dst_side)
            elif os.path.lexists(dst_side):  # the old file's side file; the new one has none
                os.remove(dst_side)
    return dst


@contextlib.contextmanager
def staged(path: PathLike, folder: bool = False) -> Iterator[str]:
    """Yield a reserved temporary path beside `path` (an empty folder with `folder`); whatever is
    still there when the block ends (an exception, Ctrl-C, or a block that did not move it) is
    removed."""
    tmp = staging_path(path)
    if folder:
        os.mkdir(tmp)
    else:  # O_EXCL: never clobber someone else's file; 0666 lets the umask decide, as open() does
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
    finally:
        remove_export(tmp)


def export_verified(model, path: PathLike, format: Optional[str] = None, images=None, num_images: int = 64,
                    batch_size: int = 8, thresholds: Optional[Dict[str, float]] = None, device: str = "auto",
                    plot: bool = True, **options) -> dict:
    """Export `model` (a keras-vit model or its .keras path) to `path` and verify it, in one call.

    `format` (onnx, tflite, saved_model; default from the path's suffix) picks `to_onnx`,
    `to_tflite` or `to_saved_model`, which get `options`; `images`, `num_images`, `batch_size`,
    `thresholds`, `device` and `plot` are `verify`'s. The file is written under a temporary name
    beside `path` and verified there: when it passes it is renamed over `path` and its report
    written beside it; when it fails it is kept as `failed_path(path)` (NAME.failed.EXT) with its
    report beside that, and whatever was at `path` is left untouched. Returns the report
    ("file" says where the file is, "passed" whether it reached `path`).
    """
    from keras_vit.export.onnx import to_onnx
    from keras_vit.export.runner import check_device
    from keras_vit.export.saved_model import to_saved_model
    from keras_vit.export.tflite import to_tflite
    from keras_vit.export.verify import check_thresholds, measure, write_report_files

    fmt = export_format(path, format)
    writer = {"onnx": to_onnx, "tflite": to_tflite, "saved_model": to_saved_model}[fmt]
    thresholds = check_thresholds(thresholds)  # what verification reads is checked before the export
    check_device(device, fmt)
    if fmt == "saved_model":
        from keras_vit.export.saved_model import check_folder

        path = check_folder(path)
    else:
        path = check_output_path(path, _SUFFIXES[fmt])
    remove_stale_staging(path)
    with staged(path, folder=fmt == "saved_model") as tmp:
        writer(model, tmp, **options)
        report, ref, out = measure(model, tmp, images=images, num_images=num_images, batch_size=batch_size,
                                   thresholds=thresholds, device=device)
        final = path if report["passed"] else failed_path(path)
        # The report (and plot) beside the staged file, naming the final one; then all renamed together.
        report = write_report_files(report, ref, out, tmp, plot, described=final)
        move_export(tmp, final)
    return report


__all__ = ["FORMATS", "export_format", "export_verified", "failed_path", "move_export", "remove_export",
           "remove_stale_staging", "sidecars", "staged", "staging_path"]
