"""ViT(...): the public builder on top of the model (config + graph + checkpoint weights)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import keras

from keras_vit.config import ViTConfig, from_fields, parse_variant
from keras_vit.model import VisionTransformer, build_model, get_config
from keras_vit.weights import (
    ARCHITECTURE_FIELDS,
    PUBLISHED,
    Checkpoint,
    PathLike,
    assign_weights,
    check_variant,
    model_arrays,
    read_checkpoint,
    warn_untrained_head,
)
from keras_vit.weights.resize import check_method

__all__ = ["ViT", "VisionTransformer", "build_config", "build_model", "build_with_weights", "checkpoint_config",
           "get_config",
           "dynamic_model", "resize_model"]


def build_config(variant: Optional[str] = "B/16", config: Optional[ViTConfig] = None, **options) -> ViTConfig:
    """One ViTConfig from a variant string or a config, plus any field overrides."""
    if config is not None:
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a keras_vit.ViTConfig, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(ViTConfig)}
        bad = sorted(set(options) - known)
        if bad:
            raise ValueError(f"unknown option(s) {bad} next to config=; allowed: any ViTConfig field "
                             f"({', '.join(sorted(known))})")
        return config.replace(**options) if options else config
    return parse_variant(variant, **options)


class _Default:
    """An argument left out: the checkpoint's value when `weights=` says, else `value`."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _given(value):
    return None if isinstance(value, _Default) else value


def ViT(variant: Optional[str] = _Default("B/16"), image_size: Union[None, int, Tuple[int, int]] = _Default(224),
        num_classes: int = _Default(1000), include_top: bool = _Default(True),
        include_preprocessing: bool = _Default(True), classifier: str = _Default("token"),
        representation_size: Union[None, int, str] = _Default(None), pos_embedding: str = _Default("learned"),
        dropout_rate: float = _Default(0.0), attention_dropout_rate: float = _Default(0.0),
        drop_path_rate: float = _Default(0.0), channels: int = _Default(3), name: Optional[str] = None,
        config: Optional[ViTConfig] = None, weights: Optional[str] = None, output: Optional[str] = _Default(None),
        feature_layers: Optional[Sequence[int]] = _Default(None), **overrides) -> keras.Model:
    """A Vision Transformer as a plain keras.Model: float images in [0, 255] (B, H, W, C) -> logits.

    `variant` is the paper's name ("B/16", "Ti/4", "R50+B/16"); `overrides` (hidden_size,
    mlp_dim, num_heads, num_layers, patch_size, gelu_approximate, ...) give custom sizes;
    `config=ViTConfig(...)` replaces the variant; the arguments given next to it replace the
    config's fields (those left out keep the config's values). `include_top=False` returns the (B, D)
    pre-logits features; with `output="tokens"` the (B, S, D) tokens after the encoder norm, with
    `feature_layers=(3, 7, 11)` those blocks' outputs as (B, H/P, W/P, D) patch maps in a dict
    {"block_3": ..., "block_7": ..., "block_11": ...} (class token dropped; negative indices
    count from the last block), as timm's forward_intermediates. `weights` is a checkpoint: an .npz or timm/Hugging Face .safetensors
    path, a model folder (config.json + model.safetensors), a published name ("B/16-augreg-i21k-ft-in1k",
    "vit_small_patch14_dinov2.lvd142m") or "hf://ORG/NAME"; the arguments
    left out (variant, image_size, num_classes, classifier, representation_size) then follow
    the checkpoint, and `channels` other than its own adapt the input kernel.
    `representation_size="checkpoint"` takes the pre-logits size from the checkpoint.
    `image_size=None` or `dynamic_size=True` builds a model for any H x W divisible by the patch
    size: position embeddings learned at image_size (default 224, or the checkpoint's) are
    resampled in the graph (`pos_interpolation`, default "linear" as in `resize_model`).
    """
    any_size = image_size is None
    if any_size:  # any image size; the position embeddings keep the default grid
        if overrides.get("dynamic_size", True) is not True:
            raise ValueError(f"image_size=None builds a model for any image size, which dynamic_size="
                             f"{overrides['dynamic_size']!r} contradicts; give an image_size for a fixed-size model")
        image_size = _Default(224)
        overrides["dynamic_size"] = True
    rep_from_checkpoint = isinstance(representation_size, str) and representation_size == "checkpoint"
    if rep_from_checkpoint:
        if weights is None:
            raise ValueError("representation_size='checkpoint' needs weights= (a checkpoint path or published name)")
        representation_size = _Default(None)
    options = dict(image_size=image_size, num_classes=num_classes, include_top=include_top,
                   include_preprocessing=include_preprocessing, classifier=classifier,
                   representation_size=representation_size, pos_embedding=pos_embedding,
                   dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
                   drop_path_rate=drop_path_rate, channels=channels, output=output,
                   feature_layers=feature_layers,  # ViTConfig checks it and makes it a tuple
                   **overrides)
    ckpt = None
    if config is not None and _given(variant) is not None:
        raise ValueError(f"give variant= or config=, not both (got variant={variant!r} and a config "
                         f"of variant {getattr(config, 'variant', None)!r}); set sizes with config= or its fields as arguments")
    if weights is not None:
        check_variant(weights, config.variant if config is not None else _given(variant))
        ckpt = read_checkpoint(weights)
    given = {k: v for k, v in options.items() if not isinstance(v, _Default)}
    try:
        if config is not None:
            cfg = build_config(config=config, **given)
        else:
            cfg = _config_from_arguments(variant, options, given, ckpt)
    except ValueError as exc:
        if any_size and str(exc).startswith("image_size "):  # the default table size, which the user did not give
            raise ValueError(f"image_size=None learns the position table at the default size, and {exc}; "
                             "for a model of any size give that image_size with dynamic_size=True") from None
        raise
    if ckpt is not None:
        return build_with_weights(cfg, ckpt, name=name,
                                  representation_size="checkpoint" if rep_from_checkpoint else "config")
    return build_model(cfg, name=name)


