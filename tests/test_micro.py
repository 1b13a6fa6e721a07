"""Microcontroller files: export --micro verified in TensorFlow Lite Micro's interpreter, the arena it measured, the
C array a firmware compiles, the budgets, an operator TFLM lacks, and the runtime's micro backend."""

import importlib.util
import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import run_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tflite_micro") is None,
                                reason="needs the micro extra (pip install -e '.[micro]')")

# fashion_cnn with filters [8, 16] and dense 32 (the `tiny` fixture) on 28x28x1, counted by hand from its layers:
# conv 3x3 1->8 and 8->8 at 28x28, conv 8->16 and 16->16 at 14x14, dense 784->32, logits 32->10
TINY_MACS = 28 * 28 * 8 * 9 * 1 + 28 * 28 * 8 * 9 * 8 + 14 * 14 * 16 * 9 * 8 + 14 * 14 * 16 * 9 * 16 + 784 * 32 + 32 * 10


@pytest.fixture(scope="module")
def micro_artifact(tiny, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("micro") / "tiny"
    shutil.copytree(tiny, artifact)
    done = run_module("export", "--micro", "--max-ram", "256KiB", "--max-flash", "1MiB", str(artifact))
    assert done.returncode == 0, done.stdout + done.stderr
    return artifact, done.stdout


def test_micro_export_records_what_tflm_measured(micro_artifact):
    from runtime.backends import tflm

    artifact, stdout = micro_artifact
    path = artifact / "model.micro.tflite"
    sidecar = json.loads((artifact / "model.micro.json").read_text())
    record = sidecar["micro"]
    assert record["arena_bytes"] == tflm.arena_bytes(path)  # TFLM's own figure, measured again
    assert 1_000 < record["arena_bytes"] < 64 * 1024
    assert record["flash_bytes"] == path.stat().st_size
    assert record["macs"] == TINY_MACS
    assert record["operators"][0] == "CONV_2D" and "FULLY_CONNECTED" in record["operators"]
    reference = record["reference"]
    assert reference["images"] == 359 and reference["max_lsb"] <= 1 and reference["bit_equal_images"] >= 340
    differing = reference.get("differing", {"images": 0, "examined": 0, "rounding_alone": 0})
    assert reference["bit_equal_images"] + differing["images"] == 359
    assert differing["rounding_alone"] == differing["examined"] == differing["images"]  # each explained
    assert sidecar["verification"]["passed"] and sidecar["verification"]["runtime"] == "tflite-micro"
    assert (sidecar["input"]["dtype"], sidecar["output"]["dtype"]) == ("int8", "int8")
    assert f"tensor arena {record['arena_bytes']:,} bytes" in stdout
    info = run_module("runtime", "info", str(artifact))  # the C sources are in the manifest, checked
    assert info.returncode == 0 and "model.micro.cc" in info.stdout and "model.micro.h" in info.stdout


def test_tflm_parts_from_litert_only_where_fully_connected_rounds(micro_artifact, digits):
    """Operator by operator on the whole test split: given the same inputs, every TFLM kernel gives LiteRT's
    reference output, but FULLY_CONNECTED, whose output is exactly its input requantized with two roundings in TFLM
    (gemmlowp's) and with one in LiteRT; the micro file's fully connected weights are per tensor (what TFLM before
    September 2024 requires)."""
    import runtime
    from export import tflm_rounding as rounding
    from runtime.backends import tflm

    # The roundings on a value where they part: 1 x 0.75 x 2^-1 = 0.375. gemmlowp first rounds 1 x 0.75 to 1, then
    # 1 / 2 = 0.5 away from zero to 1; one rounding of 0.375 gives 0.
    assert rounding.quantize_multiplier(0.375) == (3 << 29, -1)
    assert rounding.requantize(np.array([1, -1, 5]), 3 << 29, -1, single=False).tolist() == [1, -1, 2]
    assert rounding.requantize(np.array([1, -1, 5]), 3 << 29, -1, single=True).tolist() == [0, 0, 2]
    path = micro_artifact[0] / "model.micro.tflite"
    model = runtime.load(path)
    fed = model._feed(*model._checked(digits.x_test))
    firsts = rounding.first_differences(path, fed)
    assert all(first == {} or first["rounding"] for first in firsts), [f for f in firsts if f and not f["rounding"]]
    it, tm = rounding.reference_interpreter(path, every_tensor=True), tflm.interpreter(path, every_tensor=True)
    details = {d["index"]: d for d in it.get_tensor_details()}
    dense = [op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    assert len(dense) == 2 and all(len(details[op["inputs"][1]]["quantization_parameters"]["scales"]) == 1
                                   for op in dense)
    data = path.read_bytes()
    for x in fed[:60]:  # each dense layer recomputed from each interpreter's own input
        it.set_tensor(it.get_input_details()[0]["index"], x[None])
        it.invoke()
        tm.set_input(x[None], 0)
        tm.invoke()
        for op in dense:
            out = op["outputs"][0]
            read_tflm = lambda index: rounding.tflm_tensor(tm, index)  # noqa: E731
            assert np.array_equal(rounding.fully_connected(op, data, details, read_tflm, single=False).ravel(),
                                  read_tflm(out).ravel())
            assert np.array_equal(rounding.fully_connected(op, data, details, it.get_tensor, single=True).ravel(),
                                  it.get_tensor(out).ravel())


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def _compile(artifact, main) -> str:
    """A program of `main` and the artifact's model.micro.cc, built as a firmware's sources are (-Wall -Werror)."""
    program = main.with_suffix("")
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-I", str(artifact), str(main),
                    str(artifact / "model.micro.cc"), "-o", str(program)], check=True)
    return str(program)


