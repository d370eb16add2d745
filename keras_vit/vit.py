"""ViT(...): the public builder on top of the model (config + graph + checkpoint weights)."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import keras

from keras_vit.config import ViTConfig, parse_variant
from keras_vit.model import VisionTransformer, build_model, get_config
from keras_vit.resize import check_method
from keras_vit.weights import PUBLISHED, PathLike, assign_weights, canonicalize, checkpoint_path, model_arrays, read_npz

__all__ = ["ViT", "VisionTransformer", "build_config", "build_model", "build_with_weights", "get_config",
           "resize_model"]


def build_config(variant: Optional[str] = "B/16", config: Optional[ViTConfig] = None, **options) -> ViTConfig:
    """One ViTConfig from a variant string or a config, plus any field overrides."""
    if config is not None:
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a keras_vit.ViTConfig, got {type(config).__name__}")
        return config.replace(**options) if options else config
    return parse_variant(variant, **options)


def ViT(variant: Optional[str] = "B/16", image_size: Union[int, Tuple[int, int]] = 224,
        num_classes: int = 1000, include_top: bool = True, include_preprocessing: bool = True,
        classifier: str = "token", representation_size: Union[None, int, str] = None,
        pos_embedding: str = "learned", dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0, channels: int = 3, name: Optional[str] = None,
        config: Optional[ViTConfig] = None, weights: Optional[str] = None, **overrides) -> keras.Model:
    """A Vision Transformer as a plain keras.Model: float images in [0, 255] (B, H, W, C) -> logits.

    `variant` is the paper's name ("B/16", "Ti/4", "R50+B/16"); `overrides` (hidden_size,
    mlp_dim, num_heads, num_layers, patch_size, gelu_approximate, ...) give custom sizes;
    `config=ViTConfig(...)` replaces the variant. `include_top=False` returns the (B, D)
    pre-logits features. `weights` is an official .npz checkpoint (path or published name);
    with it, `representation_size="checkpoint"` takes the pre-logits size from the checkpoint.
    """
    rep_from_checkpoint = isinstance(representation_size, str) and representation_size == "checkpoint"
    if rep_from_checkpoint:
        if weights is None:
            raise ValueError("representation_size='checkpoint' needs weights= (an .npz path or published name)")
        representation_size = None
    options = dict(image_size=image_size, num_classes=num_classes, include_top=include_top,
                   include_preprocessing=include_preprocessing, classifier=classifier,
                   representation_size=representation_size, pos_embedding=pos_embedding,
                   dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
                   drop_path_rate=drop_path_rate, channels=channels, **overrides)
    if config is not None:
        cfg = build_config(config=config, **overrides)
    else:
        cfg = build_config(variant, **options)
    if weights is not None:
        return build_with_weights(cfg, weights, name=name,
                                  representation_size="checkpoint" if rep_from_checkpoint else "config")
    return build_model(cfg, name=name)


def build_with_weights(cfg: ViTConfig, weights: PathLike, name: Optional[str] = None, *,
                       representation_size: Union[None, int, str] = "config", method: str = "linear",
                       prefix: Optional[str] = None) -> keras.Model:
    """Build the model for `cfg` and load `weights` (path or published name) into it.

    `representation_size="checkpoint"` takes the pre-logits size from the checkpoint; the
    position embeddings are resampled when `cfg.image_size` differs from the checkpoint's.
    """
    entry = PUBLISHED.get(os.fspath(weights)) if not os.path.isfile(os.fspath(weights)) else None
    if entry is not None and cfg.variant is not None and cfg.variant != entry.variant:
        raise ValueError(f"checkpoint {os.fspath(weights)!r} is a {entry.variant} model; "
                         f"build it with variant={entry.variant!r}, not {cfg.variant!r}")
    local = checkpoint_path(weights)
    arrays, big_vision_posemb = canonicalize(read_npz(local), prefix=prefix)
    if representation_size == "checkpoint":
        kernel = arrays.get("pre_logits/kernel")
        cfg = cfg.replace(representation_size=None if kernel is None else int(kernel.shape[-1]))
    elif representation_size != "config":
        cfg = cfg.replace(representation_size=representation_size)
    model = build_model(cfg, name=name)
    assign_weights(model, arrays, method=method, big_vision_posemb=big_vision_posemb,
                   source=f"checkpoint {os.fspath(weights)!r}")
    return model


def resize_model(model: keras.Model, image_size: Union[int, Tuple[int, int]],
                 method: str = "linear") -> keras.Model:
    """A copy of a keras-vit model for another image size: same weights, position embeddings
    resampled to the new patch grid (works for models built here or loaded from .keras)."""
    check_method(method)
    cfg = get_config(model)
    new_model = build_model(cfg.replace(image_size=image_size), name=model.name)
    assign_weights(new_model, model_arrays(model), method=method, source_grid=cfg.grid_size,
                   source=f"model {model.name!r}")
    return new_model
