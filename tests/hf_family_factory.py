"""Random ViT-family checkpoints in canonical names, and the same tensors as transformers' DINOv2, CLIP,
SigLIP and DeiT state dicts, written from transformers' module definitions (modeling_dinov2.py,
modeling_dinov2_with_registers.py, modeling_clip.py, modeling_siglip.py, modeling_deit.py), not from
keras_vit.weights."""
from __future__ import annotations

import json
import os

import ckpt_factory as cf
import numpy as np
from safetensors.numpy import save_file

BLOCK, ATT = "Transformer/encoderblock_{}/", "MultiHeadDotProductAttention_1/"
MAP = "MAPHead_0/"


def family_checkpoint(rng, kind, *, hidden=32, heads=2, mlp=64, layers=2, patch=4, grid=(2, 2), classes=5,
                      registers=0, swiglu=False):
    """Canonical arrays of a tiny model of `kind`: "dinov2", "clip", "siglip" or "deit"."""
    token = kind != "siglip"
    w = cf.vit_checkpoint(rng, hidden=hidden, heads=heads, mlp=mlp, layers=layers, patch=patch, grid=grid,
                          classes=classes, token=token)

    def rnd(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    if kind == "dinov2":
        del w["head/kernel"], w["head/bias"]
        for i in range(layers):
            for j in (0, 1):
                w[f"{BLOCK.format(i)}LayerScale_{j}/scale"] = 0.5 + rnd(hidden, scale=0.1)
            if swiglu:
                w[f"{BLOCK.format(i)}MlpBlock_3/Dense_0/kernel"] = rnd(hidden, 2 * mlp)
                w[f"{BLOCK.format(i)}MlpBlock_3/Dense_0/bias"] = rnd(2 * mlp)
        if registers:
            w["reg"] = rnd(1, registers, hidden)
    elif kind == "clip":
        w["embedding/bias"] = np.zeros(hidden, np.float32)  # CLIP's patch embedding has no bias
        w["head/bias"] = np.zeros(classes, np.float32)  # nor has visual_projection
        w["Transformer/pre_norm/scale"] = 1.0 + rnd(hidden, scale=0.1)
        w["Transformer/pre_norm/bias"] = rnd(hidden, scale=0.1)
    elif kind == "siglip":
        del w["head/kernel"], w["head/bias"]
        hd = hidden // heads
        w[MAP + "probe"] = rnd(1, 1, hidden)
        a = MAP + "MultiHeadDotProductAttention_0/"
        for n in ("query", "key", "value"):
            w[f"{a}{n}/kernel"], w[f"{a}{n}/bias"] = rnd(hidden, heads, hd), rnd(heads, hd)
        w[a + "out/kernel"], w[a + "out/bias"] = rnd(heads, hd, hidden), rnd(hidden)
        w[MAP + "LayerNorm_0/scale"], w[MAP + "LayerNorm_0/bias"] = 1.0 + rnd(hidden, scale=0.1), rnd(hidden)
        w[MAP + "MlpBlock_0/Dense_0/kernel"], w[MAP + "MlpBlock_0/Dense_0/bias"] = rnd(hidden, mlp), rnd(mlp)
        w[MAP + "MlpBlock_0/Dense_1/kernel"], w[MAP + "MlpBlock_0/Dense_1/bias"] = rnd(mlp, hidden), rnd(hidden)
    elif kind == "deit":
        pe = w["Transformer/posembed_input/pos_embedding"]
        w["Transformer/posembed_input/pos_embedding"] = np.concatenate([pe[:, :1], rnd(1, 1, hidden), pe[:, 1:]], 1)
        w["dist"] = rnd(1, 1, hidden)
        w["head_dist/kernel"], w["head_dist/bias"] = rnd(hidden, classes), rnd(classes)
    return w


def _lin(k):  # (in, out) -> torch Linear (out, in)
    return np.ascontiguousarray(np.asarray(k).T)


def _conv(k):  # (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)
    return np.ascontiguousarray(np.asarray(k).transpose(3, 2, 0, 1))


def _block(sd, w, i, t, names):
    b = BLOCK.format(i)
    d = w[b + ATT + "query/kernel"].shape[0]
    sd[t + names["ln1"] + ".weight"], sd[t + names["ln1"] + ".bias"] = w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"]
    sd[t + names["ln2"] + ".weight"], sd[t + names["ln2"] + ".bias"] = w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"]
    for n in ("query", "key", "value"):
        sd[t + names[n] + ".weight"] = _lin(w[b + ATT + n + "/kernel"].reshape(d, d))
        sd[t + names[n] + ".bias"] = w[b + ATT + n + "/bias"].ravel()
    sd[t + names["out"] + ".weight"] = _lin(w[b + ATT + "out/kernel"].reshape(d, d))
    sd[t + names["out"] + ".bias"] = w[b + ATT + "out/bias"]
    for j in (0, 1):
        sd[t + names[f"fc{j}"] + ".weight"] = _lin(w[f"{b}MlpBlock_3/Dense_{j}/kernel"])
        sd[t + names[f"fc{j}"] + ".bias"] = w[f"{b}MlpBlock_3/Dense_{j}/bias"]


def _layers(w):
    return len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})


