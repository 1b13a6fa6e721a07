"""Datasets: one registry, one interface, numpy and Pillow only.

    load_dataset("digits")            embedded default: scikit-learn's 8x8 digits at 28x28x1
    load_dataset("mnist")             IDX files from --data-dir, the Keras cache, or a download
    load_dataset("fashion_mnist")     idem, with Fashion-MNIST's class names
    load_dataset("cifar10")           the python batches from --data-dir, the Keras cache, or a download
    load_dataset("folder:PATH")       PATH/<class>/<image>.png|jpg, one sub-folder per class

Every loader returns raw uint8 pixels (N, H, W, C) and int64 labels for fixed
train/val/test splits, with the `Preprocessing` that turns pixels into model
input. The test split is fixed by `SPLIT_SEED` (or is the dataset's official
test set), and `Dataset.describe()` records it, so training, optimization, export
and the runtime all evaluate on exactly the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets import cifar, digits, folder, idx
from runtime.datasets.dataset import (MAX_IMAGE_SIDE, SPLIT_SEED, SPLITS, Dataset, available_memory, downloads_allowed,
                                      resize_pixels, stratified_split)
from runtime.errors import EdgeKitError, unknown

__all__ = ["DATASET_NAMES", "SPLIT_SEED", "Dataset", "dataset_for_model", "downloads_allowed", "load_dataset",
           "load_for_manifest", "registry", "resized", "stratified_split"]


def registry():
    return {
        "digits": digits.load,
        "mnist": idx.load_mnist,
        "fashion_mnist": idx.load_fashion_mnist,
        "cifar10": cifar.load,
    }


DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "folder:PATH")


def load_dataset(
    spec: str,
    data_dir: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    download: bool = True,
    test_only: bool = False,
) -> Dataset:
    """Load a dataset by name (see the module docstring), optionally resized.

    `data_dir` is where the user keeps the files (searched first, and only there
    when given); `download=False` or EDGEKIT_OFFLINE=1 forbids downloads.
    `image_size`/`channels` resize every split (and the preprocessing) to a model's input.
    `test_only`: the test split is all that is needed (eval): MNIST-style IDX data then needs only its two t10k
    files in `data_dir`, CIFAR-10 only `test_batch`, a folder with `train/` and `test/` only its `test/` images;
    the train and validation splits may be empty.
    """
    if spec.startswith("folder:"):
        dataset = folder.load(spec, size=image_size, channels=channels, test_only=test_only)
    else:
        loaders = registry()
        if spec not in loaders:
            raise unknown("dataset", spec, list(loaders) + ["folder:PATH"])
        extra = {"test_only": True} if test_only and spec in ("mnist", "fashion_mnist", "cifar10") else {}
        dataset = loaders[spec](data_dir=Path(data_dir) if data_dir else None, download=download, **extra)
    return resized(dataset, image_size, channels)


def dataset_for_model(path, name: str, data_dir, image: tuple[int, int, int], classes: int) -> Dataset:
    """The dataset `name` at a model file's input size (height, width, channels), refused in one line when its
    classes are not the model's outputs."""
    dataset = load_dataset(name, data_dir, image_size=image[:2], channels=image[2])
    if classes != dataset.num_classes:
        raise EdgeKitError(f"{path} outputs {classes} classes, but {name} has {dataset.num_classes}; pass the "
                           "dataset the model was trained on.")
    return dataset


def resized(dataset: Dataset, image_size=None, channels=None) -> Dataset:
    """The dataset at another (height, width) and/or channel count; unchanged if it already is."""
    pre = dataset.preprocessing
    size = tuple(image_size) if image_size else pre.size
    channels = channels or pre.channels
    if channels not in (1, 3):
        raise EdgeKitError(f"channels must be 1 or 3; got {channels}.")
    if len(size) != 2 or min(size) < 1 or max(size) > MAX_IMAGE_SIDE:
        raise EdgeKitError(f"image size must be 1 to {MAX_IMAGE_SIDE} pixels a side; got {size}.")
    if size == pre.size and channels == pre.channels:
        return dataset
    images = sum(len(getattr(dataset, f"y_{s}")) for s in SPLITS)
    needed = images * size[0] * size[1] * channels * 9  # the uint8 pixels, then float32 training copies of them
    available = available_memory()
    if available is not None and needed > available:
        raise EdgeKitError(f"{images:,} images at {size[0]}x{size[1]}x{channels} need about {needed / 2**30:.1f} GiB "
                           f"to train on; this machine has {available / 2**30:.1f} GiB available. Choose a smaller "
                           "--image-size.")
    mean, std = pre.mean, pre.std
    if channels != pre.channels:  # per-channel statistics no longer apply: average them
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    new_pre = dataclasses.replace(pre, size=size, channels=channels, mean=mean, std=std)
    arrays = {
        f"x_{s}": resize_pixels(getattr(dataset, f"x_{s}"), size, channels, pre.resize) for s in SPLITS
    }
    return dataclasses.replace(dataset, preprocessing=new_pre, **arrays)


def load_for_manifest(manifest: dict, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """The dataset an artifact was made on, at its preprocessing, with the same fixed splits.

    `data_dir` overrides where the files are; otherwise the directory recorded as the
    dataset's source is searched. Split sizes must match the manifest's, so every stage
    evaluates on the very same test images.
    """
    record = manifest["dataset"]
    name = record["name"]
    source = Path(record.get("source", ""))
    if data_dir is None and not name.startswith("folder:") and source.is_dir():
        data_dir = source
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    dataset = load_dataset(name, data_dir, image_size=pre.size, channels=pre.channels, download=download)
    dataset = dataclasses.replace(dataset, preprocessing=pre)  # the artifact's own (a backbone's, say)
    expected = record.get("split", {}).get("sizes")
    actual = dataset.describe()["split"]["sizes"]
    if expected and expected != actual:
        raise EdgeKitError(
            f"dataset {name} now gives splits {actual}, but the artifact was made on {expected}; "
            "the data files changed. Point --data-dir at the files the artifact was trained on."
        )
    return dataset
