"""MNIST and Fashion-MNIST from the standard IDX files.

IDX layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions, then one uint32 per dimension, then the data. Files may be
gzipped (`.gz`, as distributed) or plain. Where the files are looked for, in order:

1. `--data-dir` (and only there, when given): the four IDX files;
2. the Keras cache: `~/.keras/datasets/fashion-mnist/*.gz`, or `mnist.npz` for MNIST
   (what `keras.datasets.*.load_data()` leaves behind);
3. a download into that cache, unless offline.

The official 10,000-image test set is the test split; validation is a stratified
1/12 of the training set (5,000 of 60,000).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets.dataset import SPLIT_SEED, Dataset, downloads_allowed, keras_cache_dir, stratified_split
from runtime.datasets.download import fetch
from runtime.errors import EdgeKitError
from runtime.fsutil import check_readable_file

FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KERAS_BASE = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
VAL_FRACTION = 1 / 12
_UBYTE = 0x08


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode an IDX byte string into a uint8 array, rejecting anything malformed."""
    if len(data) < 4:
        raise EdgeKitError(f"{name} is {len(data)} bytes long; an IDX header needs at least 4. The file is truncated.")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or ndim == 0:
        raise EdgeKitError(
            f"{name} does not start with an IDX magic number (got 0x{data[:4].hex()}); "
            "expected 0x00000801 (labels) or 0x00000803 (images). The file is corrupt or not IDX."
        )
    if dtype != _UBYTE:
        raise EdgeKitError(f"{name} holds IDX type 0x{dtype:02x}; expected 0x08 (unsigned bytes).")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise EdgeKitError(f"{name} ends inside its IDX header ({len(data)} of {header} bytes). The file is truncated.")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise EdgeKitError(
            f"{name} {problem}: its header promises shape {dims} ({expected} bytes), "
            f"the file holds {len(data)} bytes. Download the file again."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


MAX_IDX_BYTES = 1 << 30  # 1 GiB: 20 times MNIST's training images; a header promising more is refused


def read_idx(path: Path) -> np.ndarray:
    """Read a plain or gzipped IDX file, streaming: the header decides how much is read, so a gzip bomb
    or a header promising gigabytes is refused before the memory is taken."""

    check_readable_file(path, "IDX file")
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
            head = fh.read(4)
            if len(head) == 4 and head[:2] == b"\0\0" and 0 < head[3]:
                head += fh.read(4 * head[3])
            promised = _promised_bytes(head)
            if promised is not None and promised > MAX_IDX_BYTES:
                raise EdgeKitError(f"{path}: its IDX header promises {promised:,} bytes of data; expected at most "
                                   f"{MAX_IDX_BYTES:,} (MNIST's largest file holds 47,040,000). The file is corrupt "
                                   "or not an MNIST-style IDX file.")
            body = fh.read(promised + 1) if promised is not None else fh.read(MAX_IDX_BYTES)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise EdgeKitError(f"{path} is not a valid gzip file ({exc}); it is truncated or corrupt. Download it again.") from None
    except OSError as exc:
        raise EdgeKitError(f"cannot read {path}: {exc.strerror or exc}.") from None
    return parse_idx(head + body, str(path))


def _promised_bytes(head: bytes) -> int | None:
    """Data bytes an IDX header promises, or None if `head` is not a whole IDX header (parse_idx says why)."""
    if len(head) < 4 or head[:2] != b"\0\0" or head[3] == 0 or len(head) < 4 + 4 * head[3]:
        return None
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(head[3])]
    return math.prod(dims)


def _find(directory: Path, filename: str) -> Path | None:
    for candidate in (filename, filename.removesuffix(".gz")):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def _from_idx_dir(directory: Path, test_only: bool = False) -> dict[str, np.ndarray] | None:
    """The four IDX files' arrays; with `test_only`, the two t10k files suffice (the train split is then empty:
    evaluating needs only the fixed official test set)."""
    paths = {key: _find(directory, name) for key, name in FILES.items()}
    if test_only and paths["x_test"] and paths["y_test"] and not (paths["x_train"] and paths["y_train"]):
        arrays = {key: read_idx(paths[key]) for key in ("x_test", "y_test")}
        return {**arrays, "x_train": np.zeros((0, *arrays["x_test"].shape[1:]), np.uint8),
                "y_train": np.zeros(0, np.uint8)}
    if not all(paths.values()):
        return None
    return {key: read_idx(path) for key, path in paths.items()}


