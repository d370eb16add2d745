"""The token and head options of issue #26 (class_token, num_registers, distilled, pre_norm, fc_norm,
classifier="map", pixel_mean/pixel_std) against NumPy float64: the layers against their formulas,
whole models against tests/reference_vit.py (written from timm / big_vision, reading the saved
.npz), the distillation heads, resizing, inspection and the analytic counts."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import reference_vit as ref

import keras_vit
import keras_vit.inspect
from keras_vit import layers as L
from keras_vit.config import ViTConfig
from keras_vit.weights.resize import resample_position_embeddings

TOL = 1e-4
TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, image_size=32, patch_size=8, num_classes=10)
IMAGENET = dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
# Each option on its own and in the combinations the checkpoints of the family use.
OPTIONS = {
    "registers": dict(num_registers=3),
    "distilled": dict(distilled=True),
    "deit_reg_pre_logits": dict(distilled=True, num_registers=2, representation_size=16),
    "map_no_cls": dict(classifier="map"),
    "map_cls_registers": dict(classifier="map", class_token=True, num_registers=2, fc_norm=True),
    "cls_gap_fc_norm": dict(classifier="gap", class_token=True, fc_norm=True),
    "gap_registers": dict(classifier="gap", num_registers=2),
    "pre_norm_mean_std": dict(pre_norm=True, **IMAGENET),
    "clip_like": dict(pre_norm=True, pixel_mean=(0.48145466, 0.4578275, 0.40821073),
                      pixel_std=(0.26862954, 0.26130258, 0.27577711)),
    "distilled_no_top": dict(distilled=True, include_top=False),
    "dinov2_reg": dict(num_registers=4, **IMAGENET),
    # SoViT-150M reg4 MAP (timm): registers with position rows, MAP over the patch tokens alone
    "so150m_reg_map": dict(classifier="map", num_registers=4, register_pos_embedding=True, pool_include_prefix=False),
    "cls_reg_pos_map": dict(classifier="map", class_token=True, num_registers=2, register_pos_embedding=True,
                            pool_include_prefix=False, fc_norm=True),
}


def random_model(cfg: ViTConfig, seed: int = 0) -> keras.Model:
    """The model of `cfg` with every weight random (zero-initialised tokens and heads included)."""
    keras.utils.set_random_seed(seed)
    model = keras_vit.ViT(config=cfg)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(0.0, 0.3, w.shape).astype("float32"))
    return model


def images(n: int = 3, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def reference(model: keras.Model, path, x: np.ndarray) -> np.ndarray:
    """reference_vit.forward of the model's save_npz file."""
    cfg = model.vit_config
    keras_vit.save_npz(model, path)
    return ref.forward(path, x, cfg.classifier, cfg.class_token, cfg.pixel_mean, cfg.pixel_std,
                       pool_include_prefix=cfg.pool_include_prefix)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_model_matches_the_numpy_reference(name, tmp_path):
    cfg = ViTConfig(**{**TINY, **OPTIONS[name]})
    model = random_model(cfg)
    x = images()
    out = np.asarray(model(x, training=False))
    expected = reference(model, tmp_path / "m.npz", x)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=TOL * max(1.0, np.abs(expected).max()))
    assert model.count_params() == cfg.count_params()
    assert tuple(model.get_layer("encoderblock_0").output.shape)[1] == cfg.seq_len


@pytest.mark.parametrize("name", ["registers", "map_cls_registers", "distilled", "cls_reg_pos_map"])
def test_tokens_forward_intermediates_and_feature_maps_skip_every_prefix_token(name, tmp_path):
    cfg = ViTConfig(**{**TINY, **OPTIONS[name]})
    model = random_model(cfg)
    x = images(2)
    keras_vit.save_npz(model, tmp_path / "m.npz")
    blocks, _, tokens = ref.encoder(tmp_path / "m.npz", x, cfg.classifier, cfg.class_token)
    inter = model.forward_intermediates(keras.ops.convert_to_tensor(x))
    np.testing.assert_allclose(np.asarray(inter["blocks"][0]), blocks[0], atol=TOL * 10)
    np.testing.assert_allclose(np.asarray(inter["tokens"]), tokens, atol=TOL * 10)
    features = keras_vit.ViT(config=cfg.replace(include_top=False, feature_layers=(0,)))
    keras_vit.load_npz(features, tmp_path / "m.npz")
    maps = np.asarray(features(x)["block_0"])
    p = cfg.num_prefix_tokens
    np.testing.assert_allclose(maps, blocks[0][:, p:].reshape(2, 4, 4, 32), atol=TOL * 10)


