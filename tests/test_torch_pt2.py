"""A PyTorch model as a .pt2 file (torch.export.save) to verified TFLite float32, int8, dynamic, float16 and a
microcontroller's file (litert-torch, ai-edge-quantizer), and ONNX float32 and int8 (torch.onnx.export,
onnxruntime), NHWC or the program's NCHW; and a .pt2 file that would run code when loaded, refused (issue 40).
Needs torch and litert-torch (.ci/run installs the torch extra); without them these tests are skipped."""

import importlib.util
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, in_subprocess, run_module
from runtime.backends.tflite import tflite_census

# found, not imported: torch stays out of the suite's process (its own memory, its loggers)
pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("litert_torch")),
                                reason="needs the torch extra (README, Install): PyTorch's CPU wheel, then '.[torch]'")

FIXTURES = ROOT / "tests" / "fixtures" / "torch"
PT2 = FIXTURES / "cnn.pt2"
ARGS = ["--dataset", "digits", "--mean", "127.5", "--std", "127.5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`python -m export --format float32 --format int8 --format dynamic --format float16 --micro cnn.pt2` as a
    user types it: (its output dir, the run's stdout)."""
    out = tmp_path_factory.mktemp("pt2") / "cnn"
    done = run_module("export", "--format", "float32", "--format", "int8", "--format", "dynamic", "--format", "float16",
                      "--micro", str(PT2), *ARGS, "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, done.stdout


def test_a_pt2_program_becomes_verified_float32_int8_dynamic_float16_and_micro_files(exported):
    out, stdout = exported
    recorded = json.loads((FIXTURES / "versions.json").read_text())["programs"]["cnn.pt2"]["test_accuracy"]
    sidecars = {key: json.loads((out / f"model.{key}.json").read_text())
                for key in ("float32", "int8", "dynamic", "float16", "micro")}
    for key, sidecar in sidecars.items():
        v = sidecar["verification"]
        assert v["passed"] and v["reference"] == "the source PyTorch program" and v["test_samples"] == 359, key
        assert v["keras_accuracy"] == pytest.approx(recorded)  # the program run by torch: the fixture's figure
        assert sidecar["input"]["shape"][1:] == [28, 28, 1] and sidecar["layout"] == "nhwc", key  # NHWC files
        assert sidecar["source"]["program_layout"] == "nchw" and sidecar["source"]["kind"] == "torch"
    assert sidecars["float32"]["verification"]["max_abs_diff"] < 1e-3
    assert sidecars["int8"]["input"]["dtype"] == "int8" and sidecars["int8"]["output"]["dtype"] == "int8"
    assert sidecars["int8"]["verification"]["accuracy_change"] >= -0.01  # within the 1-point budget
    assert sidecars["int8"]["calibration"]["samples"] == 300
    assert "litert-torch" in sidecars["int8"]["calibration"]["method"]
    assert sidecars["int8"]["bare"]["passed"]  # bare LiteRT, default options: as the user's app runs it
    for key, weights in (("dynamic", "int8"), ("float16", "float16")):  # the float file by ai-edge-quantizer
        sidecar = sidecars[key]
        assert sidecar["quantized_by"]["tool"] == "ai-edge-quantizer" and sidecar["bare"]["passed"], key
        assert sidecar["input"]["dtype"] == "float32" and sidecar["calibration"] is None, key
        assert tflite_census((out / f"model.{key}.tflite").read_bytes())["dtypes"].get(weights), key
        assert (out / f"model.{key}.tflite").stat().st_size < 0.6 * (out / "model.float32.tflite").stat().st_size
    micro = sidecars["micro"]["micro"]
    assert micro["arena_bytes"] > 0 and micro["flash_bytes"] == (out / "model.micro.tflite").stat().st_size
    assert (out / "model.micro.cc").is_file() and (out / "model.micro.h").is_file()
    assert "the source PyTorch program" in stdout


def _program_logits(path: str, pixels: np.ndarray) -> np.ndarray:
    """The program's logits for uint8 pixels (N, H, W, 1), Normalize(0.5, 0.5), run by torch (in a subprocess)."""
    import torch

    program = torch.export.load(path).module()
    nchw = torch.from_numpy(((pixels.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return np.concatenate([program(nchw[i:i + 1]).numpy() for i in range(len(pixels))])


def test_the_files_answer_as_the_program_in_the_runtime_and_info_names_their_maker(exported, digits):
    from runtime.load import load

    out, _ = exported
    x = digits.x_test[:16]
    expected = in_subprocess(_program_logits, str(PT2), x)
    model = load(out / "model.float32.tflite")
    np.testing.assert_allclose(model.logits(x), expected, atol=1e-4, rtol=1e-4)  # pixels in, the program's logits
    assert np.array_equal(load(out / "model.int8.tflite").predict(x).argmax(1), expected.argmax(1))
    # litert-torch's files pin batch 1 and XNNPACK refuses to resize them: float input in chunks runs one at a time
    fed = ((digits.x_test[:40].astype(np.float32) - 127.5) / 127.5)
    chunked = load(out / "model.float32.tflite", mean=127.5, std=127.5).logits(fed, batch_size=8)
    one = load(out / "model.float32.tflite", mean=127.5, std=127.5)
    assert np.array_equal(chunked, np.concatenate([one.logits(fed[i:i + 1]) for i in range(len(fed))]))
    info = run_module("runtime", "info", str(out / "model.int8.tflite"))
    assert info.returncode == 0 and "made from    PyTorch" in info.stdout and "litert-torch" in info.stdout
    info = run_module("runtime", "info", str(out / "model.dynamic.tflite"))  # converted, then quantized
    assert info.returncode == 0 and "and ai-edge-quantizer" in info.stdout.split("made from", 1)[1].splitlines()[0]


def test_the_report_times_the_int8_file_and_its_byte_identical_micro_file_each_in_its_own_runtime(exported):
    """litert-torch's int8 file is the micro file byte for byte; the report cached latency by sha256 alone, so the
    int8 file was given the micro file's TFLM time (0.03x the float file's speed: "quantized but slower"). Each
    is timed in its own runtime now, and the header names the PyTorch program the files were verified against."""
    out, _ = exported
    done = run_module("runtime", "report", str(out), "--runs", "20", "--rounds", "2", "--threads", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["format"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert (out / "model.int8.tflite").read_bytes() == (out / "model.micro.tflite").read_bytes()
    assert rows["int8"]["latency_median_ms_1t"] < rows["micro"]["latency_median_ms_1t"] / 3  # LiteRT vs TFLM
    assert rows["int8"]["latency_median_ms_1t"] < 2 * rows["float32"]["latency_median_ms_1t"]
    assert "| source | the source PyTorch program cnn: 98.61% on the 359 test images" in \
        (out / "report.md").read_text()


def _program_outputs(path: str, nchw: np.ndarray) -> np.ndarray:
    """The program's outputs for NCHW input, run by torch (in a subprocess)."""
    import torch

    program = torch.export.load(path).module()
    with torch.no_grad():
        return np.concatenate([program(torch.from_numpy(nchw[i:i + 1])).numpy() for i in range(len(nchw))])


def test_with_layout_nchw_the_files_take_the_programs_input_in_bare_litert_and_onnxruntime(tmp_path, digits):
    """`--layout nchw`: every file takes the program's own (1, 3, H, W) input, as the user's PyTorch-trained app
    feeds it; the ONNX files come from torch.onnx.export (dynamo) and onnxruntime's static int8. Each runs in bare
    LiteRT and a default onnxruntime session, fed NCHW by hand, and answers as the program does."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "rgb"
    program = FIXTURES / "rgb_imagenet.pt2"
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    done = run_module("export", "--format", "float32", "--format", "int8", "--onnx", "--format", "onnx-int8",
                      "--layout", "nchw", str(program), "--dataset", "digits", "--mean", ",".join(map(str, mean)),
                      "--std", ",".join(map(str, std)), "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rgb = np.repeat(digits.x_test[:24], 3, axis=-1)
    nchw = ((rgb.astype(np.float32) - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2).copy()
    expected = in_subprocess(_program_outputs, str(program), nchw)
    for key in ("float32", "int8", "onnx-float32", "onnx-int8"):
        sidecar = json.loads((out / f"model.{key}.json").read_text())
        assert sidecar["layout"] == "nchw" and sidecar["input"]["shape"] == [1, 3, 28, 28], key
        assert sidecar["verification"]["passed"] and sidecar["bare"]["passed"], key
        assert sidecar["verification"]["reference"] == "the source PyTorch program", key
    assert json.loads((out / "model.onnx-int8.json").read_text())["calibration"]["samples"] == 300
    assert json.loads((out / "model.onnx-float32.json").read_text())["converted_by"]["tool"].startswith("torch.onnx")
    session = ort.InferenceSession(str(out / "model.onnx-float32.onnx"))
    (name,) = [i.name for i in session.get_inputs()]
    onnx_float = np.concatenate([session.run(None, {name: nchw[i:i + 1]})[0] for i in range(len(nchw))])
    np.testing.assert_allclose(onnx_float, expected, atol=1e-4, rtol=1e-4)
    interpreter = Interpreter(model_path=str(out / "model.float32.tflite"))
    interpreter.allocate_tensors()
    rows = []
    for i in range(len(nchw)):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], nchw[i:i + 1])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    np.testing.assert_allclose(np.concatenate(rows), expected, atol=1e-4, rtol=1e-4)
    int8 = ort.InferenceSession(str(out / "model.onnx-int8.onnx"))
    agree = np.mean([int8.run(None, {name: nchw[i:i + 1]})[0].argmax() == expected[i].argmax() for i in range(24)])
    assert agree >= 0.95


def _crafted(tmp_path: Path, member_suffix: str, payload: bytes) -> Path:
    """cnn.pt2 with the member ending in `member_suffix` replaced by `payload`."""
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(PT2) as source, zipfile.ZipFile(crafted, "w") as target:
        for item in source.infolist():
            target.writestr(item, payload if item.filename.endswith(member_suffix) else source.read(item))
    return crafted


class _Touch:
    """Unpickled, it creates a file: what a crafted model file's pickle can do with any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pt2_whose_pickle_runs_code_is_refused_and_runs_nothing(tmp_path):
    """torch.export.load falls back to full pickle where the safe unpickler refuses (its sample inputs here): a
    plain `torch.export.load` of this file runs the file's code; EdgeKit refuses it in one line, exit 2, and
    nothing ran. With --trust-model the user takes that on."""
    marker = tmp_path / "ran"
    crafted = _crafted(tmp_path, "data/sample_inputs/model.pt", pickle.dumps(_Touch(marker)))
    bare = subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(crafted)!r})"],
                          capture_output=True, text=True)
    assert marker.exists(), bare.stderr[-2000:]  # what the file does to whoever loads it plainly
    marker.unlink()
    done = run_module("export", "--tflite", str(crafted), *ARGS, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and not marker.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "would run code" in lines[0] and "--trust-model" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_custom_objects_and_other_archives_are_refused_before_torch_reads_them(tmp_path):
    config = json.dumps({"config": {"\x1b]8;;http://x\x07obj": {"path_name": "custom_obj_0"}}}).encode()
    custom = _crafted(tmp_path, "data/constants/model_constants_config.json", config)
    done = run_module("export", "--tflite", str(custom), *ARGS)
    assert done.returncode == 2 and "objects torch loads by running code" in done.stderr
    assert "\x1b" not in done.stderr  # the archive's names are escaped for the terminal
    checkpoint = tmp_path / "checkpoint.pt2"  # a torch.save zip: code to load, not an ExportedProgram
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("checkpoint/data.pkl", b"\x80\x04N.")
    checkpoint.write_bytes(buffer.getvalue())
    done = run_module("export", "--tflite", str(checkpoint), *ARGS)
    assert done.returncode == 1 and "no models/model.json" in done.stderr
    done = run_module("export", "--format", "int16x8", str(PT2), *ARGS)
    assert done.returncode == 2 and "a .pt2 source is exported to float32, float16, dynamic, int8, onnx-float32, " \
        "onnx-int8, micro" in done.stderr
