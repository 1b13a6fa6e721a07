"""PNG plots for people: training curves and the confusion matrix (matplotlib, lazily)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from runtime.fsutil import atomic_write_bytes


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_training(history: dict, path: Path, title: str, best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, train and validation, with the kept epoch marked."""
    plt = pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label, scale in ((axes[0], "loss", "loss (cross-entropy)", 1),
                                     (axes[1], "accuracy", "accuracy (%)", 100)):  # accuracy in % in every plot
        ax.plot(epochs, np.asarray(history[metric]) * scale, "o-", ms=3, label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, np.asarray(history[f"val_{metric}"]) * scale, "o-", ms=3, label="validation")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)
    plt.close(fig)


def plot_confusion(counts: np.ndarray, labels, path: Path, title: str) -> None:
    """Confusion matrix with counts in the cells and class names on both axes."""
    plt = pyplot()
    n = len(labels)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if counts[i, j] > threshold else "black")
    ax.set_title(title)
    save_png(fig, path)
    plt.close(fig)
