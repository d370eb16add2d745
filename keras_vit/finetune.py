"""Fine-tuning a pre-trained ViT: linear probing (frozen backbone), LoRA adapters and layer-wise learning-rate decay.

Layer-wise decay (BEiT, MAE fine-tuning): with L encoder blocks and rate eta for the head,
block i (0-based) trains at eta * R^(L - i) and the embeddings (patch embedding, class
token, position embeddings, the hybrid's ResNet) at eta * R^(L + 1); the encoder norm,
pre-logits and head at eta. Built from Keras' own MultiOptimizer / OptimizerMap: one
optimizer per group, each with the recipe's schedule scaled, so weight decay, warm-up and
the gradients are clipped together by one global norm as in a single optimizer.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import keras
from keras import ops

# Layers of a keras-vit model that belong to the embedding stage (Eq. 1).
EMBEDDING_LAYERS = ("resnet", "embedding", "cls", "dist", "posembed_input", "reg", "pre_norm")
# Layers that stay trainable under freeze_backbone: the linear classifier.
HEAD_LAYERS = ("head", "head_dist")


def layer_decay_scales(num_layers: int, decay: float) -> Dict[str, float]:
    """Learning-rate factor per variable-path pattern (regex, full match); everything else 1.0."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay!r}")
    scales = {f"encoderblock_{i}/.*": decay ** (num_layers - i) for i in range(num_layers)}
    scales["(" + "|".join(EMBEDDING_LAYERS) + ")/.*"] = decay ** (num_layers + 1)
    return scales


@keras.saving.register_keras_serializable(package="keras_vit")
class LayerwiseOptimizer(keras.optimizers.MultiOptimizer if hasattr(keras.optimizers, "MultiOptimizer") else object):
    """keras.optimizers.MultiOptimizer that first clips all gradients together by one global norm,
    as a single optimizer's `global_clipnorm` would (each group clipping its own share would
    let the total norm grow with the number of groups)."""

    def __init__(self, optimizer_map, global_clipnorm: Optional[float] = None, **kwargs):
        super().__init__(optimizer_map, **kwargs)
        self.layer_clipnorm = global_clipnorm

    def apply(self, grads, trainable_variables=None):
        if self.layer_clipnorm and len(grads):
            norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads if g is not None))
            scale = ops.minimum(1.0, self.layer_clipnorm / ops.maximum(norm, 1e-12))
            grads = [None if g is None else g * ops.cast(scale, g.dtype) for g in grads]
        return super().apply(grads, trainable_variables)

    def get_config(self) -> dict:
        return {**super().get_config(), "global_clipnorm": self.layer_clipnorm}


def layerwise_optimizer(model: keras.Model, decay: float, make: Callable[[float], keras.optimizers.Optimizer],
                        global_clipnorm: Optional[float] = None) -> keras.optimizers.Optimizer:
    """An optimizer that trains each encoder block of `model` at its decayed rate: `make(scale)`
    returns the recipe's optimizer (without clipping) at `scale` times its learning rate; the
    gradients are clipped together at `global_clipnorm` first."""
    from keras_vit.model import get_config

    if not hasattr(keras.optimizers, "MultiOptimizer"):
        raise ValueError(f"layer decay needs keras.optimizers.MultiOptimizer (Keras >= 3.15); "
                         f"this is Keras {keras.__version__}")
    cfg = get_config(model)
    groups = {pattern: make(scale) for pattern, scale in layer_decay_scales(cfg.num_layers, decay).items()}
    return LayerwiseOptimizer(keras.optimizers.OptimizerMap(make(1.0), groups), global_clipnorm=global_clipnorm)


def lora_finetune(model: keras.Model, rank: int, alpha: Optional[float] = None,
                  targets: Optional[Sequence[str]] = None) -> keras.Model:
    """LoRA fine-tuning: rank-`rank` adapters on every block's `targets` (`keras_vit.enable_lora`:
    attention query and value unless given; key, mlp too); they and the head train, every other
    weight is frozen (compile afterwards). In place."""
    from keras_vit.weights.lora import LORA_TARGETS, enable_lora, lora_factors

    heads = [layer for layer in model.layers if layer.name in HEAD_LAYERS]
    if not heads:
        raise ValueError(f"model {model.name!r} has no head to train (built with include_top=False)")
    enable_lora(model, rank, alpha, LORA_TARGETS if targets is None else targets)
    keep = {id(v) for v in lora_factors(model)} | {id(v) for layer in heads for v in layer.weights}
    for v in model.weights:  # per variable: a frozen layer would freeze the adapters inside it too
        v.trainable = id(v) in keep
    return model


def freeze_backbone(model: keras.Model) -> keras.Model:
    """Linear probe: every layer but the head stops training (compile afterwards). In place."""
    names = {layer.name for layer in model.layers}
    if not names & set(HEAD_LAYERS):
        raise ValueError(f"model {model.name!r} has no head to train (built with include_top=False)")
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS
    return model


__all__ = ["EMBEDDING_LAYERS", "HEAD_LAYERS", "LayerwiseOptimizer", "layer_decay_scales", "layerwise_optimizer",
           "freeze_backbone", "lora_finetune"]
