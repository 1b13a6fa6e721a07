"""The TensorFlow-free runtime: parity with Keras through the user-facing calls, every bad
input named in the issue, fixed-batch models, and the predict / eval / bench commands
(which must load no TensorFlow module)."""

import importlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_module
from runtime.errors import EdgeKitError
from runtime.fsutil import sha256_file
from runtime.load import load, softmax

LOAD = importlib.import_module("runtime.load")  # the module (`runtime.load` the attribute is its function)
TENSORS = importlib.import_module("runtime.backends.tensors")  # KERNELS: the compiled kernels, None to take numpy's path
FLOAT_TOLERANCE = 1e-4  # probabilities of float models vs Keras
INT8_MIN_AGREEMENT = 0.99  # top-1 agreement of int8 models with Keras
INT8_MAX_DROP = 0.01  # accuracy of int8 models vs Keras

FLOAT_FILES = ("model.float32.tflite", "model.onnx-float32.onnx")
INT8_FILES = ("model.int8.tflite", "model.onnx-int8.onnx")
HEAVY = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "tf2onnx", "keras")


def _expect(message, fn, *args, **kwargs):
    with pytest.raises(EdgeKitError) as info:
        fn(*args, **kwargs)
    assert message in str(info.value), str(info.value)
    return str(info.value)


def _compiled_kernels():
    """runtime.backends.kernels, which the install builds where there is a C compiler (the test command needs one)."""
    assert TENSORS.KERNELS is not None, "runtime.backends.kernels is not built: reinstall with a C compiler and headers"
    return TENSORS.KERNELS


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """A test run with the compiled one-pass kernels (runtime/backends/kernels.c, which the install builds) and again
    with numpy doing their work, as on an install without a C compiler."""
    if request.param == "compiled":
        _compiled_kernels()
    else:
        monkeypatch.setattr(TENSORS, "KERNELS", None)
    return request.param


# --- parity with Keras, through predict() on raw pixels --------------------------------------

@pytest.mark.parametrize("name", FLOAT_FILES)
def test_float_models_give_keras_probabilities_from_pixels(exported, keras_reference, digits, name):
    artifact, _ = exported
    _, y, logits = keras_reference
    probabilities = load(artifact / name).predict(digits.x_test)  # uint8 pixels, preprocessed by the runtime
    assert probabilities.shape == (len(y), 10)
    assert np.max(np.abs(probabilities - softmax(logits.astype(np.float32)))) <= FLOAT_TOLERANCE


@pytest.mark.parametrize("name", INT8_FILES)
def test_int8_models_agree_with_keras_and_keep_its_accuracy(exported, keras_reference, digits, name):
    artifact, _ = exported
    _, y, logits = keras_reference
    model = load(artifact / name)
    probabilities = model.predict(digits.x_test)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(probabilities.argmax(1) == logits.argmax(1)) >= INT8_MIN_AGREEMENT
    assert np.mean(probabilities.argmax(1) == y) >= np.mean(logits.argmax(1) == y) - INT8_MAX_DROP


def test_int8_tflite_quantizes_input_and_dequantizes_output(exported, digits):
    model = load(exported[0] / "model.int8.tflite")
    assert model.input.dtype == "int8" and model.input.scale > 0 and model.output.dtype == "int8"
    x, _ = digits.arrays("test")
    # pixels (table lookup) and preprocessed float input (arithmetic) give the very same logits
    assert np.array_equal(model.logits(digits.x_test), model.logits(x))
    assert np.allclose(model.predict(x), softmax(model.logits(x)), atol=1e-6)


@pytest.mark.parametrize("name", FLOAT_FILES + INT8_FILES)
def test_a_batch_equals_single_images_and_batch_size_does_not_matter(exported, digits, name, kernels):
    model = load(exported[0] / name, threads=1)
    pixels = digits.x_test[:7]
    batch = model.predict(pixels, batch_size=3)  # 3 + 3 + 1
    singles = np.concatenate([model.predict(p) for p in pixels])  # one (H, W, C) image at a time
    assert np.allclose(batch, singles, atol=1e-6)
    floats = model.prepare(pixels)
    for i in range(len(pixels)):  # a batch of one, pixels or float, takes the short path: the same answer
        assert np.allclose(model.predict(pixels[i:i + 1]), batch[i:i + 1], atol=1e-6)
        assert np.allclose(model.predict(floats[i:i + 1]), batch[i:i + 1], atol=1e-6)
    assert np.allclose(model.predict(pixels[:, :, :, 0]), batch, atol=1e-6)  # (N, H, W) grayscale


