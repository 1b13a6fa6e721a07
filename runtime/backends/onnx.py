"""The ONNX backend: a .onnx file in an onnxruntime CPU session, and one image of a float-input model (a PyTorch
file) through the compiled path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.backends import tensors
from runtime.backends.model import Model, NotAClassifier
from runtime.backends.onnx_proto import ONNX_DTYPES, external_files, onnx_producers, onnx_summary
from runtime.backends.tensors import F32, TensorInfo
from runtime.errors import ArtifactError, first_line


def session(path, threads: int | None = None):
    """An onnxruntime CPU session of a file, its external data checked first (`onnx_proto.external_files`: files
    beside the model, in subgraphs too), or ArtifactError in one line. Every ONNX file the runtime opens comes
    through here."""

    try:
        external_files(Path(path), Path(path).read_bytes())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not a valid ONNX model ({exc}). Refused.") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path} ({exc.strerror}).") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ArtifactError(f"{path} is not a valid ONNX model ({first_line(exc)}).") from exc


class ONNXModel(Model):

    def __init__(self, path, threads, sidecar, options=None):
        self._session = session(path, threads)
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
        if (tensors.KERNELS is None or self.preprocessing is None or self.input.dtype != "float32"
                or self.output.dtype != "float32" or not self._one_ready):
            return None
        table = self._pixel_table(False)
        h, w, c = self._shape
        planar = self._nchw
        buffer = np.empty((1, c, h, w) if planar else (1, h, w, c), np.float32)
        run, names, feed = self._session.run, self._names, {self.input.name: buffer}
        pixels, softmax_float = tensors.KERNELS.pixels, tensors.KERNELS.softmax_float
        own = self.output_kind == "probabilities"

        def fast(x: np.ndarray):
            if not pixels(table, x, buffer, c, planar):
                return None
            raw = run(names, feed)[0]
            if own:
                return raw
            p = np.empty(raw.shape, F32)
            return p if softmax_float(raw, p) else None

        return fast

    def graph(self) -> list:
        """The graph's operator census, its inputs' and outputs' shapes (see the TFLite backend's `graph`)."""

        ops = onnx_summary(self.path.read_bytes())["ops"]
        ends = [[n.name, [str(d) for d in n.shape], n.type] for n in [*self._session.get_inputs(),
                                                                     *self._session.get_outputs()]]
        return [sorted(ops.items()), ends]

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
        return self._session.run(self._names, {self.input.name: self.to_layout(self._feed(x, pixels))})[0]

    def _run_one(self, fed: np.ndarray) -> np.ndarray:
        return self._session.run(self._names, {self.input.name: self.to_layout(fed)})[0]

    def invoker(self, x: np.ndarray):
        x, pixels = self._checked(x)
        if self.batch and len(x) != self.batch:
            raise self._fixed_batch_error()
        run, names, feed = self._session.run, self._names, {self.input.name: self.to_layout(self._feed(x, pixels))}
        return lambda: run(names, feed)


