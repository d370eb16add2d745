"""timm checkpoints of the ViT family (issue #26): DeiT distilled, DeiT-III, DINOv2 with and
without registers, CLIP, SigLIP, a SwiGLU + qk-norm ("EVA-like") tower and SoViT-150M reg4 MAP
(registers with position rows, MAP pooling over the patch tokens), written in timm's
layout by tests/family_factory.py, loaded with `keras_vit.ViT(weights=path)` and compared with
the independent NumPy reference of timm's forward (tests/reference_family.py), at the native
image size and at another one (position embeddings resampled with torch's bicubic, as timm does).
"""
from __future__ import annotations

import json
import logging

import ckpt_factory as cf
import family_factory as ff
import numpy as np
import pytest
import reference_family as rf
import reference_vit as rv
from safetensors.numpy import load_file, save_file
from test_torch_weights import timm_state_dict

import keras_vit
from keras_vit.config import ViTConfig
from keras_vit.vit import build_with_weights
from keras_vit.weights import checkpoints, torch_layout
from keras_vit.weights.resize import interpolation_matrix

TOL = 1e-4  # max |diff| relative to max |reference|
FAMILIES = list(ff.FAMILIES)
GRID, OTHER = (4, 4), (20, 24)  # 16 px (4 x 4 patches of 4) and a non-square size (5 x 6 patches)
# What a file without config.json cannot say: the heads (fused qkv), CLIP's activation and epsilon,
# the preprocessing (the factory's families are given their timm normalisation).
HINTS = {"clip": dict(activation="quick_gelu", layer_norm_epsilon=1e-5)}


def _images(size, seed=0, n=2):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype(np.float32)


