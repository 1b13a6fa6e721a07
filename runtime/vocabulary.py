"""EdgeKit's vocabulary, in one place every stage imports: the file formats with their properties, the
optimization techniques and which of them are quantization-aware, the pipeline's menu of variants, and the
accuracy budget.

One vocabulary everywhere (sidecar, manifest, CSV and JSON of bench, eval and report): a *variant* is an
optimization of the model (base, pruned80, qat, ...) and a *format* is a file type, named by one key that is also
the file's name: `model.<format><suffix>`, sidecar `model.<format>.json`.

    format           file                          backend  kind       calibrated  made by         menu
    float32          model.float32.tflite          tflite   float      no          TFLite          all
    float16          model.float16.tflite          tflite   quantized  no          TFLite          all
    dynamic          model.dynamic.tflite          tflite   quantized  no          TFLite          all
    int8             model.int8.tflite             tflite   quantized  yes         TFLite          all
    int16x8          model.int16x8.tflite          tflite   quantized  yes         TFLite          all
    onnx-float32     model.onnx-float32.onnx       onnx     float      no          tf2onnx         all
    onnx-int8        model.onnx-int8.onnx          onnx     quantized  yes         onnxruntime     all
    int8-mixed       model.int8-mixed.tflite       tflite   quantized  yes         TFLite          --keep-float
    onnx-int8-mixed  model.onnx-int8-mixed.onnx    onnx     quantized  yes         onnxruntime     --keep-float
    micro            model.micro.tflite (.cc, .h)  tflite   quantized  yes         TFLite          --micro

`kind` says which half of the verification rule applies (export/verify.py); `verifier` which runtime's outputs
are verified (the file's own deploy runtime: LiteRT, onnxruntime, or TFLM for a microcontroller's file).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

from runtime.errors import EdgeKitError, suggest

# The accuracy budget, in points below the float model: export's verification of a quantized file and the
# report's "over budget" use the same default and the same option, --max-accuracy-drop.
MAX_ACCURACY_DROP = 1.0

# --- optimization techniques (optimize's verbs) and the pipeline's menu ----------------------------------------
TECHNIQUES = {  # python -m optimize TECHNIQUE, and what it does
    "prune": "magnitude pruning to --sparsity (polynomial decay), or --structured 2:4; then stripped",
    "cluster": "weight clustering to --clusters shared values per kernel; then stripped",
    "qat": "quantization-aware training (int8 weights and activations)",
    "pqat": "pruning-preserving QAT: keeps a pruned parent's zeros",
    "cqat": "cluster-preserving QAT: keeps a clustered parent's shared values",
}
QUANTIZATION_AWARE = frozenset({"qat", "pqat", "cqat"})  # their models export to int8 (and micro) from learned ranges


@dataclasses.dataclass(frozen=True)
class Variant:
    """One entry of the pipeline's menu: an optimize technique with its settings, applied to `parent`."""

    name: str
    verb: str  # the optimize technique (TECHNIQUES)
    parent: str  # "base" or another variant's name
    settings: dict
    summary: str
    marker: str  # its marker in every plot

    @property
    def quantization_aware(self) -> bool:
        return self.verb in QUANTIZATION_AWARE


VARIANTS = {v.name: v for v in (
    Variant("pruned50", "prune", "base", {"sparsity": 0.5}, "magnitude pruning to 50% sparsity", "s"),
    Variant("pruned80", "prune", "base", {"sparsity": 0.8}, "magnitude pruning to 80% sparsity", "D"),
    Variant("2of4", "prune", "base", {"structured": "2:4"}, "2:4 structured pruning", "^"),
    Variant("clustered16", "cluster", "base", {"clusters": 16}, "weight clustering, 16 values per kernel", "v"),
    Variant("qat", "qat", "base", {}, "quantization-aware training", "P"),
    Variant("pqat", "pqat", "pruned80", {}, "pruning-preserving QAT on pruned80", "X"),
    Variant("cqat", "cqat", "clustered16", {}, "cluster-preserving QAT on clustered16", "h"),
)}
DEFAULT_VARIANTS = ("pruned50", "pruned80", "2of4", "clustered16", "qat", "pqat")
MENU = ("base", *VARIANTS)  # the trained model and every variant the pipeline can make
BASE_MARKER = "o"
_SPARE_MARKERS = "<>pH8d*"


# --- file formats ----------------------------------------------------------------------------------------------
_CALIBRATION = frozenset({"calibration_samples"})
_ONNX_CALIBRATION = frozenset({"opset", "calibration_samples", "calibration_method"})