def _config_from_arguments(variant, options: dict, given: dict, ckpt: Optional[Checkpoint]) -> ViTConfig:
    """The config when no `config=` is given: the arguments given win, then what the checkpoint
    says (for the arguments left out), then the defaults."""
    fields = {k: v.value for k, v in options.items() if isinstance(v, _Default)}
    variant_given = _given(variant)
    if ckpt is not None:
        fields.update(_checkpoint_fields(ckpt, variant_given, given))
    fields.update(given)
    name_ = variant_given if variant_given is not None else fields.pop("variant", None)
    fields.pop("variant", None)
    if name_ is None and ckpt is None and isinstance(variant, _Default):  # variant=None: the sizes given, no name
        name_ = variant.value
    return build_config(name_, **fields) if name_ is not None else build_config(
        config=from_fields(ViTConfig, fields, "ViT arguments"))


def checkpoint_config(weights: Union[PathLike, Checkpoint], **given) -> ViTConfig:
    """The ViTConfig that `ViT(weights=weights, **given)` builds, without building it: the
    checkpoint's architecture and options, the fields `given` replacing them (a new num_classes
    drops its head and pre-logits)."""
    ckpt = weights if isinstance(weights, Checkpoint) else read_checkpoint(weights)
    fields = _checkpoint_fields(ckpt, None, given)
    fields.update(given)
    variant = fields.pop("variant", None)
    return build_config(variant, **fields) if variant is not None else from_fields(ViTConfig, fields, "ViT arguments")


