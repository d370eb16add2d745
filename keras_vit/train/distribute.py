"""Where a run trains: one process, a tf.distribute strategy (MultiWorkerMirrored from TF_CONFIG,
Mirrored over local devices) or a JAX DataParallel mesh over several processes.

A multi-worker cluster is joined once per process, before any other TensorFlow work
(collective ops cannot be configured later). Every worker then checks that all were started with
the same options, and only the chief (worker 0) writes the run folder.

The environment variables are read in keras_vit.train.cluster_env; which data each worker
reads is keras_vit.train.sharding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import keras
import numpy as np

from keras_vit.errors import first_line
from keras_vit.train.cluster_env import (  # noqa: F401 - ClusterError, PeerLostError: public here too
    DEFAULT_PEER_TIMEOUT,
    JAX_ENV,
    ClusterError,
    PeerLostError,
    deadline,
    parse_jax_env,
    parse_tf_config,
    peer_timeout_seconds,
)

# Options that may differ between workers without changing the run (each host has its own paths).
_LOCAL_FIELDS = ("data_dir",)


@dataclasses.dataclass
class Cluster:
    """This process's place in the run: `num_workers` processes, this one is `index` (0 = chief)."""

    backend: str = "none"  # "tensorflow" (MultiWorkerMirrored), "jax" (jax.distributed) or "none"
    num_workers: int = 1
    index: int = 0
    strategy: Any = None
    peer_timeout: float = DEFAULT_PEER_TIMEOUT

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run folder (worker 0)."""
        return self.index == 0

    @property
    def multi_worker(self) -> bool:
        """Whether several processes train together."""
        return self.num_workers > 1

    def gather(self, values: Sequence[int]) -> np.ndarray:
        """Every worker's `values` (small non-negative ints < 2**31), shape (num_workers, len(values))."""
        local = np.asarray([list(values)], np.int32)
        if not self.multi_worker:
            return local
        if self.backend == "jax":
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(local)).reshape(self.num_workers, -1)
        import tensorflow as tf

        strategy = self.strategy
        per_replica = strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant(local))
        rows = strategy.gather(per_replica, axis=0).numpy()
        # one row per replica; replicas are numbered worker by worker
        return rows.reshape(self.num_workers, -1, rows.shape[-1])[:, 0, :]


_CLUSTER: Optional[Cluster] = None


def start_cluster(kind: str = "auto", peer_timeout: Optional[float] = None) -> Cluster:
    """Join the multi-worker cluster described by the environment (TF_CONFIG on TensorFlow, the
    KERAS_DISTRIBUTION_* variables on JAX), once per process; a one-process Cluster otherwise.

    Call it before any other TensorFlow work. Waits at most `peer_timeout` seconds for the other
    workers, then exits the process with one line (the wait cannot be interrupted otherwise).
    """
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    timeout = peer_timeout_seconds(peer_timeout)
    if kind == "none":
        named = [k for k in ("TF_CONFIG", *JAX_ENV) if os.environ.get(k, "").strip()]
        if named:  # the other workers would wait for this one until their peer timeout
            print(f"distribute none: training alone, {' and '.join(named[:2])} ignored", file=sys.stderr)
        return Cluster(peer_timeout=timeout)
    backend = keras.backend.backend()
    if backend == "tensorflow" and os.environ.get("TF_CONFIG", "").strip():
        addresses, index = parse_tf_config(os.environ["TF_CONFIG"])
        import tensorflow as tf  # only on the TensorFlow backend (JAX machines may lack it)

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        with deadline(timeout, f"worker {index}: the cluster {', '.join(addresses)} did not answer"):
            try:
                strategy = _multi_worker_strategy(options)
            except tf.errors.OpError as exc:  # "Could not start gRPC server": its address is taken
                raise ClusterError(f"worker {index}: could not start its server on {addresses[index]} "
                                   f"({first_line(exc)}); is another process listening on that port?") from None
        _CLUSTER = Cluster("tensorflow", len(addresses), index, strategy, timeout)
    elif backend == "jax" and parse_jax_env() is not None:
        coordinator, count, pid = parse_jax_env()
        import jax  # only on the JAX backend

        with deadline(timeout + 5, f"process {pid}: the coordinator {coordinator} and the other processes "
                                    "did not answer", said=timeout):
            try:
                jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=pid,
                                           initialization_timeout=int(max(1, timeout)))
            except Exception as exc:  # noqa: BLE001 - XLA raises its own runtime errors; show one line
                raise ClusterError(f"process {pid}: could not join the coordinator {coordinator} within "
                                   f"{timeout:g} s ({first_line(exc)})") from None
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        _CLUSTER = Cluster("jax", count, pid, None, timeout)
    else:
        return Cluster(peer_timeout=timeout)
    return _CLUSTER


