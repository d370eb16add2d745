"""Hugging Face transformers layouts of the ViT family (issue #26) to and from our canonical names,
and the ViTConfig fields that their config.json (and preprocessor_config.json) describe.

Models handled (state-dict names from transformers' modeling_dinov2.py,
modeling_dinov2_with_registers.py, modeling_clip.py, modeling_siglip.py, modeling_deit.py):

- "hf-dinov2": `Dinov2Model` / `Dinov2WithRegistersModel`: `embeddings.{cls_token, mask_token (ignored),
  register_tokens, position_embeddings, patch_embeddings.projection}`, `encoder.layer.{i}.{norm1,
  attention.attention.{query,key,value}, attention.output.dense, layer_scale1.lambda1, norm2,
  mlp.{fc1,fc2} | mlp.{weights_in,weights_out} (SwiGLU), layer_scale2.lambda1}`, `layernorm`.
- "hf-clip": `CLIPVisionModel[WithProjection]` (and the vision tower of a `CLIPModel`):
  `vision_model.embeddings.{class_embedding, patch_embedding (no bias), position_embedding}`,
  `vision_model.pre_layrnorm`, `vision_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj,
  layer_norm2, mlp.{fc1,fc2}}`, `vision_model.post_layernorm`, `visual_projection` (no bias) = the head.
- "hf-siglip": `SiglipVisionModel` (and the vision tower of a `SiglipModel`): as CLIP without the
  class token and `pre_layrnorm`, with a patch bias, and `vision_model.head.{probe, attention.in_proj_weight,
  in_proj_bias, attention.out_proj, layernorm, mlp.{fc1,fc2}}` = the MAP head.
  transformers >= 5 saves CLIPVisionModel and SiglipVisionModel without the `vision_model.` prefix
  (`vision_model_names` puts it back).
- "hf-deit": `DeiTForImageClassificationWithTeacher` (`deit.embeddings.{cls_token, distillation_token}`,
  `cls_classifier`, `distillation_classifier`) and `DeiTForImageClassification` (`classifier` on the class
  token only: loaded as the distilled model whose head is twice `classifier` and whose `head_dist` is zero,
  which gives the same logits, (2 W x_cls + 0) / 2).

NumPy only: no torch.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from keras_vit.weights import torch_layout as tl
from keras_vit.weights.presets import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("keras_vit")

LAYOUTS = ("hf-dinov2", "hf-clip", "hf-siglip", "hf-deit")
_BLOCK, _ATT = tl._BLOCK, tl._ATT
_MAP = "MAPHead_0/"
_MAP_ATT = _MAP + "MultiHeadDotProductAttention_0/"
_TEXT_ONLY = ("clip_text_model", "siglip_text_model")


def vision_model_names(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`sd` with the `vision_model.` prefix that transformers >= 5 leaves out when it saves a
    CLIPVisionModel or SiglipVisionModel (`embeddings.patch_embedding.*` at the top); as written
    by transformers 4, by CLIPVisionModelWithProjection and by the full CLIP / SigLIP models."""
    if "embeddings.patch_embedding.weight" in sd and not any(k.startswith("vision_model.") for k in sd):
        return {"vision_model." + k: v for k, v in sd.items()}
    return dict(sd)


def detect(keys) -> str:
    """One of LAYOUTS, or '' for any other state dict (a text tower alone: torch_layout.text_tower)."""
    keys = list(keys)
    if any(k.startswith("vision_model.embeddings.patch_embedding.") for k in keys):
        return "hf-clip" if any(k == "vision_model.embeddings.class_embedding" for k in keys) else "hf-siglip"
    if any(k.startswith("deit.embeddings.") for k in keys):
        return "hf-deit"
    if any(re.match(r"^(dinov2(_with_registers)?\.)?encoder\.layer\.\d+\.layer_scale1\.lambda1$", k) for k in keys):
        return "hf-dinov2"
    return ""


def _zeros_bias(out: Dict[str, np.ndarray], kernel: str, bias: str) -> None:
    """A zero bias for a kernel that the layout stores without one (CLIP's patch embedding, visual_projection)."""
    if kernel in out and bias not in out:
        out[bias] = np.zeros(out[kernel].shape[-1], np.float32)


