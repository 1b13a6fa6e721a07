"""A folder of images, one sub-folder per class: `folder:PATH`.

    PATH/cat/001.png, PATH/cat/002.jpg, PATH/dog/...   -> labels ("cat", "dog")

Classes are the sub-folder names in sorted order. Images (PNG, JPEG, BMP, GIF, WebP; any size) are
resized to `size` (default 28x28) and converted to `channels` (default: 3 if any
image is in colour, else 1). Split 70/10/20 per class by SPLIT_SEED, so a class
needs at least 3 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.datasets import SPLIT_SEED, Dataset, stratified_split
from runtime.errors import EdgeKitError
from runtime.preprocessing import IMAGE_SUFFIXES, Preprocessing, image_to_pixels, is_colour, open_image

DEFAULT_SIZE = (28, 28)
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2


def _scan(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise EdgeKitError(
            f"folder dataset {root} is not a directory; expected PATH/<class name>/<image>.png|jpg."
        )
    classes = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise EdgeKitError(f"class folder {sub} holds no PNG, JPEG, BMP, GIF or WebP images; add some or remove the folder.")
        classes[sub.name] = images
    if len(classes) < 2:
        raise EdgeKitError(
            f"folder dataset {root} has {len(classes)} class sub-folder(s); expected at least 2 "
            "(one sub-folder of images per class)."
        )
    return classes


def load(spec: str, size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    root = Path(spec.removeprefix("folder:")).expanduser()
    classes = _scan(root)
    paths = [p for images in classes.values() for p in images]
    labels = np.concatenate([np.full(len(v), i, np.int64) for i, v in enumerate(classes.values())])
    if channels is None:
        channels = 3 if any(is_colour(open_image(p)) for p in paths) else 1
    pre = Preprocessing(size=tuple(size) if size else DEFAULT_SIZE, channels=channels)
    pixels = np.stack([image_to_pixels(p, pre.size, pre.channels, pre.resize, pre.background) for p in paths])
    train, val, test = stratified_split(labels, VAL_FRACTION, TEST_FRACTION, SPLIT_SEED)
    return Dataset(
        name=f"folder:{root}",
        x_train=pixels[train], y_train=labels[train], x_val=pixels[val], y_val=labels[val],
        x_test=pixels[test], y_test=labels[test],
        labels=tuple(classes),
        preprocessing=pre,
        source=str(root.resolve()),
        split={"method": "stratified", "seed": SPLIT_SEED, "fractions": {"val": VAL_FRACTION, "test": TEST_FRACTION}},
    )
