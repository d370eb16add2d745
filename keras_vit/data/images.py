"""The one image loader: decode a file, convert channels and resize (bilinear) the same way for
training, evaluation, prediction, inspection and export calibration."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from keras_vit.errors import DatasetError, first_line

NOT_DECODABLE = "not a decodable JPEG/PNG/BMP/GIF/WebP"  # what a bad image file is called, here and in data.folders


def read_image(path_or_bytes, from_bytes: bool = False):
    """Decode a JPEG/PNG/BMP/GIF/WebP file (a tf string) to a float32 (H, W, 3) image in [0, 255]."""
    import tensorflow as tf

    data = path_or_bytes if from_bytes else tf.io.read_file(path_or_bytes)
    # WebP's decoder gives 3 or 4 channels and refuses channels=3 for a file with alpha: dropped, as for PNG
    is_webp = tf.cond(tf.strings.length(data) >= 12,  # "RIFF", the size, "WEBP"
                      lambda: tf.logical_and(tf.equal(tf.strings.substr(data, 0, 4), "RIFF"),
                                             tf.equal(tf.strings.substr(data, 8, 4), "WEBP")),
                      lambda: tf.constant(False))
    img = tf.cond(is_webp, lambda: _webp(data),
                  lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    img = _bmp_colour_table(data, img)
    img = tf.cast(img, tf.float32)
    img.set_shape((None, None, 3))
    return img


def _webp(data):
    """A WebP file's first frame, RGB. An animated one without alpha is refused by decode_webp (TensorFlow's
    decode_image overruns its heap on it: the process aborted, even with --skip-bad-images)."""
    import tensorflow as tf

    def animated_opaque():  # the VP8X chunk's flags (byte 20): animation (0x02) without alpha (0x10)
        flags = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 20, 1), tf.uint8)[0], tf.int32)
        return tf.logical_and(tf.equal(tf.strings.substr(data, 12, 4), "VP8X"),
                              tf.equal(tf.bitwise.bitwise_and(flags, 0x12), 0x02))

    refused = tf.logical_and(tf.strings.length(data) >= 21, animated_opaque())
    return tf.cond(refused, lambda: tf.reshape(tf.io.decode_webp(data, channels=3), (0, 0, 3)),  # raises
                   lambda: tf.io.decode_image(data, channels=0, expand_animations=False)[..., :3])


def is_animated_opaque_webp(data: bytes) -> bool:
    """Whether `data` is an animated WebP without alpha, which TensorFlow cannot decode (see _webp)."""
    return (len(data) >= 21 and data[:4] == b"RIFF" and data[8:12] == b"WEBP" and data[12:16] == b"VP8X"
            and data[20] & 0x12 == 0x02)


def _bmp_colour_table(data, img):
    """An 8-bit BMP's pixels through its colour table: TensorFlow's BMP decoder returns the 8-bit
    values as grey (right for a grey table, PIL's "L"; the table's indices for a palette, "P")."""
    import tensorflow as tf

    def is_bmp8():
        header = tf.io.decode_raw(tf.strings.substr(data, 0, 30), tf.uint8)
        return tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), "BM"),
                              tf.logical_and(tf.equal(header[28], 8), tf.equal(header[29], 0)))

    def coloured():
        info = tf.io.decode_raw(tf.strings.substr(data, 14, 40), tf.int32, little_endian=True)
        size, used = info[0], info[8]  # biSize, biClrUsed (0: all 256)
        n = tf.where(used > 0, tf.minimum(used, 256), 256)
        n = tf.minimum(n, (tf.strings.length(data) - 14 - size) // 4)  # a table cut short: what is there
        table = tf.reshape(tf.io.decode_raw(tf.strings.substr(data, 14 + size, 4 * n), tf.uint8), (-1, 4))
        rgb = tf.reverse(table[:, :3], axis=[1])  # stored B, G, R, reserved
        return tf.gather(rgb, tf.minimum(tf.cast(img[..., 0], tf.int32), n - 1))

    long_enough = tf.strings.length(data) >= 54
    bmp8 = tf.cond(long_enough, is_bmp8, lambda: tf.constant(False))
    return tf.cond(bmp8, coloured, lambda: img)


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
            data = f.read()
        if is_animated_opaque_webp(data):
            raise DatasetError(f"cannot read image {path}: an animated WebP without alpha, which TensorFlow's "
                               "decoder cannot read; convert it (to PNG, or a still WebP)")
        image = read_image(tf.constant(data), from_bytes=True)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or first_line(exc)}") from None
    except tf.errors.OpError:  # TensorFlow's text names its op and device, not the problem
        raise DatasetError(f"cannot read image {path}: {NOT_DECODABLE} (empty, damaged or another format)") from None
    return np.asarray(prepare_image(image, image_size, channels, interpolation, crop_pct), np.float32)