def _dinov2(sd: Mapping[str, np.ndarray], num_heads: int) -> Dict[str, np.ndarray]:
    prefix = next((p for p in ("dinov2.", "dinov2_with_registers.") if any(k.startswith(p) for k in sd)), "")
    r = tl._Renamer(sd)
    take = r.take
    e = prefix + "embeddings."
    take(e + "patch_embeddings.projection.weight", "embedding/kernel", tl._conv)
    take(e + "patch_embeddings.projection.bias", "embedding/bias")
    take(e + "cls_token", "cls")
    take(e + "register_tokens", "reg")
    take(e + "position_embeddings", "Transformer/posembed_input/pos_embedding")
    r.used.add(e + "mask_token")  # masked-image modelling only; not part of the encoder
    for i in tl._block_indices(sd, f"{prefix}encoder.layer."):
        t, b = f"{prefix}encoder.layer.{i}.", _BLOCK.format(i)
        tl._take_layer_norms(take, t, b, "norm1", "norm2")
        _separate_qkv(r, t + "attention.attention.{}", b + _ATT, ("query", "key", "value"), num_heads)
        _out_proj(r, t + "attention.output.dense", b + _ATT, num_heads)
        take(t + "layer_scale1.lambda1", b + "LayerScale_0/scale")
        take(t + "layer_scale2.lambda1", b + "LayerScale_1/scale")
        for j, (fc, glu) in enumerate((("fc1", "weights_in"), ("fc2", "weights_out"))):
            for name in (fc, glu):
                take(f"{t}mlp.{name}.weight", f"{b}MlpBlock_3/Dense_{j}/kernel", tl._linear)
                take(f"{t}mlp.{name}.bias", f"{b}MlpBlock_3/Dense_{j}/bias")
    take(prefix + "layernorm.weight", "Transformer/encoder_norm/scale")
    take(prefix + "layernorm.bias", "Transformer/encoder_norm/bias")
    if "classifier.weight" in sd and prefix:
        raise ValueError("Dinov2ForImageClassification's head reads the class token and the mean patch token "
                         "together (2 x hidden_size inputs), which keras-vit's heads do not; load the "
                         "backbone (Dinov2Model) and train a new head")
    return r.result()


def _separate_qkv(r: tl._Renamer, key: str, a: str, names, num_heads: int) -> None:
    """Separate query/key/value Linear layers (`key` formatted with each of `names`) -> per-head kernels."""
    for theirs, ours in zip(names, ("query", "key", "value")):
        w = key.format(theirs) + ".weight"
        if w in r.sd:
            tl._check_heads(w, np.asarray(r.sd[w]).shape[0], num_heads)
        r.take(w, f"{a}{ours}/kernel", lambda v: tl._heads_in(np.asarray(v), num_heads))
        r.take(key.format(theirs) + ".bias", f"{a}{ours}/bias", lambda v: np.asarray(v).reshape(num_heads, -1))


def _out_proj(r: tl._Renamer, key: str, a: str, num_heads: int) -> None:
    r.take(key + ".weight", a + "out/kernel", lambda v: tl._heads_out(np.asarray(v), num_heads))
    r.take(key + ".bias", a + "out/bias")


