"""Towers: a traced step's batch split into parts that run side by side, each op on one thread (TensorFlow, 2 cores).

TensorFlow forks every op over its intra-op threads (its Eigen pool, which oneDNN's GEMMs use too), and on two
cores that fork and join costs much of the second core: ViT-Ti/16's bf16 GEMMs gain 1.35x from it where torch's
(OpenMP) gain 1.89x. With one intra-op thread and two inter-op threads, a step whose batch runs as two towers
(two calls of the model on its halves, the outputs joined) is two independent streams of ops that TensorFlow's
executor runs at once, one a core. On the AMX Xeon (2 cores): a chain of Ti/16's bf16 GEMMs 1,780 against 1,330
GFLOP/s; a Ti/16 training step 1.28-1.33x in bf16, 1.21x in float32, B/16 1.12x in float32 and level in bf16
(BENCHMARKS.md, 2026-12-05, "Two towers on one thread each"). The cost: in such a process every TensorFlow op that is
not in a tower runs on one core, a step XLA-compiled whole too (0.62x at Ti/16: `VisionTransformer.compile` warns, and
`vitcli train --jit xla/fusible` keeps TensorFlow's threads).

The thread counts are fixed when TensorFlow starts its runtime, so `configure` runs when `keras_vit.model` is first
imported, again when a model is built and when `vitcli train` has set its policy (before the first variables or
tensors start it); where the process started TensorFlow earlier, or set its own thread counts, it does nothing and
nothing splits. On the AMD Zen 5 and Zen 4 the towers are for a bf16 step only (1.18x the Zen 5's Ti/16 scoped step): their float32
step is XLA's whole (`precision.resolve`), which the towers' one thread slows to 0.65x, so there they wait for a
mixed_bfloat16 policy. The outputs are the same function of the inputs (each
image's tokens never meet another's; models with BatchNormalization or activity regularisers are not split), so
the loss, metrics and gradients are those of the whole batch. Splits: a traced (not eager) call with
`training=True` (Keras' train step, a custom loop's tf.function), and the test and predict steps of keras-vit's
models (`TowerModel`); never an export (inference traced outside those steps) or a symbolic call.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Optional

import keras

# Unset: two towers on an AMX CPU with exactly two cores to schedule on (the kind measured), and on a two-core Zen 4 or Zen 5
# under mixed_bfloat16, else none;
# "0" / "1": none; "N" >= 2: N towers on any CPU (one intra-op thread, N inter-op threads).
TOWERS_ENV = "KERAS_VIT_TOWERS"

_configured = 1  # the towers this process's TensorFlow was started for (1: none)
_STATE = threading.local()


def _schedulable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def planned(policy: Optional[str] = None) -> int:
    """The towers asked for: `KERAS_VIT_TOWERS` if set (a count), else 2 on a CPU with two cores that is AMX, or
    an AMD Zen 4 or Zen 5 with `policy` (the dtype policy's name, None: not known yet) mixed_bfloat16; else 1."""
    forced = os.environ.get(TOWERS_ENV, "").strip()
    if forced:
        try:
            count = int(forced)
        except ValueError:
            raise ValueError(f"{TOWERS_ENV} must be a whole number of towers (0 or 1: none), got {forced!r}") from None
        if count < 0:
            raise ValueError(f"{TOWERS_ENV} must be a whole number of towers (0 or 1: none), got {forced!r}")
        return max(count, 1)
    from keras_vit import precision

    hardware = precision.detect_hardware("tensorflow")
    if _schedulable_cores() != 2 or hardware.device != "cpu":
        return 1
    if hardware.cpu_bf16 == "amx_bf16":
        return 2
    # the Zen 5: 1.18x its scoped bf16 Ti/16 step (BENCHMARKS.md, 2026-12-06), the Zen 4 with them too (2026-12-07);
    # their float32 step is XLA's whole, which one thread slows to 0.65x at Ti/16
    return 2 if hardware.cpu_kind in precision.AMD_KINDS and policy == "mixed_bfloat16" else 1


def keep_threads_for(jit_mode: str) -> None:
    """For a run whose step is XLA's (`xla`, or `fusible`'s clusters): TensorFlow's own threads, no towers, unless
    `KERAS_VIT_TOWERS` says otherwise. XLA's computations run on the intra-op pool, which the towers set to one thread
    (B/16 `fusible` 0.78x, a whole-step XLA Ti/16 step 0.62x). Call it before `keras_vit.model` is imported."""
    if jit_mode in ("xla", "fusible"):
        os.environ.setdefault(TOWERS_ENV, "0")


def configure(policy: Optional[str] = None) -> int:
    """Start TensorFlow with one intra-op thread and a tower's worth of inter-op threads, when towers are planned
    (for `policy`, the dtype policy's name if known) and TensorFlow's runtime has not started (and the process set
    no thread counts of its own). Returns the towers the process now runs (1: none)."""
    global _configured
    if _configured > 1 or keras.backend.backend() != "tensorflow":
        return _configured
    if os.environ.get("TF_NUM_INTRAOP_THREADS") or os.environ.get("TF_NUM_INTEROP_THREADS"):
        return _configured
    import tensorflow as tf
    from tensorflow.python.eager import context

    threading_config = tf.config.threading
    if context.context()._context_handle is not None or threading_config.get_intra_op_parallelism_threads() \
            or threading_config.get_inter_op_parallelism_threads():
        return _configured  # (checked first: every model built after TensorFlow started reads no /proc/cpuinfo)
    count = planned(policy)
    if count < 2:
        return _configured
    threading_config.set_intra_op_parallelism_threads(1)
    threading_config.set_inter_op_parallelism_threads(count)
    _configured = count
    return _configured


def count() -> int:
    """The towers this process's TensorFlow runs (1: none)."""
    return _configured


@contextlib.contextmanager
def step(model: keras.Model):
    """Marks `model`'s own test or predict step being traced: its call splits there too (`training=False`)."""
    before = getattr(_STATE, "step_model", None)
    _STATE.step_model = model
    try:
        yield
    finally:
        _STATE.step_model = before


def _splittable(model: keras.Model) -> bool:
    """No layer that mixes the batch's images: BatchNormalization, or an activity regulariser (its loss per call)."""
    cached = getattr(model, "_keras_vit_splittable", None)
    if cached is None:
        found = model._flatten_layers(include_self=True)
        cached = not any(isinstance(layer, keras.layers.BatchNormalization)
                         or getattr(layer, "activity_regularizer", None) is not None for layer in found)
        model._keras_vit_splittable = cached
    return cached


def parts(model: keras.Model, inputs: Any, training, mask=None) -> int:
    """How many towers `model`'s call on `inputs` runs as (1: it runs whole; so with a mask, which is not split)."""
    n = _configured
    if n < 2 or any(m is not None for m in keras.tree.flatten(mask)) or getattr(_STATE, "inside", False):
        return 1
    if not (training is True or getattr(_STATE, "step_model", None) is model):
        return 1
    import tensorflow as tf

    if tf.executing_eagerly():
        return 1
    flat = keras.tree.flatten(inputs)
    if not flat or not all(isinstance(t, tf.Tensor) and t.shape.rank for t in flat):
        return 1
    from keras_vit.layers.fusion import _STEP

    if getattr(_STEP, "xla", False):  # a step XLA-compiled whole runs as one computation, on one thread here
        return 1
    return n if _splittable(model) else 1


# False: each tower casts the weights for itself (for bench.train_ab's `--without shared-casts`).
SHARE_CASTS = True
_keras_maybe_cast = None
_upcast_sums: dict = {}
_XLA_SUM_MIN_SIZE = 1 << 16  # elements


def _upcast_sum(gradients: list, dtype):
    """The towers' gradients of one cast weight, each cast to the weight's dtype and summed: one XLA pass (a small
    weight's in TensorFlow's ops, cheaper than an XLA launch)."""
    import tensorflow as tf

    def total(*gs):
        return tf.add_n([tf.cast(g, dtype) for g in gs])

    if (gradients[0].shape.num_elements() or 0) < _XLA_SUM_MIN_SIZE:
        return total(*gradients)
    if dtype not in _upcast_sums:
        _upcast_sums[dtype] = tf.function(total, jit_compile=True)
    return _upcast_sums[dtype](*gradients)


def _shared_cast(value, dtype, n: int) -> list:
    """`value` (a float variable) read and cast to `dtype` once, as `n` outputs (one a tower); the gradient is the
    outputs' gradients cast back and summed in the variable's dtype, as `n` casts of their own would give it."""
    import tensorflow as tf

    read = tf.convert_to_tensor(value)

    @tf.custom_gradient
    def cast(x):
        y = tf.cast(x, dtype)

        def grad(*upstream):
            present = [g for g in upstream if g is not None]
            return _upcast_sum(present, x.dtype) if present else tf.zeros_like(x)

        return [y] * n, grad

    return cast(read)


def _maybe_cast_once(scope, value):
    """Keras' autocast of a variable (`AutocastScope.maybe_cast`) while towers are traced: each float variable read
    and cast once for all the towers, each tower's first read of it taking an output of its own."""
    casts = getattr(_STATE, "casts", None)
    if casts is None or scope.dtype is None or not hasattr(value, "handle") or not value.dtype.is_floating \
            or keras.backend.standardize_dtype(value.dtype) == scope.dtype:
        return _keras_maybe_cast(scope, value)
    key = (id(value), scope.dtype)
    if key not in casts:
        casts[key] = (value, _shared_cast(value, scope.dtype, _STATE.parts), set())  # value kept alive with its id
    _, outputs, taken = casts[key]
    tower = _STATE.tower
    if tower in taken:  # a second read in one tower: a cast of its own (its gradient summed in float32 too)
        return _keras_maybe_cast(scope, value)
    taken.add(tower)
    return outputs[tower]


@contextlib.contextmanager
def _one_cast_per_variable(n: int):
    """Under a mixed policy, each float variable read and cast once for the `n` towers, its gradients cast back and
    summed in one XLA pass: the same gradients, to the bit, as a cast per tower, with a third of the memory traffic
    (a cast per tower, one back per tower, then an AddN: 36 bytes a weight; this: 14)."""
    global _keras_maybe_cast
    if not SHARE_CASTS:
        yield
        return
    from keras.src.backend.common import variables

    if _keras_maybe_cast is None:
        _keras_maybe_cast = variables.AutocastScope.maybe_cast
        variables.AutocastScope.maybe_cast = _maybe_cast_once
    _STATE.casts, _STATE.parts, _STATE.tower = {}, n, 0
    try:
        yield
    finally:
        _STATE.casts = None


def run(call: Callable[[Any], Any], inputs: Any, n: int) -> Any:
    """`call` on `n` consecutive slices of the batch of `inputs` (a tensor or a structure of them), the outputs
    joined along the batch: the same values as `call(inputs)`, as `n` independent streams of ops."""
    import tensorflow as tf

    size = tf.shape(keras.tree.flatten(inputs)[0])[0]
    bounds = [size * i // n for i in range(n + 1)]
    outs = []
    _STATE.inside = True
    try:
        with _one_cast_per_variable(n):
            for i in range(n):
                _STATE.tower = i
                outs.append(call(keras.tree.map_structure(lambda t, i=i: t[bounds[i]:bounds[i + 1]], inputs)))
    finally:
        _STATE.inside = False
    return keras.tree.map_structure(lambda *xs: tf.concat(list(xs), axis=0), *outs)


@keras.saving.register_keras_serializable(package="keras_vit")
class TowerModel(keras.Model):
    """A functional keras.Model whose traced steps run its batch as towers (`parts`): the base of keras-vit's
    models (VisionTransformer, the masked-patch pre-trainer, the few-shot feature extractor)."""

    def call(self, inputs, training=None, mask=None, **kwargs):
        n = parts(self, inputs, training, mask)
        if n < 2:
            return super().call(inputs, training=training, mask=mask, **kwargs)
        return run(lambda part: super(TowerModel, self).call(part, training=training, mask=mask, **kwargs), inputs, n)

    def test_step(self, *args, **kwargs):
        if keras.backend.backend() != "tensorflow":  # towers are TensorFlow's; torch.compile traces no context manager
            return super().test_step(*args, **kwargs)
        with step(self):
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args, **kwargs):
        if keras.backend.backend() != "tensorflow":
            return super().predict_step(*args, **kwargs)
        with step(self):
            return super().predict_step(*args, **kwargs)
