"""LoRA on the attention projections (`keras_vit.enable_lora`, `MultiHeadSelfAttention.enable_lora`):
the low-rank update on the targeted kernels, a notebook `compile` + `fit` that trains the factors alone,
.keras save/load (the update merged, as Keras' Dense does), the factors apart (`save_lora_weights`), the
ways out (ONNX, TFLite, dynamic_model) and the refusals. Backend-neutral: also run under KERAS_BACKEND=jax
and torch (the note of 2026-12-06 says which ran)."""
from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.config import ViTConfig
from keras_vit.errors import UserInputError
from keras_vit.layers.attention import MultiHeadSelfAttention

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8, image_size=32, num_classes=5)


def _model(seed: int = 0, **kw):
    keras.utils.set_random_seed(seed)
    model = keras_vit.ViT(config=ViTConfig(**{**TINY, **kw}))
    head = model.get_layer("head")  # zero-initialised (paper): random, so the logits show every change
    head.kernel.assign(np.random.default_rng(seed).normal(0, 0.3, head.kernel.shape).astype("float32"))
    return model


def _attention(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, MultiHeadSelfAttention)]


def _images(n=8, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def _randomise_b(model, seed=2):
    rng = np.random.default_rng(seed)
    for layer in _attention(model):
        for name, v in layer.lora_factors().items():
            if name.endswith("_b"):
                v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))


def _kernel_2d(layer, name):
    return keras.ops.convert_to_numpy(getattr(layer, f"{name}_kernel")).reshape(layer.query_kernel.shape[0], -1)


def test_enable_lora_adds_the_low_rank_update_to_query_and_value():
    model = _model()
    x = _images()
    before = keras.ops.convert_to_numpy(model(x))
    assert keras_vit.enable_lora(model, rank=4, alpha=8) == 2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)  # B = 0: the same model
    for layer in _attention(model):
        assert layer.lora_targets == ("query", "value") and layer.lora_rank == 4 and layer.lora_alpha == 8.0
        assert not layer.query_kernel.trainable and not layer.value_kernel.trainable
        assert layer.key_kernel.trainable and layer.out_kernel.trainable
        assert set(layer.lora_factors()) == {"query_lora_a", "query_lora_b", "value_lora_a", "value_lora_b"}
    _randomise_b(model)
    layer = _attention(model)[0]
    for name in ("query", "key", "value"):  # the kernel the layer multiplies by: kernel + (alpha / rank) A B
        want = _kernel_2d(layer, name)
        if name in layer.lora_targets:
            a, b = (keras.ops.convert_to_numpy(getattr(layer, f"{name}_lora_{ab}")) for ab in "ab")
            want = want + 2.0 * (a @ b)
        np.testing.assert_allclose(layer.merged_kernel(name).reshape(32, -1), want, rtol=1e-5, atol=1e-6)
    assert np.abs(keras.ops.convert_to_numpy(model(x)) - before).max() > 1e-2


def test_fit_trains_the_factors_and_leaves_the_frozen_kernels(tmp_path):
    model = _model()
    keras_vit.enable_lora(model, rank=2, targets=("query", "key", "value"))
    factors = {v.path for layer in _attention(model) for v in layer.lora_factors().values()}
    for v in model.weights:  # LoRA alone: every other variable frozen
        v.trainable = v.path in factors
    trainable = {v.path for v in model.trainable_weights}
    assert trainable == factors
    frozen = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights if v.path not in trainable}
    x, y = _images(16), np.arange(16) % 5
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=4, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for v in model.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), frozen[v.path], err_msg=v.path)
    assert any(np.abs(keras.ops.convert_to_numpy(layer.query_lora_b)).max() > 0 for layer in _attention(model))