def _clip_like(sd: Mapping[str, np.ndarray], num_heads: int, siglip: bool) -> Dict[str, np.ndarray]:
    """CLIP and SigLIP vision towers (their encoder layers are named alike)."""
    dropped = [k for k in sd if k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale",
                                                                      "logit_bias")]
    if dropped:
        log.info("%s checkpoint: the vision tower is taken (%d text-tower tensors left out)",
                 "SigLIP" if siglip else "CLIP", len(dropped))
    r = tl._Renamer({k: v for k, v in sd.items() if k not in set(dropped)})
    take = r.take
    v, e = "vision_model.", "vision_model.embeddings."
    take(e + "patch_embedding.weight", "embedding/kernel", tl._conv)
    take(e + "patch_embedding.bias", "embedding/bias")
    take(e + "class_embedding", "cls", lambda c: np.asarray(c).reshape(1, 1, -1))
    take(e + "position_embedding.weight", "Transformer/posembed_input/pos_embedding", lambda p: np.asarray(p)[None])
    r.used.add(e + "position_ids")  # a buffer of older transformers files: 0..N-1
    take(v + "pre_layrnorm.weight", "Transformer/pre_norm/scale")
    take(v + "pre_layrnorm.bias", "Transformer/pre_norm/bias")
    for i in tl._block_indices(r.sd, v + "encoder.layers."):
        t, b = f"{v}encoder.layers.{i}.", _BLOCK.format(i)
        tl._take_layer_norms(take, t, b, "layer_norm1", "layer_norm2")
        _separate_qkv(r, t + "self_attn.{}_proj", b + _ATT, ("q", "k", "v"), num_heads)
        _out_proj(r, t + "self_attn.out_proj", b + _ATT, num_heads)
        _mlp(take, t + "mlp.", b + "MlpBlock_3/")
    take(v + "post_layernorm.weight", "Transformer/encoder_norm/scale")
    take(v + "post_layernorm.bias", "Transformer/encoder_norm/bias")
    take("visual_projection.weight", "head/kernel", tl._linear)
    h = v + "head."
    take(h + "probe", _MAP + "probe")
    w = h + "attention.in_proj_weight"
    if w in r.sd:
        d = np.shape(r.sd[w])[1]
        qkv = tl._fused_qkv(w, r.sd[w], d)
        bias = r.sd.get(h + "attention.in_proj_bias")
        if bias is not None:
            bias = tl._fused_qkv(h + "attention.in_proj_bias", bias, d)
        tl._check_heads(w, d, num_heads)
        for j, n in enumerate(("query", "key", "value")):
            r.out[f"{_MAP_ATT}{n}/kernel"] = tl._heads_in(qkv[j * d:(j + 1) * d], num_heads)
            if bias is not None:  # a missing one is reported as the canonical keys loading misses
                r.out[f"{_MAP_ATT}{n}/bias"] = bias[j * d:(j + 1) * d].reshape(num_heads, -1)
        r.used.update({w, h + "attention.in_proj_bias"})
    _out_proj(r, h + "attention.out_proj", _MAP_ATT, num_heads)
    take(h + "layernorm.weight", _MAP + "LayerNorm_0/scale")
    take(h + "layernorm.bias", _MAP + "LayerNorm_0/bias")
    _mlp(take, h + "mlp.", _MAP + "MlpBlock_0/")
    out = r.result()
    if not siglip:  # CLIP's patch embedding has no bias; SigLIP's has one, so a missing one is a damaged file
        _zeros_bias(out, "embedding/kernel", "embedding/bias")
    _zeros_bias(out, "head/kernel", "head/bias")
    return out


def _mlp(take, t: str, b: str) -> None:
    for j, fc in enumerate(("fc1", "fc2")):
        take(f"{t}{fc}.weight", f"{b}Dense_{j}/kernel", tl._linear)
        take(f"{t}{fc}.bias", f"{b}Dense_{j}/bias")


def _deit(sd: Mapping[str, np.ndarray], num_heads: int) -> Dict[str, np.ndarray]:
    # The encoder is HF ViT's under "deit."; the tokens and the heads are DeiT's own.
    out = tl.from_hf({(k[len("deit."):] if k.startswith("deit.") else k): v for k, v in sd.items()
                      if k not in ("classifier.weight", "classifier.bias")}, num_heads)
    for theirs, ours in (("embeddings.distillation_token", "dist"),):
        if theirs in out:
            out[ours] = out.pop(theirs)
    for theirs, ours in (("cls_classifier", "head"), ("distillation_classifier", "head_dist")):
        if theirs + ".weight" in out:
            out[ours + "/kernel"] = tl._linear(out.pop(theirs + ".weight"))
        if theirs + ".bias" in out:  # a missing one is reported as the canonical key loading misses
            out[ours + "/bias"] = out.pop(theirs + ".bias")
    if "classifier.weight" in sd:  # one head on the class token: the same logits as the distilled average
        w = tl._linear(sd["classifier.weight"])
        out["head/kernel"], out["head_dist/kernel"] = 2 * w, np.zeros_like(w)
        if "classifier.bias" in sd:
            b = np.asarray(sd["classifier.bias"])
            out["head/bias"], out["head_dist/bias"] = 2 * b, np.zeros_like(b)
    return out


