"""Splits to what a model consumes: `pipeline` (batched, augmented, prefetched input of
`model.fit`) and `split_arrays` (a whole split as NumPy arrays)."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from keras_vit.config import MAX_IMAGE_SIDE
from keras_vit.data import augment as A
from keras_vit.data.folders import naming_bad_images
from keras_vit.data.images import prepare_image
from keras_vit.errors import DatasetError

AUGMENTS = ("none", "light", "affine", "basic", "randaugment", "inception")
CACHE_LIMIT_BYTES = 2 * 1024 ** 3  # cache decoded images in memory below this size


def split_arrays(ds, image_size: Optional[Sequence[int]], channels: int, limit: Optional[int] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """An unbatched (image, label) split as arrays: images float32 (N, H, W, C) in [0, 255]
    through prepare_image, labels int64 (N,); DatasetError when the split is empty."""
    if limit:
        ds = ds.take(limit)
    xs, ys = [], []
    with naming_bad_images():
        for x, y in ds.map(lambda x, y: (prepare_image(x, image_size, channels), y)).batch(256).as_numpy_iterator():
            xs.append(np.asarray(x, np.float32))
            ys.append(np.asarray(y).astype(np.int64))
    if not xs:
        raise DatasetError("the dataset split is empty")
    return np.concatenate(xs), np.concatenate(ys)


def augmenter(kind: str, image_size: Sequence[int], seed: int = 0) -> Optional[Callable]:
    """The per-image augmentation for `kind` (see AUGMENTS): a function (image, seed) -> image for
    `Dataset.map`, or None for "none" (inception: the flip; its crop comes before resizing).

    light: translation by up to 1/16 of the side (digits, MNIST: no flips); affine: rotation by up to
    10 degrees, zoom by up to 10% and translation by up to 1/16 of the side in one warp (digits); basic: zero-pad by
    1/8 of the side, random crop, horizontal flip; randaugment: basic + RandAugment(2 ops, factor
    0.5, keras' op set, see keras_vit.data.augment); inception: horizontal flip.
    """
    if kind not in AUGMENTS:
        raise DatasetError(f"unknown augmentation {kind!r}; allowed: {', '.join(AUGMENTS)}")
    size = tuple(int(s) for s in image_size)
    pad = max(1, size[0] // 8)
    if kind == "none":
        return None
    if kind == "light":
        return lambda x, s: A.translate(x, s, 1 / 16)
    if kind == "affine":
        return lambda x, s: A.affine(x, s, degrees=10.0, scale=0.1, fraction=1 / 16)
    if kind == "inception":
        return A.flip
    if kind == "basic":
        return lambda x, s: A.pad_crop_flip(x, s, size, pad)
    return lambda x, s: A.rand_augment(A.pad_crop_flip(x, s, size, pad), A._sub(s, 7), num_ops=2, factor=0.5)


def batch_augmenter(kind: str) -> Optional[Callable]:
    """The batched form of `kind`'s augmentation where it has one (light, affine: one warp of the whole
    batch, each image by its own random map), a function (images, seed) -> images; else None."""
    if kind == "light":
        return lambda x, s: A.translate_batch(x, s, 1 / 16)
    if kind == "affine":
        return lambda x, s: A.affine_batch(x, s, degrees=10.0, scale=0.1, fraction=1 / 16)
    return None


def inception_crop(image, image_size: Sequence[int], seed: Optional[Tuple[int, int]] = None):
    """Inception-style random crop (8%-100% area, 3/4-4/3 aspect) resized to `image_size`."""
    import tensorflow as tf

    if seed is None:
        seed = tf.random.uniform((2,), maxval=2 ** 31 - 1, dtype=tf.int64)
    return A.inception_crop(image, seed, image_size)


def _check_size(image_size) -> Tuple[int, int]:
    """(height, width) from an int or a pair of positive integers, as ViT(image_size=) takes it."""
    pair = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    try:
        h, w = pair
    except (TypeError, ValueError):
        h = w = None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in (h, w)):
        raise DatasetError(f"image_size must be a positive integer up to {MAX_IMAGE_SIDE} or (height, width) of them, "
                           f"got {image_size!r}")
    return int(h), int(w)


def pipeline(ds, *, image_size: Sequence[int], batch_size: int, num_classes: int, channels: int = 3,
             training: bool = False, augment: str = "none", mixup: float = 0.0, cutmix: float = 0.0,
             seed: int = 0, cache: Union[bool, str] = "auto", shuffle_buffer: Optional[int] = None,
             one_hot: bool = True):
    """Split -> batches for `model.fit`: resize (AUTOTUNE), cache, shuffle (seeded), augmentation on
    parallel threads (training only; per image, or per batch for the warps of `batch_augmenter`),
    batch, MixUp/CutMix, prefetch.

    The same `seed` (here and in `load`) gives the same batches in a new run: every map is ordered,
    every random op stateless and seeded by the seed and the example's position in the stream
    (a split reshuffles its files each epoch, so a second pipeline on the same split object
    continues that sequence). Labels are one-hot floats (needed by label
    smoothing and MixUp/CutMix) unless `one_hot=False`.
    """
    import tensorflow as tf

    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise DatasetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    image_size = _check_size(image_size)
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise DatasetError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if shuffle_buffer is not None and (isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, numbers.Integral)
                                       or shuffle_buffer < 1):
        raise DatasetError(f"shuffle_buffer must be None or an integer >= 1, got {shuffle_buffer!r}")
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):  # Beta(alpha, alpha); 0 turns it off
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < math.inf:
            raise DatasetError(f"{name} must be a finite number >= 0 (the Beta distribution's alpha; 0 is off), "
                               f"got {alpha!r}")
    AUTO = tf.data.AUTOTUNE
    size = tuple(int(s) for s in image_size)
    inception = training and augment == "inception"
    variable_size = ds.element_spec[0].shape[0] is None  # decoded files (folder, records, some tfds)
    # Inception crops before resizing: the crop needs the full-resolution image.
    resize_to = None if inception else size
    ds = ds.map(lambda x, y: (prepare_image(x, resize_to, channels), y), num_parallel_calls=AUTO)
    if inception:  # full-resolution images wait in the shuffle buffer: as bytes (4x smaller), floats again at the crop
        ds = ds.map(lambda x, y: (tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8), y), num_parallel_calls=AUTO)
    batched = batch_augmenter(augment) if training else None
    cached = _should_cache(ds, size, channels, cache, inception)
    if cached:
        ds = ds.cache()
    if training:
        if shuffle_buffer is None:
            # In memory: up to 10k images. Streamed from files (shuffled by name before decoding,
            # see _image_files), a smaller buffer of decoded images; smallest at full resolution.
            shuffle_buffer = 10_000 if cached or not variable_size else 64 if inception else 1024
        n = ds.cardinality()
        buffer = shuffle_buffer if n < 0 else int(min(max(int(n), 1), shuffle_buffer))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        ds = _augmented(ds, None if batched else augmenter(augment, size, seed), inception, size, channels, seed)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTO)
    if batched is not None:
        ds = _augmented_batches(ds, batched, seed)
    if one_hot or (training and (mixup or cutmix)):
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)), num_parallel_calls=AUTO)
    if training and (mixup or cutmix):
        stream = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, stream)).map(_mixer(mixup, cutmix, seed), num_parallel_calls=AUTO)
    return ds.prefetch(AUTO)


def _augmented(ds, aug: Optional[Callable], inception: bool, size: Tuple[int, int], channels: int, seed: int):
    """`ds` with the per-image augmentation (and the inception crop) on parallel threads, each
    example seeded by `seed` and its position in the stream: different each epoch, the same
    sequence each run."""
    import tensorflow as tf

    if not inception and aug is None:
        return ds
    counter = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    base = tf.constant(seed, tf.int64)

    def per_image(xy, i):
        s = tf.stack([base, i])
        x = xy[0]
        if inception:
            x = A.inception_crop(tf.cast(x, tf.float32), A._sub(s, 11), size)
        if aug is not None:
            x = aug(x, s)
        x.set_shape(size + (channels,))
        return x, xy[1]

    return tf.data.Dataset.zip((ds, counter)).map(per_image, num_parallel_calls=tf.data.AUTOTUNE)


def _augmented_batches(ds, aug: Callable, seed: int):
    """`ds` (batched) with `aug` applied to each batch on parallel threads, each batch seeded by
    `seed` and its position in the stream, as `_augmented` seeds images."""
    import tensorflow as tf

    counter = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    base = tf.constant(seed, tf.int64)

    def per_batch(xy, i):
        x = aug(xy[0], tf.stack([base, i]))
        x.set_shape(xy[0].shape)
        return x, xy[1]

    return tf.data.Dataset.zip((ds, counter)).map(per_batch, num_parallel_calls=tf.data.AUTOTUNE)


def _should_cache(ds, size, channels, cache, inception) -> bool:
    if cache in (True, False):
        return bool(cache)
    n = int(ds.cardinality())
    if n < 0 or inception:  # unknown size, or full-resolution images before the crop
        return False
    return n * size[0] * size[1] * channels * 4 <= CACHE_LIMIT_BYTES


def _mixer(mixup: float, cutmix: float, seed: int):
    """Batch map ((x, y), i) -> (x, y) applying MixUp (alpha) and/or CutMix (factor), each with
    probability 1/2 when both (keras.layers.MixUp / CutMix semantics, stateless and seeded)."""
    import tensorflow as tf

    def fn(xy, i):
        x, y = xy
        s = tf.stack([tf.constant(seed, tf.int64), i])
        if mixup and cutmix:
            pick = tf.random.stateless_uniform((), A._sub(s, 9)) < 0.5
            return tf.cond(pick, lambda: A.mixup(x, y, s, mixup), lambda: A.cutmix(x, y, s, cutmix))
        return A.mixup(x, y, s, mixup) if mixup else A.cutmix(x, y, s, cutmix)

    return fn
