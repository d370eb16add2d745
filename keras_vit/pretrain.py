"""Self-supervised masked patch prediction (paper Section 4.6 and Appendix B.1.2).

Corrupt 50% of the patch embeddings of each image: of the corrupted ones, 80% are replaced by
a learnable [mask] embedding, 10% by the embedding of a random other patch (of the same image),
10% are left unchanged. The encoder's output at every corrupted patch predicts that patch's
3-bit mean colour (8 levels per channel, 512 classes for RGB); the loss is on corrupted
patches only. The alternatives the paper compares are options of `target`:

- "color": 3-bit mean colour, a 8^C-way classification (the paper's choice);
- "color_regression": the mean colour, regressed with L2 (values scaled to [-1, 1]);
- "patch_regression": the full patch (every pixel and channel), regressed with L2.

`pretrain(PretrainConfig(...))` runs it on a dataset of the registry into a run folder, as
`keras_vit.train.train` does for supervised training; `pretrain_encoder` is the same on arrays.

The encoder is a keras-vit VisionTransformer (build it with include_top=False): the
pre-training model runs the encoder's own layers (`encoder.forward_intermediates`, with
`PatchCorruption` as its patch transform) and puts a head on its output tokens, so after
training `encoder.save("model.keras")` is a plain keras-vit
model whose weights fine-tune with a new head (`vitcli train --weights model.keras`).

Model code is keras.ops only; the corruption codes and targets are drawn in numpy per batch,
so it runs on every backend.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Dict, Iterator, Optional, Tuple

import keras
import numpy as np
from keras import layers, ops

from keras_vit import data as kdata
from keras_vit.errors import TrainError, UserInputError, op_error_line
from keras_vit.files import save_model, write_json
from keras_vit.model import build_model, get_config
from keras_vit.train.recipes import TrainConfig, make_config, warmup_cosine
from keras_vit.train.runs import check_output, new_run_dir
from keras_vit.train.schedules import evaluate_once_per_update
from keras_vit.train.towers import TowerModel

__all__ = ["TARGETS", "KEEP", "MASK", "RANDOM", "UNCHANGED", "PatchCorruption", "DropPrefixTokens",
           "corruption_codes", "patch_targets", "num_outputs", "build_pretrainer", "masked_patch_batches",
           "PretrainConfig", "pretrain", "pretrain_encoder", "save_encoder"]

TARGETS = ("color", "color_regression", "patch_regression")
# Corruption codes per patch: not selected / [mask] embedding / random other patch / selected, unchanged.
KEEP, MASK, RANDOM, UNCHANGED = 0, 1, 2, 3
COLOR_BITS = 3

_REG = keras.saving.register_keras_serializable(package="keras_vit")


# --- layers --------------------------------------------------------------------------------
@_REG
class PatchCorruption(layers.Layer):
    """Applies corruption codes to patch embeddings (B, N, D): MASK -> the learnable mask
    embedding, RANDOM -> the embedding of patch `source[b, n]` of the same image, else unchanged."""

    def build(self, input_shape):
        self.mask_embedding = self.add_weight(
            shape=(input_shape[-1],), initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="mask_embedding")
        self.built = True

    def call(self, x, codes, source):
        codes = ops.cast(codes, "int32")[..., None]
        source = ops.cast(source, "int32")[..., None]
        other = ops.take_along_axis(x, ops.broadcast_to(source, ops.shape(x)), axis=1)
        mask = ops.broadcast_to(ops.cast(self.mask_embedding, x.dtype), ops.shape(x))
        x = ops.where(codes == RANDOM, other, x)
        return ops.where(codes == MASK, mask, x)

    def compute_output_shape(self, input_shape):
        return input_shape


@_REG
class DropPrefixTokens(layers.Layer):
    """Keeps the patch tokens (B, N, D) of a sequence that starts with `num_prefix_tokens` class tokens."""

    def __init__(self, num_prefix_tokens: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, x):
        return x[:, self.num_prefix_tokens:]

    def compute_output_shape(self, input_shape):
        b, s, d = input_shape
        return (b, None if s is None else s - self.num_prefix_tokens, d)

    def get_config(self):
        return {**super().get_config(), "num_prefix_tokens": self.num_prefix_tokens}


# --- corruption and targets (numpy) ------------------------------------------------------------
def corruption_codes(batch: int, num_patches: int, rng: np.random.Generator, mask_ratio: float = 0.5,
                     mask_prob: float = 0.8, random_prob: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """Codes (B, N) int32 and random-source indices (B, N) int32 for one batch.

    Exactly round(mask_ratio * N) patches per image are corrupted (at least 1); each corrupted
    patch becomes MASK with probability mask_prob, RANDOM with random_prob, else UNCHANGED.
    A RANDOM patch's source is a uniformly drawn *other* patch of the same image.
    """
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1.0:
        raise ValueError(f"mask_prob and random_prob must be >= 0 with a sum <= 1, got {mask_prob}, {random_prob}")
    k = max(1, int(round(mask_ratio * num_patches)))
    order = np.argsort(rng.random((batch, num_patches)), axis=1)
    selected = np.zeros((batch, num_patches), dtype=bool)
    np.put_along_axis(selected, order[:, :k], True, axis=1)
    u = rng.random((batch, num_patches))
    codes = np.where(u < mask_prob, MASK, np.where(u < mask_prob + random_prob, RANDOM, UNCHANGED))
    codes = np.where(selected, codes, KEEP).astype(np.int32)
    if num_patches > 1:
        src = rng.integers(0, num_patches - 1, size=(batch, num_patches))
        src = src + (src >= np.arange(num_patches)[None, :])  # skip the patch itself
    else:
        src = np.zeros((batch, num_patches), dtype=np.int64)
    return codes, src.astype(np.int32)


def _patches(images: np.ndarray, stride: Tuple[int, int]) -> np.ndarray:
    """(B, H, W, C) -> (B, N, sh, sw, C), patches in row-major order (as PatchEmbedding; pixels past
    the last whole patch are left out, as its VALID convolution does with patch_remainder='drop')."""
    b, h, w, c = images.shape
    sh, sw = stride
    x = images[:, :h // sh * sh, :w // sw * sw].reshape(b, h // sh, sh, w // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // sh) * (w // sw), sh, sw, c)


def num_outputs(target: str, stride: Tuple[int, int], channels: int) -> int:
    """Width of the prediction head: 8^C classes, C mean values, or every pixel of a patch."""
    if target == "color":
        return (2 ** COLOR_BITS) ** channels
    if target == "color_regression":
        return channels
    if target == "patch_regression":
        return stride[0] * stride[1] * channels
    raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")


def patch_targets(images: np.ndarray, stride: Tuple[int, int], target: str = "color") -> np.ndarray:
    """Per-patch targets of float images in [0, 255] (B, H, W, C): for "color" the class
    sum_c bin_c * 8^(C-1-c) of the 3-bit mean colour (B, N) int32; for the regressions the
    mean colour (B, N, C) or the flattened patch (B, N, sh*sw*C) scaled to [-1, 1]."""
    num_outputs(target, stride, images.shape[-1])  # validates target
    p = _patches(np.asarray(images, dtype=np.float32), stride)
    if target == "patch_regression":
        return (p.reshape(p.shape[0], p.shape[1], -1) / 127.5 - 1.0).astype(np.float32)
    mean = p.mean(axis=(2, 3))  # (B, N, C)
    if target == "color_regression":
        return (mean / 127.5 - 1.0).astype(np.float32)
    levels = 2 ** COLOR_BITS
    bins = np.clip(np.floor(mean / 256.0 * levels), 0, levels - 1).astype(np.int64)
    weights = levels ** np.arange(bins.shape[-1] - 1, -1, -1)
    return (bins * weights).sum(axis=-1).astype(np.int32)


# --- model ------------------------------------------------------------------------------------
def build_pretrainer(encoder: keras.Model, target: str = "color") -> keras.Model:
    """The masked-patch-prediction model around a keras-vit encoder (sharing its layers, so
    training it trains the encoder): inputs {"images", "codes", "source"} -> per-patch
    predictions (B, N, num_outputs), from the encoder's own output tokens
    (`encoder.forward_intermediates`) with `PatchCorruption` applied to the patch embeddings."""
    cfg = get_config(encoder)
    if cfg.feature_layers:
        raise ValueError(f"the encoder returns feature maps of blocks {list(cfg.feature_layers)}: masked patch "
                         "prediction needs the full encoder (build it with include_top=False and no feature_layers)")
    k = num_outputs(target, cfg.input_stride, cfg.channels)
    n = cfg.num_patches
    images = keras.Input((*cfg.image_size, cfg.channels), name="images")
    codes = keras.Input((n,), dtype="int32", name="codes")
    source = keras.Input((n,), dtype="int32", name="source")
    corrupt = PatchCorruption(name="patch_corruption")
    tokens = encoder.forward_intermediates(images, patch_transform=lambda x: corrupt(x, codes, source))["tokens"]
    x = DropPrefixTokens(cfg.seq_len - n, name="patch_tokens")(tokens)
    x = layers.Dense(k, name="mpp_head", dtype="float32")(x)
    return TowerModel({"images": images, "codes": codes, "source": source}, x, name=f"{encoder.name}_mpp")


def masked_patch_batches(images: np.ndarray, stride: Tuple[int, int], num_patches: int, batch_size: int,
                         target: str = "color", seed: int = 0, shuffle: bool = True, repeat: bool = True,
                         **corruption) -> Iterator[Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Batches (inputs, targets, sample_weight) with a fresh corruption per batch.

    sample_weight is 1 on corrupted patches and 0 elsewhere, rescaled per batch so that Keras'
    mean over all B*N entries equals the mean over the corrupted patches: the loss is on
    corrupted patches only."""
    rng = np.random.default_rng(seed)
    n = len(images)
    while True:
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = np.sort(order[start:start + batch_size])
            x = np.asarray(images[idx], dtype=np.float32)
            codes, src = corruption_codes(len(x), num_patches, rng, **corruption)
            weight = (codes != KEEP).astype(np.float32)
            weight *= weight.size / max(float(weight.sum()), 1.0)
            yield {"images": x, "codes": codes, "source": src}, patch_targets(x, stride, target), weight
        if not repeat:
            return


