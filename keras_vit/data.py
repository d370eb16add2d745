"""Datasets as tf.data pipelines. (Minimal seed: the offline `digits` dataset; the training
issue grows this into the full registry.)

Contract used by training, export and inspection:
`load(name) -> Splits` with unbatched tf.data.Datasets of (float32 image (H, W, C) in [0, 255],
int32 label) for train / val / test, plus class names.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np

DIGITS_SIZE = 32  # 8x8 digits upsampled so that patch 4 gives 64 tokens


@dataclasses.dataclass
class Splits:
    """A dataset's splits (unbatched tf.data.Datasets) and its class names."""

    train: "object"
    val: "object"
    test: "object"
    class_names: List[str]
    image_shape: Tuple[int, int, int]


def digits_arrays(seed: int = 0):
    """scikit-learn's bundled 8x8 digits as (32, 32, 3) float images in [0, 255]; a fixed
    stratified 20% test split (360 images). Returns x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0 * 255.0)[..., None]  # (1797, 8, 8, 1)
    import tensorflow as tf

    images = tf.image.resize(images, (DIGITS_SIZE, DIGITS_SIZE), method="bilinear").numpy()
    images = np.clip(np.repeat(images, 3, axis=-1), 0.0, 255.0).astype(np.float32)
    labels = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=360, stratify=labels, random_state=seed)
    return x_tr, y_tr, x_te, y_te
