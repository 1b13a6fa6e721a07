"""Proven where it runs: every exported file run as the user's own app runs it, besides EdgeKit's runtime.

A TFLite file in bare LiteRT (`ai_edge_litert.interpreter.Interpreter(model_path=...)`, its default options:
XNNPACK on), an ONNX file in a default onnxruntime session, each fed one test image per call (batch 1, as an
app on a device calls it) with exactly the input tensor EdgeKit's runtime computes for that image
(`Model.input_tensors`: preprocessing, quantization and layout), and its outputs judged by the same rule as
EdgeKit's own (`export.verify.verify`). EdgeKit's runtime densifies a sparse file first; bare LiteRT's XNNPACK
refuses a sparse int8 or dynamic-range file, so such a file (`export --sparse`, opt-in) is recorded as needing
EdgeKit's runtime on the device (`runtime.artifacts.manifest.needs_edgekit`) and never recommended for a device without
it. Any other file that bare LiteRT or onnxruntime refuses, or answers outside the rule, fails verification.
A micro file is TFLM's (export/micro.py), which is already what a firmware runs.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter

from runtime.errors import first_line


def runtime_name(backend: str) -> str:
    """The runtime and its version, as the user installs it."""

    package = "ai-edge-litert" if backend == "tflite" else "onnxruntime"
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "?"
    return f"{package} {version}, " + ("default options (XNNPACK)" if backend == "tflite" else "default session")


def bare_outputs(path: Path, backend: str, tensors: np.ndarray) -> np.ndarray:
    """The output tensor for each row of `tensors` (each fed as a batch of one), from bare LiteRT or onnxruntime
    with their default options. Raises what the runtime raises."""
    if backend == "tflite":
        interpreter = Interpreter(model_path=str(path))  # the defaults a user's app gets: XNNPACK applied
        interpreter.allocate_tensors()
        (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()
        rows = []
        for tensor in tensors:
            interpreter.set_tensor(source["index"], tensor[None])
            interpreter.invoke()
            rows.append(interpreter.get_tensor(sink["index"])[0].copy())
        return np.stack(rows)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # the CPU build's default
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: tensor[None]})[0] for tensor in tensors])


def check(fmt, path: Path, model, x_test: np.ndarray, edgekit_logits: np.ndarray, judge) -> dict:
    """Run `path` in the user's runtime on the test split and judge it; the sidecar's `bare` record:
    {"runtime", "passed", "accuracy", "agreement" (top-1 with EdgeKit's runtime), "max_diff", "reason"}.
    `judge(logits)` is export's rule: (figures, the rule the outputs break or None)."""
    record = {"runtime": runtime_name(fmt.backend), "passed": False, "accuracy": None, "agreement": None,
              "max_diff": None, "reason": None}
    try:
        raw = bare_outputs(path, fmt.backend, model.input_tensors(x_test))
    except Exception as exc:  # noqa: BLE001 -- the runtime's refusal is the finding, in its own words
        record["reason"] = f"{record['runtime'].split(',')[0]} refuses it: {first_line(exc)[:300]}"
        return record
    logits = model.output_values(raw.reshape(len(x_test), -1))
    figures, failure = judge(logits)
    record.update(accuracy=figures.get("accuracy"),
                  agreement=float(np.mean(logits.argmax(axis=1) == edgekit_logits.argmax(axis=1))),
                  max_diff=float(np.max(np.abs(logits - edgekit_logits))) if logits.size else 0.0,
                  passed=failure is None, reason=str(failure) if failure else None)
    return record
