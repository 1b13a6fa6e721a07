"""Tensors as the backends give them: their description (name, shape, dtype, quantization), quantizing and
dequantizing by the model's own scale and zero point, the softmax, and the compiled one-pass kernels
(runtime/backends/kernels.c) as `KERNELS`, None when the install did not build them (numpy then does the same work)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # None (or -1) for a dynamic dimension
    dtype: str  # numpy dtype name: float32, int8, uint8, int16
    scale: float = 0.0  # quantization: real = (q - zero_point) * scale; 0.0 = not quantized
    zero_point: int = 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "shape": [(-1 if d is None else d) for d in self.shape]}


@functools.cache
def int_range(dtype: str) -> tuple[np.float32, np.float32]:
    """The integer type's range as float32 (np.iinfo costs microseconds: per call it was the float path's
    largest overhead)."""
    info = np.iinfo(dtype)
    return np.float32(info.min), np.float32(info.max)


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """round(x / scale) + zero_point, saturated to the integer type (as TFLite and ONNX quantize)."""
    low, high = int_range(info.dtype)
    q = np.divide(x, np.float32(info.scale), dtype=np.float32)
    np.rint(q, out=q)
    q += np.float32(info.zero_point)
    np.clip(q, low, high, out=q)
    return q.astype(info.dtype)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    return (q.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - (z.max() if len(z) == 1 else z.max(axis=-1, keepdims=True))
    np.exp(z, out=z)
    z /= z.sum() if len(z) == 1 else z.sum(axis=-1, keepdims=True)
    return z


try:  # the compiled one-pass kernels (runtime/backends/kernels.c), when the install built them; else numpy does the same
    from runtime.backends import kernels as KERNELS
except ImportError:
    KERNELS = None

MIN_REDUCE, MAX_REDUCE = np.minimum.reduce, np.maximum.reduce  # the reductions without ndarray.min's Python wrapper
F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)  # native dtypes are singletons: `is` is the cheap test
U32 = np.dtype(np.uint32)
ROUNDER = np.float32(1.5 * 2 ** 23)  # x + ROUNDER rounds x to an integer held in the low mantissa bits


def lookup(table: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """table[pixel] for a (256,) table, table[pixel, channel] for a (256, C) one."""
    return table.take(pixels) if table.ndim == 1 else table[pixels, np.arange(pixels.shape[-1])]


def dim(d) -> int | None:
    return None if d is None or int(d) < 0 else int(d)


