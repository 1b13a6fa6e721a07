"""Trust: no code runs from a model file, no artifact is used unchecked, no bad input gets a
traceback, a hang or a silently wrong answer; exit code 2 for the user's mistake, 1 for failed work.

Each case here was found by trying EdgeKit as an adversary would (issue 10)."""

import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, idx_bytes, run_module
from runtime.errors import ArtifactError, EdgeKitError, UntrustedModel
from runtime.fsutil import output_lock, sha256_file, staged_dir
from runtime.load import load
from runtime.artifacts.manifest import read_manifest, verify_files


def _one_line(result, code: int, *words: str) -> str:
    """The command failed with `code`, printed exactly one `error:` line holding `words`, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _copy(artifact: Path, tmp_path: Path, name: str = "art") -> Path:
    target = tmp_path / name
    shutil.copytree(artifact, target)
    return target


# --- security: a model file is data, never a program --------------------------------------------

def _digit_model(keras, middle=None):
    inputs = keras.Input((28, 28, 1))
    x = middle(inputs) if middle is not None else inputs
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))


@pytest.fixture(scope="session")
def code_models(tmp_path_factory):
    """A .h5 whose Lambda layer creates a file when the model is rebuilt, and a SavedModel whose graph
    writes a file with tf.io.write_file when it runs; (h5 path, SavedModel dir, marker path)."""
    from train.backend import keras, tf

    root = tmp_path_factory.mktemp("code")
    marker = root / "pwned"
    touch = keras.layers.Lambda(lambda x, p=str(marker): (open(p, "w").close(), x)[1], name="touch")
    h5 = root / "lambda.h5"
    _digit_model(keras, touch).save(h5)

    class Writer(keras.layers.Layer):  # its graph, not its Python, is what the SavedModel keeps
        def call(self, x):
            with tf.control_dependencies([tf.io.write_file(str(marker), "pwned")]):
                return tf.identity(x)

    saved = root / "saved"
    _digit_model(keras, Writer(name="write")).save(saved, save_format="tf")
    marker.unlink(missing_ok=True)  # building and saving ran them once; from here on, only loading may
    return h5, saved, marker


def test_a_lambda_h5_is_refused_before_its_code_runs(code_models, tmp_path):
    h5, _, marker = code_models
    result = run_module("export", "--tflite", str(h5), "--dataset", "digits", "--out", str(tmp_path / "out"))
    _one_line(result, 2, "would run code when loaded", "Lambda", "--trust-model")
    assert not marker.exists()
    for stage in (["optimize", "prune"], ["pipeline", "--quick", "--no-bench", "--from"]):  # the import's loader too
        result = run_module(*stage, str(h5), "--dataset", "digits", "--out", str(tmp_path / "o" / stage[0]))
        _one_line(result, 2, "would run code when loaded", "Lambda", "--trust-model")
        assert not marker.exists()
    (tmp_path / "broken.h5").write_bytes(b"x")  # unreadable: the run stops at its import, no report pretended
    result = run_module("pipeline", "--quick", "--from", str(tmp_path / "broken.h5"), "--dataset", "digits", "--out",
                        str(tmp_path / "o" / "broken"))
    _one_line(result, 1, "cannot read", "broken.h5")
    assert not (tmp_path / "o" / "broken" / "report.md").exists() and "done in" not in result.stdout
    trusted = run_module("export", "--tflite", str(h5), "--dataset", "digits", "--out", str(tmp_path / "t"),
                         "--trust-model", "--allow-untrained")  # an untrained model: here for its code
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.exists()  # the user trusted it: it loaded, and its code ran
    marker.unlink()


def test_a_saved_model_is_a_program_and_needs_trust(code_models, tmp_path):
    _, saved, marker = code_models
    result = run_module("export", "--tflite", "--onnx", str(saved), "--dataset", "digits",
                        "--out", str(tmp_path / "out"))
    _one_line(result, 2, "SavedModel", "a program", "--trust-model")
    assert not marker.exists() and not (tmp_path / "out").exists()
    trusted = run_module("export", "--tflite", str(saved), "--dataset", "digits", "--out", str(tmp_path / "t"),
                         "--trust-model", "--allow-untrained")  # an untrained model: here for its code
    assert trusted.returncode in (0, 1) and "Traceback" not in trusted.stderr, trusted.stderr[-2000:]
    assert marker.exists()  # loaded and run: its graph wrote the file
    marker.unlink()


def test_the_checker_passes_real_architectures_and_names_the_code_it_finds():
    from train.backend import keras, tf
    from train.safe_load import code_in_config

    for model in (keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=4, alpha=0.35),
                  keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=4)):
        assert code_in_config(json.loads(model.to_json())) == [], model.name  # MobileNetV3 uses tf.math ops
    inputs = keras.Input((4,))
    model = keras.Model(inputs, tf.nn.relu(inputs))  # a TFOpLambda layer calling tf.nn.relu
    assert code_in_config(json.loads(model.to_json())) == []
    config = json.loads(model.to_json())
    config["config"]["layers"][1]["config"]["function"] = "io.write_file"
    assert "tf.io.write_file" in code_in_config(config)[0]
    config["config"]["layers"][1]["class_name"] = "MyCustomLayer"
    assert "unknown class 'MyCustomLayer'" in code_in_config(config)[0]


@pytest.mark.parametrize("model_file, words", [
    ("/etc/passwd.h5", "plain file name"),
    ("../outside.keras", "plain file name"),
    ("link.keras", "leaves the artifact directory"),
])
def test_an_artifact_cannot_name_a_file_outside_itself(tiny, tmp_path, model_file, words):
    art = _copy(tiny, tmp_path)
    outside = tmp_path / "outside.keras"
    shutil.copy(art / "model.keras", outside)
    manifest = json.loads((art / "manifest.json").read_text())
    if model_file == "link.keras":
        (art / "link.keras").symlink_to(outside)
    manifest["model_file"] = model_file
    manifest["files"][model_file] = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))
    for command in (["export", "--tflite", str(art)], ["optimize", "prune", str(art), "--out", str(tmp_path / "p")]):
        _one_line(run_module(*command), 1, words)
    assert not (tmp_path / "p").exists() and not (art / "model.float32.tflite").exists()


# --- integrity: check before use, never overwrite what you derive from ---------------------------

def test_a_swapped_model_is_refused_and_its_checksums_are_not_rewritten(tiny, tmp_path, code_models):
    art = _copy(tiny, tmp_path)
    before = (art / "manifest.json").read_bytes()
    other = tmp_path / "other.keras"
    from train.backend import keras

    _digit_model(keras).save(other)
    shutil.copy(other, art / "model.keras")
    for command in (["export", "--tflite", str(art)], ["optimize", "prune", str(art), "--out", str(tmp_path / "p")],
                    ["runtime", "info", str(art)]):
        _one_line(run_module(*command), 1, "is damaged: model.keras", "manifest says")
    assert (art / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in art.iterdir()) == ["confusion.png", "manifest.json", "model.keras", "training.png"]
    assert not (tmp_path / "p").exists()


def _sidecar_copy(exported, tmp_path):
    """model.int8.tflite and its sidecar alone (no manifest beside them)."""
    shutil.copy(exported[0] / "model.int8.tflite", tmp_path / "model.int8.tflite")
    sidecar = json.loads((exported[0] / "model.int8.json").read_text())
    return tmp_path / "model.int8.tflite", sidecar


@pytest.mark.parametrize("change, words", [
    (lambda s: s["input"].update(scale="abc"), "'input' has scale 'abc'"),
    (lambda s: s.pop("sha256"), "has sha256 None"),
    (lambda s: s.update(size_bytes=-1), "has size_bytes -1"),
    (lambda s: s.update(labels="0123456789"), "'labels' that are not a list"),
    (lambda s: s["preprocessing"].update(std=[0]), "unusable preprocessing"),
    (lambda s: s["output"].update(dtype="object"), "'output' has dtype 'object'"),
])
def test_a_sidecar_is_validated_field_by_field(exported, tmp_path, digits, change, words):
    model, sidecar = _sidecar_copy(exported, tmp_path)
    change(sidecar)
    model.with_suffix(".json").write_text(json.dumps(sidecar))
    np.save(tmp_path / "x.npy", digits.x_test[:2])
    _one_line(run_module("runtime", "predict", str(model), str(tmp_path / "x.npy")), 1, words)


def test_a_sidecar_edited_after_export_does_not_match_the_manifest(exported, tmp_path, digits):
    art = _copy(exported[0], tmp_path)
    sidecar = json.loads((art / "model.int8.json").read_text())
    sidecar["labels"] = [f"class {label}" for label in sidecar["labels"]]  # still a valid sidecar on its own
    (art / "model.int8.json").write_text(json.dumps(sidecar))
    np.save(tmp_path / "x.npy", digits.x_test[:2])
    _one_line(run_module("runtime", "predict", str(art / "model.int8.tflite"), str(tmp_path / "x.npy")), 1,
              "does not match the sha256", "manifest.json")
    assert read_manifest(art)["files"]["model.int8.json"]["sha256"] != sha256_file(art / "model.int8.json")


@pytest.mark.parametrize("out", ["PARENT", "PARENT/sub", "PARENT/..", "GRANDPARENT"])
def test_no_command_writes_into_its_own_source_or_lineage(tiny, tmp_path, out):
    from optimize import prune

    base = _copy(tiny, tmp_path, "base")
    child = tmp_path / "child"
    prune(base, child, sparsity=0.5, epochs=1, quiet=True)
    target = {"PARENT": str(child), "PARENT/sub": str(child / "sub"), "PARENT/..": str(tmp_path),
              "GRANDPARENT": str(base)}[out]
    before = {p: sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = run_module("optimize", "prune", "--force", str(child), "--out", target)
    _one_line(result, 2, "which this command reads from")
    assert {p: sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()} == before
    export = run_module("export", "--tflite", str(child), "--out", str(base))  # a child's files over its parent's
    _one_line(export, 2, "which this command reads from")


def test_outputs_follow_the_umask(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    result = subprocess.run([sys.executable, "-m", "export", "--tflite", str(art), "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=lambda: os.umask(0o002))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("model.float32.tflite", "model.float32.json", "manifest.json"):
        assert (art / name).stat().st_mode & 0o777 == 0o664, name
    old = os.umask(0o027)
    try:
        with staged_dir(tmp_path / "staged") as stage:
            (stage / "a").write_text("a")
        from runtime.fsutil import atomic_write_text

        atomic_write_text(tmp_path / "staged" / "b", "b")
    finally:
        os.umask(old)
    assert (tmp_path / "staged").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "staged" / "b").stat().st_mode & 0o777 == 0o640


def test_a_killed_run_leaves_temporaries_that_the_next_run_removes(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    (art / ".model.float32.tflite.tmp-k1ll3d.tflite").write_bytes(b"half a model")
    (art / ".manifest.json.tmp-abcdef").write_text("{")
    (tmp_path / ".art.tmp-stage").mkdir()  # a staging directory of a killed `train --out art --force`
    (tmp_path / ".art.tmp-stage" / "model.keras").write_bytes(b"half")
    result = run_module("export", "--tflite", str(art), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in art.iterdir() if p.name.startswith(".")] == []
    assert not (tmp_path / ".art.tmp-stage").exists()
    assert verify_files(art) == []


def test_a_second_run_on_the_same_directory_is_refused_at_start(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    with output_lock(art):
        result = run_module("export", "--tflite", str(art))
        _one_line(result, 1, "another EdgeKit run is writing", str(art))
        optimize = run_module("optimize", "prune", str(tiny), "--out", str(art), "--force")
        _one_line(optimize, 1, "another EdgeKit run is writing")
    assert not (art / "model.float32.tflite").exists()
    assert not (tmp_path / ".art.lock").exists()


def _small_disk(path: Path):
    """A 96 KiB tmpfs at `path` (root), so writes fail with ENOSPC as on a full SD card; None elsewhere."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


