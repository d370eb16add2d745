"""The Hugging Face layouts of the ViT family (DINOv2 with and without registers, CLIP, SigLIP, DeiT):
tensor names, what their config.json says, the presets and save_safetensors(layout="hf").

The HF state dicts are written by tests/hf_family_factory.py from transformers' module definitions;
the converted arrays must be exactly the canonical arrays they were written from.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hf_family_factory import (
    MAP,
    clip_vision_config,
    deit_config,
    dinov2_config,
    family_checkpoint,
    hf_clip,
    hf_deit,
    hf_dinov2,
    hf_siglip,
    siglip_vision_config,
    write_folder,
)
from safetensors.numpy import load_file

from keras_vit.weights import hf_layout
from keras_vit.weights.checkpoints import FAMILY, PUBLISHED, read_checkpoint


def _same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


CASES = {
    "hf-dinov2": (dict(kind="dinov2"), hf_dinov2),
    "hf-dinov2-reg": (dict(kind="dinov2", registers=4), hf_dinov2),
    "hf-dinov2-swiglu": (dict(kind="dinov2", swiglu=True), lambda w: hf_dinov2(w, swiglu=True)),
    "hf-clip": (dict(kind="clip"), hf_clip),
    "hf-siglip": (dict(kind="siglip"), hf_siglip),
    "hf-deit": (dict(kind="deit"), hf_deit),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_to_canonical_is_exact(case):
    kw, write = CASES[case]
    w = family_checkpoint(np.random.default_rng(0), **kw)
    sd = write(w)
    assert hf_layout.layout_of(sd) == "-".join(case.split("-")[:2])
    _same(hf_layout.any_to_canonical(sd, num_heads=2), w)


def test_clip_model_takes_the_vision_tower(caplog):
    w = family_checkpoint(np.random.default_rng(1), "clip")
    with caplog.at_level("INFO", logger="keras_vit"):
        _same(hf_layout.any_to_canonical(hf_clip(w, text=True), num_heads=2), w)
    assert "vision tower is taken" in caplog.text


def test_text_tower_alone_is_one_clear_line(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "text.safetensors")
    save_file({"text_model.embeddings.token_embedding.weight": np.ones((4, 8), np.float32)}, path)
    with pytest.raises(ValueError) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and "text tower" in str(err.value) and path in str(err.value)
    with pytest.raises(ValueError, match="text tower"):
        hf_layout.config_fields({"model_type": "clip_text_model", "hidden_size": 8})


def test_deit_without_teacher_gives_the_class_token_logits():
    """DeiTForImageClassification: one head on the class token -> head = 2 W, head_dist = 0, whose
    average over the two tokens is W x_cls + b."""
    w = family_checkpoint(np.random.default_rng(2), "deit")
    sd = hf_deit(w)
    sd["classifier.weight"], sd["classifier.bias"] = sd.pop("cls_classifier.weight"), sd.pop("cls_classifier.bias")
    del sd["distillation_classifier.weight"], sd["distillation_classifier.bias"]
    out = hf_layout.any_to_canonical(sd, num_heads=2)
    x_cls, x_dist = np.random.default_rng(3).standard_normal((2, 32))
    got = ((x_cls @ out["head/kernel"] + out["head/bias"]) + (x_dist @ out["head_dist/kernel"] + out["head_dist/bias"])) / 2
    np.testing.assert_allclose(got, x_cls @ w["head/kernel"] + w["head/bias"], rtol=1e-6, atol=1e-6)


def test_dinov2_for_image_classification_is_refused():
    w = family_checkpoint(np.random.default_rng(4), "dinov2")
    sd = {"dinov2." + k: v for k, v in hf_dinov2(w).items()}
    sd["classifier.weight"], sd["classifier.bias"] = np.zeros((3, 64), np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="class token and the mean patch token"):
        hf_layout.any_to_canonical(sd, num_heads=2)


# --- config.json ------------------------------------------------------------------------------------
def test_dinov2_config_fields():
    got = hf_layout.config_fields(dinov2_config(hidden=1536, heads=24, layers=40, patch=14, image=518,
                                                swiglu=True, mlp_ratio=4, registers=4))
    # Dinov2SwiGLUFFN: (int(1536 * 4 * 2 / 3) + 7) // 8 * 8 = 4096 per half (DINOv2 ViT-g/14)
    assert got == dict(hidden_size=1536, num_heads=24, num_layers=40, layer_norm_epsilon=1e-6, image_size=518,
                       patch_size=14, gelu_approximate=False, layer_scale_init=1.0, mlp="swiglu", mlp_dim=4096,
                       num_registers=4)
    assert hf_layout.config_fields(dinov2_config(hidden=384, mlp_ratio=4))["mlp_dim"] == 1536


def test_clip_and_siglip_config_fields():
    clip = {"model_type": "clip", "projection_dim": 5, "text_config": {"hidden_size": 8},
            "vision_config": {k: v for k, v in clip_vision_config().items() if k != "model_type"}}
    got = hf_layout.config_fields(clip)
    assert got["activation"] == "quick_gelu" and got["layer_norm_epsilon"] == 1e-5 and got["mlp_dim"] == 64
    siglip = hf_layout.config_fields(siglip_vision_config())
    assert siglip["classifier"] == "map" and siglip["gelu_approximate"] is True
    assert hf_layout.config_fields(dict(siglip_vision_config(), vision_use_head=False))["classifier"] == "gap"
    assert hf_layout.config_fields({"model_type": "bert"}) == {}


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-reg", "clip", "siglip", "deit"])
def test_local_folder_says_the_whole_architecture(tmp_path, kind):
    """A folder with config.json + model.safetensors (as the Hub has it) fixes every option."""
    rng = np.random.default_rng(5)
    if kind.startswith("dinov2"):
        reg = 4 if kind == "dinov2-reg" else 0
        w = family_checkpoint(rng, "dinov2", registers=reg)
        folder = write_folder(tmp_path / kind, hf_dinov2(w), dinov2_config(registers=reg),
                              {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})
        want = dict(layer_scale_init=1.0, classifier="token", include_top=False, mlp_dim=64,
                    pixel_mean=hf_layout.IMAGENET_MEAN, pixel_std=hf_layout.IMAGENET_STD)
        if reg:
            want["num_registers"] = 4
    elif kind == "clip":
        folder = write_folder(tmp_path / kind, hf_clip(family_checkpoint(rng, "clip")), clip_vision_config())
        want = dict(pre_norm=True, activation="quick_gelu", num_classes=5, classifier="token",
                    pixel_mean=hf_layout.CLIP_MEAN, layer_norm_epsilon=1e-5)
    elif kind == "siglip":
        folder = write_folder(tmp_path / kind, hf_siglip(family_checkpoint(rng, "siglip")), siglip_vision_config(),
                              {"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
        want = dict(classifier="map", include_top=False, gelu_approximate=True, pixel_mean=None)
    else:
        folder = write_folder(tmp_path / kind, hf_deit(family_checkpoint(rng, "deit")), deit_config())
        want = dict(distilled=True, num_classes=5, classifier="token", class_names=[f"c{i}" for i in range(5)])
    d = read_checkpoint(folder).defaults
    assert d["hidden_size"] == 32 and d["num_heads"] == 2 and d["num_layers"] == 2
    assert tuple(np.broadcast_to(d["patch_size"], 2)) == (4, 4) and tuple(np.broadcast_to(d["image_size"], 2)) == (8, 8)
    for k, v in want.items():
        assert d.get(k) == v, (k, d.get(k), v)


def test_no_config_the_names_still_say_the_options(tmp_path):
    """A bare .safetensors file: the layout's tensor names give the options, the shapes the sizes."""
    from safetensors.numpy import save_file

    w = family_checkpoint(np.random.default_rng(6), "dinov2", registers=2, swiglu=True)
    path = str(tmp_path / "dinov2.safetensors")
    save_file(hf_dinov2(w, swiglu=True), path)
    d = read_checkpoint(path).defaults
    assert d["mlp"] == "swiglu" and d["mlp_dim"] == 64 and d["num_registers"] == 2 and d["include_top"] is False
    deit = str(tmp_path / "deit.safetensors")
    save_file(hf_deit(family_checkpoint(np.random.default_rng(7), "deit")), deit)
    assert tuple(read_checkpoint(deit).defaults["image_size"]) == (8, 8)  # 2 x 2 patches + class + distillation


