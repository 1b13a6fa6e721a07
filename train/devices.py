"""Which devices train, as `--devices` names them, and the tf.distribute strategy over them.

    auto      every visible GPU, else the CPU (the default)
    cpu       the CPU as one device
    cpu:N     the CPU split into N logical devices, one replica each (MirroredStrategy), so that
              replicated training runs for real on a machine without GPUs
    gpu       every visible GPU (MirroredStrategy)
    gpu:0,1   those GPUs

With TF_CONFIG set, MultiWorkerMirroredStrategy spans the machines (one worker each, on its GPUs or
its CPU); `cpu:N` is then refused, since the workers are the replicas.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time

from runtime.errors import EdgeKitError, WorkFailed
from runtime.limits import cores, json_loads


def max_cpu_replicas() -> int:
    """cpu:N takes at most one replica per core (two on a one-core machine, so replication is testable anywhere):
    64 on two cores ran for minutes and ended in a TensorFlow traceback."""

    return max(2, cores())

_SPEC = re.compile(r"^(auto|cpu|gpu)(?::(\d+(?:,\d+)*))?$")


def check_spec(spec: str) -> str:
    """`spec` if it names devices as above, else a one-line error."""
    match = _SPEC.match(spec or "")
    ok = bool(match) and not (match.group(1) == "auto" and match.group(2))
    if ok and match.group(1) == "cpu" and match.group(2):
        ok = "," not in match.group(2) and 1 <= int(match.group(2)) <= max_cpu_replicas()
    if ok and match.group(1) == "gpu" and match.group(2):
        ids = match.group(2).split(",")
        ok = len(set(ids)) == len(ids)
    if not ok:
        raise EdgeKitError(f"--devices takes auto, cpu, cpu:N (N from 1 to {max_cpu_replicas()}, the cores), gpu or gpu:0,1 "
                           f"(distinct GPU indices); got {spec!r}.")
    return spec


MAX_WORKERS = 1024
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:[0-9]{1,5}$")


def tf_config() -> dict:
    """TF_CONFIG, checked before TensorFlow reads it: a JSON object whose cluster lists chief and worker
    addresses (host:port) and whose task is one of them ({"type": "worker", "index": 1}); {} when unset."""
    text = os.environ.get("TF_CONFIG") or ""
    if not text.strip():
        return {}
    how = ('expected {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}} '
           "(MultiWorkerMirroredStrategy's format; a chief may be listed under \"chief\")")
    try:
        config = json_loads(text)
    except (ValueError, RecursionError):
        raise EdgeKitError(f"TF_CONFIG is not JSON ({text[:40]!r}); {how}.") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster:
        raise EdgeKitError(f"TF_CONFIG has no cluster; {how}.")
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise EdgeKitError(f"TF_CONFIG's cluster names task type(s) {unknown}: EdgeKit trains with "
                           f"MultiWorkerMirroredStrategy, which has chief and worker tasks only (no parameter "
                           f"servers); {how}.")
    for kind, addresses in cluster.items():
        if not (isinstance(addresses, list) and 1 <= len(addresses) <= MAX_WORKERS
                and all(isinstance(a, str) and _ADDRESS.match(a) for a in addresses)):
            raise EdgeKitError(f"TF_CONFIG's cluster {kind!r} is not a list of host:port addresses; {how}.")
    if len(cluster.get("chief", [])) > 1:
        raise EdgeKitError(f"TF_CONFIG lists {len(cluster['chief'])} chiefs; expected at most one.")
    if not isinstance(task, dict) or task.get("type") not in cluster or type(task.get("index")) is not int \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise EdgeKitError(f"TF_CONFIG's task {task!r} is not one of its cluster's tasks (types "
                           f"{sorted(cluster)}, each indexed from 0); {how}.")
    return config


WAIT_ENV = "EDGEKIT_WORKER_TIMEOUT"
WAIT_SECONDS = 300.0


def rendezvous(config: dict, timeout: float | None = None, say=None) -> None:
    """Wait, in Python, until every other task of TF_CONFIG's cluster is up, before TensorFlow's strategy waits.

    TensorFlow's own wait for the cluster (in MultiWorkerMirroredStrategy's constructor) holds the GIL and
    installs its own SIGTERM handler: a worker that never starts meant no output and a process that SIGTERM
    did not stop. Here each task listens on its own address while it polls the others' (a peer answers from
    its listener, or from TensorFlow's server once it has moved on); it says what it waits for, stops on
    SIGTERM or Ctrl-C, and gives up after `timeout` seconds (EDGEKIT_WORKER_TIMEOUT, default 300) with one
    line (exit 1)."""

    if timeout is None:
        try:
            timeout = float(os.environ.get(WAIT_ENV) or WAIT_SECONDS)
        except ValueError:
            raise EdgeKitError(f"{WAIT_ENV} is the seconds to wait for the other workers; got "
                               f"{os.environ[WAIT_ENV]!r}.") from None
        if not 0 < timeout <= 86400:
            raise EdgeKitError(f"{WAIT_ENV} must be above 0 and at most 86400 seconds; got {timeout:g}.")
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    cluster, task = config["cluster"], config["task"]
    tasks = [(kind, i, address) for kind in ("chief", "worker") for i, address in enumerate(cluster.get(kind, []))]
    own = cluster[task["type"]][task["index"]]
    others = [(kind, i, address) for kind, i, address in tasks if (kind, i) != (task["type"], task["index"])]
    if not others:
        return
    port = int(own.rsplit(":", 1)[1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise WorkFailed(f"this worker's address {own} (TF_CONFIG task {task['type']} {task['index']}) cannot be "
                         f"listened on: {exc.strerror}; another process holds port {port}, or TF_CONFIG gives this "
                         "worker another machine's address.") from None
    waiting = {(kind, i): address for kind, i, address in others}
    deadline, told = time.monotonic() + timeout, False
    try:
        while waiting:
            for key, address in list(waiting.items()):
                host, _, peer_port = address.rpartition(":")
                try:
                    with socket.create_connection((host.strip("[]"), int(peer_port)), timeout=1):
                        del waiting[key]
                except OSError:
                    pass
            if not waiting:
                break
            names = ", ".join(f"{kind} {i} at {address}" for (kind, i), address in waiting.items())
            if time.monotonic() > deadline:
                raise WorkFailed(f"gave up after {timeout:g} s waiting for {names} (TF_CONFIG's cluster): start "
                                 f"`python -m train` with the same options there, with its own TF_CONFIG task, or "
                                 f"set {WAIT_ENV} to wait longer.")
            if not told:
                say(f"waiting for {names} to start (TF_CONFIG); giving up after {timeout:g} s")
                told = True
            time.sleep(0.2)
    finally:
        listener.close()


def workers() -> int:
    """How many workers TF_CONFIG names (1 without it)."""
    cluster = tf_config().get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")) or 1


def strategy(tf, spec: str = "auto"):
    """(strategy, description for the manifest) for `spec` on this machine.

    Call it before TensorFlow runs anything: splitting the CPU into logical devices and hiding
    GPUs are only possible then.
    """
    kind, _, arg = check_spec(spec).partition(":")
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "auto":
        kind = "gpu" if gpus else "cpu"
    if kind == "gpu" and not gpus:
        raise EdgeKitError(f"--devices {spec}: this machine has no GPU that TensorFlow can see "
                           "(tf.config.list_physical_devices('GPU') is empty); use --devices cpu or cpu:N.")
    if kind == "cpu" and gpus:
        _configure(tf, lambda: tf.config.set_visible_devices([], "GPU"), spec)
    replicas = int(arg) if kind == "cpu" and arg else 1
    if os.environ.get("TF_CONFIG"):
        if replicas > 1:
            raise EdgeKitError(f"--devices {spec} splits one machine's CPU, but TF_CONFIG makes each worker a "
                               "replica already; use --devices cpu or gpu with TF_CONFIG.")
        chosen = _gpu_names(gpus, arg, spec) if kind == "gpu" else ["/cpu:0"]
        if kind == "gpu" and arg:
            _configure(tf, lambda: tf.config.set_visible_devices([gpus[int(i)] for i in arg.split(",")], "GPU"),
                       spec)
        rendezvous(tf_config())  # TensorFlow's own wait cannot be timed out or stopped (it holds the GIL)
        made = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "gpu":
        chosen = _gpu_names(gpus, arg, spec)
        made = tf.distribute.MirroredStrategy(devices=chosen)
    elif replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        _configure(tf, lambda: tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]), spec,
            done=lambda: len(tf.config.list_logical_devices("CPU")) == replicas)
        chosen = [f"/cpu:{i}" for i in range(replicas)]
        made = tf.distribute.MirroredStrategy(devices=chosen)
    else:
        chosen = ["/cpu:0"]
        made = tf.distribute.get_strategy()  # the default: one device
    return made, {
        "requested": spec, "strategy": _name(made), "replicas": int(made.num_replicas_in_sync),
        "devices": chosen, "workers": workers(), "gpus": [g.name for g in gpus], "cpu_threads": os.cpu_count(),
    }


def _name(made) -> str:
    name = type(made).__name__
    return {"_DefaultDistributionStrategy": "default", "CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy"
            }.get(name, name)


def _gpu_names(gpus, arg: str, spec: str) -> list[str]:
    if not arg:
        return [f"/gpu:{i}" for i in range(len(gpus))]
    missing = [i for i in arg.split(",") if int(i) >= len(gpus)]
    if missing:
        raise EdgeKitError(f"--devices {spec}: this machine has {len(gpus)} GPU(s) (indices 0 to {len(gpus) - 1}); "
                           f"there is no gpu:{missing[0]}.")
    return [f"/gpu:{i}" for i in arg.split(",")]


def _configure(tf, change, spec: str, done=lambda: False) -> None:
    """Apply a device change that TensorFlow allows only before it has started."""
    try:
        change()
    except RuntimeError as exc:
        if done():
            return
        raise EdgeKitError(f"--devices {spec} must be chosen before TensorFlow starts running, and in this process it "
                           f"already has ({exc}); train in a fresh process: python -m train --devices {spec} ...") from exc
