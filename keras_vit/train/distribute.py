"""Where a run trains: one process, a tf.distribute strategy (MultiWorkerMirrored from TF_CONFIG,
Mirrored over local devices) or a JAX DataParallel mesh over several processes.

A multi-worker cluster is joined once per process, before any other TensorFlow work
(collective ops cannot be configured later). Every worker then checks that all were started with
the same options, and only the chief (worker 0) writes the run folder.

Environment:
  TF_CONFIG                            TensorFlow cluster: {"cluster": {"worker": ["host:port", ...]},
                                       "task": {"type": "worker", "index": i}} (a "chief" job is allowed)
  KERAS_DISTRIBUTION_JOB_ADDRESSES     JAX: the coordinator's host:port (or every process's, comma-separated;
                                       the first one coordinates)
  KERAS_DISTRIBUTION_NUM_PROCESSES     JAX: how many processes
  KERAS_DISTRIBUTION_PROCESS_ID        JAX: this process's id, 0 .. n-1 (0 is the chief)
  KERAS_VIT_PEER_TIMEOUT               seconds to wait for a peer (start-up, each collective); default 300
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np

from keras_vit.errors import TrainError

PEER_TIMEOUT_ENV = "KERAS_VIT_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 300.0
JAX_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
_TF_CONFIG_FORM = ('expected {"cluster": {"worker": ["host:port", ...]}, '
                   '"task": {"type": "worker", "index": N}}')
# Options that may differ between workers without changing the run (each host has its own paths).
_LOCAL_FIELDS = ("data_dir",)


class ClusterError(TrainError):
    """A cluster that cannot train: a malformed TF_CONFIG or JAX variable, a peer that does not
    answer, workers started with different options."""


class PeerLostError(ClusterError):
    """A worker of a running cluster stopped; restarting every worker with its own command
    continues from the last completed epoch."""


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


def peer_timeout_seconds(value: Optional[float] = None) -> float:
    """`value`, else $KERAS_VIT_PEER_TIMEOUT, else 300 s; ClusterError for a non-positive number."""
    if value is None:
        text = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_PEER_TIMEOUT
        try:
            value = float(text)
        except ValueError:
            raise ClusterError(f"{PEER_TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ClusterError(f"peer timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def parse_tf_config(text: str) -> Tuple[List[str], int]:
    """(every worker's host:port in cluster order, this task's index in it) from TF_CONFIG's text.

    The order is MultiWorkerMirroredStrategy's: the "chief" task first (when there is one), then
    the "worker" tasks. ClusterError, one line, for anything else.
    """
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ClusterError(f"TF_CONFIG is not valid JSON ({exc}); {_TF_CONFIG_FORM}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ClusterError(f"TF_CONFIG has no \"cluster\" object; {_TF_CONFIG_FORM}")
    cluster, task = spec["cluster"], spec.get("task")
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise ClusterError(f"TF_CONFIG cluster has jobs {unknown}; only \"worker\" (and one \"chief\") "
                           "are supported (MultiWorkerMirroredStrategy)")
    jobs: Dict[str, List[str]] = {}
    for job in ("chief", "worker"):
        addresses = cluster.get(job, [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ClusterError(f"TF_CONFIG cluster.{job} must be a list of \"host:port\" strings, got {addresses!r}")
        for a in addresses:
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ClusterError(f"TF_CONFIG cluster.{job} address {a!r} is not host:port (port 1-65535)")
        jobs[job] = addresses
    if len(jobs["chief"]) > 1:
        raise ClusterError(f"TF_CONFIG cluster.chief has {len(jobs['chief'])} addresses; at most one")
    if not jobs["chief"] and not jobs["worker"]:
        raise ClusterError(f"TF_CONFIG cluster lists no workers; {_TF_CONFIG_FORM}")
    if not isinstance(task, dict):
        raise ClusterError(f"TF_CONFIG has no \"task\" object; {_TF_CONFIG_FORM}")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in jobs or not jobs[kind]:
        raise ClusterError(f"TF_CONFIG task.type {kind!r} is not a job of the cluster "
                           f"({', '.join(j for j in jobs if jobs[j])})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
        raise ClusterError(f"TF_CONFIG task.index {index!r} is out of range for {len(jobs[kind])} "
                           f"{kind} task(s) (0..{len(jobs[kind]) - 1})")
    addresses = jobs["chief"] + jobs["worker"]
    return addresses, (0 if kind == "chief" else len(jobs["chief"]) + index)


def parse_jax_env(env: Optional[Dict[str, str]] = None) -> Optional[Tuple[str, int, int]]:
    """(coordinator host:port, process count, process id) from the KERAS_DISTRIBUTION_* variables,
    or None when none is set. ClusterError, one line, when they are incomplete or malformed."""
    env = os.environ if env is None else env
    given = {k: env.get(k, "").strip() for k in JAX_ENV}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ClusterError(f"multi-process JAX needs {', '.join(JAX_ENV)}; missing {', '.join(missing)}")
    addresses = [a.strip() for a in given[JAX_ENV[0]].split(",")]
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ClusterError(f"{JAX_ENV[0]} entry {a!r} is not host:port")
    numbers = []
    for name in JAX_ENV[1:]:
        try:
            numbers.append(int(given[name]))
        except ValueError:
            raise ClusterError(f"{name}={given[name]!r} is not an integer") from None
    count, pid = numbers
    if count < 1:
        raise ClusterError(f"{JAX_ENV[1]} must be >= 1, got {count}")
    if not 0 <= pid < count:
        raise ClusterError(f"{JAX_ENV[2]}={pid} is out of range 0..{count - 1}")
    if len(addresses) > 1 and len(addresses) != count:
        raise ClusterError(f"{JAX_ENV[0]} lists {len(addresses)} addresses but {JAX_ENV[1]} is {count}")
    return addresses[0], count, pid


_WATCHDOG = """
import os, select, signal, sys
ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[2]))
if not ready:  # the parent is still waiting: it cannot be interrupted from inside
    sys.stderr.write(sys.argv[3] + "\\n")
    sys.stderr.flush()
    os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


