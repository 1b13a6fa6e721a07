"""Selective int8: on a model that is fine in float and hostile to per-tensor int8, the sensitivity ranking
names the hostile layer, plain int8 fails the budget, and --keep-float auto writes an int8-mixed file within
it that keeps only that layer and its consumer float and runs in the TensorFlow-free runtime."""

import json

import numpy as np
import pytest

from conftest import run_module
from runtime.errors import EdgeKitError


@pytest.fixture(scope="session")
def hostile(tmp_path_factory, digits):
    """conv -> d1 -> hostile -> logits, trained on digits; then `hostile` gains a 17th output channel a thousand
    times the others that `logits` ignores: the float model is unchanged, per-tensor int8 of that tensor
    rounds the 16 real channels to nothing."""
    from train.backend import keras, tf

    tf.keras.utils.set_random_seed(0)
    x, y = digits.arrays("train")

    def build(width):
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
        h = keras.layers.Flatten(name="flat")(h)
        h = keras.layers.Dense(32, activation="relu", name="d1")(h)
        h = keras.layers.Dense(width, activation="relu", name="hostile")(h)
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))

    trained = build(16)
    trained.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trained.fit(x, y, epochs=5, batch_size=32, verbose=0)
    model = build(17)
    for name in ("conv", "d1"):
        model.get_layer(name).set_weights(trained.get_layer(name).get_weights())
    kernel, bias = trained.get_layer("hostile").get_weights()
    model.get_layer("hostile").set_weights([np.concatenate([kernel, 1000 * np.abs(kernel[:, :1]) + 10], axis=1),
                                            np.concatenate([bias, [1000.0]])])
    kernel, bias = trained.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([np.concatenate([kernel, np.zeros((1, 10), np.float32)]), bias])
    x_test, y_test = digits.arrays("test")
    same = trained.predict(x_test, verbose=0).argmax(1) == model.predict(x_test, verbose=0).argmax(1)
    assert same.all()  # the float model did not change
    path = tmp_path_factory.mktemp("hostile") / "hostile.keras"
    model.save(path)
    return path, float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))


def test_plain_int8_fails_the_budget(hostile, tmp_path):
    from export import export

    path, _ = hostile
    result, = export(path, ["int8"], tmp_path / "plain", dataset="digits", progress=lambda s: None)
    assert not result.passed and "points below Keras" in result.message
    assert result.figures["accuracy"] < 0.2  # chance, not a near miss