def test_info_shows_the_macs_and_tflms_arena_of_a_file_from_anywhere(micro_artifact, tmp_path):
    """Issue 38: the arena of a .tflite you already have was reachable only through a Python function. `info` on
    the micro file copied without its sidecar gives TFLM's arena and the MACs the export recorded."""
    artifact, _ = micro_artifact
    shutil.copyfile(artifact / "model.micro.tflite", tmp_path / "theirs.tflite")
    done = run_module("runtime", "info", str(tmp_path / "theirs.tflite"), "--json")
    assert done.returncode == 0, done.stderr
    info, record = json.loads(done.stdout), json.loads((artifact / "model.micro.json").read_text())["micro"]
    assert info["sidecar"] is None and info["micro"] == {"arena_bytes": record["arena_bytes"], "reason": None}
    assert info["macs"] == record["macs"] == TINY_MACS
    text = run_module("runtime", "info", str(tmp_path / "theirs.tflite")).stdout
    assert f"TFLM's tensor arena {record['arena_bytes']:,} bytes" in text and f"MACs         {TINY_MACS:,}" in text


def test_the_c_array_compiles_and_is_the_file_byte_for_byte(micro_artifact, tmp_path):
    artifact, _ = micro_artifact
    (tmp_path / "main.cc").write_text(
        '#include <cstdint>\n#include <cstdio>\n#include "model.micro.h"\n'
        "int main() {\n"
        "  if (reinterpret_cast<std::uintptr_t>(g_model) % 16 != 0) return 3;\n"
        '  std::fprintf(stderr, "%u", g_model_arena_bytes);\n'
        "  return std::fwrite(g_model, 1, g_model_len, stdout) == g_model_len ? 0 : 4;\n"
        "}\n")
    done = subprocess.run([_compile(artifact, tmp_path / "main.cc")], capture_output=True)
    assert done.returncode == 0
    assert done.stdout == (artifact / "model.micro.tflite").read_bytes()
    arena = json.loads((artifact / "model.micro.json").read_text())["micro"]["arena_bytes"]
    assert int(done.stderr) == arena
    header = (artifact / "model.micro.h").read_text()
    ops = json.loads((artifact / "model.micro.json").read_text())["micro"]["operators"]
    assert f"MicroMutableOpResolver<{len(ops)}>" in header and "resolver.AddConv2D()" in header


