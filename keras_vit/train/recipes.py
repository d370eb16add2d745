"""Training recipes: TrainConfig (every option of a run), make_config (recipe, then the
dataset's defaults, then overrides), the optimizer and its warm-up + cosine schedule."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import keras

from keras_vit import precision
from keras_vit.config import MAX_IMAGE_SIDE, ViTConfig, from_fields, parse_variant
from keras_vit.data import AUGMENTS
from keras_vit.errors import TrainError
from keras_vit.precision import JIT_MODES, MIXED_PRECISION
from keras_vit.train.schedules import evaluate_once_per_update, warmup_cosine

# Recipes (paper Appendix B, and the usual small-data ViT settings for "scratch").
RECIPES: Dict[str, Dict[str, Any]] = {
    "scratch": dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, momentum=0.9,
                    warmup_epochs=3.0, label_smoothing=0.1, clipnorm=1.0, augment="basic",
                    mixup=0.0, cutmix=0.0, dropout_rate=0.0, drop_path_rate=0.1),
    "finetune": dict(optimizer="sgd", learning_rate=0.01, weight_decay=0.0, momentum=0.9,
                     warmup_epochs=0.5, label_smoothing=0.0, clipnorm=1.0, augment="light",
                     mixup=0.0, cutmix=0.0, dropout_rate=0.0, drop_path_rate=0.0),
}
# Per-dataset defaults: the model used when no --variant is given, its image size, and the
# schedule length. digits: a small custom ViT (16 tokens: 4x4 patches at 16 px, each 2x2 of the
# original 8x8 pixels; width 64), trained with small random rotations, zooms and one-pixel shifts
# ("affine"); how these sizes, the epochs and the augmentation were chosen on the validation
# split is in BENCHMARKS.md ("Training on digits").
_SMALL = dict(variant="Ti/4", image_size=32, epochs=100, batch_size=128)
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "digits": dict(variant="Ti/4", image_size=16, epochs=80, batch_size=32, augment="affine",
                   drop_path_rate=0.0,
                   model=dict(hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)),
    "mnist": dict(_SMALL, image_size=28, epochs=30, augment="light"),
    "fashion_mnist": dict(_SMALL, image_size=28, epochs=30, augment="light"),
    "cifar10": dict(_SMALL),
    "cifar100": dict(_SMALL),
    "*": dict(variant="Ti/16", image_size=224, epochs=30, batch_size=64, augment="inception"),
}
# TrainConfig.variant of a run whose model is the --weights checkpoint's (DINOv2, SigLIP, DeiT ...).
FROM_WEIGHTS = "checkpoint"
MODEL_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier", "pos_embedding",
                "representation_size")
# The fields of the model's sizes: given in TrainConfig.model, the run no longer takes its model from --weights.
SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size")
# ViTConfig fields TrainConfig.model may not set: the run sets them itself (the field that does), or a
# trained classifier needs them as they are.
RUN_MODEL_FIELDS = {"variant": "variant (--variant)", "image_size": "image_size (--image-size)",
                    "dropout_rate": "dropout_rate (--dropout)", "drop_path_rate": "drop_path_rate (--drop-path)",
                    "num_classes": "the dataset's classes",
                    "channels": "the dataset's channels", "include_top": "a classifier (always)",
                    "output": "logits (always)", "feature_layers": "logits (no feature outputs)"}
OPTIMIZERS = ("adamw", "adam", "sgd")
DISTRIBUTE = ("auto", "none", "mirrored")


@dataclasses.dataclass
class TrainConfig:
    """Everything needed to repeat a run (written to the run folder as config.json)."""

    dataset: str = "digits"
    recipe: str = "scratch"
    variant: str = "Ti/4"
    image_size: Union[int, List[int]] = 16  # the side, or [height, width] of a non-square model
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)  # ViTConfig overrides
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 3.0
    label_smoothing: float = 0.1
    clipnorm: Optional[float] = 1.0
    augment: str = "basic"
    mixup: float = 0.0
    cutmix: float = 0.0
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    mixed_precision: str = "auto"  # auto: bf16 where the CPU has it natively and the step is big (precision.py)
    jit_compile: Any = "auto"  # auto | xla | fusible | scoped | none (True = xla, False = none)
    grad_accum: int = 1
    distribute: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    weights: Optional[str] = None
    data_dir: Optional[str] = None
    skip_bad_images: bool = False  # drop image files that do not decode (listed in bad_images.txt)
    freeze_backbone: bool = False  # linear probe: only the head trains
    layer_decay: Optional[float] = None  # block i of L at R^(L-i) of the head's rate, embeddings R^(L+1)
    # LoRA fine-tuning: rank-R adapters on every block's attention query and value; they and the head train
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None  # the adapters' scale is alpha / rank; None = rank (scale 1)
    lora_targets: Optional[List[str]] = None  # among query, key, value, mlp; None = query and value
    # Momentum of an exponential moving average of the weights, updated every step; the average
    # replaces the trained weights when training ends (model.keras, the test metrics). None = off.
    ema: Optional[float] = None
    # Seconds between epoch-end checkpoints (last.keras, best.keras, the resumable backup) of a one-process
    # run; 0 = every epoch. The last epoch is always saved; a resume repeats at most this much training.
    checkpoint_interval: float = 10.0

    def validate(self) -> TrainConfig:
        """Raise TrainError naming the bad value and what is allowed."""
        if self.recipe not in RECIPES:
            raise TrainError(f"unknown recipe {self.recipe!r}; allowed: {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")
        self.image_size = _image_size(self.image_size)
        for name in ("learning_rate", "weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:  # NaN fails too
                raise TrainError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.learning_rate <= 0:
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if isinstance(self.checkpoint_interval, bool) or not isinstance(self.checkpoint_interval, (int, float)) \
                or not 0 <= self.checkpoint_interval < float("inf"):
            raise TrainError(f"checkpoint_interval must be a number of seconds >= 0, got {self.checkpoint_interval!r}")
        if self.label_smoothing >= 1:
            raise TrainError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.clipnorm is not None and (isinstance(self.clipnorm, bool) or not isinstance(self.clipnorm, (int, float))
                                          or not 0 < self.clipnorm < math.inf):
            raise TrainError(f"clipnorm must be > 0 (or None for no clipping), got {self.clipnorm!r}")
        choices = dict(optimizer=OPTIMIZERS, mixed_precision=MIXED_PRECISION, distribute=DISTRIBUTE)
        if not isinstance(self.jit_compile, bool) and self.jit_compile not in JIT_MODES:
            raise TrainError(f"jit_compile must be one of {', '.join(JIT_MODES)} (or true/false); got {self.jit_compile!r}")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.layer_decay is not None and (isinstance(self.layer_decay, bool) or
                                             not isinstance(self.layer_decay, (int, float)) or
                                             not 0 < self.layer_decay <= 1):
            raise TrainError(f"layer_decay must be in (0, 1], got {self.layer_decay!r}")
        if self.layer_decay is not None and self.grad_accum > 1:
            raise TrainError("layer_decay does not combine with grad_accum > 1 (the gradients are clipped "
                             "per batch before accumulation); use one")
        if self.ema is not None and (isinstance(self.ema, bool) or not isinstance(self.ema, (int, float))
                                     or not 0 < self.ema < 1):
            raise TrainError(f"ema must be a momentum in (0, 1), e.g. 0.999, got {self.ema!r}")
        if self.freeze_backbone and self.layer_decay is not None:
            raise TrainError("freeze_backbone trains the head alone; layer_decay has nothing to decay (use one)")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise TrainError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_targets is not None):
            raise TrainError("lora_alpha and lora_targets shape the adapters lora_rank asks for; give lora_rank too")
        if self.lora_rank is not None:
            from keras_vit.weights.lora import LORA_TARGETS, check_lora

            check_lora(self.lora_rank, self.lora_alpha, LORA_TARGETS if self.lora_targets is None else self.lora_targets,
                       error=TrainError)
        if self.lora_rank is not None and (self.freeze_backbone or self.layer_decay is not None):
            raise TrainError("lora_rank trains the adapters and the head alone; freeze_backbone and layer_decay "
                             "choose other weights to train (use one)")
        if self.augment not in AUGMENTS:
            raise TrainError(f"unknown augmentation {self.augment!r}; allowed: {', '.join(AUGMENTS)}")
        if self.weights is not None and self.weights.endswith((".npz", ".safetensors", ".keras")) and not os.path.isfile(self.weights):
            raise TrainError(f"weights file {self.weights!r} does not exist")
        if self.weights is not None and self.weights.endswith(".keras"):  # before a run folder is made
            _check_keras_weights(self.weights)
        if not isinstance(self.model, dict):
            raise TrainError(f"model must be a dict of ViTConfig fields, got {self.model!r}")
        allowed = model_options()
        for key in self.model:
            if key in RUN_MODEL_FIELDS:
                raise TrainError(f"model option {key!r} is set by {RUN_MODEL_FIELDS[key]}, not in model")
            if key not in allowed:
                raise TrainError(f"unknown model option {key!r}; allowed: {', '.join(allowed)}")
        self.vit_config(num_classes=2, channels=3)  # image size vs patch, head counts, unknown fields ...
        return self

    def vit_config(self, num_classes: int, channels: int) -> ViTConfig:
        """The ViTConfig this run trains (variant FROM_WEIGHTS: the checkpoint's model and options,
        a new head for the dataset's classes)."""
        try:
            if self.variant == FROM_WEIGHTS and str(self.weights).endswith(".keras"):
                return _saved_model_config(self, num_classes, channels)
            if self.variant == FROM_WEIGHTS:
                from keras_vit.vit import checkpoint_config

                return checkpoint_config(self.weights, image_size=self.image_size, num_classes=num_classes,
                                         channels=channels, include_top=True, dropout_rate=self.dropout_rate,
                                         drop_path_rate=self.drop_path_rate, **self.model)
            return parse_variant(self.variant, image_size=self.image_size, num_classes=num_classes,
                                 channels=channels, dropout_rate=self.dropout_rate,
                                 drop_path_rate=self.drop_path_rate, **self.model)
        except ValueError as exc:
            raise TrainError(str(exc)) from None

    def label(self) -> str:
        """Short variant label for run folder names, e.g. "Ti_4-d128-l4-h4-m256"."""
        text = self.variant.replace("/", "_").replace("+", "_")
        extra = {"hidden_size": "d", "num_layers": "l", "num_heads": "h", "mlp_dim": "m"}
        return text + "".join(f"-{extra[k]}{v}" for k, v in self.model.items() if k in extra)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (config.json's "train")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of to_dict; TrainError for unknown fields."""
        return from_fields(cls, d, "training options", TrainError)


def model_options() -> Tuple[str, ...]:
    """The ViTConfig fields a run's `model` may set (sizes and the family options: qk_norm, num_registers ...)."""
    return tuple(sorted(f.name for f in dataclasses.fields(ViTConfig) if f.name not in RUN_MODEL_FIELDS))


def _check_keras_weights(path: str) -> None:
    """TrainError saying why a .keras `--weights` file cannot be read at all (damaged, a folder)."""
    from keras_vit.saving import check_model_file

    try:
        check_model_file(path)
    except ValueError as exc:
        raise TrainError(f"--weights: {exc}") from None


def _saved_model_config(cfg: TrainConfig, num_classes: int, channels: int) -> ViTConfig:
    """The ViTConfig of a run whose model is a keras-vit .keras file's (`cfg.weights`): its architecture
    and options, the run's image size, dropout and `model` options, a classifier for the dataset (a
    new head drops the pre-logits, as for a checkpoint)."""
    from keras_vit.saving import saved_config
    from keras_vit.vit import per_channel

    saved = saved_config(cfg.weights)
    if saved is None:
        raise TrainError(f"weights file {cfg.weights!r} is not a readable keras-vit model")
    fields = dict(image_size=cfg.image_size, num_classes=num_classes, channels=channels, include_top=True,
                  output=None, feature_layers=None, dropout_rate=cfg.dropout_rate, drop_path_rate=cfg.drop_path_rate)
    if not (saved.include_top and saved.num_classes == num_classes):
        fields["representation_size"] = None
    if saved.pixel_mean is not None and len(saved.pixel_mean) != channels:  # the input kernel is adapted too
        fields.update(pixel_mean=per_channel(saved.pixel_mean, channels), pixel_std=per_channel(saved.pixel_std, channels))
    return saved.replace(**{**fields, **cfg.model}).validate()


def _architecture_from(overrides: Dict[str, Any]) -> bool:
    """Whether the run takes its model from `weights`: a checkpoint or a keras-vit .keras file, and no
    variant or size given (other model options keep it; num_heads too, which a timm or Hugging Face file's
    fused query/key/value kernels cannot tell, so its error asks for it)."""
    from keras_vit.weights.checkpoints import is_checkpoint

    weights = overrides.get("weights")
    sizes = any(k in overrides for k in MODEL_FIELDS if k != "num_heads") or \
        any(k in SIZE_FIELDS and k != "num_heads" for k in overrides.get("model") or {})
    if not weights or sizes:
        return False
    if str(weights).endswith(".keras"):
        from keras_vit.saving import saved_config

        return saved_config(weights) is not None
    return is_checkpoint(weights)


def _image_size(value: Any) -> Union[int, List[int]]:
    """A run's image size as config.json keeps it: the side of a square, else [height, width];
    TrainError naming the value unless it is a positive integer or two."""
    pair = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IMAGE_SIDE for v in pair):
        raise TrainError(f"image_size must be a positive integer up to {MAX_IMAGE_SIDE} or [height, width] of them, "
                         f"got {value!r}")
    return pair[0] if pair[0] == pair[1] else pair


def _checkpoint_image_size(weights: str) -> Optional[Union[int, List[int]]]:
    """The image size a checkpoint or keras-vit .keras file was trained at (None: not known; a
    checkpoint that cannot be read says why when the model is built)."""
    try:
        if str(weights).endswith(".keras"):
            from keras_vit.saving import saved_config

            size = saved_config(weights).image_size
        else:
            from keras_vit.weights.checkpoints import read_checkpoint

            size = read_checkpoint(weights).defaults.get("image_size")
    except Exception:  # noqa: BLE001 - read again, and reported, where the model is built
        return None
    try:
        return _image_size(list(size) if isinstance(size, (list, tuple)) else size)
    except TrainError:
        return None


def make_config(dataset: str = "digits", recipe: str = "scratch", **overrides) -> TrainConfig:
    """A TrainConfig from a recipe, then the dataset's defaults, then `overrides` (None = keep).

    Giving `variant` drops the dataset's default model size overrides (its `model` dict).
    Model-size keys (hidden_size, num_layers, num_heads, mlp_dim, ...) may be given directly.
    """
    if recipe not in RECIPES:
        raise TrainError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    key = dataset if dataset in DATASET_DEFAULTS else "*"
    defaults = dict(DATASET_DEFAULTS[key])
    fields = dict(RECIPES[recipe])
    if recipe == "finetune":  # the dataset's augmentation is for training from scratch
        defaults.pop("augment", None)
        defaults.pop("drop_path_rate", None)
    model = dict(defaults.pop("model", {}))
    if "variant" in overrides:
        model = {}
    elif _architecture_from(overrides):  # --weights CHECKPOINT alone: the checkpoint's model
        overrides["variant"], model = FROM_WEIGHTS, {}
        if "image_size" not in overrides:  # at the checkpoint's image size too, not the dataset's default
            size = _checkpoint_image_size(overrides["weights"])
            if size is not None:
                overrides["image_size"] = size
    fields.update(defaults)
    given = overrides.pop("model", None) or {}
    model.update(given)
    for k in MODEL_FIELDS:
        if k in overrides:
            if k in given and given[k] != overrides[k]:  # --hidden-size 32 --model-option hidden_size=64
                raise TrainError(f"{k} is given twice, as {overrides[k]!r} and as the model option {given[k]!r}; "
                                 "give it once")
            model[k] = overrides.pop(k)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainError(f"unknown training options {unknown}; allowed: {sorted(known | set(MODEL_FIELDS))}")
    fields.update(overrides)
    return TrainConfig(dataset=dataset, recipe=recipe, model=model, **fields).validate()


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, model: Optional[keras.Model] = None,
                   lr_scale: float = 1.0) -> keras.optimizers.Optimizer:
    """The recipe's optimizer: warm-up + cosine per update, clipping at global norm `clipnorm`,
    decoupled weight decay, optional gradient accumulation; its peak rate times `lr_scale`.
    With `cfg.layer_decay` and the `model`, one such optimizer per encoder block at its decayed
    rate (keras_vit.finetune.layerwise_optimizer)."""
    if cfg.layer_decay is not None and model is not None:
        from keras_vit.finetune import layerwise_optimizer

        unclipped = dataclasses.replace(cfg, clipnorm=None, layer_decay=None)
        return layerwise_optimizer(model, cfg.layer_decay,
                                   lambda s: make_optimizer(unclipped, steps_per_epoch, lr_scale=lr_scale * s),
                                   global_clipnorm=cfg.clipnorm)
    updates_per_epoch = max(1, steps_per_epoch // cfg.grad_accum)
    total = max(1, cfg.epochs * updates_per_epoch)
    schedule = warmup_cosine(cfg.learning_rate * lr_scale, total, int(round(cfg.warmup_epochs * updates_per_epoch)),
                             steps_per_update=cfg.grad_accum)
    common = dict(learning_rate=schedule, global_clipnorm=cfg.clipnorm,
                  gradient_accumulation_steps=cfg.grad_accum if cfg.grad_accum > 1 else None)
    if cfg.ema is not None:
        # Keras moves the average at every micro-step (k per update, the weights unchanged in between): momentum
        # m ** (1 / k) there is m per update
        common.update(use_ema=True, ema_momentum=float(cfg.ema) ** (1.0 / cfg.grad_accum))
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(weight_decay=cfg.weight_decay, **common)
    elif cfg.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**common)
    else:
        optimizer = keras.optimizers.SGD(momentum=cfg.momentum, weight_decay=cfg.weight_decay or None, **common)
    return evaluate_once_per_update(optimizer)


def resolve_speed(cfg: TrainConfig) -> precision.Choice:
    """(mixed precision policy or "none", jit mode, reason) that `cfg` trains with on this machine.

    Resolves "auto" from the hardware (keras_vit.precision): on a TensorFlow CPU, bf16 + fusible (scoped
    on AMX and the AMD Zen 4 / Zen 5) when its bf16 GEMMs pay for the step, fp32 + whole-step XLA otherwise
    (+ scoped on AMX); bf16/fp16 + XLA on GPUs.
    """
    backend = keras.backend.backend()
    # FLOPs barely depend on the class count, which is not known before the data is loaded.
    gflop = cfg.batch_size * cfg.vit_config(num_classes=10, channels=3).flops() / 1e9
    try:
        return precision.resolve(cfg.mixed_precision, cfg.jit_compile, gflop, backend,
                                 precision.detect_hardware(backend))
    except ValueError as exc:
        raise TrainError(str(exc)) from None