def test_a_full_disk_prints_one_line_exits_1_and_leaves_nothing(tiny, tmp_path):
    disk = _small_disk(tmp_path / "disk")
    limit = {}
    if disk is None:  # not root: a file-size limit makes the same write fail (EFBIG instead of ENOSPC)
        disk = tmp_path / "disk"
        limit = {"preexec_fn": lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                                        resource.setrlimit(resource.RLIMIT_FSIZE, (96 << 10, 96 << 10)))}
    try:
        result = subprocess.run([sys.executable, "-m", "optimize", "prune", str(tiny), "--out", str(disk / "p"),
                                 "--epochs", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True, **limit)
        line = _one_line(result, 1, "cannot write", "nothing was left half-written")
        assert "disk is full" in line or "File too large" in line
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- bad input: one clear line, never a traceback, a hang or a wrong answer ------------------------

def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with a few bytes of image data: what a bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def inputs(tmp_path, digits):
    """Bad inputs for `runtime predict`, by name."""
    d = tmp_path
    np.save(d / "float255.npy", digits.x_test[:3].astype(np.float32))  # raw pixels as floats
    np.save(d / "empty.npy", np.zeros((0, 28, 28, 1), np.uint8))
    with open(d / "huge.npy", "wb") as fh:  # a header that promises 292 GiB
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (292 << 30,)})
        fh.write(b"\0" * 100)
    _png_header_only(d / "bomb.png", 10000, 10000)
    _png_header_only(d / "bomb20k.png", 20000, 20000)
    _png_header_only(d / "bomb31.png", 2**31 - 1, 2**31 - 1)
    (d / "folder.png").mkdir()
    os.mkfifo(d / "fifo.png")
    (d / "loop.png").symlink_to(d / "loop2.png")
    (d / "loop2.png").symlink_to(d / "loop.png")
    (d / "dangling.png").symlink_to(d / "nowhere.png")
    return d


