"""Recipes, options, initial weights and multi-device training (keras_vit.train)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import keras  # a required dependency: a failed import fails the suite
import numpy as np
import pytest

import keras_vit  # noqa: E402
from keras_vit import train as kt  # noqa: E402
from tests.conftest import random_images  # noqa: E402

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def test_digits_defaults_and_overrides():
    cfg = kt.make_config("digits")
    assert (cfg.variant, cfg.image_size, cfg.epochs, cfg.batch_size, cfg.optimizer) == ("Ti/4", 16, 80, 32, "adamw")
    assert cfg.model == dict(hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128) and cfg.augment == "affine"
    assert cfg.clipnorm == 1.0 and cfg.label_smoothing == 0.1 and cfg.weight_decay > 0
    cfg = kt.make_config("digits", epochs=3, learning_rate=5e-4, num_layers=2, augment="light")
    assert (cfg.epochs, cfg.learning_rate, cfg.model["num_layers"], cfg.augment) == (3, 5e-4, 2, "light")
    cfg = kt.make_config("cifar10", variant="S/4")
    assert cfg.model == {} and cfg.image_size == 32 and cfg.augment == "basic"
    ft = kt.make_config("tfds:oxford_flowers102", recipe="finetune")
    assert (ft.optimizer, ft.momentum, ft.weight_decay, ft.clipnorm, ft.image_size) == ("sgd", 0.9, 0.0, 1.0, 224)
    again = kt.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("options, message", [
    (dict(epochs=-1), "epochs must be a positive integer, got -1"),
    (dict(image_size=31), "image_size 31x31 is not divisible by the patch size 4x4"),
    (dict(recipe="nope"), "unknown recipe 'nope'"),
    (dict(mixed_precision="fp8"), "mixed_precision must be one of"),
    (dict(jit_compile="fast"), "jit_compile must be one of auto, xla, fusible, scoped, none"),
    (dict(batchsize=3), "unknown training options"),
    (dict(weights="/no/such.npz"), "does not exist"),
    (dict(model={"registers": 4}), "unknown model option 'registers'; allowed: activation, "),
    (dict(model={"num_classes": 4}), "model option 'num_classes' is set by the dataset's classes, not in model"),
    (dict(model={"mlp": "geglu"}), "mlp must be one of"),
])
def test_bad_options(options, message):
    with pytest.raises(kt.TrainError, match=message):
        kt.make_config("digits", **options)


def test_model_options_reach_the_vit_config():
    """make_config(model=...) sets the family's options (the notebook way of --model-option)."""
    cfg = kt.make_config("digits", model={"qk_norm": True, "num_registers": 4, "mlp": "swiglu"})
    vit = cfg.vit_config(num_classes=10, channels=3)
    assert (vit.qk_norm, vit.num_registers, vit.mlp, vit.hidden_size) == (True, 4, "swiglu", 64)  # digits' size
    with pytest.raises(kt.TrainError, match="model must be a dict of ViTConfig fields"):
        dataclasses.replace(cfg, model=[("qk_norm", True)]).validate()
    assert kt.make_config("digits", model={"qk_norm": True}, variant="Ti/4").model == {"qk_norm": True}


def test_schedule_warms_up_then_decays():
    cfg = kt.make_config("digits", epochs=10, warmup_epochs=2, learning_rate=1e-3)
    opt = kt.make_optimizer(cfg, steps_per_epoch=10)
    lr = opt._learning_rate  # the schedule object (opt.learning_rate is its current value)
    values = [float(lr(s)) for s in (0, 10, 20, 60, 99)]
    assert values[0] == 0.0 and values[1] == pytest.approx(5e-4) and values[2] == pytest.approx(1e-3)
    assert values[2] > values[3] > values[4] >= 0.0 and values[4] < 1e-5
    assert opt.global_clipnorm == 1.0 and isinstance(opt, keras.optimizers.AdamW)
    sgd = kt.make_optimizer(kt.make_config("digits", recipe="finetune", grad_accum=4), steps_per_epoch=8)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.gradient_accumulation_steps == 4


