"""An independent NumPy float64 forward pass of timm's VisionTransformer family (plain ViT, DeiT
distilled, DeiT-III, DINOv2 with and without registers, CLIP and SigLIP image towers, SwiGLU /
qk-norm "EVA-like" towers), reading a state dict in timm's own layout: torch (out, in) Linear
weights, the fused `attn.qkv`, the (out, in, kh, kw) patch convolution, `attn_pool.{latent, q,
kv, proj, norm, mlp}`, `ls{1,2}.gamma`, `attn.{q,k}_norm`, `norm_pre`, `fc_norm`, `head_dist`.

Written from timm's `models/vision_transformer.py` (Block, `_pos_embed`, `pool`, `forward_head`),
`models/deit.py` (VisionTransformerDistilled), `layers/attention.py`, `layers/mlp.py` (Mlp,
GluMlp as SwiGLUPacked), `layers/attention_pool.py` (AttentionPoolLatent),
`layers/layer_scale.py` and `layers/pos_embed.py` (resample_abs_pos_embed: torch's bicubic,
align_corners=False, with or without antialias). It imports nothing from keras_vit and uses none of its
checkpoint names, so it checks the Keras layers and the layout conversion together.

`arch` holds what a timm state dict does not say: num_heads, act ("gelu" = erf, "gelu_tanh",
"quick_gelu"), mlp ("mlp" | "swiglu"), global_pool ("token" | "avg" | "map"), no_embed_class,
eps (LayerNorm epsilon), mean / std (per channel, [0, 1] scale), pos_grid (the grid pos_embed
was learned for; default: square), antialias (of the bicubic resampling to another grid; timm >= 1.0
resamples with antialias=True, keras-vit's "bicubic" is torch's without). Which tokens, norms and heads exist follows the keys, as in
timm where the state dict matches the module tree.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def _f(a):
    return np.asarray(a, np.float64)


def linear(x, sd, name):
    """torch nn.Linear: x @ W.T + b, W (out, in)."""
    y = x @ _f(sd[name + ".weight"]).T
    if name + ".bias" in sd:
        y = y + _f(sd[name + ".bias"])
    return y


def layer_norm(x, sd, name, eps):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _f(sd[name + ".weight"]) + _f(sd[name + ".bias"])


def activation(x, kind):
    if kind == "gelu":  # nn.GELU(): the exact erf form
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if kind == "quick_gelu":  # OpenAI CLIP's QuickGELU
        return x / (1.0 + np.exp(-1.702 * x))
    raise ValueError(kind)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mlp(x, sd, p, act, kind="mlp"):
    """timm Mlp (fc1 -> act -> fc2) or SwiGLUPacked (GluMlp, gate_last=False: silu(x1) * x2)."""
    h = linear(x, sd, p + "fc1")
    if kind == "swiglu":
        x1, x2 = np.split(h, 2, axis=-1)
        h = x1 / (1.0 + np.exp(-x1)) * x2
    else:
        h = activation(h, act)
    return linear(h, sd, p + "fc2")


def attention(x, sd, p, heads, eps):
    """timm Attention: fused qkv, optional LayerNorm(head_dim) on q and k, softmax(q k^T / sqrt(hd)) v, proj."""
    b, n, c = x.shape
    hd = c // heads
    qkv = linear(x, sd, p + "qkv").reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if p + "q_norm.weight" in sd:
        q = layer_norm(q, sd, p + "q_norm", eps)
        k = layer_norm(k, sd, p + "k_norm", eps)
    probs = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
    o = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
    return linear(o, sd, p + "proj")


def block(x, sd, i, arch):
    """timm Block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
    p, eps = f"blocks.{i}.", arch.get("eps", 1e-6)
    y = attention(layer_norm(x, sd, p + "norm1", eps), sd, p + "attn.", arch["num_heads"], eps)
    if p + "ls1.gamma" in sd:
        y = y * _f(sd[p + "ls1.gamma"])
    x = x + y
    y = mlp(layer_norm(x, sd, p + "norm2", eps), sd, p + "mlp.", arch.get("act", "gelu"), arch.get("mlp", "mlp"))
    if p + "ls2.gamma" in sd:
        y = y * _f(sd[p + "ls2.gamma"])
    return x + y


