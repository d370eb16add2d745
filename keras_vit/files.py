"""Atomic file writes: the one way this package puts a file on disk.

Every writer goes through `atomic_path`: the content goes to a temporary name in the target's
folder, which is renamed over the target only when the write succeeded. The guarantee: a reader
sees the old file or the complete new one, never a partial one; the final file has the mode of
a normal `open(path, "w")` (0666 minus the umask); the temporary file is gone afterwards, on
success and on failure.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import threading
from typing import Any, Iterator, List, Union

PathLike = Union[str, os.PathLike]


def utf8_path(path: PathLike) -> bool:
    """Whether `path` is UTF-8, as TensorFlow's file functions and the runtimes' bindings need (os.scandir
    and a C locale give other bytes as surrogates)."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_path(path: PathLike) -> str:
    """`path` for a message: bytes that are not UTF-8 shown as U+FFFD."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class FolderHeld(Exception):
    """hold_folder's folder is held by a live process (`pid`, as it wrote it; "?" if unknown)."""

    def __init__(self, pid: str):
        super().__init__(pid)
        self.pid = pid


def hold_folder(folder: PathLike, name: str):
    """Mark `folder` as written by this process until the returned file is closed: an advisory lock on
    folder/name (with this pid in it) that the system drops when the process ends, killed or not.
    FolderHeld when a live process holds it; None where the system has no flock (no guard)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    f = open(os.path.join(os.fspath(folder), name), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise FolderHeld(pid) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def release_folder(held) -> None:
    """Drop hold_folder's mark (the lock file goes with it)."""
    if held is None:
        return
    with contextlib.suppress(OSError):
        os.remove(held.name)
    held.close()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same extension, so writers that check it work);
    rename it over `path` if the block succeeds, remove it otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):  # before the work, naming `path` (the rename's error names the temporary file)
        raise IsADirectoryError(errno.EISDIR, "a folder is where the file goes", path)
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp{ext}")
    # O_EXCL: never clobber someone else's file; mode 0666 lets the umask decide, as open() does.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        if os.path.isfile(tmp) and os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)  # a writer that made its own file (safetensors: 0600) gets open()'s mode back
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


# The names the writers here give their temporary files and folders (atomic_path, atomic_dir, replace_path's
# folder moved aside, PacedBackup's weights), which a process killed with SIGKILL leaves behind.
_TEMPORARY = re.compile(r"^\.(.+\.[0-9a-f]{8}\.(tmp|old)(\.[^.]+)?|\d+-[0-9a-f]{8}\.tmp\.weights\.h5)$")


def remove_temporaries(folder: PathLike) -> List[str]:
    """Remove what killed writers left in `folder` and its sub-folders under this package's temporary names
    (call it only on a folder no other live process writes to); returns their paths."""
    import shutil

    gone = []
    for parent, dirs, names in os.walk(os.fspath(folder)):
        for name in [n for n in dirs + names if _TEMPORARY.match(n)]:
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                os.remove(path)
            gone.append(path)
    return gone


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path`
    (`replace_path`), otherwise it is removed."""
    import shutil

    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        replace_path(tmp, path)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_path(src: PathLike, dst: PathLike) -> str:
    """Rename the file or folder `src` over `dst` (same file system). A file replaces in one
    rename; a folder there is first moved aside, then removed once `src` is in place (moved
    back if the rename fails)."""
    import shutil

    src, dst = os.fspath(src), os.fspath(dst)
    old = None
    if os.path.isdir(src) and os.path.lexists(dst):
        old = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.{secrets.token_hex(4)}.old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM do not interrupt the block (a group of renames that must all happen: a file
    and its report); one arriving meanwhile is dropped, as the work it would stop is then done.
    Python runs signal handlers in the main thread only: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)


def write_bytes(path: PathLike, data: bytes) -> str:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: PathLike, obj: Any) -> str:
    """Write `obj` as indented JSON (non-JSON values as str) to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_model(model, path: PathLike) -> str:
    """`model.save(path)` through a temporary .keras name, so a kill mid-save never leaves a
    truncated model file."""
    with atomic_path(path) as tmp:
        model.save(tmp)
    return os.fspath(path)


def link(target: str, path: PathLike) -> bool:
    """Point the symlink `path` at `target` (relative to the link's folder), replacing an older
    link atomically. Returns False, changing nothing, where `path` exists and is not a link, or
    where the file system has no symlinks."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.islink(path):
        return False
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        os.symlink(target, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
