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
    normed = ref.encoder(ckpt, images)[2]
    assert np.abs(tokens - normed).max() <= TOL


def test_feature_layers_are_patch_maps_of_those_blocks(ckpt, images, tmp_path):
    model = keras_vit.ViT(config=ViTConfig(**TINY, include_top=False, feature_layers=(2, 0)), weights=ckpt)
    out = model(images)
    assert list(out) == ["block_2", "block_0"]
    maps = [np.asarray(out[k]) for k in out]
    blocks = ref.encoder(ckpt, images)[0]
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


def test_forward_intermediates_match_reference(ckpt, images):
    """Any model (here a classifier) gives its blocks' outputs, attention probabilities and
    normed tokens: those of the NumPy reference."""
    model = keras_vit.ViT(config=ViTConfig(**TINY), weights=ckpt)
    out = model.forward_intermediates(images, attention=True)
    blocks, probs, normed = ref.encoder(ckpt, images)
    assert len(out["blocks"]) == len(out["attention"]) == 3
    for got, want in zip(out["blocks"], blocks):
        assert np.abs(np.asarray(got) - want).max() <= TOL
    for got, want in zip(out["attention"], probs):
        assert np.asarray(got).shape == (2, 2, 7, 7) and np.abs(np.asarray(got) - want).max() <= 1e-5
    assert np.abs(np.asarray(out["tokens"]) - normed).max() <= TOL
    assert "attention" not in model.forward_intermediates(images)


def test_forward_intermediates_build_a_model_on_the_same_weights(ckpt, images, tmp_path):
    """On a keras.Input they build a functional model sharing the weights (attention as graph
    outputs); the model itself, its outputs and its config stay as they were."""
    import keras

    model = keras_vit.ViT(config=ViTConfig(**TINY), weights=ckpt)
    logits, config = np.asarray(model(images)), model.get_config()
    inputs = keras.Input((8, 12, 3))
    probe = keras.Model(inputs, model.forward_intermediates(inputs, attention=True)["attention"])
    shared = {id(v) for v in model.weights}
    assert probe.weights and all(id(v) in shared for v in probe.weights)
    eager = model.forward_intermediates(images, attention=True)["attention"]
    for a, b in zip(probe(images), eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model(images)), logits)
    assert model.get_config() == config and len(model.outputs) == 1
    probe.save(tmp_path / "probe.keras")
    for a, b in zip(probe(images), keras.saving.load_model(tmp_path / "probe.keras")(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_forward_intermediates_of_a_features_model_stop_at_its_last_block(ckpt, images):
    full = keras_vit.ViT(config=ViTConfig(**TINY), weights=ckpt).forward_intermediates(images, attention=True)
    part = keras_vit.ViT(config=ViTConfig(**TINY, include_top=False, feature_layers=(1,)), weights=ckpt)
    out = part.forward_intermediates(images, attention=True)
    assert len(out["attention"]) == 2 and "tokens" not in out
    for a, b in zip(out["attention"], full["attention"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_readme_forward_intermediates_example():
    import os

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = text[text.index("## Features for dense tasks"):]
    code = section.split("```python")[2].split("```", 1)[0]
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    scope = {"images": images}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example, as written
    out = scope["out"]
    assert [np.shape(b) for b in out["blocks"]] == [(2, 17, 192)] * 12 and np.shape(out["tokens"]) == (2, 17, 192)
    assert [np.shape(a) for a in out["attention"]] == [(2, 3, 17, 17)] * 12
    np.testing.assert_allclose(np.asarray(out["attention"][5]).sum(-1), 1.0, atol=1e-5)
    for a, b in zip(scope["probe"](images), out["attention"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