def attention_pool(x, sd, arch):
    """timm AttentionPoolLatent (big_vision MAPHead): the latent query attends over x through
    q / fused kv / proj, then out + mlp(norm(out)); the first latent is the pooled vector."""
    b, n, c = x.shape
    heads = arch["num_heads"]
    hd = c // heads
    latent = _f(sd["attn_pool.latent"])
    q = linear(latent, sd, "attn_pool.q").reshape(1, -1, heads, hd).transpose(0, 2, 1, 3)
    kv = linear(x, sd, "attn_pool.kv").reshape(b, n, 2, heads, hd).transpose(2, 0, 3, 1, 4)
    probs = softmax(q @ kv[0].transpose(0, 1, 3, 2) / math.sqrt(hd))
    o = (probs @ kv[1]).transpose(0, 2, 1, 3).reshape(b, -1, c)
    o = linear(o, sd, "attn_pool.proj")
    o = o + mlp(layer_norm(o, sd, "attn_pool.norm", arch.get("eps", 1e-6)), sd, "attn_pool.mlp.",
                arch.get("act", "gelu"))
    return o[:, 0]


def _keys_cubic(t, a):
    t = abs(t)
    if t < 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def torch_bicubic_matrix(n_in, n_out, antialias=False):
    """(n_out, n_in) weights of torch's F.interpolate(mode="bicubic", align_corners=False) along one axis.

    antialias=False: source x = (i + 0.5) * n_in / n_out - 0.5 (not clamped), Keys' cubic with
    A = -0.75 on the taps floor(x) - 1 .. floor(x) + 2, taps clamped to the border.
    antialias=True (torch's separable AA kernel, PIL's): centre s * (i + 0.5) with s = n_in / n_out,
    support 2 * max(s, 1), the cubic with A = -0.5 stretched by max(s, 1), only the taps inside
    the input, weights renormalised to sum 1 (so it differs from the above even when upsampling)."""
    w = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        if antialias:
            centre, support, stretch = scale * (i + 0.5), 2.0 * max(scale, 1.0), max(scale, 1.0)
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            taps = np.array([_keys_cubic((j - centre + 0.5) / stretch, -0.5) for j in range(lo, hi)])
            w[i, lo:hi] = taps / taps.sum()
        else:
            x = (i + 0.5) * scale - 0.5
            x0 = math.floor(x)
            for tap in range(x0 - 1, x0 + 3):
                w[i, min(max(tap, 0), n_in - 1)] += _keys_cubic(x - tap, -0.75)
    return w


def resample_abs_pos_embed(pos, new_grid, old_grid, num_prefix_tokens, antialias=False):
    """timm's resample_abs_pos_embed: prefix rows kept, the grid resampled with torch's bicubic
    (timm >= 1.0 passes antialias=True by default; earlier timm and `antialias=False` do not)."""
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    d = grid.shape[-1]
    grid = grid.reshape(old_grid[0], old_grid[1], d)
    grid = np.einsum("ai,bj,ijd->abd", torch_bicubic_matrix(old_grid[0], new_grid[0], antialias),
                     torch_bicubic_matrix(old_grid[1], new_grid[1], antialias), grid)
    return np.concatenate([prefix, grid.reshape(1, -1, d)], axis=1)


