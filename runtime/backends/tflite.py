"""The TFLite backend: a .tflite file in ai-edge-litert's interpreter (resized for a batch where the graph
allows it, looped otherwise), and the operator and dtype census of a file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from runtime.artifacts.labels import packed_labels
from runtime.backends.model import Model, NotAClassifier
from runtime.backends.sparse import densify, interpreter
from runtime.backends.tensors import TensorInfo, dim
from runtime.errors import ArtifactError, first_line


class TFLiteModel(Model):
    def __init__(self, path, threads, sidecar, options=None):
        try:
            self._interpreter = interpreter(path, num_threads=threads)  # sparse weights densified
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

    def graph(self) -> list:
        """The graph's operators in order, each with its input and output shapes and dtypes: equal for files that
        differ only in their weights' values (a pruned or clustered model's file and its parent's)."""
        tensors = {t["index"]: [[int(d) for d in t["shape"]], np.dtype(t["dtype"]).name]
                   for t in self._interpreter.get_tensor_details()}
        return [[op["op_name"], [tensors.get(int(i)) for i in op["inputs"]], [tensors.get(int(i)) for i in op["outputs"]]]
                for op in self._interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]

    @staticmethod
    def _info(detail) -> TensorInfo:
        scale, zero_point = detail["quantization"]
        shape = tuple(dim(d) for d in detail.get("shape_signature", detail["shape"]))
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
        interpreter.set_tensor(self._in, self.to_layout(fed))
        interpreter.invoke()
        return interpreter.get_tensor(self._out)

    def _run(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        if self._loop:  # a chunk cut before the graph refused resizing (a fixed batch) runs in the graph's batches
            return self._invoke(x, pixels) if len(x) == self.batch else self._looped(x, pixels)
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
        self._interpreter.set_tensor(self._in, self.to_layout(fed))
        return self._interpreter.invoke


def tflite_census(model: bytes | str | Path) -> dict:
    """What a .tflite file is made of, as LiteRT reads it: {"ops": {name: count}, "dtypes": {dtype: tensors},
    "float_ops": [names of ops with a float32 input or output]}. A fully integer file has no float op."""

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    interpreter = Interpreter(model_content=densify(data))  # the graph that runs: sparse weights dense
    tensors = interpreter.get_tensor_details()
    dtype = {t["index"]: np.dtype(t["dtype"]).name for t in tensors}
    ops = interpreter._get_ops_details()  # LiteRT has no public per-op listing
    return {"ops": dict(Counter(op["op_name"] for op in ops)),
            "dtypes": dict(Counter(dtype.values())),
            "float_ops": [op["op_name"] for op in ops
                          if any(dtype.get(i) == "float32" for i in [*op["inputs"], *op["outputs"]] if i >= 0)]}


