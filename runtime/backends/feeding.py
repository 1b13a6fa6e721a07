"""A model's input side: images (uint8 pixels, (H, W, C) whatever the model's layout) or preprocessed float
input checked, preprocessed by table lookup, quantized for an integer input, and laid out as the model's input
tensor (channels first for an NCHW model). `Model` (runtime/backends/model.py) takes it as a base class."""

from __future__ import annotations

import math

import numpy as np

from runtime.artifacts.manifest import sidecar_path
from runtime.backends import tensors
from runtime.backends.tensors import MAX_REDUCE, MIN_REDUCE, ROUNDER, U32, int_range, lookup, quantize
from runtime.errors import EdgeKitError


class Feeding:
    """Model's input methods (see the module docstring); they use the attributes Model.__init__ sets."""

    # --- input ---------------------------------------------------------------------------
    def prepare(self, x) -> np.ndarray:
        """Checked float32 model input (N, H, W, C) from uint8 pixels or float preprocessed input.

        A single image (H, W, C), or (H, W) for a one-channel model, becomes a batch of one.
        """
        x, pixels = self._checked(x)
        return lookup(self._pixel_table(False), x) if pixels else self._check_float(x)

    def _checked(self, x) -> tuple[np.ndarray, bool]:
        """(input as an (N, H, W, C) batch, whether it is uint8 pixels), or a clear error.

        Float values are checked where they are fed (`_feed`), in the same pass that quantizes them.
        """
        if type(x) is np.ndarray and x.ndim == 4 and x.shape[1:] == self.input_shape:  # the fast path
            if x.dtype == np.uint8 and self.preprocessing is not None:
                return x, True
            if x.dtype == np.float32:
                return x, False
        x = np.asarray(x)
        h, w, c = self.input_shape
        if x.dtype == np.uint8:
            pixels = True
        elif x.dtype.kind == "f":
            pixels = False
        else:
            raise EdgeKitError(
                f"{self.path.name} takes uint8 pixels (0..255) or float32 input preprocessed as in training; "
                f"got an array of {x.dtype}. Convert it, e.g. x.astype(np.uint8) for pixel values.")
        if x.ndim == 2 and c == 1:  # one grayscale image (H, W)
            x = x[None, :, :, None]
        elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w) and x.shape != (h, w, c):
            x = x[..., None]  # a batch of grayscale images (N, H, W)
        elif x.ndim == 3:  # one image (H, W, C)
            x = x[None]
        if x.ndim != 4:
            raise EdgeKitError(f"{self.path.name} takes images of {h}x{w}x{c} (height x width x channels), one "
                               f"(H, W, C) or a batch (N, H, W, C); got an array of shape {list(x.shape)}.")
        if x.shape[1:] == (c, h, w) and (c, h, w) != (h, w, c):
            raise EdgeKitError(f"{self.path.name} takes images in image layout, (N, H, W, C) = (N, {h}, {w}, {c}), "
                               f"whatever its own ({self.layout.upper()}); got channels first, {list(x.shape)}. "
                               "Transpose them: x.transpose(0, 2, 3, 1).")
        if x.shape[1:3] != (h, w) and x.shape[-1] == c:
            raise EdgeKitError(
                f"{self.path.name} takes {h}x{w} images; got {x.shape[1]}x{x.shape[2]}. Resize them to {h}x{w} "
                "(`python -m runtime predict` resizes image files with the model's own preprocessing).")
        if x.shape[-1] != c:
            names = {1: "grayscale", 3: "RGB"}
            raise EdgeKitError(
                f"{self.path.name} takes {c} channel(s) ({names.get(c, '?')}); got {x.shape[-1]} in an array of "
                f"shape {list(x.shape)}. Convert the images to {names.get(c, str(c) + ' channels')} first.")
        if x.shape[1:3] != (h, w):
            raise EdgeKitError(f"{self.path.name} takes {h}x{w}x{c} images; got {list(x.shape[1:])}.")
        if pixels and self.preprocessing is None:
            raise self.unknown_preprocessing()
        return (x, True) if pixels else (np.ascontiguousarray(x, dtype=np.float32), False)

    def unknown_preprocessing(self) -> EdgeKitError:
        """The error for images given to a float model whose preprocessing nothing records."""
        return EdgeKitError(
            f"{self.path.name} takes {self.input.dtype} input and has no sidecar ({sidecar_path(self.path).name}) "
            "saying how pixels become it; pass --mean and --std in pixel units (mean=, std= to runtime.load), "
            "e.g. 127.5 and 127.5 for input in [-1, 1], 0 and 255 for [0, 1], or float32 input preprocessed "
            "as in training.")

    def float_range(self) -> tuple[float, float, float] | None:
        """(low, high, slack): preprocessing gives pixels 0..255 values in [low, high]; float input more than
        `slack` outside is refused. None without a sidecar."""
        if self.preprocessing is None:
            return None
        if self._float_range is None:
            ends = self._pixel_table(False)[[0, 255]]
            low, high = float(ends.min()), float(ends.max())
            self._float_range = (low, high, (high - low) / 2)
        return self._float_range

    def _window(self) -> tuple[float, float]:
        """The float input values taken: within `slack` of what preprocessing gives pixels, or any finite
        float32 without a sidecar. Comparisons with NaN are false, so NaN falls outside too."""
        bounds = self.float_range()
        if bounds is None:
            biggest = float(np.finfo(np.float32).max)
            return -biggest, biggest
        low, high, slack = bounds
        return low - slack, high + slack

    def _check_float(self, x: np.ndarray) -> np.ndarray:
        """x, if it is finite and within `_window`: float input far outside what preprocessing gives any
        pixel is a mistake (raw 0..255 floats for a [0, 1] model, say), not an image."""
        if x.size:
            low, high = self._window()
            if not (low <= MIN_REDUCE(x, axis=None) and MAX_REDUCE(x, axis=None) <= high):
                self._refuse(x)
        return x

    def _quantize_checked(self, x: np.ndarray) -> np.ndarray:
        """quantize(x, self.input) with `_check_float`, in four numpy calls for input inside the window.

        x / scale + 1.5 * 2**23 holds rint(x / scale) in the low bits of its float32 mantissa (the addition
        rounds half to even, as np.rint, for |x / scale| < 2**22); those bits less a constant index a table of
        the quantized values, saturated, of every integer well inside the window, and `take` refuses any index
        outside it. NaN, infinities and values outside the window have bits far outside, so they, and values
        at the window's edges, go the slow way: refused with the reason, or saturated as quantize does.
        One image is worked in a buffer kept for it (a Model is not for concurrent use: nor is its interpreter),
        by the compiled kernel when the install built it (`runtime.backends.tensors.KERNELS.quantize`: the same quotient, rounding
        and table range, so the same values and the same inputs go the slow way).
        """
        if self._quant is None:
            self._quant = self._quantizer()
        scale, rounder, offset, table, one, one_bits, kernel = self._quant
        if table is not None:
            if x.shape == self._one:
                if kernel is not None:  # the same steps in one compiled pass, into a buffer kept for it
                    constants, fed = kernel
                    if tensors.KERNELS.quantize(constants, x, fed):
                        return fed
                    return quantize(self._check_float(x), self.input)
                q, bits = one, one_bits
                np.divide(x, scale, out=q)
            else:
                q = np.divide(x, scale)
                bits = q.view(U32)
            q += rounder
            try:
                return table.take(np.subtract(bits, offset, out=bits))
            except IndexError:
                pass
        return quantize(self._check_float(x), self.input)

    def _quantizer(self) -> tuple:
        """(scale, rounder, offset, table, buffer, its bits, kernel) of `_quantize_checked`, the constants as 0-d
        arrays (a ufunc takes one faster than a numpy scalar: 0.15 µs a call); kernel: the compiled kernel's
        constants and output buffer, or None without it; table[i] is the quantized value of
        the integer quotient first + i, for first..last at least one step inside the window (so a quotient
        rounded into the table is one the window takes), and at most 1,024 steps past what saturates."""
        info, (low, high) = self.input, self._window()
        int_low, int_high = (int(v) for v in int_range(info.dtype))
        first = max(math.ceil(low / info.scale + 1), int_low - info.zero_point - 1024)
        last = min(math.floor(high / info.scale - 1), int_high - info.zero_point + 1024)
        table = None
        if first <= last and -2 ** 21 < first and last < 2 ** 21:
            table = np.clip(np.arange(first, last + 1) + info.zero_point, int_low, int_high).astype(info.dtype)
        offset = np.uint32((int(ROUNDER.view(np.int32)) + first) % 2 ** 32)
        one = np.empty(self._one, np.float32)
        kernel = None
        if table is not None and tensors.KERNELS is not None:
            constants = np.array([info.scale, first, last, info.zero_point, int_low, int_high], np.float32)
            kernel = constants, np.empty(self._one, info.dtype)
        return (np.array(info.scale, np.float32), np.array(ROUNDER), np.array(offset), table, one,
                one.view(U32), kernel)

    def _refuse(self, x: np.ndarray):
        """The error for float input that `_check_float` refuses."""
        if not np.isfinite(x).all():
            bad = ~np.isfinite(x)
            first = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
            raise EdgeKitError(
                f"input holds {int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} infinite value(s) "
                f"(first in image {first}); expected finite preprocessed values. Check how the input was made.")
        low, high, _ = self.float_range()
        raise EdgeKitError(
            f"float input ranges over [{float(x.min()):.4g}, {float(x.max()):.4g}], but {self.path.name} takes input "
            f"preprocessed to [{low:.4g}, {high:.4g}] (its sidecar's preprocessing of pixels 0..255). Pass the raw "
            "pixels as uint8 instead (x.astype(np.uint8)), and the model preprocesses them itself.")

    def _direct_feed(self) -> tuple[str, tuple | None]:
        """How pixels are fed: 'as is' when the quantized pixel table is the identity, 'shifted' when it is
        pixel - 128 into int8, else 'lookup'; and for an 8-bit input with one table for every channel, the
        table and a buffer for one image that `tensors.KERNELS.lookup` fills (None without the kernels)."""
        if not self.input.scale or self.input.dtype not in ("uint8", "int8"):
            return "lookup", None
        table = self._pixel_table(True)
        kernel = (table, np.empty(self._one, table.dtype)) if tensors.KERNELS is not None and table.ndim == 1 else None
        ramp = np.arange(256)
        if table.ndim == 1 and self.input.dtype == "uint8" and np.array_equal(table.astype(int), ramp):
            return "as is", kernel
        if table.ndim == 1 and self.input.dtype == "int8" and np.array_equal(table.astype(int), ramp - 128):
            return "shifted", kernel
        return "lookup", kernel

    def _pixel_table(self, quantized: bool) -> np.ndarray:
        """Lookup table pixel value -> model input (preprocessed, and quantized for an integer input).

        Preprocessing is elementwise, so one table lookup gives exactly what
        preprocessing then quantizing would, in one numpy call. Shape (256,) or
        (256, C) when the channels are normalized differently.
        """
        table = self._tables.get(quantized)
        if table is None:
            pre = self.preprocessing
            values = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
            values = pre.apply(np.repeat(values, pre.channels, axis=3)).reshape(256, pre.channels)
            if quantized:
                values = quantize(values, self.input)
            if (values == values[:, :1]).all():
                values = values[:, 0]
            table = self._tables[quantized] = np.ascontiguousarray(values)
        return table