def patch_embed(images, sd, arch):
    """Normalise (x / 255 - mean) / std, then the stride-p convolution as a matmul over patches (an
    image size that is not a multiple of p keeps floor(H / p) x floor(W / p) patches, as timm's)."""
    x = _f(images) / 255.0
    x = (x - np.asarray(arch.get("mean", (0.5,) * x.shape[-1]))) / np.asarray(arch.get("std", (0.5,) * x.shape[-1]))
    w = _f(sd["patch_embed.proj.weight"])  # (D, C, p, p)
    d, c, ph, pw = w.shape
    b, h, wd, _ = x.shape
    gh, gw = h // ph, wd // pw  # torch's Conv2d (no padding) leaves out the pixels past the last whole patch
    patches = x[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, c)
    out = np.einsum("bipjqc,dcpq->bijd", patches, w)
    if "patch_embed.proj.bias" in sd:
        out = out + _f(sd["patch_embed.proj.bias"])
    return out.reshape(b, gh * gw, d), (gh, gw)


def tokens(sd, arch, images):
    """forward_features: patch_embed, _pos_embed (+ registers), norm_pre, blocks, norm -> (B, S, D)
    with S = [class?, distillation?, registers*, patches]."""
    x, grid = patch_embed(images, sd, arch)
    b, _, d = x.shape
    prefix = [np.broadcast_to(_f(sd[k]), (b, sd[k].shape[1], d)) for k in ("cls_token", "dist_token", "reg_token")
              if k in sd]
    num_prefix = sum(t.shape[1] for t in prefix)
    if "pos_embed" in sd:
        pos = _f(sd["pos_embed"])
        pos_prefix = 0 if arch.get("no_embed_class") else num_prefix
        n_old = pos.shape[1] - pos_prefix
        old = tuple(arch.get("pos_grid") or (math.isqrt(n_old), math.isqrt(n_old)))
        if old != grid:
            pos = resample_abs_pos_embed(pos, grid, old, pos_prefix, arch.get("antialias", False))
        if arch.get("no_embed_class"):  # DeiT-III, DINOv2-reg: added to the patches, then concatenated
            x = np.concatenate(prefix + [x + pos], axis=1)
        else:  # original ViT / DeiT: concatenated, then added to every token
            x = np.concatenate(prefix + [x], axis=1) + pos
    else:
        x = np.concatenate(prefix + [x], axis=1)
    eps = arch.get("eps", 1e-6)
    if "norm_pre.weight" in sd:
        x = layer_norm(x, sd, "norm_pre", eps)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        x = block(x, sd, i, arch)
    if "norm.weight" in sd:
        x = layer_norm(x, sd, "norm", eps)
    return x


def forward(sd, arch, images, pre_logits=False):
    """Logits (or with `pre_logits`, or when the state dict has no head, the pooled features) of
    the timm-layout state dict `sd` for float images in [0, 255], (B, H, W, C)."""
    x = tokens(sd, arch, images)
    if "dist_token" in sd:  # DeiT distilled: (head(token 0) + head_dist(token 1)) / 2 at inference
        if pre_logits or "head.weight" not in sd:
            return (x[:, 0] + x[:, 1]) / 2
        return (linear(x[:, 0], sd, "head") + linear(x[:, 1], sd, "head_dist")) / 2
    pool = arch.get("global_pool", "token")
    if pool == "map":
        # Over every token, as big_vision's MAPHead, timm before 1.0 and keras-vit's design; timm
        # >= 1.0 leaves the prefix tokens out unless pool_include_prefix (arch["pool_include_prefix"]
        # = False gives that). SigLIP towers have no prefix tokens, so both agree on them.
        if not arch.get("pool_include_prefix", True):
            x = x[:, sum(sd[k].shape[1] for k in ("cls_token", "dist_token", "reg_token") if k in sd):]
        x = attention_pool(x, sd, arch)
    elif pool == "token":
        x = x[:, 0]
    else:
        num_prefix = sum(sd[k].shape[1] for k in ("cls_token", "reg_token") if k in sd)
        x = x[:, num_prefix:].mean(axis=1)
    if "fc_norm.weight" in sd:
        x = layer_norm(x, sd, "fc_norm", arch.get("eps", 1e-6))
    if pre_logits or "head.weight" not in sd:
        return x
    return linear(x, sd, "head")
