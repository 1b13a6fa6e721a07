"""`runtime.load(path)`: one model object for .tflite (ai-edge-litert) and .onnx (onnxruntime).

    model = runtime.load("artifacts/fashion_cnn-digits/model.int8.tflite", threads=2)
    probabilities = model.predict(pixels)      # uint8 pixels (N, H, W, C), or float input
    model.top_k(probabilities, k=3)            # [[(label, probability), ...], ...]

Input is either uint8 pixels, which go through the preprocessing recorded in the
sidecar `model.<variant>.json` next to the file, or float32 input already
preprocessed as in training. int8/uint8 input tensors are quantized, and integer
outputs dequantized, with the model's own scale and zero point, so a caller always
passes images and gets probabilities. Every input is checked before it reaches the
interpreter: shape, channel count, dtype and finiteness errors say what was
expected and what to do. A batch goes through a dynamic-batch model in one call; a
fixed-batch model is resized when its graph allows it and looped otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError, EdgeKitError, WorkFailed, first_line
from runtime.formats import ALIASES, format_of
from runtime.fsutil import sha256_file
from runtime.limits import positive_normal
from runtime.manifest import check_readable_file, read_sidecar, sidecar_path
from runtime.onnx_proto import ONNX_DTYPES, onnx_producers
from runtime.preprocessing import Preprocessing

BACKENDS = {".tflite": "tflite", ".onnx": "onnx"}
NUMPY_SUFFIX = ".npy"


@dataclasses.dataclass(frozen=True)
class Options:
    """What a model without a sidecar needs told, or a user overrides (`load`'s keyword arguments)."""
    mean: tuple[float, ...] | None = None  # pixel units, one value or one per channel: (pixel - mean) / std
    std: tuple[float, ...] | None = None
    resize: str | None = None  # runtime.preprocessing.RESIZE_METHODS
    labels: str | Path | list | tuple | None = None  # a labels file, or the labels themselves
    layout: str | None = None  # "nhwc" or "nchw": the input tensor's layout, where its shape leaves it ambiguous

    def __post_init__(self):
        from runtime.preprocessing import RESIZE_METHODS

        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            values = (value,) if isinstance(value, (int, float)) else tuple(value)
            if not values or len(values) > 4 or not all(type(v) in (int, float) and math.isfinite(v) for v in values):
                raise EdgeKitError(f"{name} takes one number or one per channel (pixel units, e.g. 127.5 or "
                                   f"123.7,116.3,103.5); got {value!r}.")
            if name == "std":
                positive_normal(values, "std")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if (self.mean is None) != (self.std is None):  # neither has a default that is right for most models
            given, missing = ("mean", "std") if self.std is None else ("std", "mean")
            raise EdgeKitError(f"{given} was given without {missing}: they go together, input = (pixel - mean) / "
                               f"std; pass both (e.g. mean 127.5 and std 127.5 for [-1, 1], 0 and 255 for [0, 1]).")
        if self.resize is not None and self.resize not in RESIZE_METHODS:
            raise EdgeKitError(f"resize takes one of {', '.join(RESIZE_METHODS)}; got {self.resize!r}.")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise EdgeKitError(f"layout takes {' or '.join(LAYOUTS)} (the model input's order of batch, height, width "
                               f"and channels); got {self.layout!r}.")


class NotAClassifier(EdgeKitError):
    """A model EdgeKit cannot treat as an image classifier (several inputs or outputs, no image input, no class
    scores): `info`, `predict --raw` and `bench` still take it (runtime.raw)."""


LAYOUTS = ("nhwc", "nchw")  # channels last (TFLite, Keras), channels first (PyTorch, most ONNX files)
IMAGE_CHANNELS = (1, 3)


def input_layout(shape: tuple, given: str | None, recorded: str | None, name: str) -> str:
    """The layout of a 4-d image input of `shape` (batch first): `given` (--layout), else the sidecar's, else read
    from the shape: channels of 1 or 3 first ([N, 3, 224, 224]) or last ([N, 224, 224, 3]). A shape that reads
    both ways ([N, 3, 3, 3]) needs --layout; one that reads neither way is taken channels last, as before."""
    if given is not None:
        return given
    if recorded in LAYOUTS:
        return recorded
    first, last = shape[1] in IMAGE_CHANNELS, shape[3] in IMAGE_CHANNELS
    if first and last and shape[1] != shape[3]:
        raise EdgeKitError(f"{name} takes input of shape {[(-1 if d is None else d) for d in shape]}, which reads as "
                           "channels first and channels last; pass --layout nchw or --layout nhwc (layout= to "
                           "runtime.load).")
    return "nchw" if first and not last else "nhwc"


MAX_LABELS_BYTES = 4 << 20
# a model's packed label files (TFLite metadata's zip): members listed, text members read, inflated bytes in all
MAX_PACKED_MEMBERS, MAX_PACKED_TEXTS, MAX_PACKED_BYTES = 100, 8, 8 << 20


def parse_labels(text: str, source: str) -> list[str]:
    """One label a line, optionally after its index ("0 matured" or "0: matured", as model zoos write them);
    blank lines are skipped. Indices, when every line has one, must run 0, 1, 2, ..."""
    # lines end at "\n" alone (str.splitlines would also split at U+2028, \x1c, \x85: one label in two)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    split = [line.split(None, 1) if line.split(None, 1)[0].rstrip(":").isdigit() and len(line.split(None, 1)) == 2
             else None for line in lines]
    if lines and all(split):
        indices = [int(first.rstrip(":")) for first, _ in split]
        if indices != list(range(len(lines))):
            raise EdgeKitError(f"{source}: the leading indices run {indices[:5]}...; expected 0, 1, 2, ... one label "
                               "a line, in output order.")
        lines = [rest.strip() for _, rest in split]
    return check_labels(lines, source)


