"""What the environment says about a multi-worker cluster: TF_CONFIG and Keras' JAX variables
parsed into addresses and this process's index (one-line ClusterError for anything malformed),
the peer timeout, and the guard process that ends a wait on peers that never answer.

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
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from keras_vit.errors import TrainError

PEER_TIMEOUT_ENV = "KERAS_VIT_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 300.0
JAX_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
_TF_CONFIG_FORM = ('expected {"cluster": {"worker": ["host:port", ...]}, '
                   '"task": {"type": "worker", "index": N}}')


class ClusterError(TrainError):
    """A cluster that cannot train: a malformed TF_CONFIG or JAX variable, a peer that does not
    answer, workers started with different options."""


class PeerLostError(ClusterError):
    """A worker of a running cluster stopped; restarting every worker with its own command
    continues from the last completed epoch."""


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
def deadline(seconds: float, what: str, said: Optional[float] = None):
    """Stop the process with one line when the block has not finished within `seconds` (the line says
    `said`, the user's --peer-timeout, where the guard waits a grace period longer).

    Waiting for a peer blocks inside TensorFlow's C++ runtime, which holds the GIL and ignores
    SIGTERM, so the guard is a small separate process that kills this one (exit status 137).
    """
    import subprocess

    message = (f"Error: {what} within {seconds if said is None else said:g} s; check the addresses, ports and firewall, and that every "
               f"worker was started (raise the wait with --peer-timeout or {PEER_TIMEOUT_ENV})")
    guard = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
                             stdin=subprocess.PIPE, stderr=_real_stderr())
    try:
        yield
    finally:
        guard.stdin.close()  # end of input: the guard exits without a word
        guard.wait()
