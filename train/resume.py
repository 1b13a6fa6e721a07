"""Checkpoints of a training in progress, so that an interrupted one continues with `--resume`.

Every completed epoch is backed up next to the artifact directory, in `<out>.checkpoint/`:

    keras/         Keras's BackupAndRestore checkpoint: weights, optimizer (with its learning rate)
                   and the epoch, the fault-tolerance mechanism MultiWorkerMirroredStrategy is built on
    state.json     what BackupAndRestore does not keep, for the last two epochs: the history so far,
                   early stopping's and the learning-rate schedule's counters, the best epoch
    best-<E>.npz   the best weights so far (epoch E), which early stopping returns to at the end
    config.json    the training configuration, so that a resume with other settings is refused

`state.json` is written before the Keras checkpoint of the same epoch, so whichever of the two a kill
interrupts, the state of the checkpointed epoch is on disk. The directory is removed once the artifact
has been written.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError, EdgeKitError
from runtime.fsutil import atomic_write_text
from runtime.limits import json_loads

SUFFIX = ".checkpoint"
STATE, CONFIG = "state.json", "config.json"
UNCHECKED = ("epochs", "devices")  # may differ on resume: more epochs, another device layout


def checkpoint_dir(out: Path) -> Path:
    return Path(out).parent / (Path(out).name + SUFFIX)


MAX_STATE_BYTES = 16 << 20
BEST_FILE = re.compile(r"^best-[0-9]{1,9}\.npz$")  # a plain name inside the checkpoint, as _save_state writes it
# state.json's schema: each field's type (a checkpoint is input too: it may be damaged or crafted)
COUNTERS = {"stopper": {"wait": int, "best": float, "best_epoch": int, "stopped_epoch": int},
            "plateau": {"wait": int, "best": float, "cooldown_counter": int}}


def damaged(directory: Path, what: str) -> ArtifactError:
    """The one line for a checkpoint that cannot be resumed (exit 1)."""
    return ArtifactError(f"the checkpoint in {directory} is damaged: {what}. Start again without --resume (with "
                         f"--force), or remove {directory}.")


def _number(value, kind) -> bool:
    if kind is int:
        return type(value) is int and value >= -1
    return type(value) in (int, float)  # inf and NaN are what Keras starts its "best" with


def check_state(state, directory: Path) -> dict:
    """One epoch's state if it has the schema `_save_state` writes, else `damaged`."""
    if not isinstance(state, dict) or type(state.get("epoch")) is not int or not 1 <= state["epoch"] <= 10**6:
        raise damaged(directory, f"{STATE} holds a state without a whole epoch number")
    epoch = state["epoch"]
    history = state.get("history")
    if not (isinstance(history, dict) and all(isinstance(k, str) and isinstance(v, list) and len(v) <= 10**6
                                              and all(type(x) in (int, float) for x in v)
                                              for k, v in history.items())):
        raise damaged(directory, f"{STATE}'s history of epoch {epoch} is not lists of numbers by metric name")
    best = state.get("best_file")
    if best is not None and not (isinstance(best, str) and BEST_FILE.match(best)):
        raise damaged(directory, f"{STATE} names best weights {best!r}, which is not a best-<epoch>.npz file "
                                 "inside the checkpoint")
    if type(state.get("stopped", False)) is not bool:
        raise damaged(directory, f"{STATE}'s 'stopped' is not true or false")
    for name, fields in COUNTERS.items():
        counters = state.get(name)
        if not (isinstance(counters, dict) and set(counters) == set(fields)
                and all(_number(counters[k], kind) for k, kind in fields.items())):
            raise damaged(directory, f"{STATE}'s {name} of epoch {epoch} is not "
                                     + ", ".join(f"{k} ({kind.__name__})" for k, kind in fields.items()))
    return state


