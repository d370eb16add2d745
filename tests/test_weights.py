"""Official .npz checkpoints in and out: every naming scheme, the all-or-nothing rules, and
logits equal to an independent numpy reference of the same checkpoint (max |diff| <= 1e-4)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ckpt_factory as cf
import numpy as np
import pytest
import reference_vit as ref

import keras_vit
from keras_vit import weights as W
from keras_vit.config import ViTConfig

TOL = 1e-4
TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2)


def plain_cfg(**kw):
    return ViTConfig(**{**TINY, "patch_size": 4, "image_size": 8, "num_classes": 5, **kw})


def hybrid_cfg(**kw):
    return ViTConfig(**{**TINY, "patch_size": 1, "image_size": 32, "num_classes": 5, "resnet_layers": (1, 1, 1), **kw})


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def images(rng):
    return rng.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hybrid_ckpt(tmp_path_factory):
    arrays = cf.vit_checkpoint(np.random.default_rng(1), patch=1, resnet=(1, 1, 1), gn_4d=True)
    return cf.write(tmp_path_factory.mktemp("h") / "R50+ViT-tiny.npz", arrays), arrays


def logits(model, x):
    return np.asarray(model(x, training=False))


def test_plain_checkpoint_matches_reference(tmp_path, rng, images):
    path = cf.write(tmp_path / "ViT-tiny.npz", cf.vit_checkpoint(rng, representation=8))
    model = keras_vit.ViT(config=plain_cfg(representation_size=8), weights=path)
    diff = np.abs(logits(model, images) - ref.forward(path, images)).max()
    assert diff <= TOL, diff


def test_gap_checkpoint_matches_reference(tmp_path, rng, images):
    path = cf.write(tmp_path / "gap.npz", cf.vit_checkpoint(rng, token=False))
    model = keras_vit.ViT(config=plain_cfg(classifier="gap"), weights=path)
    diff = np.abs(logits(model, images) - ref.forward(path, images, classifier="gap")).max()
    assert diff <= TOL, diff


def test_hybrid_checkpoint_matches_reference(hybrid_ckpt, rng):
    path, _ = hybrid_ckpt
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    model = keras_vit.ViT(config=hybrid_cfg(), weights=path)
    diff = np.abs(logits(model, x) - ref.forward(path, x)).max()
    assert diff <= TOL, diff


@pytest.mark.parametrize("layout", ["bv", "bv-scan", "bv-scan-opt", "vit-opt"])
def test_other_layouts_give_the_same_model(tmp_path, rng, images, layout):
    arrays = cf.vit_checkpoint(rng)
    base = keras_vit.ViT(config=plain_cfg(), weights=cf.write(tmp_path / "vit.npz", arrays))
    if layout == "vit-opt":
        converted = {"opt/target/" + k: v for k, v in arrays.items()}
        converted["opt/state/step"] = np.zeros((), np.int32)  # optimizer state is ignored
    else:
        converted = cf.to_big_vision(arrays, scan="scan" in layout,
                                     prefix="opt/target/" if layout.endswith("opt") else "params/")
    path = cf.write(tmp_path / f"{layout}.npz", converted)
    model = keras_vit.ViT(config=plain_cfg(), weights=path)
    assert np.abs(logits(model, images) - logits(base, images)).max() <= 1e-5
    assert np.abs(logits(model, images) - ref.forward(path, images)).max() <= TOL


def test_other_num_classes_drops_the_head(tmp_path, rng, images):
    arrays = cf.vit_checkpoint(rng, representation=8, classes=5)
    path = cf.write(tmp_path / "c.npz", arrays)
    model = keras_vit.ViT(config=plain_cfg(num_classes=3), weights=path)
    head = model.get_layer("head")
    assert np.all(np.asarray(head.kernel) == 0) and np.all(np.asarray(head.bias) == 0)
    assert np.all(logits(model, images) == 0)
    # pre_logits is dropped when the model has none (the official "drop-head" fine-tuning) ...
    assert all(layer.name != "pre_logits" for layer in model.layers)
    np.testing.assert_array_equal(np.asarray(model.get_layer("cls").cls), arrays["cls"])
    # ... and kept when asked to follow the checkpoint.
    follow = keras_vit.ViT(config=plain_cfg(num_classes=3), weights=path, representation_size="checkpoint")
    assert follow.vit_config.representation_size == 8
    np.testing.assert_array_equal(np.asarray(follow.get_layer("pre_logits").kernel), arrays["pre_logits/kernel"])
    features = keras_vit.ViT(config=plain_cfg(include_top=False, representation_size=8), weights=path)
    ref_features = ref.forward(cf.write(tmp_path / "nohead.npz", {k: v for k, v in arrays.items()
                                                                    if not k.startswith("head/")}), images)
    assert np.abs(logits(features, images) - ref_features).max() <= TOL


def test_a_head_on_pre_logits_the_model_lacks_is_said_untrained(tmp_path, rng, caplog):
    """A checkpoint whose head (the model's classes) reads its pre-logits, into a model built without them:
    the head cannot load and the model's stays zero, so a warning says so and how to keep it."""
    import logging

    path = cf.write(tmp_path / "rep.npz", cf.vit_checkpoint(rng, representation=8))
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        model = keras_vit.ViT(config=plain_cfg(), weights=path)
    assert not np.any(np.asarray(model.get_layer("head").kernel))
    assert "head of 5 classes takes 8 features" in caplog.text and "representation_size=8 to keep it" in caplog.text


def test_representation_checkpoint_needs_weights():
    with pytest.raises(ValueError, match="needs weights"):
        keras_vit.ViT(config=plain_cfg(), representation_size="checkpoint")


def test_mismatch_is_one_clear_error_and_loads_nothing(tmp_path, rng, hybrid_ckpt):
    model = keras_vit.ViT(config=plain_cfg())
    before = [np.array(v) for v in model.weights]
    with pytest.raises(ValueError) as err:
        keras_vit.load_npz(model, hybrid_ckpt[0])
    msg = str(err.value)
    assert "\n" not in msg
    assert "unexpected keys (39)" in msg and "block1/unit1/" in msg and "shape mismatches" in msg
    missing = cf.vit_checkpoint(rng)
    del missing["Transformer/encoderblock_1/LayerNorm_0/scale"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): Transformer/encoderblock_1/LayerNorm_0/scale"):
        keras_vit.load_npz(model, cf.write(tmp_path / "missing.npz", missing))
    wide = cf.vit_checkpoint(rng, hidden=48, heads=2)
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): Transformer/encoder_norm/bias \(48,\) vs model \(32,\)"):
        keras_vit.load_npz(model, cf.write(tmp_path / "wide.npz", wide))
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="could not read checkpoint"):
        keras_vit.load_npz(keras_vit.ViT(config=plain_cfg()), path)
    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        keras_vit.load_npz(keras_vit.ViT(config=plain_cfg()), text)


