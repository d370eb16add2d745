"""Fine-tuning at a new resolution: position embeddings resampled on their 2-D grid (class slot
kept), for every pos_embedding kind, from an .npz or from a model in memory / on disk."""
from __future__ import annotations

import ckpt_factory as cf
import keras
import numpy as np
import pytest
import reference_vit as ref
import scipy.ndimage

import keras_vit
from keras_vit.config import ViTConfig
from keras_vit.weights.resize import (
    infer_grid,
    interpolation_matrix,
    resample_grid,
    resample_position_embeddings,
    resample_relative_embedding,
)

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, num_classes=5)


def _randomise(model, seed=0):
    for v in model.weights:
        v.assign(np.random.default_rng(seed + len(v.path)).standard_normal(v.shape).astype("float32") * 0.1)
    return model


@pytest.mark.parametrize("old,new", [((7, 7), (12, 12)), ((4, 6), (9, 5)), ((14, 14), (7, 7)), ((3, 3), (3, 3))])
def test_linear_is_the_official_scipy_zoom(old, new):
    grid = np.random.default_rng(0).standard_normal(old + (5,))
    zoomed = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert zoomed.shape[:2] == new
    np.testing.assert_allclose(resample_grid(grid, new, "linear"), zoomed, atol=1e-12)


@pytest.mark.parametrize("method", ["linear", "bilinear", "bicubic", "nearest", "bicubic_antialias"])
def test_methods_preserve_constants_and_identity(method):
    w = interpolation_matrix(5, 9, method)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)  # a constant stays constant
    np.testing.assert_allclose(interpolation_matrix(6, 6, method), np.eye(6), atol=1e-12)


def test_bad_method():
    with pytest.raises(ValueError, match="interpolation method 'area' is not supported; allowed: linear"):
        resample_position_embeddings(np.zeros((1, 5, 4)), (3, 3), method="area")


def test_class_slot_is_kept_and_grid_inferred():
    pe = np.random.default_rng(0).standard_normal((1, 1 + 16, 8)).astype("float32")
    out = resample_position_embeddings(pe, (6, 3))
    assert out.shape == (1, 1 + 18, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :1], pe[:, :1])
    grid = scipy.ndimage.zoom(pe[0, 1:].reshape(4, 4, 8), (6 / 4, 3 / 4, 1), order=1)
    np.testing.assert_allclose(out[0, 1:], grid.reshape(18, 8), atol=1e-6)
    assert infer_grid(12, (3, 4)) == (3, 4) and infer_grid(12, (4, 3)) == (4, 3)
    np.testing.assert_array_equal(resample_position_embeddings(pe, (4, 4)), pe)


def test_relative_table_keeps_prefix_slot():
    table = np.random.default_rng(0).standard_normal((3 * 5 + 1, 2, 4))  # grid 2x3 + the class slot
    out = resample_relative_embedding(table, (4, 2))
    assert out.shape == (7 * 3 + 1, 2, 4)
    np.testing.assert_array_equal(out[-1], table[-1])


