"""The file formats EdgeKit exports, as data the TensorFlow-free side needs (bench, eval, report, plots).

One vocabulary everywhere (sidecar, manifest, CSV and JSON of bench, eval and report):
a *variant* is an optimization of the model (base, pruned80, qat, ...) and a *format* is a file
type, named by one key that is also the file's name: `model.<format><suffix>`, sidecar
`model.<format>.json`. `export/formats.py` adds how each format is made and verified.

    format        file                       backend  kind
    float32       model.float32.tflite       tflite   float
    float16       model.float16.tflite       tflite   quantized (float16 weights)
    dynamic       model.dynamic.tflite       tflite   quantized (int8 weights, float activations)
    int8          model.int8.tflite          tflite   quantized (full integer)
    int16x8       model.int16x8.tflite       tflite   quantized (16-bit activations)
    onnx-float32  model.onnx-float32.onnx    onnx     float
    onnx-int8     model.onnx-int8.onnx       onnx     quantized (QDQ)
    int8-mixed    model.int8-mixed.tflite    tflite   quantized (int8, the layers int8 hurts kept float)
    onnx-int8-mixed  model.onnx-int8-mixed.onnx  onnx  quantized (onnx-int8, the same)
    micro         model.micro.tflite         tflite   quantized (int8 for TensorFlow Lite Micro; .cc and .h beside)
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

from runtime.errors import EdgeKitError

# The accuracy budget, in points below the float model: export's verification of a quantized file and the
# report's "over budget" use the same default and the same option, --max-accuracy-drop.
MAX_ACCURACY_DROP = 1.0


@dataclasses.dataclass(frozen=True)
class FileFormat:
    key: str
    suffix: str
    backend: str  # "tflite" or "onnx"
    kind: str  # "float" or "quantized"
    colour: str  # one colour per format in every plot

    @property
    def filename(self) -> str:
        return f"model.{self.key}{self.suffix}"

    @property
    def sidecar(self) -> str:
        return f"model.{self.key}.json"


FILE_FORMATS = {f.key: f for f in (  # in display order; the first is the float baseline
    FileFormat("float32", ".tflite", "tflite", "float", "#1f77b4"),
    FileFormat("float16", ".tflite", "tflite", "quantized", "#17becf"),
    FileFormat("dynamic", ".tflite", "tflite", "quantized", "#2ca02c"),
    FileFormat("int8", ".tflite", "tflite", "quantized", "#d62728"),
    FileFormat("int16x8", ".tflite", "tflite", "quantized", "#ff7f0e"),
    FileFormat("onnx-float32", ".onnx", "onnx", "float", "#9467bd"),
    FileFormat("onnx-int8", ".onnx", "onnx", "quantized", "#8c564b"),
    FileFormat("int8-mixed", ".tflite", "tflite", "quantized", "#e377c2"),  # int8 with named layers float
    FileFormat("onnx-int8-mixed", ".onnx", "onnx", "quantized", "#bcbd22"),
    FileFormat("micro", ".tflite", "tflite", "quantized", "#393b79"),  # int8 for TensorFlow Lite Micro (+ .cc, .h)
)}
ALIASES = {"onnx": "onnx-float32"}  # accepted on the command line, never written

# One marker per variant in every plot (a variant not listed gets one from its name).
VARIANT_MARKERS = {"base": "o", "pruned50": "s", "pruned80": "D", "2of4": "^", "clustered16": "v", "qat": "P",
                   "pqat": "X", "cqat": "h"}
_SPARE_MARKERS = "<>pH8d*"


def format_rank(key: str) -> int:
    """Display position of a format key (unknown keys last)."""
    keys = list(FILE_FORMATS)
    return keys.index(key) if key in keys else len(keys)


def format_of(path: str | Path) -> str | None:
    """The format key of an exported file by its name (model.<key><suffix>), or None."""
    name = Path(path).name
    for fmt in FILE_FORMATS.values():
        if name.endswith(fmt.filename):
            return fmt.key
    return None


def colour(key: str) -> str:
    fmt = FILE_FORMATS.get(key)
    return fmt.colour if fmt else "#7f7f7f"


def marker(variant: str) -> str:
    return VARIANT_MARKERS.get(variant) or _SPARE_MARKERS[zlib.crc32(variant.encode()) % len(_SPARE_MARKERS)]


def check_max_accuracy_drop(points) -> float:
    if type(points) not in (int, float) or not math.isfinite(points) or not 0 <= points <= 100:
        raise EdgeKitError(f"--max-accuracy-drop is in points of accuracy, 0 to 100 (default {MAX_ACCURACY_DROP}); "
                           f"got {points!r}.")
    return float(points)
