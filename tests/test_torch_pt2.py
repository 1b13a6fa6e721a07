"""A PyTorch model as a .pt2 file (torch.export.save) to verified TFLite float32, int8 and a microcontroller's file,
through litert-torch (the `torch` extra); and a .pt2 file that would run code when loaded, refused (issue 40).
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

# found, not imported: torch stays out of the suite's process (its own memory, its loggers)
pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("litert_torch")),
                                reason="needs the torch extra (README, Install): PyTorch's CPU wheel, then '.[torch]'")

FIXTURES = ROOT / "tests" / "fixtures" / "torch"
PT2 = FIXTURES / "cnn.pt2"
ARGS = ["--dataset", "digits", "--mean", "127.5", "--std", "127.5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`python -m export --format float32 --format int8 --micro cnn.pt2` as a user types it: (its output dir, the
    run's stdout)."""
    out = tmp_path_factory.mktemp("pt2") / "cnn"
    done = run_module("export", "--format", "float32", "--format", "int8", "--micro", str(PT2), *ARGS, "--out",
                      str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, done.stdout


def test_a_pt2_program_becomes_verified_float32_int8_and_micro_files(exported):
    out, stdout = exported
    recorded = json.loads((FIXTURES / "versions.json").read_text())["programs"]["cnn.pt2"]["test_accuracy"]
    sidecars = {key: json.loads((out / f"model.{key}.json").read_text()) for key in ("float32", "int8", "micro")}
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
    done = run_module("export", "--onnx", str(PT2), *ARGS)
    assert done.returncode == 2 and "a .pt2 source is exported to float32, int8, micro" in done.stderr
