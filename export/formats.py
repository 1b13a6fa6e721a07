"""The one table of export formats, looked up by key, and the one rule that verifies them.

    key         file                        backend                 kind
    float32     model.float32.tflite        TFLite converter        float
    float16     model.float16.tflite        TFLite (fp16 weights)   quantized
    dynamic     model.dynamic.tflite        TFLite (int8 weights)   quantized
    int8        model.int8.tflite           TFLite full integer     quantized
    int16x8     model.int16x8.tflite        TFLite 16-bit acts      quantized
    onnx-float32 model.onnx-float32.onnx    tf2onnx                 float  (`onnx` is accepted too)
    onnx-int8   model.onnx-int8.onnx        onnxruntime QDQ static  quantized

The verification rule (`verify`), on the whole test split, against the Keras model:
- float: every output within FLOAT_ATOL + FLOAT_RTOL x |Keras output| (absolute plus relative
  tolerance, as Optimum's export validation: a model with large logits is not failed by 1e-4 alone);
- quantized, every quantized format alike: accuracy at most `max_accuracy_drop` points below Keras
  (default 1.0, `--max-accuracy-drop`), and top-1 agreement with Keras at least MIN_AGREEMENT;
- always recorded: max |difference|, agreement, accuracy and its change, and the output fidelity:
  SQNR in dB (signal-to-quantization-noise ratio of the outputs) and cosine similarity.

Why an agreement floor of 95%: within a 1-point accuracy budget, a faithful quantized file flips only
images the float model is itself unsure of, and agrees on 98-100% of a test split (EdgeKit's own files:
98.6-100%); accuracy alone cannot tell such a file from a broken one whose errors happen to cancel, or
from an untrained model whose accuracy is chance either way (issue 11 reports an untrained ResNet50 onnx-int8 file that
agreed on 4.5% of the images). 95% fails those and leaves room for the few flips a small test split
magnifies (on 359 images one flip is 0.28 points).

A quantization-aware artifact (qat, pqat, cqat) exports to `int8` only: its learned
ranges make the integer model, with no calibration, unless they leave float operators (layers
tfmot's scheme does not support, such as MobileNetV3's hard-swish) or its recipe excludes layers:
then the file is made from the weights QAT trained, its activation ranges calibrated (the sidecar's
`activation_ranges` or `kept_float`, and `calibration`, say so).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from runtime.errors import EdgeKitError, suggest
from runtime.vocabulary import (ALIASES, FILE_FORMATS, MAX_ACCURACY_DROP, FileFormat,  # noqa: F401
                                check_max_accuracy_drop)

FLOAT_ATOL = 1e-4  # float formats: |output - Keras| <= FLOAT_ATOL + FLOAT_RTOL * |Keras|
FLOAT_RTOL = 1e-3
BUDGET_MISS = "points below"  # the words of a budget failure (the pipeline then tries int8-mixed)
MIN_AGREEMENT = 0.95  # quantized formats: top-1 agreement with Keras (see the module docstring)
SQNR_CAP_DB = 200.0  # an exact file has infinite SQNR; JSON has no infinity


@dataclasses.dataclass(frozen=True)
class Format(FileFormat):
    """runtime.vocabulary' file format (key, suffix, backend, kind: which half of the verification rule applies),
    and what export adds: the options it accepts and a description."""

    options: frozenset = frozenset()
    description: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the format writes: the model, its sidecar, and a micro file's C sources."""
        extra = (f"model.{self.key}.cc", f"model.{self.key}.h") if self.key == "micro" else ()
        return (self.filename, self.sidecar, *extra)


_CALIBRATED = frozenset({"calibration_samples"})
_HOW = {  # what export adds to runtime.vocabulary' table: options and a description
    "float32": (frozenset(), "TFLite float32"),
    "float16": (frozenset(), "TFLite with float16 weights"),
    "dynamic": (frozenset(), "TFLite dynamic range: int8 weights, float activations"),
    "int8": (_CALIBRATED, "TFLite full integer: int8 weights, activations, input and output"),
    "int16x8": (_CALIBRATED, "TFLite 16-bit activations, 8-bit weights"),
    "onnx-float32": (frozenset({"opset"}), "ONNX float32 via tf2onnx, dynamic batch"),
    "onnx-int8": (frozenset({"opset", "calibration_samples", "calibration_method"}),
                  "ONNX int8 (QDQ, per-channel weights) via onnxruntime static quantization"),
}
_MIXED = {  # made only with --keep-float (export/selective.py): not part of --all
    "int8-mixed": (_CALIBRATED | {"keep_float"},
                   "TFLite int8 (int8 input and output) with the layers int8 hurts kept float"),
    "onnx-int8-mixed": (frozenset({"opset", "calibration_samples", "calibration_method", "keep_float"}),
                        "ONNX int8 (QDQ) with the layers int8 hurts kept float (nodes_to_exclude)"),
}
_MICRO = {  # made only when asked (export --micro, pipeline --target micro): not part of --all
    "micro": (_CALIBRATED, "TFLite full integer for TensorFlow Lite Micro: int8 input and output, TFLM's operators "
                           "only, verified in TFLM's interpreter, with model.micro.cc/.h (C array, op resolver)"),
}
MIXED_OF = {"int8": "int8-mixed", "onnx-int8": "onnx-int8-mixed"}  # the format --keep-float turns each into
FORMATS = {f.key: Format(**dataclasses.asdict(f), options=_HOW[f.key][0], description=_HOW[f.key][1])
           for f in FILE_FORMATS.values() if f.key in _HOW}
