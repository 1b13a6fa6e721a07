"""`runtime.load(path)`: one model object for .tflite (ai-edge-litert) and .onnx (onnxruntime).

    model = runtime.load("artifacts/fashion_cnn-digits/model.int8.tflite", threads=2)
    probabilities = model.predict(pixels)      # uint8 pixels (N, H, W, C), or float input
    model.top_k(probabilities, k=3)            # [[(label, probability), ...], ...]

Input is either uint8 pixels, which go through the preprocessing recorded in the
sidecar `model.<variant>.json` next to the file, or float32 input already
preprocessed as in training. int8/uint8 input tensors are quantized, and integer
outputs dequantized, with the model's own scale and zero point, so a caller always
passes images and gets probabilities. Every input is checked before it reaches the
interpreter: shape, channel count, dtype and finiteness errors say what was
expected and what to do. A batch goes through a dynamic-batch model in one call; a
fixed-batch model is resized when its graph allows it and looped otherwise.


The parts, one idea a file: runtime/backends/model.py (what a model is, what its outputs mean), runtime/backends/feeding.py
(input: checks, layout, preprocessing, quantization), runtime/backends/tensors.py (tensor descriptions, quantize,
softmax, the compiled kernels), runtime/artifacts/labels.py, runtime/backends/tflite.py, runtime/backends/onnx.py,
runtime/backends/inputs.py (files as input). This module loads a file into the right one, its sidecar and manifest
checked first, and keeps the names callers import from it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from runtime.artifacts.labels import check_labels  # noqa: F401
from runtime.artifacts.labels import packed_labels, parse_labels, read_labels
from runtime.artifacts.manifest import MANIFEST, read_manifest, read_sidecar, sidecar_path
from runtime.backends.inputs import NUMPY_SUFFIX, read_inputs, read_npy  # noqa: F401 (imported from here by callers)
from runtime.backends.model import (IMAGE_CHANNELS, LAYOUTS, REDO, Model, NotAClassifier, Options, finite,  # noqa: F401
                                    input_layout)
from runtime.backends.onnx import ONNXModel
from runtime.backends.tensors import TensorInfo, dequantize, quantize, softmax  # noqa: F401
from runtime.backends.tflite import TFLiteModel, tflite_census  # noqa: F401
from runtime.backends.tflm import MicroModel
from runtime.errors import ArtifactError, EdgeKitError
from runtime.fsutil import check_readable_file, sha256_file
from runtime.limits import threads as bounded_threads

BACKENDS = {".tflite": "tflite", ".onnx": "onnx"}
# load(backend=...): None chooses by the file (TFLM for a micro file when the micro extra is there, else LiteRT or
# onnxruntime); "micro" asks for TFLM; "litert" for LiteRT even for a micro file (its figure beside TFLM's)
BACKEND_CHOICES = (None, "micro", "litert")


def micro_installed() -> bool:
    return importlib.util.find_spec("tflite_micro") is not None
__all__ = ["BACKENDS", "IMAGE_CHANNELS", "LAYOUTS", "NUMPY_SUFFIX", "Model", "NotAClassifier", "Options", "TensorInfo",
           "check_labels", "dequantize", "finite", "input_layout", "load", "packed_labels", "parse_labels",
           "quantize", "read_inputs", "read_labels", "read_npy", "softmax", "tflite_census"]


def _check_file(path: Path, size: int, sidecar: dict | None, manifest: dict | None) -> None:
    """The size and sha256 recorded at export (sidecar) and in the artifact's manifest beside the model,
    checked before the interpreter ever reads the file."""

    expected = []
    if sidecar is not None:
        expected.append((f"sidecar {sidecar_path(path)}", sidecar["size_bytes"], sidecar["sha256"],
                         REDO.format(name=sidecar_path(path).name)))
    if manifest is not None:
        entry = manifest["files"].get(path.name)
        if entry is not None:
            expected.append((str(path.parent / MANIFEST), entry["bytes"], entry["sha256"], "Export the model again."))
    digest = None
    for where, recorded_size, recorded_sha, redo in expected:
        if recorded_size != size:
            raise ArtifactError(f"{where} describes a model of {recorded_size:,} bytes, but {path.name} has "
                                f"{size:,}: the file changed or is truncated. {redo}")
        digest = digest or sha256_file(path)
        if digest != recorded_sha:
            raise ArtifactError(f"{where} records sha256 {recorded_sha[:12]}..., which {path.name} does not "
                                f"match: the file changed after export or is corrupt. {redo}")


def load(path: str | Path, threads: int | None = None, *, mean=None, std=None, resize: str | None = None,
         labels=None, layout: str | None = None, backend: str | None = None) -> Model:
    """Load a .tflite or .onnx model (and its sidecar, if any) for CPU inference.

    `threads`: the interpreter's thread count (None: the backend's default).
    For a model from elsewhere (no sidecar), or to override the sidecar:
    `mean`, `std`: how pixels become float input, in pixel units, one value or one per channel:
        (pixel - mean) / std, as TFLite Support's normalization. Without them and a sidecar, a model with
        8-bit input takes the pixels as its quantized input (int8: pixels - 128), and a float one only
        float input.
    `resize`: how images of another size are resized (runtime.artifacts.preprocessing.RESIZE_METHODS).
    `labels`: a labels file (one a line, optionally "0 name") or a list; else the sidecar's, else the label
        file packed in a TFLite model's metadata, else the indices.
    `layout`: "nchw" or "nhwc", for an input shape that reads both ways (read from the shape otherwise).
        Images are always given as (H, W, C) pixels or (N, H, W, C) batches, and transposed for an NCHW model.
    `backend`: "micro" runs a fully integer .tflite file in TensorFlow Lite Micro's interpreter (runtime/backends/tflm.py;
        the micro extra), one image per invoke as on a microcontroller; "litert" runs it in LiteRT; default (None):
        TFLM for a micro file (its sidecar's format; `threads` ignored: TFLM runs on one) when the micro extra is
        installed, else LiteRT or onnxruntime.
    """
    if backend not in BACKEND_CHOICES:
        raise EdgeKitError(f"backend must be 'micro', 'litert' or None (by the file: TFLM for a micro file, else "
                           f"LiteRT or onnxruntime); got {backend!r}.")
    options = Options(mean, std, resize, labels, layout)
    if not isinstance(path, (str, Path)) or not str(path):
        raise EdgeKitError(f"runtime.load takes the path of a .tflite or .onnx file (a str or pathlib.Path); "
                           f"got {type(path).__name__} {path!r}.")
    if threads is not None:
        bounded_threads(threads, "threads")  # more than the cores buys nothing; a million crashed LiteRT
    path = Path(path)
    fmt = BACKENDS.get(path.suffix.lower())
    if fmt is None:
        raise EdgeKitError(f"{path}: expected a .tflite or .onnx model file; got '{path.suffix or 'no suffix'}'.")
    size = check_readable_file(path, "model file").st_size
    if size == 0:
        raise ArtifactError(f"model file {path} is empty; export it again.")

    manifest = read_manifest(path.parent) if (path.parent / MANIFEST).is_file() else None  # read once, for both
    sidecar = read_sidecar(path, manifest)
    _check_file(path, size, sidecar, manifest)
    if backend is None and fmt == "tflite" and (sidecar or {}).get("format") == "micro" and micro_installed():
        backend, threads = "micro", None  # a microcontroller's file: its figures are TFLM's, on one thread
    if backend == "micro":
        if fmt != "tflite":
            raise EdgeKitError(f"{path.name}: TensorFlow Lite Micro runs .tflite files; an ONNX file has no micro "
                               "backend.")
        if threads not in (None, 1):
            raise EdgeKitError("TensorFlow Lite Micro runs on one thread (a microcontroller's core); drop --threads.")

        return MicroModel(path, None, sidecar, options)
    cls = TFLiteModel if fmt == "tflite" else ONNXModel
    return cls(path, threads, sidecar, options)


