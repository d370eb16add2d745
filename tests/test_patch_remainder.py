"""patch_remainder='drop': an image size that is not a multiple of the patch size keeps
floor(H / P) x floor(W / P) patches and ignores the last pixels, as the VALID patch convolution of
timm, big_vision and transformers does (SigLIP So400m/14 at 384 px: 27 x 27 patches). Checked
against the independent NumPy references (whose convolutions floor the grid on their own), against
the same model on the cropped image, and through checkpoints that say such a size."""
from __future__ import annotations

import json

import ckpt_factory as cf
import family_factory as ff
import keras
import numpy as np
import pytest
import reference_family as rf
import reference_vit as ref
from safetensors.numpy import save_file

import keras_vit
from keras_vit import inspect as vit_inspect
from keras_vit.config import ViTConfig
from keras_vit.pretrain import patch_targets
from keras_vit.weights import read_checkpoint

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, num_classes=5)
TOL = 1e-4


def _images(size, seed=0, n=2):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype(np.float32)


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


# --- the option ---------------------------------------------------------------------------------
def test_drop_keeps_the_floor_of_the_grid():
    cfg = ViTConfig(patch_size=14, image_size=384, patch_remainder="drop")
    assert cfg.grid_size == (27, 27) and cfg.num_patches == 729
    assert ViTConfig(**TINY, patch_size=4, image_size=(10, 19), patch_remainder="drop").grid_size == (2, 4)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fields, message", [
    (dict(patch_size=14, image_size=384),
     "image_size 384x384 is not divisible by the patch size 14x14; use a multiple of it, e.g. 378x378, or set "
     "patch_remainder='drop'"),
    (dict(patch_remainder="floor"), "patch_remainder must be one of 'error', 'drop'; got 'floor'"),
    (dict(patch_size=16, image_size=(40, 12), patch_remainder="drop"), "image_size 40x12 is smaller than one 16x16"),
    (dict(variant="R26+S/32", image_size=40, patch_size=1, resnet_layers=(1, 1, 1, 1), patch_remainder="drop"),
     "patch_remainder='drop' is for the plain ViT"),
])
def test_bad_values_are_one_line(fields, message):
    with pytest.raises(ValueError) as exc:
        ViTConfig(**fields)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# --- the model ----------------------------------------------------------------------------------
def test_npz_checkpoint_matches_the_reference_on_the_whole_image(tmp_path):
    """The reference convolves the whole 11 x 14 image (VALID: 2 x 3 patches of 4), as big_vision does."""
    path = cf.write(tmp_path / "ViT-tiny.npz", cf.vit_checkpoint(np.random.default_rng(0), grid=(2, 3)))
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=(11, 14), patch_remainder="drop"),
                          weights=path)
    x = _images((11, 14))
    assert np.abs(np.asarray(model(x)) - ref.forward(path, x)).max() <= TOL


def test_same_logits_as_the_model_on_the_cropped_image():
    """Every pixel past the last whole patch is ignored: changing them changes nothing."""
    drop = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=(11, 14), patch_remainder="drop"))
    exact = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=(8, 12)))
    exact.set_weights(drop.get_weights())
    exact.get_layer("head").kernel.assign(np.random.default_rng(1).normal(size=(32, 5)).astype("float32"))
    drop.get_layer("head").kernel.assign(exact.get_layer("head").kernel)
    x = _images((11, 14), seed=2)
    y = x.copy()
    y[:, 8:], y[:, :, 12:] = 0.0, 255.0
    got = np.asarray(drop(x))
    np.testing.assert_allclose(got, np.asarray(exact(x[:, :8, :12])), atol=1e-5)
    np.testing.assert_array_equal(got, np.asarray(drop(y)))


def test_dynamic_size_takes_any_size():
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=8, dynamic_size=True,
                                           patch_remainder="drop"))
    model.get_layer("head").kernel.assign(np.random.default_rng(1).normal(size=(32, 5)).astype("float32"))
    x = _images((13, 18), seed=3)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(model(x[:, :12, :16])), atol=1e-5)
    maps = vit_inspect.attention_rollout(model, x)
    assert maps.shape == (2, 3, 4)
    strict = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=8, dynamic_size=True))
    with pytest.raises(ValueError, match="H a multiple of 4 and W a multiple of 4"):
        vit_inspect.attention_rollout(strict, x)