def test_a_damaged_npz_is_one_clear_line(tmp_path, rng):
    """Cut short, one byte flipped (a bad CRC), a lone .npy under an .npz name: ValueError naming the file."""
    good = cf.write(tmp_path / "good.npz", cf.vit_checkpoint(rng))
    data = open(good, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[:-30])
    flipped = bytearray(data)
    at = data.index(b"\x93NUMPY") + 200  # inside the first array's data
    flipped[at] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    np.save(tmp_path / "one.npy", np.zeros(3))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
    for name in ("cut.npz", "crc.npz", "one.npz"):
        with pytest.raises(ValueError, match=f"could not read checkpoint '.*{name}' as an .npz file"):
            keras_vit.load_npz(keras_vit.ViT(config=plain_cfg()), tmp_path / name)


def test_bfloat16_npz_loads_as_big_vision_reads_it(tmp_path, rng, images):
    """np.savez stores JAX's bfloat16 arrays as 2-byte voids; they load as the bfloat16 values (not refused
    after half the variables changed)."""
    import ml_dtypes

    arrays = cf.vit_checkpoint(rng)
    rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()}
    path = cf.write(tmp_path / "bf16.npz", rounded)
    with np.load(path) as f:
        assert f["cls"].dtype == np.dtype("V2")
    want = cf.write(tmp_path / "f32.npz", {k: v.astype(np.float32) for k, v in rounded.items()})
    np.testing.assert_array_equal(logits(keras_vit.ViT(config=plain_cfg(), weights=path), images),
                                  logits(keras_vit.ViT(config=plain_cfg(), weights=want), images))


