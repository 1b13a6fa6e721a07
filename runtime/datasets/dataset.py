"""A dataset as EdgeKit holds it: uint8 pixels (N, H, W, C) in fixed train, validation and test splits made by
one seeded stratified split, with its labels and its preprocessing; and what every reader shares."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.artifacts.preprocessing import Preprocessing, resize_filters
from runtime.errors import EdgeKitError

SPLIT_SEED = 20240601  # fixes every split EdgeKit makes; recorded in manifests
SPLITS = ("train", "val", "test")
MAX_IMAGE_SIDE = 1024  # pixels a side; edge classifiers take 28 to 224


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str  # the spec it was loaded by, e.g. "digits" or "folder:/data/flowers"
    x_train: np.ndarray  # uint8 (N, H, W, C)
    y_train: np.ndarray  # int64 (N,)
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]  # class names, index = label
    preprocessing: Preprocessing
    source: str  # where the pixels were read from
    split: dict  # how the splits were made: method, seed, sizes

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocessing.input_shape

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(preprocessed float32 images, labels) of one split."""
        if split not in SPLITS:
            raise EdgeKitError(f"unknown split '{split}'; expected one of {SPLITS}.")
        x = getattr(self, f"x_{split}")
        return self.preprocessing.apply(x), getattr(self, f"y_{split}")

    def describe(self) -> dict:
        """The manifest's `dataset` record."""
        return {
            "name": self.name, "source": self.source, "num_classes": self.num_classes,
            "split": {**self.split, "sizes": {s: int(len(getattr(self, f"y_{s}"))) for s in SPLITS}},
        }


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int = SPLIT_SEED):
    """Indices (train, val, test), each class split in the same proportions.

    Every class with at least 3 examples gives at least one to each non-empty split.
    """
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, round(len(idx) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(idx) * val_fraction)) if val_fraction > 0 else 0
        if len(idx) - n_test - n_val < 1:
            raise EdgeKitError(
                f"class {cls} has {len(idx)} example(s); expected at least {n_test + n_val + 1} "
                "to give train, validation and test splits one each. Add images to that class."
            )
        parts[0].append(idx[n_test + n_val:])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[2].append(idx[:n_test])
    return tuple(np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts)


def keras_cache_dir() -> Path:
    """Where Keras caches datasets (KERAS_HOME, else ~/.keras), so downloads are shared with it."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def downloads_allowed(download: bool) -> bool:
    return download and os.environ.get("EDGEKIT_OFFLINE", "") not in ("1", "true", "yes")


def resize_pixels(x: np.ndarray, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """Resize a uint8 (N, H, W, C) batch with Pillow, converting channel count if asked."""

    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(x), *size, channels), np.uint8)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        pil = pil.convert(mode)
        if pil.size != (size[1], size[0]):
            pil = pil.resize((size[1], size[0]), resize_filters()[resize])
        out[i] = np.asarray(pil, np.uint8).reshape(*size, channels)
    return out
