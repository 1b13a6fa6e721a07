"""Models EdgeKit did not build: tf_keras.applications networks (weights=None, small inputs) and a
SeparableConv2D model, through `export --all` and `runtime.load(...).predict` on a batch. Each format is
verified or fails with its reason, nothing raises, and a model that ends in softmax is never normalized
twice."""

from pathlib import Path

import numpy as np
import pytest

from conftest import check_micro_answer, in_subprocess, run_module
from export import EXPORT_ALL, export
from runtime.load import load


def _separable(keras):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for i, width in enumerate((16, 32)):
        x = keras.layers.SeparableConv2D(width, 3, padding="same", name=f"sep{i}")(x)
        x = keras.layers.BatchNormalization(name=f"sep{i}_bn")(x)
        x = keras.layers.ReLU(name=f"sep{i}_relu")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="predictions")(x), name="separable")


# MobileNetV2 (alpha 0.35, 32x32x3) goes through every format in test_backbones.py, as EdgeKit's mobilenet_v2
MODELS = {
    "efficientnet_b0": lambda keras: keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None,
                                                                       classes=10),
    "separable": _separable,
}


# EfficientNetB0's 240 layers take minutes per format to convert on 2 cores: the suite exports it to one file
# per backend and kind (the TFLite float file is the one whose dynamic shapes once broke the runtime).
FORMATS_OF = {"efficientnet_b0": ["float32", "int8", "onnx-float32"]}
# The formats each model must pass, and the rule each other one breaks: a quantization regression fails here. One
# epoch on 256 images leaves the models near chance, so their 8-bit files flip most top-1 answers (the agreement
# floor); 16-bit activations and float16 weights stay faithful.
MUST_PASS = {"separable": {"float32", "float16", "dynamic", "int16x8", "onnx-float32"},
             "efficientnet_b0": {"float32", "onnx-float32"}}
FAILED_RULE = {"separable": {"int8": "agreement", "onnx-int8": "agreement"}, "efficientnet_b0": {"int8": "agreement"}}


def _make(name: str, directory: str):
    """Train, save and export the foreign model (in a subprocess: in_subprocess); its results, and the Keras
    model's probabilities on the first 5 test images."""
    from runtime.datasets import load_dataset, resized
    from train.backend import keras
    from train.trainer import seed_everything

    seed_everything(0)
    model = MODELS[name](keras)
    data = resized(load_dataset("digits"), (32, 32), 3)
    x, y = data.arrays("train")
    x, y = x[:256], y[:256]
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    path = Path(directory) / "model.keras"
    model.save(path)
    formats = FORMATS_OF.get(name, list(EXPORT_ALL))
    results = {r.format: r for r in export(path, formats, dataset="digits", calibration_samples=32,
                                           progress=lambda s: None, allow_untrained=True)}  # one epoch: near chance
    return results, model.predict(data.preprocessing.apply(data.x_test[:5]), verbose=0)


@pytest.fixture(scope="module", params=[pytest.param("efficientnet_b0", marks=pytest.mark.slow), "separable"])
# EfficientNetB0: 100 s of export on 2 cores, `python -m pytest -m slow` (README, Tests)
def foreign(request, tmp_path_factory, digits):
    """A foreign model trained one epoch on 256 digits at 32x32x3, saved as a bare .keras file and exported to
    every format (EfficientNetB0: see FORMATS_OF) with 32 calibration images, in a subprocess; (name, results,
    data, the Keras model's probabilities on the first 5 test images)."""
    from runtime.datasets import resized

    results, expected = in_subprocess(_make, request.param, str(tmp_path_factory.mktemp(request.param)))
    return request.param, results, resized(digits, (32, 32), 3), expected


def test_every_format_is_verified_or_fails_with_a_reason(foreign):
    name, results, _, _ = foreign
    assert set(results) == set(FORMATS_OF.get(name, EXPORT_ALL))
    assert {k for k, r in results.items() if r.passed} == MUST_PASS[name], {k: r.message for k, r in results.items()}
    for key, result in results.items():
        assert result.passed or result.message.startswith(f"{key}: "), (name, key, result.message)
    assert {k: r.rule for k, r in results.items() if not r.passed} == FAILED_RULE[name]


def test_softmax_outputs_are_recorded_and_not_normalized_again(foreign):
    name, results, data, expected = foreign
    pixels = data.x_test[:5]
    for key, result in results.items():
        if not result.passed:
            continue
        runtime_model = load(result.file)
        assert runtime_model.output_kind == "probabilities", (name, key)
        probabilities = runtime_model.predict(pixels)  # a batch of 5 through the runtime, as on the device
        assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=0.02), (name, key)
        if EXPORT_ALL[key].kind == "float":
            assert np.allclose(probabilities, expected, atol=1e-4), (name, key)