# --- save_safetensors(layout="hf") at the array level -----------------------------------------------
@pytest.mark.parametrize("kind", ["dinov2", "dinov2-reg", "dinov2-swiglu", "clip"])
def test_to_hf_is_the_factory_layout(kind):
    w = family_checkpoint(np.random.default_rng(8), "clip" if kind == "clip" else "dinov2",
                          registers=4 if kind == "dinov2-reg" else 0, swiglu=kind == "dinov2-swiglu")
    if kind == "clip":
        _same(hf_layout.to_clip(w), hf_clip(w))
    else:
        _same(hf_layout.to_dinov2(w, swiglu=kind == "dinov2-swiglu"), hf_dinov2(w, swiglu=kind == "dinov2-swiglu"))


def test_to_clip_refuses_a_bias_clip_lacks():
    w = family_checkpoint(np.random.default_rng(9), "clip")
    w["embedding/bias"] = np.ones_like(w["embedding/bias"])
    with pytest.raises(ValueError, match="embedding/bias is not zero"):
        hf_layout.to_clip(w)


# --- presets ----------------------------------------------------------------------------------------
def test_family_presets_are_well_formed():
    assert set(FAMILY) <= set(PUBLISHED)
    for name, entry in FAMILY.items():
        assert entry.url.startswith("hf://") and entry.interpolation == "bicubic" and entry.source, name
        assert entry.timm_params and 0 < entry.crop_pct <= 1, name
        assert entry.url.startswith("hf://timm/" + name) or "siglip" in name, name
    assert FAMILY["vit_small_patch14_dinov2.lvd142m"].defaults()["include_top"] is False
    assert FAMILY["deit_base_distilled_patch16_224"].defaults()["distilled"] is True


