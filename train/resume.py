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
import shutil
from pathlib import Path

import numpy as np

from runtime.errors import EdgeKitError
from runtime.fsutil import atomic_write_text

SUFFIX = ".checkpoint"
STATE, CONFIG = "state.json", "config.json"
UNCHECKED = ("epochs", "devices")  # may differ on resume: more epochs, another device layout


def checkpoint_dir(out: Path) -> Path:
    return Path(out).parent / (Path(out).name + SUFFIX)


def read_state(directory: Path) -> list[dict]:
    """The saved epochs' states (at most two, oldest first), or [] when there is none."""
    try:
        states = json.loads((directory / STATE).read_text())["states"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeKitError(f"{directory / STATE} is unreadable ({exc}); delete {directory} to train from the "
                           "start.") from exc
    if not (isinstance(states, list) and all(isinstance(s, dict) and isinstance(s.get("epoch"), int)
                                             for s in states)):
        raise EdgeKitError(f"{directory / STATE} is not an EdgeKit checkpoint state; delete {directory} to train "
                           "from the start.")
    return states


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
        saved = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise EdgeKitError(f"{directory / CONFIG} is unreadable ({exc}); delete {directory} to train from the "
                           "start.") from exc
    config = json.loads(json.dumps(config))  # as saved: tuples are lists
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in UNCHECKED and saved.get(k) != config.get(k))
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
            super().on_train_begin(logs)  # restores weights, optimizer and epoch when there is a checkpoint
            saved = int(keras.backend.eval(self._training_state._ckpt_saved_epoch))
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
                with np.load(directory / state["best_file"], allow_pickle=False) as best:
                    stopper.best_weights = [best[f"w{i}"] for i in range(len(best.files))]
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


def finish(directory: Path, chief: bool) -> None:
    """The artifact is written: the checkpoint has served."""
    if chief:
        shutil.rmtree(directory, ignore_errors=True)