def _checkpoint_fields(ckpt: Checkpoint, variant_given: Optional[str], given: dict) -> dict:
    """The ViTConfig fields a checkpoint fixes for the arguments left out: its architecture only
    when no variant is given (by name when it has one), its head unless num_classes differs."""
    found = {k: v for k, v in ckpt.defaults.items() if k != "class_names" and not (k == "variant" and v is None)}
    if variant_given is not None:
        found = {k: v for k, v in found.items() if k not in ARCHITECTURE_FIELDS}
    elif "variant" in found:  # the paper's sizes by name, and the sizes the checkpoint says differ from them
        named = parse_variant(found["variant"]).to_dict()  # (a variant with overrides, as save_safetensors records)
        found = {k: v for k, v in found.items() if k not in ARCHITECTURE_FIELDS or k == "variant"
                 or _as_tuple(v) != _as_tuple(named.get(k))}
    if "num_classes" in given and given["num_classes"] != found.get("num_classes"):
        # A new head replaces the whole head, pre-logits included (paper Sec. 3.2 / Appendix B).
        found.pop("representation_size", None)
        found.pop("include_top", None)  # a backbone without a head (DINOv2, SigLIP) gets the new one
    if variant_given is None and "variant" not in found and "num_heads" not in found and "num_heads" not in given:
        why = ("the PyTorch layout fuses them" if ckpt.layout != "npz" else
               "it lacks arrays of the official layout: is it a ViT checkpoint?")
        raise ValueError(f"checkpoint {ckpt.source!r} does not say its number of attention heads ({why}); "
                         "pass num_heads= or variant=")
    channels = given.get("channels")
    if channels and found.get("pixel_mean") is not None and len(found["pixel_mean"]) != channels \
            and "pixel_mean" not in given:
        for k in ("pixel_mean", "pixel_std"):  # the input kernel is adapted to the channels: so is the normalisation
            found[k] = per_channel(found[k], channels)
    return found


def per_channel(values, channels: int) -> tuple:
    """A checkpoint's per-channel normalisation for another channel count, as adapt_input_conv adapts
    its kernel: the mean over the channels for one channel, else the channels repeated."""
    values = [float(v) for v in values]
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def build_with_weights(cfg: ViTConfig, weights: Union[PathLike, Checkpoint], name: Optional[str] = None, *,
                       representation_size: Union[None, int, str] = "config", method: Optional[str] = None,
                       prefix: Optional[str] = None) -> keras.Model:
    """Build the model for `cfg` and load `weights` (a path, published name, hf://ORG/NAME or a
    Checkpoint already read) into it.

    `representation_size="checkpoint"` takes the pre-logits size from the checkpoint; the
    position embeddings are resampled when `cfg.image_size` differs from the checkpoint's, with
    `method` (default: as the checkpoint's own code does, timm's antialiased bicubic for timm
    files, else "linear"). The model carries the checkpoint's class names when its head is the
    checkpoint's.
    """
    check_variant(weights.source if isinstance(weights, Checkpoint) else weights, cfg.variant)
    ckpt = weights if isinstance(weights, Checkpoint) else read_checkpoint(weights)
    arrays, big_vision_posemb = ckpt.canonical(num_heads=cfg.num_heads, prefix=prefix)
    if representation_size == "checkpoint":
        kernel = arrays.get("pre_logits/kernel")
        cfg = cfg.replace(representation_size=None if kernel is None else int(kernel.shape[-1]))
    elif representation_size != "config":
        cfg = cfg.replace(representation_size=representation_size)
    model = build_model(cfg, name=name)
    assign_weights(model, arrays, method=method or ckpt.resample_method, big_vision_posemb=big_vision_posemb,
                   source_grid=ckpt.grid, source=f"checkpoint {ckpt.source!r}")
    warn_untrained_head(model, arrays, f"checkpoint {ckpt.source!r}")
    entry = PUBLISHED.get(ckpt.source)
    if entry is not None and (entry.interpolation != "bilinear" or entry.crop_pct != 1.0):
        # What keras_vit.train.predict (vitcli predict) uses on image files: timm's evaluation transform.
        # Saved with the model (get_config), so a .keras file of it predicts as the preset does.
        model.eval_preprocessing = dict(interpolation=entry.interpolation, crop_pct=entry.crop_pct)
    names = ckpt.defaults.get("class_names")
    head = arrays.get("head/kernel")
    if names and cfg.include_top and head is not None and head.shape[-1] == cfg.num_classes == len(names):
        model.class_names = list(names)
    return model


