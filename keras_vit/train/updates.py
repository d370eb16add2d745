"""Keras' SGD-momentum and Adam/AdamW updates as TensorFlow's fused training ops, for a ViT's graph-mode step.

Keras 3 writes each variable's update out in single ops (SGD momentum: two Mul, a Sub, an Assign, an AssignAdd;
Adam: about ten), each a pass over the variable's memory. TensorFlow's `ResourceApplyKerasMomentum` and
`ResourceApplyAdam` compute the same formulas in one pass: on the AMX Xeon, bf16 training 1.027x (Ti/16) and
1.041x (B/16) with SGD momentum, and the same weights to the bit (BENCHMARKS.md, 2026-12-05, "Fused optimizer
updates on AMX"). Only while `keras_vit.model.ViT.train_step` is traced (`fused_updates`), so the optimizer object the
user holds is Keras' own before and after.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import keras

# "1" / "0" forces the fused updates on / off on any CPU (to measure them where `applies` leaves them off).
FUSED_UPDATES_ENV = "KERAS_VIT_FUSED_UPDATES"


def _handle(variable):
    """The resource handle of a tf.Variable, or of the tf.Variable inside a Keras variable."""
    return variable.handle if hasattr(variable, "handle") else variable.value.handle


def _dense_float(gradient, variable) -> bool:
    import tensorflow as tf

    return isinstance(gradient, tf.Tensor) and variable.dtype in (tf.float32, tf.float64)


def _sgd_update_step(self, gradient, variable, learning_rate):
    """keras.optimizers.SGD.update_step with momentum as one ResourceApplyKerasMomentum:
    m = momentum m - lr g; w += m (nesterov: w += momentum m - lr g), as Keras writes it."""
    if self.momentum == 0 or not _dense_float(gradient, variable):
        return type(self).update_step(self, gradient, variable, learning_rate)
    import tensorflow as tf

    m = self.momentums[self._get_variable_index(variable)]
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=_handle(variable), accum=_handle(m), lr=tf.cast(learning_rate, variable.dtype),
        grad=tf.cast(gradient, variable.dtype), momentum=tf.cast(self.momentum, variable.dtype),
        use_locking=False, use_nesterov=bool(self.nesterov))


def _adam_update_step(self, gradient, variable, learning_rate):
    """keras.optimizers.Adam(W).update_step as one ResourceApplyAdam: m += (g - m)(1 - beta_1),
    v += (g^2 - v)(1 - beta_2), w -= m alpha / (sqrt(v) + epsilon), alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t).
    AdamW's decoupled weight decay stays Keras' own (applied before, in `apply`)."""
    if self.amsgrad or not _dense_float(gradient, variable):
        return type(self).update_step(self, gradient, variable, learning_rate)
    import tensorflow as tf

    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    index = self._get_variable_index(variable)
    tf.raw_ops.ResourceApplyAdam(
        var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
        beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step), beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
        lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype), beta2=tf.cast(self.beta_2, dtype),
        epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False, use_nesterov=False)


_FUSED = {keras.optimizers.SGD: _sgd_update_step, keras.optimizers.Adam: _adam_update_step,
          keras.optimizers.AdamW: _adam_update_step}


def applies(optimizer, whole_step_xla: bool) -> bool:
    """Whether `fused_updates` fuses `optimizer`'s updates: Keras' own SGD, Adam or AdamW (exactly those classes:
    a subclass may have its own update), on TensorFlow, in a step not XLA-compiled whole (XLA fuses the update
    itself), under no distribution strategy (unmeasured there), on a CPU with AMX or an AMD Zen 4 or Zen 5 (measured there;
    other CPUs and GPUs keep Keras' ops until measured). KERAS_VIT_FUSED_UPDATES=1/0 forces it on/off on any CPU."""
    if type(optimizer) not in _FUSED or whole_step_xla or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return False
    from keras_vit.layers.fusion import scoped_cpu_or_forced

    return scoped_cpu_or_forced(FUSED_UPDATES_ENV)


@contextlib.contextmanager
def fused_updates(optimizer, whole_step_xla: bool = False) -> Iterator[None]:
    """While the training step is traced inside, `optimizer`'s per-variable updates are TensorFlow's fused ops
    (where `applies`); afterwards the optimizer is Keras' own again. The same formulas, the same variables."""
    if not applies(optimizer, whole_step_xla):
        yield
        return
    optimizer.update_step = types.MethodType(_FUSED[type(optimizer)], optimizer)
    try:
        yield
    finally:
        del optimizer.update_step
