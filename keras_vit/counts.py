"""Analytic parameter and FLOP counts from a ViTConfig (no weights allocated).

Used by `vitcli models`, the tests for the large variants, and the benchmarks' MFU figures.
"""
from __future__ import annotations

from typing import Iterator, Tuple

ROOT_WIDTH = 64


def resnet_units(cfg) -> Iterator[Tuple[int, int, int, int]]:
    """Yield (in_channels, width, out_channels, stride) per bottleneck unit of the hybrid ResNet."""
    cin = ROOT_WIDTH * cfg.resnet_width
    for stage, n_units in enumerate(cfg.resnet_layers or ()):
        width = ROOT_WIDTH * cfg.resnet_width * 2 ** stage
        for unit in range(n_units):
            stride = 2 if (stage > 0 and unit == 0) else 1
            yield cin, width, 4 * width, stride
            cin = 4 * width


def resnet_out_channels(cfg) -> int:
    return ROOT_WIDTH * cfg.resnet_width * 2 ** (len(cfg.resnet_layers) - 1) * 4


def _resnet_params(cfg) -> int:
    if cfg.resnet_layers is None:
        return 0
    root = ROOT_WIDTH * cfg.resnet_width
    total = 7 * 7 * cfg.channels * root + 2 * root  # conv_root (no bias) + gn_root
    for cin, w, cout, _ in resnet_units(cfg):
        total += cin * w + 9 * w * w + w * cout + 2 * (w + w + cout)
        if cin != cout:  # projection shortcut (first unit of each stage)
            total += cin * cout + 2 * cout
    return total


def _num_relative_offsets(cfg) -> int:
    gh, gw = cfg.grid_size
    return (2 * gh - 1) * (2 * gw - 1) + (1 if cfg.num_prefix_tokens else 0)


def _mlp_params(cfg) -> int:
    """The block MLP's parameters: Dense(D -> mlp_dim) and back, or swiglu's Dense(D -> 2 mlp_dim)."""
    d, m = cfg.hidden_size, cfg.mlp_dim
    hidden = 2 * m if cfg.mlp == "swiglu" else m
    return d * hidden + hidden + m * d + d


def _depth(cfg) -> int:
    """Encoder blocks built: a features model stops after the last block it returns."""
    return max(cfg.feature_layers) + 1 if cfg.feature_layers else cfg.num_layers


def count_params(cfg) -> int:
    """Parameters of `ViT(config=cfg)`, exactly as Keras counts them."""
    d, gh, gw = cfg.hidden_size, *cfg.grid_size
    ph, pw = cfg.patch_size
    cin = resnet_out_channels(cfg) if cfg.resnet_layers else cfg.channels
    total = _resnet_params(cfg)
    total += ph * pw * cin * d + d  # patch embedding
    total += cfg.num_prefix_tokens * d  # class, distillation and register tokens
    if cfg.pos_embedding == "learned":
        total += (cfg.num_patches + cfg.num_pos_prefix_tokens) * d
    elif cfg.pos_embedding == "learned_2d":
        total += gh * (d // 2) + gw * (d - d // 2) + cfg.num_pos_prefix_tokens * d
    mlp = _mlp_params(cfg)
    block = 4 * d + 4 * (d * d + d) + mlp
    block += 2 * d if cfg.layer_scale_init is not None else 0  # LayerScale gains after attention and MLP
    block += 4 * cfg.head_dim if cfg.qk_norm else 0  # query and key LayerNorms over head_dim
    block -= 0 if cfg.qkv_bias else 3 * d  # no query/key/value biases
    if cfg.pos_embedding == "relative":
        block += _num_relative_offsets(cfg) * d
    total += 2 * d if cfg.pre_norm else 0
    total += _depth(cfg) * block
    if cfg.feature_layers:  # the blocks' patch maps: no norm, pooling or head after them
        return total
    if cfg.output == "tokens":  # the encoder norm's tokens (a model normalising after pooling has none)
        return total + (0 if cfg.fc_norm else 2 * d)
    total += 2 * d  # encoder_norm (or fc_norm)
    if cfg.classifier == "map":  # probe, attention, LayerNorm, MLP
        total += d + 4 * (d * d + d) + 2 * d + 2 * d * cfg.mlp_dim + cfg.mlp_dim + d  # (a plain MLP)
    feat = d
    if cfg.representation_size:
        total += d * cfg.representation_size + cfg.representation_size
        feat = cfg.representation_size
    if cfg.include_top:
        total += (1 + cfg.distilled) * (feat * cfg.num_classes + cfg.num_classes)
    return total


def count_flops(cfg) -> int:
    """Forward FLOPs per image (multiply-add = 2): convs, dense layers and attention matmuls."""
    d, s, m = cfg.hidden_size, cfg.seq_len, cfg.mlp_dim
    h, w = cfg.image_size
    flops = 0
    if cfg.resnet_layers:
        h, w = h // 2, w // 2
        flops += 2 * h * w * 49 * cfg.channels * ROOT_WIDTH * cfg.resnet_width
        h, w = h // 2, w // 2
        for cin, wd, cout, stride in resnet_units(cfg):
            flops += 2 * h * w * cin * wd
            h, w = h // stride, w // stride
            flops += 2 * h * w * (9 * wd * wd + wd * cout)
            if cin != cout:
                flops += 2 * h * w * cin * cout
        cin = resnet_out_channels(cfg)
    else:
        cin = cfg.channels
    ph, pw = cfg.patch_size
    flops += 2 * cfg.num_patches * ph * pw * cin * d
    mlp = 2 * s * d * m * (3 if cfg.mlp == "swiglu" else 2)  # swiglu: Dense to 2 mlp_dim, then mlp_dim -> D
    per_layer = 2 * s * d * 3 * d + 2 * 2 * s * s * d + 2 * s * d * d + mlp
    if cfg.pos_embedding == "relative":
        per_layer += 2 * s * _num_relative_offsets(cfg) * d
    flops += _depth(cfg) * per_layer
    if cfg.feature_layers or cfg.output == "tokens":  # no pooling or head
        return flops
    if cfg.classifier == "map":  # the probe's query, keys and values of every token, one query's attention, MLP
        flops += 2 * d * d + 2 * s * d * 2 * d + 2 * 2 * s * d + 2 * d * d + 2 * 2 * d * m
    feat = cfg.representation_size or d
    pooled = 1 + cfg.distilled  # a distilled model's two tokens go through pre-logits and the heads
    if cfg.representation_size:
        flops += pooled * 2 * d * feat
    if cfg.include_top:
        flops += pooled * 2 * feat * cfg.num_classes
    return flops