def _policy(model: keras.Model) -> Optional[str]:
    """The name of `model`'s dtype policy (its copies compute as it does, whatever the global policy)."""
    policy = getattr(model, "dtype_policy", None)
    return None if policy is None or policy.quantization_mode is not None else policy.name


def resize_model(model: keras.Model, image_size: Union[int, Tuple[int, int]],
                 method: Optional[str] = None) -> keras.Model:
    """A copy of a keras-vit model for another image size: same weights, position embeddings
    resampled to the new patch grid with `method` (default: the model's pos_interpolation, "linear"
    unless set or taken from its checkpoint: a timm file's is timm's antialiased bicubic). Works for
    models built here or loaded from .keras; the layers model.quantize() converted are quantized again
    with their codes and scales copied (the same logits at the same size); LoRA updates are merged into the
    kernels (a quantized layer with LoRA is quantized again from its merged kernel)."""
    cfg = get_config(model)
    method = check_method(method or cfg.pos_interpolation)
    new_model = build_model(cfg.replace(image_size=image_size), name=model.name, dtype=_policy(model))
    assign_weights(new_model, model_arrays(model), method=method, source_grid=cfg.grid_size,
                   source=f"model {model.name!r}")
    _quantize_as(new_model, model)
    _copy_quantized(new_model, model)
    new_model.class_names = getattr(model, "class_names", None)
    return new_model


def _copy_quantized(new_model: keras.Model, model: keras.Model) -> None:
    """The quantized layers' codes and scales as `model` has them (quantizing the dequantized floats again
    moved int8 scales by ~1e-6 and the logits by 0.02); none of them depends on the patch grid. A layer with
    LoRA keeps its new quantization of the merged kernel."""
    twins = {layer.path: layer for layer in new_model._flatten_layers(include_self=False)}
    for layer in model._flatten_layers(include_self=False):
        twin = twins.get(layer.path)
        if (getattr(layer, "quantization_mode", None) and not getattr(layer, "lora_enabled", False)
                and twin is not None and [tuple(w.shape) for w in twin.weights] == [tuple(w.shape) for w in layer.weights]):
            twin.set_weights(layer.get_weights())


def _quantize_as(new_model: keras.Model, model: keras.Model) -> None:
    """Quantize the layers of `new_model` that model.quantize() converted in `model`, mode for mode."""
    quantized = model.get_config().get("quantized")  # a keras-vit model: its callers took get_config(model)
    if quantized:
        new_model._requantize(quantized)


def structured_as(new_model: keras.Model, model: keras.Model) -> None:
    """Give `new_model`'s layers the variables Keras added to `model`'s: quantized as model.quantize()
    left them, then LoRA enabled (Dense.enable_lora) with the same rank and alpha."""
    _quantize_as(new_model, model)
    layers_by_path = {layer.path: layer for layer in new_model._flatten_layers(include_self=False)}
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            targets = {"targets": layer.lora_targets} if hasattr(layer, "lora_targets") else {}  # the attention's
            layers_by_path[layer.path].enable_lora(layer.lora_rank, lora_alpha=layer.lora_alpha, **targets)


def dynamic_model(model: keras.Model, method: Optional[str] = None) -> keras.Model:
    """The same model for any image size (H, W divisible by the input stride): same weights, the
    position embeddings resampled in the graph with `method` (default: the model's
    pos_interpolation, "linear" unless set; `resize_model(model, (h, w), method)` gives the same
    logits at h x w). Returns `model` itself when it already is one with that method."""
    cfg = get_config(model)
    method = check_method(method or cfg.pos_interpolation)
    if cfg.dynamic_size and cfg.pos_interpolation == method:
        return model
    new_model = build_model(cfg.replace(dynamic_size=True, pos_interpolation=method), name=model.name,
                            dtype=_policy(model))
    structured_as(new_model, model)  # the same variables: quantized codes and scales, LoRA factors
    new_model.set_weights(model.get_weights())
    new_model.class_names = getattr(model, "class_names", None)
    return new_model
