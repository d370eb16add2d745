"""Reading a trained model the way `vitcli evaluate` / `vitcli predict` do: logits over a split,
loss and accuracies, top-k predictions for image files."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from keras_vit import data as kdata
from keras_vit.errors import TrainError, first_line
from keras_vit.model import get_config


def predict_logits(model: keras.Model, ds, batch_size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of a model over an unbatched (image, label) split, preprocessed exactly
    as in training (resize + channels, no augmentation)."""
    vcfg = get_config(model)
    batched = kdata.pipeline(ds, image_size=vcfg.image_size, batch_size=batch_size, num_classes=vcfg.num_classes,
                             channels=vcfg.channels, one_hot=False)
    labels = np.concatenate([y.numpy() for _, y in batched])
    logits = model.predict(batched.map(lambda x, y: x), verbose=0)
    return np.asarray(logits, np.float32), labels.astype(np.int64)


def evaluate(model: keras.Model, ds, class_names: Sequence[str], batch_size: int = 128) -> Dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy of `model` on a split, from `model.predict`."""
    logits, labels = predict_logits(model, ds, batch_size)
    n_cls = logits.shape[-1]
    if labels.size and labels.max() >= n_cls:
        raise TrainError(f"the dataset has labels up to {labels.max()} but the model has {n_cls} classes")
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    top1 = logits.argmax(-1) == labels
    k = min(5, n_cls)
    topk = (np.argsort(-logits, axis=-1)[:, :k] == labels[:, None]).any(-1)
    names = list(class_names) if len(class_names) == n_cls else [str(i) for i in range(n_cls)]
    per_class = {names[c]: float(top1[labels == c].mean()) for c in range(n_cls) if (labels == c).any()}
    return {"loss": loss, "top1": float(top1.mean()), "top5": float(topk.mean()), "per_class": per_class,
            "count": int(len(labels))}


def predict_images(model: keras.Model, paths: Sequence[str], class_names: Sequence[str], top_k: int = 5
                   ) -> List[List[Tuple[str, float]]]:
    """Top-k (class name, probability) for each image file, preprocessed as in training."""
    vcfg = get_config(model)
    images = []
    for p in paths:
        try:
            img = kdata.read_image(tf.constant(open(p, "rb").read()), from_bytes=True)
        except (OSError, tf.errors.OpError) as exc:
            raise TrainError(f"cannot read image {p}: {first_line(exc)}") from None
        images.append(kdata.prepare_image(img, vcfg.image_size, vcfg.channels).numpy())
    logits = model.predict(np.stack(images), verbose=0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = max(1, min(top_k, probs.shape[-1]))
    return [[(class_names[i], float(row[i])) for i in np.argsort(-row)[:k]] for row in probs]