def test_the_header_alone_turns_pixels_into_the_input_tensor_and_names_the_classes(micro_artifact, digits, tmp_path):
    """A firmware needs nothing but model.micro.h (issue 37): from its constants alone, a C++ program turns each
    test image's pixels into exactly the int8 input tensor EdgeKit's runtime feeds (every value of 40 images), and
    reads the labels, the output's scale and zero point and whether it is probabilities."""
    from runtime.load import load

    artifact, _ = micro_artifact
    images = digits.x_test[:40]
    (tmp_path / "pixels.bin").write_bytes(images.tobytes())
    (tmp_path / "main.cc").write_text(
        '#include <cmath>\n#include <cstdio>\n#include <cstdint>\n#include "model.micro.h"\n'
        "int main(int argc, char** argv) {\n"
        "  const int h = g_model_input_dims[1], w = g_model_input_dims[2], c = g_model_input_dims[3];\n"
        '  FILE* in = std::fopen(argv[1], "rb");\n'
        "  unsigned char p;\n"
        "  for (long i = 0; std::fread(&p, 1, 1, in) == 1; ++i) {\n"
        "    const int channel = i % c;\n"
        "    const float x = (p * g_model_pixel_scale - g_model_mean[channel]) / g_model_std[channel];\n"
        "    long q = std::lround(x / g_model_input_scale) + g_model_input_zero_point;\n"
        "    q = q < -128 ? -128 : q > 127 ? 127 : q;\n"
        "    std::fwrite(&q, 1, 1, stdout);\n"  # little-endian: the low byte is the int8
        "  }\n"
        '  std::fprintf(stderr, "%s %d %d %s %d %g %d %s", g_model_input_layout, h * w * c, g_model_num_classes,\n'
        "               g_model_labels[3], g_model_output_is_probabilities, g_model_output_scale,\n"
        "               g_model_output_zero_point, argc > 2 ? argv[2] : \"\");\n"
        "  return 0;\n"
        "}\n")
    done = subprocess.run([_compile(artifact, tmp_path / "main.cc"), str(tmp_path / "pixels.bin")],
                          capture_output=True, check=True)
    model = load(artifact / "model.micro.tflite")
    expected = model.input_tensors(images)
    assert np.array_equal(np.frombuffer(done.stdout, np.int8).reshape(expected.shape), expected)
    layout, size, classes, label, probabilities, scale, zero = done.stderr.decode().split()
    sidecar = json.loads((artifact / "model.micro.json").read_text())
    assert (layout, int(size), int(classes), label) == ("NHWC", 28 * 28, 10, sidecar["labels"][3])
    assert bool(int(probabilities)) == (sidecar["output"]["kind"] == "probabilities")
    assert float(scale) == pytest.approx(sidecar["output"]["scale"], rel=1e-6)
    assert int(zero) == sidecar["output"]["zero_point"]


def test_labels_become_c_strings_that_cannot_escape_them():
    from export.firmware import c_string

    hostile = 'a"; system("rm -rf /"); //\\??=\n\u00e9'
    literal = c_string(hostile)
    assert literal.startswith('"') and literal.endswith('"') and '"' not in literal[1:-1]
    assert "\n" not in literal and "??" not in literal and "\\303\\251" in literal


def test_the_runtime_runs_a_micro_file_in_tflm(micro_artifact, digits):
    import runtime
    from runtime.errors import EdgeKitError

    artifact, _ = micro_artifact
    path = artifact / "model.micro.tflite"
    model = runtime.load(path, backend="micro")
    assert model.backend == "micro"
    tflm, litert = model.predict(digits.x_test[:40]), runtime.load(path, backend="litert").predict(digits.x_test[:40])
    assert np.abs(tflm - litert).max() < 0.05 and (tflm.argmax(1) == litert.argmax(1)).mean() >= 0.95
    # a micro file's figures are TFLM's by default (issue 37): load, eval and the report; LiteRT's only when asked
    assert runtime.load(path).backend == "micro" and runtime.load(path, threads=2).backend == "micro"
    assert runtime.load(path, backend="litert").backend == "tflite"
    done = run_module("runtime", "eval", str(path))
    assert done.returncode == 0 and "by TFLM's interpreter" in done.stdout, done.stdout + done.stderr
    assert model.predict(digits.x_test[0]).shape == (1, 10)  # one image, the fast path
    with pytest.raises(EdgeKitError, match="one thread"):
        runtime.load(path, threads=2, backend="micro")
    done = run_module("runtime", "eval", str(path), "--backend", "micro", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"] == "micro" and result["accuracy"] == result["recorded_accuracy"]  # TFLM's, verified
    bench = run_module("runtime", "bench", str(path), "--backend", "micro", "--runs", "5", "--json")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["results"][0]["backend"] == "micro"


def test_a_budget_the_model_does_not_fit_is_refused_in_one_line(micro_artifact, tmp_path):
    artifact = tmp_path / "tiny"
    shutil.copytree(micro_artifact[0], artifact)
    done = run_module("export", "--micro", "--max-ram", "2KiB", str(artifact))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-ram 2 KiB (2,048 bytes)" in lines[0] and "nothing was written" in lines[0]
    assert not list(artifact.glob("model.micro.*"))
    for args, words in ((["--micro", "--max-ram", "12 parsecs"], "256KiB"), (["--tflite", "--max-flash", "1MiB"],
                                                                              "add --micro")):
        wrong = run_module("export", *args, str(artifact))
        assert wrong.returncode == 2 and words in wrong.stderr, wrong.stderr


def _gelu_model(path):
    from train.backend import keras

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="gelu")(x)
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)