def test_save_merges_and_the_factors_apart_give_the_model_back(tmp_path):
    base = _model()
    base.save(tmp_path / "base.keras")
    model = keras_vit.load_model(tmp_path / "base.keras")
    keras_vit.enable_lora(model, rank=3, targets=("query", "value", "mlp"))
    _randomise_b(model)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dense) and getattr(layer, "lora_enabled", False):
            layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.05, "float32"))
    x = _images()
    want = keras.ops.convert_to_numpy(model(x))
    # .keras: the update merged into the kernels (as Keras' Dense), no factors in the file
    model.save(tmp_path / "merged.keras")
    merged = keras_vit.load_model(tmp_path / "merged.keras")
    assert not any(getattr(layer, "lora_enabled", False) for layer in merged._flatten_layers())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(merged(x)), want, rtol=1e-5, atol=1e-5)
    # the factors apart: the base model and the file give the trained model back to the bit
    path = keras_vit.save_lora_weights(model, tmp_path / "run.lora.npz")
    again = keras_vit.load_model(tmp_path / "base.keras")
    keras_vit.load_lora_weights(again, path)
    assert [layer.lora_targets for layer in _attention(again)] == [("query", "value")] * 2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(x)), want)
    # into a model with LoRA already on other targets: one clear line, nothing changed
    other = keras_vit.load_model(tmp_path / "base.keras")
    keras_vit.enable_lora(other, rank=3, targets=("key",))
    with pytest.raises(UserInputError, match="has LoRA on key; .* has it on query, value"):
        keras_vit.load_lora_weights(other, path)
    # the merged model's weights file loads into a model without LoRA (the order of its variables)
    model.save_weights(tmp_path / "w.weights.h5")
    plain = keras_vit.load_model(tmp_path / "base.keras")
    plain.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(x)), want, rtol=1e-5, atol=1e-5)


def test_keras_hub_style_methods(tmp_path):
    """model.enable_lora / save_lora_weights / load_lora_weights, as keras-hub's Backbone has them."""
    model, again = _model(), _model()
    assert model.enable_lora(2, targets=("value",)) == TINY["num_layers"]
    _randomise_b(model)
    path = model.save_lora_weights(str(tmp_path / "m.lora.npz"))
    again.load_lora_weights(path)
    assert [layer.lora_targets for layer in _attention(again)] == [("value",)] * TINY["num_layers"]
    x = _images(2)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x)))


def test_a_lora_model_goes_to_other_sizes_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("exports run on the TensorFlow backend")
    from keras_vit.export import to_onnx, verify

    model = _model()
    keras_vit.enable_lora(model, rank=2)
    _randomise_b(model)
    x = _images()
    want = keras.ops.convert_to_numpy(model(x))
    dynamic = keras_vit.dynamic_model(model)
    assert all(layer.lora_enabled for layer in _attention(dynamic))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dynamic(x)), want, rtol=1e-5, atol=1e-5)
    path = to_onnx(model, tmp_path / "lora.onnx")
    report = verify(model, path, images=x, write_report=False)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4, report


