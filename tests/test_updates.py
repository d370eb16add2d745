"""keras_vit.train.updates: Keras' SGD-momentum and Adam(W) updates as TensorFlow's fused training ops in a ViT's
graph-mode step (AMX CPUs; forced here with KERAS_VIT_FUSED_UPDATES so it runs on any CPU)."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.layers import fusion
from keras_vit.train import updates

OPTIMIZERS = {
    "sgd-momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd-nesterov-decay": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-plain": lambda: keras.optimizers.SGD(0.05),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw-clip-ema": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05, global_clipnorm=1.0, use_ema=True),
    "adamw-accumulate": lambda: keras.optimizers.AdamW(1e-2, gradient_accumulation_steps=2),
    "adam-amsgrad": lambda: keras.optimizers.Adam(1e-2, amsgrad=True),
}
# the fused op each traced step holds (None: Keras' own ops stay)
FUSED_OP = {"sgd-momentum": "ResourceApplyKerasMomentum", "sgd-nesterov-decay": "ResourceApplyKerasMomentum",
            "sgd-plain": None, "adam": "ResourceApplyAdam", "adamw-clip-ema": "ResourceApplyAdam",
            "adamw-accumulate": "ResourceApplyAdam", "adam-amsgrad": None}


def _tiny_vit():
    keras.utils.set_random_seed(0)
    return keras_vit.ViT("Ti/16", num_classes=5, image_size=32, patch_size=8, num_layers=2)


def _op_types(model, images, labels) -> set:
    """Every op type in the model's training step traced as Keras traces it (its nested functions included)."""
    step = tf.function(lambda x, y: model.train_step((x, y)))
    graph_def = step.get_concrete_function(tf.constant(images), tf.constant(labels)).graph.as_graph_def()
    return {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function for n in f.node_def}


def _trained(make_optimizer, fused: bool, monkeypatch, steps: int = 3, policy: str = "float32"):
    monkeypatch.setenv(updates.FUSED_UPDATES_ENV, "1" if fused else "0")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 5, 4)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _tiny_vit()
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
        losses = [float(model.train_on_batch(images, labels)) for _ in range(steps)]
        ops = _op_types(model, images, labels)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "update_step" not in vars(optimizer), "the optimizer is Keras' own again after the trace"
    return model, optimizer, losses, ops


@pytest.mark.parametrize("name", [n if n in ("sgd-momentum", "sgd-plain", "adam") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(OPTIMIZERS)])
def test_fused_updates_train_as_keras_own_updates(name, monkeypatch):
    """The same weights and optimizer state as Keras' own updates (SGD to the bit, Adam to float32 rounding), for
    every Keras option that goes through them (nesterov, weight decay, clipping, EMA, gradient accumulation); the
    step holds the fused op where it applies and Keras' ops where it does not (amsgrad, SGD without momentum)."""
    op = FUSED_OP[name]
    exact = name.startswith("sgd") or op is None
    # one Adam update: from the second on, a gradient near epsilon turns last-bit differences of the weights into
    # visible ones (Adam's, not the op's: the update alone over five steps is test_fused_adam_is_keras_adam_...)
    steps = 3 if exact else 2 if "accumulate" in name else 1
    plain, plain_opt, plain_losses, plain_ops = _trained(OPTIMIZERS[name], False, monkeypatch, steps)
    fused, fused_opt, fused_losses, fused_ops = _trained(OPTIMIZERS[name], True, monkeypatch, steps)
    assert not {"ResourceApplyKerasMomentum", "ResourceApplyAdam"} & plain_ops
    if op:
        assert op in fused_ops
    else:
        assert not {"ResourceApplyKerasMomentum", "ResourceApplyAdam"} & fused_ops
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(plain_losses, fused_losses, **tol)
    for a, b in zip(plain.variables, fused.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), **tol, err_msg=a.path)
    for a, b in zip(plain_opt.variables, fused_opt.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol, err_msg=a.path)
    assert int(plain_opt.iterations) == int(fused_opt.iterations)


