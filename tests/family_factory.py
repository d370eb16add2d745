"""Random state dicts of timm's ViT family in timm's own layout (names and torch shapes written
from timm's module definitions, not from keras_vit), with the `arch` that tests/reference_family.py
needs and the config.json timm writes next to the weights (`architecture`, `model_args`,
`pretrained_cfg`). Tiny sizes by default; `shapes_only` gives the full-size shapes for counting."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# family: timm architecture (+ pretrained tag), the model's options and its preprocessing.
FAMILIES = {
    "deit_distilled": dict(architecture="deit_base_distilled_patch16_224", tag="fb_in1k", dist=True, head=True,
                           norm=IMAGENET),
    "deit3": dict(architecture="deit3_base_patch16_224", tag="fb_in1k", ls=1e-6, no_embed_class=True, head=True,
                  norm=IMAGENET),
    "dinov2": dict(architecture="vit_small_patch14_dinov2", tag="lvd142m", ls=1e-5, norm=IMAGENET),
    "dinov2_reg": dict(architecture="vit_small_patch14_reg4_dinov2", tag="lvd142m", ls=1e-5, reg=4,
                       no_embed_class=True, norm=IMAGENET),
    "clip": dict(architecture="vit_base_patch16_clip_224", tag="openai", pre_norm=True, act="quick_gelu", eps=1e-5,
                 head=True, zero_head_bias=True, norm=OPENAI),
    "siglip": dict(architecture="vit_base_patch16_siglip_224", tag="webli", cls=False, pool="map", norm=HALF),
    "eva_like": dict(architecture="vit_base_patch16_swiglu_qknorm_224", tag="", ls=1e-5, mlp="swiglu", qk_norm=True,
                     pool="avg", fc_norm=True, head=True, norm=IMAGENET),
    # SoViT-150M reg4 MAP: registers with position rows (no_embed_class=False) and timm >= 1.0's MAP
    # pooling over the patch tokens alone (pool_include_prefix=False, its default).
    # SoViT-150M v2: no query/key/value biases (qkv_bias=False), one register with a position row,
    # LayerScale, average pooling.
    "so150m2_reg_gap": dict(architecture="vit_so150m2_patch16_reg1_gap_256", tag="sbb_e200_in12k_ft_in1k", cls=False,
                            reg=1, ls=1e-5, qkv_bias=False, pool="avg", head=True, norm=HALF),
    "so150m_reg_map": dict(architecture="vit_so150m_patch16_reg4_map_256", tag="sbb_e250_in12k_ft_in1k", cls=False,
                           reg=4, pool="map", pool_include_prefix=False, head=True, norm=HALF),
}


def family_state_dict(rng, family: str, *, hidden: int = 32, heads: int = 2, mlp: int = 64, layers: int = 2,
                      patch: int = 4, grid: Tuple[int, int] = (4, 4), classes: int = 5, channels: int = 3,
                      shapes_only: bool = False) -> Tuple[Dict[str, np.ndarray], dict, dict]:
    """(state dict, reference arch, timm config.json) for `family` of FAMILIES."""
    spec = FAMILIES[family]
    sd: Dict[str, np.ndarray] = {}

    def put(name, *shape, scale=0.2, base=0.0):
        if shapes_only:
            sd[name] = np.empty(shape, np.float32)
        else:
            sd[name] = (base + rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(name, width):
        put(name + ".weight", width, scale=0.1, base=1.0)
        put(name + ".bias", width, scale=0.1)

    def linear(name, n_out, n_in, bias=True):
        put(name + ".weight", n_out, n_in, scale=0.7 / np.sqrt(n_in))
        if bias:
            put(name + ".bias", n_out, scale=0.05)

    d, n = hidden, grid[0] * grid[1]
    put("patch_embed.proj.weight", d, channels, patch, patch, scale=0.05)
    if not spec.get("pre_norm"):  # timm: bias=not pre_norm (CLIP)
        put("patch_embed.proj.bias", d, scale=0.1)
    cls = spec.get("cls", True)
    prefix = int(cls) + int(spec.get("dist", False))
    if cls:
        put("cls_token", 1, 1, d)
    if spec.get("dist"):
        put("dist_token", 1, 1, d)
    if spec.get("reg"):
        put("reg_token", 1, spec["reg"], d)
    put("pos_embed", 1, n + (0 if spec.get("no_embed_class") else prefix + spec.get("reg", 0)), d)
    if spec.get("pre_norm"):
        norm("norm_pre", d)
    swiglu = spec.get("mlp") == "swiglu"
    for i in range(layers):
        t = f"blocks.{i}."
        norm(t + "norm1", d)
        linear(t + "attn.qkv", 3 * d, d, bias=spec.get("qkv_bias", True))
        if spec.get("qk_norm"):
            norm(t + "attn.q_norm", d // heads)
            norm(t + "attn.k_norm", d // heads)
        linear(t + "attn.proj", d, d)
        norm(t + "norm2", d)
        linear(t + "mlp.fc1", 2 * mlp if swiglu else mlp, d)
        linear(t + "mlp.fc2", d, mlp)
        if spec.get("ls"):  # random gains (not the init value) so that a dropped LayerScale shows
            put(t + "ls1.gamma", d, scale=0.3, base=0.5)
            put(t + "ls2.gamma", d, scale=0.3, base=0.5)
    if spec.get("fc_norm"):
        norm("fc_norm", d)
    else:
        norm("norm", d)
    if spec.get("pool") == "map":
        put("attn_pool.latent", 1, 1, d)
        linear("attn_pool.q", d, d)
        linear("attn_pool.kv", 2 * d, d)
        linear("attn_pool.proj", d, d)
        norm("attn_pool.norm", d)
        linear("attn_pool.mlp.fc1", mlp, d)
        linear("attn_pool.mlp.fc2", d, mlp)
    if spec.get("head"):
        linear("head", classes, d)
        if spec.get("zero_head_bias") and not shapes_only:
            sd["head.bias"] = np.zeros_like(sd["head.bias"])
        if spec.get("dist"):
            linear("head_dist", classes, d)
    mean, std = spec["norm"]
    pool = spec.get("pool", "token")
    arch = dict(num_heads=heads, act=spec.get("act", "gelu"), mlp=spec.get("mlp", "mlp"), global_pool=pool,
                no_embed_class=spec.get("no_embed_class", False), eps=spec.get("eps", 1e-6), mean=mean[:channels],
                std=std[:channels], pos_grid=grid, pool_include_prefix=spec.get("pool_include_prefix", True))
    size = (grid[0] * patch, grid[1] * patch)
    model_args = dict(embed_dim=d, depth=layers, num_heads=heads, patch_size=patch, img_size=list(size),
                      mlp_ratio=(2 * mlp if swiglu else mlp) / d)
    for key, arg in (("ls", "init_values"), ("reg", "reg_tokens"), ("no_embed_class", "no_embed_class"),
                     ("pre_norm", "pre_norm"), ("qk_norm", "qk_norm"), ("fc_norm", "fc_norm")):
        if spec.get(key):
            model_args[arg] = spec[key]
    if spec.get("qkv_bias") is False:
        model_args["qkv_bias"] = False
    if not cls:
        model_args["class_token"] = False
    if pool != "token":
        model_args["global_pool"] = pool
    num_classes = classes if spec.get("head") else 0
    config = dict(architecture=spec["architecture"], num_classes=num_classes, num_features=d, global_pool=pool,
                  model_args=model_args,
                  pretrained_cfg=dict(tag=spec["tag"], input_size=[channels, *size], mean=list(mean), std=list(std),
                                      num_classes=num_classes, interpolation="bicubic"))
    return sd, arch, config


def count(sd: Dict[str, np.ndarray]) -> int:
    """Parameters of a state dict."""
    return int(sum(int(np.prod(v.shape)) for v in sd.values()))