@pytest.mark.parametrize("name, words", [
    ("float255.npy", ["ranges over [0, 255]", "as uint8"]),
    ("empty.npy", ["empty array"]),
    ("huge.npy", ["promises an array of shape [313532612608]"]),
    ("bomb.png", ["claims 10000x10000 pixels", "decompression bomb"]),
    ("bomb20k.png", ["decompression bomb"]),
    ("bomb31.png", ["decompression bomb"]),
    ("folder.png", ["is a directory"]),
    ("fifo.png", ["named pipe (FIFO)"]),
    ("loop.png", ["Too many levels of symbolic links"]),
    ("dangling.png", ["symbolic link to", "which does not exist"]),
])
def test_bad_inputs_get_one_line_and_exit_2(exported, inputs, name, words):
    result = run_module("runtime", "predict", str(exported[0] / "model.int8.tflite"), str(inputs / name),
                        timeout=60)
    _one_line(result, 2, *words)


def test_an_unreadable_file_says_permission_denied(exported, tmp_path, digits):
    shared = Path(tempfile.mkdtemp(prefix="edgekit-perm-"))
    os.chmod(shared, 0o755)
    try:
        for name in ("model.int8.tflite", "model.int8.json"):
            shutil.copy(exported[0] / name, shared / name)
            os.chmod(shared / name, 0o644)
        np.save(shared / "x.npy", digits.x_test[:1])
        os.chmod(shared / "x.npy", 0o000)
        # Root reads everything: run the command without the capabilities that let it, as a service account
        prefix = []
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without util-linux's setpriv: root reads every file")
            prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
        result = subprocess.run([*prefix, sys.executable, "-m", "runtime", "predict",
                                 str(shared / "model.int8.tflite"), str(shared / "x.npy")], cwd=ROOT,
                                capture_output=True, text=True)
        _one_line(result, 2, "is not readable (permission denied)")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_every_pillow_mode_is_read_for_what_it_means(tmp_path, digits):
    """16-bit, 32-bit integer, float, transparent, palette and CMYK images give the pixels of the
    8-bit original (up to JPEG-free rounding), in prediction and in folder datasets alike."""
    from runtime.artifacts.preprocessing import image_to_pixels, to_8bit

    pixels = digits.x_test[0, ..., 0]  # uint8 28x28, white digit on black
    Image.fromarray(pixels, "L").save(tmp_path / "l8.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "l16.png")  # saved as 16-bit grayscale
    assert Image.open(tmp_path / "l16.png").mode.startswith("I")
    la = Image.fromarray(np.dstack([pixels, np.full_like(pixels, 255)]), "LA")
    la.putpixel((0, 0), (200, 0))  # one fully transparent pixel: composited on the black background
    la.save(tmp_path / "la.png")
    palette = Image.fromarray(pixels, "L").convert("P")
    palette.info["transparency"] = int(palette.getpixel((5, 5)))
    palette.save(tmp_path / "p.png", transparency=palette.info["transparency"])
    expected = pixels.copy()
    read = {name: image_to_pixels(tmp_path / name, (28, 28), 1)[..., 0] for name in ("l8.png", "l16.png", "la.png")}
    assert np.array_equal(read["l8.png"], expected)
    assert np.array_equal(read["l16.png"], expected)
    expected_la = expected.copy()
    expected_la[0, 0] = 0
    assert np.array_equal(read["la.png"], expected_la)
    transparent = image_to_pixels(tmp_path / "p.png", (28, 28), 1)[..., 0]
    assert (transparent[pixels == pixels[5, 5]] == 0).all()  # that palette entry is background now
    assert np.array_equal(to_8bit(Image.fromarray(pixels.astype(np.int32) * 257, "I"), 1)[..., 0], expected)
    assert np.array_equal(to_8bit(Image.fromarray(pixels.astype(np.float32) / 255, "F"), 1)[..., 0], expected)
    cmyk = Image.fromarray(np.dstack([pixels] * 3), "RGB").convert("CMYK")
    assert np.abs(to_8bit(cmyk, 1)[..., 0].astype(int) - expected).max() <= 1


def test_16_bit_images_predict_like_8_bit_ones_and_train_the_same(exported, tmp_path, digits):
    from runtime.datasets import load_dataset

    model = load(exported[0] / "model.int8.tflite")
    folder8, folder16 = tmp_path / "f8", tmp_path / "f16"
    names = []
    for i in range(12):
        image = digits.x_test[i, ..., 0]
        for folder, array in ((folder8, image), (folder16, image.astype(np.uint16) * 257)):
            (folder / str(digits.y_test[i] % 2)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / str(digits.y_test[i] % 2) / f"{i}.png")
        names.append(folder16 / str(digits.y_test[i] % 2) / f"{i}.png")
    result = run_module("runtime", "predict", str(exported[0] / "model.int8.tflite"), *map(str, names), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = [p["top"][0]["index"] for p in json.loads(result.stdout)["predictions"]]
    assert predicted == list(model.predict(digits.x_test[:12]).argmax(axis=1))
    eight, sixteen = load_dataset(f"folder:{folder8}"), load_dataset(f"folder:{folder16}")
    assert np.array_equal(eight.x_train, sixteen.x_train) and np.array_equal(eight.x_test, sixteen.x_test)


def test_an_idx_gzip_bomb_is_refused_from_its_header(tmp_path):
    import tracemalloc

    from runtime.datasets.idx import read_idx

    lying = tmp_path / "lying.gz"  # the header promises 60 TB
    lying.write_bytes(gzip.compress(idx_bytes(np.zeros((1, 1, 1), np.uint8))[:4]
                                    + struct.pack(">III", 60000, 1000000, 1000)))
    with pytest.raises(EdgeKitError, match="promises 60,000,000,000,000 bytes"):
        read_idx(lying)
    bomb = tmp_path / "bomb.gz"  # a true header of 10 images, then 300 MB of zeros: 300 KB gzipped
    with gzip.open(bomb, "wb") as fh:
        fh.write(idx_bytes(np.zeros((10, 28, 28), np.uint8)))
        for _ in range(300):
            fh.write(b"\0" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(EdgeKitError, match="has trailing bytes"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the header decides what is read: kilobytes, not the 300 MB behind it


@pytest.mark.parametrize("command", [
    ["runtime", "bench", "MODEL", "--seconds", "nan"],
    ["runtime", "bench", "MODEL", "--seconds", "inf"],
    ["runtime", "report", "ART", "--seconds", "nan"],
    ["pipeline", "--bench-seconds", "inf", "--out", "OUT"],
    ["train", "--model", "fashion_cnn", "--image-size", "100000", "--out", "OUT"],
])
def test_impossible_options_are_refused_up_front(exported, tmp_path, command):
    args = [a.replace("MODEL", str(exported[0] / "model.int8.tflite")).replace("ART", str(exported[0]))
            .replace("OUT", str(tmp_path / "out")) for a in command]
    result = run_module(*args, timeout=120)  # nan and inf once hung forever
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "expected seconds above 0" in result.stderr or "at most" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_calibration_records_the_samples_actually_used(tiny, tmp_path, digits):
    from export import export

    art = _copy(tiny, tmp_path)
    (result,) = export(art, ["int8"], calibration_samples=100_000_000, progress=lambda s: None)
    assert result.passed
    sidecar = json.loads((art / "model.int8.json").read_text())
    assert sidecar["calibration"]["samples"] == len(digits.y_train) == 1259


def test_info_on_an_export_where_every_format_failed(tmp_path):
    art = tmp_path / "exports"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({
        "name": "exports", "kind": "export", "model": "bare", "dataset": {"name": "digits"},
        "parent": {"path": "/somewhere/model.keras"}, "created": "2026-11-23T00:00:00+00:00", "versions": {},
        "preprocessing": {"size": [28, 28], "channels": 1}, "labels": list("0123456789"), "input_shape": [28, 28, 1],
        "metrics": {"accuracy": None, "size_bytes": 0}, "files": {},
        "exports": {"float32": {"file": None, "passed": False, "message": "the TFLite converter rejected it"}}}))
    result = run_module("runtime", "info", str(art))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "float32 FAILED" in result.stdout and "test accuracy  -" in result.stdout


def test_the_python_api_refuses_wrong_types_with_a_clear_error(exported):
    with pytest.raises(EdgeKitError, match="threads takes a whole number.*got '2'"):
        load(exported[0] / "model.int8.tflite", threads="2")
    with pytest.raises(EdgeKitError, match="takes the path of a .tflite or .onnx file.*got NoneType"):
        load(None)
    model = load(exported[0] / "model.int8.tflite")
    probabilities = model.predict(np.zeros((1, 28, 28, 1), np.uint8))
    with pytest.raises(EdgeKitError, match="k must be a whole number of 1 or more; got -1"):
        model.top_k(probabilities, k=-1)
    assert len(model.top_k(probabilities, k=50)[0]) == 10


# --- exit codes: one rule everywhere ---------------------------------------------------------------

def test_error_classes_carry_their_exit_codes():
    from runtime.errors import Busy, ConversionError, VerificationError, WriteFailed

    assert EdgeKitError("x").exit_code == UntrustedModel("x").exit_code == 2
    assert {cls("x").exit_code for cls in (ArtifactError, ConversionError, VerificationError, WriteFailed, Busy)} == {1}


def test_a_broken_pruning_promise_is_a_failure_not_a_usage_error():
    from optimize.api import _checks
    from optimize.recipes import PruneRecipe
    from runtime.errors import VerificationError

    with pytest.raises(VerificationError, match="short of the target 0.8") as info:
        _checks(PruneRecipe(sparsity=0.8), {"sparsity": 0.5}, None, [], None)
    assert info.value.exit_code == 1


def test_every_format_is_attempted_and_every_failure_reported(tiny, tmp_path, monkeypatch):
    """A converter that writes a file LiteRT cannot load (as int16x8 once did) fails that format alone."""
    from export import api, convert

    art = _copy(tiny, tmp_path)
    real = convert.to_tflite

    def broken_int16x8(model, key, *args):
        return b"TFL3 but not really a model" * 10 if key == "int16x8" else real(model, key, *args)

    monkeypatch.setattr(convert, "to_tflite", broken_int16x8)
    results = {r.format: r for r in api.export(art, ["float32", "int16x8", "onnx"], progress=lambda s: None)}
    assert results["float32"].passed and results["onnx-float32"].passed and not results["int16x8"].passed
    assert "cannot run the file the converter wrote" in results["int16x8"].message
    assert isinstance(results["int16x8"].error.__cause__, ArtifactError)
    assert read_manifest(art)["exports"]["int16x8"]["passed"] is False
    assert not (art / "model.int16x8.tflite").exists() and verify_files(art) == []


def test_verbose_shows_the_original_cause(exported, tmp_path, digits):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 100)
    np.save(tmp_path / "x.npy", digits.x_test[:1])
    quiet = run_module("runtime", "predict", str(garbage), str(tmp_path / "x.npy"))
    _one_line(quiet, 1, "is not a valid TFLite model", "export it again")
    loud = run_module("runtime", "predict", str(garbage), str(tmp_path / "x.npy"), "--verbose")
    assert loud.returncode == 1 and "caused by:" in loud.stderr and "Traceback" in loud.stderr, loud.stderr
