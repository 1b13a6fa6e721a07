"""`runtime.load(path)`: one model object for .tflite (ai-edge-litert) and .onnx (onnxruntime).

The caller passes preprocessed float input (N, H, W, C) and gets float logits back:
int8/uint8 input tensors are quantized, and integer outputs dequantized, with the
model's own scale and zero point. The sidecar `model.<variant>.json` next to the
file, when present, supplies preprocessing and labels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from runtime.errors import EdgeKitError

FORMATS = {".tflite": "tflite", ".onnx": "onnx"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # None (or -1) for a dynamic dimension
    dtype: str  # numpy dtype name: float32, int8, uint8, int16
    scale: float = 0.0  # quantization: real = (q - zero_point) * scale; 0.0 = not quantized
    zero_point: int = 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}


def sidecar_path(path: str | Path) -> Path:
    """model.int8.tflite -> model.int8.json"""
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)] + ".json")


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    limits = np.iinfo(info.dtype)
    q = np.round(x / info.scale + info.zero_point)
    return np.clip(q, limits.min, limits.max).astype(info.dtype)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    return (q.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)


class Model:
    """A loaded .tflite or .onnx classifier. `logits(x)` and `predict(x)` take float input."""

    def __init__(self, path: Path, fmt: str, input_info: TensorInfo, output_info: TensorInfo, sidecar: dict | None):
        self.path, self.format, self.input, self.output, self.sidecar = path, fmt, input_info, output_info, sidecar

    @property
    def labels(self) -> list[str] | None:
        return (self.sidecar or {}).get("labels")

    @property
    def preprocessing(self) -> dict | None:
        return (self.sidecar or {}).get("preprocessing")

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Float logits for preprocessed float input of shape (N, H, W, C)."""
        x = np.asarray(x, np.float32)
        outputs = [self._run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(outputs) if outputs else np.empty((0, self.output.shape[-1]), np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (softmax of the logits)."""
        z = self.logits(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def _feed(self, x: np.ndarray) -> np.ndarray:
        return quantize(x, self.input) if self.input.scale else x.astype(self.input.dtype)

    def _fetch(self, y: np.ndarray) -> np.ndarray:
        return dequantize(y, self.output) if self.output.scale else y.astype(np.float32)


class _TFLiteModel(Model):
    def __init__(self, path, threads, sidecar):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise EdgeKitError(f"{path} is not a valid TFLite model ({exc}); export it again.") from None
        self._batch = None
        super().__init__(path, "tflite", self._info(self._interpreter.get_input_details()[0]),
                         self._info(self._interpreter.get_output_details()[0]), sidecar)

    @staticmethod
    def _info(detail) -> TensorInfo:
        scale, zero_point = detail["quantization"]
        shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
        return TensorInfo(detail["name"], shape, np.dtype(detail["dtype"]).name, float(scale), int(zero_point))

    def _run(self, x: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter
        detail_in = interpreter.get_input_details()[0]
        if self._batch != len(x):  # resize the batch dimension once per batch size
            interpreter.resize_tensor_input(detail_in["index"], [len(x), *x.shape[1:]])
            interpreter.allocate_tensors()
            self._batch = len(x)
        interpreter.set_tensor(detail_in["index"], self._feed(x))
        interpreter.invoke()
        return self._fetch(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


class _ONNXModel(Model):
    _DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}

    def __init__(self, path, threads, sidecar):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise EdgeKitError(f"{path} is not a valid ONNX model ({str(exc)[:200]}); export it again.") from None
        node_in, node_out = self._session.get_inputs()[0], self._session.get_outputs()[0]
        super().__init__(path, "onnx", self._info(node_in), self._info(node_out), sidecar)

    def _info(self, node) -> TensorInfo:
        shape = tuple(d if isinstance(d, int) else None for d in node.shape)
        return TensorInfo(node.name, shape, self._DTYPES.get(node.type, node.type))

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._fetch(self._session.run([self.output.name], {self.input.name: self._feed(x)})[0])


def load(path: str | Path, threads: int | None = None) -> Model:
    """Load a .tflite or .onnx model (and its sidecar, if any) for CPU inference."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise EdgeKitError(f"{path}: expected a .tflite or .onnx file; got '{path.suffix or 'no suffix'}'.")
    if not path.is_file():
        raise EdgeKitError(f"model file {path} does not exist.")
    if path.stat().st_size == 0:
        raise EdgeKitError(f"model file {path} is empty; export it again.")
    sidecar = None
    if sidecar_path(path).is_file():
        try:
            sidecar = json.loads(sidecar_path(path).read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgeKitError(f"sidecar {sidecar_path(path)} is not valid JSON ({exc}); export again.") from None
    cls = _TFLiteModel if fmt == "tflite" else _ONNXModel
    return cls(path, threads, sidecar)
