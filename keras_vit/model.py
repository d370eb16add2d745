"""VisionTransformer: the functional keras.Model of one ViTConfig (paper Eq. 1-4), and get_config."""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import keras
from keras import layers

from keras_vit import precision
from keras_vit.config import ViTConfig
from keras_vit.layers import ClassToken, PatchEmbedding, PatchGrid, PositionEmbedding, TokenPooling, TransformerBlock
from keras_vit.resnet import ResNetStem


def _model_name(cfg: ViTConfig) -> str:
    """A name TensorFlow accepts in graphs and exports: letters, digits and underscores only."""
    base = cfg.variant or f"D{cfg.hidden_size}_L{cfg.num_layers}_P{cfg.patch_size[0]}"
    return "vit_" + re.sub(r"[^0-9a-zA-Z_]+", "_", base).strip("_").lower()


@keras.saving.register_keras_serializable(package="keras_vit")
class VisionTransformer(keras.Model):
    """The functional graph of Eq. 1-4 for one ViTConfig; a plain keras.Model whose
    get_config() is the ViTConfig, so save/load rebuilds the same graph by name."""

    def __init__(self, config: Union[ViTConfig, dict], name: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, **kwargs):
        cfg = config if isinstance(config, ViTConfig) else ViTConfig.from_dict(dict(config))
        cfg.validate()
        inputs, outputs = _build_graph(cfg)
        super().__init__(inputs, outputs, name=name or _model_name(cfg), **kwargs)
        self.vit_config = cfg
        # The head's class names (e.g. ImageNet's for a published in1k checkpoint), saved with the model.
        self.class_names = list(class_names) if class_names else None

    def compile(self, *args, **kwargs) -> None:
        """keras.Model.compile; `jit_compile="auto"` (the default) picks what is fast for a ViT on
        this hardware and precision policy (keras_vit.precision.model_jit_compile)."""
        if len(args) < 8 and kwargs.get("jit_compile", "auto") == "auto":  # the 8th positional is jit_compile
            backend = keras.backend.backend()
            kwargs["jit_compile"] = precision.model_jit_compile(
                self.dtype_policy.name, backend, precision.detect_hardware(backend))
        super().compile(*args, **kwargs)

    def get_config(self) -> dict:
        """The ViTConfig as a dict (and the model's name and class names): all that rebuilds the model."""
        out = {"config": self.vit_config.to_dict(), "name": self.name, "trainable": self.trainable}
        if self.class_names:
            out["class_names"] = [str(n) for n in self.class_names]
        return out

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The model for a get_config() dict."""
        return cls(**config)


def _build_graph(cfg: ViTConfig):
    """(inputs, outputs) of the encoder and head for `cfg`."""
    h, w = cfg.image_size
    inputs = keras.Input((h, w, cfg.channels), name="images")
    x = inputs
    if cfg.include_preprocessing:
        # [0, 255] -> [-1, 1], the official checkpoints' input range.
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(x)
    if cfg.resnet_layers is not None:
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
    wanted = set(cfg.feature_layers or ())
    maps = {}
    # A features model stops after the last block it returns.
    depth = max(wanted) + 1 if wanted else cfg.num_layers
    for i in range(depth):
        # Stochastic depth grows linearly with depth (timm, big_vision).
        dpr = cfg.drop_path_rate * i / max(cfg.num_layers - 1, 1)
        x = TransformerBlock(cfg.num_heads, cfg.mlp_dim, cfg.dropout_rate, cfg.attention_dropout_rate,
                             dpr, cfg.gelu_approximate, cfg.layer_norm_epsilon,
                             relative_grid=relative_grid, num_prefix_tokens=prefix,
                             name=f"encoderblock_{i}")(x)
        if i in wanted:
            maps[i] = PatchGrid(cfg.grid_size, prefix, name=f"features_{i}")(x)
    if wanted:  # a dict: Keras would unwrap a list of one
        return inputs, {f"block_{i}": maps[i] for i in cfg.feature_layers}
    x = layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="encoder_norm", dtype="float32")(x)
    if cfg.output == "tokens":
        return inputs, x
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
