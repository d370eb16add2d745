"""An independent pure-numpy ViT forward pass (plain and ResNet hybrid) that reads an official
.npz checkpoint directly, written from the official flax code's definitions (vit_jax
models_vit.py / models_resnet.py, big_vision vit.py). It imports nothing from keras_vit, so
the acceptance checks compare two implementations of the same checkpoint.

Computes in float64. Supported layouts: vision_transformer names, big_vision names
(MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0, top-level pos_embedding without
the class slot), the scanned `Transformer/encoderblock` stack, `params/` and `opt/target/`.
"""
from __future__ import annotations

import math
import re

import numpy as np


class Checkpoint:
    """Name look-up over an .npz in any of the official layouts."""

    def __init__(self, path):
        with np.load(path, allow_pickle=False) as f:
            # Weights only: a string entry (keras-vit's `__keras_vit__` config) is not a parameter.
            raw = {k: np.asarray(f[k], np.float64) for k in f.files if f[k].dtype.kind != "U"}
        for prefix in ("opt/target/", "params/"):
            if any(k.startswith(prefix) for k in raw):
                raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
                break
        self.w = raw
        self.scanned = any(k.startswith("Transformer/encoderblock/") for k in raw)
        self.big_vision = any("MlpBlock_0/" in k and k.startswith("Transformer/") for k in raw)

    def __getitem__(self, name):
        return self.w[name]

    def __contains__(self, name):
        return name in self.w

    def block(self, i, name):
        """Parameter `name` of encoder block i, given in vision_transformer terms."""
        if self.big_vision:
            name = (name.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
                    .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"))
        if self.scanned:
            return self.w[f"Transformer/encoderblock/{name}"][i]
        return self.w[f"Transformer/encoderblock_{i}/{name}"]

    def block_or_zero(self, i, name):
        """As `block`, 0 for a parameter the checkpoint does not have (qkv_bias=False: no q/k/v biases)."""
        try:
            return self.block(i, name)
        except KeyError:
            return 0.0

    def num_layers(self):
        if self.scanned:
            return self.w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        return len({m.group(1) for k in self.w for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})


def same_pads(size, kernel, stride):
    """flax/XLA "SAME": output ceil(size/stride); the extra padding pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(x, kernel, stride=1, padding="SAME"):
    """x (B, H, W, Cin), kernel (kh, kw, Cin, Cout) -> (B, H', W', Cout), by explicit windows."""
    kh, kw = kernel.shape[:2]
    b, h, w, c = x.shape
    if padding == "SAME":
        (t, bt), (lf, r) = same_pads(h, kh, stride), same_pads(w, kw, stride)
        x = np.pad(x, ((0, 0), (t, bt), (lf, r), (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((b, ho, wo, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += patch @ kernel[i, j]
    return out


def std_conv(x, kernel, stride=1, timm=False):
    """Weight-standardised conv: kernel standardised over (kh, kw, Cin), eps 1e-5 on the std
    (official code), or inside the square root at 1e-8 (timm's StdConv2d)."""
    k = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
    k = k / (np.sqrt(k.var(axis=(0, 1, 2), keepdims=True) + 1e-8) if timm else k.std(axis=(0, 1, 2), keepdims=True) + 1e-5)
    return conv2d(x, k, stride)


def group_norm(x, scale, bias, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(b, h, w, c) * scale.reshape(-1) + bias.reshape(-1)


def max_pool_same(x, k=3, s=2):
    b, h, w, c = x.shape
    (t, bt), (lf, r) = same_pads(h, k, s), same_pads(w, k, s)
    x = np.pad(x, ((0, 0), (t, bt), (lf, r), (0, 0)), constant_values=-np.inf)
    ho, wo = -(-h // s), -(-w // s)
    out = np.full((b, ho, wo, c), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, x[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :])
    return out


_group_norm, _std_conv = group_norm, std_conv


def relu(x):
    return np.maximum(x, 0.0)


def resnet(ck, x, timm=False):
    """The hybrid's ResNet: the official code's epsilons, or timm's (GroupNorm 1e-5, its StdConv2d)."""
    eps = 1e-5 if timm else 1e-6

    def group_norm(x, scale, bias):
        return _group_norm(x, scale, bias, eps=eps)

    def std_conv(x, kernel, stride=1):
        return _std_conv(x, kernel, stride, timm=timm)

    x = relu(group_norm(std_conv(x, ck["conv_root/kernel"], 2), ck["gn_root/scale"], ck["gn_root/bias"]))
    x = max_pool_same(x)
    n = 1
    while f"block{n}/unit1/conv1/kernel" in ck:
        m = 1
        while f"block{n}/unit{m}/conv1/kernel" in ck:
            p = f"block{n}/unit{m}/"
            stride = 2 if (n > 1 and m == 1) else 1
            residual = x
            if p + "conv_proj/kernel" in ck:
                residual = group_norm(std_conv(x, ck[p + "conv_proj/kernel"], stride),
                                      ck[p + "gn_proj/scale"], ck[p + "gn_proj/bias"])
            y = relu(group_norm(std_conv(x, ck[p + "conv1/kernel"]), ck[p + "gn1/scale"], ck[p + "gn1/bias"]))
            y = relu(group_norm(std_conv(y, ck[p + "conv2/kernel"], stride), ck[p + "gn2/scale"], ck[p + "gn2/bias"]))
            y = group_norm(std_conv(y, ck[p + "conv3/kernel"]), ck[p + "gn3/scale"], ck[p + "gn3/bias"])
            x = relu(residual + y)
            m += 1
        n += 1
    return x


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def encoder_block(ck, i, x, return_attention=False):
    """Block i on tokens (B, S, D); with return_attention also its probabilities (B, heads, S, S)."""
    y = layer_norm(x, ck.block(i, "LayerNorm_0/scale"), ck.block(i, "LayerNorm_0/bias"))
    a = "MultiHeadDotProductAttention_1/"
    q = np.einsum("btd,dhk->bthk", y, ck.block(i, a + "query/kernel")) + ck.block_or_zero(i, a + "query/bias")
    k = np.einsum("btd,dhk->bthk", y, ck.block(i, a + "key/kernel")) + ck.block_or_zero(i, a + "key/bias")
    v = np.einsum("btd,dhk->bthk", y, ck.block(i, a + "value/kernel")) + ck.block_or_zero(i, a + "value/bias")
    probs = softmax(np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1]))
    o = np.einsum("bhqt,bthk->bqhk", probs, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, ck.block(i, a + "out/kernel")) + ck.block(i, a + "out/bias")
    y = layer_norm(x, ck.block(i, "LayerNorm_2/scale"), ck.block(i, "LayerNorm_2/bias"))
    m = "MlpBlock_3/"
    y = gelu_tanh(y @ ck.block(i, m + "Dense_0/kernel") + ck.block(i, m + "Dense_0/bias"))
    x = x + y @ ck.block(i, m + "Dense_1/kernel") + ck.block(i, m + "Dense_1/bias")
    return (x, probs) if return_attention else x


def map_head(ck, x, eps=1e-6):
    """big_vision's MAPHead on tokens (B, S, D): a learned probe attends over all tokens
    (nn.MultiHeadDotProductAttention), then y = x + MlpBlock(LayerNorm(x)); returns (B, D)."""
    m, a = "MAPHead_0/", "MAPHead_0/MultiHeadDotProductAttention_0/"
    b, _, d = x.shape
    probe = np.broadcast_to(ck[m + "probe"], (b, 1, d))
    q = np.einsum("btd,dhk->bthk", probe, ck[a + "query/kernel"]) + ck[a + "query/bias"]
    k = np.einsum("btd,dhk->bthk", x, ck[a + "key/kernel"]) + ck[a + "key/bias"]
    v = np.einsum("btd,dhk->bthk", x, ck[a + "value/kernel"]) + ck[a + "value/bias"]
    probs = softmax(np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1]))
    o = np.einsum("bhqt,bthk->bqhk", probs, v)
    y = np.einsum("bqhk,hkd->bqd", o, ck[a + "out/kernel"]) + ck[a + "out/bias"]
    z = layer_norm(y, ck[m + "LayerNorm_0/scale"], ck[m + "LayerNorm_0/bias"], eps)
    z = gelu_tanh(z @ ck[m + "MlpBlock_0/Dense_0/kernel"] + ck[m + "MlpBlock_0/Dense_0/bias"])
    y = y + z @ ck[m + "MlpBlock_0/Dense_1/kernel"] + ck[m + "MlpBlock_0/Dense_1/bias"]
    return y[:, 0]


