"""Training past one device, proven on this CPU: replicas on a split CPU, two worker processes with
TF_CONFIG, a killed training resumed from its checkpoint, TensorBoard logs, bfloat16 mixed precision."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_module
from runtime.artifacts.manifest import read_manifest, verify_files
from train.__main__ import main as train_main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tensorboard_tags(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})  # 0: keep every event, not 10
    events.Reload()
    return events


SMALL = ["--model", "fashion_cnn", "--model-arg", "filters=[8,16]", "--model-arg", "dense=32"]


@pytest.mark.slow  # 40 s: `python -m pytest -m slow` (README, Tests); TF_CONFIG's workers stay in the suite
def test_two_cpu_replicas_train_to_the_accuracy_of_one_device_and_log_to_tensorboard(tmp_path):
    """`--devices cpu:2` runs MirroredStrategy for real (two logical CPU devices) and reaches the accuracy
    class of one device with the same settings; TensorBoard reads the per-epoch scalars and the graph."""
    one, two, logs = tmp_path / "one", tmp_path / "cpu2", tmp_path / "tb"
    assert train_main([*SMALL, "--epochs", "8", "--out", str(one), "--quiet"]) == 0
    result = run_module("train", *SMALL, "--epochs", "8", "--devices", "cpu:2", "--tensorboard", str(logs),
                        "--out", str(two), "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(two)
    devices = manifest["training"]["devices"]
    assert devices["strategy"] == "MirroredStrategy" and devices["replicas"] == 2
    assert devices["devices"] == ["/cpu:0", "/cpu:1"] and devices["requested"] == "cpu:2"
    assert read_manifest(one)["training"]["devices"]["replicas"] == 1
    single = read_manifest(one)["metrics"]["accuracy"]
    assert single >= 0.9 and abs(manifest["metrics"]["accuracy"] - single) <= 0.03  # 359 test images: ~11 of them
    epochs = manifest["training"]["epochs_run"]
    train = _tensorboard_tags(logs / "train")
    assert {"epoch_loss", "epoch_accuracy", "epoch_lr"} <= set(train.Tags()["tensors"]) and train.Tags()["graph"]
    assert [e.step for e in train.Tensors("epoch_lr")] == list(range(epochs))
    validation = _tensorboard_tags(logs / "validation")
    from tensorboard.util.tensor_util import make_ndarray

    losses = [float(make_ndarray(e.tensor_proto)) for e in validation.Tensors("epoch_loss")]
    assert np.allclose(losses, manifest["training"]["history"]["val_loss"], rtol=1e-5)


def test_two_workers_with_tf_config_train_and_only_the_chief_writes(tmp_path):
    out = tmp_path / "mw"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train-multiworker"), "2", *SMALL, "--epochs", "3",
                             "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "2 workers on 127.0.0.1:" in result.stderr
    manifest = read_manifest(out)
    devices = manifest["training"]["devices"]
    assert devices["strategy"] == "MultiWorkerMirroredStrategy" and devices["replicas"] == 2
    assert devices["workers"] == 2 and manifest["training"]["epochs_run"] == 3
    assert verify_files(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mw"]  # no other worker's artifact, no checkpoint left


@pytest.mark.slow  # 44 s: `python -m pytest -m slow` (README, Tests)
def test_a_killed_training_resumes_from_its_last_epoch(tmp_path):
    """kill -9 after the third of six epochs; the same command is refused without --resume, refused with
    other settings, and with --resume continues at epoch 4 and records that it did."""
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "train", "--model", "fashion_cnn", "--model-arg", "filters=[8,16]",
               "--model-arg", "dense=32", "--epochs", "6", "--patience", "10", "--out", str(out)]
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in worker.stdout:
        if line.startswith("epoch   3/6"):
            os.kill(worker.pid, signal.SIGKILL)
            break
    worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL and not out.exists()
    checkpoint = tmp_path / "killed.checkpoint"
    state = json.loads((checkpoint / "state.json").read_text())["states"][-1]
    assert state["epoch"] == 3 and len(state["history"]["loss"]) == 3
    refused = run_module(*command[2:])
    assert refused.returncode == 2 and "holds an interrupted training (3 epoch(s) done); continue it with --resume" \
        in refused.stderr
    other = run_module(*command[2:], "--resume", "--lr", "0.01")
    assert other.returncode == 2 and "lr: 0.001 then, 0.01 now" in other.stderr
    fewer = run_module(*[a if a != "6" else "2" for a in command[2:]], "--resume")  # --epochs 2 after 3 done
    assert fewer.returncode == 2 and "pass --epochs 3 or more" in fewer.stderr, fewer.stderr[-2000:]
    # a checkpoint is input too: damaged or crafted, it gets one line and exit 1, and is left as it was
    kept = tmp_path / "kept"
    shutil.copytree(checkpoint, kept)
    for damage, words in (
            (lambda: _edit_state(checkpoint, best_file="/etc/passwd"), "not a best-<epoch>.npz file"),
            (lambda: _edit_state(checkpoint, stopper={"model": None}), "stopper of epoch 3"),
            (lambda: _truncate(next(checkpoint.glob("keras/**/*.data-*"))), "cannot be restored")):
        damage()
        broken = run_module(*command[2:], "--resume")
        lines = [line for line in broken.stderr.splitlines() if line.startswith("error:")]
        assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr[-3000:]
        assert len(lines) == 1 and "is damaged" in lines[0] and words in lines[0], lines
        assert not out.exists()
        shutil.rmtree(checkpoint)
        shutil.copytree(kept, checkpoint)
    resumed = run_module(*command[2:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch   1/6" not in resumed.stdout and "epoch   4/6" in resumed.stdout
    assert "resumed after epoch 3" in resumed.stdout
    training = read_manifest(out)["training"]
    assert training["resumed_from_epoch"] == 3 and training["epochs_run"] == 6
    assert len(training["history"]["val_loss"]) == 6
    assert training["history"]["val_loss"][:3] == pytest.approx(state["history"]["val_loss"])
    assert training["best_epoch"] == 1 + int(np.argmin(training["history"]["val_loss"]))
    assert not checkpoint.exists()


def test_mixed_precision_trains_in_bfloat16_on_the_cpu_and_saves_float32(tmp_path, digits):
    from train.backend import keras

    out = tmp_path / "mixed"
    assert train_main(["--model", "fashion_cnn", "--model-arg", "filters=[8,16]", "--model-arg", "dense=32",
                       "--epochs", "3", "--mixed-precision", "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["training"]["devices"]["mixed_precision"] == "mixed_bfloat16"
    assert manifest["metrics"]["accuracy"] > 0.8
    assert keras.mixed_precision.global_policy().name == "float32"  # the process is left as it was
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert {w.dtype.name for w in model.weights} == {"float32"}
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    x, y = digits.arrays("test")
    assert np.mean(model.predict(x, verbose=0).argmax(axis=1) == y) == pytest.approx(manifest["metrics"]["accuracy"])


def _edit_state(checkpoint, **fields):
    path = checkpoint / "state.json"
    states = json.loads(path.read_text())
    states["states"][-1].update(fields)
    path.write_text(json.dumps(states))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
