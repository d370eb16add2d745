"""timm / Hugging Face .safetensors in and out, hf://ORG/NAME, and input-channel adaptation.

The tests write torch-layout files from random official-layout arrays with their own
conversion (written from timm's and transformers' module definitions, not from keras_vit),
and compare the loaded model's logits with the independent NumPy reference run on the
official .npz of the same weights (max |diff| <= 1e-4).
"""
from __future__ import annotations

import json
import logging
import os

import ckpt_factory as cf
import numpy as np
import pytest
import reference_vit as ref
from safetensors.numpy import load_file, save_file

import keras_vit
from keras_vit.config import ViTConfig

TOL = 1e-4
TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2)
BLOCK, ATT = "Transformer/encoderblock_{}/", "MultiHeadDotProductAttention_1/"


def plain_cfg(**kw):
    return ViTConfig(**{**TINY, "patch_size": 4, "image_size": 8, "num_classes": 5, **kw})


def hybrid_cfg(**kw):
    return ViTConfig(**{**TINY, "patch_size": 1, "image_size": 32, "num_classes": 5, "resnet_layers": (1, 1, 1), **kw})


# --- torch layouts, from the modules' definitions ----------------------------------------------
def _lin(k):  # flax Dense kernel (in, out) -> torch Linear weight (out, in)
    return np.ascontiguousarray(k.T)


