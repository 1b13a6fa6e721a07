"""Hostile input, round two (issue 25): bounded numbers, memory bombs in labels and weights, NaN never a
result, passwords never printed, untrusted text escaped, checkpoints, TF_CONFIG and search storages as input.
Each case failed before its fix (a crash, a traceback, a leaked secret or a silently wrong answer)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_module
from runtime.errors import ArtifactError, EdgeKitError
from runtime.load import load


def _one_line(result, code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def digit(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("hostile") / "digit.npy"
    np.save(path, digits.x_test[0])
    return path


# --- numbers with bounds ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["runtime", "predict", "MODEL", "DIGIT", "--threads", "1000000"],  # printed, then segfaulted (exit 139)
    ["runtime", "eval", "MODEL", "--threads", "1000000"],
    ["runtime", "bench", "MODEL", "--threads", "1,1000000"],
    ["runtime", "report", "ART", "--threads", "298"],  # the ONNX file hung at 298
    ["pipeline", "--search", "--jobs", "100", "--out", "OUT"],  # OOM-killed, 83 orphans
    ["train", "--model", "fashion_cnn", "--devices", "cpu:64", "--out", "OUT"],  # 300 s, then a traceback
])
def test_thread_worker_and_replica_counts_are_bounded_by_the_cores(exported, digit, tmp_path, command):
    args = [a.replace("MODEL", str(exported[0] / "model.int8.tflite")).replace("DIGIT", str(digit))
            .replace("ART", str(exported[0])).replace("OUT", str(tmp_path / "out")) for a in command]
    result = run_module(*args, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "from 1 to" in result.stderr and not (tmp_path / "out").exists(), result.stderr[-2000:]


def test_the_api_refuses_more_threads_than_cores(exported):
    with pytest.raises(EdgeKitError, match="the cores this process may use"):
        load(exported[0] / "model.float32.tflite", threads=os.cpu_count() * 1000)


@pytest.mark.parametrize("options, words", [
    (["--mean", "0", "--std", "1e-45"], ["positive normal number"]),  # printed nan%, eval 10.03%
    (["--mean", "127.5"], ["mean was given without std"]),  # silently took std 1
    (["--std", "127.5"], ["std was given without mean"]),
    (["--mean", "1e30", "--std", "1e-30"], ["values up to 1e+60"]),  # two RuntimeWarnings, then the error
])
def test_mean_and_std_are_checked_numbers_given_together(exported, digit, options, words):
    result = run_module("runtime", "predict", str(exported[0] / "model.int8.tflite"), str(digit), *options)
    _one_line(result, 2, *words)


# --- labels -------------------------------------------------------------------------------------------------

def _packed(model: Path, target: Path, members: dict, lie: int | None = None) -> Path:
    """`model` with a zip of `members` appended (TFLite metadata's packing); with `lie`, every member's
    declared size is `lie` bytes, whatever it inflates to."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        for name, data in members.items():
            packed.writestr(name, data)
    data = bytearray(buffer.getvalue())
    if lie is not None:
        for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
            start = 0
            while (start := data.find(signature, start)) >= 0:
                data[start + offset:start + offset + 4] = lie.to_bytes(4, "little")
                start += 4
    target.write_bytes(model.read_bytes() + bytes(data))
    return target


def test_a_packed_label_zip_that_lies_about_its_size_is_not_inflated(exported, tmp_path):
    """200 MB of zeros declared as 20 bytes (200 KB on disk): it inflated to the real size on every load."""
    source = exported[0] / "model.float32.tflite"
    bomb = _packed(source, tmp_path / "bomb.tflite", {"labels.txt": b"\0" * (200 << 20)}, lie=20)
    tracemalloc.start()
    try:
        model = load(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model.labels == [str(i) for i in range(10)] and peak < 32 << 20, peak
    many = _packed(source, tmp_path / "many.tflite", {f"m{i}.txt": b"x\n" * (1 << 20) for i in range(40)})
    tracemalloc.start()
    try:
        assert load(many).labels == [str(i) for i in range(10)]
        assert tracemalloc.get_traced_memory()[1] < 64 << 20  # at most 8 members and 8 MB read, not 80 MB
    finally:
        tracemalloc.stop()
    good = _packed(source, tmp_path / "good.tflite", {"labels.txt": "\n".join(f"digit {i}" for i in range(10))})
    assert load(good).labels[3] == "digit 3"


def test_labels_are_distinct_split_on_newlines_only_and_never_bytes(exported, tmp_path, digit):
    model = exported[0] / "model.float32.tflite"
    (tmp_path / "twice.txt").write_text("\n".join(["zero", *"123456789"[:-1], "zero"]) + "\n")
    result = run_module("runtime", "predict", str(model), str(digit), "--labels", str(tmp_path / "twice.txt"))
    _one_line(result, 2, "label 'zero' is given twice (outputs 0 and 9)")
    separator = "\u2028"  # LINE SEPARATOR inside a name: str.splitlines made one label two
    names = [f"class{separator}{i}" if i == 4 else f"c{i}" for i in range(10)]
    (tmp_path / "u2028.txt").write_text("\n".join(names), "utf-8")
    assert load(model, labels=str(tmp_path / "u2028.txt")).labels == names
    with pytest.raises(EdgeKitError, match="expected a list of label strings"):
        load(model, labels=b"0123456789")  # became labels "48", "49", ...


def test_escape_sequences_in_labels_never_reach_the_terminal(exported, tmp_path, digit):
    model = shutil.copy(exported[0] / "model.float32.tflite", tmp_path / "m.tflite")
    osc = "\x1b]8;;http://attacker.example/\x07click\x1b]8;;\x07"
    (tmp_path / "labels.txt").write_text("\n".join([f"{i}{osc}\x1b[2J" for i in range(10)]))
    result = run_module("runtime", "predict", str(model), str(digit), "--labels", str(tmp_path / "labels.txt"),
                        "--top-k", "10", "--mean", "0", "--std", "255")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\\x1b]8;;" in result.stdout


def test_exif_orientation_is_applied(tmp_path, digits):
    """A phone stores the photo as the sensor saw it, rotated, with an EXIF orientation: read it upright."""
    from runtime.artifacts.preprocessing import image_to_pixels

    upright = digits.x_test[3, ..., 0]
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(np.rot90(upright, 1)).save(tmp_path / "phone.jpg", exif=exif, quality=100, subsampling=0)
    read = image_to_pixels(tmp_path / "phone.jpg", (28, 28), 1)[..., 0].astype(int)
    assert np.abs(read - upright).max() <= 8  # JPEG's rounding, not a rotated digit
    assert np.abs(read - np.rot90(upright, 1)).mean() > 4 * np.abs(read - upright).mean()


# --- NaN is never a result ----------------------------------------------------------------------------------

def test_verification_fails_on_nan_and_fidelity_is_never_perfect():
    from export.verify import fidelity, verify
    from runtime.errors import NonFiniteOutputs
    from runtime.vocabulary import FILE_FORMATS

    reference = np.eye(10, dtype=np.float32)[np.arange(20) % 10] * 5
    labels = np.arange(20) % 10
    for key in ("float32", "int8"):
        nan = reference.copy()
        nan[3, 2] = np.nan  # once "verified": max diff nan, SQNR 200.0, agree 100.00%
        figures, failure = verify(FILE_FORMATS[key], nan, reference, labels)
        assert isinstance(failure, NonFiniteOutputs) and "NaN or infinite" in str(failure) and figures["non_finite_outputs"] == 1
        assert isinstance(verify(FILE_FORMATS[key], reference, nan, labels)[1], NonFiniteOutputs)  # the float model's own NaN fails it too
    assert fidelity(np.full(3, np.nan), np.ones(3))["sqnr_db"] < 0


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A Keras model whose weights hold NaN (as --weights of NaN once trained to loss [nan], exit 0), saved as
    .keras, and its float32 TFLite file converted directly."""
    from train.backend import keras, tf

    root = tmp_path_factory.mktemp("nan")
    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    kernel, bias = model.layers[-1].get_weights()
    kernel[0, 0] = np.nan
    model.layers[-1].set_weights([kernel, bias])
    model.save(root / "nan.keras")
    (root / "nan.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return root


def test_a_model_with_nan_outputs_is_refused_by_export_and_predict(nan_model, digits, tmp_path):
    result = run_module("export", "--tflite", str(nan_model / "nan.keras"), "--dataset", "digits", "--out",
                        str(tmp_path / "out"), timeout=300)
    _one_line(result, 1, "NaN or infinite outputs")
    assert not list(tmp_path.glob("out/*.tflite"))  # nothing written
    np.save(tmp_path / "x.npy", digits.x_test[:2].astype(np.float32) / 255)
    result = run_module("runtime", "predict", str(nan_model / "nan.tflite"), str(tmp_path / "x.npy"))
    _one_line(result, 1, "NaN or infinite outputs")  # printed nan%, exit 0
    result = run_module("runtime", "eval", str(nan_model / "nan.tflite"), "--dataset", "digits", "--mean", "0",
                        "--std", "255")
    _one_line(result, 1, "NaN or infinite outputs")


def test_a_weights_file_is_checked_against_its_size_and_for_nan_before_loading(tmp_path):
    """A 2^31-element dataset declared and never written (a few KB on disk) reached 5.6 GB."""
    import h5py

    from train.backbones import load_weights

    with h5py.File(tmp_path / "bomb.h5", "w") as f:
        f.attrs["layer_names"] = [b"conv"]
        f.create_dataset("conv/conv/kernel:0", shape=(2 ** 31,), dtype="float32")  # allocated lazily: 0 bytes
    assert (tmp_path / "bomb.h5").stat().st_size < 1 << 20
    with pytest.raises(EdgeKitError, match="declares at least 8,589,934,592 bytes of weights"):
        load_weights(None, "mobilenet_v2", str(tmp_path / "bomb.h5"))
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f.attrs["layer_names"] = [b"conv"]
        f.create_dataset("conv/conv/kernel:0", data=np.array([1.0, np.nan], np.float32))
    with pytest.raises(EdgeKitError, match="holds NaN or infinite weights"):
        load_weights(None, "mobilenet_v2", str(tmp_path / "nan.h5"))


# --- the search's storage -----------------------------------------------------------------------------------

SECRET = "S3cretPW"


@pytest.mark.parametrize("storage, code, words", [
    (f"postgresql+psycopg2://edgekit:{SECRET}@127.0.0.1:1/edgekit", 1, ["edgekit:***@127.0.0.1:1"]),
    ("sqlite://", 2, ["in-memory database"]),  # KeyError and heartbeat-thread tracebacks
    ("sqlite:///ART/search.db", 2, ["would write the study into the artifact"]),
    ("sqlite:///GARBAGE", 1, ["cannot open the study's storage"]),  # a corrupted search.db exited 2
])
def test_a_search_storage_is_checked_before_training_and_its_password_never_shown(exported, tmp_path, storage,
                                                                                   code, words):
    (tmp_path / "garbage.db").write_bytes(np.random.default_rng(0).bytes(4096))
    url = storage.replace("ART", str(exported[0])).replace("GARBAGE", str(tmp_path / "garbage.db"))
    out = tmp_path / "run"
    result = run_module("pipeline", "--search", "--out", str(out), "--storage", url, timeout=120)
    _one_line(result, code, *words)
    assert SECRET not in result.stdout + result.stderr and not out.exists()
    assert not (exported[0] / "search.db").exists()


def test_public_urls_mask_every_password():
    from runtime.text import public_url

    assert public_url(f"postgresql+psycopg2://edgekit:{SECRET}@db-host/edgekit") == \
        "postgresql+psycopg2://edgekit:***@db-host/edgekit"
    assert SECRET not in public_url(f"mysql://u:{SECRET}@h:3306/d?x=1")


def test_trials_killed_before_their_first_heartbeat_are_failed(tmp_path):
    import time

    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    from pipeline.storage import fail_orphans

    storage = RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    orphan, alive = study.ask(), study.ask()  # a worker killed before its heartbeat thread beat; a live one
    time.sleep(1.5)
    storage.record_heartbeat(alive._trial_id)
    assert fail_orphans(storage, study, grace=1) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {orphan.number: TrialState.FAIL, alive.number: TrialState.RUNNING}


# --- untrusted text in the report ---------------------------------------------------------------------------

def test_search_json_values_are_escaped_and_its_damage_is_said(tmp_path):
    from runtime.report.trials import section

    injected = {"objective": "gzip", "storage": f"postgresql://u:{SECRET}@h/d", "trials": [
        {"number": 0, "recipe": "# INJECTED HEADING", "format": "![beacon](http://attacker.example/p.png)",
         "state": "<script>alert(1)</script>", "worker": "a|b", "file": "a\x00b"}]}
    (tmp_path / "search.json").write_text(json.dumps(injected))
    md = "\n".join(section(tmp_path, [], [], 1.0)[0])
    assert "\n# INJECTED" not in md and "![beacon]" not in md and "<script>" not in md and SECRET not in md
    assert "\\# INJECTED HEADING" in md and "\\!\\[beacon\\]" in md and "a\\|b" in md
    for damaged in ('{"objective": "gzip", "trials": [', "[" * 200_000 + "]" * 200_000):  # truncated; nested
        (tmp_path / "search.json").write_text(damaged)
        md = "\n".join(section(tmp_path, [], [], 1.0)[0])
        assert "search.json is damaged" in md


# --- checkpoints and TF_CONFIG --------------------------------------------------------------------------------

GOOD_STATE = {"epoch": 2, "history": {"loss": [1.0, 0.5]}, "best_file": "best-2.npz", "stopped": False,
              "stopper": {"wait": 0, "best": 0.5, "best_epoch": 1, "stopped_epoch": 0},
              "plateau": {"wait": 0, "best": 0.5, "cooldown_counter": 0}}


@pytest.mark.parametrize("change, words", [
    ({"best_file": "/etc/passwd"}, "not a best-<epoch>.npz file"),
    ({"best_file": "../foreign_best.npz"}, "not a best-<epoch>.npz file"),
    ({"stopper": {"wait": "abc", "best": 0.5, "best_epoch": 1, "stopped_epoch": 0}}, "stopper of epoch 2"),
    ({"stopper": {"model": None}}, "stopper of epoch 2"),
    ({"history": {"loss": "notalist"}}, "history of epoch 2"),
    ({"epoch": "2"}, "without a whole epoch number"),
])
def test_a_checkpoint_state_is_checked_against_its_schema(tmp_path, change, words):
    from train.resume import read_state

    (tmp_path / "state.json").write_text(json.dumps({"states": [{**GOOD_STATE, **change}]}))
    with pytest.raises(ArtifactError, match="is damaged") as info:
        read_state(tmp_path)
    assert words in str(info.value) and "without --resume" in str(info.value) and info.value.exit_code == 1


def test_a_sound_checkpoint_state_reads_back(tmp_path):
    from train.resume import read_state

    (tmp_path / "state.json").write_text(json.dumps({"states": [GOOD_STATE]}))
    assert read_state(tmp_path) == [GOOD_STATE]
    (tmp_path / "state.json").write_text('{"states": [' * 100_000)
    with pytest.raises(ArtifactError, match="is damaged"):
        read_state(tmp_path)


@pytest.mark.parametrize("config, words", [
    ("not json", "is not JSON"),
    ("[]", "has no cluster"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 5}}', "is not one of"),
    ('{"cluster": {"ps": ["localhost:1"], "worker": ["localhost:2"]}, "task": {"type": "ps", "index": 0}}',
     "no parameter servers"),
])
def test_tf_config_is_checked_before_tensorflow_reads_it(monkeypatch, config, words):
    from train.devices import tf_config

    monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(EdgeKitError, match=words) as info:
        tf_config()
    assert info.value.exit_code == 2


def test_train_checks_tf_config_and_tensorboard_before_training(tmp_path):
    """One command line each (the others in process): the checks run before TensorFlow trains anything."""
    from train.__main__ import _check_tensorboard

    result = run_module("train", "--model", "fashion_cnn", "--epochs", "1", "--out", str(tmp_path / "o"),
                        env={"TF_CONFIG": "[]"}, timeout=120)
    _one_line(result, 2, "TF_CONFIG has no cluster")
    (tmp_path / "file").write_text("x")
    result = run_module("train", "--model", "fashion_cnn", "--out", str(tmp_path / "out"), "--tensorboard",
                        str(tmp_path / "file"), timeout=120)
    _one_line(result, 2, "is a file")
    with pytest.raises(EdgeKitError, match="is inside --out"):
        _check_tensorboard(tmp_path / "out" / "logs", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def _two_worker_config(index: int) -> str:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def test_a_worker_that_never_starts_is_waited_for_with_a_timeout_and_sigterm_stops_the_wait(tmp_path):
    """A second TF_CONFIG worker that never started: 150 s without output, and SIGTERM did not stop it."""
    import signal

    args = ["train", "--model", "fashion_cnn", "--epochs", "1", "--out", str(tmp_path / "o")]
    result = run_module(*args, env={"TF_CONFIG": _two_worker_config(0), "EDGEKIT_WORKER_TIMEOUT": "3"}, timeout=120)
    _one_line(result, 1, "gave up after 3 s waiting for worker 1 at 127.0.0.1:")
    assert "waiting for worker 1" in result.stderr
    waiting = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TF_CONFIG": _two_worker_config(0)})
    try:
        for line in waiting.stderr:
            if line.startswith("waiting for worker 1"):
                break
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=20) == -signal.SIGTERM
    finally:
        waiting.kill()
        waiting.communicate()
    assert not (tmp_path / "o").exists()


def test_a_read_only_output_is_the_users_mistake_wherever_it_is_found(exported, tmp_path):
    """A read-only --out once said "Free space..." and exited 1 or 2 depending on where it was found."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        art = disk / "art"
        shutil.copytree(exported[0], art)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for command in (["export", "--tflite", str(art), "--out", str(disk / "x")],
                        ["runtime", "report", str(art), "--no-bench"]):
            line = _one_line(run_module(*command, timeout=300), 2)
            assert "read-only" in line and "Free space" not in line, line
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_bmp_gif_and_webp_images_are_read_like_png(exported, digits, tmp_path):
    """A .bmp was refused though Pillow reads it (issue 26); a GIF gives its first frame."""
    from runtime.artifacts.preprocessing import image_to_pixels

    image = Image.fromarray(digits.x_test[5, ..., 0])
    image.save(tmp_path / "d.png")
    image.save(tmp_path / "d.bmp")
    image.save(tmp_path / "d.webp", lossless=True)
    image.save(tmp_path / "d.gif", save_all=True, append_images=[Image.fromarray(255 - digits.x_test[5, ..., 0])])
    png = image_to_pixels(tmp_path / "d.png", (28, 28), 1)
    for name in ("d.bmp", "d.webp", "d.gif"):
        assert np.array_equal(image_to_pixels(tmp_path / name, (28, 28), 1), png), name
    result = run_module("runtime", "predict", str(exported[0] / "model.int8.tflite"),
                        *(str(tmp_path / n) for n in ("d.png", "d.bmp", "d.gif", "d.webp")), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    tops = [p["top"][0]["index"] for p in json.loads(result.stdout)["predictions"]]
    assert len(set(tops)) == 1


def test_a_search_worker_dies_with_its_parent(tmp_path):
    """`pipeline --search --jobs N` was OOM-killed and left its workers running as orphans: each worker is
    started with a parent-death signal, so kill -9 of the parent ends them."""
    import signal
    import time

    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipeline.storage import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        try:  # a zombie reparented to us, or to init, which reaps it
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")
