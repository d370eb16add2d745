"""Where a run trains: a tf.distribute strategy or a JAX DataParallel mesh, and its replica count."""
from __future__ import annotations

import contextlib
import os

import keras


def distribution_scope(kind: str = "auto"):
    """A context for building the model: a tf.distribute strategy on TensorFlow
    (MultiWorkerMirrored from TF_CONFIG, Mirrored over several GPUs, or over every visible
    device with kind="mirrored"), keras.distribution.DataParallel on JAX; else a no-op."""
    if kind == "none":
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # only on the TensorFlow backend (JAX machines may lack it)

        if os.environ.get("TF_CONFIG"):
            return tf.distribute.MultiWorkerMirroredStrategy().scope()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy().scope()
        if kind == "mirrored":
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            return tf.distribute.MirroredStrategy(devices).scope()
        return contextlib.nullcontext()
    if backend == "jax":
        import jax  # only on the JAX backend

        if len(jax.devices()) > 1 or kind == "mirrored":
            keras.distribution.set_distribution(keras.distribution.DataParallel())
    return contextlib.nullcontext()


def replicas(model: keras.Model) -> int:
    """How many devices a compiled model trains on (tf.distribute replicas, or the JAX
    DataParallel mesh)."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None:
        return int(strategy.num_replicas_in_sync)
    dist = keras.distribution.distribution()
    return len(dist.device_mesh.devices.reshape(-1)) if dist is not None else 1

