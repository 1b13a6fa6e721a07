"""Every export format on a tiny real model, verified against Keras through EdgeKit's runtime
(parity tests), plus the errors: unknown format, unsupported option, bare model without a
dataset, an unwritable output directory, and a failed check leaving nothing behind."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from export import EXPORT_ALL, export
from export.verify import FLOAT_ATOL, FLOAT_RTOL, MIN_AGREEMENT, verify
from runtime.artifacts.manifest import read_manifest, verify_files
from runtime.errors import AccuracyBudgetMissed, EdgeKitError, FloatMismatch, LowAgreement
from runtime.load import load, tflite_census
from runtime.vocabulary import MAX_ACCURACY_DROP, get_format


@pytest.mark.parametrize("key", list(EXPORT_ALL))
def test_every_format_matches_keras_through_the_runtime(exported, keras_reference, key):
    artifact, results = exported
    fmt, result = EXPORT_ALL[key], results[key]
    assert result.passed, result.message
    x, y, reference = keras_reference
    logits = load(artifact / fmt.filename).logits(x)  # the TensorFlow-free runtime, not the converter
    agreement = np.mean(logits.argmax(1) == reference.argmax(1))
    if fmt.kind == "float":
        assert np.all(np.abs(logits - reference) <= FLOAT_ATOL + FLOAT_RTOL * np.abs(reference))
        assert result.figures["sqnr_db"] > 60
    else:
        assert agreement >= MIN_AGREEMENT
        assert np.mean(logits.argmax(1) == y) >= np.mean(reference.argmax(1) == y) - MAX_ACCURACY_DROP / 100
        assert 10 < result.figures["sqnr_db"] and result.figures["cosine"] > 0.99
    assert result.figures["agreement"] == pytest.approx(agreement)
    assert result.figures["rule"]["kind"] == fmt.kind


@pytest.mark.parametrize("key", list(EXPORT_ALL))
def test_sidecar_holds_what_the_runtime_needs(exported, key):
    artifact, _ = exported
    fmt = EXPORT_ALL[key]
    sidecar = json.loads((artifact / fmt.sidecar).read_text())
    assert sidecar["labels"] == [str(d) for d in range(10)] and sidecar["preprocessing"]["size"] == [28, 28]
    assert sidecar["source"]["sha256"] == read_manifest(artifact)["files"]["model.keras"]["sha256"]
    assert sidecar["verification"]["passed"] is True and sidecar["size_bytes"] == (artifact / fmt.filename).stat().st_size
    assert {"tensorflow", "onnxruntime", "ai-edge-litert"} <= set(sidecar["versions"])
    if key == "int8":
        assert sidecar["input"]["dtype"] == "int8" and sidecar["input"]["scale"] > 0
        assert sidecar["output"]["dtype"] == "int8" and sidecar["calibration"]["samples"] == 300


def test_integer_tflite_is_much_smaller_and_onnx_is_valid(exported):
    import onnx

    artifact, results = exported
    # ~4x fewer weight bytes; on this tiny model the flatbuffer's fixed overhead keeps the ratio
    # a little above the 0.30x the full digits CNN reaches (0.26x, measured by `python -m export --all`).
    assert results["int8"].figures["size_bytes"] <= 0.35 * results["float32"].figures["size_bytes"]
    for key in ("onnx-float32", "onnx-int8"):
        proto = onnx.load(artifact / EXPORT_ALL[key].filename)
        onnx.checker.check_model(proto)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["edgekit.labels"])[3] == "3"
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(artifact / "model.onnx-int8.onnx").graph.node)


def test_manifest_records_every_export(exported):
    artifact, _ = exported
    manifest = read_manifest(artifact)
    assert set(manifest["exports"]) == set(EXPORT_ALL)
    assert all(entry["passed"] for entry in manifest["exports"].values())
    assert {"model.int8.tflite", "model.int8.json", "model.onnx-float32.onnx"} <= set(manifest["files"])
    assert verify_files(artifact) == []


def test_qat_artifact_exports_a_true_int8_model(tiny, tmp_path):
    from optimize import qat

    qat(tiny, tmp_path / "qat", epochs=1, quiet=True)
    (result,) = export(tmp_path / "qat", ["int8"], progress=lambda s: None)
    assert result.passed, result.message
    model = load(result.file)
    assert model.input.dtype == "int8" and model.output.dtype == "int8"
    assert result.figures["accuracy"] >= result.figures["keras_accuracy"] - MAX_ACCURACY_DROP / 100
    assert json.loads((tmp_path / "qat" / "model.int8.json").read_text())["calibration"] is None  # learned ranges
    assert result.figures["float_ops"] == 0  # counted in the file, recorded in the sidecar's verification
    with pytest.raises(EdgeKitError, match="quantization-aware .* exports to int8 only"):
        export(tmp_path / "qat", ["float32"], progress=lambda s: None)


@pytest.mark.parametrize("technique", ["qat", pytest.param("pqat", marks=pytest.mark.slow),
                                       pytest.param("cqat", marks=pytest.mark.slow)])  # 12 s, 10 s: `-m slow`
def test_quantization_aware_exclude_keeps_that_layer_alone_float_in_int8(tiny, tmp_path, technique):
    """--exclude LAYER on qat/pqat/cqat: in the int8 file that layer's convolution runs float between a DEQUANTIZE
    and a QUANTIZE, and every other op is the integer op of post-training int8."""
    from ai_edge_litert.interpreter import Interpreter

    from optimize import cluster, cqat, pqat, prune, qat

    parent = tiny
    if technique == "pqat":
        parent = tmp_path / "pruned"
        prune(tiny, parent, sparsity=0.5, epochs=1, quiet=True)
    elif technique == "cqat":
        parent = tmp_path / "clustered"
        cluster(tiny, parent, clusters=8, epochs=1, quiet=True)
    optimize = {"qat": qat, "pqat": pqat, "cqat": cqat}[technique]
    optimize(parent, tmp_path / "q", epochs=1, quiet=True, exclude=("block2_conv1",))
    (result,) = export(tmp_path / "q", ["int8"], progress=lambda s: None)
    assert result.passed, result.message
    interpreter = Interpreter(model_path=str(result.file))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    float_ops = [(op["op_name"], tensors[op["outputs"][0]]["name"]) for op in interpreter._get_ops_details()
                 if any(tensors[i]["dtype"] == np.float32 for i in [*op["inputs"], *op["outputs"]] if i >= 0)]
    assert [name for name, _ in float_ops] == ["DEQUANTIZE", "CONV_2D", "QUANTIZE"], float_ops
    assert "block2_conv1" in float_ops[1][1]
    census = tflite_census(result.file)
    assert census["ops"]["CONV_2D"] == 4 and census["ops"]["DEQUANTIZE"] == census["ops"]["QUANTIZE"] == 1
    assert result.figures["float_ops"] == 3
    model = load(result.file)
    assert model.input.dtype == "int8" and model.output.dtype == "int8"
    sidecar = json.loads((tmp_path / "q" / "model.int8.json").read_text())
    assert sidecar["kept_float"]["layers"] == ["block2_conv1"] and sidecar["calibration"]["samples"] > 0


def test_bare_keras_file_exports_with_a_dataset(tiny, tmp_path):
    shutil.copy(tiny / "model.keras", tmp_path / "model.keras")
    (result,) = export(tmp_path / "model.keras", ["float32"], dataset="digits", progress=lambda s: None)
    assert result.passed and result.file.parent == tmp_path / "model-export"
    with pytest.raises(EdgeKitError, match="bare model file.*--dataset"):
        export(tmp_path / "model.keras", ["float32"], progress=lambda s: None)


def test_a_failed_check_leaves_no_file_that_looks_valid(tiny, tmp_path, monkeypatch):
    artifact = tmp_path / "tiny"
    shutil.copytree(tiny, artifact)
    import export.verify as formats

    monkeypatch.setattr(formats, "FLOAT_ATOL", 0.0)  # no float model is bit-exact: the check must fail
    monkeypatch.setattr(formats, "FLOAT_RTOL", 0.0)
    (result,) = export(artifact, ["float32"], progress=lambda s: None)
    assert not result.passed and "outputs differ from Keras by more than" in result.message
    assert not (artifact / "model.float32.tflite").exists() and not (artifact / "model.float32.json").exists()
    assert [p.name for p in artifact.iterdir() if p.name.startswith(".")] == []
    assert read_manifest(artifact)["exports"]["float32"]["passed"] is False


@pytest.mark.parametrize("args, message", [
    (["--format", "onx", "ART"], "unknown format 'onx'.*Did you mean 'onnx'"),
    (["--tflite", "--quantize", "int4", "ART"], "Did you mean 'int8'"),
    (["--tflite", "--opset", "13", "ART"], "float32 does not take --opset; formats that do: onnx-float32, onnx-int8"),
    (["--onnx", "--calibration-method", "entropy", "ART"], "onnx-float32 does not take --calibration-method"),
    (["--tflite", "ART/model.keras"], "bare model file.*--dataset"),
    (["--tflite", "ART", "--out", "ART/model.keras/sub"], "is inside .*which this command reads from"),
    (["--onnx", "--opset", "1", "ART"], "--opset must be 13..18"),
    (["--tflite", "--quantize", "int8", "--max-accuracy-drop", "nan", "ART"], "in points of accuracy, 0 to 100"),
    (["--tflite", "--quantize", "int8", "--calibration-samples", "0", "ART"], "must be a positive integer"),
    (["ART"], "nothing to export"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tiny, args, message):
    import re

    args = [a.replace("ART", str(tiny)) for a in args]
    result = run_module("export", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_a_model_the_converter_rejects_gets_a_clear_error():
    from export.convert import to_tflite
    from train.backend import keras, tf

    inputs = keras.Input((4, 4, 1))  # MatrixDeterminant is neither a TFLite builtin nor enabled as a flex op
    det = keras.layers.Lambda(lambda x: tf.reshape(tf.linalg.det(tf.reshape(x, (-1, 4, 4))), (-1, 1)))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(det))
    with pytest.raises(EdgeKitError, match="TFLite converter rejected the model for float32.*MatrixDeterminant") as info:
        to_tflite(model, "float32", None, quantization_aware=False)
    assert info.value.exit_code == 1 and info.value.__cause__ is not None  # the work failed; --verbose shows why


def test_one_rule_fails_broken_and_untrained_models_and_passes_large_logits(keras_reference):
    x, y, reference = keras_reference
    int8, float32 = get_format("int8"), get_format("float32")
    rng = np.random.default_rng(0)
    assert verify(int8, reference + rng.normal(0, 0.01, reference.shape), reference, y)[1] is None
    shuffled = reference[rng.permutation(len(reference))]  # a broken file: right scores, wrong images
    assert isinstance(verify(int8, shuffled, reference, y)[1], AccuracyBudgetMissed)
    # An untrained model: chance accuracy in both files, so accuracy alone would pass; agreement does not.
    untrained = rng.normal(0, 1, reference.shape)
    noisy = untrained + rng.normal(0, 1, reference.shape)
    figures, failure = verify(int8, noisy, untrained, y, max_accuracy_drop=5)
    assert abs(figures["accuracy_change"]) < 0.05 and figures["agreement"] < 0.5
    assert isinstance(failure, LowAgreement) and "top-1 agreement" in str(failure)  # within even a 5-point budget
    large = reference * 1e4  # logits in the tens of thousands: 1e-4 alone would fail float32's rounding
    figures, failure = verify(float32, large * (1 + 1e-6), large, y)
    assert failure is None and figures["max_abs_diff"] > 1e-4 and figures["sqnr_db"] > 100
    failure = verify(float32, large * 1.01, large, y)[1]
    assert isinstance(failure, FloatMismatch) and "outputs differ" in str(failure)


@pytest.mark.parametrize("count", [40, 32])
def test_onnx_int8_calibrates_on_every_image_it_is_given(exported, count):
    """The first of `count` images alone reaches 1.0, the others stay under 0.1: the input's int8 range covers
    [0, 1] only if every image was calibrated on. (With onnxruntime's CalibMaxIntermediateOutputs of 16, 1.31 threw
    away each 16 images it collected: 40 images calibrated on the last 8, and 32 on none, "No data is collected".)"""
    import onnx
    from onnx import numpy_helper

    from export.convert import onnx_int8

    proto = onnx.load(exported[0] / "model.onnx-float32.onnx")
    images = np.random.default_rng(0).uniform(0, 0.1, (count, 28, 28, 1)).astype(np.float32)
    images[0] = 1.0
    quantized = onnx.load_from_string(onnx_int8(proto, images, "minmax", {}))
    weights = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    first = next(n for n in quantized.graph.node if n.op_type == "QuantizeLinear")  # the input (through a Reshape)
    assert float(weights[first.input[1]]) * 255 == pytest.approx(1.0, rel=0.01)  # asymmetric int8: (max - min) / 255


def test_the_portable_check_runs_a_file_as_the_users_app_does():
    """export/portable.py on real files: the dense int8 fixture answers in bare LiteRT (XNNPACK) exactly as in
    EdgeKit's runtime; its sparse twin is refused by bare LiteRT, in LiteRT's own words."""
    from export import portable

    fixtures = Path(__file__).parent / "fixtures" / "sparse"
    x = np.random.default_rng(0).random((40, 8, 8, 1), np.float32)
    fmt = get_format("int8")
    for name, portable_file in (("int8.dense.tflite", True), ("int8.sparse.tflite", False)):
        model = load(fixtures / name)
        logits = model.logits(x)
        labels = logits.argmax(axis=1)
        record = portable.check(fmt, fixtures / name, model, x, logits,
                                lambda out: verify(fmt, out, logits, labels))
        assert record["passed"] is portable_file and record["runtime"].startswith("ai-edge-litert"), record
        if portable_file:
            assert record["agreement"] == 1.0 and record["max_diff"] == 0.0 and record["reason"] is None
        else:
            assert "refuses it" in record["reason"] and "XNNPack" in record["reason"], record
