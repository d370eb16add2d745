"""Datasets as tf.data pipelines: one registry of names, one pipeline builder.

Contract used by training, export and inspection:
`load(name) -> Splits` with unbatched tf.data.Datasets of (float32 image (H, W, C) in [0, 255],
int32 label) for train / val / test, plus class names. `pipeline(...)` turns a split into the
batched, augmented, prefetched input of `model.fit` (TensorFlow, JAX and torch backends alike).

Names: digits, cifar10, cifar100, mnist, fashion_mnist, tfds:NAME, folder:PATH, records:GLOB.
Submodules: images (the one image loader: decode, channels, resize), batches (pipeline,
split_arrays), folders (listing, decoding, bad files), augment (per-image augmentation ops),
records (TFRecord shards: writer and reader).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from keras_vit.data.batches import (
    AUGMENTS,
    CACHE_LIMIT_BYTES,
    augmenter,
    batch_augmenter,
    inception_crop,
    pipeline,
    split_arrays,
)
from keras_vit.data.folders import (
    IMAGE_EXTENSIONS,
    BadImages,
    bad_image_line,
    checked_images,
    holds_images,
    list_images,
    naming_bad_images,
)
from keras_vit.data.images import load_image_file, prepare_image, read_image
from keras_vit.data.records import write_records
from keras_vit.errors import DatasetError, first_line

DIGITS_SIZE = 32  # 8x8 digits upsampled so that patch 4 gives 64 tokens
KERAS_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist")
NAMES = ("digits",) + KERAS_DATASETS + ("tfds:NAME", "folder:PATH", "records:GLOB")
_CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


@dataclasses.dataclass
class Splits:
    """A dataset's splits (unbatched tf.data.Datasets) and its class names."""

    train: object
    val: object
    test: object
    class_names: List[str]
    image_shape: Tuple[Optional[int], Optional[int], int]
    bad_images: Optional[BadImages] = None  # files skipped while decoding (skip_bad_images=True)
    sizes: Optional[Tuple[int, int, int]] = None  # train/val/test examples, when known without reading them

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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


# --- the registry ----------------------------------------------------------------------------

def load(name: str, *, seed: int = 0, val_fraction: float = 0.1, data_dir: Optional[str] = None,
         skip_bad_images: bool = False, worker: Optional[Tuple[int, int]] = None, evaluation: bool = False,
         shuffle_seed: Optional[int] = None) -> Splits:
    """The train / val / test splits of a named dataset. `val_fraction` of the training data is
    held out (seeded) when the dataset has no validation split of its own. Image files that do
    not decode fail the pipeline with their name, or with `skip_bad_images` are dropped and
    listed in `Splits.bad_images`. `worker=(count, index)`: an image folder's training split
    holds only this worker's share of the files (a new share each pass, disjoint from the other
    workers'), so that each worker decodes only its own; other sources shard in tf.distribute.
    `evaluation=True` (data that is only scored, not trained on): a folder of class sub-folders is
    its test split whole, of any number of classes (no hold-out), and `records:` need no training
    shards (the test shards, else the validation ones, are every split). `shuffle_seed` (default `seed`)
    seeds the order in which the training files are read, `seed` the hold-out."""
    shuffle_seed = seed if shuffle_seed is None else shuffle_seed
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"dataset must be a name, one of {', '.join(NAMES)}; got {name!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    name = name.strip()
    if name == "digits":
        x_tr, y_tr, x_te, y_te = digits_arrays()
        return _from_arrays(x_tr, y_tr, x_te, y_te, _CLASS_NAMES["digits"], seed, val_fraction)
    if name in KERAS_DATASETS:
        return _keras_dataset(name, seed, val_fraction)
    if name.startswith("tfds:"):
        return _tfds(name[len("tfds:"):], seed, val_fraction, data_dir, shuffle_seed)
    bad = BadImages() if skip_bad_images else None
    if name.startswith("folder:"):
        return _folder(name[len("folder:"):], seed, val_fraction, bad, worker, evaluation, shuffle_seed)
    if name.startswith("records:"):
        from keras_vit.data.records import load_records

        return load_records(name[len("records:"):], seed, val_fraction, bad, evaluation, shuffle_seed)
    raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(NAMES)}")


def slug(name: str) -> str:
    """A file-name-safe short form of a dataset name (for run folders)."""
    if name.startswith("folder:"):
        name = "folder-" + (os.path.basename(os.path.normpath(name[len("folder:"):])) or "root")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace(":", "-"))


def _split_val(n: int, labels: np.ndarray, seed: int, val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): a seeded, stratified hold-out of `val_fraction`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise DatasetError(f"--val-fraction {val_fraction:g} holds out {n_val} of the {n} training examples, leaving "
                           f"none to train on; give a fraction under {(n - 0.5) / n:.3g}")
    counts = np.bincount(labels)
    k = len(counts[counts > 0])  # stratified only where each class can be in both parts
    strat = labels if counts[counts > 0].min() >= 2 and n_val >= k and n - n_val >= k else None
    tr, va = train_test_split(idx, test_size=n_val, stratify=strat, random_state=seed)
    return np.sort(tr), np.sort(va)


