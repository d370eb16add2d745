"""The learning-rate schedule of every recipe: linear warm-up, then cosine decay (paper, Appendix B),
computed once per optimizer update of a traced train step instead of once per variable."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Tuple

import keras


@keras.saving.register_keras_serializable(package="keras_vit")
class WarmupCosine(keras.optimizers.schedules.CosineDecay):
    """keras' CosineDecay (with its linear warm-up) that one traced optimizer update evaluates once.

    Keras' optimizers read `learning_rate` once per variable for the decoupled weight decay and
    again for the update: 70+ copies of the schedule's ops (each a cond) in a small ViT's train
    step. Within `once()` (an optimizer's `apply`, see `evaluate_once_per_update`, where the step
    counter does not move), a TensorFlow trace reuses the first value for the same graph and
    step, and an eager update (any backend; JAX's un-jitted `--jit none` took 17 s a step with a
    cond per variable) its first value; a JAX trace and everything outside it compute as keras' does.
    """

    def __init__(self, *args, steps_per_update: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        # With gradient accumulation Keras evaluates the schedule at its micro-step counter (optimizer._iterations),
        # which moves k times per update: the schedule is then read at micro-step // k, the update's own count.
        self.steps_per_update = int(steps_per_update)
        self._memo: Optional[Dict[Tuple[int, int], Tuple[Any, Any]]] = None

    def _at(self, step):
        if self.steps_per_update > 1:
            step = keras.ops.floor_divide(step, self.steps_per_update)
        return super().__call__(step)

    def get_config(self) -> dict:
        return {**super().get_config(), "steps_per_update": self.steps_per_update}

    @contextlib.contextmanager
    def once(self) -> Iterator[None]:
        """Within this block, a traced graph computes the rate once per step variable."""
        outer, self._memo = self._memo, {}
        try:
            yield
        finally:
            self._memo = outer

    def __call__(self, step):
        if self._memo is None:
            return self._at(step)
        graph = _traced_graph()
        # Eagerly (any backend) `once()` spans one update at one step: its first value serves the others.
        key = ("update", None) if graph is None else (id(graph), id(step))
        if key not in self._memo:
            value = self._at(step)
            if graph is None and _jax_tracer(value):  # a JAX trace (jit, or a cond's branch): not cached
                return value
            self._memo[key] = (graph, value)  # the graph is kept alive with its key
        return self._memo[key][1]


def _traced_graph():
    """The TensorFlow graph being traced, or None (eager, or another backend)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.compat.v1.get_default_graph() if tf.inside_function() else None


def _jax_tracer(value) -> bool:
    """Whether `value` belongs to a JAX trace, so that it must not outlive it."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return isinstance(value, jax.core.Tracer)


def evaluate_once_per_update(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Make `optimizer.apply` (every update goes through it) evaluate its WarmupCosine once; the step
    counter moves only at the end of `apply`, so every read inside sees the same step."""
    schedule = getattr(optimizer, "_learning_rate", None)
    if not isinstance(schedule, WarmupCosine):
        return optimizer
    apply = optimizer.apply

    def apply_once(grads, trainable_variables=None):
        with schedule.once():
            return apply(grads, trainable_variables)

    optimizer.apply = apply_once
    return optimizer


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, steps_per_update: int = 1) -> WarmupCosine:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at
    `total_steps` (the paper's schedule, Appendix B); steps are optimizer updates, each
    `steps_per_update` micro-steps of gradient accumulation."""
    total_steps = max(1, int(total_steps))
    warmup = max(0, min(int(warmup_steps), total_steps - 1))
    return WarmupCosine(initial_learning_rate=0.0 if warmup else peak, decay_steps=total_steps - warmup, alpha=0.0,
                        warmup_target=peak if warmup else None, warmup_steps=warmup, steps_per_update=steps_per_update)
