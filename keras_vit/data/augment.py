"""Per-image augmentation in tf.image / tf.raw_ops, run inside `Dataset.map` on parallel threads.

Every function takes one float32 (H, W, C) image in [0, 255] and a stateless seed (int64 [2]),
so that a seeded pipeline gives the same batches every time, and each image draws its own
transformation (a batch-level layer draws one op for the whole batch).

RandAugment keeps keras.layers.RandAugment's op set and magnitude ranges at `factor` (default 0.5,
value range [0, 255]): shear x and y in +-[0, f] (one sign), translation in [0, f] of the height and
width, rotation in [0, f * 360] degrees, brightness + [0, f * 255], colour degeneration (blend to
grey) by [0, f], contrast x [1, 1 + f], sharpness 2 * [0, f] (0: blurred, 1: unchanged),
solarization (add [0, f * 255], invert above a threshold in [0, f * 255]), posterization to
1..max(1, int(8 f)) - 1 bits (at least 1), auto-contrast and equalization; geometric ops are
bilinear with reflected borders. Unlike the keras layer, which draws `num_ops` op indices per
batch, the ops are drawn per image, as in the RandAugment paper and timm.
"""
from __future__ import annotations

import math
from typing import Sequence

RANDAUGMENT_OPS = ("shear", "translation", "rotation", "brightness", "color_degeneration", "contrast",
                   "sharpness", "solarization", "posterization", "auto_contrast", "equalization")


def _tf():
    import tensorflow as tf

    return tf


def _uniform(seed, lo, hi, shape=()):
    tf = _tf()
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def _sub(seed, i: int):
    """The i-th independent seed derived from `seed`."""
    return _tf().random.experimental.stateless_fold_in(seed, i)


def _transform(image, matrix):
    """Projective transform of one image by the 8-vector `matrix` (output -> input pixel map),
    bilinear, reflected borders."""
    tf = _tf()
    shape = tf.shape(image)[:2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), (1, 8)),
        output_shape=shape, fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return out[0]


def _centred_affine(image, a, b, c, d):
    """Output->input map x' = a x + b y, y' = c x + d y about the image centre."""
    tf = _tf()
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    tx = cx - a * cx - b * cy
    ty = cy - c * cx - d * cy
    return _transform(image, tf.stack([a, b, tx, c, d, ty, 0.0, 0.0]))


def shear(image, seed, factor: float):
    """Shear along x and y by s_x, s_y in [0, factor], one random sign for both."""
    tf = _tf()
    sign = tf.where(_uniform(_sub(seed, 0), 0.0, 1.0) > 0.5, -1.0, 1.0)
    sx = sign * _uniform(_sub(seed, 1), 0.0, factor)
    sy = sign * _uniform(_sub(seed, 2), 0.0, factor)
    return _centred_affine(image, 1.0 + sx * sy, sx, sy, tf.constant(1.0))


def translation(image, seed, factor: float):
    """Shift by [0, factor] of the height and of the width."""
    tf = _tf()
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    dy = _uniform(_sub(seed, 0), 0.0, factor) * h
    dx = _uniform(_sub(seed, 1), 0.0, factor) * w
    return _transform(image, tf.stack([1.0, 0.0, -dx, 0.0, 1.0, -dy, 0.0, 0.0]))


def rotation(image, seed, factor: float):
    """Rotate by [0, factor * 360] degrees about the centre."""
    tf = _tf()
    angle = _uniform(seed, 0.0, factor * 2 * math.pi)
    cos, sin = tf.cos(angle), tf.sin(angle)
    return _centred_affine(image, cos, -sin, sin, cos)


def brightness(image, seed, factor: float):
    """Add [0, factor * 255] to every channel."""
    return _tf().clip_by_value(image + _uniform(seed, 0.0, factor) * 255.0, 0.0, 255.0)


def _grey(image):
    tf = _tf()
    return tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def color_degeneration(image, seed, factor: float):
    """Blend towards the grey image by [0, factor]."""
    f = _uniform(seed, 0.0, factor)
    return _tf().clip_by_value(image + f * (_grey(image) - image), 0.0, 255.0)


def contrast(image, seed, factor: float):
    """Scale about the per-channel mean by [1, 1 + factor]."""
    tf = _tf()
    f = _uniform(seed, 1.0, 1.0 + factor)
    mean = tf.reduce_mean(image, axis=(0, 1), keepdims=True)
    return tf.clip_by_value((image - mean) * f + mean, 0.0, 255.0)


def sharpness(image, seed, factor: float):
    """Blend between the 3x3-smoothed image (0) and the image (1) by 2 * [0, factor]."""
    tf = _tf()
    s = 2.0 * _uniform(seed, 0.0, factor)
    c = image.shape[-1] or 3
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(tf.reshape(k, (3, 3, 1, 1)), (1, 1, c, 1))
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, (1, 1, 1, 1), "SAME")[0]
    return tf.clip_by_value(image + (1.0 - s) * (smooth - image), 0.0, 255.0)