def test_checkpoints_and_resize_take_the_update(tmp_path):
    """save_npz / save_safetensors and resize_model read the kernels the layer multiplies by (the
    update merged, as Dense.kernel gives Keras' LoRA); loading a checkpoint into a LoRA model is refused."""
    model = _model()
    keras_vit.enable_lora(model, rank=2)
    _randomise_b(model)
    x = _images()
    want = keras.ops.convert_to_numpy(model(x))
    for path in (keras_vit.save_npz(model, tmp_path / "m.npz"),
                 keras_vit.save_safetensors(model, tmp_path / "m.safetensors")):
        again = keras_vit.ViT(weights=path)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), want, rtol=1e-5, atol=1e-5)
    resized = keras_vit.resize_model(model, 32)  # the same size: the same function, the update merged
    np.testing.assert_allclose(keras.ops.convert_to_numpy(resized(x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="has LoRA enabled: load the weights into the model first"):
        keras_vit.load_weights(model, tmp_path / "m.npz")


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "LoRA rank must be a positive integer, got 0"),
    (dict(rank=2, targets=("query", "out")), "LoRA targets must be distinct names among query, key, value, mlp"),
    (dict(rank=2, targets=()), "LoRA targets must be distinct names"),
    (dict(rank=2, alpha=-1), "LoRA alpha must be a positive number, got -1"),
    (dict(rank=10**9), r"LoRA rank 1000000000 is larger than '.*encoderblock_0.*' can use: at most min\(inputs, "
                       r"outputs\) = 32"),
    (dict(rank=33, targets=("mlp",)), r"LoRA rank 33 is larger than .* = 32"),
])
def test_bad_lora_arguments_are_one_line(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        keras_vit.enable_lora(_model(), **kwargs)


def test_lora_on_float8_mlp_is_refused_before_any_change():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras notes each layer type it does not quantize
        model.quantize("float8")
    with pytest.raises(UserInputError, match="LoRA does not combine with float8 quantization"):
        keras_vit.enable_lora(model, rank=2, targets=("query", "mlp"))
    assert not any(getattr(layer, "lora_enabled", False) for layer in model._flatten_layers())
    keras_vit.enable_lora(model, rank=2)  # the attention alone: float8 leaves it float
    assert keras.ops.convert_to_numpy(model(_images(2))).shape == (2, 5)


def test_lora_twice_is_refused():
    model = _model()
    keras_vit.enable_lora(model, rank=2)
    with pytest.raises(UserInputError, match="LoRA is already enabled on .*MultiHeadDotProductAttention"):
        keras_vit.enable_lora(model, rank=2)
    layer = MultiHeadSelfAttention(2)
    with pytest.raises(ValueError, match="isn't yet built"):
        layer.enable_lora(2)


def test_a_lora_model_reloads_uncompiled_saying_why(tmp_path):
    """model.save merges the LoRA factors into the kernels, so the optimizer's state (the factors') has nothing
    to go to: the model loads uncompiled with a warning saying why, as README promises for a compile state that
    cannot be rebuilt (was: compiled with a fresh optimizer, Keras' 'Skipping variable loading for optimizer')."""
    from keras_vit.finetune import lora_finetune

    model = lora_finetune(_model(), rank=2)
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x, y = _images(4), np.eye(5, dtype="float32")[[0, 1, 2, 3]]
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "lora.keras")
    for load in (keras.saving.load_model, keras_vit.load_model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = load(tmp_path / "lora.keras")
        said = [str(w.message) for w in caught]
        assert any("saved during LoRA fine-tuning" in m and "loads uncompiled" in m for m in said), said
        assert not any("Skipping variable loading" in m for m in said), said
        assert not again.compiled
        np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    plain = _model()
    plain.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    plain.fit(x, y, epochs=1, verbose=0)
    plain.save(tmp_path / "plain.keras")
    assert keras_vit.load_model(tmp_path / "plain.keras").compiled  # without LoRA: its optimizer state back


def test_numpy_rank_and_alpha_are_numbers():
    """A rank of np.int64(4) was refused as "not a positive integer"."""
    model = _model()
    assert keras_vit.enable_lora(model, rank=np.int64(2), alpha=np.float32(4.0)) == 2
    layer = _attention(model)[0]
    assert type(layer.lora_rank) is int and layer.lora_rank == 2 and float(layer.lora_alpha) == 4.0


def test_lora_on_a_model_already_used_takes_effect(tmp_path):
    """enable_lora / load_lora_weights after predict or fit: predict kept running the traced graph without
    LoRA (logits off by 5 with random factors), and fit trained the frozen kernels; now the functions are
    traced again, and a model whose optimizer is built is told to compile again."""
    x = _images(4)
    model = _model()
    model.predict(x, verbose=0)
    keras_vit.enable_lora(model, rank=2)
    _randomise_b(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), keras.ops.convert_to_numpy(model(x)), atol=1e-5)
    keras_vit.save_lora_weights(model, tmp_path / "a.lora.npz")
    base = _model()
    base.predict(x, verbose=0)
    keras_vit.load_lora_weights(base, tmp_path / "a.lora.npz")
    np.testing.assert_allclose(base.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    trained = _model()
    trained.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trained.fit(x, np.arange(4) % 5, verbose=0)
    with pytest.warns(UserWarning, match="call model.compile\\(...\\) again before fit"):
        keras_vit.enable_lora(trained, rank=2)


def test_lora_files_into_float8_or_a_missing_folder_are_one_line(tmp_path):
    """load_lora_weights enabled LoRA on float8 layers (the model then failed at every call); saving into a
    folder that does not exist named the temporary file."""
    model = _model()
    keras_vit.enable_lora(model, rank=2, targets=("query", "mlp"))
    with pytest.raises(UserInputError, match=r"folder '.*nodir' does not exist"):
        keras_vit.save_lora_weights(model, tmp_path / "nodir" / "a.lora.npz")
    keras_vit.save_lora_weights(model, tmp_path / "a.lora.npz")
    f8 = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f8.quantize("float8")
    with pytest.raises(UserInputError, match="LoRA does not combine with float8 quantization"):
        keras_vit.load_lora_weights(f8, tmp_path / "a.lora.npz")
    assert not any(getattr(layer, "lora_enabled", False) for layer in f8._flatten_layers())