def layout_of(keys) -> str:
    """One of LAYOUTS, else what torch_layout.detect says ('timm', 'hf' for ViTModel, or ''): the
    family first, since DINOv2's names would pass for ViTModel's."""
    keys = list(keys)
    return detect(keys) or tl.detect(keys)


def any_to_canonical(sd: Mapping[str, np.ndarray], num_heads: int,
                     no_embed_class: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """A timm, Hugging Face ViTModel or Hugging Face family state dict under canonical names
    (`no_embed_class`: a timm pos_embed's layout, see torch_layout.timm_pos_embed)."""
    layout = detect(sd)
    return to_canonical(sd, num_heads, layout) if layout else tl.to_canonical(sd, num_heads, no_embed_class)


def to_canonical(sd: Mapping[str, np.ndarray], num_heads: int, layout: Optional[str] = None) -> Dict[str, np.ndarray]:
    """A state dict of one of LAYOUTS under canonical names (keys it does not know pass through,
    so that loading reports them as unexpected)."""
    layout = layout or detect(sd)
    if layout == "hf-dinov2":
        return _dinov2(sd, num_heads)
    if layout in ("hf-clip", "hf-siglip"):
        return _clip_like(sd, num_heads, siglip=layout == "hf-siglip")
    if layout == "hf-deit":
        return _deit(sd, num_heads)
    raise ValueError(f"not a Hugging Face {', '.join(LAYOUTS)} state dict")


def resample_method(sd: Mapping[str, np.ndarray], layout: str) -> str:
    """How transformers' interpolate_pos_encoding resamples the layout's position table to another
    grid: torch's bicubic (align_corners=False), with antialias for Dinov2WithRegistersModel."""
    if layout == "hf-dinov2" and any(k.endswith("embeddings.register_tokens") for k in sd):
        return "bicubic_antialias"
    return "bicubic"


# --- what the layout and the config say ----------------------------------------------------------
def layout_fields(sd: Mapping[str, np.ndarray], layout: str, arrays: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """The ViTConfig fields that the layout's tensor names pin down, and the image size of the
    position table (`arrays`: the same tensors under canonical names)."""
    keys = set(sd)
    out: Dict[str, Any] = {}
    pe, kernel = arrays.get("Transformer/posembed_input/pos_embedding"), arrays.get("embedding/kernel")
    if pe is not None and kernel is not None:
        n = int(pe.shape[-2]) - ("cls" in arrays) - ("dist" in arrays)
        g = int(round(np.sqrt(max(n, 0))))
        if g * g == n:
            out["image_size"] = (g * int(kernel.shape[0]), g * int(kernel.shape[1]))
    if layout == "hf-dinov2":
        out.update(classifier="token", layer_scale_init=1.0, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
                   gelu_approximate=False)
        reg = next((np.asarray(v) for k, v in sd.items() if k.endswith("embeddings.register_tokens")), None)
        if reg is not None:
            out["num_registers"] = int(reg.shape[1])
        w_in = next((np.asarray(v) for k, v in sd.items() if k.endswith("layer.0.mlp.weights_in.weight")), None)
        if w_in is not None:
            out.update(mlp="swiglu", mlp_dim=int(w_in.shape[0]) // 2)
        if "classifier.weight" not in keys:
            out["include_top"] = False
    elif layout == "hf-clip":
        out.update(classifier="token", pre_norm=True, activation="quick_gelu", layer_norm_epsilon=1e-5,
                   pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
        if "visual_projection.weight" not in keys:
            out["include_top"] = False
    elif layout == "hf-siglip":
        out.update(classifier="map" if "vision_model.head.probe" in keys else "gap", gelu_approximate=True,
                   include_top=False)
    elif layout == "hf-deit":
        out.update(classifier="token", distilled=True, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
                   gelu_approximate=False)
    return out


def _vision_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The vision tower's config of a CLIPConfig / SiglipConfig (saying so); the config itself otherwise."""
    kind = config.get("model_type")
    if kind in _TEXT_ONLY:
        raise ValueError(f"config.json describes a text tower (model_type {kind!r}); keras-vit loads vision "
                         "towers: give a CLIPVisionModel / SiglipVisionModel or a full CLIPModel / SiglipModel")
    if kind in ("clip", "siglip"):
        log.info("%s config: the vision tower (vision_config) is taken", kind)
        vision = dict(config.get("vision_config") or {})
        vision.setdefault("model_type", f"{kind}_vision_model")
        return vision
    return config


def _swiglu_hidden(hidden: int, mlp_ratio: float) -> int:
    """Dinov2SwiGLUFFN's width of each half: 2/3 of hidden * mlp_ratio, rounded up to a multiple of 8."""
    return (int(int(hidden * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def config_fields(config: Mapping[str, Any]) -> Dict[str, Any]:
    """ViTConfig fields from a transformers config.json of the family (Dinov2Config,
    Dinov2WithRegistersConfig, CLIP[Vision]Config, Siglip[Vision]Config, DeiTConfig); {} for others."""
    config = _vision_config(config)
    kind = config.get("model_type")
    if kind not in ("dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model", "deit"):
        return {}
    out: Dict[str, Any] = {}
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads"),
                         ("num_layers", "num_hidden_layers"), ("mlp_dim", "intermediate_size"),
                         ("layer_norm_epsilon", "layer_norm_eps"), ("image_size", "image_size"),
                         ("patch_size", "patch_size"), ("channels", "num_channels")):
        if theirs in config:
            out[ours] = config[theirs]
    act = config.get("hidden_act")
    if act == "quick_gelu":
        out["activation"] = "quick_gelu"
    elif act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        out["gelu_approximate"] = act != "gelu"
    if kind.startswith("dinov2"):
        hidden, ratio = int(config.get("hidden_size", 768)), float(config.get("mlp_ratio", 4))
        out["layer_scale_init"] = float(config.get("layerscale_value", 1.0))
        if config.get("use_swiglu_ffn"):
            out.update(mlp="swiglu", mlp_dim=_swiglu_hidden(hidden, ratio))
        else:
            out["mlp_dim"] = int(hidden * ratio)
        if kind == "dinov2_with_registers":
            out["num_registers"] = int(config.get("num_register_tokens", 4))
    elif kind == "siglip_vision_model":
        out["classifier"] = "map" if config.get("vision_use_head", True) else "gap"
    return out


def preprocessing_fields(preprocessor: Mapping[str, Any]) -> Dict[str, Any]:
    """pixel_mean / pixel_std from a preprocessor_config.json (None where it keeps today's 0.5 / 0.5)."""
    mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
    if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std)):
        return {}
    if np.allclose(mean, 0.5) and np.allclose(std, 0.5):
        return {"pixel_mean": None, "pixel_std": None}
    return {"pixel_mean": tuple(float(m) for m in mean), "pixel_std": tuple(float(s) for s in std)}


# --- canonical -> Hugging Face ---------------------------------------------------------------------
def _per_head_to_linear(k: np.ndarray) -> np.ndarray:
    """Canonical (D, heads, hd) -> torch (heads*hd, D)."""
    return np.ascontiguousarray(np.asarray(k).reshape(k.shape[0], -1).T)


def _out_to_linear(k: np.ndarray) -> np.ndarray:
    """Canonical (heads, hd, D) -> torch (D, heads*hd)."""
    return np.ascontiguousarray(np.asarray(k).reshape(-1, k.shape[-1]).T)


def _put_block(out: Dict[str, np.ndarray], arrays: Mapping[str, np.ndarray], b: str, t: str, names: Mapping[str, str],
               zero_qkv_bias: bool = False) -> None:
    """One encoder block, canonical -> torch names (`names`: our part -> their module name). Without
    query/key/value biases (qkv_bias=False) none are written, or zeros with `zero_qkv_bias` (a layout
    that always has them: the same outputs)."""
    a = b + _ATT
    for ours, theirs in (("LayerNorm_0", names["ln1"]), ("LayerNorm_2", names["ln2"])):
        out[f"{t}{theirs}.weight"], out[f"{t}{theirs}.bias"] = arrays[f"{b}{ours}/scale"], arrays[f"{b}{ours}/bias"]
    for ours in ("query", "key", "value"):
        kernel = _per_head_to_linear(arrays[f"{a}{ours}/kernel"])
        out[f"{t}{names[ours]}.weight"] = kernel
        if f"{a}{ours}/bias" in arrays:
            out[f"{t}{names[ours]}.bias"] = np.asarray(arrays[f"{a}{ours}/bias"]).reshape(-1)
        elif zero_qkv_bias:
            out[f"{t}{names[ours]}.bias"] = np.zeros(kernel.shape[0], np.float32)
    out[f"{t}{names['out']}.weight"] = _out_to_linear(arrays[f"{a}out/kernel"])
    out[f"{t}{names['out']}.bias"] = arrays[f"{a}out/bias"]
    for j in (0, 1):
        out[f"{t}{names[f'fc{j}']}.weight"] = tl._linear(arrays[f"{b}MlpBlock_3/Dense_{j}/kernel"])
        out[f"{t}{names[f'fc{j}']}.bias"] = arrays[f"{b}MlpBlock_3/Dense_{j}/bias"]


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    """Canonical (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)."""
    return np.ascontiguousarray(np.transpose(np.asarray(k), (3, 2, 0, 1)))


def _num_blocks(arrays: Mapping[str, np.ndarray]) -> int:
    return len({m[1] for k in arrays for m in [re.match(r"^Transformer/encoderblock_(\d+)/", k)] if m})


def to_dinov2(arrays: Mapping[str, np.ndarray], swiglu: bool = False) -> Dict[str, np.ndarray]:
    """Canonical arrays -> a Dinov2Model / Dinov2WithRegistersModel state dict (which has no head)."""
    if "head/kernel" in arrays:
        raise ValueError("Dinov2Model has no classification head: save a model built with include_top=False "
                         "in layout='hf', or this one with layout='timm'")
    out = {"embeddings.patch_embeddings.projection.weight": _conv_to_torch(arrays["embedding/kernel"]),
           "embeddings.patch_embeddings.projection.bias": arrays["embedding/bias"],
           "embeddings.cls_token": arrays["cls"],
           "embeddings.mask_token": np.zeros((1, arrays["embedding/bias"].shape[0]), np.float32),
           "embeddings.position_embeddings": arrays["Transformer/posembed_input/pos_embedding"]}
    if "reg" in arrays:
        out["embeddings.register_tokens"] = arrays["reg"]
    fc = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
    names = dict(ln1="norm1", ln2="norm2", query="attention.attention.query", key="attention.attention.key",
                 value="attention.attention.value", out="attention.output.dense", fc0=f"mlp.{fc[0]}",
                 fc1=f"mlp.{fc[1]}")
    for i in range(_num_blocks(arrays)):
        b, t = _BLOCK.format(i), f"encoder.layer.{i}."
        _put_block(out, arrays, b, t, names)
        for j in (0, 1):
            out[f"{t}layer_scale{j + 1}.lambda1"] = arrays[f"{b}LayerScale_{j}/scale"]
    out["layernorm.weight"] = arrays["Transformer/encoder_norm/scale"]
    out["layernorm.bias"] = arrays["Transformer/encoder_norm/bias"]
    return out


_CLIP_BLOCK_NAMES = dict(ln1="layer_norm1", ln2="layer_norm2", query="self_attn.q_proj", key="self_attn.k_proj",
                        value="self_attn.v_proj", out="self_attn.out_proj", fc0="mlp.fc1", fc1="mlp.fc2")


def _clip_like_encoder(out: Dict[str, np.ndarray], arrays: Mapping[str, np.ndarray], v: str) -> None:
    """CLIP's and SigLIP's encoder layers and post_layernorm under `v` ("vision_model."); both always
    have q/k/v biases (zeros for a qkv_bias=False model)."""
    for i in range(_num_blocks(arrays)):
        _put_block(out, arrays, _BLOCK.format(i), f"{v}encoder.layers.{i}.", _CLIP_BLOCK_NAMES, zero_qkv_bias=True)
    out[v + "post_layernorm.weight"] = arrays["Transformer/encoder_norm/scale"]
    out[v + "post_layernorm.bias"] = arrays["Transformer/encoder_norm/bias"]


def to_clip(arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Canonical arrays -> a CLIPVisionModelWithProjection state dict (CLIPVisionModel without a head).
    CLIP's patch embedding and visual_projection have no bias: a non-zero one is refused."""
    for bias in ("embedding/bias", "head/bias"):
        if bias in arrays and np.any(arrays[bias]):
            raise ValueError(f"{bias} is not zero; CLIP's layout has no bias there: save with layout='timm'")
    v, e = "vision_model.", "vision_model.embeddings."
    pe = np.asarray(arrays["Transformer/posembed_input/pos_embedding"])
    out = {e + "patch_embedding.weight": _conv_to_torch(arrays["embedding/kernel"]),
           e + "class_embedding": np.asarray(arrays["cls"]).reshape(-1),
           e + "position_embedding.weight": pe.reshape(pe.shape[-2], pe.shape[-1]),
           v + "pre_layrnorm.weight": arrays["Transformer/pre_norm/scale"],
           v + "pre_layrnorm.bias": arrays["Transformer/pre_norm/bias"]}
    _clip_like_encoder(out, arrays, v)
    if "head/kernel" in arrays:
        out["visual_projection.weight"] = tl._linear(arrays["head/kernel"])
    return out


def to_siglip(arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Canonical arrays -> a SiglipVisionModel state dict (transformers 4's names, `vision_model.*`,
    which transformers 5 reads too): no class token, the MAP head as `head.*` (none: vision_use_head
    False). What SigLIP's layout has no place for is refused."""
    extra = [k for k in ("cls", "dist", "reg", "head/kernel", "Transformer/pre_norm/scale", "fc_norm/scale") if k in arrays]
    extra += [k for k in arrays if "/LayerScale_" in k or "/query_norm/" in k][:1]
    if extra:
        raise ValueError(f"SiglipVisionModel has no {extra[0]!r} (no class token, registers, head, pre_norm, fc_norm, "
                         "LayerScale or qk-norm): save this model with layout='timm'")
    v, e = "vision_model.", "vision_model.embeddings."
    pe = np.asarray(arrays["Transformer/posembed_input/pos_embedding"])
    out = {e + "patch_embedding.weight": _conv_to_torch(arrays["embedding/kernel"]),
           e + "patch_embedding.bias": arrays["embedding/bias"],
           e + "position_embedding.weight": pe.reshape(pe.shape[-2], pe.shape[-1])}
    _clip_like_encoder(out, arrays, v)
    if _MAP + "probe" in arrays:  # nn.MultiheadAttention: q, k, v fused into in_proj
        h = v + "head."
        out[h + "probe"] = arrays[_MAP + "probe"]
        out[h + "attention.in_proj_weight"] = np.concatenate(
            [_per_head_to_linear(arrays[f"{_MAP_ATT}{n}/kernel"]) for n in ("query", "key", "value")], axis=0)
        out[h + "attention.in_proj_bias"] = np.concatenate(
            [np.asarray(arrays[f"{_MAP_ATT}{n}/bias"]).reshape(-1) for n in ("query", "key", "value")])
        out[h + "attention.out_proj.weight"] = _out_to_linear(arrays[_MAP_ATT + "out/kernel"])
        out[h + "attention.out_proj.bias"] = arrays[_MAP_ATT + "out/bias"]
        out[h + "layernorm.weight"] = arrays[_MAP + "LayerNorm_0/scale"]
        out[h + "layernorm.bias"] = arrays[_MAP + "LayerNorm_0/bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{h}mlp.{fc}.weight"] = tl._linear(arrays[f"{_MAP}MlpBlock_0/Dense_{j}/kernel"])
            out[f"{h}mlp.{fc}.bias"] = arrays[f"{_MAP}MlpBlock_0/Dense_{j}/bias"]
    return out


def hf_kind(cfg) -> str:
    """The transformers model a config is written as (save_safetensors(layout="hf"), hf_config): "clip"
    (pre_norm), "dinov2" (LayerScale, classifier "token") or "siglip" (no class token, "map" or "gap");
    ValueError naming the three for any other."""
    if cfg.pre_norm:
        return "clip"
    if cfg.layer_scale_init is not None and cfg.classifier == "token":
        return "dinov2"
    if not cfg.has_class_token and cfg.classifier in ("map", "gap") and cfg.layer_scale_init is None:
        return "siglip"
    raise ValueError("layout='hf' writes DINOv2 models (layer_scale_init, classifier 'token'), CLIP models "
                     "(pre_norm=True) and SigLIP models (class_token=False, classifier 'map' or 'gap'); save this "
                     "model with layout='timm'")


def _mlp_ratio(cfg) -> Union[int, float]:
    """Dinov2Config's mlp_ratio that gives the model's mlp_dim: an integer where one does (transformers
    >= 5 takes integers only, as the Hub's DINOv2 configs have), else the exact ratio (transformers 4)."""
    swiglu = cfg.mlp == "swiglu"  # Dinov2SwiGLUFFN derives its width from mlp_ratio

    def width(ratio):
        return _swiglu_hidden(cfg.hidden_size, ratio) if swiglu else int(cfg.hidden_size * ratio)

    whole = [r for r in range(1, 4 * max(1, -(-cfg.mlp_dim // cfg.hidden_size)) + 2) if width(r) == cfg.mlp_dim]
    if whole:
        return whole[0]
    ratio = (1.5 if swiglu else 1.0) * cfg.mlp_dim / cfg.hidden_size
    if width(ratio) != cfg.mlp_dim:
        raise ValueError(f"mlp_dim {cfg.mlp_dim} is not a width Dinov2SwiGLUFFN gives (a multiple of 8 from "
                         "hidden_size * mlp_ratio * 2 / 3)")
    log.warning("mlp_ratio %s in config.json: mlp_dim %d is no whole multiple of hidden_size %d, which "
                "transformers >= 5 requires (transformers 4 reads it)", ratio, cfg.mlp_dim, cfg.hidden_size)
    return ratio


def hf_config(cfg) -> Dict[str, Any]:
    """The transformers config.json (Dinov2Config / Dinov2WithRegistersConfig, CLIPVisionConfig or
    SiglipVisionConfig, as `hf_kind` says) of the model that `save_safetensors(model, path, layout="hf")`
    writes, so that a folder of the two loads in transformers (and back here); ValueError for what
    those configs cannot say."""
    kind = hf_kind(cfg)
    h, w = cfg.image_size
    if h != w or cfg.patch_size[0] != cfg.patch_size[1]:
        raise ValueError(f"transformers' configs take square images and patches; got image_size {h}x{w}, "
                         f"patch_size {cfg.patch_size[0]}x{cfg.patch_size[1]}")
    act = "quick_gelu" if cfg.activation == "quick_gelu" else "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu"
    out = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.num_layers,
               patch_size=cfg.patch_size[0], image_size=h, num_channels=cfg.channels, hidden_act=act,
               layer_norm_eps=cfg.layer_norm_epsilon)
    if kind == "siglip":
        out.update(model_type="siglip_vision_model", intermediate_size=cfg.mlp_dim, architectures=["SiglipVisionModel"],
                   vision_use_head=cfg.classifier == "map")
        return out
    if kind == "clip":
        out.update(model_type="clip_vision_model", intermediate_size=cfg.mlp_dim,
                   architectures=["CLIPVisionModelWithProjection" if cfg.include_top else "CLIPVisionModel"])
        if cfg.include_top:
            out["projection_dim"] = cfg.num_classes
        return out
    out.update(model_type="dinov2_with_registers" if cfg.num_registers else "dinov2", mlp_ratio=_mlp_ratio(cfg),
               layerscale_value=cfg.layer_scale_init, use_swiglu_ffn=cfg.mlp == "swiglu", qkv_bias=cfg.qkv_bias,
               architectures=["Dinov2WithRegistersModel" if cfg.num_registers else "Dinov2Model"])
    if cfg.num_registers:
        out["num_register_tokens"] = cfg.num_registers
    return out


__all__ = ["LAYOUTS", "vision_model_names", "detect", "to_canonical", "layout_fields", "config_fields",
           "preprocessing_fields", "to_dinov2", "to_clip", "to_siglip", "hf_kind", "hf_config", "resample_method",
           "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD"]