def test_fused_adam_is_keras_adam_to_float32_rounding(monkeypatch):
    """Five Adam updates of one variable with gradients from 1 down to 1e-8 in scale (where epsilon matters):
    TensorFlow's ResourceApplyAdam lands within a few float32 ulps of Keras' own update."""
    import contextlib

    monkeypatch.setenv(updates.FUSED_UPDATES_ENV, "1")
    rng = np.random.default_rng(0)
    start = rng.normal(size=(1000,)).astype("float32")
    grads = [rng.normal(size=(1000,)).astype("float32") * scale for scale in (1, 1e-3, 1e-6, 1e-8, 1)]
    result = {}
    for fused in (False, True):
        variable = keras.Variable(start)
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build([variable])

        def make_step(optimizer, variable, fused):
            @tf.function
            def update(gradient):
                with updates.fused_updates(optimizer) if fused else contextlib.nullcontext():
                    optimizer.apply([gradient], [variable])

            return update

        step = make_step(optimizer, variable, fused)

        for g in grads:
            step(tf.constant(g))
        result[fused] = variable.numpy()
        if fused:
            graph = step.get_concrete_function(tf.constant(grads[0])).graph
            assert "ResourceApplyAdam" in {op.type for op in graph.get_operations()}
    assert np.abs(result[False] - start).max() > 0.03  # the updates moved it
    np.testing.assert_allclose(result[True], result[False], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fused_updates_in_mixed_bfloat16(monkeypatch):
    """The bf16 step (float32 variables, AutoCast) takes them too: SGD momentum to the bit, AdamW after one step to
    float32 rounding (after more, bf16's rounding of the forward pass amplifies any last-bit difference)."""
    for make, exact in ((OPTIMIZERS["sgd-momentum"], True), (OPTIMIZERS["adamw-clip-ema"], False)):
        steps = 3 if exact else 1
        plain, _, _, _ = _trained(make, False, monkeypatch, steps=steps, policy="mixed_bfloat16")
        fused, _, _, ops = _trained(make, True, monkeypatch, steps=steps, policy="mixed_bfloat16")
        assert {"ResourceApplyKerasMomentum", "ResourceApplyAdam"} & ops
        for a, b in zip(plain.trainable_variables, fused.trainable_variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7)


def test_fused_updates_apply_only_where_measured(monkeypatch):
    """Keras' exact SGD/Adam/AdamW, on TensorFlow, not in a step XLA-compiled whole, under no distribution strategy,
    on an AMX CPU (or forced by the environment); a subclass keeps its own update."""
    monkeypatch.delenv(updates.FUSED_UPDATES_ENV, raising=False)
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    for amx in (True, False):
        monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda amx=amx: amx)
        assert updates.applies(sgd, whole_step_xla=False) is amx
        assert not updates.applies(sgd, whole_step_xla=True)
    monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: True)

    class Mine(keras.optimizers.SGD):
        pass

    assert not updates.applies(Mine(0.1, momentum=0.9), whole_step_xla=False)
    assert not updates.applies(keras.optimizers.RMSprop(), whole_step_xla=False)
    assert updates.applies(keras.optimizers.AdamW(), whole_step_xla=False)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert not updates.applies(sgd, whole_step_xla=False)
    monkeypatch.setenv(updates.FUSED_UPDATES_ENV, "0")
    assert not updates.applies(sgd, whole_step_xla=False)
    monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: False)
    monkeypatch.setenv(updates.FUSED_UPDATES_ENV, "1")
    assert updates.applies(sgd, whole_step_xla=False)
    with updates.fused_updates(sgd):
        assert "update_step" in vars(sgd)
    assert "update_step" not in vars(sgd)


def test_whole_step_xla_keeps_keras_updates(monkeypatch):
    """`compile(jit_compile=True)`: XLA fuses the update itself, so the step keeps Keras' ops (and XLA compiles it)."""
    monkeypatch.setenv(updates.FUSED_UPDATES_ENV, "1")
    model = _tiny_vit()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    rng = np.random.default_rng(0)
    images, labels = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"), rng.integers(0, 5, 4)
    model.train_on_batch(images, labels)
    assert "ResourceApplyKerasMomentum" not in _op_types(model, images, labels)


def test_train_ab_measures_without_the_fused_updates(monkeypatch):
    """`bench.train_ab --without fused-updates` traces its second model with Keras' own updates."""
    from bench import train_ab

    monkeypatch.setenv(updates.FUSED_UPDATES_ENV, "1")
    assert updates.applies(keras.optimizers.SGD(momentum=0.9), whole_step_xla=False)
    train_ab._undo("fused-updates")
    assert not updates.applies(keras.optimizers.SGD(momentum=0.9), whole_step_xla=False)
