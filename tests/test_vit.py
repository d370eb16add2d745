"""keras_vit.ViT: the built model's counts, shapes, save/load, learning and mixed precision."""
import functools
import os

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.config import ViTConfig
from keras_vit.errors import first_line
from keras_vit.train import towers
from tests.conftest import random_images, randomise_head
from tests.test_config import REFERENCE_COUNTS

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", pytest.param("B/32", marks=pytest.mark.slow)])
def test_built_param_counts_equal_reference(variant):
    model = keras_vit.ViT(variant=variant)
    assert isinstance(model, keras.Model)
    assert model.count_params() == REFERENCE_COUNTS[variant]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["B/16", "B/8", "L/16", "L/32", "H/14"])
def test_large_built_param_counts_equal_reference(variant):
    model = keras_vit.ViT(variant=variant)
    assert model.count_params() == REFERENCE_COUNTS[variant]
    del model
    keras.backend.clear_session()


def test_cifar_example_sequence_length():
    model = keras_vit.ViT(variant="Ti/4", image_size=32, num_classes=10)
    assert tuple(model.get_layer("posembed_input").output.shape) == (None, 65, 192)
    assert model.count_params() == model.vit_config.count_params()


def test_variant_none_builds_the_sizes_given_without_a_name():
    """variant=None (as typed: Optional[str]): the sizes given, on ViTConfig's defaults, no variant name."""
    model = keras_vit.ViT(variant=None, image_size=16, patch_size=8, num_classes=3, **TINY)
    assert model.vit_config.variant is None
    assert model.vit_config == ViTConfig(image_size=16, patch_size=8, num_classes=3, **TINY)
    assert model.count_params() == model.vit_config.count_params()


def test_non_square_images_and_custom_size():
    model = keras_vit.ViT(variant="Ti/8", image_size=(32, 64), num_classes=3, **TINY)
    x = random_images(2, 32, 64)
    assert model.predict(x, verbose=0).shape == (2, 3)
    assert tuple(model.get_layer("posembed_input").output.shape) == (None, 4 * 8 + 1, 32)


def test_config_argument_and_overrides():
    cfg = ViTConfig(image_size=32, patch_size=8, num_classes=4, **TINY)
    model = keras_vit.ViT(config=cfg)
    assert model.vit_config == cfg
    assert keras_vit.get_config(model) == cfg
    assert model.output_shape == (None, 4)


def test_arguments_next_to_config_apply():
    cfg = ViTConfig(image_size=32, patch_size=8, num_classes=1000, **TINY)
    model = keras_vit.ViT(config=cfg, num_classes=10, include_top=False, image_size=64)
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 32)
    assert model.vit_config == cfg.replace(num_classes=10, include_top=False, image_size=64)
    # each argument given explicitly wins, also when it equals ViT's own default value
    unusual = ViTConfig(image_size=32, patch_size=8, num_classes=4, include_top=False, include_preprocessing=False,
                        classifier="gap", representation_size=8, pos_embedding="none", dropout_rate=0.1,
                        attention_dropout_rate=0.1, drop_path_rate=0.1, channels=1, gelu_approximate=False, **TINY)
    assert keras_vit.ViT(config=unusual).vit_config == unusual  # nothing given: the config as it is
    defaults = dict(image_size=224, num_classes=1000, include_top=True, include_preprocessing=True,
                    classifier="token", representation_size=None, pos_embedding="learned", dropout_rate=0.0,
                    attention_dropout_rate=0.0, drop_path_rate=0.0, channels=3, gelu_approximate=True,
                    hidden_size=64, num_heads=4, mlp_dim=128, num_layers=1, patch_size=16)
    for name, value in defaults.items():
        got = keras_vit.ViT(config=unusual, **{name: value}).vit_config
        assert got == unusual.replace(**{name: value}), name


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="B/16"), "give variant= or config=, not both"),
    (dict(hidden_dim=64), r"unknown option\(s\) \['hidden_dim'\] next to config="),
    (dict(image_size=36), "36x36 is not divisible by the patch size 8x8"),
])
def test_arguments_next_to_config_that_do_not_fit_raise_one_line(kwargs, match):
    cfg = ViTConfig(image_size=32, patch_size=8, num_classes=4, **TINY)
    with pytest.raises(ValueError, match=match) as info:
        keras_vit.ViT(config=cfg, **kwargs)
    assert "\n" not in str(info.value)