def test_a_headless_model_saved_rebuilds_headless(tmp_path):
    """save_npz / save_safetensors of an include_top=False model: ViT(weights=file) is that model again."""
    model = keras_vit.ViT(config=plain_cfg(include_top=False))
    for save in (keras_vit.save_npz, keras_vit.save_safetensors):
        path = save(model, tmp_path / ("m.npz" if save is keras_vit.save_npz else "m.safetensors"))
        again = keras_vit.ViT(weights=path)
        assert again.vit_config.include_top is False and again.output_shape == model.output_shape
        assert keras_vit.ViT(weights=path, num_classes=4).output_shape == (None, 4)  # a new head when asked


def test_misfit_files_name_the_file_and_the_cause(tmp_path, rng):
    """An .npz that is not a ViT checkpoint is not blamed on the PyTorch layout; a timm file whose width the
    variant's heads do not divide names the file."""
    arrays = cf.vit_checkpoint(rng)
    path = cf.write(tmp_path / "noemb.npz", {k: v for k, v in arrays.items() if not k.startswith("embedding/")})
    with pytest.raises(ValueError, match=r"noemb.npz' does not say .* \(it lacks arrays of the official layout"):
        keras_vit.ViT(weights=path)
    model = keras_vit.ViT(weights=cf.write(tmp_path / "ok.npz", cf.vit_checkpoint(rng, patch=16)))
    timm_file = keras_vit.save_safetensors(model, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match=r"^checkpoint '.*ok.safetensors': .* is not divisible by num_heads=3"):
        keras_vit.ViT("Ti/16", weights=timm_file)


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="neither an existing .npz"):
        keras_vit.ViT(config=plain_cfg(), weights="B/16-imagenet-typo")


def test_published_names_are_well_formed():
    from keras_vit.config import parse_variant

    assert {"B/16-i21k", "R50+B/16-i21k", "B/16-augreg-i21k-ft-in1k"} <= set(W.PUBLISHED)
    for name, entry in W.PUBLISHED.items():
        if name in W.checkpoints.FAMILY:  # the ViT family by timm's names (tests/test_hf_family.py)
            continue
        assert entry.url.startswith("https://storage.googleapis.com/vit_models/") and entry.url.endswith(".npz"), name
        assert name.startswith(entry.variant + "-"), name
        parse_variant(entry.variant, image_size=entry.image_size, num_classes=entry.num_classes)
    assert W.PUBLISHED["R50+B/16-i21k"].url.endswith("imagenet21k/R50+ViT-B_16.npz")


def test_published_download_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    entry = W.PUBLISHED["B/16-i21k"]
    monkeypatch.setitem(W.PUBLISHED, "B/16-i21k", W.Published("http://127.0.0.1:9/ViT-B_16.npz", entry.variant,
                                                              entry.image_size, entry.num_classes))
    with pytest.raises(ValueError) as err:
        W.checkpoint_path("B/16-i21k")
    msg = str(err.value)
    assert "\n" not in msg and "download" in msg and "local .npz" in msg
    with pytest.raises(ValueError, match="is a L/16 model"):
        keras_vit.ViT("B/16", weights="L/16-i21k")


def test_a_published_download_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """The download goes to a name of its own and is renamed when whole: one cut short (killed, or
    read by another process meanwhile) never sits under the cached name that later loads would trust."""
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    source = tmp_path / "ViT-B_16.npz"
    np.savez(source, x=np.arange(1000, dtype=np.float32))
    entry = W.PUBLISHED["B/16-i21k"]
    monkeypatch.setitem(W.PUBLISHED, "B/16-i21k", W.Published(source.as_uri(), entry.variant, entry.image_size,
                                                              entry.num_classes))
    cache = tmp_path / "home" / "models" / "keras_vit"
    real_get_file = keras.utils.get_file
    seen = []

    def cut_short(fname, origin, cache_dir, cache_subdir):
        part = os.path.join(cache_dir, cache_subdir, fname)
        os.makedirs(os.path.dirname(part), exist_ok=True)
        with open(part, "wb") as f:
            f.write(source.read_bytes()[:100])
        seen.append(sorted(os.listdir(cache)))  # what another process sees meanwhile: no ViT-B_16.npz
        raise OSError("connection reset")

    monkeypatch.setattr(keras.utils, "get_file", cut_short)
    with pytest.raises(ValueError, match="downloading checkpoint 'B/16-i21k' .* failed \\(connection reset\\)"):
        W.checkpoint_path("B/16-i21k")
    assert seen and "ViT-B_16.npz" not in seen[0] and os.listdir(cache) == []
    monkeypatch.setattr(keras.utils, "get_file", real_get_file)
    path = W.checkpoint_path("B/16-i21k")
    assert path == str(cache / "ViT-B_16.npz") and os.listdir(cache) == ["ViT-B_16.npz"]
    assert open(path, "rb").read() == source.read_bytes()
    assert W.checkpoint_path("B/16-i21k") == path  # cached: no second download