@pytest.mark.parametrize("way", ["call", "predict", "evaluate", "fit", "dataset"])
def test_dynamic_size_checks_the_images_it_is_given(way):
    """A dynamic_size model called, predicting, evaluating or fitting on images whose size breaks
    patch_remainder gets one ValueError naming the size (it dropped the last pixels of a 20 x 16 image
    without a word, and a 7 px image gave TensorFlow's reshape error); with 'drop' only an image
    smaller than a patch is refused."""
    def run(model, x):
        y = np.zeros(len(x), "int32")
        if way == "call":
            return model(x)
        if way == "predict":
            return model.predict(x, verbose=0)
        model.compile("adam", "sparse_categorical_crossentropy")
        if way == "evaluate":
            return model.evaluate(x, y, verbose=0)
        if way == "fit":
            return model.fit(x, y, epochs=1, verbose=0)
        import tensorflow as tf
        return model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(2), epochs=1, verbose=0)

    strict = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=8, image_size=16, dynamic_size=True))
    run(strict, _images((24, 16)))
    with pytest.raises(ValueError, match=r"the images' size 20x16 is not divisible by the patch size 8x8; "
                                         r"use a multiple of it, e\.g\. 16x16, or set patch_remainder='drop'"):
        run(strict, _images((20, 16)))
    drop = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=8, image_size=16, dynamic_size=True,
                                          patch_remainder="drop"))
    run(drop, _images((20, 16)))
    with pytest.raises(ValueError, match=r"the images' size 7x16 is smaller than one 8x8 patch"):
        run(drop, _images((7, 16)))
    with pytest.raises(ValueError, match=r"the images' size 0x16 is smaller than one 8x8 patch"):
        run(strict, _images((0, 16)))


def test_dynamic_size_checks_images_on_the_other_ways_in():
    """forward_intermediates (inspection, pre-training) and distillation_logits run the layers without
    the model's call: they check the images too."""
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=8, image_size=16, dynamic_size=True, distilled=True))
    assert model.forward_intermediates(_images((32, 40)))["tokens"].shape == (2, 2 + 20, 32)
    with pytest.raises(ValueError, match=r"the images' size 36x36 is not divisible by the patch size 8x8"):
        model.forward_intermediates(_images((36, 36)))
    with pytest.raises(ValueError, match=r"the images' size 36x36 is not divisible by the patch size 8x8"):
        model.distillation_logits(_images((36, 36)))


@pytest.mark.parametrize("dynamic_size", [False, True])
def test_images_of_other_channels_are_one_line(dynamic_size):
    """(B, H, W, 1) into a 3-channel model passes Keras' input check (a trailing 1 is let through) and failed
    in the patch embedding's reshape; the model names both channel counts."""
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=8, image_size=16, dynamic_size=dynamic_size))
    for run in (model, lambda x: model.predict(x, verbose=0)):
        with pytest.raises(ValueError, match=r"the images have 1 channels \(shape \(2, 16, 16, 1\)\); this model "
                                             r"takes 3 \(built with channels=3\)"):
            run(_images((16, 16))[..., :1])


def test_image_size_none_says_what_the_default_table_needs():
    """image_size=None learns the table at 224 px: a patch size that does not divide it is named as
    such (the user gave no 224), and dynamic_size=False beside it is a contradiction, not a fixed model."""
    with pytest.raises(ValueError, match=r"^image_size=None learns the position table at the default size, and "
                                         r"image_size 224x224 is not divisible by the patch size 12x12.*"
                                         r"give that image_size with dynamic_size=True$"):
        keras_vit.ViT(**{**TINY, "patch_size": 12}, variant=None, image_size=None)
    model = keras_vit.ViT(**{**TINY, "patch_size": 12}, variant=None, image_size=216, dynamic_size=True)
    assert model.vit_config.grid_size == (18, 18)
    with pytest.raises(ValueError, match=r"^image_size=None builds a model for any image size, which "
                                         r"dynamic_size=False contradicts"):
        keras_vit.ViT(**TINY, variant=None, patch_size=8, image_size=None, dynamic_size=False)