def test_include_top_false_returns_pre_logits_features():
    model = keras_vit.ViT(variant="Ti/8", image_size=32, include_top=False, **TINY)
    assert model.output_shape == (None, 32)
    rep = keras_vit.ViT(variant="Ti/8", image_size=32, include_top=False, representation_size=24, **TINY)
    assert rep.output_shape == (None, 24)
    assert rep.get_layer("pre_logits").activation.__name__ == "tanh"


def test_head_is_zero_initialised():
    model = keras_vit.ViT(variant="Ti/8", image_size=32, num_classes=5, **TINY)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("head").kernel), 0.0)
    np.testing.assert_array_equal(model.predict(random_images(2, 32, 32), verbose=0), 0.0)


def test_summary_reads_like_the_paper():
    model = keras_vit.ViT(variant="Ti/8", image_size=32, **TINY)
    lines = []
    model.summary(print_fn=lambda s, **_: lines.append(s))
    text = "\n".join(lines)
    for name in ("embedding", "cls", "posembed_input", "encoderblock_0", "encoder_norm", "head"):
        assert name in text


@pytest.mark.parametrize("pos_embedding", ["learned", "learned_2d", "relative", "sincos2d", "none"])
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_save_load_round_trip_identical(tmp_path, pos_embedding, classifier):
    model = keras_vit.ViT(variant="Ti/8", image_size=(32, 24), num_classes=5, pos_embedding=pos_embedding,
                          classifier=classifier, representation_size=16 if classifier == "gap" else None,
                          **TINY)
    randomise_head(model)
    x = random_images(3, 32, 24)
    before = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    for loaded in (keras.saving.load_model(path), keras_vit.load_model(path)):
        assert isinstance(loaded, keras_vit.VisionTransformer)
        assert loaded.vit_config == model.vit_config
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    assert np.abs(before[0] - before[1]).max() > 1e-3  # outputs depend on the input


def test_a_compiled_model_reloads_compiled(tmp_path):
    """keras.saving.load_model restores compile() and the optimizer's state, as for any keras.Model
    (Keras skips that, with a warning, for models whose compile() is their own unless they say how)."""
    import warnings

    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY)
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = random_images(4, 16, 16), np.arange(4) % 5
    model.fit(x, y, epochs=2, batch_size=2, verbose=0)
    model.save(tmp_path / "m.keras")
    for load in (keras.saving.load_model, keras_vit.load_model):  # keras_vit's too, by default as Keras
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = load(tmp_path / "m.keras")
        assert loaded.compiled and type(loaded.optimizer) is type(model.optimizer)
        assert int(loaded.optimizer.iterations.numpy()) == 4
        for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6)
        loaded.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert not keras_vit.load_model(tmp_path / "m.keras", compile=False).compiled
    assert model.get_config()["compiled_backend"] == keras.backend.backend()  # beside, not in, the compile config
    older = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY)  # a file that kept it in there
    older.compile_from_config({**model.get_compile_config(), "backend": keras.backend.backend()})
    assert older.compiled


def test_run_eagerly_compiles_without_a_jit_warning():
    """compile(run_eagerly=True) with jit_compile left at "auto": no XLA asked for, no Keras warning that it is off."""
    import warnings

    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY)
    for args, kwargs in (((), dict(optimizer="adam", loss="mse", run_eagerly=True)),
                         (("adam", "mse", None, None, None, True), {})):  # run_eagerly given by position
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.compile(*args, **kwargs)
        assert model.run_eagerly and not model.jit_compile