@pytest.mark.parametrize("kind", ["learned", "relative", "learned_2d"])
def test_save_then_load_is_exact(tmp_path, images, kind):
    model = keras_vit.ViT(config=plain_cfg(pos_embedding=kind, representation_size=6))
    for v in model.weights:  # non-trivial values everywhere (the head starts at zero)
        v.assign(np.random.default_rng(len(v.path)).standard_normal(v.shape).astype("float32") * 0.1)
    path = keras_vit.save_npz(model, tmp_path / "out.npz")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    loaded = keras_vit.load_npz(keras_vit.ViT(config=plain_cfg(pos_embedding=kind, representation_size=6)), path)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(logits(model, images), logits(loaded, images))
    if kind == "learned":  # the file is the official layout: the reference reads it as is
        assert np.abs(logits(model, images) - ref.forward(path, images)).max() <= TOL


def test_save_hybrid_official_names(tmp_path, hybrid_ckpt):
    path, arrays = hybrid_ckpt
    model = keras_vit.ViT(config=hybrid_cfg(), weights=path)
    out = keras_vit.save_npz(model, tmp_path / "again.npz")
    with np.load(out, allow_pickle=False) as f:
        assert set(f.files) == set(arrays) | {"__keras_vit__"}  # the official names, and our config
        for k in arrays:
            np.testing.assert_array_equal(f[k], arrays[k].reshape(f[k].shape))


def test_save_to_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        keras_vit.save_npz(keras_vit.ViT(config=plain_cfg()), tmp_path / "nope" / "x.npz")