def test_top_k_and_labels(exported, digits):
    model = load(exported[0] / "model.float32.tflite")
    probabilities = model.predict(digits.x_test[:2])
    top = model.top_k(probabilities, k=3)
    assert len(top) == 2 and len(top[0]) == 3
    assert top[0][0] == (model.labels[int(probabilities[0].argmax())], pytest.approx(float(probabilities[0].max())))
    assert top[0][0][1] >= top[0][1][1] >= top[0][2][1]


# --- bad model files and sidecars ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_bad_model_files_get_clear_errors(exported, tmp_path, suffix):
    source = exported[0] / ("model.float32.tflite" if suffix == ".tflite" else "model.onnx-float32.onnx")
    data = source.read_bytes()
    _expect("does not exist", load, tmp_path / f"missing{suffix}")
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    _expect("is empty", load, tmp_path / f"empty{suffix}")
    (tmp_path / f"truncated{suffix}").write_bytes(data[: len(data) // 2])
    _expect("is not a valid", load, tmp_path / f"truncated{suffix}")
    (tmp_path / f"garbage{suffix}").write_bytes(np.random.default_rng(0).bytes(5000))
    _expect("is not a valid", load, tmp_path / f"garbage{suffix}")
    _expect("expected a .tflite or .onnx model file; got '.pb'", load, tmp_path / "model.pb")
    _expect("threads takes a whole number from 1 to", load, source, threads=0)
    _expect("(the cores this process may use", load, source, threads=10**6)  # a million crashed LiteRT


def _copy_with_sidecar(exported, tmp_path, name="model.int8.tflite"):
    model_file = tmp_path / name
    shutil.copy(exported[0] / name, model_file)
    shutil.copy((exported[0] / name).with_suffix(".json"), model_file.with_suffix(".json"))
    return model_file


def test_a_model_changed_after_export_does_not_match_its_sidecar(exported, tmp_path):
    model_file = _copy_with_sidecar(exported, tmp_path)
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: the interpreter would not notice
    model_file.write_bytes(bytes(data))
    _expect("does not match", load, model_file)
    model_file.write_bytes(bytes(data[:-10]))
    _expect("truncated", load, model_file)


def test_a_sidecar_of_another_model_is_refused(exported, tmp_path):
    model_file = tmp_path / "model.int8.tflite"
    shutil.copy(exported[0] / "model.int8.tflite", model_file)
    sidecar = json.loads((exported[0] / "model.int8.json").read_text())
    model_file.with_suffix(".json").write_text(json.dumps({**sidecar, "labels": ["a", "b", "c"]}))
    _expect("lists 3 labels, but model.int8.tflite has 10 outputs", load, model_file)
    model_file.with_suffix(".json").write_text(json.dumps({**sidecar, "input": {**sidecar["input"], "shape": [-1, 32, 32, 3]}}))
    _expect("describes input [32, 32, 3]", load, model_file)
    pre = {**sidecar["preprocessing"], "size": [20, 20]}
    model_file.with_suffix(".json").write_text(json.dumps({**sidecar, "preprocessing": pre}))
    _expect("preprocesses to [20, 20, 1]", load, model_file)
    model_file.with_suffix(".json").write_text("{not json")
    _expect("is not valid JSON", load, model_file)


# --- bad input arrays ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.int8.tflite", "model.onnx-float32.onnx"])
def test_bad_input_arrays_get_clear_errors(exported, digits, name):
    model = load(exported[0] / name)
    x, _ = digits.arrays("test")
    x = x[:2]
    _expect("takes 28x28 images; got 20x28", model.predict, x[:, :20])
    _expect("takes 1 channel(s) (grayscale); got 3", model.predict, np.repeat(x, 3, axis=-1))
    _expect("got an array of int64", model.predict, x.astype(np.int64))
    _expect("got an array of bool", model.predict, x > 0)
    _expect("got an array of shape [2, 2, 28, 28, 1]", model.predict, np.stack([x, x]))
    nan = x.copy()
    nan[1, 3, 4, 0] = np.nan
    _expect("1 NaN and 0 infinite value(s) (first in image 1)", model.predict, nan)
    _expect("1 NaN and 0 infinite value(s) (first in image 0)", model.predict, nan[1:])  # one image: short path
    _expect("ranges over", model.predict, x[:1] * 255)
    inf = x.copy()
    inf[0, 0, 0, 0] = np.inf
    _expect("0 NaN and 1 infinite", model.logits, inf)
    assert model.predict(x.astype(np.float64)).shape == (2, 10)  # float64 is converted, not refused


def test_int8_float_input_is_quantized_exactly_as_pixels_are(exported, digits, kernels):
    """Float input to an int8 model is checked and quantized in one pass; it must give the bits that the
    pixel path (a lookup table of quantized preprocessing) gives, in one call, in chunks and saturated."""
    model = load(exported[0] / "model.int8.tflite")
    pixels = digits.x_test[:5]
    floats = model.prepare(pixels)
    assert floats.dtype == np.float32
    for n in (1, 5):
        assert np.array_equal(model.logits(floats[:n]), model.logits(pixels[:n]))
    assert np.array_equal(model.logits(floats, batch_size=2), model.logits(pixels))
    low, high, slack = model.float_range()
    edge = floats.copy()
    edge[0, 0, 0, 0], edge[1, 0, 0, 0] = low - slack / 2, high + slack / 2  # beyond int8, inside the window
    clipped = np.clip(edge, low, high)
    assert np.array_equal(model.logits(edge), model.logits(clipped))
    nan = floats.copy()
    nan[3, 5, 5, 0] = np.nan
    _expect("(first in image 3)", model.logits, nan, batch_size=2)
    _expect("ranges over", model.predict, floats * 255)


def test_float_input_is_quantized_by_definition_at_every_step_and_edge(exported, kernels):
    """What the int8 interpreter is fed for float input: round(x / scale) half to even, plus the zero point,
    saturated (ONNX's QuantizeLinear), at every half step of the window (ties included), a float32 step
    either side of them, and for one image as for a batch; a value one float32 step outside the window is
    refused, one inside it saturates."""
    model = load(exported[0] / "model.int8.tflite")
    info, image = model.input, int(np.prod(model.input_shape))
    scale = np.float32(info.scale)
    low, high, slack = model.float_range()
    window = [np.float32(low - slack), np.float32(high + slack)]  # the float32 values at the window's ends
    window[0] += np.float32(0) if window[0] >= low - slack else np.spacing(window[0])
    window[1] -= np.float32(0) if window[1] <= high + slack else np.spacing(window[1])
    half_steps = np.arange(np.ceil(window[0] / scale) - 1, np.floor(window[1] / scale) + 1, 0.5)
    x = (half_steps * np.float64(scale)).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(-np.inf)), np.nextafter(x, np.float32(np.inf))])
    x = x[(x >= window[0]) & (x <= window[1])]
    assert (np.divide(x, scale) % 1 == 0.5).sum() > 500  # exact ties are among them
    expected = np.clip(np.rint(np.divide(x, scale)) + info.zero_point, -128, 127).astype(np.int8)
    # an image holding a value within two steps of the window's ends is all quantized the slow way: these
    # images hold the values well inside (the table's), those the values near the ends
    inside = (x > window[0] + 2 * scale) & (x < window[1] - 2 * scale)
    for part in (inside, ~inside):
        images = np.resize(x[part], (-(-part.sum() // image), *model.input_shape))  # the tail repeated
        fed = model._quantize_checked(images)
        assert fed.dtype == np.int8 and np.array_equal(fed.reshape(-1)[: part.sum()], expected[part])
        for i in range(len(images)):  # one image at a time: the buffered path
            assert np.array_equal(model._quantize_checked(images[i:i + 1]), fed[i:i + 1])
    one = images[:1].copy()
    for value, refused in ((window[0], False), (window[1], False), (np.nextafter(window[0], -np.inf), True),
                           (np.nextafter(window[1], np.inf), True), (np.float32(1e30), True), (-np.inf, True),
                           (np.nan, True)):
        one[0, 0, 0, 0] = value
        if refused:
            _expect("float input ranges over" if np.isfinite(value) else "NaN and", model.predict, one)
        else:
            assert model._quantize_checked(one)[0, 0, 0, 0] == (-128 if value < 0 else 127)
            assert model.predict(one).shape == (1, 10)


def test_the_compiled_kernels_give_the_numpy_paths_bits_and_each_call_its_own_array(exported, digits, monkeypatch):
    """What a user gets from one image does not depend on whether the install built runtime.backends.kernels: the same
    quantized input, logits and probabilities to the bit, for float input and pixels; and a result is the
    caller's own (the kernels work in buffers kept by the model: the next call must not change it)."""
    _compiled_kernels()
    path = exported[0] / "model.int8.tflite"
    floats = load(path).prepare(digits.x_test[:20])
    floats[3] = np.nextafter(floats[3], np.float32(1))  # values a float32 step off the pixels' own
    floats[4, 0, 0, 0] = floats.max() + 0.1  # saturates: the slow path, from either
    strided = np.ascontiguousarray(floats[5, ::-1])[None, ::-1]  # the same image, laid out backwards
    assert not strided.flags.c_contiguous and np.array_equal(strided, floats[5:6])
    results = {}
    for name in ("compiled", "numpy"):
        if name == "numpy":
            monkeypatch.setattr(TENSORS, "KERNELS", None)
        model = load(path, threads=1)
        results[name] = [np.concatenate([call(x[i:i + 1]) for i in range(len(x))])
                         for call in (model.predict, model.logits) for x in (floats, digits.x_test[:20])]
        results[name] += [model.predict(strided), model._quantize_checked(floats[:1]).copy()]
        first = model.predict(floats[:1])
        kept = first.copy()
        model.predict(floats[1:2])
        assert np.array_equal(first, kept)
    for compiled, numpy_path in zip(results["compiled"], results["numpy"]):
        assert compiled.dtype == numpy_path.dtype and np.array_equal(compiled, numpy_path)
    assert np.array_equal(results["compiled"][4], results["compiled"][0][5:6])


def test_the_compiled_kernels_check_their_arguments():
    """runtime.backends.kernels reads and writes raw memory: a wrong argument is an exception or a refusal, never a
    read or write out of bounds."""
    kernels = _compiled_kernels()
    constants = np.array([0.5, -10, 10, 3, -128, 127], np.float32)
    x, out = np.array([0.25, -0.25, 0.75, 4.9], np.float32), np.empty(4, np.int8)
    assert kernels.quantize(constants, x, out) and out.tolist() == [3, 3, 5, 13]  # half to even, + zero point
    assert not kernels.quantize(constants, np.array([0, 5.5, 0, 0], np.float32), out)  # 11: past `last`
    assert not kernels.quantize(constants, np.array([0, np.nan, 0, 0], np.float32), out)
    assert not kernels.quantize(constants, x.astype(np.float64), out)  # not float32: the caller's slow path
    assert not kernels.quantize(constants, np.repeat(x, 2)[::2], out)  # not contiguous
    for args, error in (((constants[:5], x, out), ValueError), ((constants, x, out[:3]), ValueError),
                        ((constants, x, out.astype(np.int16)), TypeError), ((constants, x, b"abcd"), BufferError),
                        ((constants, x), TypeError), ((constants.astype(np.float64), x, out), TypeError)):
        with pytest.raises(error):
            kernels.quantize(*args)
    table = np.arange(256, dtype=np.float32)
    probabilities = np.empty(3, np.float32)
    assert kernels.softmax(table, np.array([1, 2, -1], np.int8), probabilities)  # -1 is byte 255
    assert probabilities.tolist() == [np.float32(1 / 258), np.float32(2 / 258), np.float32(255 / 258)]
    assert not kernels.softmax(table, np.zeros(6, np.int8)[::2], probabilities)  # not contiguous
    assert not kernels.softmax(table, np.zeros(3, np.int16), probabilities)  # not 8-bit
    for args, error in (((table[:255], np.zeros(3, np.int8), probabilities), ValueError),
                        ((table, np.zeros(4, np.int8), probabilities), ValueError),
                        ((table, np.zeros(3, np.int8), probabilities.astype(np.float64)), TypeError)):
        with pytest.raises(error):
            kernels.softmax(*args)
    shifted = (np.arange(256) - 128).astype(np.int8)
    fed = np.empty(3, np.int8)
    assert kernels.lookup(shifted, np.array([0, 128, 255], np.uint8), fed) and fed.tolist() == [-128, 0, 127]
    assert not kernels.lookup(shifted, np.array([0, 1, 2], np.int8), fed)  # pixels are uint8
    for args, error in (((shifted[:200], np.zeros(3, np.uint8), fed), ValueError),
                        ((shifted, np.zeros(4, np.uint8), fed), ValueError)):
        with pytest.raises(error):
            kernels.lookup(*args)
    read_only = np.empty(3, np.int8)
    read_only.flags.writeable = False
    with pytest.raises((BufferError, ValueError, TypeError)):
        kernels.lookup(shifted, np.zeros(3, np.uint8), read_only)


def test_the_float_kernels_give_the_lookup_in_either_layout_and_a_softmax(monkeypatch):
    """pixels: one image's uint8 pixels into float input, channels last or first (planar), one table or one column
    per channel; softmax_float: within 1 ulp of numpy's softmax, refusing a non-finite logit."""
    kernels = _compiled_kernels()
    image = np.random.default_rng(3).integers(0, 256, (1, 5, 4, 3), dtype=np.uint8)
    table = ((np.arange(256, dtype=np.float32)[:, None] - [10, 20, 30]) / [2, 4, 8]).astype(np.float32)
    want = table[image, np.arange(3)]  # (1, 5, 4, 3): each channel by its column
    out = np.empty((1, 3, 5, 4), np.float32)
    assert kernels.pixels(np.ascontiguousarray(table), image, out, 3, True)
    assert np.array_equal(out, want.transpose(0, 3, 1, 2))
    last = np.empty((1, 5, 4, 3), np.float32)
    assert kernels.pixels(table[:, 0].copy(), image, last, 3, False) and np.array_equal(last, table[image, 0])
    assert not kernels.pixels(table[:, 0].copy(), image.astype(np.int8), last, 3, False)  # not uint8 pixels
    for args, error in (((table[:200, 0].copy(), image, last, 3, False), ValueError),  # a short table
                        ((table[:, 0].copy(), image, last[:, :2], 3, False), ValueError),  # out too short
                        ((table[:, 0].copy(), image, last, 5, False), ValueError),
                        ((table[:, 0].copy(), image, last.astype(np.float64), 3, False), TypeError)):
        with pytest.raises(error):
            kernels.pixels(*args)
    logits = np.array([[3.5, -1.25, 80.0, 0.0, 79.9]], np.float32)
    probabilities = np.empty_like(logits)
    assert kernels.softmax_float(logits, probabilities)
    expected = LOAD.softmax(logits.copy())
    assert np.all(np.abs(probabilities - expected) <= np.spacing(expected))
    assert not kernels.softmax_float(np.array([1, np.nan], np.float32), np.empty(2, np.float32))
    with pytest.raises(ValueError):
        kernels.softmax_float(logits, probabilities[:, :3])


def test_pixels_without_a_sidecar_need_float_input(exported, digits, tmp_path):
    bare = tmp_path / "bare.tflite"
    shutil.copy(exported[0] / "model.float32.tflite", bare)
    model = load(bare)
    assert model.labels == [str(i) for i in range(10)] and model.preprocessing is None
    _expect("bare.tflite takes float32 input and has no sidecar (bare.json) saying how pixels become it; pass "
            "--mean and --std", model.predict, digits.x_test[:1])
    x, _ = digits.arrays("test")
    assert model.predict(x[:1]).shape == (1, 10)
    told = load(bare, mean=0, std=255)  # digits' own preprocessing, pixels / 255, told in pixel units
    assert np.allclose(told.predict(digits.x_test[:5]), model.predict(x[:5]), atol=1e-6)


# --- fixed-batch models and per-channel preprocessing -------------------------------------------

@pytest.fixture(scope="session")
def fixed_batch_models(tmp_path_factory):
    """A linear classifier with batch 1 baked in: a resizable TFLite graph, one whose reshape pins
    the batch (so it must be looped), and the ONNX version; plus the weights for a numpy reference."""
    import tf2onnx

    from train.backend import tf

    rng = np.random.default_rng(0)
    w = rng.normal(size=(784, 10)).astype(np.float32)
    out = tmp_path_factory.mktemp("fixed")
    spec = [tf.TensorSpec([1, 28, 28, 1], tf.float32, name="input")]

    @tf.function(input_signature=spec)
    def pinned(x):
        return tf.matmul(tf.reshape(x, [1, 784]), w)  # the batch size is a constant of the graph

    @tf.function(input_signature=spec)
    def flexible(x):
        return tf.matmul(tf.reshape(x, [-1, 784]), w)

    files = {}
    for name, fn in (("pinned", pinned), ("flexible", flexible)):
        converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
        files[name] = out / f"{name}.tflite"
        files[name].write_bytes(converter.convert())
    files["onnx"] = out / "pinned.onnx"
    tf2onnx.convert.from_function(pinned, input_signature=spec, opset=17, output_path=str(files["onnx"]))
    return files, w


@pytest.mark.parametrize("kind", ["pinned", "flexible", "onnx"])
def test_fixed_batch_models_run_any_batch(fixed_batch_models, kind):
    files, w = fixed_batch_models
    model = load(files[kind])
    assert model.input.shape[0] == 1
    x = np.random.default_rng(1).normal(size=(5, 28, 28, 1)).astype(np.float32)
    assert np.allclose(model.logits(x), x.reshape(5, 784) @ w, atol=1e-3)
    for n in (1, 5, 1, 2, 1):  # one image after a batch, and a batch after one image, as the graph allows
        assert np.allclose(model.logits(x[:n]), x[:n].reshape(n, 784) @ w, atol=1e-3)


def test_per_channel_preprocessing_matches_the_float_path(tmp_path):
    from train.backend import tf

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 3], tf.float32)])
    def net(x):
        return tf.reshape(x, [-1, 48])[:, :5] * 2.0

    converter = tf.lite.TFLiteConverter.from_concrete_functions([net.get_concrete_function()], net)
    path = tmp_path / "rgb.tflite"
    path.write_bytes(converter.convert())
    pre = {"size": [4, 4], "channels": 3, "scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    path.with_suffix(".json").write_text(json.dumps({"preprocessing": pre, "labels": list("abcde"),
                                                     "sha256": sha256_file(path), "size_bytes": path.stat().st_size}))
    model = load(path)
    pixels = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    expected = (pixels / 255.0 - np.array(pre["mean"])) / np.array(pre["std"])
    assert np.allclose(model.logits(pixels), expected.reshape(3, 48)[:, :5] * 2, atol=1e-5)


