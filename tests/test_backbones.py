"""Transfer learning from tf_keras.applications backbones: build, freeze, weights files, the offline error,
and a MobileNetV2 through training in two phases, QAT and every export format. Nothing downloads."""

import json

import numpy as np
import pytest

from conftest import in_subprocess, run_module
from runtime.artifacts.manifest import read_manifest
from train.__main__ import main as train_main
from train.backbones import BACKBONES, HEAD, freeze, unfreeze
from train.models import create_model

SMALL = (32, 32, 3)
ARGS = {"mobilenet_v2": {"alpha": 0.35}, "mobilenet_v3_small": {"alpha": 0.75}, "efficientnet_b0": {},
        "resnet50": {}}


@pytest.fixture(scope="module")
def keras():
    from train.backend import keras

    return keras


def _build_train_reload(name: str, directory: str) -> None:
    """The test below, in a subprocess (conftest.in_subprocess): four backbones' graphs and optimizer states
    (ResNet50's 25M weights among them) go back to the system when it ends; an assertion comes back as raised."""
    from pathlib import Path

    from train.backend import keras
    from train.safe_load import load_model_file
    from train.trainer import compile_model, save_model

    keras.utils.set_random_seed(0)
    model = create_model(name, SMALL, 4, **ARGS[name])
    assert [layer.name for layer in model.layers[-3:]] == list(HEAD)
    assert model.get_layer(BACKBONES[name].first_conv) is not None  # Keras's own layer names
    x = np.random.default_rng(0).uniform(0, 255, (8, *SMALL)).astype(np.float32)
    y = np.array([0, 0, 0, 0, 0, 1, 2, 3])  # unbalanced: a bias gradient that cannot cancel out
    for unfreeze_from in (None, BACKBONES[name].fine_tune_from):  # head only, then the top of the backbone
        freeze(model, name, unfreeze_from)
        compile_model(model, 1e-3)
        trainable = {w.name for w in model.trainable_weights}
        before = {w.name: w.numpy().copy() for w in model.weights}
        assert np.isfinite(model.train_on_batch(x, y)).all()
        changed = {w.name for w in model.weights if not np.array_equal(w.numpy(), before[w.name])}
        moving = {n for n in changed if "moving_" in n}  # BatchNorm statistics of frozen layers do not move
        assert not moving and changed <= trainable  # nothing frozen moves
        assert len(changed) >= 0.75 * len(trainable)  # (squeeze-excite behind a saturated hard-sigmoid at random
        # init passes no gradient: 4 of 17 in MobileNetV3Small)
        first = model.get_layer(BACKBONES[name].first_conv).weights[0].name
        assert first not in trainable  # the stem stays frozen in both phases
        if unfreeze_from is not None:
            assert any(w.name.startswith(unfreeze_from) for w in model.trainable_weights)
    unfreeze(model)
    path = Path(directory) / "model.keras"
    save_model(model, path)
    again = load_model_file(path)
    assert np.allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet50", "efficientnet_b0") else n
                                  for n in BACKBONES])  # those two: 28 s and 26 s, `python -m pytest -m slow`
def test_each_backbone_builds_trains_frozen_and_unfrozen_and_reloads(tmp_path, name):
    in_subprocess(_build_train_reload, name, str(tmp_path))


def test_weights_from_a_file_round_trip(keras, tmp_path):
    keras.utils.set_random_seed(1)
    first = create_model("mobilenet_v2", SMALL, 3, alpha=0.35)
    path = tmp_path / "backbone.h5"
    first.save_weights(path)
    keras.utils.set_random_seed(2)  # another seed: only the file can make them equal
    second = create_model("mobilenet_v2", SMALL, 3, weights=str(path), alpha=0.35)
    features = [keras.Model(m.input, m.get_layer("out_relu").output) for m in (first, second)]
    x = np.random.default_rng(0).uniform(0, 255, (4, *SMALL)).astype(np.float32)
    assert np.array_equal(features[0].predict(x, verbose=0), features[1].predict(x, verbose=0))
    from runtime.errors import EdgeKitError

    other = tmp_path / "other.h5"
    create_model("efficientnet_b0", SMALL, 3).save_weights(other)
    with pytest.raises(EdgeKitError, match="has no weights for .* of the mobilenet_v2 backbone's"):
        create_model("mobilenet_v2", SMALL, 3, weights=str(other), alpha=0.35)


