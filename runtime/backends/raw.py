"""Any .tflite or .onnx model, raw: every input fed as given, every output returned, nothing interpreted.

    model = runtime.backends.raw.load_raw("movenet.tflite", shapes={"input": (1, 192, 192, 3)})
    outputs = model.run({"input": frame})      # {output name: array}, in the model's output order

What `predict --raw` and `bench` use for models that are not image classifiers (pose, segmentation, audio,
several inputs or outputs). Inputs are checked against each tensor's dtype and shape before the backend sees
them; a dynamic dimension needs a size (`shapes`, `--shape NAME=1,3,224,224`), except a leading batch one,
which is 1 for example inputs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from runtime.artifacts.preprocessing import Preprocessing, image_to_pixels
from runtime.backends.inputs import read_npy
from runtime.backends.model import Options, input_layout
from runtime.backends.onnx import session
from runtime.backends.onnx_proto import ONNX_DTYPES
from runtime.backends.sparse import interpreter
from runtime.errors import ArtifactError, EdgeKitError, first_line
from runtime.fsutil import atomic_write_bytes, check_readable_file
from runtime.limits import threads as bounded_threads
from runtime.load import BACKENDS
from runtime.text import terminal

MAX_ELEMENTS = 1 << 28  # one input of at most 256 Mi elements (1 GiB of float32)
JSON_VALUES = 4096  # outputs this small are printed whole by `predict --raw --json`


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple  # -1 for a dynamic dimension
    dtype: str

    def concrete(self, given: tuple | None) -> tuple:
        """The shape to feed: `given` (checked against the fixed dimensions), or this one with a dynamic leading
        dimension as 1; a dynamic inner dimension without `given` is a one-line error."""
        if given is not None:
            if len(given) != len(self.shape) or any(d != -1 and d != g for d, g in zip(self.shape, given)):
                raise EdgeKitError(f"--shape {self.name}={','.join(map(str, given))} does not fit the input's shape "
                                   f"{_shown(self.shape)} (? is free).")
            shape = tuple(given)
        elif any(d < 0 for d in self.shape[1:]):
            raise EdgeKitError(f"input {self.name!r} has dynamic dimensions {_shown(self.shape)}; give them with "
                               f"--shape {self.name}=" + ",".join("1" if d < 0 else str(d) for d in self.shape)
                               + " (shapes= to runtime.backends.raw.load_raw).")
        else:
            shape = tuple(1 if d < 0 else d for d in self.shape)
        if math.prod(shape) > MAX_ELEMENTS or min(shape, default=1) < 1:
            raise EdgeKitError(f"input {self.name!r} of shape {list(shape)} is empty or larger than "
                               f"{MAX_ELEMENTS:,} elements.")
        return shape


def _shown(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def parse_shapes(texts) -> dict[str, tuple]:
    """['input=1,3,224,224', ...] -> {'input': (1, 3, 224, 224)}."""
    shapes = {}
    for text in texts or ():
        name, _, dims = str(text).rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not name or not shape or min(shape) < 1:
            raise EdgeKitError(f"--shape takes NAME=D1,D2,... with whole dimensions of 1 or more (e.g. "
                               f"input=1,3,224,224); got {text!r}.")
        shapes[name] = shape
    return shapes


class RawModel:
    """A loaded model of any inputs and outputs (see the module docstring)."""

    backend = ""

    def __init__(self, path: Path, inputs: list[Tensor], outputs: list[Tensor], shapes: dict | None):
        self.path, self.inputs, self.outputs = path, inputs, outputs
        unknown = sorted(set(shapes or {}) - {t.name for t in inputs})
        if unknown:
            raise EdgeKitError(f"--shape names {unknown}, which {path.name} does not take; its inputs: "
                               f"{', '.join(t.name + ' ' + _shown(t.shape) for t in inputs)}.")
        self.shapes = {t.name: t.concrete((shapes or {}).get(t.name)) for t in inputs}

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def example(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs of each tensor's dtype and shape (normal noise for floats, the full range for integers)."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape, dtype = self.shapes[t.name], _numeric(t)
            if dtype.kind == "f":
                feeds[t.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                info = np.iinfo(dtype)
                feeds[t.name] = rng.integers(max(info.min, -128), min(info.max, 255) + 1, shape).astype(dtype)
            else:
                feeds[t.name] = rng.integers(0, 2, shape).astype(bool)
        return feeds

    def check(self, feeds: dict) -> dict[str, np.ndarray]:
        """`feeds` with every input present, of its dtype (floats cast to a float input's) and shape."""
        missing = [t.name for t in self.inputs if t.name not in feeds]
        extra = sorted(set(feeds) - {t.name for t in self.inputs})
        if missing or extra:
            raise EdgeKitError(f"{self.path.name} takes inputs {[t.name for t in self.inputs]}; "
                               f"{'missing ' + str(missing) if missing else ''}{' ' if missing and extra else ''}"
                               f"{'unknown ' + str(extra) if extra else ''}.")
        checked = {}
        for t in self.inputs:
            x, dtype = np.asarray(feeds[t.name]), _numeric(t)
            if x.dtype != dtype:
                if not (x.dtype.kind == "f" and dtype.kind == "f"):
                    raise EdgeKitError(f"input {t.name!r} takes {t.dtype}; got {x.dtype}. Convert it first.")
                x = x.astype(dtype)
            if x.ndim != len(t.shape) or any(d != -1 and d != g for d, g in zip(t.shape, x.shape)):
                raise EdgeKitError(f"input {t.name!r} takes shape {_shown(t.shape)}; got {list(x.shape)}.")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise EdgeKitError(f"input {t.name!r} holds NaN or infinite values; expected finite numbers.")
            checked[t.name] = np.ascontiguousarray(x)
        return checked

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """{output name: array} for checked `feeds`."""
        return self._run(self.check(feeds))

    def invoker(self, feeds: dict):
        """A zero-argument function running only the backend's call on `feeds` (for bench)."""
        raise NotImplementedError

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError


class _TFLiteRaw(RawModel):
    backend = "tflite"

    def __init__(self, path: Path, threads: int | None, shapes: dict | None):
        try:
            self._interpreter = interpreter(path, num_threads=threads)  # sparse weights densified
            details_in = self._interpreter.get_input_details()
            details_out = self._interpreter.get_output_details()
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{path} is not a valid TFLite model ({first_line(exc)}).") from exc

        def tensor(d):
            return Tensor(d["name"], tuple(int(v) for v in d.get("shape_signature", d["shape"])),
                          np.dtype(d["dtype"]).name)

        super().__init__(path, [tensor(d) for d in details_in], [tensor(d) for d in details_out], shapes)
        self._in = {d["name"]: d["index"] for d in details_in}
        self._out = [d["index"] for d in details_out]
        self._allocated = None

    def _allocate(self, feeds: dict) -> None:
        shapes = {name: x.shape for name, x in feeds.items()}
        if shapes == self._allocated:
            return
        try:
            for name, shape in shapes.items():
                self._interpreter.resize_tensor_input(self._in[name], list(shape), strict=False)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise EdgeKitError(f"{self.path.name} cannot run on inputs of shapes {shapes} "
                               f"({first_line(exc)}).") from exc
        self._allocated = shapes

    def _set(self, feeds: dict) -> None:
        self._allocate(feeds)
        for name, x in feeds.items():
            self._interpreter.set_tensor(self._in[name], x)

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:
        self._set(feeds)
        self._interpreter.invoke()
        return {t.name: self._interpreter.get_tensor(i).copy() for t, i in zip(self.outputs, self._out)}

    def invoker(self, feeds: dict):
        self._set(self.check(feeds))
        return self._interpreter.invoke


class _ONNXRaw(RawModel):
    backend = "onnx"

    def __init__(self, path: Path, threads: int | None, shapes: dict | None):
        self._session = session(path, threads)

        def tensor(node):
            return Tensor(node.name, tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape),
                          ONNX_DTYPES.get(node.type, node.type))

        super().__init__(path, [tensor(n) for n in self._session.get_inputs()],
                         [tensor(n) for n in self._session.get_outputs()], shapes)

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own error types: a shape the graph cannot take
            raise EdgeKitError(f"{self.path.name} cannot run on these inputs ({first_line(exc)}).") from exc
        return {t.name: v for t, v in zip(self.outputs, values)}

    def invoker(self, feeds: dict):
        checked, run = self.check(feeds), self._session.run
        return lambda: run(None, checked)


