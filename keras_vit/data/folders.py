"""Image folders (`PATH/<class>/<image>`): listing in O(directory entries) and decoding where
the images are read, with bad files either failing the run by name or skipped and recorded.

Listing uses os.scandir and the entries' names only: no file is opened or stat'ed up front, so a
folder of a million JPEGs lists in seconds even on network storage. A file that cannot be
decoded is found when the pipeline reads it.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from keras_vit.data.images import NOT_DECODABLE, read_image
from keras_vit.errors import DatasetError
from keras_vit.files import shown_path, utf8_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
BAD_IMAGE_PREFIX = "cannot read image "  # the op error's text names the file after this prefix
SKIP_HINT = " (--skip-bad-images skips such files)"  # where the command has that option
_BAD_IMAGE_HINT = f"{NOT_DECODABLE}{SKIP_HINT}"


class BadImages:
    """The files a pipeline skipped because they could not be read or decoded (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set = set()

    def add(self, path: str) -> None:
        with self._lock:
            self._paths.add(path)

    @property
    def paths(self) -> List[str]:
        """The skipped files, sorted."""
        with self._lock:
            return sorted(self._paths)

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)


def list_images(root: str, class_names: Optional[Sequence[str]] = None, bad: Optional[BadImages] = None,
                training: bool = True) -> Tuple[List[str], np.ndarray, List[str]]:
    """Sorted (files, labels, class_names) of `root/<class>/**` by extension (see IMAGE_EXTENSIONS),
    sub-folders of a class included (as Keras' image_dataset_from_directory and torchvision's
    ImageFolder); files are not opened. `class_names` fixes the label order (a val/test folder).
    A file name that is not UTF-8 (TensorFlow's paths are) is one line, or skipped into `bad`.
    The training classes (`class_names` None and `training`) must be two or more, none empty."""
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DatasetError(f"{root}: classes {unknown} are not in the training classes")
        names = list(class_names)
    if not names:
        raise DatasetError(f"folder {root!r} has no class sub-folders (expected {root}/<class>/<image>.jpg)")
    files: List[str] = []
    labels: List[np.ndarray] = []
    empty = []
    for label, cls in enumerate(names):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):  # a class of the training folder absent from val/test
            continue
        found = [f for f in _image_files_under(d) if _utf8_name(f, bad)]
        if not found:
            empty.append(cls)
        files.extend(found)
        labels.append(np.full(len(found), label, np.int32))
    if not files:
        raise DatasetError(f"folder {root!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    if class_names is None and training:  # the training classes: each one a class the model can learn
        if empty:
            raise DatasetError(f"{root}: class folder {empty[0]!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                               "add some or remove the folder")
        if len(names) < 2:
            raise DatasetError(f"folder {root!r} has one class ({names[0]!r}); a classifier needs two or more "
                               f"class sub-folders ({root}/<class>/<image>.jpg)")
    return files, np.concatenate(labels), list(names)


def holds_images(folder: str) -> bool:
    """Whether image files lie in `folder` itself: a class folder (a split folder holds class folders).
    A flat folder of classes may have one named "train" (buses, cars, trains)."""
    with os.scandir(folder) as it:
        return any(not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.is_dir()
                   for e in it)


def _image_files_under(folder: str) -> List[str]:
    """The image files in `folder` and its sub-folders (hidden ones left out; a linked folder
    followed once), sorted by their path below `folder`."""
    out: List[str] = []
    seen = set()
    stack = [(folder, "")]
    while stack:
        path, rel = stack.pop()
        real = os.path.realpath(path)
        if real in seen:  # a link back up the tree
            continue
        seen.add(real)
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.is_dir():
                    out.append(rel + e.name)
                elif e.is_dir():
                    stack.append((e.path, rel + e.name + os.sep))
    prefix = folder + os.sep
    return [prefix + f for f in sorted(out)]


def _utf8_name(path: str, bad: Optional[BadImages]) -> bool:
    """Whether `path` is UTF-8 (os.scandir gives other bytes as surrogates); else one line naming
    it, or recorded in `bad` when bad files are skipped."""
    if utf8_path(path):
        return True
    if bad is None:
        raise DatasetError(f"cannot read image {shown_path(path)}: its file name is not UTF-8, which TensorFlow needs; "
                           f"rename it{SKIP_HINT}")
    bad.add(shown_path(path))
    return False


def decode_or_flag(path, data=None):
    """(float32 (H, W, 3) image in [0, 255], ok): a file (or its bytes) decoded; ok False with a
    1x1 placeholder when it cannot be read or decoded (the error is caught per element)."""
    import tensorflow as tf

    src = tf.data.Dataset.from_tensors(path if data is None else data)
    decoded = src.map(lambda p: (read_image(p, from_bytes=data is not None), True)).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((tf.zeros((1, 1, 3), tf.float32), False))
    return decoded.concatenate(fallback).take(1)


def checked_images(ds, bad: Optional[BadImages], parallel: bool = True):
    """(name, label) or (name, bytes, label) elements -> (image, label), decoded in parallel and
    in order. A file that does not decode fails the pipeline with its name (`bad` None) or is
    dropped and added to `bad`."""
    import tensorflow as tf

    def decode(*elem):
        name, label = elem[0], elem[-1]
        data = elem[1] if len(elem) == 3 else None
        return decode_or_flag(name, data).map(lambda img, ok: (img, label, ok, name))

    AUTO = tf.data.AUTOTUNE
    ds = ds.interleave(decode, cycle_length=AUTO if parallel else 1, block_length=1,
                       num_parallel_calls=AUTO if parallel else None, deterministic=True)
    if bad is None:
        def check(img, label, ok, name):
            msg = tf.strings.join([BAD_IMAGE_PREFIX, name, ": " + _BAD_IMAGE_HINT])
            with tf.control_dependencies([tf.debugging.Assert(ok, [msg], summarize=1)]):
                return tf.identity(img), label
        return ds.map(check, num_parallel_calls=AUTO)

    def record(name) -> bool:
        bad.add(name.numpy().decode("utf-8", "replace"))
        return False

    def keep(img, label, ok, name):
        return tf.cond(ok, lambda: tf.constant(True),
                       lambda: tf.py_function(record, [name], tf.bool))

    return ds.filter(keep).map(lambda img, label, ok, name: (img, label))


def bad_image_line(exc: BaseException) -> Optional[str]:
    """The one-line 'cannot read image PATH: ...' of a pipeline error from checked_images, else None."""
    text = str(getattr(exc, "message", exc))
    start = text.find(BAD_IMAGE_PREFIX)
    if start < 0:
        return None
    line = text[start:].splitlines()[0].rstrip("]").rstrip()
    path = line[len(BAD_IMAGE_PREFIX):].rsplit(": " + _BAD_IMAGE_HINT, 1)[0]
    if os.path.islink(path) and not os.path.exists(path):  # a dangling link, named as such
        return f"{BAD_IMAGE_PREFIX}{path}: a link to {os.readlink(path)!r}, which does not exist{SKIP_HINT}"
    try:  # a file this process may not read is named as such, not as undecodable (a record's name is no file)
        open(path, "rb").close()
    except PermissionError as err:
        return f"{BAD_IMAGE_PREFIX}{path}: {err.strerror}{SKIP_HINT}"
    except OSError:
        pass
    return line


@contextlib.contextmanager
def naming_bad_images() -> Iterator[None]:
    """Turn the pipeline error of an image file that does not decode (checked_images) into a
    DatasetError with the one line naming the file; other errors pass unchanged."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as exc:
        line = bad_image_line(exc)
        if line is None:
            raise
        raise DatasetError(line) from None