def pretrain_encoder(encoder: keras.Model, images: np.ndarray, val_images: Optional[np.ndarray] = None,
             target: str = "color", epochs: int = 10, batch_size: int = 64, learning_rate: float = 1e-3,
             weight_decay: float = 0.05, warmup_epochs: float = 1.0, seed: int = 0, verbose: int = 1,
             callbacks=None, **corruption) -> Dict[str, list]:
    """Masked patch prediction on unlabelled float images (N, H, W, C) in [0, 255]; trains the
    encoder's weights in place and returns the Keras history (loss, and accuracy on corrupted
    patches for "color"; val_* when val_images are given).

    Recipe as the paper's pre-training (Appendix B): AdamW (0.9, 0.999), linear warm-up then
    cosine decay, gradient clipping at global norm 1; the default sizes suit small datasets.
    """
    cfg = get_config(encoder)
    images = np.asarray(images, dtype=np.float32)
    expected = (*cfg.image_size, cfg.channels)
    for what, arr in (("images", images), ("val_images", val_images)):
        if arr is not None and (np.ndim(arr) != 4 or tuple(np.shape(arr)[1:]) != expected):
            raise ValueError(f"{what} must have shape (N, {expected[0]}, {expected[1]}, {expected[2]}) for this "
                             f"encoder, got {tuple(np.shape(arr))}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    keras.utils.set_random_seed(seed)
    model = build_pretrainer(encoder, target)
    steps = math.ceil(len(images) / batch_size)
    schedule = warmup_cosine(learning_rate, steps * epochs, int(round(warmup_epochs * steps)))
    optimizer = evaluate_once_per_update(keras.optimizers.AdamW(schedule, weight_decay=weight_decay, beta_1=0.9,
                                                                beta_2=0.999, global_clipnorm=1.0))
    if target == "color":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        loss = keras.losses.MeanSquaredError()
        metrics = []
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=metrics)
    train = masked_patch_batches(images, cfg.input_stride, cfg.num_patches, batch_size, target, seed, **corruption)
    fit_kw = {}
    if val_images is not None and len(val_images):
        # A fixed corruption of the validation images, so that val numbers are comparable across epochs.
        val = list(masked_patch_batches(np.asarray(val_images, np.float32), cfg.input_stride, cfg.num_patches,
                                        batch_size, target, seed + 1, shuffle=False, repeat=False, **corruption))
        fit_kw["validation_data"] = (
            {k: np.concatenate([b[0][k] for b in val]) for k in ("images", "codes", "source")},
            np.concatenate([b[1] for b in val]), np.concatenate([b[2] for b in val]))
        fit_kw["validation_batch_size"] = batch_size
    history = model.fit(train, steps_per_epoch=steps, epochs=epochs, verbose=verbose, shuffle=False,
                        callbacks=callbacks, **fit_kw)
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def save_encoder(encoder: keras.Model, path: str) -> str:
    """Save the encoder as a keras-vit .keras file (temporary name, then rename)."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"encoder path must end with .keras, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return save_model(encoder, path)


# --- a run on a dataset -------------------------------------------------------------------------
@dataclasses.dataclass
class PretrainConfig:
    """A masked-patch-prediction run: the dataset (its training images, no labels), the model (as
    for `vitcli train`, so that `--weights` fits it), the target and the recipe."""

    dataset: str = "digits"
    variant: Optional[str] = None  # None: the dataset's `vitcli train` default
    image_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    target: str = "color"
    mask_ratio: float = 0.5
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)  # other ViTConfig fields (--model-option)

    def model_options(self) -> Dict[str, Any]:
        """The model options given (not None), as `vitcli train` / make_config take them."""
        names = ("variant", "image_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return {**given, "model": dict(self.model)} if self.model else given

    def validate(self) -> TrainConfig:
        """Raise UserInputError naming a bad value and what is allowed; else the TrainConfig whose model
        (and checks: TrainConfig.validate, NaN and infinity refused) the run shares with `vitcli train`."""
        if self.target not in TARGETS:
            raise UserInputError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        ratio = self.mask_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:  # NaN fails too
            raise UserInputError(f"mask_ratio must be a number in (0, 1], got {ratio!r}")
        recipe = {k: getattr(self, k) for k in ("epochs", "batch_size", "learning_rate", "weight_decay", "warmup_epochs")}
        return make_config(self.dataset, "scratch", **self.model_options(), **recipe)


def _op_errors() -> Tuple[type, ...]:
    """The errors a running step raises on this backend (TensorFlow's OpError; none known elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return ()
    import tensorflow as tf

    return (tf.errors.OpError,)


def _check_converged(history: Dict[str, list]) -> None:
    """TrainError when the loss became NaN or infinite (TerminateOnNaN stopped the run): nothing is saved."""
    bad = next((v for v in history.get("loss", []) if not math.isfinite(v)), None)
    if bad is not None:
        raise TrainError(f"training diverged (loss {'NaN' if math.isnan(bad) else bad}); no encoder saved; try a lower --lr")


def _remove_if_empty(folder: str, made: bool) -> None:
    """Remove the run folder this run made, if nothing was written in it (a failed run leaves no trace)."""
    if made and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def pretrain(cfg: PretrainConfig, output: Optional[str] = None, verbose: Any = "auto",
             callbacks=None) -> Dict[str, Any]:
    """Pre-train an encoder on `cfg.dataset` into `output` (a new or empty folder; default runs/pretrain-<dataset>-<variant>-<time>):
    model.keras (an encoder `vitcli train --weights` fine-tunes) and metrics.json.

    The seed is set before the encoder is built, so a run repeats from the same initial weights.
    """
    train_cfg = cfg.validate()
    check_output(output, "--out")  # before the data loads: a taken folder is refused at once
    splits = kdata.load(cfg.dataset, seed=cfg.seed)
    channels = 1 if splits.image_shape[-1] == 1 else 3
    vit_cfg = train_cfg.vit_config(splits.num_classes, channels).replace(include_top=False)
    train_x = kdata.split_arrays(splits.train, vit_cfg.image_size, channels)[0]
    val_x = kdata.split_arrays(splits.val, vit_cfg.image_size, channels)[0]
    # A new folder each run (an earlier encoder is never replaced); runs/latest stays the last `train`'s.
    made = not (output and os.path.isdir(output))
    output = new_run_dir(train_cfg, output, "runs", kind="pretrain-", latest=False, option="--out")
    keras.utils.set_random_seed(cfg.seed)
    encoder = build_model(vit_cfg)
    try:
        history = pretrain_encoder(
            encoder, train_x, val_x, target=cfg.target, epochs=cfg.epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
            seed=cfg.seed, mask_ratio=cfg.mask_ratio, callbacks=[*(callbacks or []), keras.callbacks.TerminateOnNaN()],
            verbose=(1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose)
        _check_converged(history)
    except _op_errors() as exc:  # out of memory, say: one line, as `train` gives
        _remove_if_empty(output, made)
        raise UserInputError(f"pre-training failed: {op_error_line(exc)}") from None
    except TrainError:
        _remove_if_empty(output, made)
        raise
    except BaseException:  # Ctrl-C, SIGTERM (vitcli), another error: an interrupted run leaves no empty folder
        _remove_if_empty(output, made)
        raise
    path = save_encoder(encoder, os.path.join(output, "model.keras"))
    write_json(os.path.join(output, "metrics.json"),
               {"task": "masked_patch_prediction", **dataclasses.asdict(cfg), "config": vit_cfg.to_dict(),
                "history": history})
    return {"run": output, "model": path, "history": history}
