"""The one image loader: decode a file, convert channels and resize (bilinear) the same way for
training, evaluation, prediction, inspection and export calibration."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from keras_vit.errors import DatasetError, first_line

NOT_DECODABLE = "not a decodable JPEG/PNG/BMP/GIF"  # what a bad image file is called, here and in data.folders


def read_image(path_or_bytes, from_bytes: bool = False):
    """Decode a JPEG/PNG/BMP/GIF file (a tf string) to a float32 (H, W, 3) image in [0, 255]."""
    import tensorflow as tf

    data = path_or_bytes if from_bytes else tf.io.read_file(path_or_bytes)
    img = tf.io.decode_image(data, channels=3, expand_animations=False)
    img = tf.cast(img, tf.float32)
    img.set_shape((None, None, 3))
    return img


def prepare_image(image, image_size: Optional[Sequence[int]], channels: int, interpolation: str = "bilinear",
                  crop_pct: Optional[float] = None):
    """Float32 image(s) resized (bilinear) to `image_size` (None: kept) and converted to
    `channels` (1 or 3): the one transformation shared by training, evaluation and prediction.

    `crop_pct` (timm's evaluation transform, which a published checkpoint may name): the shorter
    side resized to image_size / crop_pct with `interpolation` ("bicubic" antialiased, as PIL's),
    then the centre image_size crop."""
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    c = image.shape[-1]
    if c != channels:
        if c == 1 and channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        elif c == 3 and channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        elif c == 4 and channels == 3:
            image = image[..., :3]
        else:
            raise DatasetError(f"cannot convert images with {c} channels to {channels}")
    if image_size is None:
        return image
    h, w = (int(s) for s in image_size)
    if crop_pct is not None:
        import math

        ih, iw = (tf.cast(tf.shape(image)[i], tf.float32) for i in (-3, -2))
        scale = tf.maximum(math.floor(h / crop_pct) / ih, math.floor(w / crop_pct) / iw)  # the shorter side
        size = tf.cast(tf.round(tf.stack([ih, iw]) * scale), tf.int32)
        image = tf.image.resize(image, size, method=interpolation, antialias=interpolation == "bicubic")
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        image = image[..., top:top + h, left:left + w, :]
    elif tuple(image.shape[-3:-1]) != (h, w):
        image = tf.image.resize(image, (h, w), method=interpolation, antialias=interpolation == "bicubic")
    return tf.clip_by_value(image, 0.0, 255.0) if interpolation == "bicubic" else image  # PIL clips its overshoot


def load_image_file(path: str, image_size: Optional[Sequence[int]], channels: int, interpolation: str = "bilinear",
                    crop_pct: Optional[float] = None) -> np.ndarray:
    """One image file as float32 (H, W, channels) in [0, 255], decoded and resized exactly as in
    training (read_image + prepare_image, with its `interpolation` / `crop_pct`); DatasetError
    naming the file when it cannot be read."""
    import tensorflow as tf

    try:
        with open(path, "rb") as f:
            image = read_image(tf.constant(f.read()), from_bytes=True)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or first_line(exc)}") from None
    except tf.errors.OpError:  # TensorFlow's text names its op and device, not the problem
        raise DatasetError(f"cannot read image {path}: {NOT_DECODABLE} (empty, damaged or another format)") from None
    return np.asarray(prepare_image(image, image_size, channels, interpolation, crop_pct), np.float32)
