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
  The ViT family adds `dist_token` + `head_dist` (DeiT distilled), `reg_token` (registers),
  `blocks.{i}.ls{1,2}.gamma` (LayerScale), `attn.{q,k}_norm` (qk-norm), a (2 * hidden, D) `mlp.fc1`
  (SwiGLUPacked: [x1; x2]), `norm_pre` (CLIP), `fc_norm` (norm after pooling) and
  `attn_pool.{latent, q, kv, proj, norm, mlp}` (SigLIP's attention pooling, big_vision's
  MAPHead); a pos_embed without the prefix tokens' rows (`no_embed_class`) gets zero rows.
- Hugging Face `ViTModel` / `ViTForImageClassification`: `[vit.]embeddings.*`,
  `[vit.]encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
  attention.output.dense, layernorm_after, intermediate.dense, output.dense}`,
  `[vit.]layernorm`, `pooler.dense` (the pre-logits layer) and `classifier`.

NumPy only: no torch.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

_BLOCK = "Transformer/encoderblock_{}/"
_ATT = "MultiHeadDotProductAttention_1/"


def detect(keys) -> str:
    """'timm', 'hf' (ViTModel) or '' for a state dict's keys; the Hugging Face ViT family's layouts
    are told apart first by `hf_layout.layout_of`, which calls this for the rest."""
    keys = list(keys)
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


@contextlib.contextmanager
def naming(key: str, array) -> Iterator[None]:
    """NumPy's reshape error ("cannot reshape array of size ...") with the checkpoint key and its shape."""
    try:
        yield
    except ValueError as exc:
        if not str(exc).startswith("cannot reshape"):
            raise
        raise ValueError(f"{key} {tuple(np.shape(array))} does not fit the model: {exc}") from None


def _fused_qkv(key: str, array, d: int) -> np.ndarray:
    """A fused q, k, v weight (3 d, d) or bias (3 d,): ValueError naming `key` for another shape."""
    array = np.asarray(array)
    if array.shape[0] != 3 * d:
        raise ValueError(f"{key} {tuple(array.shape)}: a fused query, key, value array has 3 x {d} = {3 * d} rows "
                         f"for the {d}-wide tokens")
    return array


class _Renamer:
    """Converted arrays under canonical names; source keys it did not use pass through unchanged,
    so that loading reports them as unexpected."""

    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd, self.out, self.used = sd, {}, set()

    def take(self, key: str, name: str, convert=np.asarray) -> None:
        if key in self.sd:
            with naming(key, self.sd[key]):
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


# The timm family's extra names (DeiT, DeiT-III, DINOv2, CLIP, SigLIP; see the module docstring).
_MAP = "MAPHead_0/"
_MAP_ATT = _MAP + "MultiHeadDotProductAttention_0/"
POSEMB = "Transformer/posembed_input/pos_embedding"


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def timm_pos_embed(pos: np.ndarray, num_prefix: int, num_registers: int = 0,
                   no_embed_class: Optional[bool] = None) -> np.ndarray:
    """timm's `pos_embed` as (1, prefix + N, D) with a row for each class / distillation token.

    timm's `no_embed_class=True` (DeiT-III, DINOv2 with registers) stores the patches' rows only
    and adds them before the prefix tokens are concatenated: that is a zero row here. None infers
    it from the shape (a square patch grid with or without the prefix rows). A table with rows for
    the register tokens too (no_embed_class=False with reg_tokens: SoViT-150M reg4) is kept as it
    is: the model's `register_pos_embedding` (which the checkpoint's defaults then set)."""
    pos = np.asarray(pos)
    pos = pos[None] if pos.ndim == 2 else pos
    n = pos.shape[1]
    if no_embed_class is None:
        if num_registers:
            no_embed_class = _square(n) or not _square(n - num_prefix - num_registers)
        else:
            no_embed_class = num_prefix > 0 and _square(n) and not _square(n - num_prefix)
    if no_embed_class:
        return np.concatenate([np.zeros((1, num_prefix, pos.shape[2]), pos.dtype), pos], axis=1)
    return pos


