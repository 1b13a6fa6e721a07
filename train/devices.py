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

import json
import os
import re

from runtime.errors import EdgeKitError

MAX_CPU_REPLICAS = 64
_SPEC = re.compile(r"^(auto|cpu|gpu)(?::(\d+(?:,\d+)*))?$")


def check_spec(spec: str) -> str:
    """`spec` if it names devices as above, else a one-line error."""
    match = _SPEC.match(spec or "")
    ok = bool(match) and not (match.group(1) == "auto" and match.group(2))
    if ok and match.group(1) == "cpu" and match.group(2):
        ok = "," not in match.group(2) and 1 <= int(match.group(2)) <= MAX_CPU_REPLICAS
    if ok and match.group(1) == "gpu" and match.group(2):
        ids = match.group(2).split(",")
        ok = len(set(ids)) == len(ids)
    if not ok:
        raise EdgeKitError(f"--devices takes auto, cpu, cpu:N (N from 1 to {MAX_CPU_REPLICAS}), gpu or gpu:0,1 "
                           f"(distinct GPU indices); got {spec!r}.")
    return spec


def workers() -> int:
    """How many workers TF_CONFIG names (1 without it)."""
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
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