_JAX_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    import keras, keras_vit, reference_vit as ref
    from keras_vit.config import ViTConfig
    assert keras.backend.backend() == "jax"
    rng = np.random.default_rng(0)
    tiny = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, num_classes=5)
    plain = keras_vit.ViT(config=ViTConfig(patch_size=4, image_size=8, **tiny), weights={plain!r})
    x = rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    print("plain", float(np.abs(np.asarray(plain(x)) - ref.forward({plain!r}, x)).max()))
    hyb = keras_vit.ViT(config=ViTConfig(patch_size=1, image_size=32, resnet_layers=(1, 1, 1), **tiny),
                        weights={hybrid!r})
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    print("hybrid", float(np.abs(np.asarray(hyb(x)) - ref.forward({hybrid!r}, x)).max()))
""")


@pytest.mark.jax
def test_jax_backend_matches_reference(tmp_path, rng, hybrid_ckpt):
    plain = cf.write(tmp_path / "plain.npz", cf.vit_checkpoint(rng))
    script = _JAX_SCRIPT.format(tests=os.path.dirname(__file__), plain=plain, hybrid=hybrid_ckpt[0])
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    diffs = dict(line.split() for line in res.stdout.splitlines() if line.startswith(("plain", "hybrid")))
    assert set(diffs) == {"plain", "hybrid"}
    for name, d in diffs.items():
        assert float(d) <= TOL, (name, d)


def test_reading_once_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    """A training run asks its --weights checkpoint for the model's size, config and weights: inside
    reading_once() the file is read once (a changed or another file is read again); outside, every time."""
    from keras_vit.train import make_config
    from keras_vit.weights import checkpoints

    model = keras_vit.ViT("Ti/4", image_size=16, num_classes=10, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64)
    path = str(keras_vit.save_safetensors(model, tmp_path / "m.safetensors"))
    reads = []
    real = checkpoints._read_arrays
    monkeypatch.setattr(checkpoints, "_read_arrays", lambda *a: reads.append(a) or real(*a))
    with checkpoints.reading_once():
        cfg = make_config("digits", weights=path)
        for _ in range(3):
            cfg.vit_config(num_classes=10, channels=1)
        fresh = keras_vit.ViT("Ti/4", image_size=16, num_classes=10, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64)
        W.load_weights(fresh, path)
        assert len(reads) == 1
        np.testing.assert_array_equal(fresh.get_weights()[0], model.get_weights()[0])
        keras_vit.save_safetensors(fresh, path)  # rewritten: read again
        os.utime(path, ns=(1, 1))
        W.load_weights(fresh, path)
        assert len(reads) == 2
    assert checkpoints._ONCE == []  # nothing held once the scope ends
    W.load_weights(fresh, path)
    W.load_weights(fresh, path)
    assert len(reads) == 4


# --- damaged files: one line, nothing loaded (found by probing, 2026-12-07) ---------------------------
@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("head/bias"), r"missing keys \(1\): head/bias"),
    (lambda w: w.update({"head/kernel": w["head/kernel"][:, 0]}), r"shape mismatches .*head/kernel \(32,\) vs model"),
    (lambda w: w.update({"head/kernel": w["head/kernel"][None]}), r"head/kernel \(1, 32, 5\) vs model \(32, 5\)"),
])
def test_half_a_head_or_a_head_of_another_rank_is_refused(tmp_path, change, message):
    """A checkpoint with no head loads (the model keeps its zero one); a kernel without its bias loaded with a
    zero bias, and a 1-D or 3-D kernel failed on an unpacking or was dropped: each is a damaged file."""
    w = cf.vit_checkpoint(np.random.default_rng(0))
    change(w)
    with pytest.raises(ValueError, match=message):
        keras_vit.ViT(weights=cf.write(tmp_path / "m.npz", w), num_heads=2)
    headless = {k: v for k, v in cf.vit_checkpoint(np.random.default_rng(0)).items() if not k.startswith("head/")}
    assert keras_vit.ViT(weights=cf.write(tmp_path / "h.npz", headless), num_heads=2, num_classes=5)


@pytest.mark.parametrize("key,cut,message", [
    ("blocks.0.attn.qkv.weight", lambda w: w[:-1],
     r"blocks\.0\.attn\.qkv\.weight \(95, 32\): a fused query, key, value array has 3 x 32 = 96 rows"),
    ("blocks.0.attn.qkv.bias", lambda w: w[:-2], r"blocks\.0\.attn\.qkv\.bias \(94,\): a fused query, key, value"),
    ("blocks.0.attn.proj.weight", lambda w: w[:, :-1],
     r"blocks\.0\.attn\.proj\.weight \(32, 31\) does not fit the model: cannot reshape"),
    ("pos_embed", lambda w: w[:, :-3], r"its position embeddings have 14 rows, but its config's image and patch size "
                                       r"give a 4x4 patch grid: 16 rows, or 17 with the model's 1 prefix token"),
])
def test_a_timm_file_with_a_cut_array_names_the_key(tmp_path, key, cut, message):
    """A timm file whose fused qkv or projection has another shape gave NumPy's reshape error alone, and a
    position table cut short was resampled from whatever grid its rows factor into (1x13): each names the key."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    model = keras_vit.ViT(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                          num_classes=3)
    path = keras_vit.save_safetensors(model, str(tmp_path / "ok.safetensors"))
    with safe_open(path, "np") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd[key] = np.ascontiguousarray(cut(sd[key]))
    save_file(sd, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=message):
        keras_vit.ViT(weights=str(tmp_path / "cut.safetensors"))