def _numeric(t: Tensor) -> np.dtype:
    """The numpy dtype of a tensor EdgeKit can feed: numbers or booleans (an ONNX string tensor is neither)."""
    try:
        dtype = np.dtype(t.dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "fiub":
        raise EdgeKitError(f"input {t.name!r} takes {t.dtype} values; EdgeKit feeds numbers and booleans only "
                           "(.npy arrays of them).")
    return dtype


def load_raw(path: str | Path, threads: int | None = None, shapes: dict | None = None) -> RawModel:
    """Any .tflite or .onnx model (see the module docstring); `shapes`: {input name: shape} for dynamic ones."""

    path = Path(path)
    if BACKENDS.get(path.suffix.lower()) is None:
        raise EdgeKitError(f"{path}: expected a .tflite or .onnx model file; got '{path.suffix or 'no suffix'}'.")
    if threads is not None:
        bounded_threads(threads, "threads")
    if check_readable_file(path, "model file").st_size == 0:
        raise ArtifactError(f"model file {path} is empty.")
    cls = _TFLiteRaw if path.suffix.lower() == ".tflite" else _ONNXRaw
    return cls(path, threads, shapes)


def save_outputs(outputs: dict[str, np.ndarray], path: Path) -> dict[str, str]:
    """Every output in one .npz (written atomically); returns {output name: key in the file} (keys are the
    names made safe for a zip member: letters, digits, ., _ and -)."""

    keys, used = {}, set()
    for name in outputs:
        key = re.sub(r"[^\w.\-]", "_", name)[:100] or "output"
        while key in used:
            key += "_"
        used.add(key)
        keys[name] = key
    buffer = io.BytesIO()
    np.savez(buffer, **{keys[name]: value for name, value in outputs.items()})
    atomic_write_bytes(path, buffer.getvalue())
    return keys


def describe_outputs(outputs: dict[str, np.ndarray]) -> list[dict]:
    """For JSON: each output's name, shape, dtype, summary, and its values when it is small."""
    records = []
    for name, value in outputs.items():
        record = {"name": name, "shape": list(value.shape), "dtype": value.dtype.name}
        if value.size and value.dtype.kind in "fiub":
            finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
            record.update(min=float(finite.min()) if finite.size else None,
                          max=float(finite.max()) if finite.size else None,
                          non_finite=int(value.size - finite.size))
        if value.size <= JSON_VALUES:
            record["values"] = value.tolist() if value.dtype.kind != "f" or np.isfinite(value).all() else \
                [None if not np.isfinite(v) else float(v) for v in value.ravel()]
        records.append(record)
    return records


def predict_raw(args) -> int:
    """predict --raw: every output tensor of any model, for inputs given as .npy arrays (NAME=file.npy, or in
    the model's input order) or, for one image input, an image file preprocessed with --mean/--std."""

    model = load_raw(args.model, threads=args.threads, shapes=parse_shapes(args.shape))
    options = Options(args.mean, args.std, args.resize, None, args.layout)  # checked: both or neither
    names = [t.name for t in model.inputs]
    feeds = {}
    for i, given in enumerate(args.inputs):
        name, sep, file = given.partition("=") if "=" in given and given.split("=", 1)[0] in names else ("", "", given)
        if not sep:
            if i >= len(names):
                raise EdgeKitError(f"{Path(args.model).name} takes {len(names)} input(s) ({', '.join(names)}); got "
                                   f"{len(args.inputs)} files. Name each: NAME=file.npy.")
            name = names[i]
        check_readable_file(file, "input")
        if Path(file).suffix.lower() == ".npy":
            feeds[name] = read_npy(Path(file))
        else:
            feeds[name] = image_input(model, name, Path(file), options)
    outputs = model.run(feeds)
    out = Path(args.out or f"{Path(args.model).stem}.outputs.npz")
    keys = save_outputs(outputs, out)
    if args.json:
        print(json.dumps({"model": str(model.path), "file": str(out), "keys": keys,
                          "outputs": describe_outputs(outputs)}, indent=1))
        return 0

    for record in describe_outputs(outputs):
        span = "" if record.get("min") is None else f"  min {record['min']:.6g} max {record['max']:.6g}"
        bad = f"  {record['non_finite']} NaN/inf" if record.get("non_finite") else ""
        print(f"{terminal(record['name'])}  {record['shape']} {record['dtype']}{span}{bad}")
    print(f"wrote {out} (numpy.load; keys: {', '.join(terminal(k) for k in keys.values())})")
    return 0


def image_input(model, name: str, path, options):
    """An image file as the input `name` of a raw model: resized to its height and width (in its layout),
    pixels for an 8-bit input (int8: pixels - 128), else (pixels - mean) / std."""

    tensor = next(t for t in model.inputs if t.name == name)
    shape = model.shapes[name]
    if len(shape) != 4:
        raise EdgeKitError(f"input {name!r} of shape {list(shape)} is not an image input; give it a .npy array.")
    layout = input_layout(shape, options.layout, None, model.path.name)
    h, w, c = (shape[2], shape[3], shape[1]) if layout == "nchw" else shape[1:]
    if c not in (1, 3):
        raise EdgeKitError(f"input {name!r} takes {c} channels; an image gives 1 or 3. Give it a .npy array.")
    pixels = image_to_pixels(path, (h, w), c, options.resize or "bilinear")[None].repeat(shape[0], axis=0)
    if tensor.dtype == "uint8":
        x = pixels
    elif tensor.dtype == "int8":
        x = (pixels.astype(np.int16) - 128).astype(np.int8)
    elif options.mean is None:
        raise EdgeKitError(f"input {name!r} takes {tensor.dtype}; pass --mean and --std to say how pixels become "
                           "it (e.g. 127.5 and 127.5 for [-1, 1], 0 and 255 for [0, 1]).")
    else:  # the one preprocessing code, as a model with a sidecar uses it
        x = Preprocessing((h, w), c, scale=1.0, mean=options.mean, std=options.std).apply(pixels).astype(tensor.dtype)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x