def check_labels(labels, source: str) -> list[str]:
    """`labels` if they are distinct strings: a repeated name would give the first one's index for a later
    class (a silently wrong answer), bytes would become their code points."""
    if isinstance(labels, (str, bytes, bytearray)) or not isinstance(labels, (list, tuple)) \
            or not all(isinstance(v, str) for v in labels):
        raise EdgeKitError(f"{source}: expected a list of label strings, one per output; got "
                           f"{type(labels).__name__}.")
    seen = {}
    for i, label in enumerate(labels):
        if label in seen:
            from runtime.text import terminal

            raise EdgeKitError(f"{source}: label {terminal(label)!r} is given twice (outputs {seen[label]} and {i}); "
                               "expected one distinct name per output.")
        seen[label] = i
    return list(labels)


def read_labels(path: str | Path) -> list[str]:
    """A labels file (`parse_labels`), read with its size bounded and its encoding checked."""
    size = check_readable_file(path, "labels file").st_size
    if size > MAX_LABELS_BYTES:
        raise EdgeKitError(f"labels file {path} has {size:,} bytes; expected a text file of one label a line "
                           f"(at most {MAX_LABELS_BYTES >> 20} MB).")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgeKitError(f"labels file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected one "
                           "label a line.") from None
    labels = parse_labels(text, f"labels file {path}")
    if not labels:
        raise EdgeKitError(f"labels file {path} holds no labels; expected one label a line.")
    return labels


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
def _limits(dtype: str) -> tuple[np.float32, np.float32]:
    """The integer type's range as float32 (np.iinfo costs microseconds: per call it was the float path's
    largest overhead)."""
    info = np.iinfo(dtype)
    return np.float32(info.min), np.float32(info.max)


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """round(x / scale) + zero_point, saturated to the integer type (as TFLite and ONNX quantize)."""
    low, high = _limits(info.dtype)
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


try:  # the compiled one-pass kernels (runtime/_kernels.c), when the install built them; else numpy does the same
    from runtime import _kernels
except ImportError:
    _kernels = None

_MIN, _MAX = np.minimum.reduce, np.maximum.reduce  # the reductions without ndarray.min's Python wrapper
_F32, _U8 = np.dtype(np.float32), np.dtype(np.uint8)  # native dtypes are singletons: `is` is the cheap test
_U32 = np.dtype(np.uint32)
_ROUNDER = np.float32(1.5 * 2 ** 23)  # x + _ROUNDER rounds x to an integer held in the low mantissa bits


