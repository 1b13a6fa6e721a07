"""Models PyTorch made (tests/fixtures/torch, written by scripts/make_torch_fixtures.py with torch.onnx.export):
info, predict and eval equal to bare onnxruntime, the int8 export verified against the source file, the report
on the artifact it writes (issue 26)."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, run_module
from runtime.load import load

FIXTURES = ROOT / "tests" / "fixtures" / "torch"
RECORD = json.loads((FIXTURES / "versions.json").read_text())
GRAY = ("--mean", "127.5", "--std", "127.5")  # Normalize(0.5, 0.5), as the fixtures were trained
IMAGENET = ("--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375")


def _bare(path, x_nchw, output=0):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x_nchw.astype(np.float32)})[output]


def _normalized(pixels, mean, std):
    """uint8 (N, H, W, C) -> float NCHW, as torchvision's ToTensor + Normalize times 255."""
    x = (pixels.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A copy of the committed files: exports go beside them."""
    root = tmp_path_factory.mktemp("torch")
    for path in FIXTURES.iterdir():
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def int8_export(fixtures):
    """The opset-11 CNN exported through the CLI: onnx-int8 asked, onnx-float32 (the baseline) made with it."""
    result = run_module("export", "--format", "onnx-int8", str(fixtures / "cnn_opset11.onnx"),
                        "--dataset", "digits", *GRAY, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return fixtures / "cnn_opset11-export", result


def test_info_on_every_torch_file(fixtures):
    for name, model in RECORD["models"].items():
        result = run_module("runtime", "info", str(fixtures / f"{name}.onnx"), "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        info = json.loads(result.stdout)
        assert info["producer"].startswith("pytorch 2.") and info["inputs"][0]["layout"] == "nchw"
        if model["opset"]:
            assert info["opset"] == model["opset"]
        assert info["classifier"]["image_classifier"] is (name != "two_outputs"), info["classifier"]
    dynamo = json.loads(run_module("runtime", "info", str(fixtures / "cnn_dynamo.onnx"), "--json").stdout)
    assert dynamo["external_data"] == [{"file": "cnn_dynamo.onnx.data", "bytes": 36256}], dynamo.get("external_data")


def test_predict_and_eval_equal_bare_onnxruntime_with_per_channel_mean(fixtures, digits, tmp_path):
    from runtime.datasets import load_dataset

    rgb = load_dataset("digits", channels=3)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    model = load(fixtures / "rgb_imagenet.onnx", mean=mean, std=std)
    expected = _bare(fixtures / "rgb_imagenet.onnx", _normalized(rgb.x_test, mean, std))
    np.testing.assert_allclose(model.logits(rgb.x_test), expected, rtol=1e-5, atol=1e-5)
    accuracy = float(np.mean(expected.argmax(1) == rgb.y_test))
    assert accuracy == pytest.approx(RECORD["models"]["rgb_imagenet"]["test_accuracy"], abs=1e-6)
    result = run_module("runtime", "eval", str(fixtures / "rgb_imagenet.onnx"), "--dataset", "digits", *IMAGENET,
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    np.save(tmp_path / "one.npy", digits.x_test[:3])  # uint8 (N, H, W, C) pixels, whatever the model's layout
    result = run_module("runtime", "predict", str(fixtures / "cnn_dynamo.onnx"), str(tmp_path / "one.npy"), *GRAY,
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    want = _bare(fixtures / "cnn_dynamo.onnx", _normalized(digits.x_test[:3], (127.5,), (127.5,)))
    got = json.loads(result.stdout)
    assert [p["top"][0]["index"] for p in got["predictions"]] == list(want.argmax(1))


def test_int8_export_is_verified_against_the_source_and_recorded(int8_export, digits):
    out, result = int8_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["producer"]["name"] == "pytorch" and manifest["source"]["opset"] == 11
    assert manifest["layout"] == "nchw" and manifest["preprocessing"]["mean"] == [127.5]
    assert set(manifest["exports"]) == {"onnx-float32", "onnx-int8"}  # the float file came with the int8 asked
    import hashlib

    assert manifest["source"]["sha256"] == hashlib.sha256((FIXTURES / "cnn_opset11.onnx").read_bytes()).hexdigest()
    sidecar = json.loads((out / "model.onnx-int8.json").read_text())
    assert sidecar["upgraded_to_opset"] == 13 and sidecar["opset"] == 13 and sidecar["layout"] == "nchw"
    check = sidecar["verification"]
    assert check["passed"] and check["rule"]["kind"] == "quantized" and check["agreement"] >= 0.95
    assert check["test_samples"] == len(digits.y_test) and "the source ONNX file" in result.stdout
    # the int8 file runs in bare onnxruntime (at opset 11 quantize_static wrote one it rejects) and agrees
    x = _normalized(digits.x_test, (127.5,), (127.5,))
    int8 = _bare(out / "model.onnx-int8.onnx", x)
    assert float(np.mean(int8.argmax(1) == digits.y_test)) == pytest.approx(check["accuracy"], abs=1e-9)
    # the float file is the source's graph: bare onnxruntime's outputs on both agree to float precision
    np.testing.assert_allclose(_bare(out / "model.onnx-float32.onnx", x), _bare(FIXTURES / "cnn_opset11.onnx", x),
                               rtol=1e-5, atol=1e-5)
    model = load(out / "model.onnx-int8.onnx")  # the sidecar gives preprocessing, layout and labels
    assert model.layout == "nchw" and model.preprocessing_source == "sidecar"


def test_int8_export_is_refused_when_the_budget_is_missed(fixtures):
    result = run_module("export", "--onnx", "--quantize", "int8", str(fixtures / "cnn_opset17.onnx"), "--dataset",
                        "digits", *GRAY, "--calibration-method", "percentile", "--calibration-samples", "2",
                        "--max-accuracy-drop", "0", "--out", str(fixtures / "missed"))
    assert result.returncode == 1 and "points below the source ONNX file" in result.stderr, result.stderr[-2000:]
    assert not (fixtures / "missed" / "model.onnx-int8.onnx").exists() and "Traceback" not in result.stderr


def test_external_data_travels_and_is_checked(fixtures, tmp_path):
    result = run_module("export", "--onnx", str(fixtures / "cnn_dynamo.onnx"), "--dataset", "digits", *GRAY,
                        "--out", str(tmp_path / "dynamo"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    import onnx

    written = onnx.load(str(tmp_path / "dynamo" / "model.onnx-float32.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    # a graph that reads its weights from outside its directory, or past the end of its data file, is refused
    proto = onnx.load(str(fixtures / "cnn_dynamo.onnx"), load_external_data=False)
    for case, (key, value) in {"escape": ("location", "../../etc/passwd"), "past": ("offset", "99999999")}.items():
        bad = onnx.ModelProto()
        bad.CopyFrom(proto)
        tensor = next(t for t in bad.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        next(e for e in tensor.external_data if e.key == key).value = value
        (tmp_path / case).mkdir()
        shutil.copy(fixtures / "cnn_dynamo.onnx.data", tmp_path / case / "cnn_dynamo.onnx.data")
        (tmp_path / case / "cnn_dynamo.onnx").write_bytes(bad.SerializeToString())
        result = run_module("export", "--onnx", str(tmp_path / case / "cnn_dynamo.onnx"), "--dataset", "digits",
                            *GRAY, "--out", str(tmp_path / case / "out"))
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert ("outside the model's directory" if case == "escape" else "truncated") in lines[0]


def test_all_is_every_format_a_model_file_from_elsewhere_makes(fixtures):
    """`export --all` on an .onnx file asked for the TFLite formats too and was refused; it is the formats the
    source makes now (an artifact's: the whole menu)."""
    from export.__main__ import build_parser, chosen_formats

    for source, expected in ((fixtures / "cnn_opset17.onnx", ["onnx-float32", "onnx-int8"]),
                             (fixtures / "cnn.pt2", ["float32", "float16", "dynamic", "int8", "onnx-float32",
                                                     "onnx-int8"]),
                             (fixtures / "model.tflite", ["float16", "dynamic", "int8"]),
                             (fixtures, ["float32", "float16", "dynamic", "int8", "int16x8", "onnx-float32",
                                         "onnx-int8"])):
        assert chosen_formats(build_parser().parse_args(["--all", str(source)])) == expected, source


def test_what_export_cannot_do_with_an_onnx_source_is_one_line(fixtures):
    for args, words in ((("--tflite",), "litert-torch"), (("--onnx", "--opset", "17"), "keeps its own opset"),
                        (("--onnx",), "two_outputs.onnx has 1 inputs and 2 outputs")):
        source = fixtures / ("two_outputs.onnx" if "two_outputs" in words else "cnn_opset17.onnx")
        result = run_module("export", *args, str(source), "--dataset", "digits", *GRAY)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr[-2000:]


def test_keep_float_names_onnx_nodes(fixtures, int8_export, tmp_path):
    result = run_module("export", "--onnx", "--quantize", "int8", str(fixtures / "cnn_opset17.onnx"), "--dataset",
                        "digits", *GRAY, "--keep-float", "/head/Gemm", "--out", str(tmp_path / "mixed"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    sidecar = json.loads((tmp_path / "mixed" / "model.onnx-int8-mixed.json").read_text())
    assert sidecar["kept_float"]["layers"] == ["/head/Gemm"] and sidecar["verification"]["passed"]
    import onnx

    def gemm_weights(path):
        """What feeds the Gemm's weights: a float initializer, or DequantizeLinear (int8)."""
        graph = onnx.load(str(path)).graph
        gemm = next(n for n in graph.node if n.op_type == "Gemm")
        producers = {o: n.op_type for n in graph.node for o in n.output}
        return producers.get(gemm.input[1], "initializer")

    assert gemm_weights(tmp_path / "mixed" / "model.onnx-int8-mixed.onnx") == "initializer"
    assert gemm_weights(fixtures / "cnn_opset11-export" / "model.onnx-int8.onnx") == "DequantizeLinear"
    unknown = run_module("export", "--onnx", "--quantize", "int8", str(fixtures / "cnn_opset17.onnx"), "--dataset",
                         "digits", *GRAY, "--keep-float", "/head/Gem", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "/head/Gemm" in unknown.stderr, unknown.stderr[-2000:]


def test_report_on_the_foreign_artifact(int8_export):
    out, _ = int8_export
    result = run_module("runtime", "report", str(out), "--seconds", "0.2", "--rounds", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"].endswith("onnx-float32")  # the source's float file is the baseline
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["onnx-int8"]["status"] == "verified" and rows["onnx-int8"]["test_images"] == 359
    assert rows["onnx-int8"]["size_bytes"] < 0.5 * rows["onnx-float32"]["size_bytes"]
    for recommendation in report["recommendations"]:
        if recommendation["objective"].startswith("latency") and recommendation["choice"]["file"].endswith("int8.onnx"):
            tag = recommendation["objective"].split("_")[1]
            assert rows["onnx-int8"][f"speedup_{tag}"] >= 1.0  # never a quantized file slower than float
    slower = [tag for tag in ("1t", "all") if rows["onnx-int8"][f"speedup_{tag}"] < 1]
    text = (out / "report.md").read_text()
    for tag in slower:
        assert f"slower than the float baseline at {'1 thread' if tag == '1t' else 'all threads'}" in text


def test_one_image_takes_the_compiled_path_with_the_general_paths_answer(fixtures, digits, monkeypatch):
    """predict on one image of a float-input model (the PyTorch files) runs the compiled path (runtime.backends.kernels:
    pixels looked up channels first, softmax): within 4 ulp of the numpy path, each call its own array."""
    from runtime.backends import tensors as TENSORS  # KERNELS: the compiled kernels, None to take numpy's path

    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    rgb = np.repeat(digits.x_test[:12], 3, axis=3)
    rgb[..., 1] //= 2  # channels that differ: a transposition or a channel's table mixed up shows
    fast = load(fixtures / "rgb_imagenet.onnx", mean=mean, std=std)
    assert fast._fast is not None
    got = [fast.predict(rgb[i:i + 1]) for i in range(len(rgb))]
    assert not np.shares_memory(got[0], got[1])
    monkeypatch.setattr(TENSORS, "KERNELS", None)
    general = load(fixtures / "rgb_imagenet.onnx", mean=mean, std=std)
    assert general._fast is None
    want = np.concatenate([general.predict(rgb[i:i + 1]) for i in range(len(rgb))])  # batch 1 too: onnxruntime's sums
    np.testing.assert_array_max_ulp(np.concatenate(got), want, maxulp=4)  # exps and their sum in double
    bare = _bare(fixtures / "rgb_imagenet.onnx", _normalized(rgb, mean, std))
    assert np.array_equal(np.concatenate(got).argmax(1), bare.argmax(1))


def test_the_two_output_model_runs_raw_in_predict_and_bench(fixtures, digits, tmp_path):
    x = _normalized(digits.x_test[:2], (127.5,), (127.5,))  # its own input tensor, NCHW float
    np.save(tmp_path / "x.npy", x)
    result = run_module("runtime", "predict", str(fixtures / "two_outputs.onnx"), str(tmp_path / "x.npy"), "--raw",
                        "--out", str(tmp_path / "two.npz"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "two.npz") as saved:
        got = [saved[key] for key in json.loads(result.stdout)["keys"].values()]
    for i, want in enumerate(_bare(fixtures / "two_outputs.onnx", x, output) for output in (0, 1)):
        np.testing.assert_array_equal(got[i], want)
    assert got[0].shape == (2, 10) and got[1].shape == (2, 16)
    bench = run_module("runtime", "bench", str(fixtures / "two_outputs.onnx"), "--runs", "20", "--json")
    assert bench.returncode == 0, bench.stderr[-2000:]
    row = json.loads(bench.stdout)["results"][0]
    assert row["inputs"] == "raw" and row["outputs"] == 2 and row["input_shapes"] == {"input": [1, 1, 28, 28]}


def test_keep_float_auto_stops_at_plain_int8_when_it_meets_the_budget(fixtures, tmp_path):
    result = run_module("export", "--onnx", "--quantize", "int8", str(fixtures / "cnn_opset17.onnx"), "--dataset",
                        "digits", *GRAY, "--keep-float", "auto", "--out", str(tmp_path / "auto"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "written as onnx-int8, no layer kept float" in result.stdout and "[1/" not in result.stdout  # no sweep
    assert (tmp_path / "auto" / "model.onnx-int8.onnx").is_file()
    assert not (tmp_path / "auto" / "model.onnx-int8-mixed.onnx").exists()