def test_siglip_map_head_names_are_big_vision_s():
    w = family_checkpoint(np.random.default_rng(10), "siglip")
    assert {k for k in w if k.startswith(MAP)} == {
        MAP + "probe", MAP + "LayerNorm_0/scale", MAP + "LayerNorm_0/bias",
        *(f"{MAP}MultiHeadDotProductAttention_0/{n}/{p}" for n in ("query", "key", "value", "out")
          for p in ("kernel", "bias")),
        *(f"{MAP}MlpBlock_0/Dense_{j}/{p}" for j in (0, 1) for p in ("kernel", "bias"))}


# --- end to end: an HF-layout folder gives the timm-layout reference logits ------------------------
HF_FAMILIES = ("dinov2", "dinov2_reg", "clip", "siglip", "deit_distilled")
REL = 1e-4


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


def _hf_folder(tmp_path, family, **sizes):
    import family_factory as ff
    from hf_family_factory import timm_to_hf

    sd, arch, _ = ff.family_state_dict(np.random.default_rng(11), family, **sizes)
    if family == "siglip":  # SigLIP's towers compute the tanh GELU (gelu_pytorch_tanh)
        arch = dict(arch, act="gelu_tanh")
    hf_sd, config, pre = timm_to_hf(sd, arch, family)
    return write_folder(tmp_path / family, hf_sd, config, pre), sd, arch


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_folder_gives_the_reference_logits(tmp_path, family):
    """`ViT(weights=folder)` with nothing else: the architecture, options and preprocessing all come
    from config.json / preprocessor_config.json / the tensor names."""
    import reference_family as rf

    import keras_vit

    folder, sd, arch = _hf_folder(tmp_path, family)
    x = np.random.default_rng(12).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    model = keras_vit.ViT(weights=folder)
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= REL
    if family == "deit_distilled":
        assert model.class_names == [f"c{i}" for i in range(5)]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transformers_5_vision_model_without_its_prefix(tmp_path, family):
    """transformers >= 5 saves CLIPVisionModel and SiglipVisionModel without `vision_model.` (checked
    against transformers 5.25's save_pretrained): the same model as the prefixed names give."""
    import keras_vit

    folder, _, _ = _hf_folder(tmp_path / "prefixed", family)
    prefixed = load_file(f"{folder}/model.safetensors")
    bare = {k[len("vision_model."):]: v for k, v in prefixed.items() if k.startswith("vision_model.")}
    with open(f"{folder}/config.json") as f, open(f"{folder}/preprocessor_config.json") as g:
        other = write_folder(tmp_path / "bare", bare, json.load(f), json.load(g))
    x = np.random.default_rng(14).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    want = keras_vit.ViT(weights=folder, include_top=False).predict(x, verbose=0)
    model = keras_vit.ViT(weights=other)
    assert not model.vit_config.include_top  # CLIPVisionModel has no visual_projection
    np.testing.assert_array_equal(model.predict(x, verbose=0), want)