def test_an_operator_tflm_lacks_is_named(tmp_path):
    from conftest import in_subprocess

    in_subprocess(_gelu_model, str(tmp_path / "gelu.keras"))
    done = run_module("export", "--micro", str(tmp_path / "gelu.keras"), "--dataset", "digits", "--allow-untrained")
    assert done.returncode == 1
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "GELU" in error[0] and "no kernel" in error[0], done.stderr
    assert not list(tmp_path.glob("*/model.micro.*"))


def test_sizes_read_as_datasheets_write_them():
    from runtime.errors import EdgeKitError
    from runtime.limits import size_bytes

    assert [size_bytes(t, "--max-ram") for t in ("256KiB", "1MiB", "32kB", "4096", "1.5 KiB")] == \
        [262144, 1048576, 32000, 4096, 1536]
    for bad in ("", "0", "-5", "12 parsecs", "1e9"):
        with pytest.raises(EdgeKitError, match="256KiB"):
            size_bytes(bad, "--max-ram")


def _softmax_model(path, kind: str, epochs: int):
    """A model ending in Softmax(), trained on digits: "cnn" (two convolutions, a dense layer), "mlp" (five dense
    layers: a FULLY_CONNECTED's one step travels through four more) or "resnet8" (the registry's ResNet-8, MLPerf
    Tiny's image classifier, with Softmax() after its logits)."""
    from runtime.datasets import load_dataset
    from train.backend import keras
    from train.models import create_model

    keras.utils.set_random_seed(0)
    data = load_dataset("digits")
    if kind == "cnn":
        inputs = keras.Input((28, 28, 1))
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
        x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
        x = keras.layers.Dense(10)(keras.layers.Flatten()(x))
        model = keras.Model(inputs, keras.layers.Softmax()(x))
    elif kind == "mlp":
        inputs = keras.Input((28, 28, 1))
        x = keras.layers.Flatten()(inputs)
        for units in (64, 64, 64, 32):
            x = keras.layers.Dense(units, activation="relu")(x)
        model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(10)(x)))
    else:
        logits = create_model("resnet", input_shape=(28, 28, 1), num_classes=10)
        model = keras.Model(logits.input, keras.layers.Softmax()(logits.output))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = data.arrays("train")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    model.save(path)


