"""Features for dense tasks: output="tokens" (B, S, D) and feature_layers -> (B, H/P, W/P, D) maps,
checked against the independent NumPy reference's encoder run block by block."""
from __future__ import annotations

import ckpt_factory as cf
import numpy as np
import pytest
import reference_vit as ref

import keras_vit
from keras_vit.config import ViTConfig

TOL = 1e-4
TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=3, patch_size=4, image_size=(8, 12), num_classes=5)


def reference_tokens(path, images):
    """Per-block token sequences (B, S, D) and the encoder-normed output of the reference ViT."""
    ck = ref.Checkpoint(path)
    x = np.asarray(images, np.float64) / 127.5 - 1.0
    x = ref.conv2d(x, ck["embedding/kernel"], stride=ck["embedding/kernel"].shape[0], padding="VALID")
    x = x + ck["embedding/bias"]
    b, gh, gw, d = x.shape
    x = np.concatenate([np.broadcast_to(ck["cls"], (b, 1, d)), x.reshape(b, gh * gw, d)], axis=1)
    x = x + ck["Transformer/posembed_input/pos_embedding"]
    blocks = []
    for i in range(ck.num_layers()):
        x = ref.encoder_block(ck, i, x)
        blocks.append(x)
    return blocks, ref.layer_norm(x, ck["Transformer/encoder_norm/scale"], ck["Transformer/encoder_norm/bias"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    arrays = cf.vit_checkpoint(np.random.default_rng(0), layers=3, grid=(2, 3))
    return cf.write(tmp_path_factory.mktemp("f") / "vit.npz", arrays)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0, 255, (2, 8, 12, 3)).astype(np.float32)


def test_tokens_match_reference(ckpt, images):
    model = keras_vit.ViT(config=ViTConfig(**TINY, include_top=False, output="tokens"), weights=ckpt)
    tokens = np.asarray(model(images))
    assert tokens.shape == (2, 1 + 2 * 3, 32)
    _, normed = reference_tokens(ckpt, images)
    assert np.abs(tokens - normed).max() <= TOL


def test_feature_layers_are_patch_maps_of_those_blocks(ckpt, images, tmp_path):
    model = keras_vit.ViT(config=ViTConfig(**TINY, include_top=False, feature_layers=(2, 0)), weights=ckpt)
    out = model(images)
    assert list(out) == ["block_2", "block_0"]
    maps = [np.asarray(out[k]) for k in out]
    blocks, _ = reference_tokens(ckpt, images)
    assert [m.shape for m in maps] == [(2, 2, 3, 32)] * 2
    for got, i in zip(maps, (2, 0)):
        want = blocks[i][:, 1:].reshape(2, 2, 3, 32)  # class token dropped, row-major patches
        assert np.abs(got - want).max() <= TOL, i
    model.save(tmp_path / "features.keras")
    again = keras_vit.load_model(tmp_path / "features.keras")
    for a, b in zip(maps, again(images).values()):
        np.testing.assert_array_equal(a, np.asarray(b))
    last = keras_vit.ViT(config=ViTConfig(**TINY, include_top=False, feature_layers=(-1,)), weights=ckpt)
    assert last.vit_config.feature_layers == (2,)
    np.testing.assert_allclose(np.asarray(last(images)["block_2"]), maps[0], atol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(output="tokens"), "include_top=False"),
    (dict(include_top=False, output="patches"), "output must be one of"),
    (dict(include_top=False, feature_layers=(3,)), r"feature_layers must be distinct block indices in \[-3, 3\)"),
    (dict(include_top=False, feature_layers=(1, 1)), "distinct"),
    (dict(include_top=False, feature_layers=(1,), output="tokens"), "not both"),
])
def test_bad_feature_options(options, message):
    with pytest.raises(ValueError, match=message):
        keras_vit.ViT(config=ViTConfig(**TINY), **options)