def _from_arrays(x_tr, y_tr, x_te, y_te, class_names, seed, val_fraction) -> Splits:
    import tensorflow as tf

    x_tr = _as_hwc(x_tr)
    x_te = _as_hwc(x_te)
    y_tr = np.asarray(y_tr).reshape(-1).astype(np.int32)
    y_te = np.asarray(y_te).reshape(-1).astype(np.int32)
    tr, va = _split_val(len(x_tr), y_tr, seed, val_fraction)

    def ds(x, y):
        return tf.data.Dataset.from_tensor_slices((x, y))

    return Splits(ds(x_tr[tr], y_tr[tr]), ds(x_tr[va], y_tr[va]), ds(x_te, y_te),
                  list(class_names), tuple(int(s) for s in x_tr.shape[1:]))


def _as_hwc(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:  # grayscale (N, H, W)
        x = x[..., None]
    return x.astype(np.float32)


def _keras_dataset(name: str, seed: int, val_fraction: float) -> Splits:
    import keras

    loader = getattr(keras.datasets, name)
    try:
        (x_tr, y_tr), (x_te, y_te) = loader.load_data()
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a truncated cache: one line
        raise DatasetError(f"could not download dataset {name!r} via keras.datasets: {first_line(exc)}") from None
    classes = _CLASS_NAMES.get(name) or [str(i) for i in range(int(np.max(y_tr)) + 1)]
    return _from_arrays(x_tr, y_tr, x_te, y_te, classes, seed, val_fraction)


def _tfds(name: str, seed: int, val_fraction: float, data_dir: Optional[str],
          shuffle_seed: Optional[int] = None) -> Splits:
    import tensorflow as tf

    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DatasetError("tfds: datasets need tensorflow-datasets; pip install 'keras-vit[tfds]'") from None
    if not name:
        raise DatasetError("tfds: needs a dataset name, e.g. tfds:oxford_flowers102")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        real = getattr(type(builder).download_and_prepare, "__module__", "").startswith("tensorflow_datasets.core")
        if real and not builder.is_prepared():  # (tfds.testing.mock_data's download_and_prepare fetches nothing)
            _check_tfds_network(name, builder.data_dir)
        builder.download_and_prepare()
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - unknown name, no network: one line
        raise DatasetError(f"could not load dataset 'tfds:{name}': {first_line(exc)}") from None
    info = builder.info
    splits = set(info.splits.keys()) or {"train", "test"}  # no metadata (e.g. tfds.testing.mock_data)
    if "train" not in splits:
        raise DatasetError(f"tfds:{name} has no 'train' split (it has {sorted(splits)})")
    keys = info.supervised_keys
    if not keys:
        raise DatasetError(f"tfds:{name} has no (image, label) supervised keys")
    pct = int(round(val_fraction * 100))
    if not splits & {"validation", "val"} and not 0 < pct < 100:  # train[100%:] or train[:0%]: no data
        raise DatasetError(f"--val-fraction {val_fraction:g} of tfds:{name}'s train split rounds to {pct}% (tfds splits "
                           "in whole percents); give 0.01 to 0.99")
    val_split = next((s for s in ("validation", "val") if s in splits), f"train[{100 - pct}%:]")
    train_split = "train" if val_split in splits else f"train[:{100 - pct}%]"
    test_split = next((s for s in ("test", "validation", "val") if s in splits), val_split)

    def get(split, shuffle_files=False):
        # training reads the prepared files in a seeded order that changes each epoch
        config = tfds.ReadConfig(shuffle_seed=seed if shuffle_seed is None else shuffle_seed) if shuffle_files else None
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=shuffle_files, read_config=config)
        return ds.map(lambda x, y: (_to_float(x), _to_int(y)), num_parallel_calls=tf.data.AUTOTUNE)

    label = info.features[keys[1]]
    if not isinstance(getattr(label, "num_classes", None), int):
        raise DatasetError(f"tfds:{name}'s label {keys[1]!r} is a {type(label).__name__}, not a ClassLabel: a "
                           "classifier needs class labels")
    names = list(getattr(label, "names", None) or [str(i) for i in range(label.num_classes)])
    shape = tuple(info.features[keys[0]].shape)
    return Splits(get(train_split, shuffle_files=True), get(val_split), get(test_split), names, shape)


_TFDS_HOST = ("storage.googleapis.com", 443)  # tfds' own mirror, and where most of its downloads live


