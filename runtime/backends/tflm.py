"""TensorFlow Lite for Microcontrollers (TFLM): a fully integer .tflite file as a microcontroller runs it.

The `tflite-micro` package (the `micro` extra, imported lazily) is TFLM's interpreter as a CPython extension:
the same C++ kernels a Cortex-M firmware links (the reference ones), the same arena allocator. So here:

    arena_bytes(path)       the tensor arena the file needs, measured by TFLM's RecordingMicroAllocator
    operators(data)         the builtin operators the file uses, in first-use order
    unsupported(ops)        those TFLM has no kernel for (MicroMutableOpResolver's Add* methods)
    macs(data)              multiply-accumulates per inference (convolutions and fully connected layers)
    MicroModel              `runtime.load(path, backend="micro")`: predict, eval and bench in TFLM
    reference_outputs(...)  LiteRT's reference kernels (BUILTIN_REF) on the same inputs, for bit-equality
    first_differences(...)  where the two part, tensor by tensor, and whether it is FULLY_CONNECTED's rounding

Flash is the model's bytes (the array is `const`, so it stays in flash); RAM is the arena, plus the
application's own stack and buffers, which no tool can know.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from runtime.backends.sparse import flatbuffer_schema
from runtime.backends.tflite import TFLiteModel
from runtime.errors import ArtifactError, EdgeKitError, WorkFailed

EXTRA = "pip install 'edgekit-ml[micro]' (the tflite-micro package)"
ARENA_MAX = 64 * 2**20  # what a microcontroller could hold, with room; the search for a file's arena stops here
# TFLM's builtin kernels, by the TFLite operator name (tensorflow/lite/micro/micro_mutable_op_resolver.h)
TFLM_OPERATORS = frozenset((
    "ABS", "ADD", "ADD_N", "ARG_MAX", "ARG_MIN", "ASSIGN_VARIABLE", "AVERAGE_POOL_2D", "BATCH_MATMUL",
    "BATCH_TO_SPACE_ND", "BROADCAST_ARGS", "BROADCAST_TO", "CALL_ONCE", "CAST", "CEIL", "CONCATENATION", "CONV_2D",
    "COS", "CUMSUM", "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "DIV", "ELU", "EMBEDDING_LOOKUP", "EQUAL",
    "EXP", "EXPAND_DIMS", "FILL", "FLOOR", "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED", "GATHER", "GATHER_ND",
    "GREATER", "GREATER_EQUAL", "HARD_SWISH", "IF", "L2_NORMALIZATION", "L2_POOL_2D", "LEAKY_RELU", "LESS",
    "LESS_EQUAL", "LOG", "LOG_SOFTMAX", "LOGICAL_AND", "LOGICAL_NOT", "LOGICAL_OR", "LOGISTIC", "MAX_POOL_2D",
    "MAXIMUM", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG", "NOT_EQUAL", "PACK", "PAD", "PADV2", "PRELU",
    "QUANTIZE", "READ_VARIABLE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "REVERSE_V2", "ROUND", "RSQRT", "SELECT_V2", "SHAPE", "SIN", "SLICE", "SOFTMAX",
    "SPACE_TO_BATCH_ND", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V", "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "SVDF", "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "UNPACK", "VAR_HANDLE", "WHILE", "ZEROS_LIKE", "DYNAMIC_UPDATE_SLICE"))


def tflm():
    """TFLM's Python interpreter module, or one line saying how to install it."""
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise EdgeKitError(f"microcontroller files run in TensorFlow Lite Micro's interpreter, which is not "
                           f"installed: {EXTRA}.") from None
    return runtime


def parse_model(data: bytes):

    schema = flatbuffer_schema()
    if len(data) < 8 or not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ArtifactError("not a TFLite flatbuffer (no TFL3 identifier); export it again.")
    return schema, schema.Model.GetRootAs(data, 0)


@functools.lru_cache(maxsize=None)
def _op_names(schema) -> dict[int, str]:
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _code(schema, model, op) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # the deprecated field holds codes < 127
    name = _op_names(schema).get(builtin, f"BUILTIN_{builtin}")
    return f"CUSTOM:{code.CustomCode().decode('utf-8', 'replace')}" if name == "CUSTOM" else name


def operators(data: bytes) -> list[str]:
    """The operators a .tflite file uses, in first-use order ('CUSTOM:name' for a custom one)."""
    schema, model = parse_model(data)
    seen: list[str] = []
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.OperatorsLength()):
            name = _code(schema, model, graph.Operators(i))
            if name not in seen:
                seen.append(name)
    return seen


def unsupported(ops: list[str]) -> list[str]:
    return [op for op in ops if op not in TFLM_OPERATORS]