def hf_dinov2(w, swiglu=False):
    """Dinov2Model (Dinov2WithRegistersModel with `reg`): Dinov2Embeddings, Dinov2Layer, layernorm."""
    d = w["embedding/bias"].shape[0]
    sd = {"embeddings.cls_token": w["cls"], "embeddings.mask_token": np.zeros((1, d), np.float32),
          "embeddings.position_embeddings": w["Transformer/posembed_input/pos_embedding"],
          "embeddings.patch_embeddings.projection.weight": _conv(w["embedding/kernel"]),
          "embeddings.patch_embeddings.projection.bias": w["embedding/bias"]}
    if "reg" in w:
        sd["embeddings.register_tokens"] = w["reg"]
    fc = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
    names = dict(ln1="norm1", ln2="norm2", query="attention.attention.query", key="attention.attention.key",
                 value="attention.attention.value", out="attention.output.dense", fc0="mlp." + fc[0],
                 fc1="mlp." + fc[1])
    for i in range(_layers(w)):
        t = f"encoder.layer.{i}."
        _block(sd, w, i, t, names)
        sd[t + "layer_scale1.lambda1"] = w[BLOCK.format(i) + "LayerScale_0/scale"]
        sd[t + "layer_scale2.lambda1"] = w[BLOCK.format(i) + "LayerScale_1/scale"]
    sd["layernorm.weight"], sd["layernorm.bias"] = w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"]
    return sd


_CLIP_NAMES = dict(ln1="layer_norm1", ln2="layer_norm2", query="self_attn.q_proj", key="self_attn.k_proj",
                   value="self_attn.v_proj", out="self_attn.out_proj", fc0="mlp.fc1", fc1="mlp.fc2")


def _tower(sd, w):
    v = "vision_model."
    pe = w["Transformer/posembed_input/pos_embedding"]
    sd[v + "embeddings.patch_embedding.weight"] = _conv(w["embedding/kernel"])
    sd[v + "embeddings.position_embedding.weight"] = pe[0]
    for i in range(_layers(w)):
        _block(sd, w, i, f"{v}encoder.layers.{i}.", _CLIP_NAMES)
    sd[v + "post_layernorm.weight"] = w["Transformer/encoder_norm/scale"]
    sd[v + "post_layernorm.bias"] = w["Transformer/encoder_norm/bias"]


def hf_clip(w, text=False):
    """CLIPVisionModelWithProjection (CLIPModel with `text`: a text tower and logit_scale too)."""
    sd = {"vision_model.embeddings.class_embedding": w["cls"].reshape(-1),
          "vision_model.pre_layrnorm.weight": w["Transformer/pre_norm/scale"],
          "vision_model.pre_layrnorm.bias": w["Transformer/pre_norm/bias"]}
    _tower(sd, w)
    sd["visual_projection.weight"] = _lin(w["head/kernel"])
    if text:
        sd["text_model.embeddings.token_embedding.weight"] = np.ones((7, 8), np.float32)
        sd["text_projection.weight"] = np.ones((5, 8), np.float32)
        sd["logit_scale"] = np.array(2.0, np.float32)
    return sd


