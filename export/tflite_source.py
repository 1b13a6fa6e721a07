"""A .tflite file EdgeKit did not make as a source of export: a float file becomes int8, a microcontroller's file,
dynamic and float16; a fully integer one a microcontroller's.

    python -m export --tflite --quantize int8 --micro model_float.tflite --dataset digits --mean 0 --std 255
    python -m export --format dynamic --format float16 model_float.tflite --dataset digits --mean 0 --std 255
    python -m export --micro model_int8.tflite --dataset cifar10 --mean 0 --std 1

The source file run by LiteRT on the test split is the reference every file is verified against, as the Keras
model is for EdgeKit's own. A fully integer file (int8 input and output) is written as `model.micro.tflite`
byte for byte and goes through what `--micro` does to a file EdgeKit converts (export/micro.py): every operator
checked against TFLM's kernels, TFLM's tensor arena and the flash measured (and held to --max-ram and
--max-flash), TFLM run on the whole test split and compared with LiteRT's reference kernels value by value, TFLM's
answers judged by the one verification rule against the source, the C sources written. The preprocessing is
`--mean/--std` (pixel units) when given, else the file's own input quantization (pixels - 128 as int8, what a
model that takes raw pixels quantized this way expects); the labels are the dataset's.

A float file (float32 input and output) is quantized by Google's ai-edge-quantizer (TensorFlow-free, on
LiteRT's own model utilities): its static int8 recipe (`static_wi8_ai8`: int8 weights and activations, int8
input and output), calibrated on the dataset's training split, the same images in the same order as EdgeKit's
other int8 files (export.make.calibration_images: its seed and --calibration-samples), one image per run. The one
quantized file is `model.int8.tflite` (verified in LiteRT, and as the user's own app runs it) and, when it is
fully integer with TFLM's operators, `model.micro.tflite` (verified in TFLM). `dynamic` (int8 weights, float
activations) and `float16` (float16 weights) come from its other recipes (export/edge_quantizer.py), with no
calibration. The float file's preprocessing is
`--mean/--std`, else the dataset's, and export says so.

Everything read from the file is untrusted: LiteRT must open it as an image classifier, its size is bounded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from export import edge_quantizer
from export.runtime_source import RuntimeSource
from runtime.datasets import dataset_for_model
from runtime.errors import EdgeKitError
from runtime.fileinfo import tflite_description
from runtime.fsutil import check_readable_file
from runtime.load import NotAClassifier, load
from runtime.vocabulary import formats_from


@dataclasses.dataclass
class TFLiteSource(RuntimeSource):
    """A .tflite classifier run by LiteRT (runtime: its Model, backend litert), standing where export otherwise
    holds a Keras model."""

    data: bytes
    quantized: dict = dataclasses.field(default_factory=dict)  # format key -> a float file's quantized bytes, made
    # once (int8's serves micro too)

    @property
    def integer(self) -> bool:
        return (self.runtime.input.dtype, self.runtime.output.dtype) == ("int8", "int8")

    def count_params(self) -> int:
        return 0  # nothing is converted: no converter's memory to give back between formats

    def quantize(self, key: str, calibration: np.ndarray) -> tuple[bytes, dict]:
        """(the file of format `key`, the sidecar's record of how it was made): for int8 (and micro) the file
        itself when it is integer; else ai-edge-quantizer's file of the float one (export/edge_quantizer.py),
        int8 calibrated on `calibration` (preprocessed images)."""
        key = "int8" if key == "micro" else key
        if key == "int8" and self.integer:
            return self.data, {}
        if key not in self.quantized:
            self.quantized[key] = edge_quantizer.quantize(self.data, key, calibration)
        return self.quantized[key], edge_quantizer.record(key)

    def producer(self) -> str | None:
        return tflite_description(self.data[:64 << 20]) or None


def is_tflite(path: Path) -> bool:
    return path.suffix.lower() == ".tflite" and not path.is_dir()


def check_formats(path: Path, keys: list[str]) -> None:
    other = [key for key in keys if key not in formats_from("tflite")]  # (an integer file: micro only)
    if other:
        raise EdgeKitError(f"{', '.join(other)}: a .tflite source is exported to {', '.join(formats_from('tflite'))} "
                           "(a float file, quantized by ai-edge-quantizer; micro checked and verified for TensorFlow "
                           "Lite Micro, its C sources written); "
                           f"{path.name} is a TFLite file already, which `python -m runtime` runs as it is.")


def load_source(path: Path, dataset_name: str | None, data_dir, options) -> tuple[TFLiteSource, object]:
    """(the TFLite source, the dataset with the model's preprocessing), or one clear line why not."""

    check_readable_file(path, "model file")
    if dataset_name is None:
        raise EdgeKitError(f"{path} is a bare model file, so its labels and test images are unknown; pass --dataset "
                           "NAME (e.g. --dataset cifar10), and --mean/--std as the model was trained (pixel units: "
                           "0 and 1 for raw 0..255 pixels).")
    try:
        runtime = load(path, backend="litert", mean=options.mean if options else None,
                       std=options.std if options else None)
    except NotAClassifier as exc:
        raise EdgeKitError(f"{exc} Export verifies classifiers only; `python -m runtime predict --raw` and "
                           "`bench` run any model.") from None
    source = TFLiteSource(path, runtime, path.read_bytes())
    kinds = (runtime.input.dtype, runtime.output.dtype)
    if not source.integer and kinds != ("float32", "float32"):
        raise EdgeKitError(f"{path.name} takes {kinds[0]} input and gives {kinds[1]} output; a TFLite source is a "
                           "float file (float32 in and out), quantized here, or a fully integer one (int8 in and "
                           "out). Export it from the model it was converted from instead.")
    dataset = dataset_for_model(path, dataset_name, data_dir, runtime.input_shape, runtime.num_classes)
    if runtime.preprocessing is None:  # a float file and no --mean/--std: the dataset's own, as export says
        return source, dataset
    return source, dataclasses.replace(dataset, preprocessing=runtime.preprocessing)