def test_imagenet_weights_offline_name_the_file_and_where(tmp_path):
    result = run_module("train", "--model", "mobilenet_v2", "--model-arg", "alpha=0.35", "--weights", "imagenet",
                        "--epochs", "1", "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(line) == 1
    assert "needs Keras's file mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_" in line[0]
    assert "_no_top.h5 in " in line[0] and ".keras/models" in line[0] and "--weights PATH" in line[0]
    wrong = run_module("train", "--model", "fashion_cnn", "--weights", "imagenet", "--out", str(tmp_path / "never"))
    assert wrong.returncode == 2 and "apply to the models on Keras applications backbones" in wrong.stderr


@pytest.fixture(scope="module")
def mobilenet_v2(tmp_path_factory):
    """MobileNetV2 (alpha 0.35) on digits, grayscale repeated to RGB at 32x32: the head, then the top blocks."""
    out = tmp_path_factory.mktemp("backbone") / "mobilenet_v2"
    done = run_module("train", "--model", "mobilenet_v2", "--model-arg", "alpha=0.35", "--freeze-backbone",
                      "--fine-tune-from", "block_13_expand", "--epochs", "1", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# float16 and int16x8 (which LiteRT refuses for MobileNetV2's depthwise convolutions) took a minute more of the
# suite on 2 cores, through the same converter paths as the others: `python -m export --all` makes them
BACKBONE_FORMATS = ("float32", "dynamic", "int8", "onnx-float32", "onnx-int8")


def _qat_and_export(artifact: str, qat_out: str):
    """`optimize qat` and the export of each backend's float and 8-bit formats (32 calibration images, as
    test_foreign), in a subprocess (conftest.in_subprocess)."""
    from export import export
    from optimize import qat

    manifest = qat(artifact, qat_out, epochs=1, quiet=True)
    return manifest, {r.format: r for r in export(artifact, list(BACKBONE_FORMATS), calibration_samples=32,
                                                  progress=lambda s: None)}


def test_two_phase_training_records_the_backbones_preprocessing(mobilenet_v2):
    manifest = read_manifest(mobilenet_v2)
    assert manifest["input_shape"] == [32, 32, 3]
    pre = manifest["preprocessing"]
    assert pre["size"] == [32, 32] and pre["channels"] == 3
    assert pre["scale"] == pytest.approx(1 / 127.5) and pre["mean"] == [1.0] and pre["std"] == [1.0]
    phases = manifest["training"]["phases"]
    assert [p["unfreeze_from"] for p in phases] == ["", "block_13_expand"]
    assert phases[1]["lr"] == pytest.approx(phases[0]["lr"] / 10)
    assert phases[0]["trainable_backbone_layers"] == 0 < phases[1]["trainable_backbone_layers"]
    assert manifest["training"]["epochs_run"] == sum(p["epochs_run"] for p in phases)


@pytest.mark.slow  # 83 s on a 2-core AMD EPYC: `python -m pytest -m slow` (README, Tests)
def test_mobilenet_v2_goes_through_qat_and_every_export_format(mobilenet_v2, tmp_path, digits):
    """What `optimize qat` and `export` do (in a subprocess: what the converters hold goes back)."""
    from runtime.load import load

    manifest, results = in_subprocess(_qat_and_export, str(mobilenet_v2), str(tmp_path / "qat"))
    assert manifest["kind"] == "qat" and manifest["model"] == "mobilenet_v2"
    assert set(results) == set(BACKBONE_FORMATS)
    assert {k for k, r in results.items() if r.passed} == set(BACKBONE_FORMATS), "; ".join(
        r.message for r in results.values() if not r.passed)
    model = load(mobilenet_v2 / "model.int8.tflite")
    assert model.input_shape == (32, 32, 3) and model.preprocessing.scale == pytest.approx(1 / 127.5)
    from PIL import Image

    pixels = np.stack([np.asarray(Image.fromarray(p[..., 0]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
                       for p in digits.x_test[:4]])  # 28x28 gray digits as the camera would give them: RGB, 32x32
    assert model.predict(pixels).shape == (4, 10)


@pytest.mark.slow  # 171 s on a 2-core Xeon: `python -m pytest -m slow` (README, Tests)
def test_pqat_of_a_backbone_with_layers_tfmot_cannot_annotate_exports_fully_integer(tmp_path):
    """MobileNetV3Small's hard-swish and squeeze-excite (TFOpLambda, Multiply, Rescaling) get no learned ranges
    from tfmot's 8-bit scheme, and the converter leaves them float (155 float ops from QAT): export makes the
    int8 file from the weights PQAT trained with every activation range calibrated, fully integer, and says
    so. PQAT, as it also proves that tfmot's prune-preserving scheme goes through such a model (its registry
    calls any layer without weights supported, and quantize_apply then failed on the Rescaling)."""
    from export import export
    from optimize import pqat, prune
    from runtime.load import tflite_census

    parent = tmp_path / "mobilenet_v3_small"
    assert train_main(["--model", "mobilenet_v3_small", "--model-arg", "alpha=0.75", "--epochs", "1",
                       "--out", str(parent), "--quiet"]) == 0
    prune(parent, tmp_path / "pruned", sparsity=0.5, epochs=1, quiet=True)
    manifest = pqat(tmp_path / "pruned", tmp_path / "pqat", epochs=1, quiet=True)
    skipped = manifest["facts"]["skipped"]  # Keras numbers the names in a process that built others first
    assert any(name.startswith("rescaling") and why == "not supported by tfmot's 8-bit quantization"
               for name, why in skipped.items()), skipped
    said = []
    [plain] = export(parent, ["int8"], calibration_samples=32, progress=said.append)
    [result] = export(tmp_path / "pqat", ["int8"], calibration_samples=32, progress=said.append)
    assert plain.passed and result.passed, result.message
    census = tflite_census(result.file)
    assert census["float_ops"] == [] and set(census["dtypes"]) <= {"int8", "int32"}, census
    assert result.file.stat().st_size <= 1.03 * plain.file.stat().st_size
    sidecar = json.loads(result.file.with_suffix(".json").read_text())
    assert sidecar["verification"]["float_ops"] == 0 and sidecar["calibration"]["samples"] == 32
    ranges = sidecar["activation_ranges"]
    assert ranges["source"] == "calibrated" and "Multiply" in ranges["why"]
    assert any("the learned ranges leave" in line and "fully integer" in line for line in said)