def _conv(k):  # flax (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def timm_state_dict(w, layers=2):
    """timm VisionTransformer / hybrid (ResNetV2 backbone) names for official-layout arrays."""
    sd = {}
    if "conv_root/kernel" in w:
        bb = "patch_embed.backbone."
        sd[bb + "stem.conv.weight"] = _conv(w["conv_root/kernel"])
        sd[bb + "stem.norm.weight"], sd[bb + "stem.norm.bias"] = w["gn_root/scale"].ravel(), w["gn_root/bias"].ravel()
        for k, v in w.items():
            parts = k.split("/")
            if not parts[0].startswith("block"):
                continue
            s, u = int(parts[0][5:]) - 1, int(parts[1][4:]) - 1
            p = f"{bb}stages.{s}.blocks.{u}."
            name = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}.get(
                parts[2], parts[2].replace("gn", "norm"))
            if parts[3] == "kernel":
                sd[p + name + ".weight"] = _conv(v)
            else:
                sd[p + name + (".weight" if parts[3] == "scale" else ".bias")] = v.ravel()
    sd["patch_embed.proj.weight"] = _conv(w["embedding/kernel"])
    sd["patch_embed.proj.bias"] = w["embedding/bias"]
    sd["cls_token"] = w["cls"]
    sd["pos_embed"] = w["Transformer/posembed_input/pos_embedding"]
    for i in range(layers):
        b, t = BLOCK.format(i), f"blocks.{i}."
        sd[t + "norm1.weight"], sd[t + "norm1.bias"] = w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"]
        sd[t + "norm2.weight"], sd[t + "norm2.bias"] = w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"]
        d = w[b + ATT + "query/kernel"].shape[0]
        sd[t + "attn.qkv.weight"] = np.concatenate([_lin(w[b + ATT + n + "/kernel"].reshape(d, d))
                                                    for n in ("query", "key", "value")])
        sd[t + "attn.qkv.bias"] = np.concatenate([w[b + ATT + n + "/bias"].ravel() for n in ("query", "key", "value")])
        sd[t + "attn.proj.weight"] = _lin(w[b + ATT + "out/kernel"].reshape(d, d))
        sd[t + "attn.proj.bias"] = w[b + ATT + "out/bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            sd[f"{t}mlp.{fc}.weight"] = _lin(w[f"{b}MlpBlock_3/Dense_{j}/kernel"])
            sd[f"{t}mlp.{fc}.bias"] = w[f"{b}MlpBlock_3/Dense_{j}/bias"]
    sd["norm.weight"], sd["norm.bias"] = w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"]
    if "pre_logits/kernel" in w:
        sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"] = _lin(w["pre_logits/kernel"]), w["pre_logits/bias"]
    if "head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = _lin(w["head/kernel"]), w["head/bias"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def hf_state_dict(w, layers=2, classifier=True):
    """transformers ViTForImageClassification (classifier=True) or ViTModel (with its pooler)."""
    p = "vit." if classifier else ""
    sd = {p + "embeddings.cls_token": w["cls"],
          p + "embeddings.position_embeddings": w["Transformer/posembed_input/pos_embedding"],
          p + "embeddings.patch_embeddings.projection.weight": _conv(w["embedding/kernel"]),
          p + "embeddings.patch_embeddings.projection.bias": w["embedding/bias"]}
    for i in range(layers):
        b, t = BLOCK.format(i), f"{p}encoder.layer.{i}."
        d = w[b + ATT + "query/kernel"].shape[0]
        for n in ("query", "key", "value"):
            sd[f"{t}attention.attention.{n}.weight"] = _lin(w[b + ATT + n + "/kernel"].reshape(d, d))
            sd[f"{t}attention.attention.{n}.bias"] = w[b + ATT + n + "/bias"].ravel()
        sd[t + "attention.output.dense.weight"] = _lin(w[b + ATT + "out/kernel"].reshape(d, d))
        sd[t + "attention.output.dense.bias"] = w[b + ATT + "out/bias"]
        sd[t + "layernorm_before.weight"], sd[t + "layernorm_before.bias"] = w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"]
        sd[t + "layernorm_after.weight"], sd[t + "layernorm_after.bias"] = w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"]
        sd[t + "intermediate.dense.weight"] = _lin(w[b + "MlpBlock_3/Dense_0/kernel"])
        sd[t + "intermediate.dense.bias"] = w[b + "MlpBlock_3/Dense_0/bias"]
        sd[t + "output.dense.weight"] = _lin(w[b + "MlpBlock_3/Dense_1/kernel"])
        sd[t + "output.dense.bias"] = w[b + "MlpBlock_3/Dense_1/bias"]
    sd[p + "layernorm.weight"], sd[p + "layernorm.bias"] = w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"]
    if classifier:
        sd["classifier.weight"], sd["classifier.bias"] = _lin(w["head/kernel"]), w["head/bias"]
    else:
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = _lin(w["pre_logits/kernel"]), w["pre_logits/bias"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)


def logits(model, x):
    return np.asarray(model(x, training=False))


# --- loading --------------------------------------------------------------------------------------
def test_timm_plain_matches_reference(tmp_path, images):
    arrays = cf.vit_checkpoint(np.random.default_rng(1), representation=8)
    npz = cf.write(tmp_path / "vit.npz", arrays)
    st = str(tmp_path / "timm.safetensors")
    save_file(timm_state_dict(arrays), st)
    model = keras_vit.ViT(config=plain_cfg(representation_size=8), weights=st)
    assert np.abs(logits(model, images) - ref.forward(npz, images)).max() <= TOL


def test_timm_hybrid_matches_reference(tmp_path):
    arrays = cf.vit_checkpoint(np.random.default_rng(2), patch=1, resnet=(1, 1, 1))
    npz = cf.write(tmp_path / "hybrid.npz", arrays)
    st = str(tmp_path / "hybrid.safetensors")
    save_file(timm_state_dict(arrays), st)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    model = keras_vit.ViT(config=hybrid_cfg(), weights=st)
    assert np.abs(logits(model, x) - ref.forward(npz, x)).max() <= TOL


def _small_kernels(arrays, scale=1e-3):
    """The ResNet's kernels scaled down: weight standardisation's epsilon then shows (1e-5 on a
    standard deviation near 1e-3), so the two codes' epsilons give different outputs."""
    return {k: v * scale if k.endswith("kernel") and ("conv" in k) and v.ndim == 4 and k != "embedding/kernel" else v
            for k, v in arrays.items()}


def test_timm_hybrid_runs_with_timms_epsilons(tmp_path):
    """A timm hybrid checkpoint runs its ResNet as timm does (GroupNorm 1e-5, StdConv2d's
    sqrt(var + 1e-8)); the same arrays as an official .npz keep the official code's (1e-6, std + 1e-5)."""
    arrays = _small_kernels(cf.vit_checkpoint(np.random.default_rng(2), patch=1, resnet=(1, 1, 1)))
    npz = cf.write(tmp_path / "hybrid.npz", arrays)
    st = str(tmp_path / "hybrid.safetensors")
    save_file(timm_state_dict(arrays), st)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    timm_ref, jax_ref = ref.forward(npz, x, timm_resnet=True), ref.forward(npz, x)
    assert np.abs(timm_ref - jax_ref).max() > 10 * TOL  # the check below can tell the two apart
    from_timm = keras_vit.ViT(weights=st, num_heads=2, gelu_approximate=True)  # the reference's GELU
    assert from_timm.vit_config.resnet_epsilons == "timm"
    assert np.abs(logits(from_timm, x) - timm_ref).max() <= TOL
    from_npz = keras_vit.ViT(weights=npz, num_heads=2)
    assert from_npz.vit_config.resnet_epsilons == "jax"
    assert np.abs(logits(from_npz, x) - jax_ref).max() <= TOL
    # Saved and reloaded (.keras, and the timm layout with keras-vit's metadata): the same epsilons.
    from_timm.save(tmp_path / "m.keras")
    again = keras_vit.load_model(tmp_path / "m.keras")
    assert again.vit_config.resnet_epsilons == "timm"
    np.testing.assert_array_equal(logits(again, x), logits(from_timm, x))
    kept = keras_vit.ViT(weights=keras_vit.save_safetensors(from_npz, tmp_path / "jax.safetensors"))
    assert kept.vit_config.resnet_epsilons == "jax"
    np.testing.assert_array_equal(logits(kept, x), logits(from_npz, x))


def test_resnet_epsilons_is_checked():
    with pytest.raises(ValueError, match="resnet_epsilons must be one of jax, timm; got 'torch'"):
        hybrid_cfg(resnet_epsilons="torch")


@pytest.mark.parametrize("classifier", [True, False])
def test_hugging_face_matches_reference(tmp_path, images, classifier):
    arrays = cf.vit_checkpoint(np.random.default_rng(4), representation=None if classifier else 8)
    if not classifier:  # ViTModel: the pooler is the pre-logits layer, there is no head
        arrays = {k: v for k, v in arrays.items() if not k.startswith("head/")}
    npz = cf.write(tmp_path / "vit.npz", arrays)
    st = str(tmp_path / "hf.safetensors")
    save_file(hf_state_dict(arrays, classifier=classifier), st)
    cfg = plain_cfg() if classifier else plain_cfg(include_top=False, representation_size=8)
    model = keras_vit.ViT(config=cfg, weights=st)
    assert np.abs(logits(model, images) - ref.forward(npz, images)).max() <= TOL


def test_a_headless_vit_model_file_is_a_feature_tower(tmp_path, images, caplog):
    """transformers' ViTModel (no classifier) loads as its pooler, as timm's num_classes=0 files
    do, not as a classifier with an untrained head; num_classes= gives a new head."""
    arrays = cf.vit_checkpoint(np.random.default_rng(4), representation=8)
    arrays = {k: v for k, v in arrays.items() if not k.startswith("head/")}
    npz = cf.write(tmp_path / "vit.npz", arrays)
    st = str(tmp_path / "hf.safetensors")
    save_file(hf_state_dict(arrays, classifier=False), st)
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        model = keras_vit.ViT(weights=st, num_heads=2, gelu_approximate=True, image_size=8)  # the reference's GELU
    assert not [r for r in caplog.records if "untrained" in r.getMessage()]
    assert model.vit_config.include_top is False
    assert np.abs(logits(model, images) - ref.forward(npz, images)).max() <= TOL
    tuned = keras_vit.ViT(weights=st, num_heads=2, image_size=8, num_classes=3)
    assert tuned.vit_config.include_top and tuned.output_shape == (None, 3)


def test_a_new_head_drops_the_pre_logits(tmp_path):
    """The pre-logits layer follows the checkpoint's head: kept with it, replaced with it (paper)."""
    npz = cf.write(tmp_path / "rep.npz", cf.vit_checkpoint(np.random.default_rng(17), representation=8, classes=5))
    assert keras_vit.ViT(weights=npz).vit_config.representation_size == 8
    assert keras_vit.ViT(weights=npz, num_classes=3).vit_config.representation_size is None
    assert keras_vit.ViT(weights=npz, num_classes=3, representation_size=8).vit_config.representation_size == 8


def test_checkpoint_file_sets_the_architecture(tmp_path):
    """Without variant or config, the sizes, classes and image size come from the file; a timm
    file computes exact GELU as timm does."""
    arrays = cf.vit_checkpoint(np.random.default_rng(5), classes=7)
    st = str(tmp_path / "timm.safetensors")
    save_file(timm_state_dict(arrays), st)
    npz = cf.write(tmp_path / "vit.npz", arrays)
    with pytest.raises(ValueError, match="pass num_heads= or variant="):
        keras_vit.ViT(weights=st)  # timm fuses the heads: their number is not in the shapes
    for path, exact in ((st, True), (npz, False)):
        cfg = keras_vit.ViT(weights=path, num_heads=2).vit_config
        got = (cfg.hidden_size, cfg.mlp_dim, cfg.num_layers, cfg.patch_size, cfg.image_size, cfg.num_classes)
        assert got == (32, 64, 2, (4, 4), (8, 8), 7), path
        assert cfg.gelu_approximate is not exact
    assert keras_vit.ViT(weights=npz).vit_config.num_heads == 2  # the .npz kernels are per head


def test_unknown_tensors_and_fc_norm_are_reported(tmp_path):
    arrays = cf.vit_checkpoint(np.random.default_rng(6))
    sd = timm_state_dict(arrays)
    sd["blocks.0.ls1.gamma"] = np.ones(32, np.float32)  # LayerScale in one block only: fits no model
    st = str(tmp_path / "ls.safetensors")
    save_file(sd, st)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): Transformer/encoderblock_0/LayerScale_0/scale"):
        keras_vit.ViT(config=plain_cfg(), weights=st)
    sd = timm_state_dict(arrays)
    sd["fc_norm.weight"] = sd.pop("norm.weight")
    save_file(sd, st)
    with pytest.raises(ValueError, match="fc_norm"):
        keras_vit.ViT(config=plain_cfg(), weights=st)
    bad = tmp_path / "other.safetensors"
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(bad))
    with pytest.raises(ValueError, match="not a timm or Hugging Face ViT"):
        keras_vit.ViT(config=plain_cfg(), weights=str(bad))


