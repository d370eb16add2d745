"""keras_vit.train.towers: a traced step's batch as towers (one intra-op thread each) gives the whole batch's results."""
import collections
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.train import towers
from tests.conftest import random_images, randomise_head

TINY = dict(variant="Ti/8", image_size=16, num_classes=3, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def split_calls(monkeypatch):
    """Towers on in this process (2, whatever its threads), and a list of (model name, parts) per traced call."""
    monkeypatch.setattr(towers, "_configured", 2)
    seen = []
    parts = towers.parts

    def recorded(model, inputs, training, mask=None):
        n = parts(model, inputs, training, mask)
        seen.append((model.name, n))
        return n

    monkeypatch.setattr(towers, "parts", recorded)
    return seen


def _run(code: str, **env):
    """`code` in a fresh Python (TensorFlow not started), its last stdout line."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("KERAS_VIT_TOWERS", "TF_NUM_INTRAOP_THREADS",
                                                                 "TF_NUM_INTEROP_THREADS")}
    full_env.update(env, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


THREADS = ("import tensorflow as tf; {before}from keras_vit.train import towers; import keras_vit.model; "
           "c = tf.config.threading; print(towers.count(), c.get_intra_op_parallelism_threads(), "
           "c.get_inter_op_parallelism_threads())")


@pytest.mark.parametrize("env,before,expected", [
    ({"KERAS_VIT_TOWERS": "2"}, "", "2 1 2"),
    ({"KERAS_VIT_TOWERS": "3"}, "", "3 1 3"),
    ({"KERAS_VIT_TOWERS": "0"}, "", "1 0 0"),
    ({"KERAS_VIT_TOWERS": "1"}, "", "1 0 0"),
    # TensorFlow's runtime started before keras_vit.model: its threads are fixed, nothing splits
    ({"KERAS_VIT_TOWERS": "2"}, "tf.constant(1.0) + 1; ", "1 0 0"),
    # the process's own thread counts win
    ({"KERAS_VIT_TOWERS": "2"}, "tf.config.threading.set_intra_op_parallelism_threads(2); ", "1 2 0"),
    ({"KERAS_VIT_TOWERS": "2", "TF_NUM_INTRAOP_THREADS": "2"}, "", "1 0 0"),
])
def test_configure_sets_the_threads_only_before_tensorflow_starts(env, before, expected):
    assert _run(THREADS.format(before=before), **env) == expected


ZEN5_BUILD = ("import keras; from keras_vit import precision; from keras_vit.train import towers; "
              "precision.detect_hardware = lambda backend: precision.Hardware('cpu', 'avx512_bf16', cpu_kind='zen5'); "
              "towers._schedulable_cores = lambda: 2; import keras_vit.model; {before}"
              "keras_vit.ViT(variant=None, image_size=16, patch_size=8, hidden_size=8, num_layers=1, num_heads=2, "
              "mlp_dim=8, num_classes=3); c = keras.src.backend.tensorflow.core.tf.config.threading; "
              "print(towers.count(), c.get_intra_op_parallelism_threads(), c.get_inter_op_parallelism_threads())")


@pytest.mark.parametrize("before,expected", [
    ("", "1 0 0"),  # float32: the Zen 5 keeps TensorFlow's threads (whole-step XLA)
    ("keras.mixed_precision.set_global_policy('mixed_bfloat16'); ", "2 1 2"),  # policy set after the import
    ("keras.mixed_precision.set_global_policy('mixed_bfloat16'); import tensorflow as tf; tf.constant(1.0) + 1; ",
     "1 0 0"),  # TensorFlow started before the model: nothing splits
])
def test_the_zen5_towers_wait_for_a_bf16_model(before, expected):
    """On a two-core Zen 5 the towers start with the first bf16 model built before TensorFlow's runtime."""
    assert _run(ZEN5_BUILD.format(before=before)) == expected


def test_planned_reads_the_environment_and_refuses_a_bad_value_in_one_line(monkeypatch):
    for value, expected in (("0", 1), ("1", 1), ("2", 2), (" 4 ", 4)):
        monkeypatch.setenv(towers.TOWERS_ENV, value)
        assert towers.planned() == expected
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv(towers.TOWERS_ENV, bad)
        with pytest.raises(ValueError, match=rf"KERAS_VIT_TOWERS must be a whole number of towers .*{bad!r}"):
            towers.planned()
    monkeypatch.delenv(towers.TOWERS_ENV)
    from keras_vit import precision

    hardware = precision.detect_hardware("tensorflow")
    amx = towers._schedulable_cores() == 2 and hardware.device == "cpu" and hardware.cpu_bf16 == "amx_bf16"
    assert towers.planned() == (2 if amx else 1)
    # two cores: AMX gets towers whatever the policy; the Zen 5 under mixed_bfloat16 only (its float32 step is
    # whole-step XLA, 0.65x with them); other CPUs and accelerators never
    monkeypatch.setattr(towers, "_schedulable_cores", lambda: 2)
    amx, zen5 = precision.Hardware("cpu", "amx_bf16"), precision.Hardware("cpu", "avx512_bf16", cpu_kind="zen5")
    zen4 = precision.Hardware("cpu", "avx512_bf16", cpu_kind="zen4")
    for hw, policy, expected in ((amx, None, 2), (amx, "float32", 2), (amx, "mixed_bfloat16", 2),
                                 (zen5, None, 1), (zen5, "float32", 1), (zen5, "mixed_float16", 1), (zen5, "mixed_bfloat16", 2),
                                 (zen4, None, 1), (zen4, "float32", 1), (zen4, "mixed_bfloat16", 2),
                                 (precision.Hardware("cpu", "avx512_bf16"), "mixed_bfloat16", 1),
                                 (precision.Hardware("gpu"), "mixed_bfloat16", 1)):
        monkeypatch.setattr(precision, "detect_hardware", lambda backend, hw=hw: hw)
        assert towers.planned(policy) == expected, (hw, policy)
    monkeypatch.setattr(precision, "detect_hardware", lambda backend: zen5)
    monkeypatch.setattr(towers, "_schedulable_cores", lambda: 4)
    assert towers.planned("mixed_bfloat16") == 1  # four cores: TensorFlow's own threads (the kind unmeasured)


def _fit_once(model, x, y, **compile_kw):
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], **compile_kw)
    history = model.fit(x, y, batch_size=len(x), epochs=2, verbose=0, shuffle=False)
    return history.history, [w.numpy() for w in model.trainable_weights]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("batch", [5, 1])
