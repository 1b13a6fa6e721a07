"""Models from the field: .tflite and .onnx classifiers EdgeKit did not export, with no sidecar.

The fixture builds what a user downloads from a model zoo: a tf_keras.applications MobileNetV2 (weights=None)
ending in softmax, converted to a uint8-input, uint8-output TFLite file, a float TFLite file and an ONNX one,
with a labels.txt written as zoos write it ("0 matured"). Every answer is checked against feeding the resized
pixels by hand to LiteRT or onnxruntime.
"""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import in_subprocess, run_module
from runtime.load import load

SIZE = 96
LABELS = ["matured", "ripe", "unripe"]


def _convert(root: str) -> dict:
    """The zoo's model files (in a subprocess: conftest.in_subprocess): uint8 and float TFLite, ONNX, and the
    uint8 file with its labels packed."""
    import tf2onnx

    from train.backend import keras, tf

    root = Path(root)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, weights=None, classes=3,
                                           classifier_activation="softmax")
    kernel, bias = model.layers[-1].get_weights()  # untrained outputs are near 1/3 each: make them differ
    model.layers[-1].set_weights([kernel * 40, bias + np.array([1.0, 0.0, -1.0], np.float32)])
    rng = np.random.default_rng(0)

    def representative():
        for _ in range(8):
            yield [rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    files = {"uint8": root / "mobilenet_v2_uint8.tflite", "float": root / "mobilenet_v2_float.tflite",
             "onnx": root / "mobilenet_v2.onnx", "packed": root / "mobilenet_v2_packed.tflite"}
    files["uint8"].write_bytes(converter.convert())
    files["float"].write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(files["onnx"]))
    # TFLite Support's MetadataPopulator packs associated files (the label file) as a zip appended to the model
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr("labels.txt", "\n".join(LABELS) + "\n")
    files["packed"].write_bytes(files["uint8"].read_bytes() + packed.getvalue())
    return files


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    files = in_subprocess(_convert, str(root))
    labels = root / "labels.txt"
    labels.write_text("".join(f"{i} {name}\n" for i, name in enumerate(LABELS)))
    photos = root / "photos"
    for k, name in enumerate(LABELS):  # a folder dataset: class folders named after the labels, 3 images each
        (photos / name).mkdir(parents=True)
        for j in range(3):
            _photo(photos / name / f"{j}.jpg", (120 + 10 * j, 150), seed=10 * k + j)
    photo = _photo(root / "photo.jpg", (150, 110), seed=99)
    return {**files, "labels": labels, "photo": photo, "photos": photos}


def _photo(path, size, seed):
    """A smooth colour JPEG of another size than the model's."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    channels = [127 + 120 * np.sin(xx / rng.uniform(5, 30) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 30))
                for _ in range(3)]
    Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8), "RGB").save(path, quality=95)
    return path


def _by_hand(path, size=SIZE):
    """What the TFLite and onnxruntime examples do: open, convert to RGB, resize bilinearly, as uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.uint8)[None]