def test_explain_ranks_the_hostile_layer_first_and_auto_keeps_only_it_and_its_consumer(hostile, tmp_path):
    from export import export
    from runtime.load import load

    path, float_accuracy = hostile
    out = tmp_path / "mixed"
    result, = export(path, ["int8"], out, dataset="digits", keep_float="auto", explain=True, progress=lambda s: None)
    table = json.loads((out / "sensitivity.int8.json").read_text())
    assert table["ranked"][0] == "hostile" and table["int8_val_accuracy"] < 0.2
    first = table["layers"][0]
    assert first["keep"] == ["hostile", "logits"] and first["gain_points"] > 50 and first["sqnr_db"] < 10
    assert (out / "sensitivity.int8.png").read_bytes()[:4] == b"\x89PNG"
    assert result.format == "int8-mixed" and result.passed, result.message
    assert not (out / "model.int8.tflite").exists()  # plain int8 missed the budget: not written
    sidecar = json.loads((out / "model.int8-mixed.json").read_text())
    kept = sidecar["kept_float"]
    assert set(kept["layers"]) <= {"hostile", "logits"} and "hostile" in kept["layers"]
    assert kept["val_accuracy"] > kept["int8_val_accuracy"] + 0.5 and kept["size_cost_bytes"] > 0
    assert {e["layer"] for e in kept["per_layer"]} == set(kept["layers"]) and kept["latency_ratio_vs_int8"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exports"]["int8-mixed"]["kept_float"]["layers"] == kept["layers"]
    model = load(out / "model.int8-mixed.tflite")  # the runtime runs it: int8 in and out, as the int8 format
    assert model.input.dtype == "int8" and model.output.dtype == "int8" and model.format == "int8-mixed"
    from runtime.datasets import load_dataset

    test = load_dataset("digits")
    accuracy = float(np.mean(model.predict(test.x_test).argmax(1) == test.y_test))
    assert accuracy >= float_accuracy - 0.01


def test_keep_float_by_name(hostile, tmp_path):
    from export import export

    path, _ = hostile
    result, = export(path, ["int8-mixed"], tmp_path / "named", dataset="digits", keep_float=["hostile", "logits"],
                     progress=lambda s: None)
    assert result.passed and result.figures["kept_float"]["chosen"].startswith("by name")
    with pytest.raises(EdgeKitError, match="has no layer named 'hostle'.*Did you mean 'hostile'"):  # before calibrating
        export(path, ["int8"], tmp_path / "typo", dataset="digits", keep_float=["hostle"], progress=lambda s: None)


@pytest.mark.parametrize("args, message", [
    (["--tflite", "--quantize", "float16", "--keep-float", "auto"], "--keep-float applies to int8"),
    (["--onnx", "--explain"], "--explain ranks the layers int8 hurts"),
    (["--format", "int8-mixed"], "int8-mixed needs --keep-float"),
])
def test_selective_options_are_checked_before_anything_runs(tmp_path, args, message):
    result = run_module("export", *args, str(tmp_path / "none.keras"), "--dataset", "digits")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_onnx_explain_and_auto_keep_the_hostile_layer_float(hostile, tmp_path):
    from export import export
    from runtime.datasets import load_dataset
    from runtime.load import load

    path, float_accuracy = hostile
    out = tmp_path / "onnx"
    plain, = export(path, ["onnx-int8"], tmp_path / "onnx-plain", dataset="digits", progress=lambda s: None)
    assert not plain.passed and "points below Keras" in plain.message
    result, = export(path, ["onnx-int8"], out, dataset="digits", keep_float="auto", explain=True,
                     progress=lambda s: None)
    table = json.loads((out / "sensitivity.onnx-int8.json").read_text())
    assert table["ranked"][0] == "hostile" and table["layers"][0]["gain_points"] > 50
    assert result.format == "onnx-int8-mixed" and result.passed, result.message
    kept = json.loads((out / "model.onnx-int8-mixed.json").read_text())["kept_float"]
    assert "hostile" in kept["layers"] and set(kept["layers"]) <= {"hostile", "logits"}
    model = load(out / "model.onnx-int8-mixed.onnx")
    test = load_dataset("digits")
    assert float(np.mean(model.predict(test.x_test).argmax(1) == test.y_test)) >= float_accuracy - 0.01


def test_the_pipeline_writes_int8_mixed_when_plain_int8_misses_the_budget(hostile, tiny, tmp_path):
    """A pipeline run whose trained model is the hostile one: its export stage writes int8-mixed in place of the
    failed int8, the report recommends it and shows the int8 failure, and a rerun keeps it."""
    import shutil

    from pipeline.run import Pipeline, Plan
    from runtime.artifacts.manifest import write_manifest

    base = tmp_path / "run" / "fashion_cnn"
    shutil.copytree(tiny, base)
    shutil.copy(hostile[0], base / "model.keras")  # the same input and classes; a model hostile to int8
    manifest = json.loads((base / "manifest.json").read_text())
    write_manifest(base, {k: v for k, v in manifest.items() if k != "files"}, list(manifest["files"]))
    plan = Plan(out=tmp_path / "run", variants=(), formats=("float32", "int8"), bench=False)
    pipeline = Pipeline(plan, say=lambda *_: None)
    pipeline.export("base")
    assert pipeline.status["export:base"]["status"] == "done"
    assert "int8-mixed keeps hostile" in pipeline.status["export:base"]["note"]
    report = pipeline.report()
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["int8"]["status"] == "failed" and rows["int8-mixed"]["status"] == "verified"
    assert pipeline.status["report"]["status"] == "done"  # int8's failure is answered by int8-mixed
    assert report["recommendations"][0]["choice"]["format"] == "int8-mixed"
    pipeline.export("base")
    assert pipeline.status["export:base"]["status"] == "skipped"


def test_no_sensitivity_plot_when_int8_loses_nothing(tmp_path):
    from export.selective import plot_sensitivity

    layer = {"name": "dense", "kind": "Dense", "gain_points": 0.0, "sqnr_db": 38.0}
    table = {"format": "int8", "layers": [layer, {**layer, "name": "conv"}], "validation_images": 360,
             "float_val_accuracy": 0.99, "int8_val_accuracy": 0.99}
    stale = tmp_path / "sensitivity.int8.png"
    stale.write_bytes(b"\x89PNG from an earlier run")
    assert plot_sensitivity(table, stale) is False and not stale.exists()  # no empty chart, no stale one
    table["layers"][1]["gain_points"] = 0.28
    assert plot_sensitivity(table, stale) is True and stale.read_bytes()[:4] == b"\x89PNG"