def test_dinov2_without_qkv_biases_loads_and_writes_back(tmp_path):
    """Dinov2Config(qkv_bias=False): no query/key/value biases in the file, none in the model
    (qkv_bias=False, from the tensors), and none written back, with config.json saying so (checked
    once both ways against transformers 5.25's Dinov2Model: 4e-7)."""
    import reference_family as rf

    import keras_vit

    folder, sd, arch = _hf_folder(tmp_path / "with", "dinov2")
    hf = load_file(f"{folder}/model.safetensors")
    bare = {k: v for k, v in hf.items() if not re.search(r"attention\.attention\.(query|key|value)\.bias$", k)}
    assert len(hf) - len(bare) == 3 * 2
    with open(f"{folder}/config.json") as f, open(f"{folder}/preprocessor_config.json") as g:
        other = write_folder(tmp_path / "without", bare, dict(json.load(f), qkv_bias=False), json.load(g))
    model = keras_vit.ViT(weights=other)
    assert model.vit_config.qkv_bias is False
    x = np.random.default_rng(16).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    timm_sd = {k: v for k, v in sd.items() if not k.endswith("attn.qkv.bias")}
    assert _rel(model.predict(x, verbose=0), rf.forward(timm_sd, arch, x)) <= REL
    out = tmp_path / "saved"
    out.mkdir()
    keras_vit.weights.save_safetensors(model, str(out / "model.safetensors"), layout="hf")
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(bare)
    assert hf_layout.hf_config(model.vit_config)["qkv_bias"] is False


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg"])
def test_dinov2_37x37_table_resampled_to_16x16(tmp_path, family):
    """DINOv2's 518 px table (37 x 37 patches) loaded for a 16 x 16 grid: resampled as transformers'
    interpolate_pos_encoding does (torch's bicubic; with antialias for Dinov2WithRegistersModel)."""
    import reference_family as rf

    import keras_vit

    folder, sd, arch = _hf_folder(tmp_path, family, hidden=16, layers=1, patch=2, grid=(37, 37))
    assert keras_vit.weights.read_checkpoint(folder).defaults["image_size"] == 74  # config.json's
    model = keras_vit.ViT(weights=folder, image_size=32)
    assert tuple(model.get_layer("posembed_input").pos_embedding.shape) == (1, 1 + 16 * 16, 16)
    x = np.random.default_rng(13).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want = rf.forward(sd, dict(arch, antialias=family == "dinov2_reg"), x)
    assert _rel(model.predict(x, verbose=0), want) <= REL
    other = rf.forward(sd, dict(arch, antialias=family != "dinov2_reg"), x)
    assert _rel(other, want) > 10 * REL  # the two resamplings differ: the test tells them apart