# --- saving ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("hybrid", [False, True])
def test_save_safetensors_is_timm_layout_and_round_trips(tmp_path, hybrid):
    if hybrid:
        arrays = cf.vit_checkpoint(np.random.default_rng(8), patch=1, resnet=(1, 1, 1))
        cfg, x = hybrid_cfg(), np.random.default_rng(9).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    else:
        arrays = cf.vit_checkpoint(np.random.default_rng(8), representation=8)
        cfg, x = plain_cfg(representation_size=8), np.random.default_rng(9).uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
    model = keras_vit.ViT(config=cfg, weights=cf.write(tmp_path / "w.npz", arrays))
    path = keras_vit.save_safetensors(model, tmp_path / "out.safetensors")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    saved, expected = load_file(path), timm_state_dict(arrays)
    assert set(saved) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(saved[k], expected[k], err_msg=k)
    again = keras_vit.ViT(weights=path)  # the file's metadata rebuilds the same config
    assert again.vit_config == model.vit_config
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(logits(model, x), logits(again, x))


def test_save_safetensors_refuses_layouts_timm_lacks(tmp_path):
    with pytest.raises(ValueError, match="save_npz"):
        keras_vit.save_safetensors(keras_vit.ViT(config=plain_cfg(pos_embedding="relative")), tmp_path / "r.safetensors")