def _softmax_forms(directory: str) -> dict:
    """Three tiny models whose softmax sits where a user's model puts it, trained 4 epochs on 1,024 digits, saved and
    exported to float32, int8 and onnx-float32 (in a subprocess): {form: (export results, the Keras model's
    outputs on the first 5 test images)}."""
    from runtime.datasets import load_dataset
    from train.backend import keras
    from train.trainer import seed_everything

    seed_everything(0)

    def trunk():
        inputs = keras.Input((28, 28, 1))
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
        return inputs, keras.layers.Flatten()(x)

    inputs, x = trunk()
    inner = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(10)(x)), name="inner")
    outer_in = keras.Input((28, 28, 1))
    wrapped = keras.Model(outer_in, inner(keras.layers.Rescaling(1.0)(outer_in)), name="wrapper")
    inputs, x = trunk()
    activation = keras.Model(inputs, keras.layers.Activation("softmax")(keras.layers.Dense(10)(x)))
    inputs, x = trunk()
    head = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Dense(10, activation="softmax")], name="head")
    sequential = keras.Model(inputs, head(x))
    data = load_dataset("digits")
    x_train, y_train = data.arrays("train")
    out = {}
    for form, model in {"nested wrapper": wrapped, "Activation('softmax')": activation,
                        "nested Sequential head": sequential}.items():
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        model.fit(x_train[:1024], y_train[:1024], epochs=4, batch_size=64, verbose=0)
        path = Path(directory) / f"{len(out)}.keras"
        model.save(path)
        results = export(path, ["float32", "int8", "onnx-float32"], Path(directory) / f"out{len(out)}",
                         dataset="digits", calibration_samples=32, progress=None)
        out[form] = ({r.format: r for r in results}, model.predict(data.arrays("test")[0][:5], verbose=0))
    return out


def test_softmax_is_found_where_it_is_and_never_applied_twice(tmp_path, digits):
    """A wrapper around a model ending in Softmax (issue 38: recorded as logits, so every runtime applied softmax
    again), an Activation('softmax'), a nested Sequential head with activation='softmax': each file's sidecar says
    probabilities, and the runtime gives the Keras model's own probabilities (float files within 1e-4); the same
    file without its sidecar is read as probabilities from its graph (TFLite's SOFTMAX, through int8's QUANTIZE;
    ONNX's Softmax)."""
    for form, (results, expected) in in_subprocess(_softmax_forms, str(tmp_path)).items():
        for key, result in results.items():
            assert result.passed, (form, key, result.message)
            model = load(result.file)
            assert model.sidecar["output"]["kind"] == "probabilities" and model.output_kind == "probabilities"
            got = model.predict(digits.x_test[:5])
            tolerance = 1e-4 if key != "int8" else 0.02
            assert np.allclose(got, expected, atol=tolerance), (form, key, np.abs(got - expected).max())
            bare = tmp_path / f"bare-{len(form)}-{result.file.name}"  # no sidecar: the graph's final op says it
            bare.write_bytes(result.file.read_bytes())
            assert load(bare, mean=(0,), std=(255,)).output_kind == "probabilities", (form, key)


def _raw_pixel_model(path: str) -> list:
    """A Keras model that takes raw 0..255 pixels (a Rescaling(1/255) inside, as MLPerf Tiny's and many published
    models do), trained 4 epochs on 1,024 digits and saved as .h5; its probabilities on the first 5 test images."""
    from runtime.datasets import load_dataset
    from train.backend import keras
    from train.trainer import seed_everything

    seed_everything(0)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    data = load_dataset("digits")
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(data.x_train[:1024].astype("float32"), data.y_train[:1024], epochs=4, batch_size=64, verbose=0)
    model.save(path)
    return model.predict(data.x_test[:5].astype("float32"), verbose=0).tolist()


def test_a_keras_file_takes_its_own_preprocessing_and_a_broken_reference_is_refused(tmp_path, digits):
    """Issue 38: a Keras file that takes raw pixels was fed the dataset's 0..1 scaling and a chance-level int8 file
    was 'verified' against a chance-level Keras reference. Now --mean/--std say how pixels become its input, and
    without them export refuses the source in one line that names the preprocessing."""
    path = tmp_path / "raw.h5"
    expected = np.array(in_subprocess(_raw_pixel_model, str(path)))
    refused = run_module("export", "--tflite", "--quantize", "int8", str(path), "--dataset", "digits")
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1, refused.stderr[-2000:]
    assert "under twice chance (1/10)" in refused.stderr and "0..255 to 0..1" in refused.stderr
    assert "pass --mean and --std" in refused.stderr and not (tmp_path / "raw-export").exists()
    done = run_module("export", "--tflite", "--quantize", "int8", str(path), "--dataset", "digits", "--mean", "0",
                      "--std", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    model = load(tmp_path / "raw-export" / "model.int8.tflite")
    assert model.sidecar["preprocessing"]["scale"] == 1.0 and model.sidecar["preprocessing"]["mean"] == [0.0]
    assert model.sidecar["verification"]["accuracy"] > 0.8
    assert np.array_equal(model.predict(digits.x_test[:5]).argmax(axis=1), expected.argmax(axis=1))
    for wrong, message in ((["--layout", "nchw"], "a Keras model takes channels-last"),):
        bad = run_module("export", "--tflite", str(path), "--dataset", "digits", *wrong)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]