@pytest.mark.parametrize("family", ["dinov2_reg", "clip", "siglip"])
def test_save_safetensors_hf_layout_round_trips(tmp_path, family):
    """A model loaded from an HF folder, saved with layout="hf": the same tensors as the folder's
    (DINOv2's mask_token is written as zeros), and it loads back to the same logits."""
    from safetensors.numpy import load_file

    import keras_vit

    folder, _, _ = _hf_folder(tmp_path, family)
    model = keras_vit.ViT(weights=folder)
    path = keras_vit.weights.save_safetensors(model, str(tmp_path / "out.safetensors"), layout="hf")
    _same(load_file(path), load_file(f"{folder}/model.safetensors"))
    x = np.random.default_rng(14).uniform(0, 255, (1, 16, 16, 3)).astype(np.float32)
    again = keras_vit.ViT(weights=path)
    np.testing.assert_array_equal(again.predict(x, verbose=0), model.predict(x, verbose=0))


def test_save_safetensors_hf_layout_refuses_what_it_cannot_write(tmp_path):
    import keras_vit

    model = keras_vit.ViT(config=keras_vit.ViTConfig(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                                                     patch_size=4, image_size=8))
    with pytest.raises(ValueError, match="layout='hf' writes DINOv2 models"):
        keras_vit.weights.save_safetensors(model, str(tmp_path / "x.safetensors"), layout="hf")
    # SigLIP-like (no class token, MAP) with a head SiglipVisionModel has no place for
    siglip = keras_vit.ViT(config=keras_vit.ViTConfig(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                                                      patch_size=4, image_size=8, classifier="map", class_token=False))
    with pytest.raises(ValueError, match="SiglipVisionModel has no 'head/kernel'"):
        keras_vit.weights.save_safetensors(siglip, str(tmp_path / "x.safetensors"), layout="hf")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="layout must be 'timm' or 'hf'"):
        keras_vit.weights.save_safetensors(model, str(tmp_path / "x.safetensors"), layout="onnx")


# Where keras-vit's model has more parameters than timm's module, and why.
_EXTRA = {"deit3_base_patch16_224": 768,  # no_embed_class: a zero class slot in the position table
          "vit_small_patch14_reg4_dinov2.lvd142m": 384, "vit_base_patch14_reg4_dinov2.lvd142m": 768,  # likewise
          "vit_base_patch16_clip_224.openai": 768}  # a zero patch-embedding bias (timm: bias=not pre_norm)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_preset_parameter_counts_are_timms(name):
    from keras_vit.config import parse_variant

    entry = FAMILY[name]
    d = entry.defaults()
    cfg = parse_variant(d.pop("variant"), **d)
    assert cfg.count_params() == entry.timm_params + _EXTRA.get(name, 0)


