"""A folder of images, one sub-folder per class: `folder:PATH`.

    PATH/cat/001.png, PATH/cat/002.jpg, PATH/dog/...   -> labels ("cat", "dog"), split 70/10/20
    PATH/train/cat/..., PATH/test/cat/... [PATH/val/cat/...]   -> the splits as given (torchvision's ImageFolder
                                                                   habit)

Classes are the sub-folder names in sorted order (of `train/` when the splits are given; `test/` and `val/`
may lack a class, never add one). Images (PNG, JPEG, BMP, GIF, WebP; any size) are resized to `size` (default
28x28) and converted to `channels` (default: 3 if any image is in colour, else 1). A flat folder is split
70/10/20 per class by SPLIT_SEED, so a class needs at least 3 images; with `train/` and `test/` but no `val/`,
10% of train per class (the same seed) is the validation split. The splits are given when PATH holds `train/`
and `test/` folders whose entries are folders, not images (a flat folder may have classes called so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import IMAGE_SUFFIXES, Preprocessing, image_to_pixels, is_colour, open_image
from runtime.datasets.dataset import SPLIT_SEED, Dataset, stratified_split
from runtime.errors import EdgeKitError

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


def _given_splits(root: Path) -> dict[str, Path] | None:
    """{split: folder} when `root` holds train/ and test/ (and maybe val/) folders of class folders, else None."""
    if not root.is_dir():
        return None
    splits = {name: root / folder for name, folder in (("train", "train"), ("test", "test"), ("val", "val"))
              if (root / folder).is_dir()}

    def of_classes(folder: Path) -> bool:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        return any(p.is_dir() for p in entries) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)

    return splits if {"train", "test"} <= set(splits) and all(of_classes(f) for f in splits.values()) else None


def load(spec: str, size: tuple[int, int] | None = None, channels: int | None = None,
         test_only: bool = False) -> Dataset:
    """The folder's images; `test_only` (eval): with the splits given, only test/ is read."""
    root = Path(spec.removeprefix("folder:")).expanduser()
    given = _given_splits(root)
    if given is not None:
        return _load_given(root, given, size, channels, test_only)
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


def _load_given(root: Path, given: dict[str, Path], size, channels, test_only: bool) -> Dataset:
    """train/, test/ and maybe val/ as the splits, the classes train/'s."""
    scanned = {name: _scan(folder) for name, folder in given.items()}
    names = list(scanned["train"])
    for split in ("test", "val"):
        extra = sorted(set(scanned.get(split, {})) - set(names))
        if extra:
            raise EdgeKitError(f"{given[split]} has class folders that {given['train']} lacks: "
                               f"{', '.join(extra[:5])}; every class needs training images (or remove them).")
    read = ["test"] if test_only else list(scanned)
    paths = {split: [p for c in names for p in scanned[split].get(c, [])] for split in read}
    labels = {split: np.concatenate([np.full(len(scanned[split].get(c, [])), i, np.int64)
                                     for i, c in enumerate(names)]) for split in read}
    if channels is None:
        channels = 3 if any(is_colour(open_image(p)) for split in read for p in paths[split]) else 1
    pre = Preprocessing(size=tuple(size) if size else DEFAULT_SIZE, channels=channels)
    empty = np.zeros((0, *pre.size, channels), np.uint8)
    pixels = {split: np.stack([image_to_pixels(p, pre.size, pre.channels, pre.resize, pre.background)
                               for p in paths[split]]) if paths[split] else empty for split in read}
    x_train, y_train = pixels.get("train", empty), labels.get("train", np.zeros(0, np.int64))
    if "val" in given or test_only:
        x_val, y_val = pixels.get("val", empty), labels.get("val", np.zeros(0, np.int64))
        split = {"method": "given: train/, val/ and test/ folders" if "val" in given else "given: train/ and test/ folders",
                 "seed": SPLIT_SEED}
    else:
        train, val, _ = stratified_split(y_train, VAL_FRACTION, 0.0, SPLIT_SEED)
        x_train, y_train, x_val, y_val = x_train[train], y_train[train], x_train[val], y_train[val]
        split = {"method": "given: train/ and test/ folders; stratified validation from train", "seed": SPLIT_SEED,
                 "fractions": {"val": VAL_FRACTION}}
    return Dataset(
        name=f"folder:{root}",
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
        x_test=pixels["test"], y_test=labels["test"],
        labels=tuple(names),
        preprocessing=pre,
        source=str(root.resolve()),
        split=split,
    )