# --- the commands ------------------------------------------------------------------------------------

def test_predict_command_on_images_and_arrays(exported, digits, tmp_path):
    artifact = exported[0]
    Image.fromarray(digits.x_test[0, :, :, 0]).resize((56, 56)).save(tmp_path / "digit.png")  # resized back
    np.save(tmp_path / "batch.npy", digits.x_test[:4])
    result = run_module("runtime", "predict", str(artifact / "model.int8.tflite"), str(tmp_path / "digit.png"),
                        str(tmp_path / "batch.npy"), "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["input"] for p in predictions] == [str(tmp_path / "digit.png")] + [
        f"{tmp_path / 'batch.npy'}[{i}]" for i in range(4)]
    expected = load(artifact / "model.int8.tflite").predict(digits.x_test[:4]).argmax(1)
    assert [p["top"][0]["index"] for p in predictions[1:]] == expected.tolist()
    assert all(len(p["top"]) == 2 and abs(sum(p["probabilities"]) - 1) < 1e-5 for p in predictions)
    assert predictions[0]["top"][0]["label"] == str(digits.y_test[0])
    text = run_module("runtime", "predict", str(artifact / "model.onnx-float32.onnx"), str(tmp_path / "digit.png"))
    assert text.returncode == 0 and text.stdout.split()[1] == str(digits.y_test[0])
    assert "warning" not in text.stderr and "XNNPACK" not in text.stderr  # no chatter, nothing unusual