def test_distilled_output_is_the_mean_of_both_heads():
    cfg = ViTConfig(**{**TINY, **OPTIONS["distilled"]})
    model = random_model(cfg)
    x = images()
    cls_logits, dist_logits = model.distillation_logits(x)
    cls_logits, dist_logits = np.asarray(cls_logits), np.asarray(dist_logits)
    tokens = np.asarray(model.forward_intermediates(keras.ops.convert_to_tensor(x))["tokens"], np.float64)
    weights = {k: np.asarray(v, np.float64) for k, v in keras_vit.weights.model_arrays(model).items()}
    np.testing.assert_allclose(cls_logits, tokens[:, 0] @ weights["head/kernel"] + weights["head/bias"], atol=TOL)
    np.testing.assert_allclose(dist_logits, tokens[:, 1] @ weights["head_dist/kernel"] + weights["head_dist/bias"],
                               atol=TOL)
    np.testing.assert_allclose(np.asarray(model(x)), (cls_logits + dist_logits) / 2, atol=1e-5)
    assert np.abs(cls_logits - dist_logits).max() > 0.1  # two different heads
    # The last block computes the two tokens the heads read, and only them (forward_intermediates: all)
    last = model.get_layer(f"encoderblock_{cfg.num_layers - 1}")
    assert tuple(last.output.shape) == (None, 2, cfg.hidden_size)
    with pytest.raises(ValueError, match="distilled=True"):
        keras_vit.ViT(config=ViTConfig(**TINY)).distillation_logits(x)


def test_register_tokens_are_inserted_after_the_prefix(rng):
    x = rng.normal(size=(2, 5, 4)).astype("float32")
    layer = L.RegisterTokens(3, index=2)
    y = keras.ops.convert_to_numpy(layer(x))
    reg = keras.ops.convert_to_numpy(layer.reg)
    assert y.shape == (2, 8, 4)
    np.testing.assert_array_equal(y[:, :2], x[:, :2])
    np.testing.assert_array_equal(y[:, 2:5], np.broadcast_to(reg, (2, 3, 4)))
    np.testing.assert_array_equal(y[:, 5:], x[:, 2:])
    assert L.RegisterTokens.from_config(layer.get_config()).get_config() == layer.get_config()


def test_gap_and_token_pooling_skip_prefix_tokens(rng):
    x = rng.normal(size=(2, 7, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(L.TokenPooling("gap", num_prefix_tokens=3)(x)),
                               x[:, 3:].mean(1), atol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(L.TokenPooling("token", index=1)(x)), x[:, 1])


def test_map_head_is_big_vision_map_head(rng):
    x = rng.normal(size=(2, 6, 8))
    layer = L.MAPHead(num_heads=2, mlp_dim=16)
    layer.build((None, 6, 8))
    for w in layer.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    w = {v.path.split("/")[-1]: keras.ops.convert_to_numpy(v).astype(np.float64) for v in layer.weights}
    probe = np.broadcast_to(w["probe"], (2, 1, 8))
    q = np.einsum("btd,dhk->bthk", probe, w["query_kernel"]) + w["query_bias"]
    k = np.einsum("btd,dhk->bthk", x, w["key_kernel"]) + w["key_bias"]
    v = np.einsum("btd,dhk->bthk", x, w["value_kernel"]) + w["value_bias"]
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(4)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.einsum("bqhk,hkd->bqd", np.einsum("bhqt,bthk->bqhk", p, v), w["out_kernel"]) + w["out_bias"]
    ln = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6) * w["gamma"] + w["beta"]
    h = ref.gelu_tanh(ln @ layer.mlp.dense_0.kernel.numpy() + layer.mlp.dense_0.bias.numpy())
    expected = (y + h @ layer.mlp.dense_1.kernel.numpy() + layer.mlp.dense_1.bias.numpy())[:, 0]
    out = keras.ops.convert_to_numpy(layer(x.astype("float32")))
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert L.MAPHead.from_config(layer.get_config()).get_config() == layer.get_config()