@dataclasses.dataclass(frozen=True)
class FileFormat:
    key: str
    suffix: str
    backend: str  # "tflite" or "onnx": the converter that makes it and the runtime that runs it
    kind: str  # "float" or "quantized": which half of the verification rule applies
    colour: str  # one colour per format in every plot
    description: str
    calibrated: bool = False  # made with activation ranges measured on training images
    options: frozenset = frozenset()  # export's options it takes
    menu: str = "all"  # "all": part of export --all; "mixed": made with --keep-float; "micro": with --micro
    extra: tuple[str, ...] = ()  # suffixes of the files written beside it (a micro file's C sources)
    verifier: str = ""  # the runtime whose outputs are verified: its backend's, or "tflm"
    sparse: bool = False  # the TFLite converter may store a pruned model's weights sparse in it
    sources: frozenset = frozenset({"keras"})  # what makes it: keras, qat, onnx, tflite (a float .tflite), torch (.pt2)

    @property
    def filename(self) -> str:
        return f"model.{self.key}{self.suffix}"

    @property
    def sidecar(self) -> str:
        return f"model.{self.key}.json"

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the format writes: the model, its sidecar, and what it has beside (a micro file's C sources)."""
        return (self.filename, self.sidecar, *(f"model.{self.key}{suffix}" for suffix in self.extra))

    @property
    def runtime(self) -> str:
        """The runtime its verification figures come from."""
        return self.verifier or ("ai-edge-litert" if self.backend == "tflite" else "onnxruntime")


FILE_FORMATS = {f.key: f for f in (  # in display order; the first is the float baseline
    FileFormat("float32", ".tflite", "tflite", "float", "#1f77b4", "TFLite float32", sparse=True,
               sources=frozenset({"keras", "torch"})),
    FileFormat("float16", ".tflite", "tflite", "quantized", "#17becf", "TFLite with float16 weights",
               sources=frozenset({"keras", "tflite", "torch"})),
    FileFormat("dynamic", ".tflite", "tflite", "quantized", "#2ca02c",
               "TFLite dynamic range: int8 weights, float activations", sparse=True,
               sources=frozenset({"keras", "tflite", "torch"})),
    FileFormat("int8", ".tflite", "tflite", "quantized", "#d62728",
               "TFLite full integer: int8 weights, activations, input and output", True, _CALIBRATION, sparse=True,
               sources=frozenset({"keras", "qat", "tflite", "torch"})),
    FileFormat("int16x8", ".tflite", "tflite", "quantized", "#ff7f0e", "TFLite 16-bit activations, 8-bit weights",
               True, _CALIBRATION),
    FileFormat("onnx-float32", ".onnx", "onnx", "float", "#9467bd", "ONNX float32 via tf2onnx, dynamic batch",
               options=frozenset({"opset"}), sources=frozenset({"keras", "onnx", "torch"})),
    FileFormat("onnx-int8", ".onnx", "onnx", "quantized", "#8c564b",
               "ONNX int8 (QDQ, per-channel weights) via onnxruntime static quantization", True, _ONNX_CALIBRATION,
               sources=frozenset({"keras", "onnx", "torch"})),
    FileFormat("int8-mixed", ".tflite", "tflite", "quantized", "#e377c2",
               "TFLite int8 (int8 input and output) with the layers int8 hurts kept float", True,
               _CALIBRATION | {"keep_float"}, "mixed"),
    FileFormat("onnx-int8-mixed", ".onnx", "onnx", "quantized", "#bcbd22",
               "ONNX int8 (QDQ) with the layers int8 hurts kept float (nodes_to_exclude)", True,
               _ONNX_CALIBRATION | {"keep_float"}, "mixed", sources=frozenset({"keras", "onnx"})),
    FileFormat("micro", ".tflite", "tflite", "quantized", "#393b79",
               "TFLite full integer for TensorFlow Lite Micro: int8 input and output, TFLM's operators only, "
               "verified in TFLM's interpreter, with model.micro.cc/.h (C array, op resolver)", True, _CALIBRATION,
               "micro", (".cc", ".h"), "tflite-micro", sources=frozenset({"keras", "qat", "tflite", "torch"})),
)}
ALIASES = {"onnx": "onnx-float32"}  # accepted on the command line, never written
EXPORT_ALL = {k: f for k, f in FILE_FORMATS.items() if f.menu == "all"}  # export --all
MIXED_OF = {"int8": "int8-mixed", "onnx-int8": "onnx-int8-mixed"}  # the format --keep-float turns each into
QAT_FORMATS = tuple(k for k, f in FILE_FORMATS.items() if "qat" in f.sources)  # a quantization-aware model's files


def formats_from(source: str) -> tuple[str, ...]:
    """The formats a source kind (keras, qat, onnx, tflite) is made into."""
    return tuple(k for k, f in FILE_FORMATS.items() if source in f.sources)


def get_format(key: str) -> FileFormat:
    """The format a key (or an alias) names; an unknown key is refused with the known ones."""
    key = ALIASES.get(key, key)
    if key not in FILE_FORMATS:
        raise EdgeKitError(f"unknown format '{key}'; expected one of: {', '.join(FILE_FORMATS)}."
                           f"{suggest(key, [*FILE_FORMATS, *ALIASES])}")
    return FILE_FORMATS[key]


def check_options(fmt: FileFormat, options: dict) -> None:
    """Reject an option the format does not take (e.g. --opset for a TFLite file)."""
    for name, value in options.items():
        if value is not None and name not in fmt.options:
            takers = [f.key for f in FILE_FORMATS.values() if name in f.options]
            raise EdgeKitError(
                f"format {fmt.key} does not take --{name.replace('_', '-')}; formats that do: {', '.join(takers)}."
            )


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
    """One marker per variant in every plot (a variant not on the menu gets one from its name)."""
    if variant == "base":
        return BASE_MARKER
    if variant in VARIANTS:
        return VARIANTS[variant].marker
    return _SPARE_MARKERS[zlib.crc32(variant.encode()) % len(_SPARE_MARKERS)]


def check_max_accuracy_drop(points) -> float:
    if type(points) not in (int, float) or not math.isfinite(points) or not 0 <= points <= 100:
        raise EdgeKitError(f"--max-accuracy-drop is in points of accuracy, 0 to 100 (default {MAX_ACCURACY_DROP}); "
                           f"got {points!r}.")
    return float(points)
