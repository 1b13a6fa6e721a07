"""`python -m train` end to end: accuracy reached, the artifact it writes, its errors."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_idx_dir, run_module
from runtime.artifacts.manifest import REQUIRED_KEYS, read_manifest, verify_files
from train.__main__ import main as train_main


@pytest.fixture(scope="session")
def cnn_artifact(tmp_path_factory):
    """The README's main job: fashion_cnn on digits with every default."""
    out = tmp_path_factory.mktemp("artifacts") / "fashion_cnn"
    assert train_main(["--model", "fashion_cnn", "--dataset", "digits", "--out", str(out), "--quiet"]) == 0
    return out


def test_default_fashion_cnn_reaches_98_percent_on_digits(cnn_artifact):
    manifest = read_manifest(cnn_artifact)
    assert manifest["metrics"]["accuracy"] >= 0.98
    assert manifest["training"]["epochs_run"] < 40  # early stopping ended it
    assert manifest["training"]["best_epoch"] <= manifest["training"]["epochs_run"]


def test_artifact_manifest_describes_the_model(cnn_artifact):
    manifest = read_manifest(cnn_artifact)
    assert set(REQUIRED_KEYS) <= set(manifest)
    assert manifest["kind"] == "trained" and manifest["parent"] is None and manifest["model"] == "fashion_cnn"
    assert manifest["input_shape"] == [28, 28, 1] and manifest["labels"] == [str(d) for d in range(10)]
    assert manifest["dataset"]["split"]["sizes"] == {"train": 1259, "val": 179, "test": 359}
    assert manifest["training"]["seed"] == 0 and manifest["training"]["config"]["lr"] == 1e-3
    assert manifest["metrics"]["size_bytes"] == (cnn_artifact / "model.keras").stat().st_size
    assert set(manifest["files"]) == {"model.keras", "training.png", "confusion.png"}
    assert {"tensorflow", "tf-keras", "numpy"} <= set(manifest["versions"])
    assert verify_files(cnn_artifact) == []
    for plot in ("training.png", "confusion.png"):
        with Image.open(cnn_artifact / plot) as image:
            assert image.format == "PNG" and min(image.size) > 300


def test_saved_model_reloads_and_reproduces_the_recorded_accuracy(cnn_artifact, digits):
    from runtime.metrics import confusion_matrix
    from train.backend import keras

    manifest = read_manifest(cnn_artifact)
    model = keras.models.load_model(cnn_artifact / "model.keras", compile=False)
    x, y = digits.arrays("test")
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    assert np.mean(predicted == y) == pytest.approx(manifest["metrics"]["accuracy"], abs=1e-9)
    assert confusion_matrix(y, predicted, 10).tolist() == manifest["metrics"]["confusion"]


def test_same_seed_gives_the_same_model(digits, tmp_path):
    from runtime.fsutil import sha256_file
    from train.trainer import TrainConfig, save_model, train

    small = dataclasses.replace(digits, x_train=digits.x_train[:300], y_train=digits.y_train[:300])
    config = TrainConfig(model="resnet", epochs=2, seed=7)
    first, second = (train(config, quiet=True, dataset=small) for _ in range(2))
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    save_model(first.model, tmp_path / "first.keras")
    save_model(second.model, tmp_path / "second.keras")  # the same bits: no save time in the file
    assert sha256_file(tmp_path / "first.keras") == sha256_file(tmp_path / "second.keras")
    other = train(dataclasses.replace(config, seed=8), quiet=True, dataset=small)
    assert not np.array_equal(first.model.get_weights()[0], other.model.get_weights()[0])