def test_preprocessing_default_is_unchanged_and_mean_std_is_per_channel():
    default = keras_vit.ViT(config=ViTConfig(**TINY)).get_layer("preprocessing")
    assert default.scale == 1.0 / 127.5 and default.offset == -1.0
    model = keras_vit.ViT(config=ViTConfig(**TINY, **IMAGENET))
    x = images(1)
    out = keras.ops.convert_to_numpy(model.get_layer("preprocessing")(x))
    expected = (x / 255.0 - np.array(IMAGENET["pixel_mean"])) / np.array(IMAGENET["pixel_std"])
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(classifier="token", class_token=False), "class_token=False"),
    (dict(classifier="gap", distilled=True), "distilled=True needs"),
    (dict(num_registers=-1), "num_registers must be an integer >= 0, got -1"),
    (dict(num_registers=1.5), "num_registers"),
    (dict(classifier="mean"), "classifier must be one of token, gap, map; got 'mean'"),
    (dict(pixel_mean=(0.5, 0.5, 0.5)), "give pixel_mean and pixel_std together"),
    (dict(pixel_mean=(0.5, 0.5), pixel_std=(0.5, 0.5)), r"pixel_mean must be 3 numbers"),
    (dict(pixel_mean=(0.5,) * 3, pixel_std=(0.5, 0.0, 0.5)), r"pixel_std must be 3 numbers in \(0, 1\]"),
    # a std on the 0-255 scale beside a [0, 1] mean was taken (the std check was only > 0)
    (dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(58.395, 57.12, 57.375)),
     r"pixel_std must be 3 numbers in \(0, 1\] .*ImageNet's std 0.229, not 58.395\), got \(58.395"),
    (dict(class_token=1), "class_token must be None, True or False, got 1"),  # 1 == True: taken and stored as 1
    (dict(classifier="gap", class_token=0), "class_token must be None, True or False, got 0"),
    # the 0-255 scale (timm's constants times 255) and NaN were taken as they were
    (dict(pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375)),
     r"pixel_mean must be 3 numbers in \[0, 1\] \(one per channel, on the \[0, 1\] scale"),
    (dict(pixel_mean=(0.5,) * 3, pixel_std=(float("nan"), 0.5, 0.5)), r"pixel_std must be 3 numbers in \(0, 1\]"),
    (dict(fc_norm="yes"), "fc_norm must be True or False"),
])
def test_bad_token_options_are_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        ViTConfig(**{**TINY, **kwargs})
    assert "\n" not in str(err.value)


def test_old_config_dicts_load_with_todays_behaviour():
    old = ViTConfig(**TINY).to_dict()
    for key in ("class_token", "num_registers", "distilled", "pre_norm", "fc_norm", "pixel_mean", "pixel_std"):
        old.pop(key)
    cfg = ViTConfig.from_dict(old)
    assert cfg == ViTConfig(**TINY) and cfg.num_prefix_tokens == 1 and cfg.seq_len == 17
    assert ViTConfig.from_dict(old | {"classifier": "gap"}).num_prefix_tokens == 0
    full = ViTConfig(**{**TINY, **OPTIONS["map_cls_registers"], **IMAGENET})
    assert ViTConfig.from_dict(full.to_dict()) == full
    assert (full.num_pos_prefix_tokens, full.num_prefix_tokens, full.seq_len) == (1, 3, 19)


# reference_vit has no relative bias nor 2-D embeddings: these are compared with the library's own load at 48 px.
LIBRARY_ONLY = {"deit_reg_relative": dict(distilled=True, num_registers=2, pos_embedding="relative"),
                "gap_registers_learned_2d": dict(classifier="gap", num_registers=2, pos_embedding="learned_2d"),
                "map_registers_sincos2d": dict(classifier="map", num_registers=2, pos_embedding="sincos2d")}


@pytest.mark.parametrize("name", ["deit_reg_pre_logits", "registers", "map_cls_registers", "cls_reg_pos_map",
                                  *LIBRARY_ONLY])
