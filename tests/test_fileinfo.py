"""Bare .tflite and .onnx files, EdgeKit's and others' (issue 26): `python -m runtime info FILE`, the runtime's
own ONNX reader checked against the onnx package's parser, and models that are not image classifiers through
`predict --raw` and `bench`, against bare onnxruntime and LiteRT."""

import io
import json
import zipfile
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import run_module
from runtime.backends.onnx_proto import onnx_summary


def _info(path):
    result = run_module("runtime", "info", str(path), "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """Files no EdgeKit export made: a two-output ONNX model and a sequence model ([N, 28, 28] input), by
    tf2onnx; a TFLite file with a packed labels zip."""
    import tf2onnx
    import tf2onnx.convert

    from train.backend import keras, tf

    root = tmp_path_factory.mktemp("others")
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    two = keras.Model(inputs, [keras.layers.Dense(3)(x), keras.layers.Dense(2)(x)])
    spec = [tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(two, input_signature=spec, opset=17)
    (root / "two.onnx").write_bytes(proto.SerializeToString())
    sequence = keras.Input((28, 28))
    seq = keras.Model(sequence, keras.layers.Dense(10)(keras.layers.Flatten()(sequence)))
    (root / "sequence.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(seq).convert())
    free = keras.Input((None, None, 3))  # any height and width: a segmentation-style input
    segment = keras.Model(free, keras.layers.Conv2D(2, 1)(free))
    spec = [tf.TensorSpec((None, None, None, 3), tf.float32, name="frame")]
    proto, _ = tf2onnx.convert.from_keras(segment, input_signature=spec, opset=17)
    (root / "segment.onnx").write_bytes(proto.SerializeToString())
    return root


def test_info_on_an_onnx_file_matches_onnx_and_onnxruntime(exported, tmp_path):
    path = exported[0] / "model.onnx-int8.onnx"
    info = _info(path)
    model = onnx.load(str(path))
    assert info["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert info["producer"].startswith(model.producer_name) and info["ir_version"] == model.ir_version
    assert info["ops"] == dict(Counter(n.op_type for n in model.graph.node))
    assert info["inputs"][0]["layout"] == "nhwc" and info["inputs"][0]["shape"] == [-1, 28, 28, 1]
    assert info["classifier"]["image_classifier"] and info["classifier"]["classes"] == 10
    assert info["sidecar"] == "model.onnx-int8.json" and len(info["sha256"]) == 64
    summary = onnx_summary(path.read_bytes())
    assert summary["opsets"] == {(o.domain or "ai.onnx"): o.version for o in model.opset_import}


def test_info_on_a_tflite_file_shows_quantization_and_packed_labels(exported, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as packed:
        packed.writestr("labels.txt", "\n".join(f"digit {i}" for i in range(10)))
    path = tmp_path / "packed.tflite"
    path.write_bytes((exported[0] / "model.int8.tflite").read_bytes() + buffer.getvalue())
    info = _info(path)
    detail = Interpreter(model_path=str(path)).get_input_details()[0]
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["layout"] == "nhwc"
    assert (info["inputs"][0]["scale"], info["inputs"][0]["zero_point"]) == pytest.approx(detail["quantization"])
    assert info["producer"] == "MLIR Converted." and info["labels"][3] == "digit 3"
    assert info["ops"]["CONV_2D"] >= 2 and info["sidecar"] is None
    text = run_module("runtime", "info", str(path)).stdout
    assert "scale 0.00392157 zero point -128" in text and "labels       10 packed in the file: digit 0" in text


def test_info_says_why_a_file_is_not_an_image_classifier(others):
    two = _info(others / "two.onnx")
    assert [o["shape"] for o in two["outputs"]] == [[-1, 3], [-1, 2]]
    assert not two["classifier"]["image_classifier"] and "1 inputs and 2 outputs" in two["classifier"]["reason"]
    sequence = _info(others / "sequence.tflite")
    assert sequence["inputs"][0]["shape"] == [-1, 28, 28] and sequence["inputs"][0]["layout"] is None
    assert "expected an image classifier" in sequence["classifier"]["reason"]
    text = run_module("runtime", "info", str(others / "two.onnx")).stdout
    assert "classifier   no:" in text and "opset        17" in text


def test_info_on_a_damaged_file_is_one_line(tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "garbage.tflite").write_bytes(np.random.default_rng(1).bytes(3000))
    for name in ("garbage.onnx", "garbage.tflite"):
        result = run_module("runtime", "info", str(tmp_path / name))
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and len(lines) == 1 and "not a valid" in lines[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_predict_raw_writes_every_output_as_bare_onnxruntime_gives_it(others, tmp_path):
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "two.npz"
    result = run_module("runtime", "predict", str(others / "two.onnx"), str(tmp_path / "x.npy"), "--raw", "--out",
                        str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    session = ort.InferenceSession(str(others / "two.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": x})
    record = json.loads(result.stdout)
    with np.load(out) as saved:
        for (name, key), want in zip(record["keys"].items(), expected):
            np.testing.assert_allclose(saved[key], want, rtol=1e-6, atol=1e-6)
    assert [o["shape"] for o in record["outputs"]] == [[2, 3], [2, 2]] and "values" in record["outputs"][0]
    missing = run_module("runtime", "predict", str(others / "two.onnx"), str(tmp_path / "x.npy"), "--raw", "--out",
                         str(tmp_path / "no" / "such.npz"))
    assert missing.returncode == 2 and "its directory does not exist" in missing.stderr, missing.stderr[-2000:]
    assert "Traceback" not in missing.stderr and not (tmp_path / "no").exists()
    refused = run_module("runtime", "predict", str(others / "two.onnx"), str(tmp_path / "x.npy"))
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(lines) == 1 and "pass --raw" in lines[0]


def test_predict_raw_on_a_sequence_model_and_a_dynamic_input(others, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    x = np.random.default_rng(1).standard_normal((1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "s.npy", x)
    result = run_module("runtime", "predict", str(others / "sequence.tflite"), str(tmp_path / "s.npy"), "--raw",
                        "--out", str(tmp_path / "s.npz"))
    assert result.returncode == 0, result.stderr[-2000:]
    interpreter = Interpreter(model_path=str(others / "sequence.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    want = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    with np.load(tmp_path / "s.npz") as saved:
        np.testing.assert_allclose(next(iter(saved.values())), want, rtol=1e-6, atol=1e-6)
    frame = np.random.default_rng(2).standard_normal((1, 40, 30, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", frame)
    result = run_module("runtime", "predict", str(others / "segment.onnx"), f"frame={tmp_path / 'f.npy'}", "--raw",
                        "--shape", "frame=1,40,30,3", "--out", str(tmp_path / "f.npz"))
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "f.npz") as saved:
        assert next(iter(saved.values())).shape == (1, 40, 30, 2)


def test_bench_times_any_model_on_inputs_of_its_dtype_and_shape(others):
    result = run_module("runtime", "bench", str(others / "two.onnx"), str(others / "sequence.tflite"), "--runs", "20",
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)["results"]
    assert [r["inputs"] for r in rows] == ["raw", "raw"] and rows[0]["outputs"] == 2
    assert list(rows[1]["input_shapes"].values()) == [[1, 28, 28]]
    assert all(r["invoke_ms"]["median"] > 0 for r in rows)
    missing = run_module("runtime", "bench", str(others / "segment.onnx"), "--runs", "5")
    lines = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert missing.returncode == 2 and len(lines) == 1 and "--shape frame=1,1,1,3" in lines[0], missing.stderr
    shaped = run_module("runtime", "bench", str(others / "segment.onnx"), "--runs", "5", "--shape",
                        "frame=1,64,48,3", "--json")
    assert shaped.returncode == 0, shaped.stderr[-2000:]
    assert json.loads(shaped.stdout)["results"][0]["input_shapes"] == {"frame": [1, 64, 48, 3]}