# --- fine-tuning and probes from them --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family, option", [("dinov2_reg", "--freeze-backbone"), ("siglip", "--layer-decay")])
def test_vitcli_train_from_an_hf_checkpoint(tmp_path, family, option):
    """`vitcli train --weights FOLDER` alone takes the checkpoint's model (its options included) and a
    new head for the dataset; a linear probe leaves every backbone weight as loaded."""
    import json

    from click.testing import CliRunner

    import keras_vit
    from keras_vit.cli.main import cli
    from keras_vit.weights import model_arrays

    folder, _, _ = _hf_folder(tmp_path, family)
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--epochs", "1", "--weights", folder, "--output", str(run),
            "--jit", "none", "--mixed-precision", "none", option] + (["0.75"] if option == "--layer-decay" else [])
    if family == "siglip":  # a model option beside the checkpoint keeps the checkpoint's model
        args += ["--model-option", "attention_dropout_rate=0.1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output[-2000:]
    trained = keras_vit.load_model(run / "model.keras")
    cfg = trained.vit_config
    assert cfg.num_classes == 10 and cfg.include_top and cfg.hidden_size == 32 and cfg.image_size == (16, 16)
    if family == "dinov2_reg":
        assert cfg.num_registers == 4 and cfg.layer_scale_init == 1.0 and cfg.pixel_mean == hf_layout.IMAGENET_MEAN
        start = model_arrays(keras_vit.ViT(weights=folder, num_classes=10))
        end = model_arrays(trained)
        for k in start:
            if not k.startswith("head/"):
                np.testing.assert_array_equal(start[k], end[k], err_msg=k)
    else:
        assert cfg.classifier == "map" and cfg.gelu_approximate and cfg.attention_dropout_rate == 0.1
    with open(run / "config.json") as f:
        assert json.load(f)["train"]["variant"] == "checkpoint"


def test_vitcli_fewshot_from_an_hf_checkpoint(tmp_path):
    """A linear probe on frozen features in one command: `vitcli fewshot --model FOLDER`."""
    import json

    from click.testing import CliRunner

    from keras_vit.cli.main import cli

    folder, _, _ = _hf_folder(tmp_path, "dinov2")
    result = CliRunner().invoke(cli, ["fewshot", "--model", folder, "--dataset", "digits", "--shots", "5",
                                      "--draws", "1", "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    out = json.loads(result.output[result.output.index("{"):])
    assert out["model"] == folder and 0 <= out["shots"]["5"]["mean"] <= 1


# --- preprocessing of the presets ------------------------------------------------------------------
def test_timm_resize_and_centre_crop():
    """crop_pct: the shorter side to size / crop_pct, then the centre crop (timm's eval transform)."""
    from keras_vit.data.images import prepare_image

    img = np.zeros((40, 60, 3), np.float32)
    img[10:30, 20:40] = 255.0  # a centre square of half the shorter side
    crop = np.asarray(prepare_image(img, (16, 16), 3, "bicubic", crop_pct=0.5))
    assert crop.shape == (16, 16, 3) and crop.min() >= 0 and crop.max() <= 255
    assert crop[4:12, 4:12].min() > 250  # 40 -> 32 rows: the square fills the 16 x 16 centre
    whole = np.asarray(prepare_image(img, (16, 16), 3))  # the default: the whole image, bilinear
    assert whole[0, 0].max() == 0 and whole[8, 8].min() > 250


def test_preset_model_predicts_with_timms_transform(tmp_path, monkeypatch):
    """A model built from a published name carries its evaluation transform to predict()."""
    import keras_vit
    from keras_vit.train.evaluation import _images
    from keras_vit.weights import presets

    folder, _, _ = _hf_folder(tmp_path, "deit_distilled")
    entry = presets.Published("hf://acme/tiny-deit", "B/16", 16, 5, options=dict(distilled=True),
                              interpolation="bicubic", crop_pct=0.9)
    monkeypatch.setitem(presets.PUBLISHED, "tiny_deit", entry)
    monkeypatch.setattr("keras_vit.weights.checkpoints.hub_file",  # the Hub's cache, offline
                        lambda spec, filename=None, required=True: f"{folder}/{filename or 'model.safetensors'}")
    model = keras_vit.ViT(weights="tiny_deit", hidden_size=32, num_heads=2, num_layers=2, mlp_dim=64, patch_size=4)
    assert model.eval_preprocessing == {"interpolation": "bicubic", "crop_pct": 0.9}
    from PIL import Image

    path = str(tmp_path / "x.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(path)
    from keras_vit.data.images import load_image_file

    np.testing.assert_array_equal(_images(model, [path])[0], load_image_file(path, (16, 16), 3, "bicubic", 0.9))
    model.save(tmp_path / "deit.keras")  # the transform is saved with the model: the file predicts as the preset
    reloaded = keras_vit.load_model(str(tmp_path / "deit.keras"))
    assert reloaded.eval_preprocessing == {"interpolation": "bicubic", "crop_pct": 0.9}
    np.testing.assert_array_equal(_images(reloaded, [path]), _images(model, [path]))
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\], got 1.5"):
        type(model)(model.vit_config, eval_preprocessing={"crop_pct": 1.5})
    with pytest.raises(ValueError, match="interpolation must be one of bilinear, bicubic"):
        type(model)(model.vit_config, eval_preprocessing={"interpolation": "cubic"})


def test_preset_offline_is_one_clear_line(offline_hub):
    import keras_vit

    with pytest.raises(ValueError) as err:
        keras_vit.ViT(weights="vit_small_patch14_dinov2.lvd142m")
    msg = str(err.value)
    assert "\n" not in msg and "hf://timm/vit_small_patch14_dinov2.lvd142m" in msg and "offline" in msg


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg", "clip", "siglip"])
def test_hf_config_describes_the_saved_model(tmp_path, family):
    """save_safetensors(layout="hf") + hf_layout.hf_config: a folder that reads back as the same model."""
    import json

    import keras_vit

    folder, _, _ = _hf_folder(tmp_path, family)
    model = keras_vit.ViT(weights=folder)
    out = tmp_path / "saved"
    out.mkdir()
    keras_vit.weights.save_safetensors(model, str(out / "model.safetensors"), layout="hf")
    with open(out / "config.json", "w") as f:
        json.dump(hf_layout.hf_config(model.vit_config), f)
    with open(f"{folder}/config.json") as f:
        theirs = json.load(f)
    with open(out / "config.json") as f:
        ours = json.load(f)
    assert hf_layout.config_fields(ours) == {**hf_layout.config_fields(theirs), "channels": 3}
    x = np.random.default_rng(15).uniform(0, 255, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(keras_vit.ViT(weights=str(out)).predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("mlp, mlp_dim, ratio", [("mlp", 128, 2), ("mlp", 1536, 4), ("swiglu", 176, 4),
                                                  ("mlp", 100, 1.5625)])
def test_hf_config_writes_a_whole_mlp_ratio_where_one_gives_mlp_dim(mlp, mlp_dim, ratio):
    """transformers >= 5's Dinov2Config takes an integer mlp_ratio only (a float 2.0 is refused, checked with
    transformers 5.25); the Hub's DINOv2 configs have integers. A width no integer gives keeps its float."""
    from keras_vit.config import ViTConfig

    hidden = 384 if mlp_dim == 1536 else 64
    cfg = ViTConfig(hidden_size=hidden, num_heads=4, num_layers=1, mlp_dim=mlp_dim, mlp=mlp, layer_scale_init=1.0,
                    patch_size=4, image_size=8)
    got = hf_layout.hf_config(cfg)["mlp_ratio"]
    assert got == ratio and type(got) is type(ratio)
    assert hf_layout.config_fields(hf_layout.hf_config(cfg))["mlp_dim"] == mlp_dim


@pytest.mark.jax
@pytest.mark.slow  # one JAX process for every family
def test_hf_folders_give_the_reference_logits_on_jax(tmp_path):
    """Every HF-layout family, loaded from its folder on TensorFlow and rebuilt from its config on JAX."""
    pytest.importorskip("jax")
    import reference_family as rf

    import keras_vit
    from tests.backend_worker import outputs_on

    x = np.random.default_rng(13).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    models, expected = {}, {}
    for family in HF_FAMILIES:
        folder, sd, arch = _hf_folder(tmp_path, family)
        models[family] = keras_vit.ViT(weights=folder)
        expected[family] = rf.forward(sd, arch, x)
    out = outputs_on("jax", models, x, tmp_path)
    for family in HF_FAMILIES:
        assert _rel(out[family], expected[family]) <= REL, family