def test_resize_with_registers_and_distillation(name, tmp_path):
    """resize_model keeps the class and distillation slots of the position embeddings, resamples
    the patch grid and leaves the registers (which have none) as they are: the reference of the
    resampled table at 48 px."""
    cfg = ViTConfig(**{**TINY, **LIBRARY_ONLY.get(name, OPTIONS.get(name, {}))})
    model = random_model(cfg)
    resized = keras_vit.resize_model(model, 48)
    x = images(2, 48)
    arrays = keras_vit.weights.model_arrays(model)
    pe = "Transformer/posembed_input/pos_embedding"
    if pe in arrays:
        arrays[pe] = resample_position_embeddings(arrays[pe], (6, 6), cfg.num_pos_prefix_tokens, old_grid=(4, 4))
        np.savez(tmp_path / "r.npz", **arrays)
        expected = ref.forward(tmp_path / "r.npz", x, cfg.classifier, cfg.class_token,
                               pool_include_prefix=cfg.pool_include_prefix)
    else:  # relative, learned_2d: compare with the model the library builds at 48 px from the file
        keras_vit.save_npz(model, tmp_path / "m.npz")
        again = keras_vit.ViT(config=cfg.replace(image_size=48))
        keras_vit.load_npz(again, tmp_path / "m.npz")
        expected = np.asarray(again(x))
    np.testing.assert_allclose(np.asarray(resized(x)), expected, atol=TOL * max(1.0, np.abs(expected).max()))
    assert resized.count_params() == cfg.replace(image_size=48).count_params()


@pytest.mark.parametrize("name", ["registers", "map_no_cls", "deit_reg_pre_logits"])
def test_inspection_uses_the_patch_grid_only(name, tmp_path):
    cfg = ViTConfig(**{**TINY, **OPTIONS[name]})
    model = random_model(cfg)
    x = images(2)
    maps = keras_vit.inspect.attention_maps(model, x)
    assert maps[0].shape == (2, 2, cfg.seq_len, cfg.seq_len)
    keras_vit.save_npz(model, tmp_path / "m.npz")
    _, probs, _ = ref.encoder(tmp_path / "m.npz", x, cfg.classifier, cfg.class_token)
    np.testing.assert_allclose(maps[1], probs[1], atol=1e-4)
    p = cfg.num_prefix_tokens
    rollout = keras_vit.inspect.attention_rollout(model, x)
    assert rollout.shape == (2, 4, 4)
    fused = [0.5 * a.mean(1) + 0.5 * np.eye(cfg.seq_len) for a in probs]
    r = fused[1] @ fused[0]
    row = r[:, 0, p:] if cfg.classifier == "token" else r[:, p:, p:].mean(1)
    np.testing.assert_allclose(rollout.reshape(2, -1), row / row.sum(-1, keepdims=True), atol=1e-4)
    assert keras_vit.inspect.mean_attention_distance(model, x).shape == (2, 2)
    if cfg.pos_embedding == "learned":
        assert keras_vit.inspect.position_embedding_similarity(model).shape == (4, 4, 4, 4)


def test_distilled_features_and_linear_probe():
    """Few-shot features of a distilled classifier are the mean of both tokens' features (what
    include_top=False returns); the linear probe trains both heads."""
    from keras_vit.fewshot import feature_extractor
    from keras_vit.finetune import freeze_backbone

    cfg = ViTConfig(**{**TINY, **OPTIONS["deit_reg_pre_logits"]})
    model = random_model(cfg)
    headless = keras_vit.ViT(config=cfg.replace(include_top=False))
    keras_vit.weights.assign_weights(headless, keras_vit.weights.model_arrays(model))
    x = images(2)
    np.testing.assert_allclose(np.asarray(feature_extractor(model)(x)), np.asarray(headless(x)), atol=1e-6)
    freeze_backbone(model)
    assert sorted(v.path for v in model.trainable_weights) == ["head/bias", "head/kernel", "head_dist/bias",
                                                               "head_dist/kernel"]