def _rel(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def write_family(folder, family, config_json=True, seed=0):
    """The family's timm state dict as folder/model.safetensors (+ timm's config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd, arch, config = ff.family_state_dict(np.random.default_rng(seed), family, grid=GRID)
    path = folder / "model.safetensors"
    save_file(sd, str(path))
    if config_json:
        (folder / "config.json").write_text(json.dumps(config))
    return str(path), sd, arch, config


def _arguments(family, config_json):
    """What ViT() needs besides weights= for a file without config.json."""
    if config_json:
        return {}
    sd, arch, _ = ff.family_state_dict(np.random.default_rng(0), family, grid=GRID)
    mean, std = arch["mean"], arch["std"]
    out = dict(HINTS.get(family, {}), pixel_mean=tuple(mean), pixel_std=tuple(std))
    if "blocks.0.attn.q_norm.weight" not in sd:
        out["num_heads"] = arch["num_heads"]
    return out


def _has_head(sd):
    return "head.weight" in sd


# --- the reference itself -------------------------------------------------------------------
def test_reference_is_the_plain_vit_reference_on_a_plain_timm_vit(tmp_path):
    """On a plain ViT the family reference and tests/reference_vit.py (from the official flax
    code, .npz layout) agree: the two read the same weights in two layouts."""
    arrays = cf.vit_checkpoint(np.random.default_rng(1))
    npz = cf.write(tmp_path / "w.npz", arrays)
    x = _images((8, 8), seed=2)
    arch = dict(num_heads=2, act="gelu_tanh")
    np.testing.assert_allclose(rf.forward(timm_state_dict(arrays), arch, x), rv.forward(npz, x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (6, 4), (37, 16), (16, 37), (5, 5), (2, 7)])
def test_torch_bicubic_is_keras_vit_bicubic(n_in, n_out):
    """torch's bicubic (align_corners=False), written from its definition, is keras-vit's "bicubic"
    without antialias and its "bicubic_antialias" with (timm >= 1.0's resample_abs_pos_embed, the
    default for timm files); the official "linear" (scipy zoom, corners aligned) is neither."""
    for method, antialias in (("bicubic", False), ("bicubic_antialias", True)):
        np.testing.assert_allclose(interpolation_matrix(n_in, n_out, method),
                                   rf.torch_bicubic_matrix(n_in, n_out, antialias), rtol=0, atol=1e-12)
    if n_in != n_out:
        assert not np.allclose(interpolation_matrix(n_in, n_out, "linear"), rf.torch_bicubic_matrix(n_in, n_out))
        assert not np.allclose(rf.torch_bicubic_matrix(n_in, n_out), rf.torch_bicubic_matrix(n_in, n_out, True))


# --- the layout (no model) -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_timm_layout_round_trips_exactly(family):
    sd, arch, _ = ff.family_state_dict(np.random.default_rng(3), family)
    back = torch_layout.to_timm(torch_layout.from_timm(sd, arch["num_heads"]), no_embed_class=arch["no_embed_class"])
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


# The options the arrays show, for each family (without config.json).
SHAPE_OPTIONS = {
    "deit_distilled": dict(distilled=True, classifier="token"),
    "deit3": dict(layer_scale_init=1e-5, classifier="token"),
    "dinov2": dict(layer_scale_init=1e-5, classifier="token"),
    "dinov2_reg": dict(layer_scale_init=1e-5, num_registers=4, classifier="token"),
    "clip": dict(pre_norm=True, classifier="token"),
    "siglip": dict(classifier="map"),
    "eva_like": dict(mlp="swiglu", mlp_dim=64, qk_norm=True, num_heads=2, fc_norm=True, classifier="gap",
                     class_token=True, layer_scale_init=1e-5),
    "so150m_reg_map": dict(classifier="map", num_registers=4, register_pos_embedding=True, pool_include_prefix=False),
    "so150m2_reg_gap": dict(classifier="gap", num_registers=1, register_pos_embedding=True, qkv_bias=False,
                            layer_scale_init=1e-5),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_options_read_from_the_arrays_and_from_config_json(tmp_path, family):
    path, sd, arch, config = write_family(tmp_path / "bare", family, config_json=False)
    d = checkpoints.read_checkpoint(path).defaults
    assert {k: d.get(k) for k in SHAPE_OPTIONS[family]} == SHAPE_OPTIONS[family]
    assert d["image_size"] == (16, 16) and d["hidden_size"] == 32 and d["gelu_approximate"] is False
    assert ("num_heads" in d) == (family == "eva_like")  # fused qkv hides the heads; qk-norm's width shows them
    path, *_ = write_family(tmp_path / "with_config", family, config_json=True)
    d = checkpoints.read_checkpoint(path).defaults
    assert d["num_heads"] == 2 and "variant" not in d  # model_args' sizes replace the name's B/16
    half = arch["mean"] == (0.5,) * 3  # SigLIP's: keras-vit's default [-1, 1] inputs, nothing to set
    assert (d.get("pixel_mean"), d.get("pixel_std")) == ((None, None) if half else (arch["mean"], arch["std"]))
    if family == "clip":
        assert d["activation"] == "quick_gelu" and d["layer_norm_epsilon"] == 1e-5
    if family == "siglip":
        assert d["class_token"] is False and d["classifier"] == "map"


@pytest.mark.parametrize("name,tag,expected", [
    ("vit_small_patch14_dinov2", "lvd142m", dict(variant="S/14", image_size=518, layer_scale_init=1e-5)),
    ("vit_small_patch14_reg4_dinov2", "lvd142m", dict(variant="S/14", image_size=518, layer_scale_init=1e-5,
                                                      num_registers=4)),
    ("deit_base_distilled_patch16_224", "fb_in1k", dict(variant="B/16", image_size=224, distilled=True)),
    ("deit_small_patch16_224", "fb_in1k", dict(variant="S/16", image_size=224)),
    ("deit3_base_patch16_224", "fb_in22k_ft_in1k", dict(variant="B/16", image_size=224, layer_scale_init=1e-6)),
    ("vit_base_patch16_clip_224", "openai", dict(variant="B/16", image_size=224, pre_norm=True,
                                                 layer_norm_epsilon=1e-5, activation="quick_gelu")),
    ("vit_base_patch16_clip_224", "laion2b", dict(variant="B/16", image_size=224, pre_norm=True,
                                                  layer_norm_epsilon=1e-5)),
    ("vit_base_patch16_clip_quickgelu_224", "metaclip_2pt5b", dict(variant="B/16", image_size=224, pre_norm=True,
                                                                   layer_norm_epsilon=1e-5,
                                                                   activation="quick_gelu")),
    ("vit_base_patch16_siglip_224", "webli", dict(variant="B/16", image_size=224, classifier="map",
                                                  class_token=False)),
    ("vit_base_patch16_384", "augreg2_in21k_ft_in1k", dict(variant="B/16", image_size=384)),
    ("vit_base_r50_s16_384", "orig_in21k_ft_in1k", dict(variant="R50+B/16", image_size=384)),
    ("deit3_medium_patch16_224", "fb_in1k", dict(num_heads=8, patch_size=16, image_size=224,
                                                 layer_scale_init=1e-6)),
    # The shape-optimised sizes: their heads (a fused qkv does not show them), the rest from the arrays
    ("vit_so400m_patch14_siglip_384", "webli", dict(num_heads=16, patch_size=14, image_size=384, classifier="map",
                                                    class_token=False)),
    ("vit_so150m2_patch16_reg1_gap_256", "sbb_e200_in12k_ft_in1k", dict(num_heads=13, patch_size=16, image_size=256,
                                                                        num_registers=1)),
    ("vit_so150m_patch16_reg4_map_256", "sbb_e250_in12k_ft_in1k", dict(num_heads=14, patch_size=16, image_size=256,
                                                                       num_registers=4)),
])
def test_timm_architecture_names(name, tag, expected):
    assert checkpoints._timm_arch(name, tag) == expected


# --- the model ---------------------------------------------------------------------------------
def _build(path, family, config_json, **kw):
    sd = load_file(path)
    kw = {**_arguments(family, config_json), **kw}
    if not _has_head(sd):
        kw["include_top"] = False
    return keras_vit.ViT(weights=path, **kw)


@pytest.mark.parametrize("config_json", [True, False], ids=["config_json", "bare"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_logits_match_the_reference(tmp_path, family, config_json):
    path, sd, arch, _ = write_family(tmp_path, family, config_json)
    model = _build(path, family, config_json)
    cfg = model.vit_config
    assert cfg.image_size == (16, 16)
    x = _images((16, 16))
    want = rf.forward(sd, arch, x)
    got = model.predict(x, verbose=0)
    assert got.shape == want.shape
    assert _rel(got, want) <= TOL, (family, _rel(got, want))
    # Another (non-square) size: the position embeddings resampled as timm >= 1.0 does (bicubic, antialias).
    x = _images(OTHER, seed=1)
    other = _build(path, family, config_json, image_size=OTHER)
    assert _rel(other.predict(x, verbose=0), rf.forward(sd, dict(arch, antialias=True), x)) <= TOL, family


def test_resampling_methods_at_another_size(tmp_path):
    """At another size a timm file is resampled as timm >= 1.0 does by default (bicubic with
    antialias); method="bicubic" gives torch's bicubic without (older timm); the official "linear"
    gives other logits (measured here on DeiT-III: a few percent of the logits' scale)."""
    path, sd, arch, _ = write_family(tmp_path, "deit3")
    cfg = keras_vit.ViT(weights=path).vit_config.replace(image_size=OTHER)
    x = _images(OTHER, seed=1)
    timm_aa, timm_plain = rf.forward(sd, dict(arch, antialias=True), x), rf.forward(sd, arch, x)
    assert _rel(build_with_weights(cfg, path).predict(x, verbose=0), timm_aa) <= TOL
    assert _rel(build_with_weights(cfg, path, method="bicubic").predict(x, verbose=0), timm_plain) <= TOL
    assert _rel(build_with_weights(cfg, path, method="linear").predict(x, verbose=0), timm_aa) > 10 * TOL
    assert _rel(timm_plain, timm_aa) > 10 * TOL


@pytest.mark.parametrize("family", ["siglip", "dinov2_reg"])
def test_a_loaded_model_keeps_its_checkpoints_resampling(tmp_path, family):
    """A timm file's model keeps timm's resampling (bicubic with antialias) as its pos_interpolation:
    resize_model, dynamic_model and ViT(weights=..., image_size=None) then give what the load at that
    size gives, timm's logits with dynamic_img_size=True; the model's own safetensors keep it."""
    path, sd, arch, _ = write_family(tmp_path / "in", family)
    model = keras_vit.ViT(weights=path)
    assert model.vit_config.pos_interpolation == "bicubic_antialias"
    x = _images(OTHER, seed=1)
    want = rf.forward(sd, dict(arch, antialias=True), x)
    assert _rel(keras_vit.ViT(weights=path, image_size=OTHER).predict(x, verbose=0), want) <= TOL
    assert _rel(keras_vit.resize_model(model, OTHER).predict(x, verbose=0), want) <= TOL
    assert _rel(keras_vit.dynamic_model(model).predict(x, verbose=0), want) <= TOL
    assert _rel(keras_vit.ViT(weights=path, image_size=None).predict(x, verbose=0), want) <= TOL
    assert _rel(keras_vit.resize_model(model, OTHER, method="linear").predict(x, verbose=0), want) > 10 * TOL
    keras_vit.save_safetensors(model, str(tmp_path / "mine.safetensors"))
    again = keras_vit.ViT(weights=str(tmp_path / "mine.safetensors"), num_heads=model.vit_config.num_heads)
    assert again.vit_config.pos_interpolation == "bicubic_antialias"
    trained_here = keras_vit.ViT(config=model.vit_config.replace(pos_interpolation="linear"))
    keras_vit.save_safetensors(trained_here, str(tmp_path / "linear.safetensors"))
    assert keras_vit.ViT(weights=str(tmp_path / "linear.safetensors")).vit_config.pos_interpolation == "linear"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_safetensors_writes_timm_layout_back(tmp_path, family):
    path, sd, arch, _ = write_family(tmp_path / "in", family)
    model = _build(path, family, True)
    out = str(tmp_path / "out.safetensors")
    keras_vit.save_safetensors(model, out)
    back = load_file(out)
    assert sorted(back) == sorted(sd)  # timm's names, options included
    for k, v in sd.items():  # DeiT-III and DINOv2-reg too: pos_embed without the prefix rows (no_embed_class)
        np.testing.assert_allclose(back[k], v, rtol=0, atol=1e-7, err_msg=k)
    x = _images((16, 16))
    again = keras_vit.ViT(weights=out, include_top=_has_head(sd))
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6)
    assert _rel(rf.forward(back, arch, x), rf.forward(sd, arch, x)) <= 1e-6  # timm's own architecture reads it


def test_save_safetensors_no_embed_class_chooses_the_position_table(tmp_path):
    """A DeiT-III fine-tuned in keras-vit (its class row no longer zero) is written with the class row
    (timm's vit_*) by default, without it (folded into cls_token) with no_embed_class=True (timm's
    deit3_*): the same logits either way; no_embed_class=False keeps a loaded DeiT-III's zero row."""
    path, sd, arch, _ = write_family(tmp_path / "in", "deit3")
    model = keras_vit.ViT(weights=path)
    table = next(v for v in model.weights if v.path.endswith("pos_embedding"))
    table.assign(np.asarray(table.value) + 0.05)  # "fine-tuned": every row moved, the class row too
    x = _images((16, 16))
    want = model.predict(x, verbose=0)
    for choice, rows, timm_arch in ((None, 17, dict(arch, no_embed_class=False)), (True, 16, arch),
                                    (False, 17, dict(arch, no_embed_class=False))):
        out = str(tmp_path / f"{choice}.safetensors")
        keras_vit.save_safetensors(model, out, no_embed_class=choice)
        back = load_file(out)
        assert back["pos_embed"].shape[1] == rows, choice
        assert _rel(rf.forward(back, timm_arch, x), want) <= 1e-5, choice
        assert _rel(keras_vit.ViT(weights=out).predict(x, verbose=0), want) <= 1e-5, choice
    with pytest.raises(ValueError, match="no_embed_class must be None, True or False"):
        keras_vit.save_safetensors(model, str(tmp_path / "bad.safetensors"), no_embed_class="yes")


# --- malformed and mismatched checkpoints ---------------------------------------------------------
def _one_line(exc):
    assert "\n" not in str(exc.value), str(exc.value)
    return str(exc.value)


def test_missing_register_tokens_are_named(tmp_path):
    path, sd, _, config = write_family(tmp_path, "dinov2_reg")
    del sd["reg_token"]
    save_file(sd, path)
    with pytest.raises(ValueError) as exc:
        keras_vit.ViT(weights=path, include_top=False)
    assert "missing keys (1): reg" in _one_line(exc)


def test_wrong_head_count_is_one_line(tmp_path):
    path, sd, _, config = write_family(tmp_path, "eva_like")
    with pytest.raises(ValueError) as exc:  # qk-norm's width says 2 heads
        keras_vit.ViT(weights=path, num_heads=4)
    assert "num_heads=4" in _one_line(exc) and "q_norm" in str(exc.value)
    path, sd, _, config = write_family(tmp_path / "siglip", "siglip")
    with pytest.raises(ValueError) as exc:  # 32 is not divisible by 3 heads
        keras_vit.ViT(weights=path, num_heads=3, include_top=False)
    assert "num_heads" in _one_line(exc)


@pytest.mark.parametrize("keys", [
    ["text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight"],
    ["transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight", "ln_final.weight"],
])
def test_a_clip_text_tower_is_refused_in_one_line(tmp_path, keys):
    path = str(tmp_path / "text.safetensors")
    save_file({k: np.zeros((4, 4), np.float32) for k in keys}, path)
    with pytest.raises(ValueError) as exc:
        keras_vit.ViT(weights=path)
    assert "text tower" in _one_line(exc)


def test_nothing_is_half_loaded(tmp_path):
    """A checkpoint that does not fit leaves the model's weights as they were."""
    path, sd, _, _ = write_family(tmp_path, "deit3")
    model = keras_vit.ViT(weights=path)
    before = [w.numpy().copy() for w in model.weights]
    del sd["blocks.1.ls2.gamma"]
    save_file(sd, path)
    with pytest.raises(ValueError, match="LayerScale_1"):
        keras_vit.load_weights(model, path)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


@pytest.mark.parametrize("config_json", [True, False], ids=["config_json", "bare"])
def test_a_headless_timm_file_is_a_feature_tower(tmp_path, caplog, config_json):
    """No `head.weight` (timm's num_classes=0: DINOv2, SigLIP towers): the model has no head either,
    as for the HF layouts' headless models; num_classes= gives it a new one."""
    path, *_ = write_family(tmp_path, "dinov2", config_json)
    kw = _arguments("dinov2", config_json)
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        model = keras_vit.ViT(weights=path, **kw)
    assert not model.vit_config.include_top and model.output.shape == (None, 32)
    assert "untrained" not in caplog.text
    tuned = keras_vit.ViT(weights=path, num_classes=10, **kw)
    assert tuned.vit_config.include_top and tuned.output.shape == (None, 10)


# --- parameter counts of the real architectures -------------------------------------------------
B16 = dict(hidden=768, heads=12, mlp=3072, layers=12, patch=16)
S14, B14 = dict(hidden=384, heads=6, mlp=1536, layers=12, patch=14), dict(hidden=768, heads=12, mlp=3072, layers=12,
                                                                              patch=14)
# (family, timm name, sizes, patch grid, classes (0: no head), "Params (M)" of timm's model card or None where
# no card could be found to confirm it)
REAL = [
    ("dinov2", "vit_small_patch14_dinov2", S14, (37, 37), 0, 22.1),
    ("dinov2_reg", "vit_small_patch14_reg4_dinov2", S14, (37, 37), 0, 22.1),
    ("dinov2", "vit_base_patch14_dinov2", B14, (37, 37), 0, 86.6),
    ("deit_distilled", "deit_base_distilled_patch16_224", B16, (14, 14), 1000, 87.3),
    ("deit3", "deit3_base_patch16_224", B16, (14, 14), 1000, None),
    ("clip", "vit_base_patch16_clip_224", B16, (14, 14), 512, None),
    ("siglip", "vit_base_patch16_siglip_256", B16, (16, 16), 0, 92.9),
    ("siglip", "vit_base_patch16_siglip_384", B16, (24, 24), 0, 93.2),
    ("siglip", "vit_base_patch16_siglip_512", B16, (32, 32), 0, 93.5),
    ("siglip", "vit_base_patch16_siglip_gap_512", B16, (32, 32), 0, 86.4),
    # 136,059,560 in timm 1.0.31's own vit_so150m2_patch16_reg1_gap_256 (counted once; no card found)
    ("so150m2_reg_gap", "vit_so150m2_patch16_reg1_gap_256", dict(hidden=832, heads=13, mlp=2176, layers=21, patch=16),
     (16, 16), 1000, None),
]


@pytest.mark.parametrize("family,name,sizes,grid,classes,card", REAL, ids=[r[1] for r in REAL])
def test_parameter_counts_are_timms(family, name, sizes, grid, classes, card):
    """ViTConfig.count_params() (analytic, no weights) of the architecture as its timm name
    configures it equals the size of timm's state dict of it (the factory's shapes, from timm's
    modules) and, where one was found, the Params (M) of timm's model card."""
    sd, _, _ = ff.family_state_dict(None, family, grid=grid, classes=max(classes, 1), shapes_only=True, **sizes)
    if "_gap_" in name:  # SigLIP with average pooling: no attention pool
        sd = {k: v for k, v in sd.items() if not k.startswith("attn_pool.")}
    if not classes:  # feature towers: timm's num_classes=0
        sd = {k: v for k, v in sd.items() if not k.startswith("head")}
    fields = checkpoints._timm_arch(name, "openai" if family == "clip" else "")
    assert fields["image_size"] == grid[0] * sizes["patch"] or fields["image_size"] == 518
    if "variant" in fields:
        cfg = keras_vit.vit.build_config(fields.pop("variant"), **fields, num_classes=max(classes, 1),
                                         include_top=bool(classes))
    else:  # a size of its own (so150m2): the sizes, and the options its model_args set
        cfg = ViTConfig(**{**SHAPE_OPTIONS[family], **fields}, hidden_size=sizes["hidden"], mlp_dim=sizes["mlp"],
                        num_layers=sizes["layers"], num_classes=max(classes, 1), include_top=bool(classes))
    assert isinstance(cfg, ViTConfig) and cfg.grid_size == grid
    # keras-vit holds a (zero) class row where timm's no_embed_class stores none, and a (zero)
    # patch-embedding bias where timm's CLIP has none (bias=not pre_norm): D parameters each.
    spec = ff.FAMILIES[family]
    extra = sizes["hidden"] * (int(bool(spec.get("no_embed_class"))) + int(bool(spec.get("pre_norm"))))
    assert cfg.count_params() == ff.count(sd) + extra
    if card is not None:
        assert round(ff.count(sd) / 1e6, 1) == card


# --- CLIP image towers in OpenAI's and open_clip's layouts ------------------------------------------
def _openai_visual(sd):
    """timm's CLIP tower in OpenAI CLIP's own names (clip/model.py VisionTransformer), plus a text tower."""
    out = {"visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.class_embedding": sd["cls_token"].reshape(-1),
           "visual.positional_embedding": sd["pos_embed"][0], "visual.proj": np.ascontiguousarray(sd["head.weight"].T),
           "token_embedding.weight": np.zeros((8, 4), np.float32), "logit_scale": np.zeros((), np.float32)}
    for ours, theirs in (("norm_pre", "ln_pre"), ("norm", "ln_post")):
        out[f"visual.{theirs}.weight"], out[f"visual.{theirs}.bias"] = sd[f"{ours}.weight"], sd[f"{ours}.bias"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        t, o = f"blocks.{i}.", f"visual.transformer.resblocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{o}{theirs}.weight"], out[f"{o}{theirs}.bias"] = sd[f"{t}{ours}.weight"], sd[f"{t}{ours}.bias"]
        out[o + "attn.in_proj_weight"], out[o + "attn.in_proj_bias"] = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        out[f"transformer.resblocks.{i}.attn.in_proj_weight"] = np.zeros((12, 4), np.float32)  # the text tower's
        i += 1
    return out


def test_openai_clip_visual_tower_loads_with_its_activation_and_normalisation(tmp_path):
    _, sd, arch, _ = write_family(tmp_path / "timm", "clip", config_json=False)
    path = str(tmp_path / "openai.safetensors")
    save_file(_openai_visual(sd), path)
    model = keras_vit.ViT(weights=path, num_heads=2)  # QuickGELU, eps 1e-5, OpenAI mean/std: from the layout
    x = _images((16, 16))
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= TOL


def test_open_clip_timm_trunk_loads(tmp_path):
    _, sd, arch, config = write_family(tmp_path / "timm", "siglip", config_json=False)
    path = str(tmp_path / "open_clip.safetensors")
    save_file({**{"visual.trunk." + k: v for k, v in sd.items()},
               "text.token_embedding.weight": np.zeros((8, 4), np.float32)}, path)
    model = keras_vit.ViT(weights=path, num_heads=2, include_top=False, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3)
    x = _images((16, 16))
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= TOL


# --- JAX ------------------------------------------------------------------------------------------
@pytest.mark.jax
@pytest.mark.slow  # a JAX process and seven models: ~60 s on 2 cores
def test_families_give_the_reference_logits_on_jax(tmp_path):
    """Every family, loaded on TensorFlow and rebuilt from its config on JAX (one worker process)."""
    pytest.importorskip("jax")
    from tests.backend_worker import outputs_on

    x = _images((16, 16))
    models, expected = {}, {}
    for family in FAMILIES:
        path, sd, arch, _ = write_family(tmp_path / family, family)
        models[family] = _build(path, family, True)
        expected[family] = rf.forward(sd, arch, x)
    out = outputs_on("jax", models, x, tmp_path)
    for family in FAMILIES:
        assert _rel(out[family], expected[family]) <= TOL, family


def test_position_rows_for_register_tokens_are_kept(tmp_path):
    """timm's no_embed_class=False with registers (vit_so150m_patch16_reg4_map_256) gives registers
    position rows: kept, and the model gets register_pos_embedding (with a class token too, whose
    row comes first); without those rows (DINOv2-reg) the registers have none."""
    sd, arch, _ = ff.family_state_dict(np.random.default_rng(4), "dinov2_reg")
    sd["pos_embed"] = np.random.default_rng(5).normal(0, 0.2, (1, 16 + 1 + 4, 32)).astype(np.float32)
    assert torch_layout.from_timm(sd, 2)[torch_layout.POSEMB].shape == (1, 21, 32)
    path = str(tmp_path / "reg_rows.safetensors")
    save_file(sd, path)
    model = keras_vit.ViT(weights=path, num_heads=2, include_top=False, pixel_mean=ff.IMAGENET[0],
                          pixel_std=ff.IMAGENET[1])
    cfg = model.vit_config
    assert cfg.register_pos_embedding and cfg.num_pos_prefix_tokens == 5 and cfg.image_size == (16, 16)
    x = _images((16, 16))
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, dict(arch, no_embed_class=False), x)) <= TOL
    with pytest.raises(ValueError, match="register_pos_embedding=True gives register tokens position embeddings"):
        ViTConfig(register_pos_embedding=True)