def read_state(directory: Path) -> list[dict]:
    """The saved epochs' states (at most two, oldest first), or [] when there is none; each checked against
    the schema, or one line (exit 1) saying the checkpoint is damaged."""
    path = directory / STATE
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise damaged(directory, f"{STATE} has {path.stat().st_size:,} bytes")
        states = json_loads(path.read_text("utf-8"))["states"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise damaged(directory, f"{STATE} is unreadable ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if not isinstance(states, list) or len(states) > 2:
        raise damaged(directory, f"{STATE} does not hold the last epochs' states")
    return [check_state(state, directory) for state in states]


def prepare(directory: Path, config: dict, resume: bool, force: bool, chief: bool, say) -> bool:
    """Before training: whether a checkpoint is resumed. A checkpoint that is not asked for is refused
    (hours of training are not discarded silently) unless `force`; one made with other settings too."""
    if not chief:  # the chief judges (all workers run the same command); the others follow its checkpoint
        return resume and directory.exists()
    states = read_state(directory) if directory.exists() else []
    if directory.exists() and not resume:
        if not force:
            done = f" ({states[-1]['epoch']} epoch(s) done)" if states else ""
            raise EdgeKitError(f"{directory} holds an interrupted training{done}; continue it with --resume, or "
                               "pass --force to start over.")
        shutil.rmtree(directory)
        say(f"note: removed the checkpoint {directory} (--force); training from the start")
        return False
    if not resume:
        return False
    if not directory.exists():
        say(f"note: nothing to resume at {directory}; training from the start")
        return False
    try:
        saved = json_loads((directory / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise damaged(directory, f"{CONFIG} is unreadable ({type(exc).__name__})") from exc
    if not isinstance(saved, dict):
        raise damaged(directory, f"{CONFIG} is not a training configuration")
    config = json.loads(json.dumps(config))  # as saved: tuples are lists
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in UNCHECKED and saved.get(k) != config.get(k))
    if states and type(config.get("epochs")) is int and config["epochs"] < states[-1]["epoch"]:
        raise EdgeKitError(f"--epochs {config['epochs']} counts every epoch, but the checkpoint in {directory} has "
                           f"done {states[-1]['epoch']}; pass --epochs {states[-1]['epoch']} or more to continue it.")
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} then, {config.get(k)!r} now" for k in differ)
        raise EdgeKitError(f"--resume continues the training in {directory} with its own settings; these differ "
                           f"({shown}). Repeat the first command with --resume, or pass --force to start over.")
    return True


def start(directory: Path, config: dict, chief: bool) -> None:
    if chief:
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / CONFIG).exists():
            atomic_write_text(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True))