def test_grad_accum_takes_the_big_batch_step_and_schedule():
    """k micro-batches of b with grad_accum=k give the update of one batch of k*b (SGD, the same rate:
    Keras reads the schedule at its micro-step counter, which the schedule divides by k), the schedule
    ends with the run, and the weights' average moves once per update at the asked momentum."""
    k, b = 2, 4
    rng = np.random.default_rng(0)
    x, y = random_images(k * b, 16, 16, seed=3), np.eye(3, dtype="float32")[rng.integers(0, 3, k * b)]
    weights = {}
    for accum in (k, 1):
        keras.utils.set_random_seed(0)
        cfg = kt.make_config("digits", recipe="finetune", epochs=2, batch_size=b * k // accum, warmup_epochs=0.0,
                             clipnorm=1e9, grad_accum=accum, ema=0.9)
        model = keras_vit.ViT("Ti/8", image_size=16, num_classes=3, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1)
        for v in model.weights:
            v.assign(np.random.default_rng(len(v.path)).normal(0, 0.2, v.shape).astype("float32"))
        opt = kt.make_optimizer(cfg, steps_per_epoch=8 if accum > 1 else 4)  # micro-steps per epoch
        model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=False)
        for i in range(accum):
            model.train_on_batch(x[i * b * k // accum:(i + 1) * b * k // accum], y[i * b * k // accum:(i + 1) * b * k // accum])
        assert int(opt.iterations) == 1
        weights[accum] = [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
        if accum > 1:
            assert float(opt._learning_rate(8 * 2 - 1)) == pytest.approx(float(opt._learning_rate(8 * 2 - 2)))
            plain = kt.make_optimizer(dataclasses.replace(cfg, grad_accum=1), steps_per_epoch=4)._learning_rate
            assert [float(opt._learning_rate(s)) for s in (0, 1, 14, 15)] == pytest.approx(
                [float(plain(u)) for u in (0, 0, 7, 7)])  # update u at micro-steps 2u and 2u + 1: the run's 8 updates
            assert opt.ema_momentum ** k == pytest.approx(0.9)
    for got, want in zip(weights[k], weights[1]):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_schedule_is_computed_once_per_traced_step():
    """Keras reads the learning rate once per variable (weight decay, update); the schedule's ops
    must appear once in the traced step, with keras' CosineDecay values, in or out of a trace."""
    import tensorflow as tf

    cfg = kt.make_config("digits", epochs=10, warmup_epochs=2, learning_rate=1e-3)
    opt = kt.make_optimizer(cfg, steps_per_epoch=10)
    reference = keras.optimizers.schedules.CosineDecay(0.0, 80, alpha=0.0, warmup_target=1e-3, warmup_steps=20)
    variables = [keras.Variable(np.ones((3, 3), "float32")) for _ in range(5)]
    opt.build(variables)

    @tf.function
    def step():
        opt.apply([tf.ones((3, 3))] * 5, variables)
        return opt.learning_rate

    graph = step.get_concrete_function().graph
    # one cond (warm-up or decay) for the whole update, one for the read after it
    assert sum(op.type in ("If", "StatelessIf") for op in graph.get_operations()) == 2
    for i in range(25):
        lr = float(step())  # the rate of the next step: read in the trace after this one's update
        assert lr == pytest.approx(float(reference(i + 1)), rel=1e-6, abs=1e-12)
    assert float(opt.learning_rate) == pytest.approx(float(reference(25)), rel=1e-6)
    # saved with a compiled model and loaded back
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt._learning_rate))
    assert isinstance(again, kt.WarmupCosine) and float(again(30)) == pytest.approx(float(reference(30)))


def test_an_eager_update_evaluates_the_schedule_once(monkeypatch):
    """Eagerly (run_eagerly, JAX's --jit none) one update read the schedule once per variable, each a cond."""
    import keras

    cfg = kt.make_config("digits", epochs=10, warmup_epochs=2, learning_rate=1e-3)
    opt = kt.make_optimizer(cfg, steps_per_epoch=10)
    variables = [keras.Variable(np.ones((3, 3), "float32")) for _ in range(5)]
    opt.build(variables)
    schedule, calls = opt._learning_rate, []
    at = type(schedule)._at
    monkeypatch.setattr(type(schedule), "_at", lambda self, step: calls.append(int(step)) or at(self, step))
    for _ in range(3):
        opt.apply([np.ones((3, 3), "float32")] * 5, variables)
    assert calls == [0, 1, 2]


def test_optimizer_is_built_before_the_first_trace(tmp_path):
    """No variable may be created inside the train step's trace: TensorFlow would trace it twice."""
    from keras_vit.train import loop

    cfg = kt.make_config("digits", epochs=1, **TINY)
    data = loop._load_data(cfg)
    model = loop._build_model(cfg, data, "none")
    assert model.optimizer.built and len(model.optimizer.variables) > 2 * len(model.trainable_variables)


def test_ema_ends_with_the_averaged_weights(tmp_path):
    cfg = kt.make_config("digits", epochs=2, ema=0.9, augment="none", checkpoint_interval=0, **TINY)
    opt = kt.make_optimizer(cfg, steps_per_epoch=10)
    assert opt.use_ema and opt.ema_momentum == 0.9
    result = kt.train(cfg, output=str(tmp_path / "run"), verbose=0)
    final = keras_vit.load_model(str(tmp_path / "run" / "model.keras"))
    raw = keras_vit.load_model(str(tmp_path / "run" / "last.keras"))  # the last epoch before the swap
    differ = [not np.allclose(a, b) for a, b in zip(final.get_weights(), raw.get_weights())]
    assert any(differ)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["ema"] == 0.9
    assert result["test"]["top1"] > 0.2  # beyond chance (0.1) with the average too; 2 epochs of a tiny model reach ~0.3
    with pytest.raises(kt.TrainError, match="ema must be a momentum in"):
        kt.make_config("digits", ema=1.0)


def _tiny(num_classes, include_top=True):
    return keras_vit.ViT("Ti/4", image_size=16, num_classes=num_classes, include_top=include_top, **TINY)


def test_initial_weights_from_keras_with_another_head(tmp_path):
    src = _tiny(3)
    for v in src.weights:
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype("float32"))
    src.save(tmp_path / "src.keras")
    target = _tiny(5)
    report = kt.load_initial_weights(target, str(tmp_path / "src.keras"))
    assert "head/kernel" in report["skipped"] and len(report["loaded"]) == len(target.weights) - 2
    by_path = {v.path: v for v in src.weights}
    for v in target.weights:
        if v.path.startswith("head/"):
            assert not np.any(v.numpy())
        else:
            np.testing.assert_array_equal(v.numpy(), by_path[v.path].numpy())