def test_normalisation_follows_the_channels(tmp_path):
    """A timm file with ImageNet's mean/std built for one or four channels: the kernel is adapted
    (timm's adapt_input_conv) and so is the per-channel normalisation (mean over RGB / RGB repeated)."""
    path, *_ = write_family(tmp_path, "deit3")
    grey = keras_vit.ViT(weights=path, channels=1).vit_config
    assert grey.pixel_mean == pytest.approx((np.mean(ff.IMAGENET[0]),)) and len(grey.pixel_std) == 1
    rgbd = keras_vit.ViT(weights=path, channels=4).vit_config
    assert rgbd.pixel_mean == ff.IMAGENET[0] + ff.IMAGENET[0][:1] and rgbd.pixel_std == ff.IMAGENET[1] + ff.IMAGENET[1][:1]


def test_map_head_mlp_takes_the_models_activation(tmp_path):
    """timm's AttentionPoolLatent gets the model's act_layer: a SigLIP-style MAP tower with QuickGELU
    (config.json's act_layer) computes its pooling MLP with QuickGELU too."""
    path, sd, arch, config = write_family(tmp_path, "siglip")
    config["model_args"]["act_layer"] = "quick_gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = keras_vit.ViT(weights=path)
    assert model.vit_config.activation == "quick_gelu" and model.vit_config.classifier == "map"
    x = _images((16, 16))
    want = rf.forward(sd, dict(arch, act="quick_gelu"), x)
    assert _rel(model.predict(x, verbose=0), want) <= TOL
    # The pooling MLP's activation alone separates the two: with GELU there the features differ.
    feats = rf.tokens(sd, dict(arch, act="quick_gelu"), x)
    gelu_pool = rf.attention_pool(feats, sd, dict(arch, act="gelu"))
    assert _rel(gelu_pool, want) > 10 * TOL


