"""scikit-learn's digits, embedded: 1,797 real 8x8 handwritten digits, offline.

`digits.npz` is a verbatim copy of `sklearn.datasets.load_digits()` (BSD-3-Clause,
from the UCI ML hand-written digits data; pixel values 0..16), stored here so the
runtime can evaluate on it without scikit-learn; a test checks the copy against
scikit-learn's. Images are scaled to 0..255 and resized to 28x28x1 so they drop
into every model, then split 70/10/20 (train/val/test) per class by SPLIT_SEED.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets.dataset import SPLIT_SEED, Dataset, resize_pixels, stratified_split

NPZ = Path(__file__).with_name("digits.npz")
SIZE = (28, 28)
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2


def raw() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images (values 0..16) and their labels, as scikit-learn ships them."""
    with np.load(NPZ, allow_pickle=False) as data:
        return data["images"], data["target"].astype(np.int64)


def load(data_dir=None, download=True) -> Dataset:
    del data_dir, download  # embedded: nothing to find or fetch
    images, target = raw()
    pixels = np.round(images.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    pre = Preprocessing(size=SIZE, channels=1)
    pixels = resize_pixels(pixels, SIZE, 1, pre.resize)  # (1797, 8, 8, 1) -> (1797, 28, 28, 1)
    train, val, test = stratified_split(target, VAL_FRACTION, TEST_FRACTION, SPLIT_SEED)
    return Dataset(
        name="digits",
        x_train=pixels[train], y_train=target[train],
        x_val=pixels[val], y_val=target[val],
        x_test=pixels[test], y_test=target[test],
        labels=tuple(str(d) for d in range(10)),
        preprocessing=pre,
        source="embedded copy of sklearn.datasets.load_digits",
        split={"method": "stratified", "seed": SPLIT_SEED, "fractions": {"val": VAL_FRACTION, "test": TEST_FRACTION}},
    )
