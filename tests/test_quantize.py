"""Keras' own quantization (model.quantize) and LoRA (Dense.enable_lora) on keras-vit models."""
from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import keras_vit
from tests.conftest import random_images

MLP_DENSE = ("Dense_0", "Dense_1")


def _quantized(path, mode: str):
    """A fresh copy of the model saved at `path` quantized in place with `mode`."""
    copy = keras_vit.load_model(path)
    with warnings.catch_warnings():  # Keras warns once per layer type it does not quantize
        warnings.simplefilter("ignore")
        copy.quantize(mode)
    return copy


@pytest.mark.parametrize("mode,max_rel_diff", [("int8", 0.03), ("float8", 0.15), ("int4", 0.25)])
def test_keras_quantize_keeps_predictions_of_trained_digits_model(trained_digits, mode, max_rel_diff):
    """The MLP and head Dense layers are quantized and the logits stay those of the float model:
    >= 97% top-1 agreement on the digits test split, max |diff| a small share of the logit scale."""
    from keras_vit.data import digits_arrays

    model, path = trained_digits
    _, _, x, _ = digits_arrays()
    ref = model.predict(x, verbose=0)
    quant = _quantized(path, mode)
    modes = {layer.path.split("/")[-1]: layer.quantization_mode
             for layer in quant._flatten_layers() if isinstance(layer, keras.layers.Dense)}
    assert set(modes.values()) == {mode} and set(MLP_DENSE) | {"head"} <= set(modes), modes
    out = quant.predict(x, verbose=0)
    top1 = float(np.mean(out.argmax(1) == ref.argmax(1)))
    assert top1 >= 0.97, (mode, top1)
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert rel <= max_rel_diff, (mode, rel)
    assert not np.array_equal(out, ref)  # the quantized kernels are what ran


# int8 and int4 run seconds each (every Dense quantized, saved, reloaded): float8 is the quick loop's.
@pytest.mark.parametrize("mode", [pytest.param("int8", marks=pytest.mark.slow), "float8",
                                  pytest.param("int4", marks=pytest.mark.slow)])
def test_quantized_model_save_load_round_trip(mode, tmp_path):
    """model.save / keras_vit.load_model of a quantized model: same layers quantized, same logits."""
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64,
                          num_layers=2, classifier="gap", representation_size=16)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize(mode)
    x = random_images(4, 32, 32)
    model.save(tmp_path / "q.keras")
    back = keras_vit.load_model(tmp_path / "q.keras")
    policies = {layer.path: layer.dtype_policy.name for layer in back._flatten_layers() if layer.quantization_mode}
    assert policies == model.get_config()["quantized"] and len(policies) == 6  # 4 MLP, pre-logits, head
    np.testing.assert_array_equal(back.predict(x, verbose=0), model.predict(x, verbose=0))


def test_lora_on_mlp_dense_layers_changes_logits_by_the_low_rank_update():
    """enable_lora(rank) on the MLP Dense layers: B = 0 keeps the logits; a random B gives the
    logits of the model whose kernels are W + (alpha / rank) A B; W is frozen."""
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64,
                          num_layers=2)
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape).astype("float32"))
    x = random_images(6, 32, 32)
    ref = model.predict(x, verbose=0)
    dense = [layer for layer in model._flatten_layers() if layer.name in MLP_DENSE]
    assert len(dense) == 4
    for layer in dense:
        layer.enable_lora(4)
    # a direct call, not predict: predict keeps the function it traced before LoRA existed
    np.testing.assert_allclose(np.asarray(model(x)), ref, atol=1e-5)
    merged = keras_vit.ViT(config=model.vit_config)
    rng = np.random.default_rng(1)
    for layer in dense:
        layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape).astype("float32"))
    lora_kernels = {layer.path + "/kernel": layer.kernel for layer in dense}  # W + (alpha / rank) A B
    source = {w.path: w for w in model.weights}
    for w in merged.weights:
        w.assign(lora_kernels.get(w.path, source[w.path]))
    out = np.asarray(model(x))
    assert np.abs(out - ref).max() > 1e-2  # the update reaches the logits
    np.testing.assert_allclose(out, merged.predict(x, verbose=0), atol=1e-4)
    trainable = {v.path.split("/")[-1] for v in model.trainable_variables if "MlpBlock" in v.path}
    assert trainable == {"lora_kernel_a", "lora_kernel_b", "bias"}, trainable  # W frozen, as Keras' LoRA does
    # dynamic_model (any image size; inspection's way to other sizes) keeps the LoRA factors and their effect
    dynamic = keras_vit.dynamic_model(model)
    np.testing.assert_allclose(np.asarray(dynamic(x)), out, atol=1e-5)
    assert {v.path for v in dynamic.trainable_variables} == {v.path for v in model.trainable_variables}


def _random_quantizable(image_size=16):
    model = keras_vit.ViT("Ti/4", image_size=image_size, num_classes=3, hidden_size=32, num_heads=2, mlp_dim=64,
                          num_layers=1, representation_size=16)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    return model