def test_predict_warns_when_an_image_looks_inverted(exported, digits, tmp_path):
    """digits (like MNIST) are light strokes on a dark background. A black-on-white drawing "looks inverted" and
    names --invert, which answers it as the original; a white image is brighter than every training image; a
    correctly drawn light-on-dark digit with thin strokes, and a test image, get no warning."""
    from PIL import ImageDraw

    artifact = exported[0]
    index = next(i for i in range(len(digits.y_test)) if digits.y_test[i] == 7)
    Image.fromarray(255 - digits.x_test[index, :, :, 0]).save(tmp_path / "drawing.png")
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "white.png")
    thin = Image.new("L", (28, 28), 0)  # a "7" drawn with a 2-pixel pen, light on dark: drawn right
    ImageDraw.Draw(thin).line([(7, 6), (21, 6), (12, 23)], fill=255, width=2)
    thin.save(tmp_path / "thin7.png")
    Image.fromarray(digits.x_test[index, :, :, 0]).save(tmp_path / "test7.png")
    model = str(artifact / "model.int8.tflite")
    result = run_module("runtime", "predict", model, *(str(tmp_path / n) for n in
                                                       ("drawing.png", "white.png", "thin7.png", "test7.png")))
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert "drawing.png looks inverted: its background is light" in warnings[0] and "--invert" in warnings[0]
    assert "trained on light strokes on a dark background" in warnings[0]
    assert "white.png is brighter than every training image" in warnings[1]
    inverted = run_module("runtime", "predict", model, str(tmp_path / "drawing.png"), "--invert", "--json")
    assert inverted.returncode == 0 and "warning" not in inverted.stderr, inverted.stderr
    assert json.loads(inverted.stdout)["predictions"][0]["top"][0]["label"] == "7"
    stats = json.loads((artifact / "model.int8.json").read_text())["input_statistics"]
    assert 0.05 < stats["mean_intensity"]["mean"] < 0.4 and stats["background"]["p99"] < 0.5  # dark, all of them


