"""Models that take channels-first input (PyTorch's NCHW, as most ONNX files from elsewhere): the layout is read
from the input's shape, images stay (H, W, C) for the caller, and every command gives bare onnxruntime's outputs
on the same preprocessed input, transposed (issue 26)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import run_module
from runtime.errors import EdgeKitError
from runtime.load import load

MEAN, STD = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)  # ImageNet's, in pixel units


def _nchw_onnx(model, path, opset=13):
    """A Keras model converted by tf2onnx with its input made channels first (inputs_as_nchw)."""
    import tf2onnx
    import tf2onnx.convert

    from train.backend import tf

    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, inputs_as_nchw=["input"])
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture(scope="module")
def nchw(exported, tmp_path_factory):
    """(the tiny digits CNN as an NCHW ONNX file, a 3-channel NCHW ONNX model, their directory)."""
    from train.backend import keras

    root = tmp_path_factory.mktemp("nchw")
    digits_model = keras.models.load_model(exported[0] / "model.keras", compile=False)
    inputs = keras.Input((20, 24, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    colour = keras.Model(inputs, keras.layers.Dense(5)(x))
    return _nchw_onnx(digits_model, root / "digits_nchw.onnx"), _nchw_onnx(colour, root / "colour_nchw.onnx"), root


def _bare(path, x_nchw):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x_nchw.astype(np.float32)})[0]


def test_the_layout_is_read_from_the_shape_and_outputs_equal_bare_onnxruntime(nchw, exported, digits):
    model = load(nchw[0], mean=0, std=255)
    assert model.layout == "nchw" and model.input_shape == (28, 28, 1) and list(model.input.shape[1:]) == [1, 28, 28]
    x = digits.x_test[:64]
    expected = _bare(nchw[0], x.transpose(0, 3, 1, 2) / 255)
    np.testing.assert_allclose(model.logits(x), expected, rtol=1e-5, atol=1e-5)
    for i in range(3):  # one image at a time takes the fast path; it is transposed too
        np.testing.assert_allclose(model.logits(x[i]), expected[i:i + 1], rtol=1e-5, atol=1e-5)
    nhwc = load(exported[0] / "model.onnx-float32.onnx")  # the same weights, channels last, EdgeKit's sidecar
    assert nhwc.layout == "nhwc"
    assert np.array_equal(model.predict(x).argmax(1), nhwc.predict(x).argmax(1))


def test_per_channel_mean_and_std_apply_on_the_channel_axis(nchw, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    model = load(nchw[1], mean=MEAN, std=STD)
    expected = _bare(nchw[1], ((pixels - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2))
    np.testing.assert_allclose(model.logits(pixels), expected, rtol=1e-4, atol=1e-5)
    Image.fromarray(pixels[0]).save(tmp_path / "p.png")
    result = run_module("runtime", "predict", str(nchw[1]), str(tmp_path / "p.png"), "--mean",
                        ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)), "--json", "--top-k", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    probabilities = json.loads(result.stdout)["predictions"][0]["probabilities"]
    e = np.exp(expected[0] - expected[0].max())
    np.testing.assert_allclose(probabilities, e / e.sum(), rtol=1e-4, atol=1e-6)
    result = run_module("runtime", "bench", str(nchw[1]), "--mean", ",".join(map(str, MEAN)), "--std",
                        ",".join(map(str, STD)), "--runs", "20", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["results"][0]["call_ms"]["median"] > 0


def test_eval_and_predict_on_a_channels_first_file(nchw, exported, digits, tmp_path):
    Image.fromarray(digits.x_test[0, ..., 0]).save(tmp_path / "d.png")
    result = run_module("runtime", "predict", str(nchw[0]), str(tmp_path / "d.png"), "--mean", "0", "--std", "255")
    assert result.returncode == 0 and result.stdout.split()[1] == str(digits.y_test[0]), result.stderr[-2000:]
    result = run_module("runtime", "eval", str(nchw[0]), "--dataset", "digits", "--mean", "0", "--std", "255",
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = json.loads(result.stdout)["accuracy"]
    recorded = json.loads((exported[0] / "model.onnx-float32.json").read_text())["verification"]["accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1 / len(digits.y_test))


def test_channels_first_arrays_get_the_transposition_and_ambiguous_shapes_need_layout(nchw, digits, tmp_path):
    model = load(nchw[0], mean=0, std=255)
    with pytest.raises(EdgeKitError, match=r"whatever its own \(NCHW\).*x.transpose\(0, 2, 3, 1\)"):
        model.predict(digits.x_test[:2].transpose(0, 3, 1, 2))
    np.save(tmp_path / "nchw.npy", digits.x_test[:2].transpose(0, 3, 1, 2))
    result = run_module("runtime", "predict", str(nchw[0]), str(tmp_path / "nchw.npy"), "--mean", "0", "--std", "255")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "transpose" in result.stderr
    with pytest.raises(EdgeKitError, match="layout takes nhwc or nchw"):
        load(nchw[0], layout="chw")
    from runtime.load import input_layout

    with pytest.raises(EdgeKitError, match="pass --layout nchw or --layout nhwc"):
        input_layout((1, 3, 3, 1), None, None, "m.onnx")
    assert input_layout((1, 3, 3, 1), "nhwc", None, "m.onnx") == "nhwc"
    assert input_layout((None, 3, 224, 224), None, None, "m.onnx") == "nchw"
    assert input_layout((None, 224, 224, 3), None, None, "m.onnx") == "nhwc"