@pytest.mark.parametrize("family,hf", [("deit3", False), ("siglip", False), ("siglip", True)])
def test_a_missing_patch_bias_is_a_missing_key_unless_the_tower_has_none(tmp_path, family, hf):
    """Only CLIP's patch embedding has no bias (timm: bias=not pre_norm); a DeiT-III or SigLIP file without one
    loaded a zero bias silently."""
    import json

    import family_factory as ff
    import hf_family_factory as hff
    from safetensors.numpy import save_file

    sd, arch, config = ff.family_state_dict(np.random.default_rng(3), family)
    if hf:
        hsd, hconf, pre = hff.timm_to_hf(sd, arch, family)
        folder = hff.write_folder(tmp_path / "hf", {k: v for k, v in hsd.items()
                                                    if k != "vision_model.embeddings.patch_embedding.bias"}, hconf, pre)
    else:
        folder = tmp_path / "timm"
        folder.mkdir()
        save_file({k: v for k, v in sd.items() if k != "patch_embed.proj.bias"}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \(1\): embedding/bias"):
        keras_vit.ViT(weights=str(folder))
    clip, _, clip_config = ff.family_state_dict(np.random.default_rng(3), "clip")
    assert "patch_embed.proj.bias" not in clip and "norm_pre.weight" in clip
    save_file(clip, str(tmp_path / "clip.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(clip_config))
    assert keras_vit.ViT(weights=str(tmp_path / "clip.safetensors")).count_params()


@pytest.mark.parametrize("family,drop,message", [
    ("deit_distilled", "cls_classifier.bias", r"missing keys \(1\): head/bias"),
    ("siglip", "vision_model.head.attention.in_proj_bias", r"missing keys \(3\): MAPHead_0/.*key/bias"),
])
def test_hugging_face_files_missing_a_bias_are_one_line(tmp_path, family, drop, message):
    """transformers' DeiT without a classifier bias raised KeyError, SigLIP without the MAP head's in_proj_bias an
    IndexError: the canonical keys they fill are reported missing instead."""
    import family_factory as ff
    import hf_family_factory as hf

    sd, arch, _ = ff.family_state_dict(np.random.default_rng(3), family)
    hsd, hconf, pre = hf.timm_to_hf(sd, arch, family)
    folder = hf.write_folder(tmp_path / "hf", {k: v for k, v in hsd.items() if k != drop}, hconf, pre)
    with pytest.raises(ValueError, match=message):
        keras_vit.ViT(weights=folder)


def test_damaged_lora_files_and_saving_onto_a_folder_are_one_line(tmp_path):
    model = keras_vit.ViT(weights=cf.write(tmp_path / "m.npz", cf.vit_checkpoint(np.random.default_rng(0))), num_heads=2)
    (tmp_path / "cut.lora.npz").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "empty.lora.npz").write_bytes(b"")
    for name in ("cut.lora.npz", "empty.lora.npz"):
        with pytest.raises(ValueError, match="is not a LoRA weights file"):
            keras_vit.load_lora_weights(model, tmp_path / name)
    (tmp_path / "out").mkdir()
    for save in (keras_vit.save_npz, keras_vit.save_safetensors):
        with pytest.raises(ValueError, match=r"cannot write .*out': it is a folder; give a file name"):
            save(model, tmp_path / "out")


def test_an_npz_named_safetensors_loads_as_an_npz(tmp_path, images):
    """The file's content decides: save_npz(model, "m.safetensors") wrote a zip that loading read as safetensors
    ("header too large")."""
    model = keras_vit.ViT(weights=cf.write(tmp_path / "m.npz", cf.vit_checkpoint(np.random.default_rng(0))), num_heads=2)
    keras_vit.save_npz(model, tmp_path / "odd.safetensors")
    again = keras_vit.ViT(weights=str(tmp_path / "odd.safetensors"))
    np.testing.assert_array_equal(np.asarray(again(images)), np.asarray(model(images)))


def test_a_keras_model_given_as_a_checkpoint_is_named_so(tmp_path):
    """A .keras file (a zip) was read as an .npz of three arrays: "missing keys (38) ... unexpected keys (3):
    config.json, metadata.json, model.weights.h5", or advice to pass num_heads=."""
    model = keras_vit.ViT(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                          num_classes=3)
    path = str(tmp_path / "m.keras")
    model.save(path)
    for load in (lambda: keras_vit.ViT(weights=path), lambda: keras_vit.load_weights(model, path)):
        with pytest.raises(ValueError, match=r"'.*m\.keras' is a Keras model \(\.keras\), not a checkpoint: load it "
                                             r"with keras_vit\.load_model\(path\)"):
            load()