@pytest.mark.parametrize("new_size", [16, (12, 20)])
def test_vit_at_new_resolution_from_npz_matches_reference(tmp_path, new_size):
    """ViT(image_size=new, weights=npz trained at 8 px) == the reference run on the checkpoint
    whose position embeddings were zoomed by scipy, the official code's way."""
    rng = np.random.default_rng(0)
    arrays = cf.vit_checkpoint(rng, grid=(2, 2))
    path = cf.write(tmp_path / "at8.npz", arrays)
    model = keras_vit.ViT(config=ViTConfig(patch_size=4, image_size=new_size, **TINY), weights=path)
    gh, gw = model.vit_config.grid_size
    pe = arrays["Transformer/posembed_input/pos_embedding"]
    zoomed = scipy.ndimage.zoom(pe[0, 1:].reshape(2, 2, -1), (gh / 2, gw / 2, 1), order=1)
    official = dict(arrays)
    official["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [pe[:, :1], zoomed.reshape(1, gh * gw, -1)], axis=1)
    ref_path = cf.write(tmp_path / "resized.npz", official)
    h, w = model.vit_config.image_size
    x = rng.uniform(0, 255, (2, h, w, 3)).astype("float32")
    assert np.abs(np.asarray(model(x)) - ref.forward(ref_path, x)).max() <= 1e-4


def test_hybrid_at_new_resolution(tmp_path):
    rng = np.random.default_rng(1)
    arrays = cf.vit_checkpoint(rng, patch=1, grid=(2, 2), resnet=(1, 1, 1))
    path = cf.write(tmp_path / "hyb.npz", arrays)
    cfg = ViTConfig(patch_size=1, image_size=48, resnet_layers=(1, 1, 1), **TINY)
    model = keras_vit.ViT(config=cfg, weights=path)
    assert model.get_layer("posembed_input").pos_embedding.shape == (1, 1 + 9, 32)
    np.testing.assert_array_equal(np.asarray(model.get_layer("resnet").conv_root.kernel), arrays["conv_root/kernel"])
    x = rng.uniform(0, 255, (1, 48, 48, 3)).astype("float32")
    assert np.isfinite(np.asarray(model(x))).all()


@pytest.mark.parametrize("size", [(36, 50), (32, 32), (17, 64)])
def test_dynamic_hybrid_at_any_size_matches_reference(tmp_path, size):
    """A dynamic-size hybrid takes any H x W, as timm's dynamic_img_size: its ResNet pads (SAME), so
    the patch grid is ceil(H / 16) x ceil(W / 16) and the position table is resampled to that grid
    (36 x 50 px -> 3 x 4 tokens, where H // 16 would give 2 x 3 and a shape error)."""
    rng = np.random.default_rng(2)
    arrays = cf.vit_checkpoint(rng, patch=1, grid=(2, 2), resnet=(1, 1, 1))
    path = cf.write(tmp_path / "hyb.npz", arrays)
    model = keras_vit.ViT(config=ViTConfig(patch_size=1, image_size=32, resnet_layers=(1, 1, 1), **TINY),
                          weights=path, image_size=None)
    grid = tuple(-(-n // 16) for n in size)
    resized = dict(arrays)
    resized["Transformer/posembed_input/pos_embedding"] = resample_position_embeddings(
        arrays["Transformer/posembed_input/pos_embedding"], grid)
    x = rng.uniform(0, 255, (2, *size, 3)).astype("float32")
    want = ref.forward(cf.write(tmp_path / "at_grid.npz", resized), x)
    assert np.abs(model.predict(x, verbose=0) - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["learned", "learned_2d", "relative", "sincos2d", "none"])
def test_resize_model_every_kind(tmp_path, kind):
    cfg = ViTConfig(patch_size=4, image_size=16, pos_embedding=kind, **TINY)
    model = _randomise(keras_vit.ViT(config=cfg))
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    # Through a .keras file, to show it works for a model loaded from disk.
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras_vit.load_model(path)
    same = keras_vit.resize_model(loaded, image_size=16)
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(model(x)), atol=1e-6)
    big = keras_vit.resize_model(loaded, image_size=(24, 32))
    assert big.vit_config.grid_size == (6, 8) and big.vit_config.image_size == (24, 32)
    y = np.asarray(big(np.random.default_rng(1).uniform(0, 255, (2, 24, 32, 3)).astype("float32")))
    assert y.shape == (2, 5) and np.isfinite(y).all()
    pe_old, pe_new = model.get_layer("posembed_input"), big.get_layer("posembed_input")
    if kind == "learned":
        np.testing.assert_array_equal(np.asarray(pe_new.pos_embedding)[:, :1], np.asarray(pe_old.pos_embedding)[:, :1])
        np.testing.assert_allclose(np.asarray(pe_new.pos_embedding), resample_position_embeddings(
            np.asarray(pe_old.pos_embedding), (6, 8), old_grid=(4, 4)), atol=1e-6)
    elif kind == "learned_2d":
        assert pe_new.row_embedding.shape == (6, 16) and pe_new.col_embedding.shape == (8, 16)
        np.testing.assert_array_equal(np.asarray(pe_new.prefix_embedding), np.asarray(pe_old.prefix_embedding))
    elif kind == "relative":
        table = big.get_layer("encoderblock_0").attention.relative_embedding
        assert table.shape == (11 * 15 + 1, 2, 16)
    # Every weight that does not depend on the grid is copied unchanged.
    np.testing.assert_array_equal(np.asarray(big.get_layer("encoderblock_1").mlp.dense_0.kernel),
                                  np.asarray(model.get_layer("encoderblock_1").mlp.dense_0.kernel))


@pytest.mark.slow
def test_resize_keeps_what_was_learned():
    """A model trained at 16 px (4x4 patches) and resized to 28 px (7x7: the paper's 224 -> 384
    ratio) classifies most of its (upsampled) training images as before, far more than with
    position embeddings that lost their grid. Training uses scale augmentation, as the paper's
    pre-training does (Inception crops), so the patch embedding is not tied to one scale."""
    from keras_vit.data import digits_arrays

    x_tr, y_tr, _, _ = digits_arrays()
    small = np.asarray(keras.ops.image.resize(x_tr, (16, 16)))
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT(config=ViTConfig(hidden_size=48, mlp_dim=96, num_heads=3, num_layers=2, patch_size=4,
                                           image_size=16, num_classes=10))
    images = keras.Input((16, 16, 3))
    trainer = keras.Model(images, model(keras.layers.RandomZoom((-0.3, 0.3), fill_mode="constant")(images)))
    trainer.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer.fit(small, y_tr, batch_size=64, epochs=20, verbose=0)
    before = model.predict(small, verbose=0).argmax(-1)
    assert (before == y_tr).mean() > 0.9

    big = keras_vit.resize_model(model, image_size=28)
    upsampled = np.asarray(keras.ops.image.resize(x_tr, (28, 28)))
    agreement = (big.predict(upsampled, verbose=0).argmax(-1) == before).mean()
    pe = big.get_layer("posembed_input").pos_embedding  # control: same weights, grid structure lost
    pe.assign(np.random.default_rng(0).permutation(np.asarray(pe)[0])[None])
    control = (big.predict(upsampled, verbose=0).argmax(-1) == before).mean()
    assert agreement >= 0.6 and agreement >= control + 0.25, (agreement, control)


def test_big_vision_checkpoint_at_new_resolution(tmp_path):
    """big_vision's position embeddings (no class slot) resample to the same model."""
    arrays = cf.vit_checkpoint(np.random.default_rng(2), grid=(2, 2))
    cfg = ViTConfig(patch_size=4, image_size=(12, 16), **TINY)
    vit = keras_vit.ViT(config=cfg, weights=cf.write(tmp_path / "vit.npz", arrays))
    bv = keras_vit.ViT(config=cfg, weights=cf.write(tmp_path / "bv.npz", cf.to_big_vision(arrays, scan=True)))
    x = np.random.default_rng(0).uniform(0, 255, (2, 12, 16, 3)).astype("float32")
    # vit adds cls + E_pos[0]; big_vision folded E_pos[0] into cls: the same logits.
    assert np.abs(np.asarray(vit(x)) - np.asarray(bv(x))).max() <= 1e-5


def test_relative_and_2d_checkpoints_load_at_new_resolution(tmp_path):
    for kind in ("relative", "learned_2d"):
        model = _randomise(keras_vit.ViT(config=ViTConfig(patch_size=4, image_size=16, pos_embedding=kind, **TINY)))
        path = keras_vit.save_npz(model, tmp_path / f"{kind}.npz")
        big = keras_vit.ViT(config=ViTConfig(patch_size=4, image_size=(24, 32), pos_embedding=kind, **TINY),
                            weights=path)
        if kind == "relative":
            old = np.asarray(model.get_layer("encoderblock_1").attention.relative_embedding)
            new = np.asarray(big.get_layer("encoderblock_1").attention.relative_embedding)
            np.testing.assert_allclose(new, resample_relative_embedding(old, (6, 8), old_grid=(4, 4)), atol=1e-6)
        else:
            old = np.asarray(model.get_layer("posembed_input").col_embedding)
            np.testing.assert_allclose(np.asarray(big.get_layer("posembed_input").col_embedding),
                                       scipy.ndimage.zoom(old, (8 / 4, 1), order=1), atol=1e-6)