def _real_stderr() -> Optional[int]:
    """The file descriptor of the terminal's stderr when vitcli filters fd 2 through a thread of
    this process (it cannot pass on a line once this process is stopped), else None (inherit)."""
    text = os.environ.get("KERAS_VIT_STDERR_FD", "")
    try:
        fd = int(text)
        os.fstat(fd)
        return fd
    except (ValueError, OSError):
        return None


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Stop the process with one line when the block has not finished within `seconds`.

    Waiting for a peer blocks inside TensorFlow's C++ runtime, which holds the GIL and ignores
    SIGTERM, so the guard is a small separate process that kills this one (exit status 137).
    """
    import subprocess

    message = (f"Error: {what} within {seconds:g} s; check the addresses, ports and firewall, and that every "
               f"worker was started (raise the wait with --peer-timeout or {PEER_TIMEOUT_ENV})")
    guard = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
                             stdin=subprocess.PIPE, stderr=_real_stderr())
    try:
        yield
    finally:
        guard.stdin.close()  # end of input: the guard exits without a word
        guard.wait()


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
        return Cluster(peer_timeout=timeout)
    backend = keras.backend.backend()
    if backend == "tensorflow" and os.environ.get("TF_CONFIG", "").strip():
        addresses, index = parse_tf_config(os.environ["TF_CONFIG"])
        import tensorflow as tf  # only on the TensorFlow backend (JAX machines may lack it)

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        with _deadline(timeout, f"worker {index}: the cluster {', '.join(addresses)} did not answer"):
            strategy = _multi_worker_strategy(options)
        _CLUSTER = Cluster("tensorflow", len(addresses), index, strategy, timeout)
    elif backend == "jax" and parse_jax_env() is not None:
        coordinator, count, pid = parse_jax_env()
        import jax  # only on the JAX backend

        with _deadline(timeout + 5, f"process {pid}: the coordinator {coordinator} and the other processes "
                                    "did not answer"):
            try:
                jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=pid,
                                           initialization_timeout=int(max(1, timeout)))
            except Exception as exc:  # noqa: BLE001 - XLA raises its own runtime errors; show one line
                raise ClusterError(f"process {pid}: could not join the coordinator {coordinator} within "
                                   f"{timeout:g} s ({_first_line(exc)})") from None
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
    with _deadline(cluster.peer_timeout, f"worker {cluster.index}: the other workers did not answer"):
        rows = cluster.gather([mine])
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


def file_share(cluster: Cluster, dataset: str) -> Optional[Tuple[int, int]]:
    """(workers, this worker's index) when this worker should read only its share of an image
    folder's training files (TensorFlow clusters; Keras shards JAX processes' batches itself)."""
    if cluster.multi_worker and cluster.backend == "tensorflow" and dataset.startswith("folder:"):
        return cluster.num_workers, cluster.index
    return None


def uneven_shares(cluster: Cluster, dataset: str) -> bool:
    """Whether this worker's share of the training data can differ in size from the others'
    (image folders, TFRecord shards and tfds files in a TensorFlow cluster). A worker whose share
    ran out first would get empty batches, which the convolution's gradient cannot take, so such
    training streams are endless and every worker takes the same steps per epoch."""
    return (cluster.multi_worker and cluster.backend == "tensorflow"
            and dataset.startswith(("folder:", "records:", "tfds:")))


def shard_datasets(cluster: Cluster, dataset: str, batch_size: int, train, *evaluation):
    """The pipelines with the auto-shard policy for `dataset`: each worker reads its share.

    An image folder's training split is already this worker's share of the files (file_share:
    each worker decodes only its own), so it is not sharded again (OFF); tf.distribute then
    takes each step's per-worker batch from it. In-memory arrays and the folder's validation
    and test files shard by DATA: every worker walks the same order and keeps its slice of each
    global batch (every example evaluated once). tfds and TFRecord files shard AUTO: by FILE when
    there are at least as many files as workers, else by DATA (see uneven_shares). On JAX, Keras
    shards only batches of a known size, so validation and test drop their last partial batch.
    """
    if not cluster.multi_worker:
        return (train, *evaluation)
    import tensorflow as tf

    policy = tf.data.experimental.AutoShardPolicy

    def with_policy(ds, chosen):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = chosen
        return ds.with_options(options)

    file_based = dataset.startswith(("tfds:", "records:"))
    shared = policy.AUTO if file_based else policy.DATA
    if cluster.backend == "jax":
        evaluation = tuple(p.rebatch(batch_size, drop_remainder=True) for p in evaluation)
    own = file_share(cluster, dataset) is not None
    return (with_policy(train, policy.OFF if own else shared), *(with_policy(p, shared) for p in evaluation))


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
    return False


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


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