def _nested_raw_model(path: str) -> None:
    """A wrapper (Rescaling(1/255) on raw 0..255 pixels) around an inner model that ends in Softmax, with an L2
    regularizer inside, trained 5 epochs on the digits training split and saved as .h5 by plain Keras."""
    from runtime.datasets import load_dataset
    from train.backend import keras
    from train.trainer import seed_everything

    seed_everything(0)
    data = load_dataset("digits")
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4))(inputs)
    inner = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(10)(keras.layers.Flatten()(x))),
                        name="inner")
    outer = keras.Input((28, 28, 1))
    wrapper = keras.Model(outer, inner(keras.layers.Rescaling(1 / 255)(outer)), name="wrapper")
    wrapper.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    wrapper.fit(data.x_train.astype("float32"), data.y_train, epochs=5, batch_size=64, verbose=0)
    wrapper.save(path)


def test_a_nested_keras_file_goes_through_every_stage(tmp_path, digits):
    """Issue 38: optimize refused every foreign Keras model, and a nested one ending in Softmax was taken for logits.
    `pipeline --from` imports it (nested models flattened: the inner Conv2D and Dense are pruned, clustered and
    quantization-aware trained; its regularizer kept), derives pruned80 and qat, exports every format and the
    micro file, each verified, and reports; `optimize prune MODEL.h5` works on the file too, reusing the import."""
    import json

    source = tmp_path / "nested.h5"
    in_subprocess(_nested_raw_model, str(source))
    formats = "float32,float16,dynamic,int8,int16x8,onnx-float32,onnx-int8"
    done = run_module("pipeline", "--from", str(source), "--dataset", "digits", "--mean", "0", "--std", "1",
                      "--quick", "--formats", formats, "--target", "micro", "--no-bench", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    base = json.loads((run / "nested" / "manifest.json").read_text())
    assert base["kind"] == "imported" and base["source"]["nested_models_flattened"]
    import zipfile

    with zipfile.ZipFile(run / "nested" / "model.keras") as saved:  # one graph, the inner regularizer kept
        config = json.loads(saved.read("config.json"))
    layers = config["config"]["layers"]
    assert not any(layer["class_name"] in ("Functional", "Sequential") for layer in layers)
    assert any((layer["config"].get("kernel_regularizer") or {}).get("class_name") == "L2" for layer in layers)
    assert base["metrics"]["accuracy"] > 0.85 and base["preprocessing"]["scale"] == 1.0
    report = json.loads((run / "report.json").read_text())
    rows = {(r["variant"], r["format"]): r for r in report["rows"]}
    assert {v for v, _ in rows} == {"base", "pruned80", "qat"}
    assert len(rows) == 7 + 7 + 2 and all(r["status"] == "verified" for r in rows.values()), \
        [(k, r.get("reason")) for k, r in rows.items() if r["status"] != "verified"]
    pruned = json.loads((run / "nested-pruned80" / "manifest.json").read_text())
    assert pruned["metrics"]["sparsity"] > 0.7  # the inner model's kernels were pruned
    header = (run / "nested" / "model.micro.h").read_text()
    assert "g_model_output_is_probabilities = true" in header  # the inner Softmax, found through the wrapper
    # --target micro: the answer is the micro file with the smallest arena, and deploy/ holds its C sources and a
    # main.cc carrying the first test image with the class EdgeKit's TFLM run gives it (scripts/check-micro-firmware
    # builds and runs it against TFLM)
    check_micro_answer(run, report, digits)
    sidecar = json.loads((run / "nested" / "model.int8.json").read_text())
    assert sidecar["output"]["kind"] == "probabilities"
    pruned_again = run_module("optimize", "prune", str(source), "--dataset", "digits", "--mean", "0", "--std", "1",
                              "--epochs", "1", "--out", str(tmp_path / "alone" / "pruned"))
    assert pruned_again.returncode == 0, pruned_again.stderr[-2000:]
    assert "imported as" in pruned_again.stdout and (tmp_path / "alone" / "nested" / "manifest.json").is_file()
    again = run_module("optimize", "cluster", str(source), "--dataset", "digits", "--mean", "0", "--std", "1",
                       "--epochs", "1", "--out", str(tmp_path / "alone" / "clustered"))
    assert again.returncode == 0 and "imported earlier" in again.stdout, again.stderr[-2000:]
    raw = run_module("optimize", "prune", str(source), "--dataset", "digits", "--out", str(tmp_path / "raw" / "p"))
    assert raw.returncode == 2 and "under twice chance" in raw.stderr  # fed 0..1: refused, preprocessing named


def _mlperf_resnet8(path: str) -> None:
    """MLPerf Tiny's image-classification ResNet-8 as its reference Keras script writes it (32x32x3 input taking raw
    0..255 pixels, 16/32/64 filters, L2(1e-4) kernels, 1x1 projection shortcuts, AveragePooling2D, Dense with
    softmax), trained 6 epochs on digits at 32x32x3 and saved as .h5 by plain Keras."""
    from runtime.datasets import load_dataset, resized
    from train.backend import keras
    from train.trainer import seed_everything

    seed_everything(0)
    layers, l2 = keras.layers, keras.regularizers.l2(1e-4)

    def conv(x, filters, strides=1, size=3):
        return layers.Conv2D(filters, size, strides=strides, padding="same", kernel_initializer="he_normal",
                             kernel_regularizer=l2)(x)

    inputs = keras.Input((32, 32, 3))
    x = layers.Activation("relu")(layers.BatchNormalization()(conv(inputs, 16)))
    for filters, strides in ((16, 1), (32, 2), (64, 2)):
        y = layers.Activation("relu")(layers.BatchNormalization()(conv(x, filters, strides)))
        y = layers.BatchNormalization()(conv(y, filters))
        if strides > 1:
            x = conv(x, filters, strides, size=1)
        x = layers.Activation("relu")(layers.add([x, y]))
    x = layers.Flatten()(layers.AveragePooling2D(pool_size=x.shape[1])(x))
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", kernel_initializer="he_normal")(x))
    data = resized(load_dataset("digits"), (32, 32), 3)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(data.x_train.astype("float32"), data.y_train, epochs=6, batch_size=32, verbose=0)
    model.save(path)


@pytest.mark.slow  # `python -m pytest -m slow` (README, Tests)
def test_mlperf_tinys_resnet8_h5_goes_through_the_pipeline(tmp_path):
    """A ResNet-8 in MLPerf Tiny's shape, written by a plain Keras script, raw-pixel input, ending in softmax, as
    .h5: `pipeline --from` imports it, prunes it and trains it quantization-aware, exports float32, int8 and micro
    files, each verified (the micro files in TFLM), and reports; printed: the figures the README states."""
    import json

    source = tmp_path / "resnet8.h5"
    in_subprocess(_mlperf_resnet8, str(source))
    done = run_module("pipeline", "--from", str(source), "--dataset", "digits", "--mean", "0", "--std", "1",
                      "--quick", "--target", "micro", "--no-bench", "--out", str(tmp_path / "run"), timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for row in report["rows"]:
        print(row["variant"], row["format"], row["status"], row.get("accuracy"), row.get("size_bytes"),
              row.get("arena_bytes"), row.get("test_images"))
    assert all(r["status"] == "verified" for r in report["rows"])
    micro = {r["variant"]: r for r in report["rows"] if r["format"] == "micro"}
    assert set(micro) == {"base", "pruned80", "qat"} and all(r["arena_bytes"] > 0 for r in micro.values())
    assert micro["base"]["accuracy"] > 0.75 and micro["qat"]["accuracy"] > 0.75
    # what --quick's 2 epochs of pruning do to it is the report's to judge: under budget, or never recommended
    assert all(r["accuracy"] > 0.75 or r["over_budget"] for r in report["rows"])


def _flatten_cases() -> list:
    """flatten() on a wrapper whose own layer has the name of a layer inside its sub-model, and on a plain model:
    (the flat model's layer names, its outputs equal the nested model's, the plain model returned as it is)."""
    from train.backend import keras
    from train.graph import flatten

    i = keras.Input((4,))
    inner = keras.Model(i, keras.layers.Dense(3, name="dense")(i), name="inner")
    o = keras.Input((4,))
    nested = keras.Model(o, keras.layers.Dense(2, name="dense")(inner(o)), name="outer")
    flat = flatten(nested)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
    same = bool(np.array_equal(nested.predict(x, verbose=0), flat.predict(x, verbose=0)))
    plain = keras.Model(i, keras.layers.Dense(2)(i))
    return [layer.name for layer in flat.layers], same, flatten(plain) is plain


def test_flatten_keeps_the_weights_and_makes_names_unique():
    names, same, untouched = in_subprocess(_flatten_cases)
    assert names[1:] == ["dense", "outer_dense"] and same and untouched
