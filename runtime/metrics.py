"""Classification metrics on numpy arrays: what training, export checks and eval report."""

from __future__ import annotations

import numpy as np


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
