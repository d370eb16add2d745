"""Reading a trained model the way `vitcli evaluate` / `vitcli predict` do: logits over a split,
loss and accuracies, top-k predictions for image files."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np

from keras_vit import data as kdata
from keras_vit.errors import TrainError
from keras_vit.model import get_config


def predict_logits(model: keras.Model, ds, batch_size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of a model over an unbatched (image, label) split, preprocessed exactly
    as in training (resize + channels, no augmentation)."""
    vcfg = get_config(model)
    batched = kdata.pipeline(ds, image_size=vcfg.image_size, batch_size=batch_size, num_classes=vcfg.num_classes,
                             channels=vcfg.channels, one_hot=False)
    parts: List[Tuple[np.ndarray, np.ndarray]] = []
    with kdata.naming_bad_images():  # an image file that does not decode: one line naming it
        for x, y in batched:  # one pass: each file read and decoded once, its label beside its logits
            # NumPy in: JAX's and torch's predict_on_batch take no TensorFlow tensor (JAX: a TypeError traceback)
            logits = model.predict_on_batch(x.numpy())
            parts.append((np.asarray(keras.ops.convert_to_numpy(logits), np.float32), y.numpy()))
    if not parts:
        return np.zeros((0, vcfg.num_classes), np.float32), np.zeros((0,), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def evaluate(model: keras.Model, ds, class_names: Sequence[str], batch_size: int = 128,
             model_class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy and the confusion matrix (rows: true class,
    columns: predicted) of `model` on a split, from `model.predict`. `class_names` are the split's
    (its labels' names); with `model_class_names` (the model's outputs' names) a split with a subset
    of the model's classes is scored by name, and one whose classes are neither those nor as many
    is refused."""
    n_cls = get_config(model).num_classes
    lut = _labels_by_name(class_names, model_class_names, n_cls)
    logits, labels = predict_logits(model, ds, batch_size)
    if lut is not None:
        labels = lut[labels]
    if labels.size and (labels.max() >= n_cls or labels.min() < 0):
        raise TrainError(f"the dataset has labels from {labels.min()} to {labels.max()} but the model's classes are "
                         f"0 to {n_cls - 1}")
    if model_class_names is not None and len(model_class_names) == n_cls:
        class_names = model_class_names
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    top1 = logits.argmax(-1) == labels
    k = min(5, n_cls)
    topk = (np.argsort(-logits, axis=-1)[:, :k] == labels[:, None]).any(-1)
    names = list(class_names) if len(class_names) == n_cls else [str(i) for i in range(n_cls)]
    per_class = {names[c]: float(top1[labels == c].mean()) for c in range(n_cls) if (labels == c).any()}
    confusion = np.zeros((n_cls, n_cls), np.int64)
    np.add.at(confusion, (labels, logits.argmax(-1)), 1)
    return {"loss": loss, "top1": float(top1.mean()), "top5": float(topk.mean()), "per_class": per_class,
            "count": int(len(labels)), "confusion_matrix": confusion.tolist()}


def _labels_by_name(data_names: Sequence[str], model_names: Optional[Sequence[str]], n_cls: int) -> Optional[np.ndarray]:
    """The model's class index of each of the dataset's labels, where the two name their classes
    differently; None where they are the same (or the model's are unknown), or all other names for as many
    classes (taken in sorted order). A split with some names among the model's and some not gets a TrainError."""
    data_names = [str(n) for n in data_names]
    if model_names is None or len(model_names) != n_cls:
        return None
    model_names = [str(n) for n in model_names]
    if data_names == model_names:
        return None
    index = {n: i for i, n in enumerate(model_names)}
    if all(n in index for n in data_names):
        return np.array([index[n] for n in data_names], np.int64)
    if len(data_names) == n_cls and not any(n in index for n in data_names):
        return None  # other names for as many classes (ImageNet synset folders): in sorted order; some of the
        # model's names among them (dog/ and zebra/ for cat, dog) would score dog's images as cat: refused below
    unknown = [n for n in data_names if n not in index]
    shown = ", ".join(map(repr, model_names[:5])) + (", ..." if n_cls > 5 else "")
    raise TrainError(f"the dataset's classes {unknown[:5]} are not among the model's {n_cls} classes ({shown}); "
                     "name the class folders as the model's classes")


def _images(model: keras.Model, images) -> np.ndarray:
    """A (B, H, W, C) float batch at the model's size: from image files (read and resized as in
    training) or an array / one image already in [0, 255]."""
    vcfg = get_config(model)
    if isinstance(images, (str, bytes, os.PathLike)) or (isinstance(images, (list, tuple)) and images
                                                          and isinstance(images[0], (str, os.PathLike))):
        paths = [os.fsdecode(p) for p in ([images] if isinstance(images, (str, bytes, os.PathLike)) else images)]
        # A published checkpoint's evaluation transform (timm's resize and centre crop), when it names one.
        pre = getattr(model, "eval_preprocessing", None) or {}
        return np.stack([kdata.load_image_file(p, vcfg.image_size, vcfg.channels, **pre) for p in paths])
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must be file paths or an array (B, H, W, C) / (H, W, C), got shape {x.shape}")
    if x.shape[1:3] != tuple(vcfg.image_size) or x.shape[-1] != vcfg.channels:
        x = np.asarray(kdata.prepare_image(x, vcfg.image_size, vcfg.channels), np.float32)
    return x


def predict(model: keras.Model, images, top_k: int = 5, class_names: Optional[Sequence[str]] = None
            ) -> List[List[Tuple[str, float]]]:
    """Top-k (class name, probability) per image: image files or an array in [0, 255]. Names come
    from `class_names`, else the model's own (`model.class_names`, e.g. ImageNet's), else indices."""
    logits = np.asarray(model.predict(_images(model, images), verbose=0), np.float32)
    n = logits.shape[-1]
    names = list(class_names or getattr(model, "class_names", None) or [])
    if len(names) != n:
        names = [str(i) for i in range(n)]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = max(1, min(top_k, n))
    return [[(names[i], float(row[i])) for i in np.argsort(-row)[:k]] for row in probs]


def predict_images(model: keras.Model, paths: Sequence[str], class_names: Sequence[str], top_k: int = 5
                   ) -> List[List[Tuple[str, float]]]:
    """Top-k (class name, probability) for each image file, preprocessed as in training."""
    return predict(model, list(paths), top_k=top_k, class_names=class_names)