def test_notebook_fit_save_and_reload(tmp_path):
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=(10, 13), patch_remainder="drop"))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = _images((10, 13), n=8), np.arange(8) % 5
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.vit_config.patch_remainder == "drop"
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


# --- checkpoints that say such a size -----------------------------------------------------------
def _siglip_folder(tmp_path, size):
    """timm's SigLIP at 4 x 4 patches of 4, its config.json saying `size` px (as So400m/14's says 384)."""
    sd, arch, config = ff.family_state_dict(np.random.default_rng(4), "siglip", grid=(4, 4))
    config["model_args"]["img_size"] = [size, size]
    config["pretrained_cfg"]["input_size"] = [3, size, size]
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "model.safetensors"), sd, arch


def test_timm_config_json_with_such_a_size_loads_and_matches_timm(tmp_path):
    path, sd, arch = _siglip_folder(tmp_path, 18)
    assert read_checkpoint(path).defaults["patch_remainder"] == "drop"
    model = keras_vit.ViT(weights=path, include_top=False)
    assert model.vit_config.image_size == (18, 18) and model.vit_config.grid_size == (4, 4)
    x = _images((18, 18), seed=5)
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= TOL
    # A divisible size of the user's (the table resampled) needs no remainder.
    assert keras_vit.ViT(weights=path, include_top=False, image_size=20).vit_config.grid_size == (5, 5)


def test_hf_siglip_config_with_such_a_size(tmp_path):
    """transformers' SiglipVisionModel at 4 x 4 patches of 4, its config.json saying 19 px."""
    from hf_family_factory import timm_to_hf, write_folder

    sd, arch, _ = ff.family_state_dict(np.random.default_rng(6), "siglip", grid=(4, 4))
    arch = dict(arch, act="gelu_tanh")  # SigLIP's towers compute the tanh GELU (gelu_pytorch_tanh)
    hf_sd, config, pre = timm_to_hf(sd, arch, "siglip")
    folder = write_folder(tmp_path / "siglip", hf_sd, dict(config, image_size=19), pre)
    model = keras_vit.ViT(weights=folder)
    assert model.vit_config.patch_remainder == "drop" and model.vit_config.image_size == (19, 19)
    x = _images((19, 19), seed=7)
    assert _rel(model.predict(x, verbose=0), rf.forward(sd, arch, x)) <= TOL


def test_safetensors_round_trip_keeps_the_option(tmp_path):
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=(11, 14), patch_remainder="drop"))
    path = keras_vit.save_safetensors(model, tmp_path / "m.safetensors")
    again = keras_vit.ViT(weights=path)
    assert again.vit_config.patch_remainder == "drop" and again.vit_config.image_size == (11, 14)
    x = _images((11, 14), seed=8)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))


# --- analyses -----------------------------------------------------------------------------------
def test_masked_patch_targets_leave_out_the_remainder():
    x = _images((11, 14), seed=9)
    np.testing.assert_array_equal(patch_targets(x, (4, 4), "patch_regression"),
                                  patch_targets(x[:, :8, :12], (4, 4), "patch_regression"))
    assert patch_targets(x, (4, 4)).shape == (2, 6)


def test_upsample_map_with_the_stride_covers_the_patches_only():
    grid = np.arange(6, dtype=np.float32).reshape(2, 3)
    up = vit_inspect.upsample_map(grid, (11, 14), stride=(4, 4))
    assert up.shape == (11, 14)
    assert up[0, 0] == 0 and up[7, 11] == 5 and up[4, 4] == 4
    assert not up[8:].any() and not up[:, 12:].any()
    # Without a remainder the stride gives what stretching gives.
    np.testing.assert_array_equal(vit_inspect.upsample_map(grid, (8, 12), stride=(4, 4)),
                                  vit_inspect.upsample_map(grid, (8, 12)))


def test_inspect_model_writes_every_figure(tmp_path):
    model = keras_vit.ViT(config=ViTConfig(**TINY, patch_size=4, image_size=(11, 14), patch_remainder="drop"))
    written = vit_inspect.inspect_model(model, _images((11, 14), seed=10), str(tmp_path))
    assert (tmp_path / "attention_rollout.png").is_file() and "attention_maps" in written