def hf_siglip(w):
    """SiglipVisionModel: SiglipVisionEmbeddings, the encoder, post_layernorm and the MAP head (torch
    nn.MultiheadAttention: in_proj_weight = [q; k; v])."""
    sd = {"vision_model.embeddings.patch_embedding.bias": w["embedding/bias"]}
    _tower(sd, w)
    h, a = "vision_model.head.", MAP + "MultiHeadDotProductAttention_0/"
    d = w[MAP + "probe"].shape[-1]
    sd[h + "probe"] = w[MAP + "probe"]
    sd[h + "attention.in_proj_weight"] = np.concatenate([_lin(w[f"{a}{n}/kernel"].reshape(d, d))
                                                         for n in ("query", "key", "value")])
    sd[h + "attention.in_proj_bias"] = np.concatenate([w[f"{a}{n}/bias"].ravel() for n in ("query", "key", "value")])
    sd[h + "attention.out_proj.weight"] = _lin(w[a + "out/kernel"].reshape(d, d))
    sd[h + "attention.out_proj.bias"] = w[a + "out/bias"]
    sd[h + "layernorm.weight"], sd[h + "layernorm.bias"] = w[MAP + "LayerNorm_0/scale"], w[MAP + "LayerNorm_0/bias"]
    for j, fc in enumerate(("fc1", "fc2")):
        sd[f"{h}mlp.{fc}.weight"] = _lin(w[f"{MAP}MlpBlock_0/Dense_{j}/kernel"])
        sd[f"{h}mlp.{fc}.bias"] = w[f"{MAP}MlpBlock_0/Dense_{j}/bias"]
    return sd


def hf_deit(w):
    """DeiTForImageClassificationWithTeacher: deit.embeddings (cls, distillation), the ViT encoder, heads."""
    p = "deit."
    sd = {p + "embeddings.cls_token": w["cls"], p + "embeddings.distillation_token": w["dist"],
          p + "embeddings.position_embeddings": w["Transformer/posembed_input/pos_embedding"],
          p + "embeddings.patch_embeddings.projection.weight": _conv(w["embedding/kernel"]),
          p + "embeddings.patch_embeddings.projection.bias": w["embedding/bias"]}
    names = dict(ln1="layernorm_before", ln2="layernorm_after", query="attention.attention.query",
                 key="attention.attention.key", value="attention.attention.value", out="attention.output.dense",
                 fc0="intermediate.dense", fc1="output.dense")
    for i in range(_layers(w)):
        _block(sd, w, i, f"{p}encoder.layer.{i}.", names)
    sd[p + "layernorm.weight"], sd[p + "layernorm.bias"] = w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"]
    sd["cls_classifier.weight"], sd["cls_classifier.bias"] = _lin(w["head/kernel"]), w["head/bias"]
    sd["distillation_classifier.weight"] = _lin(w["head_dist/kernel"])
    sd["distillation_classifier.bias"] = w["head_dist/bias"]
    return sd