def test_trains_on_an_image_folder_with_augmentation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name, value in (("dark", 40), ("light", 215)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(value, 20, (30, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "folder_model"
    code = train_main(["--model", "mobilenet", "--dataset", f"folder:{tmp_path / 'data'}", "--image-size", "16",
                       "--model-arg", "width=0.25", "--epochs", "2", "--augment", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"epoch +1/2 +loss", printed) and "next: python -m runtime info" in printed
    manifest = read_manifest(out)
    assert manifest["labels"] == ["dark", "light"] and manifest["input_shape"] == [16, 16, 3]
    assert manifest["model_args"]["width"] == 0.25 and manifest["training"]["config"]["augment"] is True


def test_trains_on_fashion_mnist_idx_files(tmp_path):
    make_idx_dir(tmp_path / "fashion", n_train=120, n_test=30)
    out = tmp_path / "fm"
    assert train_main(["--model", "fashion_cnn", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "fashion"),
                       "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["labels"][9] == "Ankle boot" and manifest["dataset"]["split"]["sizes"]["test"] == 30


# --- errors: one line, exit 2, no traceback ---------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model", "resnett"], "unknown model 'resnett'.*Did you mean 'resnet'"),
    (["--model", "resnet", "--dataset", "cifar"], "unknown dataset 'cifar'.*Did you mean 'cifar10'"),
    (["--model", "mobilenet", "--image-size", "8"], "needs inputs of at least 16x16; got 8x8"),
    (["--model", "resnet", "--dataset", "fashion_mnist", "--data-dir", "."], "train-images-idx3-ubyte.gz"),
    (["--model", "resnet", "--dataset", "mnist"], "downloads are off"),
    (["--model", "resnet", "--model-arg", "depht=20"], r"does not take \['depht'\]"),
    (["--model", "resnet", "--epochs", "0"], "--epochs must be a positive integer"),
    (["--model", "resnet", "--dataset", "folder:/nonexistent"], "is not a directory"),
    (["--model", "resnet", "--devices", "cpu:0"], r"--devices: auto, cpu, cpu:N \(N from 1 to \d+, the cores\)"),
    (["--model", "resnet", "--devices", "tpu"], "--devices: auto, cpu, cpu:N"),
    (["--model", "resnet", "--devices", "gpu:0,0"], "distinct GPU indices"),
    (["--model", "resnet", "--devices", "gpu", "--epochs", "1"], "this machine has no GPU that TensorFlow can see"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message):
    result = run_module("train", *args, "--out", "/tmp/edgekit-never-written")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_cli_refuses_to_overwrite_an_artifact_without_force(cnn_artifact):
    result = run_module("train", "--model", "fashion_cnn", "--out", str(cnn_artifact))
    assert result.returncode == 2 and "not empty; pass --force" in result.stderr
    assert verify_files(cnn_artifact) == []


def test_cli_help_lists_models_and_datasets():
    result = run_module("train", "--help")
    assert result.returncode == 0
    for word in ("fashion_cnn", "resnet", "mobilenet", "folder:PATH", "--augment", "TF_CONFIG"):
        assert word in result.stdout


# --- runtime info, and the runtime stays TensorFlow-free ------------------------------

def test_runtime_info_verifies_checksums(cnn_artifact, tmp_path):
    result = run_module("runtime", "info", str(cnn_artifact))
    assert result.returncode == 0 and "checksums      all match" in result.stdout
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("manifest.json", "model.keras", "training.png", "confusion.png"):
        (damaged / name).write_bytes((cnn_artifact / name).read_bytes())
    with open(damaged / "model.keras", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\xff")
    result = run_module("runtime", "info", str(damaged), "--json")
    assert result.returncode == 1 and "model.keras: sha256 differs" in result.stderr
    assert json.loads(result.stdout)["intact"] is False


def test_runtime_imports_no_tensorflow(cnn_artifact):
    code = (
        "import runpy, sys\n"
        "import runtime\n"
        "from runtime.datasets import load_dataset\n"
        "load_dataset('digits').arrays('test')\n"
        f"sys.argv = ['runtime', 'info', {str(cnn_artifact)!r}]\n"
        "try:\n    runpy.run_module('runtime', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = ('tensorflow', 'tf_keras', 'tensorflow_model_optimization', 'tf2onnx', 'keras')\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
