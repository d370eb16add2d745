"""The vision_transformer (.npz) checkpoint layout: big_vision names brought to it, and what its
array shapes say about the model.

Every checkpoint is first brought to the vision_transformer layout ("canonical" names):
`embedding/kernel`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, Dense_1}`, `Transformer/encoder_norm`, `pre_logits`, `head`, and for the
hybrid `conv_root`, `gn_root`, `block{n}/unit{m}/{conv,gn}{1,2,3,_proj}`. big_vision names
(`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, top-level `pos_embedding`
without the class slot), the scanned `Transformer/encoderblock` stack and the `params/` /
`opt/target/` prefixes are converted. Our position-embedding extras use
`Transformer/posembed_input/{row,col,prefix}_embedding` ("learned_2d") and
`.../MultiHeadDotProductAttention_1/relative_embedding` ("relative").
timm and Hugging Face names are brought to the same layout by `keras_vit.weights.torch_layout`.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from keras_vit.config import VARIANTS

_PREFIXES = ("opt/target/", "params/")
POSEMB = "Transformer/posembed_input/pos_embedding"
# The one non-weight entry save_npz adds: keras-vit's config and class names as a 0-d unicode
# (JSON) array. Official readers look weights up by name (timm) or drop extras (vision_transformer).
METADATA_KEY = "__keras_vit__"
_BIG_VISION_BLOCK = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                     "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_GN_RE = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")


def canonicalize(arrays: Mapping[str, np.ndarray], prefix: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], bool]:
    """Arrays under vision_transformer names, and whether the position embeddings came in the
    big_vision way (added before the class token, so without its slot). keras-vit's metadata
    entry is not a weight: it is left out."""
    arrays = {k: v for k, v in arrays.items() if k != METADATA_KEY}
    if prefix is None:
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in arrays)), "")
    if prefix:
        arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    out: Dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        if k.startswith("Transformer/encoderblock/"):  # big_vision scan: leading layer axis
            rest = k[len("Transformer/encoderblock/"):]
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
        else:
            out[k] = v
    if any(re.match(r"Transformer/encoderblock_\d+/MlpBlock_0/", k) for k in out):
        renamed = {}
        for k, v in out.items():
            parts = k.split("/")
            if len(parts) > 2 and parts[1].startswith("encoderblock_"):
                parts[2] = _BIG_VISION_BLOCK.get(parts[2], parts[2])
            renamed["/".join(parts)] = v
        out = renamed
    big_vision_posemb = False
    for old in ("pos_embedding", "Transformer/pos_embedding"):
        if old in out:
            out[POSEMB] = out.pop(old)
            big_vision_posemb = True
    for k in list(out):
        if _GN_RE.search(k):  # pre-linen flax stored GroupNorm params as (1, 1, 1, C)
            out[k] = out[k].reshape(-1)
    return out, big_vision_posemb


# --- what the shapes say ----------------------------------------------------------------
_RESNET_DEPTH = {(3, 4, 9): 50, (3, 4, 6, 3): 50, (2, 2, 2, 2): 26}


def _paper_variant(hidden: int, mlp: int, layers: int) -> Optional[str]:
    for name, v in VARIANTS.items():
        if (v["hidden_size"], v["mlp_dim"], v["num_layers"]) == (hidden, mlp, layers):
            return name
    return None


# LayerScale's initial gain: not in a checkpoint (only the trained gains are); DINOv2's value.
LAYER_SCALE_INIT = 1e-5


def family_defaults(arrays: Mapping[str, np.ndarray], hidden: int) -> Dict[str, Any]:
    """The ViT-family options (issue #26) that canonical arrays show by their names and shapes,
    only where they differ from the defaults: LayerScale, no query/key/value biases, qk-norm (which also gives the heads),
    SwiGLU (Dense_0 twice Dense_1's input), tokens, pre_norm, fc_norm and the classifier."""
    out: Dict[str, Any] = {}
    b = "Transformer/encoderblock_0/"
    if b + "LayerScale_0/scale" in arrays:
        out["layer_scale_init"] = LAYER_SCALE_INIT
    if b + "MultiHeadDotProductAttention_1/query/kernel" in arrays and \
            b + "MultiHeadDotProductAttention_1/query/bias" not in arrays:
        out["qkv_bias"] = False
    qn = arrays.get(b + "MultiHeadDotProductAttention_1/query_norm/scale")
    if qn is not None and qn.shape[-1] and hidden % int(qn.shape[-1]) == 0:
        out.update(qk_norm=True, num_heads=hidden // int(qn.shape[-1]))
    dense0, dense1 = arrays.get(b + "MlpBlock_3/Dense_0/kernel"), arrays.get(b + "MlpBlock_3/Dense_1/kernel")
    if dense0 is not None and dense1 is not None and int(dense0.shape[-1]) == 2 * int(dense1.shape[0]):
        out.update(mlp="swiglu", mlp_dim=int(dense1.shape[0]))
    cls = "cls" in arrays
    if "MAPHead_0/probe" in arrays:
        out["classifier"] = "map"
    else:  # timm normalises after pooling (fc_norm) for its average pooling
        out["classifier"] = "token" if cls and "fc_norm/scale" not in arrays else "gap"
    if cls and out["classifier"] != "token":
        out["class_token"] = True
    reg = arrays.get("reg")
    if reg is not None and reg.ndim == 3:
        out["num_registers"] = int(reg.shape[1])
    for name, field in (("dist", "distilled"), ("Transformer/pre_norm/scale", "pre_norm"),
                        ("fc_norm/scale", "fc_norm")):
        if name in arrays:
            out[field] = True
    return out


def shape_defaults(arrays: Mapping[str, np.ndarray], big_vision_posemb: bool = False) -> Dict[str, Any]:
    """The ViTConfig fields that canonical arrays pin down: sizes, classes, pre-logits, classifier,
    the family's options (`family_defaults`), image size (from a square position-embedding grid)
    and the paper's variant when one fits."""
    out: Dict[str, Any] = {}
    emb = arrays.get("embedding/kernel")
    if emb is None or emb.ndim != 4:
        return out
    ph, pw, _, hidden = (int(n) for n in emb.shape)
    out.update(hidden_size=hidden, patch_size=(ph, pw))
    layers = len({m[1] for k in arrays for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
    if layers:
        out["num_layers"] = layers
    dense0 = arrays.get("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")
    if dense0 is not None:
        out["mlp_dim"] = int(dense0.shape[-1])
    q = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if q is not None and q.ndim == 3 and q.shape[1] > 1:
        out["num_heads"] = int(q.shape[1])
    out.update(family_defaults(arrays, hidden))
    stride = 1
    units: Dict[int, int] = {}
    for k in arrays:
        m = re.match(r"block(\d+)/unit(\d+)/", k)
        if m:
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]))
    if units and "conv_root/kernel" in arrays:
        out["resnet_layers"] = tuple(units[s] for s in sorted(units))
        out["resnet_width"] = max(1, int(arrays["conv_root/kernel"].shape[-1]) // 64)
        stride = 4 * 2 ** (len(units) - 1)
    head = arrays.get("head/kernel")
    if head is not None:
        out["num_classes"] = int(head.shape[-1])
    pre = arrays.get("pre_logits/kernel")
    out["representation_size"] = None if pre is None else int(pre.shape[-1])
    pe = arrays.get(POSEMB)
    if pe is not None:
        n = int(pe.shape[-2])
        prefix = int("cls" in arrays) + int("dist" in arrays)
        n -= prefix if (prefix and not big_vision_posemb and int(np.sqrt(n)) ** 2 != n) else 0
        regs = out.get("num_registers", 0)
        if regs and int(np.sqrt(n)) ** 2 != n and n > regs and int(np.sqrt(n - regs)) ** 2 == n - regs:
            n -= regs  # rows for the registers too (timm's no_embed_class=False with reg_tokens)
            out["register_pos_embedding"] = True
        g = int(round(np.sqrt(n)))
        if g * g == n:
            out["image_size"] = (g * ph * stride, g * pw * stride)
    size = _paper_variant(hidden, out.get("mlp_dim", -1), layers)
    if size is not None and ph == pw:
        depth = _RESNET_DEPTH.get(out.get("resnet_layers")) if "resnet_layers" in out else None
        if "resnet_layers" not in out or (depth is not None and out.get("resnet_width") == 1):
            out["variant"] = (f"R{depth}+" if depth else "") + f"{size}/{ph * stride}"
            out.setdefault("num_heads", VARIANTS[size]["num_heads"])
    return out