def test_fit_as_towers_equals_fit_whole(split_calls, policy, batch):
    """Same loss, metrics and weights as the whole batch's step (rounding aside), odd and single-image batches too."""
    x, y = random_images(batch, 16, 16), np.arange(batch) % 3
    results = []
    keras.mixed_precision.set_global_policy(policy)
    try:
        for count in (2, 1):
            towers._configured = count
            keras.utils.set_random_seed(0)
            model = randomise_head(keras_vit.ViT(**TINY))
            # graph mode on any CPU: float32's `auto` is whole-step XLA off AMX, which the towers leave whole
            results.append(_fit_once(model, x, y, jit_compile=False))
            results[-1] += (model.predict(x, verbose=0), model.evaluate(x, y, verbose=0))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    (h2, w2, p2, e2), (h1, w1, p1, e1) = results
    tol = 1e-4 if policy == "float32" else 3e-2
    for key in h1:
        np.testing.assert_allclose(h2[key], h1[key], rtol=tol, atol=tol)
    for a, b in zip(w2, w1):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    np.testing.assert_allclose(p2, p1, rtol=tol, atol=tol)
    np.testing.assert_allclose(e2, e1, rtol=tol, atol=tol)
    split = [n for _, n in split_calls if n > 1]
    assert len(split) >= 3, split_calls  # the train, test and predict steps of the first model