def test_initial_weights_from_a_pretraining_encoder(tmp_path):
    """An encoder with the same keras_vit layer names under another head (masked-patch
    pre-training) initialises a classifier."""
    encoder = _tiny(10, include_top=False)
    for v in encoder.weights:
        v.assign(v.numpy() + 0.5)
    head = keras.layers.Dense(512, name="mpp_head")(encoder.output)
    keras.Model(encoder.input, head).save(tmp_path / "mpp.keras")
    target = _tiny(10)
    report = kt.load_initial_weights(target, str(tmp_path / "mpp.keras"))
    assert len(report["loaded"]) == len(encoder.weights)
    np.testing.assert_allclose(target.get_layer("embedding").get_weights()[0],
                               encoder.get_layer("embedding").get_weights()[0])


@pytest.mark.parametrize("channels", [1, 6])
@pytest.mark.parametrize("hybrid", [False, True], ids=["vit", "hybrid"])
def test_initial_weights_from_keras_adapt_the_input_kernel_to_other_channels(tmp_path, channels, hybrid):
    """An RGB .keras as initial weights of a grey (or 6-channel) model: the input convolution's kernel is
    adapted as a checkpoint's is (timm's adapt_input_conv), not left at its initialisation. For the
    plain ViT a grey image then gives what its RGB copy gave (6 channels: the RGB image twice); the
    hybrid's weight-standardised root convolution gets the same adapted kernel."""
    from keras_vit.weights import adapt_input_conv

    sizes = dict(variant="R26+S/32", image_size=32, resnet_layers=(1, 1, 1), patch_size=1) if hybrid else \
        dict(variant="Ti/4", image_size=16)
    src = keras_vit.ViT(num_classes=3, **sizes, **TINY)
    rng = np.random.default_rng(0)
    for v in src.weights:
        v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    src.save(tmp_path / "src.keras")
    target = keras_vit.ViT(num_classes=3, channels=channels, **sizes, **TINY)
    report = kt.load_initial_weights(target, str(tmp_path / "src.keras"))
    assert report["skipped"] == []
    name = "resnet/conv_root/kernel" if hybrid else "embedding/kernel_conv/kernel"
    kernel = {v.path: v for v in src.weights}[name].numpy()
    np.testing.assert_array_equal({v.path: v for v in target.weights}[name].numpy(),
                                  adapt_input_conv(kernel, channels))
    if not hybrid:
        rgb = rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
        if channels == 1:
            rgb = np.repeat(rgb[..., :1], 3, axis=-1)
        x = rgb[..., :1] if channels == 1 else np.concatenate([rgb, rgb], axis=-1)
        np.testing.assert_allclose(np.asarray(target(x)), np.asarray(src(rgb)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_initial_weights_from_a_quantized_keras_are_its_float_kernels(tmp_path, mode):
    """A model.quantize()d .keras as initial weights: each quantized Dense gives the float kernel it
    multiplies by (int8: codes / scale; int4: unpacked codes / scale), not its integer codes; the
    kernels stay within the quantization step of the float model's, everything else is copied exactly."""
    import warnings

    src = _tiny(3)
    rng = np.random.default_rng(0)
    for v in src.weights:
        v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    original = {v.path: v.numpy() for v in src.weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.quantize(mode)
    src.save(tmp_path / "q.keras")
    stored = {v.path: v.numpy() for v in src.weights}
    target = _tiny(3)
    report = kt.load_initial_weights(target, str(tmp_path / "q.keras"))
    assert report["skipped"] == []
    dense = [p[: -len("/kernel")] for p, v in stored.items() if p.endswith("/kernel") and p + "_scale" in stored]
    assert len(dense) == 2 * TINY["num_layers"] + 1  # the MLPs' Dense layers and the head
    for v in target.weights:
        got, want = v.numpy(), original[v.path]
        layer = v.path[: -len("/kernel")]
        if layer not in dense:
            np.testing.assert_array_equal(got, want)
            continue
        scale = stored[layer + "/kernel_scale"]
        if mode == "int8":  # Keras' int8: codes = round(w * scale) per output column
            np.testing.assert_allclose(got, stored[v.path] / scale, rtol=1e-6, atol=1e-7)
            assert np.abs(got - want).max() <= 0.5 / scale.min() + 1e-6
        elif mode == "int4":
            step = 1.0 / np.abs(scale).min()
            assert np.abs(got - want).max() <= step, (v.path, np.abs(got - want).max(), step)
        else:  # float8 keeps the float kernel itself
            np.testing.assert_array_equal(got, want)
    x = random_images(2, 16, 16)
    float_model = _tiny(3)
    for v in float_model.weights:
        v.assign(original[v.path])
    ref, out = np.asarray(float_model(x)), np.asarray(target(x))
    assert np.abs(out - ref).max() <= {"int8": 0.03, "int4": 0.3, "float8": 0.0}[mode] * np.abs(ref).max()


@pytest.mark.parametrize("started_on, jit", [("tensorflow", "none"), ("torch", "auto"), (None, "none")])
def test_a_resumed_run_keeps_its_precision_and_its_compilation_on_its_own_backend(tmp_path, started_on, jit):
    """Resumed on another backend, the compilation asked for is chosen again (TensorFlow's "none" is
    a graph, JAX's runs eagerly); the precision stays what the run started with."""
    import json

    from keras_vit.train.loop import _resumed

    cfg = kt.make_config("digits", epochs=3)
    saved = {"train": cfg.to_dict(), "resolved": {"mixed_precision": "mixed_bfloat16", "jit_compile": "none"}}
    if started_on:
        saved["backend"] = started_on
    (tmp_path / "backup").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _, resumed = _resumed(str(tmp_path), str(tmp_path))
    assert (resumed.mixed_precision, resumed.jit_compile) == ("mixed_bfloat16", jit)


def test_initial_weights_errors(tmp_path):
    (tmp_path / "x.keras").write_bytes(b"junk")
    with pytest.raises(kt.TrainError, match="--weights: could not load .*x.keras': not a .keras archive"):
        kt.load_initial_weights(_tiny(2), str(tmp_path / "x.keras"))
    # a damaged file is refused before a run folder is made (Keras would say "File not found")
    with pytest.raises(kt.TrainError, match="not a .keras archive .* the file is damaged"):
        kt.make_config("digits", variant="Ti/4", weights=str(tmp_path / "x.keras"))


@pytest.mark.slow
def test_mixed_precision_and_grad_accum_train(tmp_path):
    # jit "xla": the fusible mode would switch on XLA auto-clustering for this whole test process
    cfg = kt.make_config("digits", epochs=1, mixed_precision="mixed_bfloat16", grad_accum=2,
                         augment="basic", mixup=0.2, jit_compile="xla", **TINY)
    result = kt.train(cfg, output=str(tmp_path / "run"), verbose=0)
    assert np.isfinite(result["last_epoch"]["loss"]) and result["replicas"] == 1
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert (result["mixed_precision"], result["jit_compile"]) == ("mixed_bfloat16", "xla")
    model = keras_vit.load_model(tmp_path / "run" / "model.keras")
    assert model.get_layer("head").dtype_policy.name == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_scoped_run_trains_in_this_process_and_records_its_modes(tmp_path, monkeypatch, policy):
    """`--jit scoped` sets no process-wide XLA flag, so it runs in a process TensorFlow has already
    worked in (this one); the scopes' written-out gradients train, loss scaling (fp16) included."""
    monkeypatch.delenv("KERAS_VIT_XLA_SCOPES", raising=False)
    flags = os.environ.get("TF_XLA_FLAGS")
    cfg = kt.make_config("digits", epochs=1, mixed_precision=policy, jit_compile="scoped", **TINY)
    result = kt.train(cfg, output=str(tmp_path / "run"), verbose=0)
    assert (result["mixed_precision"], result["jit_compile"]) == (policy, "scoped")
    assert np.isfinite(result["last_epoch"]["loss"]) and np.isfinite(result["test"]["loss"])
    assert "KERAS_VIT_XLA_SCOPES" not in os.environ and os.environ.get("TF_XLA_FLAGS") == flags  # restored
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["resolved"] == {"mixed_precision": policy, "jit_compile": "scoped"}


def _run_script(script: str, env: dict, timeout: int = 400) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    out = _run_script(f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from keras_vit import train as kt
        cfg = kt.make_config("digits", epochs=1, distribute="mirrored", **{TINY!r})
        r = kt.train(cfg, output={str(tmp_path / 'run')!r}, verbose=0)
        print(json.dumps(r))
    """, {"KERAS_BACKEND": "tensorflow"})
    assert out["replicas"] == 2 and np.isfinite(out["test"]["loss"])


@pytest.mark.slow
def test_bf16_fusible_run_records_its_modes(tmp_path):
    # In a fresh process, as `vitcli train` runs: the XLA flags are set before TensorFlow starts.
    run = str(tmp_path / "run")
    out = _run_script(f"""
        import json, os
        from keras_vit import train as kt
        cfg = kt.make_config("digits", epochs=1, mixed_precision="mixed_bfloat16", jit_compile="fusible", **{TINY!r})
        r = kt.train(cfg, output={run!r}, verbose=0)
        r["flags_after"] = os.environ.get("TF_XLA_FLAGS")
        print(json.dumps(r))
    """, {"KERAS_BACKEND": "tensorflow"})
    assert (out["mixed_precision"], out["jit_compile"]) == ("mixed_bfloat16", "fusible")
    assert out["flags_after"] is None and np.isfinite(out["test"]["loss"])  # env restored for children
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    assert saved["resolved"] == {"mixed_precision": "mixed_bfloat16", "jit_compile": "fusible"}


def test_auto_modes_resolve_by_step_size(monkeypatch):
    from keras_vit import precision

    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda cpuinfo="": "avx512_bf16")
    monkeypatch.setattr(precision, "cpu_kind", lambda cpuinfo="": None)  # not a Zen 4 or 5, whatever runs the test
    monkeypatch.setattr(precision, "has_accelerator", lambda backend: False)

    def modes(cfg):
        return tuple(kt.resolve_speed(cfg)[:2])

    small = kt.make_config("digits")  # 0.6 GFLOP per step: fp32 + XLA
    assert modes(small) == ("none", "xla")
    big = kt.make_config("tfds:imagenet2012")  # Ti/16 at 224 px, batch 64: bf16 + fusible
    assert modes(big) == ("mixed_bfloat16", "fusible")
    assert "AVX512-BF16" in kt.resolve_speed(big).reason
    assert modes(dataclasses.replace(big, mixed_precision="none")) == ("none", "xla")
    assert modes(dataclasses.replace(big, jit_compile=False)) == ("mixed_bfloat16", "none")
    monkeypatch.setattr(precision, "cpu_kind", lambda cpuinfo="": "zen5")
    assert modes(big) == ("mixed_bfloat16", "scoped")  # measured faster than fusible on the Zen 5
    assert "AMD Zen 5" in kt.resolve_speed(big).reason
    monkeypatch.setattr(precision, "cpu_kind", lambda cpuinfo="": "zen4")
    assert modes(big) == ("mixed_bfloat16", "scoped")  # and on the Zen 4 (2026-12-07)
    assert "AMD Zen 4" in kt.resolve_speed(big).reason
    assert modes(small) == ("none", "xla")
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda cpuinfo="": "amx_bf16")
    assert modes(big) == ("mixed_bfloat16", "scoped")  # measured faster than fusible on AMX
    assert "AMX-BF16" in kt.resolve_speed(big).reason
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda cpuinfo="": None)
    assert modes(big) == ("none", "xla")


# In a _run_script after kt.train(cfg, output=...) of an --ema run: whether model.keras (the average)
# differs from last.keras (the last epoch's trained weights), as r["ema_swapped"].
_EMA_SWAPPED = ("import keras_vit, numpy as np; run = r['run']; "
                "r['ema_swapped'] = any(not np.allclose(a, b) for a, b in zip("
                "keras_vit.load_model(run + '/model.keras').get_weights(), "
                "keras_vit.load_model(run + '/last.keras').get_weights()))")


@pytest.mark.jax
def test_fit_through_tf_data_on_jax_data_parallel(tmp_path):
    pytest.importorskip("jax")
    out = _run_script(f"""
        import json, keras
        assert keras.backend.backend() == "jax"
        from keras_vit import train as kt
        cfg = kt.make_config("digits", epochs=2, augment="none", ema=0.9, checkpoint_interval=0, **{TINY!r})
        r = kt.train(cfg, output={str(tmp_path / 'run')!r}, verbose=0)
        {_EMA_SWAPPED}
        print(json.dumps(r))
    """, {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
          "JAX_PLATFORMS": "cpu"})
    assert out["replicas"] == 2 and out["test"]["top1"] > 0.2  # learns beyond chance (0.1), with --ema's average
    assert out["ema_swapped"]  # model.keras holds the average, last.keras the last epoch's own weights


@pytest.mark.torch
def test_fit_through_tf_data_on_torch(tmp_path):
    pytest.importorskip("torch")  # the CPU build from the [test] extra where it resolves
    out = _run_script(f"""
        import json, keras
        assert keras.backend.backend() == "torch"
        from keras_vit import train as kt
        cfg = kt.make_config("digits", epochs=2, augment="none", ema=0.9, checkpoint_interval=0,
                             **{{**{TINY!r}, "jit_compile": "auto"}})
        r = kt.train(cfg, output={str(tmp_path / 'run')!r}, verbose=0)
        {_EMA_SWAPPED}
        print(json.dumps(r))
    """, {"KERAS_BACKEND": "torch"})
    assert out["jit_compile"] == "none"  # auto on torch: eager, no minute-long torch.compile
    assert out["test"]["top1"] > 0.2 and out["train_seconds"] < 60  # learns beyond chance (0.1), with --ema
    assert out["ema_swapped"]


def test_run_folders_and_latest(tmp_path):
    cfg = kt.make_config("digits")
    first = kt.new_run_dir(cfg, root=str(tmp_path))
    second = kt.new_run_dir(cfg, root=str(tmp_path))
    assert os.path.basename(first).startswith("digits-Ti_4-d64-l4-h4-m128-") and first != second
    assert os.path.realpath(tmp_path / "latest") == os.path.realpath(second)
    with pytest.raises(kt.TrainError, match="nothing to resume"):
        kt.resolve_run_dir(root=str(tmp_path))  # no config.json yet
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.keras").write_text("keep me")
    with pytest.raises(kt.TrainError, match="already exists and is not empty"):
        kt.new_run_dir(cfg, output=str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "model.keras").read_text() == "keep me"
    with pytest.raises(kt.TrainError, match="--output '.*model.keras' is a file; give a folder for the run"):
        kt.new_run_dir(cfg, output=str(tmp_path / "taken" / "model.keras"))
    # a folder inside a file: said before the data and the model (after them, with the precision line first)
    with pytest.raises(kt.TrainError, match="--output '.*model.keras/a/b' is inside '.*model.keras', a file"):
        kt.runs.check_output(str(tmp_path / "taken" / "model.keras" / "a" / "b"))


def _kill_as_fit_returns(monkeypatch, cfg, run) -> None:
    """Train `cfg` into `run` and die as fit returns, before model.keras is written (a kill -9 there)."""
    from keras_vit.train import loop

    real = loop.save_model

    def killed(model, path):
        if os.path.basename(path) == "model.keras":
            raise KeyboardInterrupt
        return real(model, path)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_model", killed)
        with pytest.raises(KeyboardInterrupt):
            kt.train(cfg, output=str(run), verbose=0)


def test_a_run_stopped_after_its_last_epoch_resumes_without_training_again(tmp_path, monkeypatch):
    """The backup stays until model.keras and results.json are written: a process killed in between
    (a kill -9 as fit returns) resumes with every epoch done, not from epoch 0 with fresh weights
    (metrics.csv and last.keras were overwritten by a second run of every epoch)."""
    import csv

    cfg = kt.make_config("digits", epochs=2, checkpoint_interval=0, jit_compile="none", **TINY)
    run = tmp_path / "run"
    _kill_as_fit_returns(monkeypatch, cfg, run)
    assert (run / "backup").is_dir() and not (run / "model.keras").exists()
    trained = keras_vit.load_model(run / "last.keras", compile=False).get_weights()
    result = kt.train(None, output=str(run), resume=True, verbose=0)
    assert result["resumed"]  # nothing left to train: the last epoch's metrics are metrics.csv's (was {})
    assert result["last_epoch"]["val_accuracy"] == pytest.approx(
        float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["val_accuracy"]))
    with open(run / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    for a, b in zip(keras_vit.load_model(run / "model.keras", compile=False).get_weights(), trained):
        np.testing.assert_array_equal(a, b)
    assert not (run / "backup").exists() and (run / "results.json").is_file()
    with pytest.raises(kt.TrainError, match="has already finished"):
        kt.train(None, output=str(run), resume=True, verbose=0)


@pytest.mark.parametrize("given_output", [False, True])
def test_a_run_that_fails_before_its_first_epoch_ends_leaves_no_folder(tmp_path, monkeypatch, given_output):
    """A failure in the first epoch (a bad image, a precision the backend cannot run) leaves neither the
    run folder nor a runs/latest pointing at it (was: a folder without a model that evaluate, export and
    --resume then tripped on); a --output folder that existed empty stays, empty."""
    from keras_vit.train import loop

    root = tmp_path / "runs"
    cfg = kt.make_config("digits", epochs=1, jit_compile="none", **TINY)
    first = kt.train(cfg, root=str(root), verbose=0)["run"]

    class Fails(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise kt.TrainError("an image that does not decode")

    real = loop._callbacks
    monkeypatch.setattr(loop, "_callbacks", lambda *a, **k: real(*a, **k) + [Fails()])
    output = tmp_path / "out"
    if given_output:
        output.mkdir()
    with pytest.raises(kt.TrainError, match="does not decode"):
        kt.train(kt.make_config("digits", epochs=1, jit_compile="none", **TINY), root=str(root), verbose=0,
                 output=str(output) if given_output else None)
    assert sorted(os.listdir(root)) == sorted([os.path.basename(first), "latest"])
    assert os.path.realpath(root / "latest") == os.path.realpath(first)
    assert (list(output.iterdir()) == []) if given_output else not output.exists()


def test_a_damaged_backup_or_config_is_one_line_and_the_run_is_left_as_it_was(tmp_path, monkeypatch):
    """--resume of a run whose backup or config.json is cut short: one line naming the file, metrics.csv
    untouched (was: trimmed to its header before the backup was read; a cut-short weights file gave
    h5py's traceback; a damaged config.json a line naming no file)."""
    import shutil

    cfg = kt.make_config("digits", epochs=2, checkpoint_interval=0, jit_compile="none", **TINY)
    run = tmp_path / "run"
    _kill_as_fit_returns(monkeypatch, cfg, run)
    metrics = (run / "metrics.csv").read_bytes()
    # the weights file holds its own epoch, so a cut metadata file is written again from it ...
    from keras_vit.train import loop
    from keras_vit.train.callbacks import POSITION_ATTR

    repaired = tmp_path / "repaired"
    shutil.copytree(run, repaired)
    (repaired / "backup/training_metadata.json").write_bytes(b'{"epoch": ')
    loop._check_backup(str(repaired))
    assert json.loads((repaired / "backup/training_metadata.json").read_text()) == {"epoch": 2, "batch": 0}
    import h5py  # ... and is damaged only where the weights do not (a backup written before they did)

    with h5py.File(run / "backup/latest.weights.h5", "a") as f:
        del f.attrs[POSITION_ATTR]
    for name, damage, said in (("backup/training_metadata.json", b'{"epoch": ', "training_metadata.json' is damaged"),
                               ("backup/latest.weights.h5", b"\x89HDF\r\n", "latest.weights.h5' is damaged"),
                               ("config.json", b'{"train": {', "its config.json is damaged")):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(run, copy)
        (copy / name).write_bytes(damage)
        with pytest.raises(kt.TrainError) as exc:
            kt.train(None, output=str(copy), resume=True, verbose=0)
        assert said in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
        assert (copy / "metrics.csv").read_bytes() == metrics


def test_a_failure_before_fit_keeps_its_own_error(tmp_path, monkeypatch):
    """Undoing a run that failed before fit made metrics.csv raises nothing of its own (the user sees the
    failure, not a FileNotFoundError), and the folder is gone."""
    from keras_vit.train import loop

    def fails(model, train_ds):
        raise kt.TrainError("the build failed")

    monkeypatch.setattr(loop, "build_without_data", fails)
    with pytest.raises(kt.TrainError, match="the build failed"):
        kt.train(kt.make_config("digits", epochs=1, jit_compile="none", **TINY), output=str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_does_not_replay_epoch_0s_order(tmp_path):
    """A resumed run built a fresh pipeline, whose first epoch was epoch 0's order and augmentations again
    (the stream's reshuffles count this process's passes). Its stream is now seeded by the run's seed and the
    epoch it resumes at: another order, the same each time; the hold-out is unchanged."""
    from keras_vit.train import loop

    cfg = kt.make_config("digits", epochs=4, augment="light", **TINY)

    def first_batches(start):
        d = loop._load_data(cfg, start_epoch=start)
        (x, y), = d.train.take(1)
        (vx, vy), = d.val.take(1)
        return x.numpy(), y.numpy(), vy.numpy()

    x0, y0, v0 = first_batches(0)
    x3, y3, v3 = first_batches(3)
    again = first_batches(3)
    assert not np.array_equal(y0, y3) and not np.array_equal(x0, x3)
    np.testing.assert_array_equal(x3, again[0])
    np.testing.assert_array_equal(v0, v3)
    assert loop.epoch_seed(cfg.seed, 0) == cfg.seed


def test_resuming_on_a_dataset_whose_classes_changed_is_one_line(tmp_path, monkeypatch):
    """A class folder added between the kill and --resume failed in Keras' restore ("A total of 2 objects
    could not be loaded ... shape=(32, 4) ... (32, 3)"): the line now names the classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "emu"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    cfg = kt.make_config(f"folder:{tmp_path / 'd'}", epochs=2, checkpoint_interval=0, jit_compile="none",
                         variant="Ti/4", image_size=8, batch_size=4, **TINY)
    run = tmp_path / "run"
    _kill_as_fit_returns(monkeypatch, cfg, run)
    (tmp_path / "d" / "fox").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(tmp_path / "d" / "fox" / f"{i}.png")
    with pytest.raises(kt.TrainError, match=r"the dataset now has 4 classes, the run was trained on 3 \(config.json's "
                                            r"class_names; new: fox\)") as info:
        kt.train(None, output=str(run), resume=True, verbose=0)
    assert "\n" not in str(info.value)