# --- hf:// ----------------------------------------------------------------------------------------
def _hub_cache(root, repo, files):
    """Files laid out as huggingface_hub's cache (models--ORG--NAME/{refs/main, snapshots/REV/})."""
    rev = "0" * 40
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(str(snap / name))


def test_hf_offline_is_one_clear_line(offline_hub):
    with pytest.raises(ValueError) as err:
        keras_vit.ViT(weights="hf://google/vit-tiny-test")
    msg = str(err.value)
    assert "\n" not in msg and "hf://google/vit-tiny-test" in msg and "offline" in msg


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """A machine without a network and without HF_HUB_OFFLINE set: no host takes a connection, and
    huggingface_hub's own metadata request fails the test (it would retry for about 25 s)."""
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))

    def refuse(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    def no_request(*args, **kwargs):
        raise AssertionError("huggingface_hub asked the network")

    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.setattr("huggingface_hub.file_download.get_hf_file_metadata", no_request)


def test_hf_without_network_reads_the_cache_or_says_one_line_at_once(no_network, tmp_path):
    """Offline without HF_HUB_OFFLINE: a cached file is read without asking the Hub, a missing one is one line."""
    from keras_vit.weights.checkpoints import hub_file

    _hub_cache(tmp_path, "acme/cached", {"model.safetensors": lambda p: open(p, "wb").write(b"x")})
    assert hub_file("hf://acme/cached").endswith("model.safetensors")
    assert hub_file("hf://acme/cached", "config.json", required=False) is None
    with pytest.raises(ValueError) as err:
        hub_file("hf://acme/missing")
    assert "\n" not in str(err.value) and "cannot be reached (offline?)" in str(err.value)


def test_hub_reachable_asks_the_host_unless_a_proxy_decides(monkeypatch):
    from keras_vit.weights import checkpoints

    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    asked = []

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr("socket.create_connection", lambda address, timeout: asked.append(address) or Conn())
    assert checkpoints.hub_reachable("https://huggingface.co") and asked == [("huggingface.co", 443)]
    assert checkpoints.hub_reachable("http://mirror.local:8080") and asked[-1] == ("mirror.local", 8080)

    def refuse(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr("socket.create_connection", refuse)
    assert not checkpoints.hub_reachable("https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")  # only the proxy knows: huggingface_hub asks it
    assert checkpoints.hub_reachable("https://huggingface.co")


def test_hf_cached_model_with_config(tmp_path, monkeypatch, images):
    """A cached Hub model loads offline; its config.json gives the heads and the class names."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    arrays = cf.vit_checkpoint(np.random.default_rng(10), classes=3)
    config = {"architectures": ["ViTForImageClassification"], "hidden_size": 32, "num_attention_heads": 2,
              "num_hidden_layers": 2, "intermediate_size": 64, "image_size": 8, "patch_size": 4,
              "hidden_act": "gelu", "layer_norm_eps": 1e-6, "id2label": {"0": "cat", "1": "dog", "2": "fox"}}

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f)

    _hub_cache(tmp_path, "acme/vit-tiny", {"model.safetensors": lambda p: save_file(hf_state_dict(arrays), p),
                                            "config.json": write_config})
    model = keras_vit.ViT(weights="hf://acme/vit-tiny", gelu_approximate=True)
    assert model.vit_config.num_classes == 3 and model.vit_config.num_heads == 2
    assert model.class_names == ["cat", "dog", "fox"]
    npz = cf.write(tmp_path / "vit.npz", arrays)
    assert np.abs(logits(model, images) - ref.forward(npz, images)).max() <= TOL


# --- other channel counts --------------------------------------------------------------------------
def test_grey_model_matches_rgb_on_replicated_grey(tmp_path):
    arrays = cf.vit_checkpoint(np.random.default_rng(11))
    npz = cf.write(tmp_path / "rgb.npz", arrays)
    rgb = keras_vit.ViT(config=plain_cfg(), weights=npz)
    grey = keras_vit.ViT(config=plain_cfg(channels=1), weights=npz)
    g = np.random.default_rng(12).uniform(0, 255, (3, 8, 8, 1)).astype(np.float32)
    diff = np.abs(logits(grey, g) - logits(rgb, np.repeat(g, 3, axis=-1))).max()
    assert diff <= TOL and np.abs(logits(rgb, np.repeat(g, 3, axis=-1))).max() > 0.1, diff
    # more channels: RGB repeated and scaled by 3 / C (timm), so with C = 6 an image given twice
    # over (RGBRGB) keeps its logits
    five = keras_vit.ViT(config=plain_cfg(channels=5), weights=npz)
    src = arrays["embedding/kernel"]
    np.testing.assert_allclose(np.asarray(five.get_layer("embedding").projection.kernel),
                               np.concatenate([src, src[:, :, :2]], axis=2) * 3 / 5, rtol=1e-6)
    six = keras_vit.ViT(config=plain_cfg(channels=6), weights=npz)
    x = np.random.default_rng(13).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    assert np.abs(logits(six, np.concatenate([x, x], -1)) - logits(rgb, x)).max() <= TOL


def test_hybrid_root_conv_is_summed_for_one_channel(tmp_path):
    arrays = cf.vit_checkpoint(np.random.default_rng(13), patch=1, resnet=(1, 1, 1))
    grey = keras_vit.ViT(config=hybrid_cfg(channels=1), weights=cf.write(tmp_path / "h.npz", arrays))
    np.testing.assert_allclose(np.asarray(grey.get_layer("resnet").conv_root.kernel),
                               arrays["conv_root/kernel"].sum(axis=2, keepdims=True), rtol=1e-6)


# --- messages -------------------------------------------------------------------------------------
def test_zero_head_and_resampling_say_so(tmp_path, caplog):
    arrays = cf.vit_checkpoint(np.random.default_rng(14))
    arrays["head/kernel"][:] = 0
    arrays["head/bias"][:] = 0
    npz = cf.write(tmp_path / "i21k.npz", arrays)
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        model = keras_vit.ViT(config=plain_cfg(image_size=16), weights=npz)
    lines = [r.getMessage() for r in caplog.records]
    assert any("all-zero head" in m and "untrained" in m for m in lines), lines
    assert any("resampled from a 2x2 to a 4x4 grid" in m for m in lines), lines
    assert all("\n" not in m for m in lines)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        keras_vit.ViT(config=plain_cfg(image_size=16, num_classes=3), weights=npz)  # a new head: nothing to say
        keras_vit.resize_model(model, 8)  # a model in memory, not a checkpoint
    assert not [r for r in caplog.records if "untrained" in r.getMessage()]


def test_hf_cached_timm_model(tmp_path, monkeypatch):
    """A timm Hub model: the architecture name gives the variant (and heads), input_size the image
    size; a 1000-class head without label names gets ImageNet's."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    arrays = cf.vit_checkpoint(np.random.default_rng(15), hidden=192, heads=3, mlp=768, layers=12, patch=16,
                               grid=(2, 2), classes=1000)
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f)

    _hub_cache(tmp_path, "timm/vit_tiny_patch16_224.test", {
        "model.safetensors": lambda p: save_file(timm_state_dict(arrays, layers=12), p), "config.json": write_config})
    model = keras_vit.ViT(weights="hf://timm/vit_tiny_patch16_224.test", gelu_approximate=True)
    cfg = model.vit_config
    assert (cfg.variant, cfg.num_heads, cfg.image_size, cfg.num_classes) == ("Ti/16", 3, (32, 32), 1000)
    assert model.class_names == keras_vit.imagenet_labels()
    x = np.random.default_rng(16).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    assert np.abs(logits(model, x) - ref.forward(cf.write(tmp_path / "ti.npz", arrays), x)).max() <= TOL


def test_save_safetensors_round_trips_a_variant_with_other_sizes(tmp_path):
    """A variant with overrides (what the metadata records) rebuilds with the overrides, not the variant's sizes."""
    model = keras_vit.ViT("Ti/16", image_size=32, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, num_classes=3)
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    again = keras_vit.ViT(weights=keras_vit.save_safetensors(model, tmp_path / "ti.safetensors"))
    assert again.vit_config == model.vit_config and again.vit_config.num_heads == 2
    x = np.random.default_rng(1).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(logits(model, x), logits(again, x))