def test_the_towers_share_each_weights_cast_and_the_gradients_stay_the_same_to_the_bit(split_calls, monkeypatch):
    """Under mixed_bfloat16 each float weight is read and cast once for both towers (one output a tower, the
    gradients cast back and summed in float32 in one XLA pass): one Cast a weight in the step's graph, not one a
    tower, and the gradients of a cast per tower exactly."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = randomise_head(keras_vit.ViT(**TINY))
        x, y = random_images(6, 16, 16), np.arange(6) % 3
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        graphs, grads = {}, {}
        for share in (True, False):
            monkeypatch.setattr(towers, "SHARE_CASTS", share)

            @tf.function
            def step(images, labels):
                with tf.GradientTape() as tape:
                    value = loss(labels, tf.cast(model(images, training=True), "float32"))
                return tape.gradient(value, model.trainable_variables)

            grads[share] = [g.numpy() for g in step(tf.constant(x), tf.constant(y))]
            graph = step.get_concrete_function(tf.constant(x), tf.constant(y)).graph
            casts = collections.Counter(op.inputs[0].op.inputs[0].name for op in graph.get_operations()
                                        if op.type == "Cast" and op.inputs[0].op.type == "ReadVariableOp")
            graphs[share] = casts  # variable handle -> its casts in the step
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert [n for _, n in split_calls] == [2, 2]
    assert len(graphs[True]) >= 20 and set(graphs[True].values()) == {1}, graphs[True]  # each weight cast once
    assert set(graphs[False].values()) == {2}  # a cast per tower
    assert len(grads[True]) == len(model.trainable_variables)
    for a, b in zip(grads[True], grads[False]):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_a_weight_read_twice_in_a_tower_takes_a_cast_of_its_own(monkeypatch):
    """A variable read twice in one tower: the second read gets a cast of its own (its gradient summed in float32
    too), so the gradient is the sum of all four reads' whatever the sharing."""
    monkeypatch.setattr(towers, "SHARE_CASTS", True)
    w = keras.Variable(np.linspace(-1, 1, 12).reshape(3, 4).astype("float32"))
    x = tf.constant(np.linspace(0, 2, 24).reshape(2, 3, 4).astype("float32"))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        @tf.function
        def grad():
            with tf.GradientTape() as tape:
                with keras.src.backend.common.variables.AutocastScope("bfloat16"):
                    out = towers.run(lambda part: tf.reduce_sum(tf.cast(tf.cast(part, "bfloat16") * w.value * w.value, "float32"), 0), x, 2)
                total = tf.reduce_sum(out)
            return tape.gradient(total, w.value)
        g = grad().numpy()
        ops = grad.get_concrete_function().graph.get_operations()
        casts = [op for op in ops if op.type == "Cast" and op.inputs[0].op.type == "ReadVariableOp"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert len(casts) == 3  # one shared by the towers' first reads, one for each tower's second
    bf = tf.cast(tf.cast(w.value, "bfloat16"), "float32").numpy()
    np.testing.assert_allclose(g, 2 * bf * np.sum(x.numpy(), axis=0), rtol=2 ** -6)


def test_what_splits_and_what_does_not(split_calls):
    model = randomise_head(keras_vit.ViT(**TINY))
    x = random_images(4, 16, 16)
    model(x, training=True)  # eager: runs whole
    tf.function(lambda t: model(t, training=False))(x)  # traced inference outside a step (what exports trace)
    assert [n for _, n in split_calls] == [1, 1]
    del split_calls[:]
    out = tf.function(lambda t: model(t, training=True))(x)  # a custom loop's traced training call
    assert split_calls == [(model.name, 2)] and out.shape == (4, 3)
    del split_calls[:]
    inputs = keras.Input((16, 16, 3))
    keras.Model(inputs, model(inputs))  # a symbolic call
    assert all(n == 1 for _, n in split_calls)
    del split_calls[:]
    # a ViT inside a user's model: its training call splits once, the outer model's predict does not
    outer = keras.Sequential([keras.Input((16, 16, 3)), model, keras.layers.Dense(2)])
    outer.compile(optimizer="sgd", loss="mse")
    outer.fit(x, np.zeros((4, 2)), verbose=0)
    assert (model.name, 2) in split_calls


def test_whole_step_xla_and_batch_norm_models_run_whole(split_calls):
    model = randomise_head(keras_vit.ViT(**TINY))
    x, y = random_images(4, 16, 16), np.arange(4) % 3
    _fit_once(model, x, y, jit_compile=True)
    assert split_calls and all(n == 1 for _, n in split_calls)
    inputs = keras.Input((16, 16, 3))
    bn = towers.TowerModel(inputs, keras.layers.Dense(3)(keras.layers.BatchNormalization()(
        keras.layers.GlobalAveragePooling2D()(inputs))))
    del split_calls[:]
    _fit_once(bn, x, y)
    assert split_calls and all(n == 1 for _, n in split_calls)


def test_the_pretrainer_and_the_feature_extractor_split_their_dict_and_tensor_inputs(split_calls):
    from keras_vit import fewshot, pretrain

    encoder = keras_vit.ViT(**{**TINY, "include_top": False})
    images = random_images(6, 16, 16)
    history = pretrain.pretrain_encoder(encoder, images, epochs=1, batch_size=3, verbose=0)
    assert np.isfinite(history["loss"]).all()
    assert any(name.endswith("_mpp") and n == 2 for name, n in split_calls), split_calls
    del split_calls[:]
    features = fewshot.extract_features(encoder, images, batch_size=4)
    assert features.shape == (6, 32) and np.isfinite(features).all()
    assert any(n == 2 for _, n in split_calls), split_calls  # the encoder itself, or its "_features" model


@pytest.mark.slow
def test_notebook_fit_with_towers_in_a_fresh_process():
    """The notebook way, `KERAS_VIT_TOWERS=2` forcing the towers on any CPU: TensorFlow starts with one intra-op
    thread, fit trains, and the model saves and loads with the same predictions."""
    code = (
        "import numpy as np, keras, keras_vit, tempfile, os\n"
        "from keras_vit.train import towers\n"
        "m = keras_vit.ViT('Ti/8', image_size=16, num_classes=3, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)\n"
        "m.compile(optimizer='adam', loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))\n"
        "x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype('float32'); y = np.arange(8) % 3\n"
        "h = m.fit(x, y, batch_size=8, epochs=30, verbose=0).history['loss']\n"
        "p = os.path.join(tempfile.mkdtemp(), 'm.keras'); m.save(p); back = keras_vit.load_model(p)\n"
        "same = np.array_equal(back.predict(x, verbose=0), m.predict(x, verbose=0))\n"
        "print(towers.count(), h[-1] < h[0] / 2, same)\n")
    assert _run(code, KERAS_VIT_TOWERS="2") == "2 True True"


def test_whole_step_xla_in_a_towers_process_says_it_runs_on_one_core(monkeypatch):
    monkeypatch.setattr(towers, "_configured", 2)
    model = keras_vit.ViT(**TINY)
    with pytest.warns(UserWarning, match="KERAS_VIT_TOWERS=0"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.compile(optimizer="sgd", loss="mse", jit_compile=False)  # (float32's auto is XLA off AMX)
        model.compile(optimizer="sgd", loss="mse")  # auto, float32: graph mode in a towers process, on any CPU
    assert model.jit_compile is False


@pytest.mark.parametrize("jit,expected", [("xla", "0"), ("fusible", "0"), ("scoped", None)])
def test_vitcli_train_with_xla_clusters_keeps_tensorflows_threads(monkeypatch, tmp_path, jit, expected):
    from click.testing import CliRunner

    from keras_vit.cli.main import cli

    monkeypatch.delenv(towers.TOWERS_ENV, raising=False)
    result = CliRunner().invoke(cli, ["train", "--dataset", f"folder:{tmp_path / 'none'}", "--jit", jit,
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code != 0  # no such folder: it stops at the data, after the thread choice
    assert os.environ.get(towers.TOWERS_ENV) == expected