def solarization(image, seed, factor: float):
    """Add [0, factor * 255], then invert the values at or above a threshold in [0, factor * 255]."""
    tf = _tf()
    add = _uniform(_sub(seed, 0), 0.0, factor * 255.0)
    threshold = _uniform(_sub(seed, 1), 0.0, factor * 255.0)
    x = tf.clip_by_value(image + add, 0.0, 255.0)
    return tf.where(x < threshold, x, 255.0 - x)


def posterization(image, seed, factor: float):
    """Keep `bits` in [1, max(1, int(8 factor))) of each 8-bit value (1 bit when the range is empty)."""
    tf = _tf()
    hi = max(1, int(8 * factor))
    bits = tf.random.stateless_uniform((), seed, minval=1, maxval=max(hi, 2), dtype=tf.int32)
    shift = tf.cast(8 - bits, tf.uint8)
    x = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.float32)


def auto_contrast(image, seed=None, factor: float = 0.0):
    """Stretch each channel's [min, max] to [0, 255] (channels with min == max unchanged)."""
    tf = _tf()
    lo = tf.reduce_min(image, axis=(0, 1), keepdims=True)
    hi = tf.reduce_max(image, axis=(0, 1), keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.clip_by_value((image - offset) * scale, 0.0, 255.0)


def equalization(image, seed=None, factor: float = 0.0):
    """Histogram equalization of each channel (the PIL ImageOps.equalize lookup table)."""
    tf = _tf()
    x = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.int32)
    channels = []
    for ch in range(image.shape[-1] or 3):
        v = tf.reshape(x[..., ch], (-1,))
        hist = tf.math.bincount(v, minlength=256, maxlength=256)
        last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0))[None])[0]  # count of the top value
        step = (tf.reduce_sum(hist) - last) // 255
        lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(lut, 0, 255)
        eq = tf.gather(lut, x[..., ch])
        channels.append(tf.where(step > 0, eq, x[..., ch]))
    return tf.cast(tf.stack(channels, axis=-1), tf.float32)


_OPS = (shear, translation, rotation, brightness, color_degeneration, contrast, sharpness, solarization,
        posterization, auto_contrast, equalization)


def rand_augment(image, seed, num_ops: int = 2, factor: float = 0.5):
    """`num_ops` ops drawn uniformly (with replacement) from RANDAUGMENT_OPS, each at a random
    magnitude in its range at `factor` (see the module docstring)."""
    tf = _tf()
    image = tf.cast(image, tf.float32)
    shape = image.shape
    for i in range(num_ops):
        s = _sub(seed, 100 + i)
        idx = tf.random.stateless_uniform((), _sub(s, 0), minval=0, maxval=len(_OPS), dtype=tf.int32)
        op_seed = _sub(s, 1)
        branches = [(lambda op=op, image=image, op_seed=op_seed: op(image, op_seed, factor)) for op in _OPS]
        image = tf.switch_case(idx, branches)
        image.set_shape(shape)
    return image


def pad_crop_flip(image, seed, size: Sequence[int], pad: int):
    """Zero-pad by `pad`, take a random `size` crop, flip left-right with probability 1/2."""
    tf = _tf()
    h, w = (int(s) for s in size)
    padded = tf.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    c = image.shape[-1] or 3
    crop = tf.image.stateless_random_crop(padded, (h, w, c), seed=_sub(seed, 0))
    return flip(crop, _sub(seed, 1))


def flip(image, seed):
    """Left-right flip with probability 1/2."""
    return _tf().image.stateless_random_flip_left_right(image, seed)


def translate(image, seed, fraction: float):
    """Shift by up to +-`fraction` of the height and width, zeros outside (the 'light' augmentation)."""
    return translate_batch(image[None], seed, fraction)[0]


def translate_batch(images, seed, fraction: float):
    """`translate` of each image of a batch (N, H, W, C) by its own shift, in one warp: the i-th image
    takes the i-th value of each parameter's stream (image 0 that of `translate` with this seed)."""
    tf = _tf()
    n = tf.shape(images)[0]
    h = tf.cast(tf.shape(images)[1], tf.float32)
    w = tf.cast(tf.shape(images)[2], tf.float32)
    dy = _uniform(_sub(seed, 0), -fraction, fraction, (n,)) * h
    dx = _uniform(_sub(seed, 1), -fraction, fraction, (n,)) * w
    one, zero = tf.ones_like(dx), tf.zeros_like(dx)
    return _warp(images, tf.stack([one, zero, -dx, zero, one, -dy, zero, zero], axis=1))


def affine(image, seed, degrees: float, scale: float, fraction: float):
    """A random rotation by +-`degrees`, zoom by a factor in [1 - scale, 1 + scale] and shift by up to
    +-`fraction` of the height and width, in one bilinear warp about the centre, zeros outside (the
    'affine' augmentation: the classic one for handwritten digits, which flips and crops would garble)."""
    return affine_batch(image[None], seed, degrees, scale, fraction)[0]


