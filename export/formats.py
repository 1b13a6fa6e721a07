"""The one table of export formats, looked up by key.

    key         file                        backend                 verified by
    float32     model.float32.tflite        TFLite converter        max |logit diff| <= 1e-4
    float16     model.float16.tflite        TFLite (fp16 weights)   top-1 agreement >= 99.5%
    dynamic     model.dynamic.tflite        TFLite (int8 weights)   top-1 agreement >= 99.5%
    int8        model.int8.tflite           TFLite full integer     accuracy within 1.0 point
    int16x8     model.int16x8.tflite        TFLite 16-bit acts      accuracy within 1.0 point
    onnx        model.onnx-float32.onnx     tf2onnx                 max |logit diff| <= 1e-4
    onnx-int8   model.onnx-int8.onnx        onnxruntime QDQ static  accuracy within 1.0 point

A quantization-aware artifact (qat, pqat, cqat) exports to `int8` only: its learned
ranges make the integer model, with no calibration.
"""

from __future__ import annotations

import dataclasses

from runtime.errors import EdgeKitError, suggest

MAX_ABS_DIFF = 1e-4  # float formats: max |logit difference| vs Keras
MIN_AGREEMENT = 0.995  # float16 / dynamic: top-1 agreement with Keras
MAX_ACCURACY_DROP = 0.01  # integer formats: accuracy within 1.0 point of Keras


@dataclasses.dataclass(frozen=True)
class Format:
    key: str
    variant: str  # file name part: model.<variant>.<suffix>, sidecar model.<variant>.json
    suffix: str
    backend: str  # "tflite" or "onnx"
    check: str  # "max_abs_diff", "agreement" or "accuracy"
    options: frozenset = frozenset()  # options this format accepts
    description: str = ""

    @property
    def filename(self) -> str:
        return f"model.{self.variant}{self.suffix}"

    @property
    def sidecar(self) -> str:
        return f"model.{self.variant}.json"


_CALIBRATED = frozenset({"calibration_samples"})
FORMATS = {f.key: f for f in (
    Format("float32", "float32", ".tflite", "tflite", "max_abs_diff", description="TFLite float32"),
    Format("float16", "float16", ".tflite", "tflite", "agreement", description="TFLite with float16 weights"),
    Format("dynamic", "dynamic", ".tflite", "tflite", "agreement",
           description="TFLite dynamic range: int8 weights, float activations"),
    Format("int8", "int8", ".tflite", "tflite", "accuracy", _CALIBRATED,
           "TFLite full integer: int8 weights, activations, input and output"),
    Format("int16x8", "int16x8", ".tflite", "tflite", "accuracy", _CALIBRATED,
           "TFLite 16-bit activations, 8-bit weights"),
    Format("onnx", "onnx-float32", ".onnx", "onnx", "max_abs_diff", frozenset({"opset"}),
           "ONNX float32 via tf2onnx, dynamic batch"),
    Format("onnx-int8", "onnx-int8", ".onnx", "onnx", "accuracy",
           frozenset({"opset", "calibration_samples", "calibration_method"}),
           "ONNX int8 (QDQ, per-channel weights) via onnxruntime static quantization"),
)}
QAT_FORMATS = ("int8",)


def get_format(key: str) -> Format:
    if key not in FORMATS:
        raise EdgeKitError(f"unknown format '{key}'; expected one of: {', '.join(FORMATS)}.{suggest(key, FORMATS)}")
    return FORMATS[key]


def check_options(fmt: Format, options: dict) -> None:
    """Reject an option the format does not take (e.g. --opset for a TFLite file)."""
    for name, value in options.items():
        if value is not None and name not in fmt.options:
            takers = [f.key for f in FORMATS.values() if name in f.options]
            raise EdgeKitError(
                f"format {fmt.key} does not take --{name.replace('_', '-')}; formats that do: {', '.join(takers)}."
            )
