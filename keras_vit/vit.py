"""ViT(...): builds the paper's model (plain or hybrid) as a functional keras.Model."""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple, Union

import keras
from keras import layers

from keras_vit.config import ViTConfig, parse_variant
from keras_vit.layers import ClassToken, PatchEmbedding, PositionEmbedding, TokenPooling, TransformerBlock


def build_config(variant: Optional[str] = "B/16", config: Optional[ViTConfig] = None, **options) -> ViTConfig:
    """One ViTConfig from a variant string or a config, plus any field overrides."""
    if config is not None:
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a keras_vit.ViTConfig, got {type(config).__name__}")
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


def ViT(variant: Optional[str] = _Default("B/16"), image_size: Union[int, Tuple[int, int]] = _Default(224),
        num_classes: int = _Default(1000), include_top: bool = True, include_preprocessing: bool = True,
        classifier: str = _Default("token"), representation_size: Union[None, int, str] = _Default(None),
        pos_embedding: str = "learned", dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0, channels: int = 3, name: Optional[str] = None,
        config: Optional[ViTConfig] = None, weights: Optional[str] = None, **overrides) -> keras.Model:
    """A Vision Transformer as a plain keras.Model: float images in [0, 255] (B, H, W, C) -> logits.

    `variant` is the paper's name ("B/16", "Ti/4", "R50+B/16"); `overrides` (hidden_size,
    mlp_dim, num_heads, num_layers, patch_size, gelu_approximate, ...) give custom sizes;
    `config=ViTConfig(...)` replaces the variant. `include_top=False` returns the (B, D)
    pre-logits features. `weights` is a checkpoint: an .npz or timm/Hugging Face .safetensors
    path, a published name ("B/16-augreg-i21k-ft-in1k") or "hf://ORG/NAME"; the arguments
    left out (variant, image_size, num_classes, classifier, representation_size) then follow
    the checkpoint, and `channels` other than its own adapt the input kernel.
    `representation_size="checkpoint"` takes the pre-logits size from the checkpoint.
    """
    rep_from_checkpoint = isinstance(representation_size, str) and representation_size == "checkpoint"
    if rep_from_checkpoint:
        if weights is None:
            raise ValueError("representation_size='checkpoint' needs weights= (a checkpoint path or published name)")
        representation_size = _Default(None)
    options = dict(image_size=image_size, num_classes=num_classes, include_top=include_top,
                   include_preprocessing=include_preprocessing, classifier=classifier,
                   representation_size=representation_size, pos_embedding=pos_embedding,
                   dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
                   drop_path_rate=drop_path_rate, channels=channels, **overrides)
    ckpt = None
    if weights is not None:
        from keras_vit.weights import check_variant, read_checkpoint

        check_variant(weights, config.variant if config is not None else _given(variant))
        ckpt = read_checkpoint(weights)
    if config is not None:
        cfg = build_config(config=config, **overrides)
    else:
        given = {k: v for k, v in options.items() if not isinstance(v, _Default)}
        fields = {k: v.value for k, v in options.items() if isinstance(v, _Default)}
        variant_given = _given(variant)
        if ckpt is not None:
            from keras_vit.weights import ARCHITECTURE_FIELDS

            found = {k: v for k, v in ckpt.defaults.items() if k != "class_names" and not (k == "variant" and v is None)}
            if variant_given is not None:
                found = {k: v for k, v in found.items() if k not in ARCHITECTURE_FIELDS}
            elif "variant" in found:  # the paper's sizes by name; shapes only fill what it leaves
                found = {k: v for k, v in found.items() if k not in ARCHITECTURE_FIELDS or k == "variant"}
            fields.update(found)
            if (variant_given is None and "variant" not in found and "num_heads" not in found
                    and "num_heads" not in given):
                raise ValueError(f"checkpoint {ckpt.source!r} does not say its number of attention heads "
                                 "(the PyTorch layout fuses them); pass num_heads= or variant=")
        fields.update(given)
        name_ = variant_given if variant_given is not None else fields.pop("variant", None)
        fields.pop("variant", None)
        if name_ is None and ckpt is None:
            name_ = variant.value
        cfg = build_config(name_, **fields) if name_ is not None else build_config(config=ViTConfig(**fields))
    if ckpt is not None:
        from keras_vit.weights import build_with_weights

        return build_with_weights(cfg, ckpt, name=name,
                                  representation_size="checkpoint" if rep_from_checkpoint else "config")
    return build_model(cfg, name=name)