def callback(keras, directory: Path, stopper, plateau, chief: bool):
    """A BackupAndRestore that also keeps what it does not (see the module docstring). Put it after
    `stopper` and `plateau` in the callback list: it reads their state at the end of each epoch and
    restores it after they have reset themselves at the start."""

    class Resumable(keras.callbacks.BackupAndRestore):
        def __init__(self):
            super().__init__(str(directory / "keras"), save_freq="epoch", delete_checkpoint=False)
            self.history_before: dict = {}  # metrics of the epochs before a resume
            self.history: dict = {}
            self.resumed_from: int | None = None  # completed epochs found in the checkpoint
            self._states: list = []

        def on_train_begin(self, logs=None):
            try:  # restores weights, optimizer and epoch when there is a checkpoint
                super().on_train_begin(logs)
                saved = int(keras.backend.eval(self._training_state._ckpt_saved_epoch))
            except Exception as exc:  # TensorFlow's many errors for a truncated, foreign or random checkpoint
                raise damaged(directory, f"Keras's checkpoint in {directory / 'keras'} cannot be restored "
                                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"
                              ) from exc
            if saved < 0:
                return
            done = saved + 1
            states = read_state(directory)
            match = [s for s in states if s["epoch"] == done]
            if not match:
                raise EdgeKitError(f"the checkpoint in {directory} is at epoch {done}, but its state.json holds "
                                   f"epochs {[s['epoch'] for s in states]}; delete {directory} to train from the "
                                   "start.")
            state = match[0]
            self._states = [s for s in states if s["epoch"] <= done][-2:]
            for name, value in state["stopper"].items():
                setattr(stopper, name, value)
            for name, value in state["plateau"].items():
                setattr(plateau, name, value)
            if state.get("best_file"):
                stopper.best_weights = _best_weights(directory, state["best_file"], self.model)
            self.history_before = {k: list(v) for k, v in state["history"].items()}
            self.history = {k: list(v) for k, v in state["history"].items()}
            self.resumed_from = done
            if state.get("stopped"):  # early stopping had ended it: run no further epoch
                self._training_state._ckpt_saved_epoch.assign(self.params["epochs"] - 1)

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            if chief:
                self._save_state(epoch + 1)
            super().on_epoch_end(epoch, logs)  # the Keras checkpoint, after the state of the same epoch
            if chief:
                kept = {s.get("best_file") for s in self._states}
                for old in directory.glob("best-*.npz"):
                    if old.name not in kept:
                        old.unlink()

        def _save_state(self, done: int) -> None:
            previous = self._states[-1] if self._states else {}
            best_file = previous.get("best_file")
            if stopper.best_weights is not None and stopper.best_epoch == done - 1:  # improved in this epoch
                best_file = f"best-{done}.npz"
                np.savez(directory / best_file, **{f"w{i}": w for i, w in enumerate(stopper.best_weights)})
            state = {
                "epoch": done, "history": {k: list(v) for k, v in self.history.items()}, "best_file": best_file,
                "stopped": bool(stopper.stopped_epoch),
                "stopper": {"wait": int(stopper.wait), "best": float(stopper.best),
                            "best_epoch": int(stopper.best_epoch), "stopped_epoch": int(stopper.stopped_epoch)},
                "plateau": {"wait": int(plateau.wait), "best": float(plateau.best),
                            "cooldown_counter": int(plateau.cooldown_counter)},
            }
            self._states = [*self._states, state][-2:]
            atomic_write_text(directory / STATE, json.dumps({"states": self._states}))

    return Resumable()


def _best_weights(directory: Path, name: str, model) -> list:
    """The best weights so far, from `name` inside the checkpoint (checked by `check_state`), each array of the
    shape the model's weight has, or `damaged`."""

    path = directory / name
    if path.is_symlink() or not path.is_file():
        raise damaged(directory, f"its best weights {name} are missing or not a plain file")
    shapes = [tuple(w.shape) for w in model.get_weights()]
    fmt = np.lib.format
    try:
        weights = []
        with zipfile.ZipFile(path) as best:
            names = best.namelist()
            if sorted(names) != sorted(f"w{i}.npy" for i in range(len(shapes))):
                raise ValueError(f"{len(names)} arrays for {len(shapes)} weights")
            for i, shape in enumerate(shapes):  # each header read first: nothing is allocated that the model lacks
                with best.open(f"w{i}.npy") as fh:
                    version = fmt.read_magic(fh)
                    header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    declared, fortran, dtype = header(fh, max_header_size=10_000)
                    if tuple(declared) != shape or fortran or dtype.kind != "f" or dtype.itemsize > 8:
                        raise ValueError(f"w{i} is {dtype} {list(declared)}; the model's weight is {list(shape)}")
                    data = fh.read(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
                weights.append(np.frombuffer(data, dtype).reshape(shape).copy())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise damaged(directory, f"its best weights {name} are unreadable ({exc})") from exc
    if not all(np.isfinite(w).all() for w in weights):
        raise damaged(directory, f"its best weights {name} do not fit the model, or are not finite")
    return weights


def finish(directory: Path, chief: bool) -> None:
    """The artifact is written: the checkpoint has served."""
    if chief:
        shutil.rmtree(directory, ignore_errors=True)
