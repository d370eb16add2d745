"""timm and Hugging Face ViT weights (the PyTorch layout) to and from our canonical names.

PyTorch stores Linear kernels as (out, in), convolution kernels as (out, in, kh, kw) and, in
timm, the query/key/value projections fused into one (3D, D) `qkv` matrix. The canonical
(vision_transformer) layout that `keras_vit.weights` assigns is (in, out), (kh, kw, in, out)
and per-head (D, heads, head_dim) attention kernels. Names handled:

- timm `VisionTransformer`: `patch_embed.proj`, `cls_token`, `pos_embed`,
  `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`
  (and the older `pre_logits.fc`); the hybrids (`vit_base_r50_s16_384`, `vit_small_r26_s32_224`)
  add `patch_embed.backbone.stem.{conv, norm}` and
  `patch_embed.backbone.stages.{s}.blocks.{u}.{conv1..3, norm1..3, downsample.conv, downsample.norm}`.
- Hugging Face `ViTModel` / `ViTForImageClassification`: `[vit.]embeddings.*`,
  `[vit.]encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
  attention.output.dense, layernorm_after, intermediate.dense, output.dense}`,
  `[vit.]layernorm`, `pooler.dense` (the pre-logits layer) and `classifier`.

NumPy only: no torch.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping

import numpy as np

_BLOCK = "Transformer/encoderblock_{}/"
_ATT = "MultiHeadDotProductAttention_1/"


def detect(keys) -> str:
    """'timm', 'hf', one of `hf_layout.LAYOUTS` (the Hugging Face ViT family) or '' (not a
    torch-layout ViT) for a state dict's keys."""
    from keras_vit.weights import hf_layout

    keys = list(keys)
    family = hf_layout.detect(keys)
    if family:
        return family
    if any(k.startswith("patch_embed.proj.") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "timm"
    if any(re.match(r"^(vit\.)?embeddings\.patch_embeddings\.projection\.", k) for k in keys):
        return "hf"
    return ""


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(w).T)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0)))


def _heads_in(w: np.ndarray, num_heads: int) -> np.ndarray:
    """torch (heads*hd, D) query/key/value weight -> canonical (D, heads, hd)."""
    d = w.shape[1]
    return _linear(w).reshape(d, num_heads, -1)


def _heads_out(w: np.ndarray, num_heads: int) -> np.ndarray:
    """torch (D, heads*hd) output projection -> canonical (heads, hd, D)."""
    return _linear(w).reshape(num_heads, -1, w.shape[0])


def _check_heads(name: str, d: int, num_heads: int) -> None:
    if d % num_heads:
        raise ValueError(f"{name}: width {d} is not divisible by num_heads={num_heads}")


class _Renamer:
    """Converted arrays under canonical names; source keys it did not use pass through unchanged,
    so that loading reports them as unexpected."""

    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd, self.out, self.used = sd, {}, set()

    def take(self, key: str, name: str, convert=np.asarray) -> None:
        if key in self.sd:
            self.out[name] = convert(self.sd[key])
            self.used.add(key)

    def result(self) -> Dict[str, np.ndarray]:
        return {**self.out, **{k: np.asarray(v) for k, v in self.sd.items() if k not in self.used}}


