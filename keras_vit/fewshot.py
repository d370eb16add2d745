"""Few-shot linear evaluation (the paper's protocol, Section 4 and Appendix B):

freeze the representation (pre-logits features), draw k images per class from the training
split, solve a regularised least-squares regression from the features to {-1, 1}^K targets
in closed form, and report test accuracy for k = 1, 5, 10, 25, over several random draws of
the support set (mean and spread). The regulariser is chosen on held-out (validation) data,
never on the test split.

As in big_vision's `fewshot_lsr` evaluator, features are standardised with the support set's
mean and std and a large constant feature (100) carries the bias almost unregularised; the
solve for a whole grid of regularisers shares one eigendecomposition (np.linalg.eigh).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np

from keras_vit.layers import TokenPooling
from keras_vit.model import get_config
from keras_vit.train.towers import TowerModel

__all__ = ["DEFAULT_SHOTS", "DEFAULT_L2_GRID", "feature_extractor", "extract_features", "ridge_regression",
           "ridge_predict", "fewshot_evaluate", "evaluate_model"]

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_GRID = tuple(float(2.0 ** i) for i in range(-10, 20))
BIAS_CONSTANT = 100.0


# --- features -----------------------------------------------------------------------------
def feature_extractor(model):
    """The model up to its pre-logits features (B, D): a functional sub-model ending at the input
    of "head"; a headless model itself; for an output="tokens" model, its tokens pooled as its
    classifier pools them (class token or mean). Feature maps (feature_layers) are refused."""
    cfg = get_config(model)
    if cfg.feature_layers:
        raise ValueError("few-shot evaluation needs pooled (B, D) features; this model returns the feature maps "
                         f"of blocks {list(cfg.feature_layers)}: use a model built without feature_layers")
    if cfg.output == "tokens":
        if cfg.classifier == "map":
            raise ValueError("this model returns tokens without its MAP head: build it with include_top=False "
                             "(and no output) for pooled features")
        pooled = TokenPooling(cfg.classifier, cfg.num_prefix_tokens, name="pool")(model.outputs[0])
        return TowerModel(model.input, pooled, name=f"{model.name}_features")
    if not cfg.include_top:
        return model
    features = model.get_layer("head").input
    if cfg.distilled:  # the mean of the class and distillation tokens' features, as include_top=False gives
        features = keras.layers.Average(name="features_mean")([features, model.get_layer("head_dist").input])
    return TowerModel(model.input, features, name=f"{model.name}_features")


def extract_features(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Frozen pre-logits features (N, D) float32 of float images in [0, 255] (N, H, W, C).

    Images of another size than the model's are resized (bilinear) to it."""
    cfg = get_config(model)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.shape[-1] != cfg.channels:
        raise ValueError(f"images have {images.shape[-1]} channels but the model takes {cfg.channels}")
    features = feature_extractor(model)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if tuple(batch.shape[1:3]) != tuple(cfg.image_size):
            batch = keras.ops.convert_to_numpy(keras.ops.image.resize(batch, cfg.image_size))
        out.append(np.asarray(keras.ops.convert_to_numpy(features.predict_on_batch(batch)), dtype=np.float32))
    return np.concatenate(out, axis=0)


# --- closed-form ridge regression ---------------------------------------------------------------
def _targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return 2.0 * np.eye(num_classes)[labels] - 1.0  # one-hot rescaled to {-1, 1}


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (x - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def ridge_regression(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Closed-form regularised least squares: argmin_W ||X W - Y||^2 + l2 ||W||^2 = (X^T X + l2 I)^-1 X^T Y,
    solved in the dual (X^T (X X^T + l2 I)^-1 Y) when there are fewer samples than features."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    if n >= d:
        return np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)
    return x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), y)