def _litert(path, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    y = interpreter.get_tensor(out["index"])
    scale, zero = out["quantization"]
    return (y.astype(np.float32) - zero) * scale if scale else y


def _predict_json(*args):
    result = run_module("runtime", "predict", *map(str, args), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["predictions"][0]


def test_a_uint8_zoo_model_takes_the_pixels_and_names_its_classes(zoo):
    """predict on a JPEG of another size gives LiteRT's own answer on the resized pixels, with the labels
    by name, its softmax not applied twice, and the 8-bit probabilities summing to 1."""
    expected = _litert(zoo["uint8"], _by_hand(zoo["photo"]))[0]
    assert abs(expected.sum() - 1) < 0.03 and expected.max() > 0.5
    got = _predict_json(zoo["uint8"], zoo["photo"], "--labels", zoo["labels"])
    probabilities = np.array(got["probabilities"])
    assert got["top"][0]["label"] == LABELS[int(expected.argmax())]
    assert [t["label"] for t in got["top"]] == [LABELS[i] for i in np.argsort(-expected, kind="stable")]
    assert np.allclose(probabilities, expected / expected.sum(), atol=1e-6)  # the model's own, renormalized
    assert probabilities.sum() == pytest.approx(1, abs=1e-6)
    model = load(zoo["uint8"])
    assert model.output_kind == "probabilities" and model.preprocessing_source == "quantization"
    assert model.labels == ["0", "1", "2"]  # no labels anywhere: the indices


def test_labels_packed_in_the_tflite_metadata_are_used(zoo):
    assert load(zoo["packed"]).labels == LABELS
    got = _predict_json(zoo["packed"], zoo["photo"])
    assert got["top"][0]["label"] in LABELS


def test_a_float_zoo_model_needs_mean_and_std_and_then_matches_litert_and_onnxruntime(zoo):
    import onnxruntime as ort

    refused = run_module("runtime", "predict", str(zoo["float"]), str(zoo["photo"]))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "takes float32 input and has no sidecar" in refused.stderr and "--mean and --std" in refused.stderr
    x = (_by_hand(zoo["photo"]).astype(np.float32) - 127.5) / 127.5  # MobileNetV2's [-1, 1]
    expected = _litert(zoo["float"], x)[0]
    got = _predict_json(zoo["float"], zoo["photo"], "--mean", "127.5", "--std", "127.5", "--labels", zoo["labels"])
    assert np.allclose(got["probabilities"], expected, atol=1e-5)
    assert got["top"][0]["label"] == LABELS[int(expected.argmax())]
    session = ort.InferenceSession(str(zoo["onnx"]), providers=["CPUExecutionProvider"])
    by_ort = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    assert load(zoo["onnx"]).output_kind == "probabilities"  # Softmax read from the ONNX graph
    got = _predict_json(zoo["onnx"], zoo["photo"], "--mean", "127.5", "--std", "127.5")
    assert np.allclose(got["probabilities"], by_ort, atol=1e-5)
    nearest = load(zoo["float"], mean=127.5, std=127.5, resize="nearest")
    assert nearest.preprocessing.resize == "nearest" and nearest.preprocessing_source == "options"


def test_eval_on_a_folder_matches_classes_by_label_name(zoo):
    result = run_module("runtime", "eval", str(zoo["uint8"]), "--dataset", f"folder:{zoo['photos']}",
                        "--labels", str(zoo["labels"]), "--split", "all", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    correct = [int(_litert(zoo["uint8"], _by_hand(path)).argmax() == k)
               for k, name in enumerate(LABELS) for path in sorted((zoo["photos"] / name).iterdir())]
    assert summary["samples"] == 9 and summary["labels"] == LABELS
    assert summary["accuracy"] == pytest.approx(np.mean(correct))
    by_order = run_module("runtime", "eval", str(zoo["uint8"]), "--dataset", f"folder:{zoo['photos']}", "--split",
                          "all", "--json")  # no labels: 3 classes for 3 outputs, matched in order
    assert by_order.returncode == 0 and json.loads(by_order.stdout)["accuracy"] == summary["accuracy"]
    wrong = zoo["labels"].parent / "wrong.txt"
    wrong.write_text("apple\npear\nplum\n")
    refused = run_module("runtime", "eval", str(zoo["uint8"]), "--dataset", f"folder:{zoo['photos']}",
                         "--labels", str(wrong), "--split", "all")
    assert refused.returncode == 2 and "are not among mobilenet_v2_uint8.tflite's labels" in refused.stderr


@pytest.mark.parametrize("text, message", [
    ("0 a\n2 b\n1 c\n", "leading indices run [0, 2, 1]"),
    ("a\nb\n", "gives 2 labels, but mobilenet_v2_uint8.tflite has 3 outputs"),
    (b"\xff\xfe\x00bad", "is not UTF-8 text"),
])
def test_bad_labels_files_get_one_clear_line(zoo, tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = run_module("runtime", "predict", str(zoo["uint8"]), str(zoo["photo"]), "--labels", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