def _quantize(model, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize(mode)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_model_writes_float_kernels_and_resizes(mode, tmp_path):
    """What reads a quantized model's weights by checkpoint name gets the float kernels each layer
    multiplies by, never its integer codes: save_npz writes a float model (its kernels within the
    quantization step of the pre-quantization ones), resize_model gives what quantizing the resized
    float model gives, dynamic_model the same logits; loading weights into a model with integer codes
    is refused in one line (float8 keeps float kernels: they load)."""
    float_model = _random_quantizable()
    before = {w.path: w.numpy() for w in float_model.weights}
    quant = _quantize(_random_quantizable(), mode)
    x = random_images(2, 16, 16)
    keras_vit.save_npz(quant, tmp_path / "q.npz")
    back = keras_vit.ViT(weights=str(tmp_path / "q.npz"))
    kernels = [w for w in back.weights if w.path.endswith("/kernel") and ("Dense_" in w.path or "head" in w.path
                                                                          or "pre_logits" in w.path)]
    assert len(kernels) == 4
    levels = {"int8": 127, "int4": 7, "float8": None}[mode]  # abs-max codes: half a step is max|w| / levels / 2
    for w in kernels:
        error = np.abs(w.numpy() - before[w.path]).max()
        assert error <= (np.abs(before[w.path]).max() / levels / 2 + 1e-6 if levels else 0.0), (w.path, error)
    for w in back.weights:
        if all(w.path != k.path for k in kernels):
            np.testing.assert_array_equal(w.numpy(), before[w.path])
    resized = keras_vit.resize_model(quant, 32)
    expected = _quantize(keras_vit.resize_model(_random_quantizable(), 32), mode)
    assert resized.get_config()["quantized"] == quant.get_config()["quantized"]
    x32 = random_images(2, 32, 32)
    np.testing.assert_allclose(np.asarray(resized(x32)), np.asarray(expected(x32)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(keras_vit.dynamic_model(quant)(x)), np.asarray(quant(x)))
    # at its own size: the codes and scales copied, the same logits to the bit (int8's scales moved by 1e-6)
    np.testing.assert_array_equal(np.asarray(keras_vit.resize_model(quant, 16)(x)), np.asarray(quant(x)))
    if mode == "float8":  # its kernels stay float variables: weights load into it
        keras_vit.load_weights(quant, str(tmp_path / "q.npz"))
        return
    with pytest.raises(ValueError, match="quantized in Keras .* load the weights into the float model"):
        keras_vit.load_weights(quant, str(tmp_path / "q.npz"))


def test_lora_model_trained_in_bf16_exports_its_update(tmp_path):
    """A LoRA-enabled model under mixed_bfloat16 exports through its float32 twin, the LoRA factors
    copied with the weights: the ONNX file gives the twin's logits, the update included."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from export._common import float32_model
    from export.onnx import to_onnx

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = keras_vit.ViT("Ti/4", image_size=16, num_classes=3, hidden_size=32, num_heads=2, mlp_dim=64,
                              num_layers=1)
    finally:
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    for layer in model._flatten_layers():
        if layer.name in MLP_DENSE:
            layer.enable_lora(2)
            layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape).astype("float32"))
    x = random_images(2, 16, 16)
    twin = float32_model(model, model.vit_config)
    ref = np.asarray(twin(x))
    np.testing.assert_allclose(ref, np.asarray(model(x), dtype="float32"), atol=0.05)  # bf16 compute
    path = to_onnx(model, tmp_path / "lora.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], ref, atol=1e-5)


def test_dequantized_kernels_of_a_bf16_model_are_exact_and_leave_it_as_it_was():
    """A model quantized under mixed_bfloat16: the float kernels read back are the int8 codes / scale
    to float32 rounding (a bf16 product would round them by about one int8 step), and reading them
    leaves the layers' policies and the model's outputs as they were."""
    from keras_vit.weights.io import dequantized_kernels

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _quantize(_random_quantizable(), "int8")
    finally:
        keras.config.set_dtype_policy("float32")
    x = random_images(2, 16, 16)
    before = np.asarray(model(x))
    policies = {layer.path: layer.dtype_policy.name for layer in model._flatten_layers(include_self=False)}
    assert "int8_from_mixed_bfloat16" in policies.values()
    stored = {w.path: w.numpy() for w in model.weights}
    kernels = dequantized_kernels(model)
    assert len(kernels) == 4
    for path, kernel in kernels.items():
        np.testing.assert_allclose(kernel, stored[path].astype("float32") / stored[path + "_scale"], rtol=1e-6, atol=1e-7)
    assert {layer.path: layer.dtype_policy.name for layer in model._flatten_layers(include_self=False)} == policies
    np.testing.assert_array_equal(np.asarray(model(x)), before)


def _lora_model(mode):
    """A small ViT (random head), quantized with `mode` (None: float), saved; then LoRA on its MLP Dense layers
    with random B. Returns (model, path of the base saved before LoRA, images)."""
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape).astype("float32"))
    if mode:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.quantize(mode)
    return model


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_lora_factors_saved_apart_give_a_quantized_model_back_to_the_bit(tmp_path, mode):
    """QLoRA: model.save merges LoRA into the kernel and quantizes again (the reloaded logits move); the base saved
    before enable_lora plus save_lora_weights / load_lora_weights give the trained model's logits exactly, with its
    factors (trainable again for more fine-tuning)."""
    model = _lora_model(mode)
    base = str(tmp_path / "base.keras")
    model.save(base)
    dense = [layer for layer in model._flatten_layers() if layer.name in MLP_DENSE]
    for layer in dense:
        layer.enable_lora(3, lora_alpha=6.0)
    for variable in model.trainable_variables:  # only the adapters train (keras-hub's enable_lora freezes the rest)
        variable.trainable = "lora_kernel" in variable.path
    x = random_images(8, 32, 32)
    y = np.arange(8) % 5
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)  # the factors trained: B is no longer zero
    assert all(np.abs(keras.ops.convert_to_numpy(layer.lora_kernel_b)).max() > 0 for layer in dense)
    out = keras.ops.convert_to_numpy(model(x))
    adapters = keras_vit.save_lora_weights(model, tmp_path / "run.lora.npz")

    reloaded = keras_vit.load_model(base)
    keras_vit.load_lora_weights(reloaded, adapters)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(x)), out)
    lora = {layer.path: (layer.lora_rank, layer.lora_alpha) for layer in reloaded._flatten_layers()
            if getattr(layer, "lora_enabled", False)}
    assert lora == {layer.path: (3, 6.0) for layer in dense}
    assert {v.path.split("/")[-1] for v in reloaded.trainable_variables if "MlpBlock" in v.path} \
        >= {"lora_kernel_a", "lora_kernel_b"}
    keras_vit.load_lora_weights(reloaded, adapters)  # again, into the layers now enabled: the same
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(x)), out)
    if mode:  # what the separate file is for: Keras' save re-quantizes the merged kernel
        model.save(tmp_path / "merged.keras")
        assert np.abs(keras.ops.convert_to_numpy(keras_vit.load_model(tmp_path / "merged.keras")(x)) - out).max() > 1e-6


def test_lora_weights_files_refuse_what_they_cannot_hold(tmp_path):
    """One clear error, nothing of the model changed: no LoRA layer to save, a wrong suffix, a missing or foreign
    file, a model without the file's layers, another rank."""
    model = _lora_model(None)
    with pytest.raises(ValueError, match="no LoRA-enabled layer"):
        keras_vit.save_lora_weights(model, tmp_path / "a.lora.npz")
    dense = [layer for layer in model._flatten_layers() if layer.name in MLP_DENSE]
    for layer in dense:
        layer.enable_lora(2)
    with pytest.raises(ValueError, match=r"must end in \.lora\.npz"):
        keras_vit.save_lora_weights(model, tmp_path / "a.npz")
    path = keras_vit.save_lora_weights(model, tmp_path / "a.lora.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.lora.npz"]  # no temporary file left
    other = _lora_model(None)
    with pytest.raises(ValueError, match="does not exist"):
        keras_vit.load_lora_weights(other, tmp_path / "missing.lora.npz")
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="is not a LoRA weights file"):
        keras_vit.load_lora_weights(other, tmp_path / "plain.npz")
    deeper = keras_vit.ViT("Ti/8", image_size=32, num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1)
    with pytest.raises(ValueError, match="does not have: encoderblock_1/MlpBlock_3/Dense_0"):
        keras_vit.load_lora_weights(deeper, path)
    wider = keras_vit.ViT("Ti/8", image_size=32, num_classes=5, hidden_size=32, num_heads=2, mlp_dim=96, num_layers=2)
    with pytest.raises(ValueError, match=r"takes rank-2 factors \(32, 2\) x \(2, 96\)"):
        keras_vit.load_lora_weights(wider, path)
    assert not any(getattr(layer, "lora_enabled", False) for layer in wider._flatten_layers())
    for layer in other._flatten_layers():
        if layer.name in MLP_DENSE:
            layer.enable_lora(4)
    with pytest.raises(ValueError, match="has LoRA rank 4, alpha 4; .* has rank 2, alpha 2$"):
        keras_vit.load_lora_weights(other, path)


def test_lora_weights_of_the_patch_embedding_convolution_round_trip(tmp_path):
    """Keras' Conv2D takes LoRA too (A over the kernel's input axes): its factors save and load like a Dense's."""
    model = _lora_model(None)
    conv = next(layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv2D))
    conv.enable_lora(2)
    conv.lora_kernel_b.assign(np.random.default_rng(3).normal(0, 0.1, conv.lora_kernel_b.shape).astype("float32"))
    x = random_images(2, 32, 32)
    out = keras.ops.convert_to_numpy(model(x))
    path = keras_vit.save_lora_weights(model, tmp_path / "conv.lora.npz")
    fresh = _lora_model(None)
    keras_vit.load_lora_weights(fresh, path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(x)), out)