def test_frozen_layers_reload_frozen_with_the_optimizer_state(tmp_path):
    """Layers set `trainable = False` stay frozen across model.save / load_model, as a functional model's do
    (their configs carry the flag): a parent frozen with one sublayer unfrozen, a sublayer alone. The optimizer
    then has the same variables, so its state loads (no "Skipping variable loading") and training goes on alike."""
    import warnings

    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY)
    for name in ("embedding", "posembed_input", "encoderblock_0"):
        model.get_layer(name).trainable = False
    block0, block1 = model.get_layer("encoderblock_0"), model.get_layer("encoderblock_1")
    next(s for s in block0._flatten_layers(include_self=False) if s.name == "LayerNorm_0").trainable = True
    next(s for s in block1._flatten_layers(include_self=False) if s.name == "LayerNorm_2").trainable = False
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy")
    x, y = random_images(4, 16, 16), np.arange(4) % 5
    model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    model.save(tmp_path / "m.keras")

    def flags(m):
        return [(layer.path or layer.name, layer.trainable) for layer in m._flatten_layers() if layer.weights]

    for load in (keras.saving.load_model, keras_vit.load_model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = load(tmp_path / "m.keras")
        assert flags(loaded) == flags(model)
        assert [v.path for v in loaded.trainable_weights] == [v.path for v in model.trainable_weights]
        assert "encoderblock_0/LayerNorm_0/gamma" in [v.path for v in loaded.trainable_weights]
        for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.fit(x, y, epochs=1, batch_size=2, verbose=0)
    model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=a.path)
    assert "frozen_layers" not in keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY).get_config()


def test_a_compile_state_this_process_cannot_rebuild_loads_uncompiled_with_a_warning(tmp_path):
    def own_loss(y_true, y_pred):  # not registered: a fresh process cannot find it by name
        return keras.ops.mean(y_pred)

    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY)
    model.compile(optimizer="adam", loss=own_loss)
    model.save(tmp_path / "m.keras")
    x = random_images(2, 16, 16)
    with pytest.warns(UserWarning, match="loaded uncompiled: its compile state could not be rebuilt"):
        loaded = keras_vit.load_model(tmp_path / "m.keras")
    assert not loaded.compiled
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_an_unreadable_or_mismatched_file_is_one_clear_line(tmp_path, monkeypatch):
    """A file it may not read says so (not "damaged"); a config.json edited away from its weights gives Keras'
    reason on the one line (not cut at its colon) and none of Keras' warnings on the way."""
    import errno
    import json
    import warnings
    import zipfile

    import keras_vit.saving

    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=5, **TINY)
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as src, zipfile.ZipFile(tmp_path / "edited.keras", "w") as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["config"].update(hidden_size=64, mlp_dim=128)
                data = json.dumps(config).encode()
            out.writestr(item, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as info:
            keras_vit.load_model(tmp_path / "edited.keras")
    line = first_line(info.value)
    assert "could not be loaded" in line and "must match" in line and len(line) < 500, line

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(keras_vit.saving, "open", refused, raising=False)
    with pytest.raises(ValueError, match=r"could not read model file .*m.keras': Permission denied$"):
        keras_vit.load_model(tmp_path / "m.keras")


def test_load_model_rejects_non_keras_vit_files(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="not a keras-vit model"):
        keras_vit.load_model(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="does not exist"):
        keras_vit.load_model(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not load"):
        keras_vit.load_model(tmp_path / "junk.keras")


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=4, **TINY)
    x = random_images(16, 16, 16, seed=1)
    y = np.arange(16) % 4
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_dropout_and_drop_path_act_only_in_training():
    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=3, dropout_rate=0.3,
                          attention_dropout_rate=0.3, drop_path_rate=0.3, **TINY)
    randomise_head(model)
    x = random_images(2, 16, 16)
    a = keras.ops.convert_to_numpy(model(x, training=False))
    b = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(a, b)
    c = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.abs(a - c).max() > 1e-4


