"""Linear probe (frozen backbone) and layer-wise learning-rate decay, read back from the optimizer."""
from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import finetune
from keras_vit.config import ViTConfig

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=3, patch_size=4, image_size=8, num_classes=4)


def _group(path: str, layers: int) -> int:
    """BEiT's layer id of a variable: 0 embeddings, i + 1 block i, layers + 1 the rest."""
    top = path.split("/")[0]
    if top.startswith("encoderblock_"):
        return int(top.split("_")[1]) + 1
    return 0 if top in ("embedding", "cls", "posembed_input", "resnet") else layers + 1


@pytest.mark.parametrize("hybrid", [False, True])
def test_layer_decay_rates_per_block_from_the_optimizer(hybrid):
    """One SGD step with unit gradients moves each variable by exactly its learning rate."""
    extra = dict(patch_size=1, image_size=32, resnet_layers=(1, 1, 1)) if hybrid else {}
    model = keras_vit.ViT(config=ViTConfig(**{**TINY, **extra}))
    lr, decay, layers = 0.1, 0.5, TINY["num_layers"]
    opt = finetune.layerwise_optimizer(model, decay, lambda s: keras.optimizers.SGD(learning_rate=lr * s))
    before = [v.numpy().copy() for v in model.trainable_variables]
    opt.apply([keras.ops.ones_like(v) for v in model.trainable_variables], model.trainable_variables)
    seen = set()
    for v, b in zip(model.trainable_variables, before):
        step = float(np.mean(b - v.numpy()))
        expected = lr * decay ** (layers + 1 - _group(v.path, layers))
        assert step == pytest.approx(expected, rel=1e-5), v.path
        seen.add(_group(v.path, layers))
    assert seen == set(range(layers + 2))  # embeddings, every block and the head were all checked
    rates = sorted(float(o.learning_rate) for o in opt.optimizers)
    assert rates == pytest.approx(sorted(lr * decay ** k for k in range(layers + 2)))


def test_freeze_backbone_leaves_only_the_head():
    model = finetune.freeze_backbone(keras_vit.ViT(config=ViTConfig(**TINY)))
    assert [v.path for v in model.trainable_variables] == ["head/kernel", "head/bias"]
    with pytest.raises(ValueError, match="no head"):
        finetune.freeze_backbone(keras_vit.ViT(config=ViTConfig(**{**TINY, "include_top": False})))
    with pytest.raises(ValueError, match=r"layer decay must be in \(0, 1\]"):
        finetune.layer_decay_scales(3, 1.5)
