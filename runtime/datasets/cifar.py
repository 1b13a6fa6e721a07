"""CIFAR-10 from the "python version" batches (`cifar-10-batches-py/`).

Looked for in `--data-dir` (the extracted folder or `cifar-10-python.tar.gz`), then in the
Keras cache (`~/.keras/datasets/cifar-10-batches-py`), then downloaded there unless
offline. The batches are pickles; they are read with an unpickler that only builds
plain containers and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets.dataset import SPLIT_SEED, Dataset, downloads_allowed, keras_cache_dir, stratified_split
from runtime.datasets.download import fetch
from runtime.errors import EdgeKitError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER, ARCHIVE = "cifar-10-batches-py", "cifar-10-python.tar.gz"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # per-channel, of the training set
VAL_FRACTION = 0.1


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {(f"numpy{core}.multiarray", name) for core in ("._core", ".core")
                for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _SafeUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return data, np.asarray(batch[b"labels"], np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
        raise EdgeKitError(f"{path} is not a valid CIFAR-10 batch ({exc}); extract the archive again.") from None


def _extract(archive: Path, into: Path) -> Path:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EdgeKitError(f"cannot extract {archive} ({exc}); it is truncated or corrupt.") from None
    return into / FOLDER


def _locate(data_dir: Path | None, download: bool) -> Path:
    if data_dir is not None:
        for candidate in (data_dir / FOLDER, data_dir):
            if (candidate / "test_batch").is_file():
                return candidate
        if (data_dir / ARCHIVE).is_file():
            return _extract(data_dir / ARCHIVE, data_dir)
        raise EdgeKitError(
            f"CIFAR-10 not found in --data-dir {data_dir}; expected {FOLDER}/ "
            f"(data_batch_1..5, test_batch) or {ARCHIVE} there."
        )
    cache = keras_cache_dir()
    if (cache / FOLDER / "test_batch").is_file():
        return cache / FOLDER
    if not downloads_allowed(download):
        raise EdgeKitError(
            f"CIFAR-10 not found in the Keras cache {cache / FOLDER} and downloads are off; "
            f"put {ARCHIVE} or the extracted {FOLDER}/ in --data-dir DIR."
        )

    try:
        archive = fetch(URL, cache / ARCHIVE, "CIFAR-10")
    except EdgeKitError as exc:
        raise EdgeKitError(f"{exc}; offline, put {ARCHIVE} or {FOLDER}/ in --data-dir DIR.") from None
    return _extract(archive, cache)


def load(data_dir: Path | None = None, download: bool = True, test_only: bool = False) -> Dataset:
    """CIFAR-10 with its official test set; `test_only` (eval): `test_batch` alone suffices (the train and
    validation splits are then empty)."""
    folder = _locate(data_dir, download)
    missing = [b for b in BATCHES if not (folder / b).is_file()]
    if test_only and missing and "test_batch" not in missing:
        x_test, y_test = _read_batch(folder / "test_batch")
        x_none, y_none = np.zeros((0, *x_test.shape[1:]), np.uint8), np.zeros(0, np.int64)
        train, val, parts = slice(0, 0), slice(0, 0), [(x_none, y_none), (x_test, y_test)]
    elif missing:
        raise EdgeKitError(f"{folder} lacks CIFAR-10 batches {missing}; extract the archive again"
                           + (" (evaluating needs only test_batch)." if "test_batch" not in missing else "."))
    else:
        parts = [_read_batch(folder / b) for b in BATCHES]
    x_all = np.concatenate([p[0] for p in parts[:-1]])
    y_all = np.concatenate([p[1] for p in parts[:-1]])
    if len(y_all):
        train, val, _ = stratified_split(y_all, VAL_FRACTION, 0.0, SPLIT_SEED)
    return Dataset(
        name="cifar10",
        x_train=x_all[train], y_train=y_all[train], x_val=x_all[val], y_val=y_all[val],
        x_test=parts[-1][0], y_test=parts[-1][1],
        labels=LABELS,
        preprocessing=Preprocessing(size=(32, 32), channels=3, mean=MEAN, std=STD),
        source=str(folder),
        split={"method": "official test set; stratified validation from train", "seed": SPLIT_SEED,
               "fractions": {"val": VAL_FRACTION}},
    )