def encoder(path, images, classifier="token", class_token=None, pixel_mean=None, pixel_std=None, timm_resnet=False):
    """The encoder of the .npz at `path` on float images in [0, 255] (B, H, W, C): every block's
    output (B, S, D), every block's attention probabilities (B, heads, S, S), and LN(z_L) (z_L
    itself when the checkpoint has `fc_norm`, whose LayerNorm follows the pooling).

    Token options (issue #26, from timm / DINOv2-reg / CLIP): a class token when classifier is
    "token" or `class_token`; DeiT's distillation token `dist` after it; both get position
    embeddings; register tokens `reg` are inserted after them once the position embeddings are
    added; `Transformer/pre_norm` normalises the tokens before the first block (CLIP ln_pre);
    `pixel_mean`/`pixel_std` (per channel, [0, 1] scale) replace the [-1, 1] input scaling."""
    ck = path if isinstance(path, Checkpoint) else Checkpoint(path)
    x = np.asarray(images, np.float64)
    if pixel_mean is None:
        x = x / 127.5 - 1.0
    else:
        x = (x / 255.0 - np.asarray(pixel_mean, np.float64)) / np.asarray(pixel_std, np.float64)
    if "conv_root/kernel" in ck:
        x = resnet(ck, x, timm=timm_resnet)
    kernel = ck["embedding/kernel"]
    ph, pw = kernel.shape[:2]
    x = conv2d(x, kernel, stride=ph, padding="VALID") + ck["embedding/bias"]
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if "pos_embedding" in ck:  # big_vision: added before the class token is prepended
        x = x + ck["pos_embedding"]
    prefix = []
    if classifier == "token" or class_token:
        prefix.append(ck["cls"])
    if "dist" in ck:
        prefix.append(ck["dist"])
    x = np.concatenate([np.broadcast_to(t, (b, 1, d)) for t in prefix] + [x], axis=1)
    pos = ck["Transformer/posembed_input/pos_embedding"] if "Transformer/posembed_input/pos_embedding" in ck else None
    regs = ck["reg"].shape[1] if "reg" in ck else 0
    # Registers with position rows of their own (timm's no_embed_class=False with reg_tokens: the table
    # has prefix + registers + patches rows): inserted first, then the table is added to every token.
    rows_for_regs = pos is not None and regs and pos.shape[-2] == x.shape[1] + regs
    if regs and rows_for_regs:
        x = np.concatenate([x[:, :len(prefix)], np.broadcast_to(ck["reg"], (b, regs, d)), x[:, len(prefix):]], axis=1)
    if pos is not None:
        x = x + pos
    if regs and not rows_for_regs:
        reg = np.broadcast_to(ck["reg"], (b, regs, d))
        x = np.concatenate([x[:, :len(prefix)], reg, x[:, len(prefix):]], axis=1)
    if "Transformer/pre_norm/scale" in ck:
        x = layer_norm(x, ck["Transformer/pre_norm/scale"], ck["Transformer/pre_norm/bias"])
    blocks, probs = [], []
    for i in range(ck.num_layers()):
        x, a = encoder_block(ck, i, x, return_attention=True)
        blocks.append(x)
        probs.append(a)
    if "fc_norm/scale" in ck:
        return blocks, probs, x
    return blocks, probs, layer_norm(x, ck["Transformer/encoder_norm/scale"], ck["Transformer/encoder_norm/bias"])