def _check_tfds_network(name: str, data_dir: str) -> None:
    """A dataset to download on a machine that cannot reach tfds' servers: one line at once, where
    tfds retries for minutes (3.5 for mnist) under progress bars. Skipped behind a proxy, which
    only tfds' own requests know how to use."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    try:
        socket.create_connection(_TFDS_HOST, timeout=10).close()
    except OSError as exc:
        raise DatasetError(f"could not load dataset 'tfds:{name}': it is not prepared in {data_dir} and "
                           f"{_TFDS_HOST[0]} cannot be reached ({exc.strerror or exc}); prepare it where there is "
                           f"network (tfds build {name}) and pass --data-dir") from None


def _to_int(y):
    import tensorflow as tf

    return tf.cast(y, tf.int32)


def _to_float(x):
    import tensorflow as tf

    x = tf.cast(x, tf.float32)
    return x if x.shape.rank == 3 else x[..., None]


def _folder(path: str, seed: int, val_fraction: float, bad: Optional[BadImages] = None,
            worker: Optional[Tuple[int, int]] = None, evaluation: bool = False,
            shuffle_seed: Optional[int] = None) -> Splits:
    """`PATH/<class>/*.jpg` with a held-out val split, or `PATH/train`, `PATH/val` (and `PATH/test`)."""
    (tr_f, tr_y), (va_f, va_y), (te_f, te_y), names = _folder_lists(path, seed, val_fraction, bad, evaluation)
    shuffle_seed = seed if shuffle_seed is None else shuffle_seed
    return Splits(_image_files(tr_f, tr_y, bad, shuffle_seed=shuffle_seed, worker=worker), _image_files(va_f, va_y, bad),
                  _image_files(te_f, te_y, bad),
                  names, (None, None, 3), bad, (len(tr_f), len(va_f), len(te_f)))


def _folder_lists(path: str, seed: int, val_fraction: float, bad: Optional[BadImages] = None,
                  evaluation: bool = False):
    """((files, labels) of train, val, test; class names) of an image folder (see _folder); with
    `evaluation`, a folder of class sub-folders is every split, whole."""
    path = os.path.expanduser(path)
    if not path or not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"folder {path!r} {what} (expected folder:PATH with one sub-folder per class)")
    layout = {s: os.path.join(path, s) for s in ("train", "val", "validation", "test")}
    if os.path.isdir(layout["train"]) and not holds_images(layout["train"]):  # else a class named "train"
        train_files, train_labels, names = list_images(layout["train"], bad=bad)
        val_dir = layout["val"] if os.path.isdir(layout["val"]) else layout["validation"]
        if os.path.isdir(val_dir):
            val_files, val_labels, _ = list_images(val_dir, names, bad)
        else:
            tr, va = _split_val(len(train_files), train_labels, seed, val_fraction)
            val_files, val_labels = [train_files[i] for i in va], train_labels[va]
            train_files, train_labels = [train_files[i] for i in tr], train_labels[tr]
        if os.path.isdir(layout["test"]):
            test_files, test_labels, _ = list_images(layout["test"], names, bad)
        else:
            test_files, test_labels = val_files, val_labels
    elif evaluation:
        files, labels, names = list_images(path, bad=bad, training=False)
        return (files, labels), (files, labels), (files, labels), names
    else:
        files, labels, names = list_images(path, bad=bad)
        tr, va = _split_val(len(files), labels, seed, val_fraction)
        train_files, train_labels = [files[i] for i in tr], labels[tr]
        val_files, val_labels = [files[i] for i in va], labels[va]
        test_files, test_labels = val_files, val_labels  # one folder: val doubles as test
    return (train_files, train_labels), (val_files, val_labels), (test_files, test_labels), names


def _image_files(files: Sequence[str], labels: np.ndarray, bad: Optional[BadImages] = None,
                 shuffle_seed: Optional[int] = None, worker: Optional[Tuple[int, int]] = None):
    """(image, label) of image files, decoded in parallel; with `shuffle_seed` the file names are
    reshuffled each epoch before decoding (cheap, where a shuffle buffer of decoded images is not);
    with `worker=(count, index)` only every count-th name of that order, from `index`, is decoded
    (every worker shuffles alike, so the shares are disjoint and together hold every file), pass
    after pass without end: shares differ by a file, and by the bad files skipped, so the trainer
    sets the steps of an epoch (every worker of a cluster must take as many)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((list(files), np.asarray(labels, np.int32)))
    if shuffle_seed is not None and len(files) > 1:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    if worker is not None:
        count, index = worker
        if not 0 <= index < count:
            raise DatasetError(f"worker index {index} is out of range for {count} workers")
        ds = ds.shard(count, index).repeat()
    return checked_images(ds, bad)


__all__ = ["NAMES", "AUGMENTS", "KERAS_DATASETS", "DIGITS_SIZE", "CACHE_LIMIT_BYTES", "IMAGE_EXTENSIONS", "DatasetError",
           "Splits", "BadImages", "load", "slug", "digits_arrays", "read_image", "prepare_image", "load_image_file",
           "split_arrays", "augmenter", "batch_augmenter", "inception_crop", "pipeline", "bad_image_line", "checked_images",
           "list_images", "naming_bad_images", "write_records"]