def _from_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in FILES}
    except (OSError, ValueError, KeyError, zlib.error) as exc:
        raise EdgeKitError(f"{path} is not a valid MNIST .npz ({exc}); delete it so it can be fetched again.") from None


def _missing_error(title: str, where: str, data_dir: Path | None, why: str, test_only: bool = False
                   ) -> EdgeKitError:
    names = ", ".join(FILES[k] for k in (("x_test", "y_test") if test_only else FILES))
    place = f"--data-dir {data_dir}" if data_dir else f"--data-dir DIR (or {where})"
    return EdgeKitError(
        f"{title} files not found{why}. Expected the {'two' if test_only else 'four'} IDX files {names} "
        f"(gzipped or not) in {place}."
    )


def _check(arrays: dict[str, np.ndarray], source: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1:
            raise EdgeKitError(f"{source}: {split} images must be 3-D and labels 1-D; got {x.shape} and {y.shape}.")
        if len(x) != len(y):
            raise EdgeKitError(f"{source}: {len(x)} {split} images but {len(y)} labels; the files do not belong together.")
        if len(y) and y.max() > 9:
            raise EdgeKitError(f"{source}: {split} labels go up to {y.max()}; expected 0..9.")


def _load(title, name, labels, cache_subdir, npz_name, data_dir, download, test_only=False) -> Dataset:
    cache = keras_cache_dir()
    if data_dir is not None:
        if not data_dir.is_dir():
            raise EdgeKitError(f"--data-dir {data_dir} is not a directory.")
        arrays, source = _from_idx_dir(data_dir, test_only), str(data_dir)
        if arrays is None:
            raise _missing_error(title, "", data_dir, f" in {data_dir}", test_only)
    else:
        arrays, source = _from_idx_dir(cache / cache_subdir), str(cache / cache_subdir)
        if arrays is None and npz_name and (cache / npz_name).is_file():
            arrays, source = _from_npz(cache / npz_name), str(cache / npz_name)
        if arrays is None:
            where = f"the Keras cache {cache / cache_subdir}"
            if not downloads_allowed(download):
                raise _missing_error(title, where, None, " and downloads are off")

            try:
                if npz_name:  # Keras's own MNIST cache format
                    arrays, source = _from_npz(fetch(KERAS_BASE + npz_name, cache / npz_name, title)), str(cache / npz_name)
                else:
                    for filename in FILES.values():
                        if not (cache / cache_subdir / filename).is_file():
                            fetch(KERAS_BASE + filename, cache / cache_subdir / filename, title)
                    arrays, source = _from_idx_dir(cache / cache_subdir), str(cache / cache_subdir)
            except EdgeKitError as exc:
                raise _missing_error(title, where, None, f" and {exc}") from None
    _check(arrays, source)
    train, val, _ = stratified_split(arrays["y_train"], VAL_FRACTION, 0.0, SPLIT_SEED)
    x_train, y_train = arrays["x_train"][..., None], arrays["y_train"].astype(np.int64)
    return Dataset(
        name=name,
        x_train=x_train[train], y_train=y_train[train],
        x_val=x_train[val], y_val=y_train[val],
        x_test=arrays["x_test"][..., None], y_test=arrays["y_test"].astype(np.int64),
        labels=labels,
        preprocessing=Preprocessing(size=x_train.shape[1:3], channels=1),
        source=source,
        split={"method": "official test set; stratified validation from train", "seed": SPLIT_SEED,
               "fractions": {"val": VAL_FRACTION}},
    )


def load_mnist(data_dir: Path | None = None, download: bool = True, test_only: bool = False) -> Dataset:
    # Keras keeps MNIST as mnist.npz; the IDX files are found in data_dir or ~/.keras/datasets/mnist/.
    return _load("MNIST", "mnist", tuple(str(d) for d in range(10)), "mnist", "mnist.npz", data_dir, download,
                 test_only)


def load_fashion_mnist(data_dir: Path | None = None, download: bool = True, test_only: bool = False) -> Dataset:
    return _load("Fashion-MNIST", "fashion_mnist", FASHION_LABELS, "fashion-mnist", None, data_dir, download,
                 test_only)
