"""The one rule that verifies every exported file (the formats themselves: runtime/vocabulary.py).

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

import math

import numpy as np

from runtime.errors import AccuracyBudgetMissed, FloatMismatch, LowAgreement, NonFiniteOutputs, VerificationError
from runtime.vocabulary import MAX_ACCURACY_DROP, FileFormat

FLOAT_ATOL = 1e-4  # float formats: |output - Keras| <= FLOAT_ATOL + FLOAT_RTOL * |Keras|
FLOAT_RTOL = 1e-3
MIN_AGREEMENT = 0.95  # quantized formats: top-1 agreement with Keras (see the module docstring)
SQNR_CAP_DB = 200.0  # an exact file has infinite SQNR; JSON has no infinity


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> dict:
    """SQNR in dB and cosine similarity of a file's outputs against the float model's."""
    outputs, reference = outputs.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    if not (np.isfinite(outputs).all() and np.isfinite(reference).all()):  # NaN is never a fidelity: the worst
        return {"sqnr_db": -SQNR_CAP_DB, "cosine": 0.0}
    signal, noise = float(np.sum(reference ** 2)), float(np.sum((reference - outputs) ** 2))
    sqnr = SQNR_CAP_DB if noise == 0 else min(SQNR_CAP_DB, 10 * math.log10(signal / noise) if signal else -SQNR_CAP_DB)
    norms = float(np.linalg.norm(outputs) * np.linalg.norm(reference))
    return {"sqnr_db": round(sqnr, 3), "cosine": float(np.dot(outputs, reference) / norms) if norms else 0.0}


def verify(fmt: FileFormat, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray,
           max_accuracy_drop: float = MAX_ACCURACY_DROP,
           against: str = "Keras") -> tuple[dict, VerificationError | None]:
    """The verification rule (module docstring): the figures, and None or the rule the file breaks, typed (its
    message says why). Every comparison fails on NaN: a non-finite output, the file's or the float model's, fails
    the file. `against`: what `reference` came from, as the messages name it (Keras, or an ONNX source)."""
    for name, values in (("the file's", outputs), ("the float model's", reference)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            return ({"non_finite_outputs": bad, "test_samples": int(len(labels)), "rule": {"kind": fmt.kind}},
                    NonFiniteOutputs(f"{bad:,} of {np.size(values):,} of {name} outputs on {len(labels)} test "
                                     "images are NaN or infinite: a model whose outputs are not numbers is never "
                                     "verified (train it again; check its weights)"))
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
            return figures, FloatMismatch(f"{int(over.sum())} of {over.size} outputs differ from {against} by more "
                                          f"than {FLOAT_ATOL:g} + {FLOAT_RTOL:g} x |output| (max |difference| "
                                          f"{figures['max_abs_diff']:.2e})")
        return figures, None
    drop = (keras_accuracy - accuracy) * 100
    if not drop <= max_accuracy_drop + 1e-9:
        return figures, AccuracyBudgetMissed(f"accuracy {accuracy:.2%} is {drop:.2f} points below {against}'s "
                                             f"{keras_accuracy:.2%} on {len(labels)} images (budget "
                                             f"{max_accuracy_drop:g} points)")
    if not figures["agreement"] >= MIN_AGREEMENT:
        return figures, LowAgreement(f"top-1 agreement with {against} {figures['agreement']:.2%} is below "
                                     f"{MIN_AGREEMENT:.0%} on {len(labels)} images: the file does not make the float "
                                     "model's predictions")
    return figures, None