MIXED_FORMATS = {f.key: Format(**dataclasses.asdict(f), options=_MIXED[f.key][0], description=_MIXED[f.key][1])
                 for f in FILE_FORMATS.values() if f.key in _MIXED}
MICRO_FORMATS = {f.key: Format(**dataclasses.asdict(f), options=_MICRO[f.key][0], description=_MICRO[f.key][1])
                 for f in FILE_FORMATS.values() if f.key in _MICRO}
QAT_FORMATS = ("int8", "micro")


def get_format(key: str) -> Format:
    key = ALIASES.get(key, key)
    known = {**FORMATS, **MIXED_FORMATS, **MICRO_FORMATS}
    if key not in known:
        raise EdgeKitError(f"unknown format '{key}'; expected one of: {', '.join(known)}."
                           f"{suggest(key, [*known, *ALIASES])}")
    return known[key]


def check_options(fmt: Format, options: dict) -> None:
    """Reject an option the format does not take (e.g. --opset for a TFLite file)."""
    for name, value in options.items():
        if value is not None and name not in fmt.options:
            takers = [f.key for f in {**FORMATS, **MIXED_FORMATS, **MICRO_FORMATS}.values() if name in f.options]
            raise EdgeKitError(
                f"format {fmt.key} does not take --{name.replace('_', '-')}; formats that do: {', '.join(takers)}."
            )


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> dict:
    """SQNR in dB and cosine similarity of a file's outputs against the float model's."""
    outputs, reference = outputs.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    if not (np.isfinite(outputs).all() and np.isfinite(reference).all()):  # NaN is never a fidelity: the worst
        return {"sqnr_db": -SQNR_CAP_DB, "cosine": 0.0}
    signal, noise = float(np.sum(reference ** 2)), float(np.sum((reference - outputs) ** 2))
    sqnr = SQNR_CAP_DB if noise == 0 else min(SQNR_CAP_DB, 10 * math.log10(signal / noise) if signal else -SQNR_CAP_DB)
    norms = float(np.linalg.norm(outputs) * np.linalg.norm(reference))
    return {"sqnr_db": round(sqnr, 3), "cosine": float(np.dot(outputs, reference) / norms) if norms else 0.0}


def verify(fmt: Format, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray,
           max_accuracy_drop: float = MAX_ACCURACY_DROP, against: str = "Keras") -> tuple[dict, str]:
    """The verification rule (module docstring): the figures, and '' or why the file fails. Every comparison
    fails on NaN: a non-finite output, the file's or the float model's, fails the file. `against`: what
    `reference` came from, as the messages name it (Keras, or an ONNX source)."""
    for name, values in (("the file's", outputs), ("the float model's", reference)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            return ({"non_finite_outputs": bad, "test_samples": int(len(labels)), "rule": {"kind": fmt.kind}},
                    f"{bad:,} of {np.size(values):,} of {name} outputs on {len(labels)} test images are NaN or "
                    "infinite: a model whose outputs are not numbers is never verified (train it again; check its "
                    "weights)")
    keras_accuracy = float(np.mean(reference.argmax(1) == labels))
    accuracy = float(np.mean(outputs.argmax(1) == labels))
    difference = np.abs(outputs - reference)
    figures = {
        "max_abs_diff": float(difference.max()) if difference.size else 0.0,
        "agreement": float(np.mean(outputs.argmax(1) == reference.argmax(1))),
        "accuracy": accuracy, "keras_accuracy": keras_accuracy, "accuracy_change": accuracy - keras_accuracy,
        "test_samples": int(len(labels)), **fidelity(outputs, reference),
        "rule": ({"kind": "float", "atol": FLOAT_ATOL, "rtol": FLOAT_RTOL} if fmt.kind == "float" else
                 {"kind": "quantized", "max_accuracy_drop": max_accuracy_drop, "min_agreement": MIN_AGREEMENT}),
    }
    if fmt.kind == "float":
        over = ~(difference <= FLOAT_ATOL + FLOAT_RTOL * np.abs(reference))  # NaN is over
        if over.any():
            return figures, (f"{int(over.sum())} of {over.size} outputs differ from {against} by more than "
                             f"{FLOAT_ATOL:g} + {FLOAT_RTOL:g} x |output| (max |difference| {figures['max_abs_diff']:.2e})")
        return figures, ""
    drop = (keras_accuracy - accuracy) * 100
    if not drop <= max_accuracy_drop + 1e-9:
        return figures, (f"accuracy {accuracy:.2%} is {drop:.2f} {BUDGET_MISS} {against}'s {keras_accuracy:.2%} on "
                         f"{len(labels)} images (budget {max_accuracy_drop:g} points)")
    if not figures["agreement"] >= MIN_AGREEMENT:
        return figures, (f"top-1 agreement with {against} {figures['agreement']:.2%} is below {MIN_AGREEMENT:.0%} on "
                         f"{len(labels)} images: the file does not make the float model's predictions")
    return figures, ""
