"""The hybrid's BiT-style ResNet: weight standardisation, "SAME" padding like flax, the official
unit structure (against the numpy reference), parameter counts, serialisation."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import reference_vit as ref

import keras_vit
from keras_vit.config import ViTConfig, parse_variant
from keras_vit.counts import _resnet_params
from keras_vit.resnet import BottleneckUnit, ResNetStem, StdConv2D


def test_std_conv_standardises_the_kernel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 4)).astype("float32")
    conv = StdConv2D(8, 3, strides=2)
    conv.build(x.shape)
    k = rng.standard_normal((3, 3, 4, 8)).astype("float32")
    conv.kernel.assign(k)
    y = np.asarray(conv(x))
    np.testing.assert_allclose(y, ref.std_conv(x.astype(np.float64), k.astype(np.float64), 2), rtol=5e-5, atol=1e-4)
    conv.kernel.assign(3.0 * k + 0.5)  # invariant to the kernel's per-filter scale and offset
    np.testing.assert_allclose(np.asarray(conv(x)), y, rtol=5e-5, atol=1e-4)
    assert y.shape == (2, 5, 5, 8)


@pytest.mark.parametrize("size", [9, 10, 32, 33])
def test_same_padding_matches_flax(size):
    """Stride-2 "SAME" pads asymmetrically (extra pixel after), like flax/XLA; pool pads with -inf."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, size, size, 3)).astype("float32")
    conv = StdConv2D(4, 7, strides=2)
    conv.build(x.shape)
    np.testing.assert_allclose(np.asarray(conv(x)), ref.std_conv(x.astype(np.float64),
                               np.asarray(conv.kernel, np.float64), 2), atol=1e-4)
    pool = keras.layers.MaxPooling2D(3, strides=2, padding="same")
    np.testing.assert_allclose(np.asarray(pool(-np.abs(x))), ref.max_pool_same(-np.abs(x)), atol=0)


def _random_stem(block_units, image, seed=0):
    stem = ResNetStem(block_units)
    stem.build((None,) + image.shape[1:])
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, var in stem.official_weights().items():
        value = rng.standard_normal(var.shape).astype("float32") * (0.1 if "/bias" in name else 1.0)
        if name.endswith("/scale"):
            value = 1.0 + 0.1 * value
        var.assign(value)
        arrays[name] = value
    return stem, arrays


def test_stem_matches_reference_unit_structure():
    image = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype("float32")
    stem, arrays = _random_stem((2, 1), image)
    out = np.asarray(stem(image))
    assert out.shape == (2, 4, 4, 512)  # total stride 4 * 2 = 8, width 64 * 2 * 4
    expected = ref.resnet(arrays, image.astype(np.float64))
    assert np.abs(out - expected).max() <= 1e-4
    assert set(arrays) >= {"conv_root/kernel", "gn_root/scale", "block1/unit1/conv_proj/kernel",
                           "block1/unit2/gn3/bias", "block2/unit1/gn_proj/scale"}
    assert "block1/unit2/conv_proj/kernel" not in arrays  # identity shortcut when shapes agree


def test_unit_zero_init_is_identity_after_relu():
    unit = BottleneckUnit(64)
    x = np.abs(np.random.default_rng(0).standard_normal((1, 4, 4, 256))).astype("float32")
    np.testing.assert_allclose(np.asarray(unit(x)), x, atol=1e-6)  # gn3 scale starts at 0


@pytest.mark.parametrize("variant,units", [("R50+B/16", (3, 4, 9)), ("R26+S/32", (2, 2, 2, 2))])
def test_stem_param_count(variant, units):
    cfg = parse_variant(variant)
    assert cfg.resnet_layers == units
    stem = ResNetStem(cfg.resnet_layers, width=cfg.resnet_width)
    stem.build((None, 224, 224, 3))
    assert stem.count_params() == _resnet_params(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("variant,size,expected", [
    ("R50+B/16", 224, 98_659_112), ("R50+L/32", 224, 328_994_856),
    ("R26+S/32", 224, 36_431_912), ("R50+B/16", 384, 98_950_952)])
def test_hybrid_param_counts(variant, size, expected):
    assert parse_variant(variant, image_size=size).count_params() == expected
    model = keras_vit.ViT(variant, image_size=size)
    assert model.count_params() == expected
    assert model.get_layer("resnet").output.shape[1:3] == tuple(parse_variant(variant, image_size=size).grid_size)


def test_hybrid_save_load_round_trip(tmp_path):
    cfg = ViTConfig(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=1, image_size=32,
                    num_classes=3, resnet_layers=(1, 1, 1))
    model = keras_vit.ViT(config=cfg)
    for v in model.weights:
        v.assign(np.random.default_rng(len(v.path)).standard_normal(v.shape).astype("float32") * 0.1 + (
            1.0 if v.path.endswith("gamma") else 0.0))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    path = str(tmp_path / "hybrid.keras")
    model.save(path)
    loaded = keras_vit.load_model(path)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))
    assert loaded.get_layer("resnet").get_config()["block_units"] == [1, 1, 1]
    cfg_stem = ResNetStem.from_config(model.get_layer("resnet").get_config())
    assert cfg_stem.block_units == (1, 1, 1)


def test_bad_block_units():
    with pytest.raises(ValueError, match="block_units"):
        ResNetStem(())
