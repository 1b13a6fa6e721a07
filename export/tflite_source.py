"""A .tflite file EdgeKit did not make as a source of export: a fully integer file becomes a microcontroller's.

    python -m export --micro model_int8.tflite --dataset cifar10 --mean 0 --std 1

The source file run by LiteRT on the test split is the reference every file is verified against, as the Keras
model is for EdgeKit's own. A fully integer file (int8 input and output) is written as `model.micro.tflite`
byte for byte and goes through what `--micro` does to a file EdgeKit converts (export/micro.py): every operator
checked against TFLM's kernels, TFLM's tensor arena and the flash measured (and held to --max-ram and
--max-flash), TFLM run on the whole test split and compared with LiteRT's reference kernels value by value, TFLM's
answers judged by the one verification rule against the source, the C sources written. The preprocessing is
`--mean/--std` (pixel units) when given, else the file's own input quantization (pixels - 128 as int8, what a
model that takes raw pixels quantized this way expects); the labels are the dataset's.

Everything read from the file is untrusted: LiteRT must open it as an image classifier, its size is bounded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtime.errors import EdgeKitError

TFLITE_FORMATS = ("micro",)  # what a TFLite source gives


@dataclasses.dataclass
class TFLiteSource:
    """A .tflite classifier run by LiteRT, standing where export otherwise holds a Keras model."""

    path: Path
    runtime: object  # runtime.load's Model of the file, in LiteRT
    data: bytes

    @property
    def layout(self) -> str:
        return self.runtime.layout

    @property
    def output_kind(self) -> str:
        return self.runtime.output_kind

    @property
    def integer(self) -> bool:
        return (self.runtime.input.dtype, self.runtime.output.dtype) == ("int8", "int8")

    def predict(self, x: np.ndarray, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        """Outputs on preprocessed NHWC images, as keras.Model.predict gives them (export.convert.keras_logits)."""
        del verbose
        return self.runtime.logits(x, batch_size=batch_size)

    def count_params(self) -> int:
        return 0  # nothing is converted: no converter's memory to give back between formats

    def producer(self) -> str | None:
        from runtime.fileinfo import tflite_description

        return tflite_description(self.data[:64 << 20]) or None


def is_tflite(path: Path) -> bool:
    return path.suffix.lower() == ".tflite" and not path.is_dir()


def check_formats(path: Path, keys: list[str]) -> None:
    other = [key for key in keys if key not in TFLITE_FORMATS]
    if other:
        raise EdgeKitError(f"{', '.join(other)}: a .tflite source is exported with --micro (a fully integer file, "
                           f"checked and verified for TensorFlow Lite Micro, its C sources written); {path.name} is "
                           "a TFLite file already, which `python -m runtime` runs as it is.")


def load_source(path: Path, dataset_name: str | None, data_dir, options) -> tuple[TFLiteSource, object]:
    """(the TFLite source, the dataset with the model's preprocessing), or one clear line why not."""
    from runtime.datasets import load_dataset
    from runtime.load import NotAClassifier, load
    from runtime.manifest import check_readable_file

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
    if not source.integer:
        raise EdgeKitError(f"{path.name} takes {runtime.input.dtype} input and gives {runtime.output.dtype} output; "
                           "a microcontroller's file is fully integer (int8 in and out). Export it from the model it "
                           "was converted from (python -m export --micro MODEL.keras --dataset ...), or quantize it "
                           "to int8 with the TFLite converter first.")
    h, w, c = runtime.input_shape
    dataset = load_dataset(dataset_name, data_dir, image_size=(h, w), channels=c)
    if runtime.num_classes != dataset.num_classes:
        raise EdgeKitError(f"{path} outputs {runtime.num_classes} classes, but {dataset_name} has "
                           f"{dataset.num_classes}; pass the dataset the model was trained on.")
    return source, dataclasses.replace(dataset, preprocessing=runtime.preprocessing)