# --- what timm's config.json says, and what it leaves to the architecture -------------------------
def test_timm_save_for_hf_config_of_a_class_token_free_model(tmp_path):
    """timm's save_for_hf writes the arguments given to create_model: global_pool="map" without the
    class_token=False of the SigLIP architecture. The arrays (no cls_token) settle it."""
    path, sd, arch, config = write_family(tmp_path, "siglip")
    del config["model_args"]["class_token"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    x = _images((16, 16))
    model = keras_vit.ViT(weights=str(tmp_path))
    assert not model.vit_config.has_class_token
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= TOL


@pytest.mark.parametrize("family", ["dinov2", "deit3"])
def test_a_non_square_grid_whose_table_looks_square(tmp_path, family):
    """3x5 patches and a class row are 16 = 4x4 rows (DINOv2), 15 rows without it (DeiT-III): the image
    size in config.json decides, where the shape alone reads a 4x4 table without a class row (wrong)."""
    folder = tmp_path / family
    folder.mkdir()
    sd, arch, config = ff.family_state_dict(np.random.default_rng(3), family, grid=(3, 5))
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    x = _images((12, 20), seed=4)
    model = keras_vit.ViT(weights=str(folder))
    assert model.vit_config.image_size == (12, 20)
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= TOL


def test_a_class_token_free_file_at_a_grid_one_patch_smaller(tmp_path):
    """SigLIP's 4x4 table at 3x5 patches (15 = 16 - 1 rows): the checkpoint's own grid says the table has
    no class row (was: 'pos_embedding (1, 16, 32) vs model (1, 15, 32)'); timm's resampled logits."""
    path, sd, arch, _ = write_family(tmp_path, "siglip")
    x = _images((12, 20), seed=5)
    want = rf.forward(sd, dict(arch, antialias=True), x)
    assert _rel(keras_vit.ViT(weights=path, image_size=(12, 20)).predict(x, verbose=0), want) <= TOL
    assert _rel(keras_vit.resize_model(keras_vit.ViT(weights=path), (12, 20)).predict(x, verbose=0), want) <= TOL


@pytest.mark.parametrize("args, said", [
    (dict(global_pool="max"), "global_pool='max' is not a keras-vit classifier"),
    (dict(global_pool="avgmax"), "global_pool='avgmax' is not a keras-vit classifier"),
    (dict(global_pool="avg", pool_include_prefix=True), "pool_include_prefix=True"),
])
def test_timm_poolings_keras_vit_does_not_compute_are_refused(tmp_path, args, said):
    """Not a model that pools otherwise (was: loaded as 'gap', logits 0.2-0.5 off timm's)."""
    path, sd, arch, config = write_family(tmp_path, "eva_like")
    config["model_args"].update(args)
    config["global_pool"] = args["global_pool"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as exc:
        keras_vit.ViT(weights=str(tmp_path))
    assert said in _one_line(exc) and repr(str(tmp_path)) in str(exc.value)


def test_a_pytorch_pickle_is_named(tmp_path):
    """torch.save's zip archive (data.pkl inside) and its legacy pickle: one line saying what it is and
    what to do, never unpickled (was: read as an .npz, 198 missing keys)."""
    import pickle
    import zipfile

    archive = tmp_path / "model.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("model/data.pkl", pickle.dumps({"a": 1}))
        z.writestr("model/version", "3\n")
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    for path in (archive, legacy):
        with pytest.raises(ValueError) as exc:
            keras_vit.ViT(weights=str(path), num_heads=2)
        assert "is a PyTorch pickle" in _one_line(exc) and ".safetensors" in str(exc.value), path