@pytest.mark.parametrize("kind, epochs", [
    ("cnn", 3),
    # 15 images differ, by up to 3 steps at the output, each first by FULLY_CONNECTED's rounding (12 s)
    pytest.param("mlp", 5, marks=pytest.mark.slow),
    pytest.param("resnet8", 8, marks=pytest.mark.slow),  # 26 s: `python -m pytest -m slow` (README, Tests)
])
def test_a_model_ending_in_softmax_passes_when_every_difference_is_fully_connecteds_rounding(tmp_path, kind, epochs):
    """TFLM and LiteRT's reference kernels part by one step at a FULLY_CONNECTED; in a deeper model the step
    travels through the later layers and softmax stretches it (a published ResNet-8: up to 11 steps, refused). The
    file passes when every differing image is examined and each first differs by that rounding alone."""
    from conftest import in_subprocess

    in_subprocess(_softmax_model, str(tmp_path / f"{kind}.keras"), kind, epochs)
    done = run_module("export", "--micro", str(tmp_path / f"{kind}.keras"), "--dataset", "digits", "--out",
                      str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sidecar = json.loads((tmp_path / "out" / "model.micro.json").read_text())
    reference = sidecar["micro"]["reference"]
    assert sidecar["output"]["kind"] == "probabilities" and reference["images"] == 359
    differing = reference.get("differing", {"images": 0, "examined": 0, "rounding_alone": 0})
    assert differing["rounding_alone"] == differing["examined"] == differing["images"]
    assert reference["bit_equal_images"] + differing["images"] == 359
    assert (reference["max_lsb"] > 1) == bool(reference.get("grown_from_rounding"))
    if kind == "mlp":  # refused before: more than one step apart (issue 37)
        assert reference["max_lsb"] > 1 and differing["images"] > 0, reference


def _int8_tflite_made_elsewhere(path: str) -> None:
    """A small CNN trained on raw 0..255 digits pixels and converted by the TFLite converter itself (no EdgeKit
    code): full integer, int8 input and output, as a microcontroller benchmark's files are made."""
    from pathlib import Path

    import tensorflow as tf

    from runtime.datasets import load_dataset
    from train.backend import keras
    from train.trainer import seed_everything

    seed_everything(0)
    data = load_dataset("digits")
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.x_train[:1024].astype("float32"), data.y_train[:1024], epochs=4, batch_size=64, verbose=0)
    Path(path).with_suffix(".float.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([data.x_train[i:i + 1].astype("float32")] for i in range(100))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    Path(path).write_bytes(converter.convert())


def test_an_int8_tflite_made_elsewhere_becomes_a_microcontrollers_file(tmp_path, digits):
    """Issue 38: `export --micro model_int8.tflite` was refused. The file, made by the TFLite converter alone, is
    written byte for byte as model.micro.tflite after TFLM's checks: its kernels, its arena, TFLM against LiteRT's
    reference kernels on the test split, TFLM's accuracy judged against the source run by LiteRT; C sources
    written. The float file beside it is quantized by ai-edge-quantizer to int8 and micro, both verified, and to
    dynamic and float16 (issue 40: its other recipes); a format the file cannot give is refused in one line."""
    from conftest import in_subprocess
    from export import edge_quantizer
    from runtime.backends import tflm
    from runtime.backends.tflite import tflite_census

    source = tmp_path / "theirs.tflite"
    in_subprocess(_int8_tflite_made_elsewhere, str(source))
    done = run_module("export", "--micro", str(source), "--dataset", "digits", "--mean", "0", "--std", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "theirs-export"
    assert (out / "model.micro.tflite").read_bytes() == source.read_bytes()
    assert {"model.micro.cc", "model.micro.h", "manifest.json"} <= {p.name for p in out.iterdir()}
    sidecar = json.loads((out / "model.micro.json").read_text())
    assert sidecar["source"]["kind"] == "tflite" and sidecar["verification"]["runtime"] == "tflite-micro"
    assert sidecar["verification"]["reference"] == "the source TFLite file"
    assert sidecar["micro"]["arena_bytes"] == tflm.arena_bytes(source) and sidecar["preprocessing"]["scale"] == 1.0
    accuracy = sidecar["verification"]["accuracy"]
    assert accuracy > 0.8 and abs(accuracy - sidecar["verification"]["keras_accuracy"]) <= 0.01
    for args, message in ((["--tflite", str(source)], "a .tflite source is exported to float16, dynamic, int8, micro"),
                          (["--tflite", "--quantize", "int8", str(source)], "fully integer already"),
                          (["--micro", str(source), "--layout", "nchw"], "read from its shape")):
        refused = run_module("export", *args, "--dataset", "digits")
        assert refused.returncode == 2 and refused.stderr.count("error:") == 1 and message in refused.stderr, \
            refused.stderr[-1500:]
    floats = run_module("export", "--format", "int8", "--format", "dynamic", "--format", "float16", "--micro",
                        str(tmp_path / "theirs.float.tflite"), "--dataset", "digits", "--mean", "0", "--std", "1")
    assert floats.returncode == 0, floats.stdout[-2000:] + floats.stderr[-2000:]  # quantized by ai-edge-quantizer
    census = {key: tflite_census((tmp_path / "theirs.float-export" / f"model.{key}.tflite").read_bytes())
              for key in ("dynamic", "float16")}
    for key, weights in (("dynamic", "int8"), ("float16", "float16")):
        made = json.loads((tmp_path / "theirs.float-export" / f"model.{key}.json").read_text())
        assert made["quantized_by"]["recipe"] == edge_quantizer.RECIPES[key] and made["input"]["dtype"] == "float32"
        assert made["verification"]["accuracy"] > 0.8 and made["bare"]["passed"], key  # in bare LiteRT too
        assert census[key]["dtypes"].get(weights), (key, census[key])  # the weights held as the format says
    for key in ("int8", "micro"):
        made = json.loads((tmp_path / "theirs.float-export" / f"model.{key}.json").read_text())
        assert made["quantized_by"]["tool"] == "ai-edge-quantizer" and made["input"]["dtype"] == "int8"
        assert made["calibration"]["samples"] == 300 and made["calibration"]["method"].startswith("ai-edge-quantizer")
        assert made["verification"]["accuracy"] > 0.8 and made["verification"]["reference"] == "the source TFLite file"
    wrong = run_module("export", "--micro", str(source), "--dataset", "digits", "--out", str(tmp_path / "wrong"),
                       "--mean", "127.5", "--std", "127.5")  # fed [-1, 1] where it was trained on raw pixels
    assert wrong.returncode == 2 and "under twice chance" in wrong.stderr, wrong.stderr[-1500:]
