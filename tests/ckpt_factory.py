"""Random checkpoints in the official layouts, written from the official module names (not from
keras_vit.weights), for the loading tests."""
from __future__ import annotations

import numpy as np


def vit_checkpoint(rng, *, hidden=32, heads=2, mlp=64, layers=2, patch=4, channels=3, grid=(2, 2),
                   classes=5, representation=None, resnet=None, token=True, gn_4d=False):
    """vision_transformer-layout arrays (float32). `resnet`=(units per stage) adds the hybrid."""
    w = {}

    def rnd(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def gn(name, c):
        shape = (1, 1, 1, c) if gn_4d else (c,)
        w[f"{name}/scale"] = (1.0 + rnd(*shape, scale=0.1)).astype(np.float32)
        w[f"{name}/bias"] = rnd(*shape, scale=0.1)

    cin = channels
    if resnet is not None:
        w["conv_root/kernel"] = rnd(7, 7, channels, 64)
        gn("gn_root", 64)
        cin = 64
        for s, n in enumerate(resnet):
            width = 64 * 2 ** s
            for u in range(n):
                p = f"block{s + 1}/unit{u + 1}/"
                if u == 0:
                    w[p + "conv_proj/kernel"] = rnd(1, 1, cin, 4 * width)
                    gn(p + "gn_proj", 4 * width)
                w[p + "conv1/kernel"] = rnd(1, 1, cin, width)
                gn(p + "gn1", width)
                w[p + "conv2/kernel"] = rnd(3, 3, width, width)
                gn(p + "gn2", width)
                w[p + "conv3/kernel"] = rnd(1, 1, width, 4 * width)
                gn(p + "gn3", 4 * width)
                cin = 4 * width
    w["embedding/kernel"] = rnd(patch, patch, cin, hidden, scale=0.05)
    w["embedding/bias"] = rnd(hidden)
    n = grid[0] * grid[1] + (1 if token else 0)
    if token:
        w["cls"] = rnd(1, 1, hidden)
    w["Transformer/posembed_input/pos_embedding"] = rnd(1, n, hidden)
    hd = hidden // heads
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[b + ln + "/scale"] = 1.0 + rnd(hidden, scale=0.1)
            w[b + ln + "/bias"] = rnd(hidden, scale=0.1)
        a = b + "MultiHeadDotProductAttention_1/"
        for q in ("query", "key", "value"):
            w[a + q + "/kernel"] = rnd(hidden, heads, hd)
            w[a + q + "/bias"] = rnd(heads, hd)
        w[a + "out/kernel"] = rnd(heads, hd, hidden)
        w[a + "out/bias"] = rnd(hidden)
        w[b + "MlpBlock_3/Dense_0/kernel"] = rnd(hidden, mlp)
        w[b + "MlpBlock_3/Dense_0/bias"] = rnd(mlp)
        w[b + "MlpBlock_3/Dense_1/kernel"] = rnd(mlp, hidden)
        w[b + "MlpBlock_3/Dense_1/bias"] = rnd(hidden)
    w["Transformer/encoder_norm/scale"] = 1.0 + rnd(hidden, scale=0.1)
    w["Transformer/encoder_norm/bias"] = rnd(hidden, scale=0.1)
    feat = hidden
    if representation:
        w["pre_logits/kernel"] = rnd(hidden, representation)
        w["pre_logits/bias"] = rnd(representation)
        feat = representation
    w["head/kernel"] = rnd(feat, classes)
    w["head/bias"] = rnd(classes)
    return w


_BV = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
       "MlpBlock_3": "MlpBlock_0"}


def to_big_vision(w, *, scan=False, prefix="params/", token=True):
    """The same parameters the way big_vision stores them: block names renumbered, posemb at
    the top level without the class slot (its value folded into `cls`), optionally scanned."""
    out = {}
    blocks = {}
    for k, v in w.items():
        parts = k.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            i = int(parts[1].split("_")[1])
            parts[2] = _BV.get(parts[2], parts[2])
            blocks.setdefault("/".join(parts[2:]), {})[i] = v
            if not scan:
                out["/".join(parts)] = v
        elif k == "Transformer/posembed_input/pos_embedding":
            out["pos_embedding"] = v[:, 1:] if token else v
        else:
            out[k] = v
    if token:
        out["cls"] = w["cls"] + w["Transformer/posembed_input/pos_embedding"][:, :1]
    if scan:
        for rest, per in blocks.items():
            out["Transformer/encoderblock/" + rest] = np.stack([per[i] for i in sorted(per)])
    return {prefix + k: v for k, v in out.items()}


def write(path, arrays):
    np.savez(path, **arrays)
    return str(path)