def write_folder(folder, state_dict, config, preprocessor=None):
    """A downloaded Hub model: model.safetensors and config.json (and preprocessor_config.json)."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if preprocessor is not None:
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f)
    return str(folder)


def dinov2_config(hidden=32, heads=2, layers=2, patch=4, image=8, registers=0, swiglu=False, mlp_ratio=2):
    """A Dinov2Config / Dinov2WithRegistersConfig as config.json has it."""
    c = {"model_type": "dinov2_with_registers" if registers else "dinov2", "hidden_size": hidden,
         "num_attention_heads": heads, "num_hidden_layers": layers, "mlp_ratio": mlp_ratio, "patch_size": patch,
         "image_size": image, "layerscale_value": 1.0, "use_swiglu_ffn": swiglu, "hidden_act": "gelu",
         "layer_norm_eps": 1e-6, "qkv_bias": True, "architectures": ["Dinov2Model"]}
    if registers:
        c["num_register_tokens"] = registers
    return c


def clip_vision_config(hidden=32, heads=2, layers=2, patch=4, image=8, mlp=64, projection=5):
    return {"model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": mlp,
            "num_attention_heads": heads, "num_hidden_layers": layers, "patch_size": patch, "image_size": image,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": projection,
            "architectures": ["CLIPVisionModelWithProjection"]}


def siglip_vision_config(hidden=32, heads=2, layers=2, patch=4, image=8, mlp=64):
    return {"model_type": "siglip_vision_model", "hidden_size": hidden, "intermediate_size": mlp,
            "num_attention_heads": heads, "num_hidden_layers": layers, "patch_size": patch, "image_size": image,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True,
            "architectures": ["SiglipVisionModel"]}


def deit_config(hidden=32, heads=2, layers=2, patch=4, image=8, mlp=64, classes=5):
    return {"model_type": "deit", "hidden_size": hidden, "intermediate_size": mlp, "num_attention_heads": heads,
            "num_hidden_layers": layers, "patch_size": patch, "image_size": image, "hidden_act": "gelu",
            "layer_norm_eps": 1e-6, "id2label": {str(i): f"c{i}" for i in range(classes)},
            "architectures": ["DeiTForImageClassificationWithTeacher"]}


# --- timm-layout state dicts (tests/family_factory.py) in transformers' layouts ---------------------
def _split_qkv(sd, t):
    w, b = np.asarray(sd[t + "attn.qkv.weight"]), np.asarray(sd[t + "attn.qkv.bias"])
    d = w.shape[1]
    return [(w[j * d:(j + 1) * d], b[j * d:(j + 1) * d]) for j in range(3)]


def _timm_blocks(sd, out, prefix, names):
    """timm `blocks.{i}` (norm1, fused attn.qkv, attn.proj, norm2, mlp.fc1/fc2, ls1/ls2) -> `names`."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        t, h = f"blocks.{i}.", f"{prefix}{i}."
        for ours, theirs in (("norm1", names["ln1"]), ("norm2", names["ln2"])):
            out[f"{h}{theirs}.weight"], out[f"{h}{theirs}.bias"] = sd[f"{t}{ours}.weight"], sd[f"{t}{ours}.bias"]
        for (w, b), n in zip(_split_qkv(sd, t), ("query", "key", "value")):
            out[f"{h}{names[n]}.weight"], out[f"{h}{names[n]}.bias"] = w, b
        out[f"{h}{names['out']}.weight"], out[f"{h}{names['out']}.bias"] = sd[t + "attn.proj.weight"], sd[t + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{h}{names[f'fc{j}']}.weight"] = sd[f"{t}mlp.{fc}.weight"]
            out[f"{h}{names[f'fc{j}']}.bias"] = sd[f"{t}mlp.{fc}.bias"]
        for j in (1, 2):
            if f"{t}ls{j}.gamma" in sd:
                out[f"{h}layer_scale{j}.lambda1"] = sd[f"{t}ls{j}.gamma"]


def timm_to_hf(sd, arch, family):
    """(transformers state dict, config.json, preprocessor_config.json) of a timm-layout `family`
    state dict (dinov2, dinov2_reg, clip, siglip, deit_distilled), the same model."""
    d = sd["cls_token" if "cls_token" in sd else "pos_embed"].shape[-1]
    heads, layers = arch["num_heads"], len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = arch["pos_grid"]
    common = dict(hidden_size=d, num_attention_heads=heads, num_hidden_layers=layers, patch_size=patch,
                  image_size=grid[0] * patch, layer_norm_eps=arch["eps"])
    pre = {"image_mean": list(arch["mean"]), "image_std": list(arch["std"])}
    out = {}
    if family.startswith("dinov2"):
        pos = np.asarray(sd["pos_embed"])
        if arch["no_embed_class"]:  # timm folds the class slot away; transformers keeps a (zero) one
            pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        out.update({"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": pos,
                    "embeddings.mask_token": np.zeros((1, d), np.float32),
                    "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
                    "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]})
        if "reg_token" in sd:
            out["embeddings.register_tokens"] = sd["reg_token"]
        _timm_blocks(sd, out, "encoder.layer.", dict(
            ln1="norm1", ln2="norm2", query="attention.attention.query", key="attention.attention.key",
            value="attention.attention.value", out="attention.output.dense", fc0="mlp.fc1", fc1="mlp.fc2"))
        out["layernorm.weight"], out["layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
        mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
        config = dict(common, model_type="dinov2_with_registers" if "reg_token" in sd else "dinov2",
                      mlp_ratio=mlp / d, layerscale_value=1.0, use_swiglu_ffn=False, hidden_act="gelu")
        if "reg_token" in sd:
            config["num_register_tokens"] = sd["reg_token"].shape[1]
        return out, config, pre
    if family in ("clip", "siglip"):
        v = "vision_model."
        out[v + "embeddings.patch_embedding.weight"] = sd["patch_embed.proj.weight"]
        if "patch_embed.proj.bias" in sd:
            out[v + "embeddings.patch_embedding.bias"] = sd["patch_embed.proj.bias"]
        out[v + "embeddings.position_embedding.weight"] = np.asarray(sd["pos_embed"])[0]
        if "cls_token" in sd:
            out[v + "embeddings.class_embedding"] = np.asarray(sd["cls_token"]).reshape(-1)
        if "norm_pre.weight" in sd:
            out[v + "pre_layrnorm.weight"], out[v + "pre_layrnorm.bias"] = sd["norm_pre.weight"], sd["norm_pre.bias"]
        _timm_blocks(sd, out, v + "encoder.layers.", _CLIP_NAMES)
        out[v + "post_layernorm.weight"], out[v + "post_layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
        mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
        if family == "clip":
            assert not np.any(sd["head.bias"])  # visual_projection has no bias
            out["visual_projection.weight"] = sd["head.weight"]
            config = dict(common, model_type="clip_vision_model", intermediate_size=mlp, hidden_act="quick_gelu",
                          projection_dim=sd["head.weight"].shape[0])
            return out, config, pre
        h = v + "head."
        out[h + "probe"] = sd["attn_pool.latent"]
        out[h + "attention.in_proj_weight"] = np.concatenate([sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"]])
        out[h + "attention.in_proj_bias"] = np.concatenate([sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"]])
        out[h + "attention.out_proj.weight"], out[h + "attention.out_proj.bias"] = (
            sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"])
        out[h + "layernorm.weight"], out[h + "layernorm.bias"] = sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"]
        for fc in ("fc1", "fc2"):
            out[f"{h}mlp.{fc}.weight"], out[f"{h}mlp.{fc}.bias"] = sd[f"attn_pool.mlp.{fc}.weight"], sd[f"attn_pool.mlp.{fc}.bias"]
        act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[arch["act"]]
        config = dict(common, model_type="siglip_vision_model", intermediate_size=mlp, hidden_act=act,
                      vision_use_head=True)
        return out, config, pre
    assert family == "deit_distilled"
    p = "deit."
    out.update({p + "embeddings.cls_token": sd["cls_token"], p + "embeddings.distillation_token": sd["dist_token"],
                p + "embeddings.position_embeddings": sd["pos_embed"],
                p + "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
                p + "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]})
    _timm_blocks(sd, out, p + "encoder.layer.", dict(
        ln1="layernorm_before", ln2="layernorm_after", query="attention.attention.query", key="attention.attention.key",
        value="attention.attention.value", out="attention.output.dense", fc0="intermediate.dense", fc1="output.dense"))
    out[p + "layernorm.weight"], out[p + "layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    out["cls_classifier.weight"], out["cls_classifier.bias"] = sd["head.weight"], sd["head.bias"]
    out["distillation_classifier.weight"], out["distillation_classifier.bias"] = sd["head_dist.weight"], sd["head_dist.bias"]
    classes = sd["head.weight"].shape[0]
    config = dict(common, model_type="deit", intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
                  hidden_act="gelu", id2label={str(i): f"c{i}" for i in range(classes)})
    return out, config, pre