def forward(path, images, classifier="token", class_token=None, pixel_mean=None, pixel_std=None,
            pool_include_prefix=True, timm_resnet=False):
    """Logits (or pre-logits features when the checkpoint has no head) for float images in
    [0, 255], shape (B, H, W, C), from the .npz at `path`.

    "token" reads the class token, "gap" the mean of the patch tokens (every prefix token
    excluded), "map" big_vision's MAPHead over all tokens (over the patch tokens alone with
    `pool_include_prefix=False`, as timm >= 1.0); `fc_norm` normalises the pooled
    vector; a distilled checkpoint (`dist`) gives (head(token 0) + head_dist(token 1)) / 2, or
    the mean of the two tokens' features without a head (timm's VisionTransformerDistilled);
    `timm_resnet`: the hybrid's ResNet with timm's epsilons."""
    ck = Checkpoint(path)
    x = encoder(ck, images, classifier, class_token, pixel_mean, pixel_std, timm_resnet)[2]
    prefix = int(classifier == "token" or bool(class_token)) + ("dist" in ck) + (ck["reg"].shape[1] if "reg" in ck else 0)
    if classifier == "token":
        pooled = [x[:, 0]] + ([x[:, 1]] if "dist" in ck else [])
    elif classifier == "gap":
        pooled = [x[:, prefix:].mean(axis=1)]
    else:
        pooled = [map_head(ck, x if pool_include_prefix else x[:, prefix:])]
    if "fc_norm/scale" in ck:
        pooled = [layer_norm(p, ck["fc_norm/scale"], ck["fc_norm/bias"]) for p in pooled]
    if "pre_logits/kernel" in ck:
        pooled = [np.tanh(p @ ck["pre_logits/kernel"] + ck["pre_logits/bias"]) for p in pooled]
    if "head/kernel" in ck:
        heads = ("head", "head_dist")
        pooled = [p @ ck[f"{h}/kernel"] + ck[f"{h}/bias"] for h, p in zip(heads, pooled)]
    return sum(pooled) / len(pooled)
