"""Inputs from files: .npy arrays (the header checked before anything is allocated, never pickle) and image
files, as checked model input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import IMAGE_SUFFIXES, image_to_pixels, unusual_input
from runtime.backends.model import Model
from runtime.errors import EdgeKitError
from runtime.fsutil import check_readable_file

NUMPY_SUFFIX = ".npy"


def read_npy(path: Path) -> np.ndarray:
    """A .npy array, its header checked against the file before anything is allocated: a header that
    promises more bytes than the file holds (or none at all) is refused, pickled objects are never loaded."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(fh, max_header_size=10_000)
            offset = fh.tell()
        size = path.stat().st_size
    except (ValueError, OSError, EOFError) as exc:
        raise EdgeKitError(f"cannot read {path} as a numpy array ({exc}); expected a .npy file "
                           "written by numpy.save.") from None
    if dtype.hasobject:
        raise EdgeKitError(f"{path} holds Python objects (dtype {dtype}), which would need pickle to load; "
                           "expected uint8 pixels or float32 input.")
    count = math.prod(shape)
    if count == 0:
        raise EdgeKitError(f"{path} holds an empty array of shape {list(shape)}; expected at least one image.")
    promised = count * dtype.itemsize
    if promised != size - offset:
        raise EdgeKitError(f"{path}: its header promises an array of shape {list(shape)} ({promised:,} bytes), "
                           f"but the file holds {size - offset:,} bytes of data; it is truncated or not a .npy file "
                           "written by numpy.save.")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise EdgeKitError(f"cannot read {path} as a numpy array ({exc}).") from None


def read_inputs(paths, model: Model, invert: bool = False) -> list[tuple[str, np.ndarray, str | None]]:
    """Read image files (PNG, JPEG, BMP, GIF, WebP; resized with the model's preprocessing) and .npy arrays.

    Returns (name, input, warning) triples of checked float32 model input (1, H, W, C), one per
    image; a .npy batch gives one per row, named file[i]. uint8 arrays are pixels
    (preprocessed with the sidecar), float arrays are input already preprocessed. `warning` says
    why an image of pixels is unlike the training images (`unusual_input`), or is None. `invert`: pixels
    become 255 - pixels first (a dark-on-light drawing for a model trained on light strokes on dark).
    """

    statistics = (model.sidecar or {}).get("input_statistics")

    out = []
    h, w, c = model.input_shape
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        check_readable_file(path, "input")
        if suffix == NUMPY_SUFFIX:
            array = read_npy(path)
            if invert and array.dtype == np.uint8:
                array = 255 - array
            try:
                batch = model.prepare(array)
            except EdgeKitError as exc:
                raise type(exc)(f"{path}: {exc}") from None
            pixels = array.reshape(batch.shape) if array.dtype == np.uint8 else None
            if array.ndim == 4 or (array.ndim == 3 and array.shape != (h, w, c) and len(batch) > 1):
                out.extend((f"{path}[{i}]", batch[i:i + 1],
                            None if pixels is None else unusual_input(pixels[i], statistics)) for i in range(len(batch)))
            else:
                out.append((str(path), batch, None if pixels is None else unusual_input(pixels[0], statistics)))
        elif suffix in IMAGE_SUFFIXES:
            pre = model.preprocessing
            pixels = image_to_pixels(path, (h, w), c, pre.resize if pre else "bilinear", pre.background if pre else 0)
            if invert:
                pixels = 255 - pixels
            out.append((str(path), model.prepare(pixels[None]), unusual_input(pixels, statistics)))
        else:
            raise EdgeKitError(
                f"input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy file; "
                f"got '{suffix or 'no suffix'}'.")
    return out