@pytest.mark.parametrize("name", ["registers", "distilled", "map_no_cls", "cls_gap_fc_norm", "pre_norm_mean_std"])
def test_save_safetensors_writes_what_loads_back(name, tmp_path):
    """Every token option's weights go into timm's layout (torch_layout.to_timm) and load back."""
    cfg = ViTConfig(**{**TINY, **OPTIONS[name]})
    model = random_model(cfg)
    path = tmp_path / "m.safetensors"
    keras_vit.weights.save_safetensors(model, path)
    x = images(2)
    np.testing.assert_allclose(np.asarray(keras_vit.ViT(weights=str(path))(x)), np.asarray(model(x)), atol=1e-5)


@pytest.mark.parametrize("name", ["deit_reg_pre_logits", "map_cls_registers", "cls_reg_pos_map"])
def test_dynamic_size_model_equals_the_resized_model(name):
    """A dynamic-size model resamples the position embeddings in the graph as resize_model does
    offline: the class and distillation slots kept, the registers (which have none) inserted after."""
    cfg = ViTConfig(**{**TINY, **OPTIONS[name]})
    model = random_model(cfg)
    x = images(2, 48)
    dynamic = keras_vit.dynamic_model(model)
    np.testing.assert_allclose(np.asarray(dynamic(x)), np.asarray(keras_vit.resize_model(model, 48)(x)), atol=1e-4)


@pytest.mark.parametrize("name", ["deit_reg_pre_logits", "map_cls_registers", "map_no_cls"])
def test_vit_from_an_npz_takes_the_token_options_its_names_say(name, tmp_path):
    """ViT(weights=file.npz) of an .npz without keras-vit's config entry (as the official code
    writes them) reads registers, distillation, the MAP head, pre_norm and fc_norm off its names."""
    cfg = ViTConfig(**{**TINY, **OPTIONS[name], "pre_norm": True})
    model = random_model(cfg)
    np.savez(tmp_path / "m.npz", **keras_vit.weights.model_arrays(model))
    again = keras_vit.ViT(weights=str(tmp_path / "m.npz"), num_heads=2)
    for field in ("classifier", "num_registers", "distilled", "pre_norm", "fc_norm", "representation_size", "seq_len"):
        assert getattr(again.vit_config, field) == getattr(cfg, field), field
    x = images(2)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-5)


# Options the arrays of an .npz do not show (a class token kept by gap / map, the normalisation,
# the activation, epsilon, a non-square image) and ones they do: save_npz records the config.
NPZ_CONFIGS = {
    "cls_gap": dict(classifier="gap", class_token=True),
    "map_cls": dict(classifier="map", class_token=True),
    "mean_std": dict(**IMAGENET),
    "quick_gelu_eps_size": dict(activation="quick_gelu", layer_norm_epsilon=1e-5, image_size=(32, 48)),
    "layer_scale": dict(layer_scale_init=1e-6),
    "registers": dict(num_registers=3),
    "distilled": dict(distilled=True),
}


@pytest.mark.parametrize("name", list(NPZ_CONFIGS))
def test_save_npz_then_vit_rebuilds_the_same_model(name, tmp_path):
    cfg = ViTConfig(**{**TINY, **NPZ_CONFIGS[name]})
    model = random_model(cfg)
    model.class_names = [f"c{i}" for i in range(cfg.num_classes)]
    path = keras_vit.save_npz(model, tmp_path / "m.npz")
    again = keras_vit.ViT(weights=path)  # no num_heads, no options: all from the file's config entry
    assert again.vit_config == cfg
    assert again.class_names == model.class_names
    x = images(2, size=32)
    x = np.concatenate([x, x[:, :, :16]], axis=2) if cfg.image_size == (32, 48) else x
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-6)
    assert keras_vit.weights.read_checkpoint(path).defaults["class_token"] == cfg.class_token
    assert "__keras_vit__" not in keras_vit.weights.read_npz(path)


def test_arguments_given_override_the_npz_config(tmp_path):
    cfg = ViTConfig(**{**TINY, **NPZ_CONFIGS["quick_gelu_eps_size"], **IMAGENET})
    path = keras_vit.save_npz(random_model(cfg), tmp_path / "m.npz")
    again = keras_vit.ViT(weights=path, activation="gelu", image_size=32, num_classes=4)
    assert again.vit_config == cfg.replace(activation="gelu", image_size=32, num_classes=4)