@pytest.mark.parametrize("args, message", [
    (["predict", "{m}", "{tmp}/small.npy"], "small.npy: model.int8.tflite takes 28x28 images; got 8x8"),
    (["predict", "{m}", "{tmp}/fake.png"], "cannot read image"),
    (["predict", "{m}", "{tmp}/notes.txt"], "or a .npy file; got '.txt'"),
    (["predict", "{m}", "{tmp}/small.npy", "--top-k", "0"], "--top-k must be 1 or more"),
    (["predict", "{tmp}/none.tflite", "{tmp}/small.npy"], "does not exist"),
    (["eval", "{tmp}/copy.tflite"], "no --dataset given and no manifest.json next to"),
    (["eval", "{m}", "--dataset", "digitz"], "unknown dataset 'digitz'"),
    (["bench", "{m}", "--threads", "0"], "--threads takes a whole number from 1 to"),
    (["bench", "{m}", "--threads", "two"], "--threads takes thread counts"),
    (["bench", "{tmp}/empty"], "holds no .tflite or .onnx file"),
])
def test_command_errors_are_one_line_with_exit_code_2(exported, tmp_path, args, message):
    model = exported[0] / "model.int8.tflite"
    np.save(tmp_path / "small.npy", np.zeros((8, 8, 1), np.uint8))
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("hello")
    shutil.copy(model, tmp_path / "copy.tflite")
    (tmp_path / "empty").mkdir()
    argv = [a.format(m=model, tmp=tmp_path) for a in args]
    result = run_module("runtime", *argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_eval_command_reproduces_the_export_accuracy(exported):
    artifact, results = exported
    for name, key in (("model.int8.tflite", "int8"), ("model.onnx-float32.onnx", "onnx-float32")):
        result = run_module("runtime", "eval", str(artifact / name), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["dataset"] == "digits" and report["split"] == "test" and report["samples"] == 359
        assert report["accuracy"] == pytest.approx(results[key].figures["accuracy"])
        assert np.sum(report["confusion"]) == 359 and set(report["per_class_accuracy"]) == set("0123456789")
    text = run_module("runtime", "eval", str(artifact / "model.int8.tflite"), "--dataset", "digits")
    assert text.returncode == 0 and "accuracy" in text.stdout and "confusion" in text.stdout


def test_eval_of_a_float_file_without_a_sidecar_needs_its_preprocessing(exported, tmp_path):
    """A float file nothing describes, evaluated on --dataset, got the dataset's scaling silently (issue 38: a
    PyTorch file scored 28.12% instead of its 55.56%): refused as predict refuses it, until --mean/--std say; bench
    refuses pixels for it too, and times it on float input when asked."""
    import shutil

    artifact, results = exported
    shutil.copyfile(artifact / "model.float32.tflite", tmp_path / "model.tflite")
    refused = run_module("runtime", "eval", str(tmp_path / "model.tflite"), "--dataset", "digits")
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1 and "pass --mean and --std" in refused.stderr
    bench = run_module("runtime", "bench", str(tmp_path / "model.tflite"), "--runs", "2")  # pixels it cannot make
    assert bench.returncode == 2 and bench.stderr.count("error:") == 1 and "--input float" in bench.stderr, bench.stderr
    assert run_module("runtime", "bench", str(tmp_path / "model.tflite"), "--runs", "2", "--input", "float").returncode == 0
    done = run_module("runtime", "eval", str(tmp_path / "model.tflite"), "--dataset", "digits", "--mean", "0",
                      "--std", "255", "--json")  # the digits artifact's own scaling, 0..1
    assert done.returncode == 0 and json.loads(done.stdout)["accuracy"] == results["float32"].figures["accuracy"]


def test_eval_refuses_a_dataset_with_other_classes(exported, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((28, 28), i * 40, np.uint8)).save(tmp_path / "pets" / cls / f"{i}.png")
    result = run_module("runtime", "eval", str(exported[0] / "model.int8.tflite"),
                        "--dataset", f"folder:{tmp_path / 'pets'}")
    assert result.returncode == 2 and "has 2 classes, but model.int8.tflite has 10 outputs" in result.stderr


def test_bench_command_side_by_side(exported):
    artifact = exported[0]
    result = run_module("runtime", "bench", str(artifact / "model.float32.tflite"), str(artifact / "model.int8.tflite"),
                        "--runs", "20", "--warmup", "2", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert {"cpu", "cores", "versions"} <= set(printed["machine"]) and "ai-edge-litert" in printed["machine"]["versions"]
    rows = printed["results"]
    assert [r["name"] for r in rows] == ["model.float32.tflite", "model.int8.tflite"]
    assert [(r["format"], r["backend"]) for r in rows] == [("float32", "tflite"), ("int8", "tflite")]
    base, int8 = rows
    assert base["speedup"] == 1.0 and base["size_ratio"] == 1.0 and int8["size_ratio"] < 0.5
    for row in rows:
        assert row["invoke_ms"]["n"] == 20 and row["call_ms"]["n"] == 20 and row["threads"] == 1
        assert 0 < row["invoke_ms"]["median"] <= row["invoke_ms"]["p90"] <= row["invoke_ms"]["p99"]
        assert row["load_ms"] > 0 and row["first_ms"] > 0 and row["peak_rss_mb"] > 10
        assert row["throughput_ips"] == pytest.approx(1000 / row["call_ms"]["mean"])  # sustained: slow calls count
        assert row["throughput_p50_ips"] == pytest.approx(1000 / row["call_ms"]["median"])
        assert row["one_image_path"] == "compiled"  # the dev install built runtime.backends.kernels


def test_bench_an_artifact_directory_as_csv_and_table(exported):
    artifact = exported[0]
    result = run_module("runtime", "bench", str(artifact), "--runs", "3", "--warmup", "0", "--csv",
                        "--threads", "1,2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    header = lines[0].split(",")
    assert header[:3] == ["name", "format", "backend"] and "call_p99_ms" in header and "peak_rss_mb" in header
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert len(rows) == 7 * 2 and rows[0]["name"] == "model.float32.tflite"  # the float baseline first
    assert {r["threads"] for r in rows} == {"1", "2"}
    table = run_module("runtime", "bench", str(artifact / "model.int8.tflite"), "--runs", "3")
    assert table.returncode == 0 and "invoke p50" in table.stdout and "model.int8.tflite" in table.stdout
    assert "[1/1] model.int8.tflite" in table.stderr  # progress goes to stderr


@pytest.mark.parametrize("command", ["predict", "eval", "bench"])
def test_runtime_commands_load_no_tensorflow(exported, digits, tmp_path, command):
    artifact = exported[0]
    np.save(tmp_path / "x.npy", digits.x_test[:2])
    argv = {"predict": ["predict", str(artifact / "model.int8.tflite"), str(tmp_path / "x.npy")],
            "eval": ["eval", str(artifact / "model.onnx-int8.onnx")],
            "bench": ["bench", str(artifact / "model.int8.tflite"), "--runs", "2"]}[command]
    code = (
        "import contextlib, io, sys\n"
        "from runtime.__main__ import main\n"
        "from runtime.bench import measure\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0\n"
        f"measure({str(artifact / 'model.onnx-float32.onnx')!r}, 1, runs=2) if {command == 'bench'} else None\n"
        f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_bench_names_rows_by_their_directory_where_file_names_repeat():
    from runtime.bench import _shown_names

    shown = _shown_names(["runs/a/model.int8.tflite", "runs/b/model.int8.tflite", "runs/a/model.float32.tflite",
                          "runs/a/model.int8.tflite"])
    assert shown == {"runs/a/model.int8.tflite": "a/model.int8.tflite", "runs/b/model.int8.tflite": "b/model.int8.tflite",
                     "runs/a/model.float32.tflite": "model.float32.tflite"}
    assert _shown_names(["runs/a/model.int8.tflite"] * 2) == {"runs/a/model.int8.tflite": "model.int8.tflite"}