def _resnet_from_timm(sd: Mapping[str, np.ndarray], ren: _Renamer) -> None:
    stem = "patch_embed.backbone.stem."
    pairs = {stem + "conv.weight": "conv_root/kernel", stem + "norm.weight": "gn_root/scale",
             stem + "norm.bias": "gn_root/bias"}
    unit = re.compile(r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
    for k in sd:
        m = unit.match(k)
        if not m:
            continue
        s, u, rest = int(m[1]), int(m[2]), m[3]
        p = f"block{s + 1}/unit{u + 1}/"
        sub = {"downsample.conv.weight": "conv_proj/kernel", "downsample.norm.weight": "gn_proj/scale",
               "downsample.norm.bias": "gn_proj/bias"}
        for r in (1, 2, 3):
            sub.update({f"conv{r}.weight": f"conv{r}/kernel", f"norm{r}.weight": f"gn{r}/scale",
                        f"norm{r}.bias": f"gn{r}/bias"})
        if rest in sub:
            pairs[k] = p + sub[rest]
    for k, name in pairs.items():
        ren.take(k, name, _conv if name.endswith("/kernel") else np.asarray)


def _block_indices(sd: Mapping[str, np.ndarray], prefix: str) -> List[int]:
    """Sorted indices i of the encoder blocks named `{prefix}{i}.` in a state dict."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m[1]) for k in sd for m in [pattern.match(k)] if m})


def _take_layer_norms(take, t: str, b: str, before: str, after: str) -> None:
    """A block's two LayerNorms (`before` and `after` attention in the PyTorch names) as LayerNorm_0 / _2."""
    for ln, name in ((before, "LayerNorm_0"), (after, "LayerNorm_2")):
        take(f"{t}{ln}.weight", f"{b}{name}/scale")
        take(f"{t}{ln}.bias", f"{b}{name}/bias")


def from_timm(sd: Mapping[str, np.ndarray], num_heads: int) -> Dict[str, np.ndarray]:
    """A timm ViT state dict (plain or ResNet hybrid) under canonical names. Keys it does not
    know are passed through unchanged, so that loading reports them as unexpected."""
    r = _Renamer(sd)
    take = r.take
    take("patch_embed.proj.weight", "embedding/kernel", _conv)
    take("patch_embed.proj.bias", "embedding/bias")
    take("cls_token", "cls")
    take("pos_embed", "Transformer/posembed_input/pos_embedding")
    _resnet_from_timm(sd, r)
    for i in _block_indices(sd, "blocks."):
        t, b = f"blocks.{i}.", _BLOCK.format(i)
        _take_layer_norms(take, t, b, "norm1", "norm2")
        qkv = t + "attn.qkv.weight"
        if qkv in sd:
            w = np.asarray(sd[qkv])
            d = w.shape[1]
            _check_heads(qkv, d, num_heads)
            for j, n in enumerate(("query", "key", "value")):
                r.out[f"{b}{_ATT}{n}/kernel"] = _heads_in(w[j * d:(j + 1) * d], num_heads)
            r.used.add(qkv)
            if t + "attn.qkv.bias" in sd:
                bias = np.asarray(sd[t + "attn.qkv.bias"])
                for j, n in enumerate(("query", "key", "value")):
                    r.out[f"{b}{_ATT}{n}/bias"] = bias[j * d:(j + 1) * d].reshape(num_heads, -1)
                r.used.add(t + "attn.qkv.bias")
        take(t + "attn.proj.weight", f"{b}{_ATT}out/kernel", lambda w: _heads_out(np.asarray(w), num_heads))
        take(t + "attn.proj.bias", f"{b}{_ATT}out/bias")
        for j, fc in enumerate(("fc1", "fc2")):
            take(f"{t}mlp.{fc}.weight", f"{b}MlpBlock_3/Dense_{j}/kernel", _linear)
            take(f"{t}mlp.{fc}.bias", f"{b}MlpBlock_3/Dense_{j}/bias")
    take("norm.weight", "Transformer/encoder_norm/scale")
    take("norm.bias", "Transformer/encoder_norm/bias")
    take("pre_logits.fc.weight", "pre_logits/kernel", _linear)
    take("pre_logits.fc.bias", "pre_logits/bias")
    take("head.weight", "head/kernel", _linear)
    take("head.bias", "head/bias")
    if any(k.startswith("fc_norm.") for k in sd):
        raise ValueError("timm checkpoint normalises after pooling (fc_norm, global_pool='avg'); keras-vit's "
                         "'gap' classifier normalises before pooling, so these weights do not fit")
    return r.result()


def from_hf(sd: Mapping[str, np.ndarray], num_heads: int) -> Dict[str, np.ndarray]:
    """A Hugging Face ViTModel / ViTForImageClassification state dict under canonical names."""
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    r = _Renamer(sd)
    take = r.take
    e = prefix + "embeddings."
    take(e + "patch_embeddings.projection.weight", "embedding/kernel", _conv)
    take(e + "patch_embeddings.projection.bias", "embedding/bias")
    take(e + "cls_token", "cls")
    take(e + "position_embeddings", "Transformer/posembed_input/pos_embedding")
    r.used.add(e + "mask_token")  # masked-image-modelling only; not part of the encoder
    for i in _block_indices(sd, f"{prefix}encoder.layer."):
        t, b = f"{prefix}encoder.layer.{i}.", _BLOCK.format(i)
        _take_layer_norms(take, t, b, "layernorm_before", "layernorm_after")
        for n in ("query", "key", "value"):
            key = f"{t}attention.attention.{n}.weight"
            if key in sd:
                _check_heads(key, np.asarray(sd[key]).shape[0], num_heads)
            take(key, f"{b}{_ATT}{n}/kernel", lambda w: _heads_in(np.asarray(w), num_heads))
            take(f"{t}attention.attention.{n}.bias", f"{b}{_ATT}{n}/bias",
                 lambda w: np.asarray(w).reshape(num_heads, -1))
        take(t + "attention.output.dense.weight", f"{b}{_ATT}out/kernel", lambda w: _heads_out(np.asarray(w), num_heads))
        take(t + "attention.output.dense.bias", f"{b}{_ATT}out/bias")
        take(t + "intermediate.dense.weight", f"{b}MlpBlock_3/Dense_0/kernel", _linear)
        take(t + "intermediate.dense.bias", f"{b}MlpBlock_3/Dense_0/bias")
        take(t + "output.dense.weight", f"{b}MlpBlock_3/Dense_1/kernel", _linear)
        take(t + "output.dense.bias", f"{b}MlpBlock_3/Dense_1/bias")
    take(prefix + "layernorm.weight", "Transformer/encoder_norm/scale")
    take(prefix + "layernorm.bias", "Transformer/encoder_norm/bias")
    take(prefix + "pooler.dense.weight", "pre_logits/kernel", _linear)
    take(prefix + "pooler.dense.bias", "pre_logits/bias")
    take("classifier.weight", "head/kernel", _linear)
    take("classifier.bias", "head/bias")
    return r.result()


def to_canonical(sd: Mapping[str, np.ndarray], num_heads: int) -> Dict[str, np.ndarray]:
    """timm or Hugging Face state dict -> canonical names (ValueError for anything else)."""
    from keras_vit.weights import hf_layout

    kind = detect(sd)
    if kind in hf_layout.LAYOUTS:
        return hf_layout.to_canonical(sd, num_heads, kind)
    if kind == "timm":
        return from_timm(sd, num_heads)
    if kind == "hf":
        return from_hf(sd, num_heads)
    raise ValueError("not a timm or Hugging Face ViT state dict (no 'patch_embed.proj.weight' with "
                     "'blocks.*', nor 'embeddings.patch_embeddings.projection.weight')")


def to_timm(arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Canonical arrays -> a timm `VisionTransformer` state dict (qkv fused, torch layout)."""
    out: Dict[str, np.ndarray] = {}
    inv_conv = lambda w: np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))  # noqa: E731
    for k, v in arrays.items():
        if k == "conv_root/kernel":
            out["patch_embed.backbone.stem.conv.weight"] = inv_conv(np.asarray(v))
        m = re.match(r"^block(\d+)/unit(\d+)/(conv\d|conv_proj)/kernel$", k)
        if m:
            name = "downsample.conv" if m[3] == "conv_proj" else m[3]
            out[f"patch_embed.backbone.stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{name}.weight"] = \
                inv_conv(np.asarray(v))
    for k, v in arrays.items():
        m = re.match(r"^(?:gn_root|block(\d+)/unit(\d+)/gn(\d|_proj))/(scale|bias)$", k)
        if not m:
            continue
        p = "weight" if m[4] == "scale" else "bias"
        if k.startswith("gn_root/"):
            out[f"patch_embed.backbone.stem.norm.{p}"] = np.asarray(v).reshape(-1)
        else:
            name = "downsample.norm" if m[3] == "_proj" else f"norm{m[3]}"
            out[f"patch_embed.backbone.stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{name}.{p}"] = \
                np.asarray(v).reshape(-1)
    out["patch_embed.proj.weight"] = inv_conv(np.asarray(arrays["embedding/kernel"]))
    out["patch_embed.proj.bias"] = np.asarray(arrays["embedding/bias"])
    if "cls" in arrays:
        out["cls_token"] = np.asarray(arrays["cls"])
    if "Transformer/posembed_input/pos_embedding" in arrays:
        out["pos_embed"] = np.asarray(arrays["Transformer/posembed_input/pos_embedding"])
    i = 0
    while f"{_BLOCK.format(i)}LayerNorm_0/scale" in arrays:
        b, t = _BLOCK.format(i), f"blocks.{i}."
        for ln, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{t}{ln}.weight"] = np.asarray(arrays[f"{b}{name}/scale"])
            out[f"{t}{ln}.bias"] = np.asarray(arrays[f"{b}{name}/bias"])
        kernels = [np.asarray(arrays[f"{b}{_ATT}{n}/kernel"]) for n in ("query", "key", "value")]
        d = kernels[0].shape[0]
        out[t + "attn.qkv.weight"] = np.concatenate([kk.reshape(d, -1).T for kk in kernels], axis=0)
        out[t + "attn.qkv.bias"] = np.concatenate(
            [np.asarray(arrays[f"{b}{_ATT}{n}/bias"]).reshape(-1) for n in ("query", "key", "value")])
        out[t + "attn.proj.weight"] = np.ascontiguousarray(np.asarray(arrays[f"{b}{_ATT}out/kernel"]).reshape(-1, d).T)
        out[t + "attn.proj.bias"] = np.asarray(arrays[f"{b}{_ATT}out/bias"])
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{t}mlp.{fc}.weight"] = _linear(arrays[f"{b}MlpBlock_3/Dense_{j}/kernel"])
            out[f"{t}mlp.{fc}.bias"] = np.asarray(arrays[f"{b}MlpBlock_3/Dense_{j}/bias"])
        i += 1
    out["norm.weight"] = np.asarray(arrays["Transformer/encoder_norm/scale"])
    out["norm.bias"] = np.asarray(arrays["Transformer/encoder_norm/bias"])
    if "pre_logits/kernel" in arrays:
        out["pre_logits.fc.weight"] = _linear(arrays["pre_logits/kernel"])
        out["pre_logits.fc.bias"] = np.asarray(arrays["pre_logits/bias"])
    if "head/kernel" in arrays:
        out["head.weight"] = _linear(arrays["head/kernel"])
        out["head.bias"] = np.asarray(arrays["head/bias"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


__all__ = ["detect", "from_timm", "from_hf", "to_canonical", "to_timm"]