def _lookup(table: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """table[pixel] for a (256,) table, table[pixel, channel] for a (256, C) one."""
    return table.take(pixels) if table.ndim == 1 else table[pixels, np.arange(pixels.shape[-1])]


def _dim(d) -> int | None:
    return None if d is None or int(d) < 0 else int(d)


class Model:
    """A loaded .tflite or .onnx classifier (see the module docstring)."""

    def __init__(self, path: Path, backend: str, input_info: TensorInfo, output_info: TensorInfo,
                 sidecar: dict | None, threads: int | None, options: Options | None = None):
        self.path, self.backend, self.input, self.output = path, backend, input_info, output_info
        self.sidecar, self.threads = sidecar, threads
        options = options or Options()
        # the format key (runtime.formats): the sidecar's, else the file's name
        self.format = ALIASES.get(str((sidecar or {}).get("format")), (sidecar or {}).get("format")) or format_of(path)
        if len(input_info.shape) != 4 or any(_dim(d) is None for d in input_info.shape[1:]):
            raise NotAClassifier(
                f"{path} takes input of shape {list(input_info.shape)}; expected an image classifier with "
                "NHWC or NCHW input (batch, height, width and channels in either order) of fixed height, width and "
                "channels.")
        if len(output_info.shape) != 2 or _dim(output_info.shape[1]) is None:
            raise NotAClassifier(f"{path} gives output of shape {list(output_info.shape)}; expected "
                               "(batch, classes) logits from an image classifier.")
        self.batch = _dim(input_info.shape[0])  # None: any batch size
        # the input's layout; images are (H, W, C) here whatever it is, and transposed as they are fed
        self.layout = input_layout(input_info.shape, options.layout, (sidecar or {}).get("layout"), path.name)
        dims = tuple(int(d) for d in input_info.shape[1:])
        self._shape = (dims[1], dims[2], dims[0]) if self.layout == "nchw" else dims
        self._nchw = self.layout == "nchw"
        self._one = (1, *self._shape)  # one image as a batch: the camera loop's call, given the fewest steps
        self._one_ready = False  # whether the backend runs a batch of one as it stands (`_run_one`)
        # how pixels become input (`preprocessing_source`): the sidecar's, --mean/--std, or for a model without a
        # sidecar that takes 8-bit input, its own quantization; None (float input only) otherwise
        self.preprocessing, self.preprocessing_source = self._preprocessing(options)
        self._check_sidecar()
        self._labels = self._read_labels(options.labels)
        self._tables = {}  # quantized? -> pixel lookup table, built on first use
        self._direct = None  # for 8-bit input taking pixels as they are: how to feed them without a lookup
        self._pixel_kernel = None  # (8-bit pixel table, one image's buffer) for `_kernels.lookup`: `_direct_feed`
        self._float_range = self._quant = None
        self._quantized_input = bool(input_info.scale)  # float input is quantized (`_quantize_checked`)
        self._out_table = self._out_exp = None
        self._fast = None  # predict's compiled path for one uint8 image (`_fast_path`), where a backend has one
        # "probabilities" when the model ends in softmax (recorded at export, else read from the graph): predict
        # then returns them as they are, never normalized twice
        recorded = ((sidecar or {}).get("output") or {}).get("kind")
        self.output_kind = recorded if recorded in ("logits", "probabilities") else self._graph_output_kind()
        if output_info.scale and output_info.dtype in ("int8", "uint8"):
            raw = np.arange(256, dtype=np.uint8).view(output_info.dtype)
            self._out_table = dequantize(raw, output_info)  # raw byte -> logit
            span = float(self._out_table.max() - self._out_table.min())
            if span < 80:  # exp(logit - max logit) cannot underflow to 0: softmax by table lookup
                self._out_exp = np.exp(self._out_table - self._out_table.max()).astype(np.float32)
                self._total = np.zeros((), np.float32)  # one image's sum of exps (`predict`)

    # --- what the model is -------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return self._shape

    @property
    def num_classes(self) -> int:
        return int(self.output.shape[1])

    @property
    def labels(self) -> list[str]:
        """Class names: from `labels=` (--labels), the sidecar, or the label file packed in the model (TFLite
        metadata), else the class indices as strings."""
        return list(self._labels or [str(i) for i in range(self.num_classes)])

    def _read_labels(self, given) -> list[str] | None:
        if given is not None:
            labels = read_labels(given) if isinstance(given, (str, Path)) else check_labels(given, "labels")
            source = f"--labels {given}" if isinstance(given, (str, Path)) else "labels"
        elif (self.sidecar or {}).get("labels"):
            return check_labels(self.sidecar["labels"], f"sidecar {sidecar_path(self.path)}")
        else:
            labels, source = self._packed_labels(), f"the label file packed in {self.path.name}"
            if labels is None:
                return None
        if len(labels) != self.num_classes:
            raise EdgeKitError(f"{source} gives {len(labels)} labels, but {self.path.name} has {self.num_classes} "
                               "outputs; expected one label per output, in output order.")
        return labels

    def _packed_labels(self) -> list[str] | None:
        return None

    def _preprocessing(self, options: Options) -> tuple[Preprocessing | None, str | None]:
        record = (self.sidecar or {}).get("preprocessing")
        h, w, c = self._shape
        if options.mean is not None or options.std is not None:  # pixel units, as TFLite Support's NormalizeOp
            base = Preprocessing.from_dict(record) if record else None
            pre = Preprocessing((h, w), c if c in (1, 3) else 3, scale=1.0, mean=options.mean or (0.0,),
                                std=options.std or (1.0,), resize=base.resize if base else "bilinear",
                                background=base.background if base else 0)
            source = "options"
        elif record:
            pre, source = Preprocessing.from_dict(record), "sidecar"
        elif self.input.scale and self.input.dtype in ("uint8", "int8") and c in (1, 3):
            # pixels are the quantized input as they are (uint8), or shifted by 128 into int8's range: the
            # model's own scale and zero point say what float values they stand for
            offset = 128 if self.input.dtype == "int8" else 0
            pre = Preprocessing((h, w), c, scale=self.input.scale,
                                mean=((offset + self.input.zero_point) * self.input.scale,), std=(1.0,))
            source = "quantization"
        else:
            return None, None
        if options.resize is not None:
            pre = dataclasses.replace(pre, resize=options.resize)
        return pre, source

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format, "backend": self.backend, "size_bytes": self.size_bytes,
                "input": self.input.to_dict(), "output": self.output.to_dict(), "threads": self.threads,
                "labels": self.labels, "sidecar": self.sidecar is not None, "layout": self.layout,
                "variant": (self.sidecar or {}).get("format")}

    def _check_sidecar(self) -> None:
        """A sidecar that describes another model would give silently wrong labels or preprocessing."""
        if self.sidecar is None:
            return
        side = sidecar_path(self.path)
        redo = _REDO.format(name=side.name)
        shape = (self.sidecar.get("input") or {}).get("shape")
        if shape and [_dim(d) for d in shape[1:]] != [_dim(d) for d in self.input.shape[1:]]:
            raise ArtifactError(f"sidecar {side} describes input {shape[1:]}, but {self.path.name} takes "
                               f"{[_dim(d) for d in self.input.shape[1:]]}. {redo}")
        labels = self.sidecar.get("labels")
        if labels is not None and len(labels) != self.num_classes:
            raise ArtifactError(f"sidecar {side} lists {len(labels)} labels, but {self.path.name} has "
                               f"{self.num_classes} outputs. {redo}")
        pre = self.preprocessing
        if pre is not None and pre.input_shape != self.input_shape:
            raise ArtifactError(f"sidecar {side} preprocesses to {list(pre.input_shape)}, but {self.path.name} "
                               f"takes {list(self.input_shape)}. {redo}")

    # --- input ---------------------------------------------------------------------------
    def prepare(self, x) -> np.ndarray:
        """Checked float32 model input (N, H, W, C) from uint8 pixels or float preprocessed input.

        A single image (H, W, C), or (H, W) for a one-channel model, becomes a batch of one.
        """
        x, pixels = self._checked(x)
        return _lookup(self._pixel_table(False), x) if pixels else self._check_float(x)

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
            raise EdgeKitError(
                f"{self.path.name} takes {self.input.dtype} input and has no sidecar ({sidecar_path(self.path).name}) "
                "saying how pixels become it; pass --mean and --std in pixel units (mean=, std= to runtime.load), "
                "e.g. 127.5 and 127.5 for input in [-1, 1], 0 and 255 for [0, 1], or float32 input preprocessed "
                "as in training.")
        return (x, True) if pixels else (np.ascontiguousarray(x, dtype=np.float32), False)

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
            if not (low <= _MIN(x, axis=None) and _MAX(x, axis=None) <= high):
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
        by the compiled kernel when the install built it (`runtime._kernels.quantize`: the same quotient, rounding
        and table range, so the same values and the same inputs go the slow way).
        """
        if self._quant is None:
            self._quant = self._quantizer()
        scale, rounder, offset, table, one, one_bits, kernel = self._quant
        if table is not None:
            if x.shape == self._one:
                if kernel is not None:  # the same steps in one compiled pass, into a buffer kept for it
                    constants, fed = kernel
                    if _kernels.quantize(constants, x, fed):
                        return fed
                    return quantize(self._check_float(x), self.input)
                q, bits = one, one_bits
                np.divide(x, scale, out=q)
            else:
                q = np.divide(x, scale)
                bits = q.view(_U32)
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
        int_low, int_high = (int(v) for v in _limits(info.dtype))
        first = max(math.ceil(low / info.scale + 1), int_low - info.zero_point - 1024)
        last = min(math.floor(high / info.scale - 1), int_high - info.zero_point + 1024)
        table = None
        if first <= last and -2 ** 21 < first and last < 2 ** 21:
            table = np.clip(np.arange(first, last + 1) + info.zero_point, int_low, int_high).astype(info.dtype)
        offset = np.uint32((int(_ROUNDER.view(np.int32)) + first) % 2 ** 32)
        one = np.empty(self._one, np.float32)
        kernel = None
        if table is not None and _kernels is not None:
            constants = np.array([info.scale, first, last, info.zero_point, int_low, int_high], np.float32)
            kernel = constants, np.empty(self._one, info.dtype)
        return (np.array(info.scale, np.float32), np.array(_ROUNDER), np.array(offset), table, one,
                one.view(_U32), kernel)

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
        table and a buffer for one image that `_kernels.lookup` fills (None without the kernels)."""
        if not self.input.scale or self.input.dtype not in ("uint8", "int8"):
            return "lookup", None
        table = self._pixel_table(True)
        kernel = (table, np.empty(self._one, table.dtype)) if _kernels is not None and table.ndim == 1 else None
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

    # --- inference -----------------------------------------------------------------------
    def logits(self, x, batch_size: int = 256) -> np.ndarray:
        """The model's float output (N, classes) for uint8 pixels or preprocessed float input: logits, or
        probabilities for a model that ends in softmax (`output_kind`)."""
        return self._fetch(self._outputs(x, batch_size))

    def _graph_output_kind(self) -> str:
        return "logits"

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, (N, classes): the softmax of the logits, or the model's own output when it
        ends in softmax (`output_kind`)."""
        if self._fast is not None and type(x) is np.ndarray and x.shape == self._one and x.dtype is _U8:
            p = self._fast(x)  # one image's pixels, a float-input model: see `_fast_path`
            if p is not None:
                return p
        if self._one_ready and type(x) is np.ndarray and x.shape == self._one and x.dtype is _F32:
            raw = self._run_one(self._quantize_checked(x) if self._quantized_input else self._feed(x, False))
        else:  # `_outputs`, whose first case is the above: one frame less for a camera loop's float input
            raw = self._outputs(x, batch_size)
        if self.output_kind == "probabilities":  # the model's own softmax; 8-bit ones renormalized to sum to 1
            p = self._fetch(raw)
            if self._out_table is not None:
                p /= np.maximum(p.sum(axis=-1, keepdims=True), np.float32(1e-12))
            return p
        if self._out_exp is None:
            return softmax(self._fetch(raw))
        if len(raw) == 1 and _kernels is not None:  # the steps below in one compiled pass
            p = np.empty(raw.shape, np.float32)
            if _kernels.softmax(self._out_exp, raw, p):
                return p
        e = self._out_exp.take(raw)  # exp of the dequantized logits, by table lookup (an int8 -k is byte 256 - k)
        if len(e) == 1:  # one row: summed without a numpy reduction, divided by a 0-d array (cheaper than a float)
            total = self._total
            total[()] = sum(e[0].tolist())
            e /= total
        else:
            e /= e.sum(axis=-1, keepdims=True)
        return e

    def _outputs(self, x, batch_size: int) -> np.ndarray:
        """The output tensor as the backend gives it (integer for a quantized output), (N, classes)."""
        if self._one_ready and type(x) is np.ndarray and x.shape == self._one:  # one image: fewest Python steps
            dtype = x.dtype
            if dtype is _F32:
                return self._run_one(self._quantize_checked(x) if self._quantized_input else self._feed(x, False))
            if dtype is _U8 and self.preprocessing is not None:
                return self._run_one(self._feed(x, True))
        x, pixels = self._checked(x)
        step = self.batch or batch_size
        if len(x) == step or (0 < len(x) < step and not self.batch):  # one call, the common case
            return self._run(x, pixels)
        if not pixels:  # checked whole, so that an error names the image, not its place in a chunk
            self._check_float(x)
        outputs = [self._run_padded(x[i:i + step], pixels) for i in range(0, len(x), step)]
        return np.concatenate(outputs) if outputs else np.empty((0, self.num_classes), self.output.dtype)

    def top_k(self, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most likely (label, probability) pairs of each row, best first."""
        if type(k) is not int or k < 1:
            raise EdgeKitError(f"k must be a whole number of 1 or more; got {k!r}.")
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 2 or probabilities.shape[1] != self.num_classes:
            raise EdgeKitError(f"top_k takes probabilities of shape (N, {self.num_classes}) from predict(); got "
                               f"shape {list(probabilities.shape)}.")
        labels = self.labels
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order)]

    def _run_padded(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        if self.batch and len(x) < self.batch:  # a fixed-batch model: pad the last chunk with its last image
            pad = np.repeat(x[-1:], self.batch - len(x), axis=0)
            return self._run(np.concatenate([x, pad]), pixels)[: len(x)]
        return self._run(x, pixels)

    def _run_one(self, fed: np.ndarray) -> np.ndarray:
        """The output for one image's fed input tensor (1, H, W, C)."""
        raise NotImplementedError

    def invoker(self, x: np.ndarray):
        """A zero-argument function running only the backend's inference call on `x` (for bench)."""
        raise NotImplementedError

    def _fixed_batch_error(self) -> EdgeKitError:
        return EdgeKitError(f"{self.path.name} runs only batches of {self.batch}; bench it with --batch {self.batch}.")

    def _feed(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        """What the input tensor takes: quantized for an integer input, else float."""
        if pixels:
            if self._direct is None:
                self._direct, self._pixel_kernel = self._direct_feed()
            if self._direct == "as is":  # uint8 input that is the pixels: the interpreter's copy is all
                return x
            if self._pixel_kernel is not None and x.shape == self._one:  # one image, one compiled pass
                table, fed = self._pixel_kernel
                if _kernels.lookup(table, x, fed):
                    return fed
            if self._direct == "shifted":  # int8 input that is the pixels - 128: one pass, no lookup
                return np.bitwise_xor(x, np.uint8(128)).view(np.int8)
            return _lookup(self._pixel_table(bool(self.input.scale)), x)
        if self._quantized_input:
            return self._quantize_checked(x)
        return self._check_float(x).astype(self.input.dtype, copy=False)

    @staticmethod
    def _channels_first(fed: np.ndarray) -> np.ndarray:
        """An (N, H, W, C) input as an NCHW model takes it."""
        return np.ascontiguousarray(fed.transpose(0, 3, 1, 2))

    def _tensor(self, fed: np.ndarray) -> np.ndarray:
        """The input tensor for a fed (N, H, W, C) batch: as it is, or channels first for an NCHW model."""
        return self._channels_first(fed) if self._nchw else fed

    def _fetch(self, y: np.ndarray) -> np.ndarray:
        if self._out_table is not None:  # 8-bit output: dequantize by table lookup on the raw bytes
            return self._out_table.take(y)  # an int8 -k indexes byte 256 - k
        return dequantize(y, self.output) if self.output.scale else y.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"<runtime.Model {self.backend} {self.path.name} input={list(self.input.shape)} {self.input.dtype}>"


class _TFLiteModel(Model):
    def __init__(self, path, threads, sidecar, options=None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
            detail_in = self._interpreter.get_input_details()
            detail_out = self._interpreter.get_output_details()
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{path} is not a valid TFLite model ({first_line(exc)}); export it again.") from exc
        if len(detail_in) != 1 or len(detail_out) != 1:
            raise NotAClassifier(f"{path} has {len(detail_in)} inputs and {len(detail_out)} outputs; "
                               "expected an image classifier with one of each.")
        self._in, self._out = detail_in[0]["index"], detail_out[0]["index"]
        self._resized = int(detail_in[0]["shape"][0])
        self._loop = False  # a fixed-batch graph that cannot be resized runs chunk by chunk
        super().__init__(path, "tflite", self._info(detail_in[0]), self._info(detail_out[0]), sidecar, threads,
                         options)
        self._fixed = self.batch
        self._tensor_dims = [int(d) for d in self.input.shape[1:]]  # the input tensor's own order
        self.batch = None  # try resizing first; _run falls back to looping
        self._one_ready = self._resized == 1  # allocated for one image: no resize, nothing to check

    def _graph_output_kind(self) -> str:
        """'probabilities' when the op that makes the output tensor is SOFTMAX (through the QUANTIZE that a
        uint8-output file puts after an int8 SOFTMAX, or a DEQUANTIZE)."""
        try:
            ops = self._interpreter._get_ops_details()  # LiteRT has no public per-op listing
        except (AttributeError, RuntimeError, ValueError):
            return "logits"
        ops = [op for op in ops if op["op_name"] != "DELEGATE"]  # XNNPACK's node claims the outputs of the ops it runs
        tensor = self._out
        for _ in range(4):
            makers = [op for op in ops if tensor in list(op["outputs"])]
            if len(makers) != 1 or makers[0]["op_name"] not in ("QUANTIZE", "DEQUANTIZE"):
                break
            tensor = int(list(makers[0]["inputs"])[0])
        return "probabilities" if [op["op_name"] for op in makers] == ["SOFTMAX"] else "logits"

    def _packed_labels(self) -> list[str] | None:
        return packed_labels(self.path, self.num_classes)

    @staticmethod
    def _info(detail) -> TensorInfo:
        scale, zero_point = detail["quantization"]
        shape = tuple(_dim(d) for d in detail.get("shape_signature", detail["shape"]))
        return TensorInfo(detail["name"], shape, np.dtype(detail["dtype"]).name, float(scale), int(zero_point))

    def _resize(self, n: int) -> bool:
        """Resize the input to a batch of n; False (and loop from now on) when the graph will not take it.

        Whether it did is only certain after an invoke: some graphs (EfficientNet's) know their output
        shape only then, and a graph that pins its batch in a reshape still allocates. `_run` checks.
        """
        if self._resized == n:
            return True
        self._one_ready = False  # until a batch of one has run through the resized graph (`_run`)
        try:
            self._interpreter.resize_tensor_input(self._in, [n, *self._tensor_dims], strict=False)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError):
            return self._stop_resizing(n)
        self._resized = n
        return True

    def _stop_resizing(self, n: int) -> bool:
        """Go back to the graph's own batch size and run chunk by chunk from now on."""
        if self._fixed is None:
            raise ArtifactError(f"{self.path.name} declares a dynamic batch, but LiteRT cannot run it on a batch of "
                                f"{n}; export the model again, or pass one image at a time.")
        self._interpreter.resize_tensor_input(self._in, [self._fixed, *self._tensor_dims], strict=False)
        self._interpreter.allocate_tensors()
        self._resized, self._loop, self.batch = self._fixed, True, self._fixed
        self._one_ready = self._fixed == 1
        return False

    def _looped(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        step = self.batch
        return np.concatenate([self._run_padded(x[i:i + step], pixels) for i in range(0, len(x), step)])

    def _invoke(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        interpreter = self._interpreter
        fed = self._feed(x, pixels)
        interpreter.set_tensor(self._in, self._tensor(fed))
        interpreter.invoke()
        return interpreter.get_tensor(self._out)

    def _run(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        if self._loop:
            return self._invoke(x, pixels)
        if not self._resize(len(x)):
            return self._looped(x, pixels)
        y = self._invoke(x, pixels)
        if len(y) != len(x):  # the graph pins its batch size (a reshape to a constant shape)
            self._stop_resizing(len(x))
            return self._looped(x, pixels)
        self._one_ready = len(x) == 1
        return y

    def _run_one(self, fed: np.ndarray) -> np.ndarray:
        self._run_one = run = self._one_runner()  # from now on the instance's own closure, this method no more
        return run(fed)

    def _one_runner(self):
        """`_run_one` with the interpreter's methods and tensor indices bound once, not looked up per call."""
        set_tensor, invoke, get_tensor = self._interpreter.set_tensor, self._interpreter.invoke, self._interpreter.get_tensor
        index_in, index_out = self._in, self._out
        if self._nchw:
            first = self._channels_first

            def run_nchw(fed: np.ndarray) -> np.ndarray:
                set_tensor(index_in, first(fed))
                invoke()
                return get_tensor(index_out)
            return run_nchw

        def run(fed: np.ndarray) -> np.ndarray:
            set_tensor(index_in, fed)
            invoke()
            return get_tensor(index_out)
        return run

    def invoker(self, x: np.ndarray):
        x, pixels = self._checked(x)
        if not self._loop and (not self._resize(len(x)) or len(self._invoke(x, pixels)) != len(x)):
            self._stop_resizing(len(x))
        if self._loop and len(x) != self.batch:
            raise self._fixed_batch_error()
        fed = self._feed(x, pixels)
        self._interpreter.set_tensor(self._in, self._tensor(fed))
        return self._interpreter.invoke


class _ONNXModel(Model):

    def __init__(self, path, threads, sidecar, options=None):
        import onnxruntime as ort

        session = ort.SessionOptions()
        if threads:
            session.intra_op_num_threads = threads
            session.inter_op_num_threads = 1
        session.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), session, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ArtifactError(f"{path} is not a valid ONNX model ({first_line(exc)}); export it again.") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise NotAClassifier(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                               "expected an image classifier with one of each.")
        self._names = [outputs[0].name]
        super().__init__(path, "onnx", self._info(inputs[0]), self._info(outputs[0]), sidecar, threads, options)
        self._one_ready = self.batch in (None, 1)
        self._fast = self._fast_path()

    def _fast_path(self):
        """predict's path for one uint8 image (1, H, W, C) of a float-input model, as a PyTorch file is: the pixels
        looked up into the buffer the session's feed holds (channels first for an NCHW model), the session run,
        the softmax, each a call; None where it does not apply (no compiled kernels, no preprocessing, another
        dtype or batch). The function gives None for what it does not take (a non-finite logit): predict's
        general path then runs and says why."""
        if (_kernels is None or self.preprocessing is None or self.input.dtype != "float32"
                or self.output.dtype != "float32" or not self._one_ready):
            return None
        table = self._pixel_table(False)
        h, w, c = self._shape
        planar = self._nchw
        buffer = np.empty((1, c, h, w) if planar else (1, h, w, c), np.float32)
        run, names, feed = self._session.run, self._names, {self.input.name: buffer}
        pixels, softmax_float = _kernels.pixels, _kernels.softmax_float
        own = self.output_kind == "probabilities"

        def fast(x: np.ndarray):
            if not pixels(table, x, buffer, c, planar):
                return None
            raw = run(names, feed)[0]
            if own:
                return raw
            p = np.empty(raw.shape, _F32)
            return p if softmax_float(raw, p) else None

        return fast

    def _graph_output_kind(self) -> str:
        """'probabilities' when the node that makes the output is Softmax (through Identity nodes)."""
        try:
            producers = onnx_producers(self.path.read_bytes())
        except (OSError, ValueError, IndexError):
            return "logits"
        name = self._names[0]
        for _ in range(8):
            op, inputs = producers.get(name, ("", []))
            if op != "Identity" or not inputs:
                break
            name = inputs[0]
        return "probabilities" if op == "Softmax" else "logits"

    def _info(self, node) -> TensorInfo:
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in node.shape)
        return TensorInfo(node.name, shape, ONNX_DTYPES.get(node.type, node.type))

    def _run(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        return self._session.run(self._names, {self.input.name: self._tensor(self._feed(x, pixels))})[0]

    def _run_one(self, fed: np.ndarray) -> np.ndarray:
        return self._session.run(self._names, {self.input.name: self._tensor(fed)})[0]

    def invoker(self, x: np.ndarray):
        x, pixels = self._checked(x)
        if self.batch and len(x) != self.batch:
            raise self._fixed_batch_error()
        run, names, feed = self._session.run, self._names, {self.input.name: self._tensor(self._feed(x, pixels))}
        return lambda: run(names, feed)


_REDO = "Export the model again, or delete {name} to run it without labels and preprocessing."


def _check_file(path: Path, size: int, sidecar: dict | None, manifest: dict | None) -> None:
    """The size and sha256 recorded at export (sidecar) and in the artifact's manifest beside the model,
    checked before the interpreter ever reads the file."""
    from runtime.manifest import MANIFEST

    expected = []
    if sidecar is not None:
        expected.append((f"sidecar {sidecar_path(path)}", sidecar["size_bytes"], sidecar["sha256"],
                         _REDO.format(name=sidecar_path(path).name)))
    if manifest is not None:
        entry = manifest["files"].get(path.name)
        if entry is not None:
            expected.append((str(path.parent / MANIFEST), entry["bytes"], entry["sha256"], "Export the model again."))
    digest = None
    for where, recorded_size, recorded_sha, redo in expected:
        if recorded_size != size:
            raise ArtifactError(f"{where} describes a model of {recorded_size:,} bytes, but {path.name} has "
                                f"{size:,}: the file changed or is truncated. {redo}")
        digest = digest or sha256_file(path)
        if digest != recorded_sha:
            raise ArtifactError(f"{where} records sha256 {recorded_sha[:12]}..., which {path.name} does not "
                                f"match: the file changed after export or is corrupt. {redo}")


def load(path: str | Path, threads: int | None = None, *, mean=None, std=None, resize: str | None = None,
         labels=None, layout: str | None = None) -> Model:
    """Load a .tflite or .onnx model (and its sidecar, if any) for CPU inference.

    `threads`: the interpreter's thread count (None: the backend's default).
    For a model from elsewhere (no sidecar), or to override the sidecar:
    `mean`, `std`: how pixels become float input, in pixel units, one value or one per channel:
        (pixel - mean) / std, as TFLite Support's normalization. Without them and a sidecar, a model with
        8-bit input takes the pixels as its quantized input (int8: pixels - 128), and a float one only
        float input.
    `resize`: how images of another size are resized (runtime.preprocessing.RESIZE_METHODS).
    `labels`: a labels file (one a line, optionally "0 name") or a list; else the sidecar's, else the label
        file packed in a TFLite model's metadata, else the indices.
    `layout`: "nchw" or "nhwc", for an input shape that reads both ways (read from the shape otherwise).
        Images are always given as (H, W, C) pixels or (N, H, W, C) batches, and transposed for an NCHW model.
    """
    options = Options(mean, std, resize, labels, layout)
    if not isinstance(path, (str, Path)) or not str(path):
        raise EdgeKitError(f"runtime.load takes the path of a .tflite or .onnx file (a str or pathlib.Path); "
                           f"got {type(path).__name__} {path!r}.")
    if threads is not None:
        from runtime.limits import threads as bounded_threads

        bounded_threads(threads, "threads")  # more than the cores buys nothing; a million crashed LiteRT
    path = Path(path)
    fmt = BACKENDS.get(path.suffix.lower())
    if fmt is None:
        raise EdgeKitError(f"{path}: expected a .tflite or .onnx model file; got '{path.suffix or 'no suffix'}'.")
    size = check_readable_file(path, "model file").st_size
    if size == 0:
        raise ArtifactError(f"model file {path} is empty; export it again.")
    from runtime.manifest import MANIFEST, read_manifest

    manifest = read_manifest(path.parent) if (path.parent / MANIFEST).is_file() else None  # read once, for both
    sidecar = read_sidecar(path, manifest)
    _check_file(path, size, sidecar, manifest)
    cls = _TFLiteModel if fmt == "tflite" else _ONNXModel
    return cls(path, threads, sidecar, options)


def packed_labels(path: Path, lines: int | None) -> list[str] | None:
    """The label file TFLite Support's MetadataPopulator packs into a model: associated files are a zip
    archive appended to the flatbuffer. The label file is the text member with one line per output
    (named like labels*.txt when there are several); `lines`: the outputs it must name (None: the first that
    parses)."""
    import zipfile
    import zlib

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as packed:
            members = [m for m in packed.infolist()[:MAX_PACKED_MEMBERS]
                       if m.filename.lower().endswith(".txt") and m.file_size <= MAX_LABELS_BYTES]
            members.sort(key=lambda m: "label" not in m.filename.lower())
            budget = MAX_PACKED_BYTES  # inflated bytes read over all members: the sizes in a zip may lie
            for member in members[:MAX_PACKED_TEXTS]:
                with packed.open(member) as fh:  # read(n) inflates at most n bytes, whatever the header says
                    data = fh.read(min(MAX_LABELS_BYTES, budget) + 1)
                budget -= len(data)
                if len(data) > MAX_LABELS_BYTES or budget < 0:
                    return None
                if lines is not None and data.count(b"\n") + 1 < lines:  # too few lines for this model
                    continue
                try:
                    labels = parse_labels(data.decode("utf-8-sig"), member.filename)
                except (EdgeKitError, UnicodeDecodeError):
                    continue
                if lines is None or len(labels) == lines:
                    return labels
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error):
        return None
    return None


def finite(values: np.ndarray, model: Model) -> np.ndarray:
    """`values` (a model's outputs) if every one is a number: NaN is never a prediction or an accuracy."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise WorkFailed(f"{model.path.name} gave {bad:,} NaN or infinite outputs of {values.size:,}: a model whose "
                         "outputs are not numbers gives no answer. Export it again from a model that trains to a "
                         "finite loss (check its weights).")
    return values


def tflite_census(model: bytes | str | Path) -> dict:
    """What a .tflite file is made of, as LiteRT reads it: {"ops": {name: count}, "dtypes": {dtype: tensors},
    "float_ops": [names of ops with a float32 input or output]}. A fully integer file has no float op."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    interpreter = Interpreter(model_content=data)
    tensors = interpreter.get_tensor_details()
    dtype = {t["index"]: np.dtype(t["dtype"]).name for t in tensors}
    ops = interpreter._get_ops_details()  # LiteRT has no public per-op listing
    return {"ops": dict(Counter(op["op_name"] for op in ops)),
            "dtypes": dict(Counter(dtype.values())),
            "float_ops": [op["op_name"] for op in ops
                          if any(dtype.get(i) == "float32" for i in [*op["inputs"], *op["outputs"]] if i >= 0)]}


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


def read_inputs(paths, model: Model) -> list[tuple[str, np.ndarray, str | None]]:
    """Read image files (PNG, JPEG, BMP, GIF, WebP; resized with the model's preprocessing) and .npy arrays.

    Returns (name, input, warning) triples of checked float32 model input (1, H, W, C), one per
    image; a .npy batch gives one per row, named file[i]. uint8 arrays are pixels
    (preprocessed with the sidecar), float arrays are input already preprocessed. `warning` says
    why an image of pixels is unlike the training images (`unusual_input`), or is None.
    """
    from runtime.preprocessing import IMAGE_SUFFIXES, image_to_pixels, unusual_input

    statistics = (model.sidecar or {}).get("input_statistics")

    out = []
    h, w, c = model.input_shape
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        check_readable_file(path, "input")
        if suffix == NUMPY_SUFFIX:
            array = read_npy(path)
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
            out.append((str(path), model.prepare(pixels[None]), unusual_input(pixels, statistics)))
        else:
            raise EdgeKitError(
                f"input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy file; "
                f"got '{suffix or 'no suffix'}'.")
    return out