def _model_name(cfg: ViTConfig) -> str:
    """A name TensorFlow accepts in graphs and exports: letters, digits and underscores only."""
    base = cfg.variant or f"D{cfg.hidden_size}_L{cfg.num_layers}_P{cfg.patch_size[0]}"
    return "vit_" + re.sub(r"[^0-9a-zA-Z_]+", "_", base).strip("_").lower()


@keras.saving.register_keras_serializable(package="keras_vit")
class VisionTransformer(keras.Model):
    """The functional graph of Eq. 1-4 for one ViTConfig; a plain keras.Model whose
    get_config() is the ViTConfig, so save/load rebuilds the same graph by name."""

    def __init__(self, config: Union[ViTConfig, dict], name: Optional[str] = None, **kwargs):
        cfg = config if isinstance(config, ViTConfig) else ViTConfig.from_dict(dict(config))
        cfg.validate()
        inputs, outputs = _build_graph(cfg)
        super().__init__(inputs, outputs, name=name or _model_name(cfg), **kwargs)
        self.vit_config = cfg

    def get_config(self) -> dict:
        return {"config": self.vit_config.to_dict(), "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


def _build_graph(cfg: ViTConfig):
    h, w = cfg.image_size
    inputs = keras.Input((h, w, cfg.channels), name="images")
    x = inputs
    if cfg.include_preprocessing:
        # [0, 255] -> [-1, 1], the official checkpoints' input range.
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(x)
    if cfg.resnet_layers is not None:
        from keras_vit.resnet import ResNetStem

        x = ResNetStem(cfg.resnet_layers, width=cfg.resnet_width, name="resnet")(x)
    x = PatchEmbedding(cfg.hidden_size, cfg.patch_size, name="embedding")(x)
    prefix = 0
    if cfg.classifier == "token":
        x = ClassToken(name="cls")(x)
        prefix = 1
    pos_kind = "none" if cfg.pos_embedding == "relative" else cfg.pos_embedding
    x = PositionEmbedding(pos_kind, cfg.grid_size, num_prefix_tokens=prefix, name="posembed_input")(x)
    x = layers.Dropout(cfg.dropout_rate, name="dropout")(x)
    relative_grid = cfg.grid_size if cfg.pos_embedding == "relative" else None
    for i in range(cfg.num_layers):
        # Stochastic depth grows linearly with depth (timm, big_vision).
        dpr = cfg.drop_path_rate * i / max(cfg.num_layers - 1, 1)
        x = TransformerBlock(cfg.num_heads, cfg.mlp_dim, cfg.dropout_rate, cfg.attention_dropout_rate,
                             dpr, cfg.gelu_approximate, cfg.layer_norm_epsilon,
                             relative_grid=relative_grid, num_prefix_tokens=prefix,
                             name=f"encoderblock_{i}")(x)
    x = layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="encoder_norm", dtype="float32")(x)
    x = TokenPooling(cfg.classifier, name="pool")(x)
    if cfg.representation_size:
        x = layers.Dense(cfg.representation_size, activation="tanh", name="pre_logits", dtype="float32")(x)
    if cfg.include_top:
        x = layers.Dense(cfg.num_classes, kernel_initializer="zeros", name="head", dtype="float32")(x)
    return inputs, x


def build_model(cfg: ViTConfig, name: Optional[str] = None) -> keras.Model:
    """A VisionTransformer for a config (validated first)."""
    return VisionTransformer(cfg, name=name)


def get_config(model: keras.Model) -> ViTConfig:
    """The ViTConfig of a keras-vit model; ValueError for any other model."""
    cfg = getattr(model, "vit_config", None)
    if not isinstance(cfg, ViTConfig):
        raise ValueError(f"model {getattr(model, 'name', model)!r} is not a keras-vit model "
                         "(expected one built by keras_vit.ViT or loaded from its .keras file)")
    return cfg