@pytest.mark.slow
def test_mixed_bfloat16_trains_with_float32_norms_and_logits():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=3, **TINY)
        block = model.get_layer("encoderblock_0")
        assert block.compute_dtype == "bfloat16"
        assert block.norm_1.compute_dtype == "float32"
        assert model.get_layer("encoder_norm").compute_dtype == "float32"
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = random_images(8, 16, 16)
        model.fit(x, np.arange(8) % 3, epochs=2, verbose=0)
        out = model(x)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        _, probs = block.attention(keras.ops.ones((1, 5, 32), "bfloat16"), return_attention_scores=True)
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_save_load_keeps_the_dtype_policy_whatever_the_global_one(tmp_path):
    x = random_images(3, 16, 16)
    for built, loaded in (("mixed_bfloat16", "float32"), ("float32", "mixed_bfloat16")):
        keras.mixed_precision.set_global_policy(built)
        try:
            model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=3, **TINY)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        randomise_head(model)
        model.save(tmp_path / f"{built}.keras")
        keras.mixed_precision.set_global_policy(loaded)
        try:
            back = keras_vit.load_model(tmp_path / f"{built}.keras")
            back.save(tmp_path / f"{built}-again.keras")  # and once more: the policy is in the config
            again = keras_vit.load_model(tmp_path / f"{built}-again.keras")
        finally:
            keras.mixed_precision.set_global_policy("float32")
        for m in (back, again):
            assert m.dtype_policy.name == built
            assert m.get_layer("encoderblock_0").compute_dtype == keras.mixed_precision.Policy(built).compute_dtype
            np.testing.assert_array_equal(m.predict(x, verbose=0), model.predict(x, verbose=0))


def test_clone_model_gives_the_same_outputs_with_the_same_weights():
    model = randomise_head(keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=3, **TINY))
    clone = keras.models.clone_model(model)  # Keras clones layer by layer from each layer's config
    clone.set_weights(model.get_weights())
    x = random_images(2, 16, 16)
    # the clone is Keras' plain Functional: where this process runs towers (train.towers) the model's predict splits
    # the batch and oneDNN's GEMMs on half as many rows may round differently (1e-6 seen on the AMX Xeon)
    exact = towers.count() < 2
    check = np.testing.assert_array_equal if exact else functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    check(clone.predict(x, verbose=0), model.predict(x, verbose=0))
    # a compiled model clones compiled, as any keras.Model does (Keras compiles the copy from get_compile_config)
    for jit in ("auto", False):
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
        clone = keras.models.clone_model(model)
        assert clone.compiled and type(clone.optimizer) is type(model.optimizer)
        clone.fit(x, np.arange(2), epochs=1, verbose=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="Q/16"), "unknown variant 'Q/16'"),
    (dict(variant="B/16", image_size=100), "100x100 is not divisible by the patch size 16x16"),
    (dict(variant="B/16", classifier="mean"), "classifier must be one of token, gap, map; got 'mean'"),
    (dict(variant="B/16", pos_embedding="rotary"), "pos_embedding must be one of"),
    (dict(variant="B/16", channels=0), "channels must be an integer >= 1, got 0"),
])
def test_bad_input_is_one_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_vit.ViT(**kwargs)


def test_single_channel_images():
    model = keras_vit.ViT(variant="Ti/8", image_size=16, channels=1, num_classes=2, **TINY)
    assert model.predict(random_images(2, 16, 16, c=1), verbose=0).shape == (2, 2)


def test_model_name_is_safe_for_graph_export():
    cfg = ViTConfig(image_size=16, patch_size=8, num_classes=2, variant="R+Ti/8 (test)", **TINY)
    assert keras_vit.ViT(config=cfg).name == "vit_r_ti_8_test"
    assert keras_vit.ViT(variant="Ti/8", image_size=16, **TINY).name == "vit_ti_8"


def test_compile_auto_jit_is_xla_in_float32_and_graph_mode_in_bf16_on_a_tf_cpu():
    """The notebook path: compile(optimizer, loss) alone gets the fast compilation for the policy."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    y = np.arange(4) % 3
    model = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=3, num_layers=1)
    model.compile(optimizer="sgd", loss=loss)
    # Keras' own "auto" gives False on a TensorFlow CPU; on an AMX CPU float32 trains in graph mode with
    # the scoped step's forms (layers.fusion.float32_scoped), whose GEMMs outrun XLA's there
    from keras_vit import precision

    amx = precision.detect_hardware("tensorflow").cpu_bf16 == "amx_bf16"
    assert model.jit_compile is not amx
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    model.compile(optimizer="sgd", loss=loss, jit_compile=False)  # an explicit choice is kept
    assert model.jit_compile is False
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        bf16 = keras_vit.ViT(variant="Ti/8", image_size=16, num_classes=3, num_layers=1)
        bf16.compile(optimizer="sgd", loss=loss)
        assert bf16.jit_compile is False  # oneDNN's bf16 GEMMs in graph mode; XLA:CPU's are not faster
        assert np.isfinite(bf16.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")