def from_timm(sd: Mapping[str, np.ndarray], num_heads: int,
              no_embed_class: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """A timm ViT state dict (plain, ResNet hybrid, or a family member: DeiT distilled, DeiT-III,
    DINOv2 with registers, CLIP, SigLIP, SwiGLU / qk-norm towers) under canonical names. Keys it
    does not know are passed through unchanged, so that loading reports them as unexpected.
    `no_embed_class`: whether pos_embed lacks the prefix tokens' rows (None: from its shape)."""
    r = _Renamer(sd)
    take = r.take
    take("patch_embed.proj.weight", "embedding/kernel", _conv)
    take("patch_embed.proj.bias", "embedding/bias")
    # timm's patch embedding has bias=not pre_norm (CLIP); elsewhere a missing bias is a damaged file
    if "patch_embed.proj.weight" in sd and "patch_embed.proj.bias" not in sd and "norm_pre.weight" in sd:
        r.out["embedding/bias"] = np.zeros(np.asarray(sd["patch_embed.proj.weight"]).shape[0], np.float32)
    take("cls_token", "cls")
    take("dist_token", "dist")
    take("reg_token", "reg")
    if "pos_embed" in sd:
        prefix = int("cls_token" in sd) + int("dist_token" in sd)
        regs = int(np.asarray(sd["reg_token"]).shape[1]) if "reg_token" in sd else 0
        take("pos_embed", POSEMB, lambda p: timm_pos_embed(p, prefix, regs, no_embed_class))
    take("norm_pre.weight", "Transformer/pre_norm/scale")
    take("norm_pre.bias", "Transformer/pre_norm/bias")
    _resnet_from_timm(sd, r)
    for i in _block_indices(sd, "blocks."):
        t, b = f"blocks.{i}.", _BLOCK.format(i)
        _take_layer_norms(take, t, b, "norm1", "norm2")
        qkv = t + "attn.qkv.weight"
        if qkv in sd:
            d = np.shape(sd[qkv])[1]
            w = _fused_qkv(qkv, sd[qkv], d)
            _check_heads(qkv, d, num_heads)
            for j, n in enumerate(("query", "key", "value")):
                r.out[f"{b}{_ATT}{n}/kernel"] = _heads_in(w[j * d:(j + 1) * d], num_heads)
            r.used.add(qkv)
            if t + "attn.qkv.bias" in sd:
                bias = _fused_qkv(t + "attn.qkv.bias", sd[t + "attn.qkv.bias"], d)
                for j, n in enumerate(("query", "key", "value")):
                    r.out[f"{b}{_ATT}{n}/bias"] = bias[j * d:(j + 1) * d].reshape(num_heads, -1)
                r.used.add(t + "attn.qkv.bias")
        for qk, name in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
            key = f"{t}attn.{qk}.weight"
            # (num_heads=1 is also how the shapes are read before the heads are known: the
            # shape check of the loading then names a real single-head mismatch.)
            if key in sd and qkv in sd and num_heads > 1 and \
                    np.asarray(sd[key]).shape[0] * num_heads != np.asarray(sd[qkv]).shape[1]:
                width = np.asarray(sd[qkv]).shape[1]
                raise ValueError(f"{key} normalises heads of width {np.asarray(sd[key]).shape[0]}, i.e. "
                                 f"{width // np.asarray(sd[key]).shape[0]} heads of the {width}-wide tokens; "
                                 f"the model has num_heads={num_heads}")
            take(key, f"{b}{_ATT}{name}/scale")
            take(f"{t}attn.{qk}.bias", f"{b}{_ATT}{name}/bias")
        take(t + "attn.proj.weight", f"{b}{_ATT}out/kernel", lambda w: _heads_out(np.asarray(w), num_heads))
        take(t + "attn.proj.bias", f"{b}{_ATT}out/bias")
        for j, fc in enumerate(("fc1", "fc2")):  # SwiGLUPacked's fc1 is [x1; x2]: the same transpose
            take(f"{t}mlp.{fc}.weight", f"{b}MlpBlock_3/Dense_{j}/kernel", _linear)
            take(f"{t}mlp.{fc}.bias", f"{b}MlpBlock_3/Dense_{j}/bias")
        for j in (1, 2):
            take(f"{t}ls{j}.gamma", f"{b}LayerScale_{j - 1}/scale")
    take("norm.weight", "Transformer/encoder_norm/scale")
    take("norm.bias", "Transformer/encoder_norm/bias")
    take("fc_norm.weight", "fc_norm/scale")
    take("fc_norm.bias", "fc_norm/bias")
    _attention_pool_from_timm(sd, r, num_heads)
    take("pre_logits.fc.weight", "pre_logits/kernel", _linear)
    take("pre_logits.fc.bias", "pre_logits/bias")
    for head in ("head", "head_dist"):
        take(f"{head}.weight", f"{head}/kernel", _linear)
        take(f"{head}.bias", f"{head}/bias")
    return r.result()


def _attention_pool_from_timm(sd: Mapping[str, np.ndarray], r: _Renamer, num_heads: int) -> None:
    """timm's AttentionPoolLatent (`attn_pool.*`) as big_vision's MAPHead_0: the latent is the
    probe, q the query, the fused kv the key (first half) and value (second half)."""
    p = "attn_pool."
    if p + "latent" not in sd:
        return
    latent = np.asarray(sd[p + "latent"])
    if latent.ndim != 3 or latent.shape[1] != 1:
        raise ValueError(f"attn_pool.latent {tuple(latent.shape)}: keras-vit's 'map' classifier has one probe "
                         "(latent_len=1)")
    d = latent.shape[2]
    _check_heads(p + "q.weight", d, num_heads)
    r.take(p + "latent", _MAP + "probe")
    r.take(p + "q.weight", _MAP_ATT + "query/kernel", lambda w: _heads_in(np.asarray(w), num_heads))
    r.take(p + "q.bias", _MAP_ATT + "query/bias", lambda w: np.asarray(w).reshape(num_heads, -1))
    for suffix, convert in (("weight", lambda w: _heads_in(w, num_heads)),
                            ("bias", lambda w: w.reshape(num_heads, -1))):
        key = f"{p}kv.{suffix}"
        if key in sd:
            kv = np.asarray(sd[key])
            if kv.shape[0] != 2 * d:
                raise ValueError(f"{key} {tuple(kv.shape)}: a fused key, value array has 2 x {d} = {2 * d} rows")
            r.out[f"{_MAP_ATT}key/{'kernel' if suffix == 'weight' else 'bias'}"] = convert(kv[:d])
            r.out[f"{_MAP_ATT}value/{'kernel' if suffix == 'weight' else 'bias'}"] = convert(kv[d:])
            r.used.add(key)
    r.take(p + "proj.weight", _MAP_ATT + "out/kernel", lambda w: _heads_out(np.asarray(w), num_heads))
    r.take(p + "proj.bias", _MAP_ATT + "out/bias")
    r.take(p + "norm.weight", _MAP + "LayerNorm_0/scale")
    r.take(p + "norm.bias", _MAP + "LayerNorm_0/bias")
    for j, fc in enumerate(("fc1", "fc2")):
        r.take(f"{p}mlp.{fc}.weight", f"{_MAP}MlpBlock_0/Dense_{j}/kernel", _linear)
        r.take(f"{p}mlp.{fc}.bias", f"{_MAP}MlpBlock_0/Dense_{j}/bias")


# OpenAI CLIP's image tower (`visual.*`) in timm's names, as timm's _convert_openai_clip renames it.
_OPENAI_SWAPS = (("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"),
                 ("transformer.resblocks.", "blocks."), ("ln_pre", "norm_pre"), ("ln_post", "norm"), ("ln_", "norm"),
                 ("in_proj_", "qkv."), ("out_proj", "proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
# What OpenAI's CLIP towers compute that their arrays do not say: QuickGELU, torch's LayerNorm
# epsilon and OpenAI's normalisation.
OPENAI_CLIP_DEFAULTS = dict(activation="quick_gelu", layer_norm_epsilon=1e-5,
                            pixel_mean=(0.48145466, 0.4578275, 0.40821073),
                            pixel_std=(0.26862954, 0.26130258, 0.27577711))


def image_tower(sd: Mapping[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], str]:
    """The image tower of a CLIP-style state dict in timm's names, and where it came from:
    OpenAI CLIP's `visual.*` ("openai_clip"), open_clip's timm trunk `visual.trunk.*` ("open_clip"),
    else the state dict unchanged (""). The text tower and the logit scale are left out."""
    if "visual.conv1.weight" in sd and "visual.transformer.resblocks.0.attn.in_proj_weight" in sd:
        out: Dict[str, np.ndarray] = {}
        for k, v in sd.items():
            if not k.startswith("visual."):
                continue
            k, v = k[len("visual."):], np.asarray(v)
            for old, new in _OPENAI_SWAPS:
                k = k.replace(old, new)
            if k == "proj":  # x @ proj: a bias-free Linear of (out, D) weight
                out["head.weight"], out["head.bias"] = np.ascontiguousarray(v.T), np.zeros(v.shape[1], v.dtype)
                continue
            if k == "class_embedding":
                k, v = "cls_token", v.reshape(1, 1, -1)
            elif k == "pos_embed":
                v = v[None]
            out[k] = v
        return out, "openai_clip"
    trunk = "visual.trunk."
    if trunk + "patch_embed.proj.weight" in sd:
        return {k[len(trunk):]: np.asarray(v) for k, v in sd.items() if k.startswith(trunk)}, "open_clip"
    return dict(sd), ""


def text_tower(keys) -> bool:
    """Whether a state dict holds a CLIP text tower and no image tower (HF `text_model.*`, OpenAI /
    open_clip `transformer.resblocks.*` with `token_embedding`, without `visual.*`)."""
    keys = list(keys)
    if any(k.startswith(("visual.", "vision_model.", "patch_embed.")) for k in keys):
        return False
    return any(k.startswith("text_model.") for k in keys) or (
        any(k.startswith("transformer.resblocks.") for k in keys) and "token_embedding.weight" in keys)


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


def to_canonical(sd: Mapping[str, np.ndarray], num_heads: int,
                 no_embed_class: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """timm or Hugging Face ViTModel state dict -> canonical names (ValueError for anything else;
    the Hugging Face ViT family: `hf_layout.any_to_canonical`)."""
    kind = detect(sd)
    if kind == "timm":
        return from_timm(sd, num_heads, no_embed_class)
    if kind == "hf":
        return from_hf(sd, num_heads)
    raise ValueError("not a timm or Hugging Face ViT state dict (no 'patch_embed.proj.weight' with "
                     "'blocks.*', nor 'embeddings.patch_embeddings.projection.weight')")


def to_timm(arrays: Mapping[str, np.ndarray], no_embed_class: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Canonical arrays -> a timm `VisionTransformer` state dict (qkv fused, torch layout), every
    option of the family included. `no_embed_class` (default: when there are register tokens, as
    in timm's register models) writes pos_embed without the prefix rows, folded into the tokens."""
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
    bias = np.asarray(arrays["embedding/bias"])
    if "Transformer/pre_norm/scale" not in arrays or np.any(bias):  # timm's CLIP towers: bias=not pre_norm
        out["patch_embed.proj.bias"] = bias
    tokens = [(name, key) for name, key in (("cls", "cls_token"), ("dist", "dist_token")) if name in arrays]
    for name, key in tokens + [("reg", "reg_token")]:
        if name in arrays:
            out[key] = np.asarray(arrays[name])
    if POSEMB in arrays:
        pos = np.asarray(arrays[POSEMB])
        if no_embed_class is None:
            no_embed_class = "reg" in arrays  # timm's register models (DINOv2-reg) store no prefix rows
        if no_embed_class:  # a prefix token's row is added to a constant token: fold it into the token
            for j, (_, key) in enumerate(tokens):
                out[key] = out[key] + pos[:, j:j + 1]
            pos = pos[:, len(tokens):]
        out["pos_embed"] = pos
    for name, key in (("Transformer/pre_norm", "norm_pre"), ("Transformer/encoder_norm", "norm"),
                      ("fc_norm", "fc_norm")):
        if f"{name}/scale" in arrays:
            out[f"{key}.weight"] = np.asarray(arrays[f"{name}/scale"])
            out[f"{key}.bias"] = np.asarray(arrays[f"{name}/bias"])
    i = 0
    while f"{_BLOCK.format(i)}LayerNorm_0/scale" in arrays:
        b, t = _BLOCK.format(i), f"blocks.{i}."
        for ln, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{t}{ln}.weight"] = np.asarray(arrays[f"{b}{name}/scale"])
            out[f"{t}{ln}.bias"] = np.asarray(arrays[f"{b}{name}/bias"])
        kernels = [np.asarray(arrays[f"{b}{_ATT}{n}/kernel"]) for n in ("query", "key", "value")]
        d = kernels[0].shape[0]
        out[t + "attn.qkv.weight"] = np.concatenate([kk.reshape(d, -1).T for kk in kernels], axis=0)
        if f"{b}{_ATT}query/bias" in arrays:  # none with qkv_bias=False
            out[t + "attn.qkv.bias"] = np.concatenate(
                [np.asarray(arrays[f"{b}{_ATT}{n}/bias"]).reshape(-1) for n in ("query", "key", "value")])
        for qk, name in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
            if f"{b}{_ATT}{name}/scale" in arrays:
                out[f"{t}attn.{qk}.weight"] = np.asarray(arrays[f"{b}{_ATT}{name}/scale"])
                out[f"{t}attn.{qk}.bias"] = np.asarray(arrays[f"{b}{_ATT}{name}/bias"])
        out[t + "attn.proj.weight"] = np.ascontiguousarray(np.asarray(arrays[f"{b}{_ATT}out/kernel"]).reshape(-1, d).T)
        out[t + "attn.proj.bias"] = np.asarray(arrays[f"{b}{_ATT}out/bias"])
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{t}mlp.{fc}.weight"] = _linear(arrays[f"{b}MlpBlock_3/Dense_{j}/kernel"])
            out[f"{t}mlp.{fc}.bias"] = np.asarray(arrays[f"{b}MlpBlock_3/Dense_{j}/bias"])
        for j in (1, 2):
            if f"{b}LayerScale_{j - 1}/scale" in arrays:
                out[f"{t}ls{j}.gamma"] = np.asarray(arrays[f"{b}LayerScale_{j - 1}/scale"])
        i += 1
    if _MAP + "probe" in arrays:
        _attention_pool_to_timm(arrays, out)
    for name, key in (("pre_logits", "pre_logits.fc"), ("head", "head"), ("head_dist", "head_dist")):
        if f"{name}/kernel" in arrays:
            out[f"{key}.weight"] = _linear(arrays[f"{name}/kernel"])
            out[f"{key}.bias"] = np.asarray(arrays[f"{name}/bias"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _attention_pool_to_timm(arrays: Mapping[str, np.ndarray], out: Dict[str, np.ndarray]) -> None:
    """MAPHead_0 as timm's AttentionPoolLatent (`attn_pool.*`, key and value fused into kv)."""
    p = "attn_pool."
    out[p + "latent"] = np.asarray(arrays[_MAP + "probe"])
    kernel = {n: np.asarray(arrays[f"{_MAP_ATT}{n}/kernel"]) for n in ("query", "key", "value")}
    d = kernel["query"].shape[0]
    bias = {n: np.asarray(arrays[f"{_MAP_ATT}{n}/bias"]).reshape(-1) for n in ("query", "key", "value")}
    out[p + "q.weight"], out[p + "q.bias"] = kernel["query"].reshape(d, -1).T, bias["query"]
    out[p + "kv.weight"] = np.concatenate([kernel[n].reshape(d, -1).T for n in ("key", "value")], axis=0)
    out[p + "kv.bias"] = np.concatenate([bias["key"], bias["value"]])
    out[p + "proj.weight"] = np.asarray(arrays[_MAP_ATT + "out/kernel"]).reshape(-1, d).T
    out[p + "proj.bias"] = np.asarray(arrays[_MAP_ATT + "out/bias"])
    out[p + "norm.weight"] = np.asarray(arrays[_MAP + "LayerNorm_0/scale"])
    out[p + "norm.bias"] = np.asarray(arrays[_MAP + "LayerNorm_0/bias"])
    for j, fc in enumerate(("fc1", "fc2")):
        out[f"{p}mlp.{fc}.weight"] = _linear(arrays[f"{_MAP}MlpBlock_0/Dense_{j}/kernel"])
        out[f"{p}mlp.{fc}.bias"] = np.asarray(arrays[f"{_MAP}MlpBlock_0/Dense_{j}/bias"])


__all__ = ["detect", "from_timm", "from_hf", "to_canonical", "to_timm", "timm_pos_embed", "image_tower", "text_tower",
           "OPENAI_CLIP_DEFAULTS"]
