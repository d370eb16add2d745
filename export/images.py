"""Real images for verification and int8 calibration, as float32 NHWC arrays in [0, 255].

Sources: offline images that ship with scikit-learn ("digits": its 8x8 digits test split;
"photos": crops of its two sample photos; "default": both), a dataset of the training
registry (`keras_vit.data.load(name)`), a folder of image files ("folder:PATH" or a path),
an array, or a tf.data.Dataset of images or (image, label) pairs.
"""
from __future__ import annotations

import os
from typing import Tuple, Union

import numpy as np

from keras_vit import data
from keras_vit.data.folders import IMAGE_EXTENSIONS
from keras_vit.export._common import ExportError

OFFLINE_SOURCES = ("default", "digits", "photos")
_IMAGE_EXTS = IMAGE_EXTENSIONS  # training's: what TensorFlow decodes (TIFF files were picked, then refused)


def load_images(source=None, image_size: Union[int, Tuple[int, int]] = 224, channels: int = 3,
                num_images: int = 64, split: str = "test") -> np.ndarray:
    """`num_images` images (fewer if the source has fewer) resized to `image_size`, float32 [0, 255].

    `split` picks the registry split ("test" for verification, "train" for calibration).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if num_images < 1:
        raise ExportError(f"number of images must be >= 1, got {num_images}")
    if source is None:
        source = "default"
    if isinstance(source, np.ndarray):
        images = source[:num_images]
    elif isinstance(source, (str, os.PathLike)):
        images = _from_name(os.fspath(source), image_size, num_images, split)
    else:
        images = _from_iterable(source, num_images)
    if len(images) == 0:
        raise ExportError("the image source gave no images")
    return _fit(images, image_size, channels)


def _from_name(name: str, image_size, n: int, split: str) -> np.ndarray:
    if name.startswith("folder:"):
        return _from_folder(name[len("folder:"):], n)
    if os.path.isdir(name):
        return _from_folder(name, n)
    if name == "digits":
        return _digits(split)[:n]
    if name == "photos":
        return _photos(image_size, n)
    if name == "default":
        n_photos = (n + 1) // 2
        digits = _fit(_digits(split)[:n - n_photos], image_size, 3)
        return np.concatenate([_photos(image_size, n_photos), digits])
    try:
        splits = data.load(name)
    except (ValueError, KeyError) as exc:
        raise _unknown_source(name, exc) from None
    return _from_iterable(getattr(splits, split if hasattr(splits, split) else "test"), n)


def _unknown_source(name: str, reason) -> ExportError:
    return ExportError(f"image source {name!r}: {reason}; use a dataset name, one of "
                       f"{', '.join(OFFLINE_SOURCES)}, folder:PATH or a folder of images")


def check_source(source, channels: int = 3, split: str = "test") -> None:
    """ExportError for an image source `load_images` cannot read for a model with `channels`
    (an unknown name, a missing or empty folder, a dataset that does not load, images it cannot
    convert): checked by reading one image of `split`, so that an export can fail before it
    writes a file."""
    if source is None or isinstance(source, (str, os.PathLike)):
        load_images(source, (32, 32), channels, 1, split)


def _digits(split: str) -> np.ndarray:
    x_train, _, x_test, _ = data.digits_arrays()
    return x_train if split == "train" else x_test


def _photos(image_size, n: int) -> np.ndarray:
    """Deterministic crops (varied position and scale) of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [im.astype(np.float32) for im in load_sample_images().images]  # (427, 640, 3) each
    rng = np.random.RandomState(0)
    crops = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(rng.uniform(0.3, 1.0) * min(im.shape[:2]))
        y = rng.randint(0, im.shape[0] - side + 1)
        x = rng.randint(0, im.shape[1] - side + 1)
        crops.append(_fit(im[None, y:y + side, x:x + side], image_size, 3)[0])
    return np.stack(crops)


def _image_files(folder: str) -> list:
    """The image files under `folder`, sorted; ExportError when it is missing or has none."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ExportError(f"image folder {folder!r} is a file, not a folder")
    if not os.path.isdir(folder):
        raise ExportError(f"image folder {folder!r} does not exist")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(_IMAGE_EXTS))
    if not files:
        raise ExportError(f"no image files ({', '.join(_IMAGE_EXTS)}) under {folder!r}")
    return files


def _from_folder(folder: str, n: int) -> list:
    files = _image_files(folder)
    try:
        return [data.load_image_file(f, None, 3) for f in files[:n]]
    except data.DatasetError as exc:
        raise ExportError(str(exc)) from None


def _from_iterable(items, n: int) -> list:
    out = []
    for item in items:
        if isinstance(item, (tuple, list)):
            item = item[0]
        item = np.asarray(item, dtype=np.float32)
        if item.ndim == 4:  # a batched dataset
            out.extend(item[: n - len(out)])
        else:
            out.append(item)
        if len(out) >= n:
            break
    if not out:
        raise ExportError("the image source gave no images")
    return out


def _fit(images, image_size, channels: int) -> np.ndarray:
    """Each image resized to image_size with the channel count of the model, float32 in
    [0, 255], by keras_vit.data.prepare_image (the rule of training and prediction)."""
    out = []
    for im in images:
        im = np.asarray(im, dtype=np.float32)
        if im.ndim == 2:
            im = im[..., None]
        if im.ndim != 3:
            raise ExportError(f"images must be (H, W, C) arrays, got shape {im.shape}")
        try:
            im = np.asarray(data.prepare_image(im, image_size, channels))
        except data.DatasetError:
            raise ExportError(f"images have {im.shape[-1]} channels, the model takes {channels}: "
                              f"use a source of {channels}-channel images") from None
        out.append(np.clip(im, 0.0, 255.0))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, *image_size, channels), np.float32)