class _RidgeCache:
    """One eigendecomposition of the (standardised, bias-padded) support set, reused for every
    regulariser: W(l2) = lhs diag(1 / (eigs + l2)) rhs (big_vision's trick)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int):
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(axis=0, keepdims=True)
        self.std = x.std(axis=0, keepdims=True) + 1e-5
        x = _standardise(x, self.mean, self.std)
        y = _targets(labels, num_classes)
        if len(x) >= x.shape[1]:
            eigs, q = np.linalg.eigh(x.T @ x)
            self.rhs, self.lhs = q.T @ (x.T @ y), q
        else:
            eigs, q = np.linalg.eigh(x @ x.T)
            self.rhs, self.lhs = q.T @ y, x.T @ q
        self.eigs = eigs

    def weights(self, l2: float) -> np.ndarray:
        return (self.lhs / (self.eigs + l2)[None, :]) @ self.rhs

    def predict(self, x: np.ndarray, l2: float) -> np.ndarray:
        return np.argmax(_standardise(np.asarray(x, np.float64), self.mean, self.std) @ self.weights(l2), axis=1)


def ridge_predict(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray, l2: float,
                  num_classes: Optional[int] = None) -> np.ndarray:
    """Class predictions for query_x from the closed-form ridge fit on the support set."""
    k = int(num_classes if num_classes is not None else np.max(support_y) + 1)
    return _RidgeCache(support_x, np.asarray(support_y), k).predict(query_x, l2)


def _draw_support(labels: np.ndarray, shots: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    idx = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise ValueError(f"class {c} has {len(pool)} training images, fewer than {shots} shots")
        idx.append(rng.choice(pool, size=shots, replace=False))
    return np.concatenate(idx)


def fewshot_evaluate(train: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray],
                     test: Tuple[np.ndarray, np.ndarray], shots: Sequence[int] = DEFAULT_SHOTS,
                     draws: int = 5, l2_grid: Sequence[float] = DEFAULT_L2_GRID, seed: int = 0,
                     num_classes: Optional[int] = None) -> Dict:
    """The protocol on precomputed features: each of (train, val, test) is (features (N, D), labels (N,)).

    For every shot count, `draws` support sets of `shots` images per class are drawn from train;
    the regulariser maximising the mean validation accuracy over the draws is chosen from
    `l2_grid`, then test accuracy is measured with it on each draw. Returns a dict:
    {"num_classes", "chance", "draws", "shots": {k: {"mean", "std", "accuracies", "l2", "val_mean"}}}.
    """
    (xtr, ytr), (xva, yva), (xte, yte) = [(np.asarray(x, np.float64), np.asarray(y).astype(np.int64))
                                          for x, y in (train, val, test)]
    if len(xtr) == 0 or len(xva) == 0 or len(xte) == 0:
        raise ValueError("few-shot evaluation needs non-empty train, validation and test splits")
    for x in (xtr, xva, xte):
        if not np.isfinite(x).all():  # else the ridge solve fails on 'Eigenvalues did not converge'
            raise ValueError("the model's features are not all finite (NaN or inf): its weights are broken")
    top = int(max(ytr.max(), yva.max(), yte.max()))
    k = int(num_classes if num_classes is not None else top + 1)
    if top >= k or min(ytr.min(), yva.min(), yte.min()) < 0:
        raise ValueError(f"labels must be class indices 0..{k - 1} of num_classes={k}; got labels up to {top}")
    if not shots or any(not float(s).is_integer() or s < 1 for s in shots) or len(set(shots)) != len(shots):
        raise ValueError(f"shots must be distinct positive integers, got {list(shots)}")
    shots = [int(s) for s in shots]
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    grid = [float(l2) for l2 in l2_grid]
    if not grid or not all(np.isfinite(grid)) or min(grid) < 0:
        raise ValueError(f"l2_grid must be finite ridge penalties >= 0, at least one; got {list(l2_grid)}")
    rng = np.random.default_rng(seed)
    result: Dict = {"num_classes": k, "chance": 1.0 / k, "draws": int(draws), "shots": {}}
    for s in shots:
        caches = [_RidgeCache(xtr[idx], ytr[idx], k) for idx in
                  (_draw_support(ytr, s, k, rng) for _ in range(draws))]
        val_acc = np.array([[np.mean(c.predict(xva, l2) == yva) for l2 in grid] for c in caches])  # (draws, grid)
        best = int(np.argmax(val_acc.mean(axis=0)))
        l2 = grid[best]
        test_acc = np.array([np.mean(c.predict(xte, l2) == yte) for c in caches])
        result["shots"][s] = {"mean": float(test_acc.mean()), "std": float(test_acc.std()),
                              "accuracies": [float(a) for a in test_acc], "l2": l2,
                              "val_mean": float(val_acc[:, best].mean())}
    return result


def evaluate_model(model, train: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray],
                   test: Tuple[np.ndarray, np.ndarray], batch_size: int = 128, **options) -> Dict:
    """`fewshot_evaluate` on the frozen pre-logits features of `model` for image splits
    (images (N, H, W, C) in [0, 255], labels (N,)); options go to fewshot_evaluate."""
    feats = [(extract_features(model, x, batch_size), y) for x, y in (train, val, test)]
    return fewshot_evaluate(*feats, **options)