def macs(data: bytes) -> int:
    """Multiply-accumulates of one inference: CONV_2D (output elements x kernel height x width x input channels),
    DEPTHWISE_CONV_2D (output elements x kernel height x width), FULLY_CONNECTED and BATCH_MATMUL (output
    elements x the reduced dimension), TRANSPOSE_CONV (input elements x kernel height x width x output
    channels). Elementwise operators, pooling and softmax are not multiply-accumulates and are not counted."""
    schema, model = parse_model(data)
    total = 0
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)

        def shape(index):
            if index < 0:
                return []
            return [max(1, int(d)) for d in graph.Tensors(index).ShapeAsNumpy()] if \
                graph.Tensors(index).ShapeLength() else []

        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            name = _code(schema, model, op)
            ins = [int(v) for v in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(v) for v in op.OutputsAsNumpy()] if op.OutputsLength() else []
            if not ins or not outs:
                continue
            out = int(np.prod(shape(outs[0]), dtype=np.int64)) if shape(outs[0]) else 0
            weights = shape(ins[1]) if len(ins) > 1 else []
            if name == "CONV_2D" and len(weights) == 4:  # [out_c, kh, kw, in_c]
                total += out * weights[1] * weights[2] * weights[3]
            elif name == "DEPTHWISE_CONV_2D" and len(weights) == 4:  # [1, kh, kw, out_c]
                total += out * weights[1] * weights[2]
            elif name == "FULLY_CONNECTED" and len(weights) == 2:  # [units, in]
                total += out * weights[1]
            elif name == "BATCH_MATMUL" and len(weights) >= 2:
                total += out * shape(ins[0])[-1]
            elif name == "TRANSPOSE_CONV" and len(ins) > 2 and len(shape(ins[1])) == 4:  # [out_c, kh, kw, in_c]
                w = shape(ins[1])
                total += int(np.prod(shape(ins[2]), dtype=np.int64)) * w[0] * w[1] * w[2]
    return int(total)


class _Stderr:
    """What C++ code writes to file descriptor 2 while the block runs (TFLM prints its allocations there)."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read(2**20).decode("utf-8", "replace")
        self._file.close()


def interpreter(path: str | Path, arena: int | None = None, every_tensor: bool = False):
    """TFLM's interpreter for a file (its arena recorded as it is allocated, or with `every_tensor` each tensor
    kept for `GetTensor`); a file TFLM cannot run is one line naming why."""
    runtime = tflm()
    data = Path(path).read_bytes()
    missing = unsupported(operators(data))
    if missing:
        raise WorkFailed(f"{Path(path).name} uses {', '.join(missing)}, which TensorFlow Lite Micro has no kernel "
                         "for; a microcontroller cannot run it.")
    with _Stderr() as err:
        try:
            config = runtime.InterpreterConfig
            return runtime.Interpreter.from_file(str(path), arena_size=arena, intrepreter_config=(
                config.kPreserveAllTensors if every_tensor else config.kAllocationRecording))
        except (RuntimeError, ValueError) as exc:
            failure = exc
    reason = next((line.strip() for line in err.text.splitlines() if line.strip()), str(failure))
    raise WorkFailed(f"TensorFlow Lite Micro cannot run {Path(path).name}: {reason[:300]}")


def arena_bytes(path: str | Path) -> int:
    """The tensor arena TFLM allocates for the file, as its RecordingMicroAllocator reports it after an invoke."""
    it = interpreter(path)
    details = it.get_input_details(0)
    it.set_input(np.zeros(details["shape"], details["dtype"]), 0)
    it.invoke()
    with _Stderr() as err:
        it.print_allocations()
    found = re.search(r"Arena allocation total (\d+) bytes", err.text)
    if not found:
        raise WorkFailed(f"TensorFlow Lite Micro did not report the arena of {Path(path).name}.")
    return int(found.group(1))


def outputs(path: str | Path, fed: np.ndarray) -> np.ndarray:
    """TFLM's raw output tensor for each input tensor in `fed` (N, ...) of the file's input dtype, one at a time."""
    it = interpreter(path)
    out = []
    for x in fed:
        it.set_input(x[None], 0)
        it.invoke()
        out.append(np.array(it.get_output(0)[0]))
    return np.stack(out) if out else np.empty((0,))


class MicroModel(TFLiteModel):
    """A .tflite file run by TFLM's interpreter (`runtime.load(path, backend="micro")`): one image per invoke, as
    on a microcontroller. LiteRT reads the file's description (tensors, graph); TFLM computes every output."""

    def __init__(self, path, threads, sidecar, options=None):
        super().__init__(path, None, sidecar, options)
        self.backend = "micro"
        self._micro = interpreter(path)
        self.batch, self._loop, self._resized, self._one_ready = 1, True, 1, True

    def _invoke(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        fed = self.to_layout(self._feed(x, pixels))
        return self._run_one(fed) if len(fed) == 1 else np.concatenate([self._run_one(f[None]) for f in fed])

    def _run(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        return self._invoke(x, pixels)

    def _resize(self, n: int) -> bool:
        return n == 1

    def _one_runner(self):
        micro = self._micro
        first = self._channels_first if self._nchw else None

        def run(fed: np.ndarray) -> np.ndarray:
            micro.set_input(first(fed) if first else fed, 0)
            micro.invoke()
            return np.array(micro.get_output(0))
        return run

    def invoker(self, x: np.ndarray):
        x, pixels = self._checked(x)
        if len(x) != 1:
            raise self._fixed_batch_error()
        fed = self.to_layout(self._feed(x, pixels))
        micro = self._micro

        def invoke():
            micro.set_input(fed, 0)
            micro.invoke()
        return invoke


def version() -> str:
    try:
        return metadata.version("tflite-micro")
    except metadata.PackageNotFoundError:
        return "unknown"
