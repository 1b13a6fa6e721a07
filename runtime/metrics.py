"""Classification metrics on numpy arrays: what training, export checks and eval report."""

from __future__ import annotations

import numpy as np

from runtime.errors import EdgeKitError


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = examples of true class i predicted as j."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return counts


def classification_summary(y_true: np.ndarray, y_pred: np.ndarray, labels) -> dict:
    """Accuracy, per-class accuracy and confusion counts, JSON-ready."""
    labels = list(labels)
    counts = confusion_matrix(y_true, y_pred, len(labels))
    support = counts.sum(axis=1)
    per_class = {
        name: (float(counts[i, i] / support[i]) if support[i] else None) for i, name in enumerate(labels)
    }
    return {
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0,
        "samples": int(len(y_true)),
        "per_class_accuracy": per_class,
        "confusion": counts.tolist(),
    }


def describe_preprocessing(pre) -> str:
    """'(pixels x 0.00392157 - [0.0]) / [1.0], 0..255 to 0..1' for a message."""
    values = pre.apply(np.array([[[[0] * pre.channels], [[255] * pre.channels]]], np.uint8)).ravel()
    return (f"(pixels x {pre.scale:.6g} - {list(pre.mean)}) / {list(pre.std)}, 0..255 to "
            f"{float(values.min()):.4g}..{float(values.max()):.4g}")


def check_above_chance(name: str, accuracy: float, images: int, classes: int, dataset: str, preprocessing) -> None:
    """A model from elsewhere under twice chance (2/classes) on the test split is refused (EdgeKitError): every file
    made from it would be verified against a broken reference, and an optimization judged against one. Most often
    it is fed other preprocessing than it was trained with (raw 0..255 pixels, a Rescaling inside, Normalize(0.5,
    0.5)). Too few images to tell (under 10 a class): not judged."""

    if classes < 2 or images < 10 * classes:
        return
    if accuracy < 2 / classes:
        raise EdgeKitError(
            f"{name} scores {accuracy:.2%} on the {images} test images of {dataset}, under twice chance "
            f"(1/{classes}): nothing made from it could be verified against it. Most likely it was trained on other "
            f"preprocessing than the one given, {describe_preprocessing(preprocessing)}; pass --mean and --std in "
            "pixel units as it was trained (0 and 1 for raw 0..255 pixels, 127.5 and 127.5 for [-1, 1]), or "
            "--dataset the one it was trained on (--allow-untrained takes it as it is).")