def _multi_worker_strategy(options):
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras' fit passes it over several
    workers (keras-team/keras#20585): the first (x, y) batch as a structure, and the scalar
    metrics with axis=0 (MirroredStrategy accepts both; MultiWorkerMirrored raises)."""
    import tensorflow as tf

    class Strategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            if isinstance(value, (tuple, list, dict)):
                return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
            if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
                axis = None  # a scalar per replica: reduce across the replicas only
            return super().reduce(reduce_op, value, axis)

    return Strategy(communication_options=options)


def clip_summed_gradients(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Make `optimizer` clip the gradient summed over every replica, as one device would.

    Keras clips each replica's share before its all-reduce; with several replicas the clipped
    sum then differs from the clipped gradient of one worker. Under a tf.distribute strategy with
    several replicas, this optimizer instance first all-reduces, clips the sum and hands each
    replica 1/R of it (Keras' own all-reduce then adds the R equal parts back up). Its class and
    config are unchanged, so saved models load anywhere.
    """
    if keras.backend.backend() != "tensorflow" or not (optimizer.global_clipnorm or optimizer.clipnorm
                                                        or optimizer.clipvalue):
        return optimizer
    import tensorflow as tf

    plain = optimizer._clip_gradients

    def clip(grads):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        present = [i for i, g in enumerate(grads) if g is not None]
        if replicas < 2 or not present:
            return plain(grads)
        summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        clipped = plain(summed)
        out = list(grads)
        for i, g in zip(present, clipped):
            out[i] = g / replicas
        return out

    optimizer._clip_gradients = clip
    return optimizer


def fingerprint(options: Dict[str, Any]) -> int:
    """A 31-bit hash of a run's options (host-local paths left out), equal on workers started alike."""
    shared = {k: v for k, v in options.items() if k not in _LOCAL_FIELDS}
    text = json.dumps(shared, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


def check_same_options(cluster: Cluster, options: Dict[str, Any]) -> None:
    """ClusterError on every worker when any worker was started with other options than the chief."""
    if not cluster.multi_worker:
        return
    mine = fingerprint(options)
    with deadline(cluster.peer_timeout, f"worker {cluster.index}: the other workers did not answer"):
        try:
            rows = cluster.gather([mine])
        except Exception as exc:  # noqa: BLE001 - TensorFlow's "joining a group with size 3, but that group has size 2"
            if cluster.backend != "tensorflow":
                raise
            raise ClusterError(f"worker {cluster.index}: the workers could not exchange their options "
                               f"({first_line(exc)}); were they started with different TF_CONFIG cluster lists?"
                               ) from None
    differ = [i for i, row in enumerate(rows) if int(row[0]) != int(rows[0][0])]
    if differ:
        who = ", ".join(f"worker {i}" for i in differ)
        raise ClusterError(f"{who} started with different options than the chief (worker 0): start every "
                           "worker with the same command, only TF_CONFIG's task (or the process id) differs")


class FollowChief(keras.callbacks.Callback):
    """Start every worker from the chief's restored state: its epoch, weights and optimizer
    variables (only the chief keeps a backup; put this callback after BackupAndRestore)."""

    def __init__(self, cluster: Cluster):
        super().__init__()
        self.cluster = cluster

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        epoch = int(self.cluster.gather([int(self.model._initial_epoch or 0)])[0][0])
        if epoch == 0:
            return
        model, strategy = self.model, self.cluster.strategy
        if model.optimizer is not None and not model.optimizer.built:
            with strategy.scope():
                model.optimizer.build(model.trainable_variables)
        variables = list(model.variables) + (list(model.optimizer.variables) if model.optimizer is not None else [])
        for v in variables:
            value = tf.convert_to_tensor(v.value)
            wide = tf.cast(value, tf.float64) if not value.dtype.is_floating else value
            mine = wide if self.cluster.is_chief else tf.zeros_like(wide)
            shares = strategy.experimental_distribute_values_from_function(lambda ctx, mine=mine: mine)
            total = strategy.reduce(tf.distribute.ReduceOp.SUM, shares, axis=None)
            v.assign(tf.cast(total, value.dtype))
        model._initial_epoch = epoch


def weights_digest(model: keras.Model) -> str:
    """A short SHA-256 of the model's weights (equal on every worker of a synchronous run)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


def is_peer_lost(cluster: Cluster, exc: BaseException) -> bool:
    """Whether a training error means a peer stopped (a dead worker breaks every collective)."""
    if not cluster.multi_worker:
        return False
    if cluster.backend == "tensorflow":
        import tensorflow as tf

        return isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                                tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.FailedPreconditionError))
    while exc is not None:  # JAX: a collective (Gloo, NCCL) whose peer is gone, raised as JaxRuntimeError, or as a
        # ValueError with the same text (a CI run's survivor: "UNKNOWN: Gloo AllGather failed: ... Connection reset
        # by peer" went out as a user error, then jax.distributed's shutdown barrier aborted the process)
        if type(exc).__name__ in ("JaxRuntimeError", "XlaRuntimeError") or any(m in str(exc) for m in _PEER_GONE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_PEER_GONE = ("Gloo ", "NCCL ", "Connection reset by peer", "heartbeat timeout")  # the collectives' own words


def check_cluster_options(cluster: Cluster, batch_size: int, grad_accum: int) -> None:
    """ClusterError (the same on every worker: they have the same options) for what a cluster cannot train:
    a batch the replicas do not share evenly (TensorFlow weighs the shares' examples unequally, JAX refuses
    it), and gradient accumulation on TensorFlow (its update runs under a cond, where MultiWorkerMirrored
    cannot all-reduce)."""
    if not cluster.multi_worker:
        return
    if cluster.backend == "tensorflow":
        replicas = int(cluster.strategy.num_replicas_in_sync)
    else:
        import jax

        replicas = jax.device_count()
    if batch_size % replicas:
        lower, upper = batch_size - batch_size % replicas, batch_size + replicas - batch_size % replicas
        raise ClusterError(f"--batch-size {batch_size} is not a multiple of the cluster's {replicas} replicas; "
                           f"use {lower or upper}" + (f" or {upper}" if lower else ""))
    if grad_accum > 1 and cluster.backend == "tensorflow":
        raise ClusterError(f"--grad-accum {grad_accum} does not work with multi-worker training on TensorFlow "
                           "(Keras accumulates under a cond, where MultiWorkerMirroredStrategy cannot all-reduce); "
                           "raise --batch-size instead: the workers' batches add up")


def distribution_scope(kind: str = "auto"):
    """A context for building the model: the cluster's MultiWorkerMirroredStrategy when one was
    joined (start_cluster), else Mirrored over several GPUs (or over every visible device with
    kind="mirrored") on TensorFlow, keras.distribution.DataParallel on JAX; else a no-op."""
    if kind == "none":
        return contextlib.nullcontext()
    if _CLUSTER is not None and _CLUSTER.strategy is not None:
        return _CLUSTER.strategy.scope()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # only on the TensorFlow backend (JAX machines may lack it)

        if os.environ.get("TF_CONFIG", "").strip():
            return start_cluster(kind).strategy.scope()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy().scope()
        if kind == "mirrored":
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            return tf.distribute.MirroredStrategy(devices).scope()
        return contextlib.nullcontext()
    if backend == "jax":
        import jax  # only on the JAX backend

        if _CLUSTER is None and (len(jax.devices()) > 1 or kind == "mirrored"):
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