def affine_batch(images, seed, degrees: float, scale: float, fraction: float):
    """`affine` of each image of a batch (N, H, W, C) by its own rotation, zoom and shift, in one warp
    (one op for the batch instead of some twenty per image in a tf.data map)."""
    tf = _tf()
    n = tf.shape(images)[0]
    h = tf.cast(tf.shape(images)[1], tf.float32)
    w = tf.cast(tf.shape(images)[2], tf.float32)
    angle = _uniform(_sub(seed, 0), -degrees, degrees, (n,)) * (math.pi / 180.0)
    zoom = _uniform(_sub(seed, 1), 1.0 - scale, 1.0 + scale, (n,))
    dy = _uniform(_sub(seed, 2), -fraction, fraction, (n,)) * h
    dx = _uniform(_sub(seed, 3), -fraction, fraction, (n,)) * w
    # output -> input: x_in = R(-angle) (x_out - c - d) / zoom + c
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    cx, cy = (w - 1) / 2, (h - 1) / 2
    tx = cx - cos * (cx + dx) - sin * (cy + dy)
    ty = cy + sin * (cx + dx) - cos * (cy + dy)
    zero = tf.zeros_like(cos)
    return _warp(images, tf.stack([cos, sin, tx, -sin, cos, ty, zero, zero], axis=1))


def _warp(images, transforms):
    """Bilinear projective warp of a batch by per-image (N, 8) output -> input maps, zeros outside."""
    tf = _tf()
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.cast(transforms, tf.float32), output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def inception_box(shape, seed):
    """(begin, size) of an Inception-style crop: 8%-100% of the area, aspect 3/4-4/3."""
    tf = _tf()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros((1, 0, 4), tf.float32), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size


def inception_crop(image, seed, size: Sequence[int]):
    """Inception-style random crop of a decoded image, resized (bilinear) to `size`."""
    tf = _tf()
    begin, box = inception_box(tf.shape(image), seed)
    crop = tf.slice(image, begin, box)
    return tf.image.resize(crop, tuple(int(s) for s in size), method="bilinear")


def _beta(seed, shape, alpha):
    tf = _tf()
    x = tf.random.stateless_gamma(shape, _sub(seed, 0), alpha=alpha)
    y = tf.random.stateless_gamma(shape, _sub(seed, 1), alpha=alpha)
    return x / tf.maximum(x + y, 1e-12)


def _partners(seed, n):
    """A random permutation of range(n)."""
    tf = _tf()
    return tf.argsort(tf.random.stateless_uniform((n,), seed))


def mixup(images, labels, seed, alpha: float):
    """keras.layers.MixUp(alpha), stateless: each image blended with a random partner of the
    batch by its own weight ~ Beta(alpha, alpha); labels blended alike."""
    tf = _tf()
    n = tf.shape(images)[0]
    w = _beta(_sub(seed, 0), (n,), alpha)
    j = _partners(_sub(seed, 1), n)
    wi = tf.reshape(w, (-1, 1, 1, 1))
    wl = tf.reshape(w, (-1, 1))
    return wi * images + (1.0 - wi) * tf.gather(images, j), wl * labels + (1.0 - wl) * tf.gather(labels, j)


def cutmix(images, labels, seed, factor: float):
    """keras.layers.CutMix(factor), stateless: each image gets a box of a random partner's image
    (box side ratio sqrt(1 - lambda), lambda ~ Beta(a, a), a ~ U(0, factor)); labels weighted by area."""
    tf = _tf()
    n = tf.shape(images)[0]
    h = tf.cast(tf.shape(images)[1], tf.float32)
    w = tf.cast(tf.shape(images)[2], tf.float32)
    a = _uniform(_sub(seed, 0), 0.0, factor) + 1e-6
    lam = _beta(_sub(seed, 1), (n,), a)
    ratio = tf.sqrt(1.0 - lam)
    cw, ch = ratio * w, ratio * h
    x0 = _uniform(_sub(seed, 2), 0.0, 1.0, (n,)) * (w - cw)
    y0 = _uniform(_sub(seed, 3), 0.0, 1.0, (n,)) * (h - ch)
    x1, y1 = x0 + cw, y0 + ch
    gx = tf.range(w)[None, None, :]
    gy = tf.range(h)[None, :, None]
    inside = ((gx >= x0[:, None, None]) & (gx < x1[:, None, None]) &
              (gy >= y0[:, None, None]) & (gy < y1[:, None, None]))[..., None]
    j = _partners(_sub(seed, 4), n)
    out = tf.where(inside, tf.gather(images, j), images)
    kept = tf.reshape(1.0 - (x1 - x0) * (y1 - y0) / (w * h), (-1, 1))
    return out, kept * labels + (1.0 - kept) * tf.gather(labels, j)
