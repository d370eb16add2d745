"""Fine-tuning a pre-trained ViT: linear probing (frozen backbone) and layer-wise learning-rate decay.

Layer-wise decay (BEiT, MAE fine-tuning): with L encoder blocks and rate eta for the head,
block i (0-based) trains at eta * R^(L - i) and the embeddings (patch embedding, class
token, position embeddings, the hybrid's ResNet) at eta * R^(L + 1); the encoder norm,
pre-logits and head at eta. Built from Keras' own MultiOptimizer / OptimizerMap: one
optimizer per group, each with the recipe's schedule scaled, so weight decay, warm-up and
clipping behave per group as in a single optimizer.
"""
from __future__ import annotations

from typing import Callable, Dict

import keras

# Layers of a keras-vit model that belong to the embedding stage (Eq. 1).
EMBEDDING_LAYERS = ("resnet", "embedding", "cls", "posembed_input")
# Layers that stay trainable under freeze_backbone: the linear classifier.
HEAD_LAYERS = ("head",)


def layer_decay_scales(num_layers: int, decay: float) -> Dict[str, float]:
    """Learning-rate factor per variable-path pattern (regex, full match); everything else 1.0."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay!r}")
    scales = {f"encoderblock_{i}/.*": decay ** (num_layers - i) for i in range(num_layers)}
    scales["(" + "|".join(EMBEDDING_LAYERS) + ")/.*"] = decay ** (num_layers + 1)
    return scales


def layerwise_optimizer(model: keras.Model, decay: float,
                        make: Callable[[float], keras.optimizers.Optimizer]) -> keras.optimizers.Optimizer:
    """A keras.optimizers.MultiOptimizer that trains each encoder block of `model` at its decayed
    rate; `make(scale)` returns the recipe's optimizer with its learning rate multiplied by scale."""
    from keras_vit.model import get_config

    if not hasattr(keras.optimizers, "MultiOptimizer"):
        raise ValueError(f"layer decay needs keras.optimizers.MultiOptimizer (Keras >= 3.15); "
                         f"this is Keras {keras.__version__}")
    cfg = get_config(model)
    groups = {pattern: make(scale) for pattern, scale in layer_decay_scales(cfg.num_layers, decay).items()}
    return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(make(1.0), groups))


def freeze_backbone(model: keras.Model) -> keras.Model:
    """Linear probe: every layer but the head stops training (compile afterwards). In place."""
    names = {layer.name for layer in model.layers}
    if not names & set(HEAD_LAYERS):
        raise ValueError(f"model {model.name!r} has no head to train (built with include_top=False)")
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS
    return model


__all__ = ["EMBEDDING_LAYERS", "HEAD_LAYERS", "layer_decay_scales", "layerwise_optimizer", "freeze_backbone"]
