"""One model object for every backend (runtime/backends/tflite.py, runtime/backends/onnx.py): what the model
is (input shape and layout, classes, labels, preprocessing, its sidecar checked), and what its outputs mean
(logits or its own probabilities, dequantized, softmax, top-k). The input side is runtime/backends/feeding.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from runtime.artifacts.labels import check_labels, read_labels
from runtime.artifacts.manifest import sidecar_path
from runtime.artifacts.preprocessing import RESIZE_METHODS, Preprocessing
from runtime.backends import tensors
from runtime.backends.feeding import Feeding
from runtime.backends.tensors import F32, U8, TensorInfo, dequantize, dim, lookup, softmax
from runtime.errors import ArtifactError, EdgeKitError, WorkFailed
from runtime.limits import positive_normal
from runtime.vocabulary import ALIASES, format_of


@dataclasses.dataclass(frozen=True)
class Options:
    """What a model without a sidecar needs told, or a user overrides (`load`'s keyword arguments)."""
    mean: tuple[float, ...] | None = None  # pixel units, one value or one per channel: (pixel - mean) / std
    std: tuple[float, ...] | None = None
    resize: str | None = None  # runtime.artifacts.preprocessing.RESIZE_METHODS
    labels: str | Path | list | tuple | None = None  # a labels file, or the labels themselves
    layout: str | None = None  # "nhwc" or "nchw": the input tensor's layout, where its shape leaves it ambiguous

    def __post_init__(self):
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
    scores): `info`, `predict --raw` and `bench` still take it (runtime.backends.raw)."""


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


class Model(Feeding):
    """A loaded .tflite or .onnx classifier (see the module docstring)."""

    def __init__(self, path: Path, backend: str, input_info: TensorInfo, output_info: TensorInfo,
                 sidecar: dict | None, threads: int | None, options: Options | None = None):
        self.path, self.backend, self.input, self.output = path, backend, input_info, output_info
        self.sidecar, self.threads = sidecar, threads
        options = options or Options()
        # the format key (runtime.vocabulary): the sidecar's, else the file's name
        self.format = ALIASES.get(str((sidecar or {}).get("format")), (sidecar or {}).get("format")) or format_of(path)
        if len(input_info.shape) != 4 or any(dim(d) is None for d in input_info.shape[1:]):
            raise NotAClassifier(
                f"{path} takes input of shape {list(input_info.shape)}; expected an image classifier with "
                "NHWC or NCHW input (batch, height, width and channels in either order) of fixed height, width and "
                "channels.")
        if len(output_info.shape) != 2 or dim(output_info.shape[1]) is None:
            raise NotAClassifier(f"{path} gives output of shape {list(output_info.shape)}; expected "
                               "(batch, classes) logits from an image classifier.")
        self.batch = dim(input_info.shape[0])  # None: any batch size
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
        self._pixel_kernel = None  # (8-bit pixel table, one image's buffer) for `tensors.KERNELS.lookup`: `_direct_feed`
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
            pre = Preprocessing.in_pixel_units((h, w), c if c in (1, 3) else 3, options.mean, options.std, base)
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
        redo = REDO.format(name=side.name)
        shape = (self.sidecar.get("input") or {}).get("shape")
        if shape and [dim(d) for d in shape[1:]] != [dim(d) for d in self.input.shape[1:]]:
            raise ArtifactError(f"sidecar {side} describes input {shape[1:]}, but {self.path.name} takes "
                               f"{[dim(d) for d in self.input.shape[1:]]}. {redo}")
        labels = self.sidecar.get("labels")
        if labels is not None and len(labels) != self.num_classes:
            raise ArtifactError(f"sidecar {side} lists {len(labels)} labels, but {self.path.name} has "
                               f"{self.num_classes} outputs. {redo}")
        pre = self.preprocessing
        if pre is not None and pre.input_shape != self.input_shape:
            raise ArtifactError(f"sidecar {side} preprocesses to {list(pre.input_shape)}, but {self.path.name} "
                               f"takes {list(self.input_shape)}. {redo}")

    # --- inference -----------------------------------------------------------------------
    def logits(self, x, batch_size: int = 256) -> np.ndarray:
        """The model's float output (N, classes) for uint8 pixels or preprocessed float input: logits, or
        probabilities for a model that ends in softmax (`output_kind`)."""
        return self._fetch(self._outputs(x, batch_size))

    def input_tensors(self, x) -> np.ndarray:
        """What the model's input tensor is fed for uint8 pixels or preprocessed float input (N, H, W, C): checked,
        preprocessed, quantized for an integer input, laid out as the model takes it (channels first for NCHW).
        Fed to a bare interpreter one row at a time, it gives this model's outputs: export's portable check."""
        x, pixels = self._checked(x)
        return self.to_layout(self._feed(x, pixels))

    def output_values(self, raw: np.ndarray) -> np.ndarray:
        """The float values (`logits`' meaning) of the output tensor as an interpreter gives it (dequantized)."""
        return self._fetch(np.asarray(raw))

    def graph(self) -> list:
        """The graph's structure without its weights' values (operators, shapes, dtypes), as JSON-able lists:
        files with equal structure run alike (the report lists them as one graph)."""
        raise NotImplementedError

    def _graph_output_kind(self) -> str:
        return "logits"

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, (N, classes): the softmax of the logits, or the model's own output when it
        ends in softmax (`output_kind`)."""
        if self._fast is not None and type(x) is np.ndarray and x.shape == self._one and x.dtype is U8:
            p = self._fast(x)  # one image's pixels, a float-input model: see `_fast_path`
            if p is not None:
                return p
        if self._one_ready and type(x) is np.ndarray and x.shape == self._one and x.dtype is F32:
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
        if len(raw) == 1 and tensors.KERNELS is not None:  # the steps below in one compiled pass
            p = np.empty(raw.shape, np.float32)
            if tensors.KERNELS.softmax(self._out_exp, raw, p):
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
            if dtype is F32:
                return self._run_one(self._quantize_checked(x) if self._quantized_input else self._feed(x, False))
            if dtype is U8 and self.preprocessing is not None:
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
                if tensors.KERNELS.lookup(table, x, fed):
                    return fed
            if self._direct == "shifted":  # int8 input that is the pixels - 128: one pass, no lookup
                return np.bitwise_xor(x, np.uint8(128)).view(np.int8)
            return lookup(self._pixel_table(bool(self.input.scale)), x)
        if self._quantized_input:
            return self._quantize_checked(x)
        return self._check_float(x).astype(self.input.dtype, copy=False)

    @staticmethod
    def _channels_first(fed: np.ndarray) -> np.ndarray:
        """An (N, H, W, C) input as an NCHW model takes it."""
        return np.ascontiguousarray(fed.transpose(0, 3, 1, 2))

    def to_layout(self, fed: np.ndarray) -> np.ndarray:
        """The input tensor for a fed (N, H, W, C) batch: as it is, or channels first for an NCHW model."""
        return self._channels_first(fed) if self._nchw else fed

    def _fetch(self, y: np.ndarray) -> np.ndarray:
        if self._out_table is not None:  # 8-bit output: dequantize by table lookup on the raw bytes
            return self._out_table.take(y)  # an int8 -k indexes byte 256 - k
        return dequantize(y, self.output) if self.output.scale else y.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"<runtime.Model {self.backend} {self.path.name} input={list(self.input.shape)} {self.input.dtype}>"


REDO = "Export the model again, or delete {name} to run it without labels and preprocessing."


def contract(model: Model, preprocessing=None, labels=None, output_kind: str | None = None) -> dict:
    """What an application needs to run the file without EdgeKit, as plain values: how pixels become the input
    tensor (size, channels, resize filter, background, pixel scale, per-channel mean and std, input dtype, scale,
    zero point, layout) and what the output means (its quantization, probabilities or logits, the labels). The
    model's own preprocessing, labels and output kind unless given (export knows them before the sidecar exists).
    deploy/predict.py and the micro header (export/firmware.py) are both written from it."""
    pre = preprocessing or model.preprocessing
    channels = pre.channels

    def per_channel(values) -> list[float]:  # one value broadcasts to every channel, as in the runtime
        return [float(values[0])] * channels if len(values) == 1 else [float(v) for v in values]

    return {"file": model.path.name, "backend": "tflite" if model.backend in ("tflite", "micro") else "onnx",
            "image": [*pre.size, channels], "resize": pre.resize, "background": int(pre.background),
            "pixel_scale": float(pre.scale), "mean": per_channel(pre.mean), "std": per_channel(pre.std),
            "input_dtype": model.input.dtype, "input_scale": float(model.input.scale or 0.0),
            "input_zero_point": int(model.input.zero_point or 0), "layout": model.layout,
            "output_scale": float(model.output.scale or 0.0), "output_zero_point": int(model.output.zero_point or 0),
            "output_is_probabilities": (output_kind or model.output_kind) == "probabilities",
            "labels": [str(v) for v in (labels if labels is not None else model.labels)]}


def finite(values: np.ndarray, model: Model) -> np.ndarray:
    """`values` (a model's outputs) if every one is a number: NaN is never a prediction or an accuracy."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise WorkFailed(f"{model.path.name} gave {bad:,} NaN or infinite outputs of {values.size:,}: a model whose "
                         "outputs are not numbers gives no answer. Export it again from a model that trains to a "
                         "finite loss (check its weights).")
    return values


