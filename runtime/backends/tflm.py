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
import math
import os
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

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


def _model(data: bytes):
    from runtime.backends.sparse import \
        flatbuffer_schema  # the flatbuffer schema LiteRT ships, as the sparse decoder reads it

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
    schema, model = _model(data)
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
    schema, model = _model(data)
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


def _reference(path: str | Path, every_tensor: bool = False):
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=every_tensor)
    it.allocate_tensors()
    return it


def reference_outputs(path: str | Path, fed: np.ndarray) -> np.ndarray:
    """LiteRT's reference kernels (OpResolverType.BUILTIN_REF: no XNNPACK, no optimized kernels) on the same
    inputs: the implementation TFLM's kernels follow, to the bit, but for FULLY_CONNECTED's rounding
    (`first_differences`)."""
    it = _reference(path)
    index_in, index_out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    out = []
    for x in fed:
        it.set_tensor(index_in, x[None])
        it.invoke()
        out.append(it.get_tensor(index_out)[0].copy())
    return np.stack(out) if out else np.empty((0,))


# Where TFLM and LiteRT's reference kernels part: requantizing an accumulator (x real_multiplier, as a 31-bit
# fixed-point multiplier and a shift), TFLM rounds twice, gemmlowp's way (a rounding doubling high multiply, then a
# rounding right shift) in every kernel; LiteRT's reference FULLY_CONNECTED rounds the 64-bit product once
# (TFLITE_SINGLE_ROUNDING's arithmetic), its CONV_2D twice. The two agree but where the first rounding lands on a
# tie of the second: one step apart, on a few values in a thousand.
ROUNDING = "TFLM rounds twice, gemmlowp's way; LiteRT's reference FULLY_CONNECTED rounds once"


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: real = multiplier x 2^(shift - 31), the multiplier in [2^30, 2^31)."""
    if real == 0:
        return 0, 0
    fraction, shift = math.frexp(real)
    fixed = math.floor(fraction * (1 << 31) + 0.5)  # TfLiteRound: half away from zero (fraction > 0)
    if fixed == 1 << 31:
        fixed, shift = fixed // 2, shift + 1
    return (0, 0) if shift < -31 else (int(fixed), shift)


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, *, single: bool) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier on int64 arrays (shapes broadcast): `single`, one rounding of the
    64-bit product (TFLITE_SINGLE_ROUNDING); otherwise gemmlowp's SaturatingRoundingDoublingHighMul of the
    left-shifted value, then RoundingDivideByPOT."""
    acc, multiplier, shift = (np.asarray(v, np.int64) for v in (acc, multiplier, shift))
    if single:
        total = 31 - shift
        return (acc * multiplier + (np.int64(1) << (total - 1))) >> total
    product = (acc << np.maximum(shift, 0)) * multiplier
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))  # C++ division: toward zero
    right = np.maximum(-shift, 0)
    mask = (np.int64(1) << right) - 1
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


def _activation_range(data: bytes, output: int, scale: float, zero: int) -> tuple[int, int] | None:
    """The int8 clamp of the FULLY_CONNECTED writing tensor `output`: its fused activation (TFLite's
    CalculateActivationRangeQuantized), or None for one this check does not model."""
    schema, model = _model(data)
    graph = model.Subgraphs(0)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if op.OutputsLength() and int(op.Outputs(0)) == output:
            table = op.BuiltinOptions()
            fused = schema.ActivationFunctionType.NONE
            if table is not None:
                options = schema.FullyConnectedOptions()
                options.Init(table.Bytes, table.Pos)
                fused = options.FusedActivationFunction()

            def q(v):
                return zero + int(math.floor(abs(v / scale) + 0.5)) * (1 if v >= 0 else -1)

            kinds = schema.ActivationFunctionType
            return {kinds.NONE: (-128, 127), kinds.RELU: (max(-128, q(0.0)), 127),
                    kinds.RELU6: (max(-128, q(0.0)), min(127, q(6.0))),
                    kinds.RELU_N1_TO_1: (max(-128, q(-1.0)), min(127, q(1.0)))}.get(fused)
    return None


def fully_connected(op: dict, data: bytes, details: dict, tensor, *, single: bool) -> np.ndarray | None:
    """An int8 FULLY_CONNECTED recomputed exactly from its input and weights as `tensor(index)` gives them (either
    interpreter's, every tensor kept), requantized with one rounding or two; `details` are LiteRT's tensor details
    by index (the quantization). None for a form this check does not model."""
    ins = [int(i) for i in op["inputs"]]
    out = int(op["outputs"][0])
    if len(ins) < 2 or any(details[i]["dtype"] != np.int8 for i in (ins[0], ins[1], out)):
        return None
    q = {i: details[i]["quantization_parameters"] for i in (ins[0], ins[1], out)}
    weights = np.asarray(tensor(ins[1])).astype(np.int64)
    if weights.ndim != 2 or len(q[ins[0]]["scales"]) != 1 or len(q[out]["scales"]) != 1:
        return None
    units = weights.shape[0]
    weights -= np.broadcast_to(q[ins[1]]["zero_points"].astype(np.int64), (units,))[:, None]
    x = np.asarray(tensor(ins[0])).astype(np.int64).reshape(-1, weights.shape[1]) - int(q[ins[0]]["zero_points"][0])
    acc = x @ weights.T
    if len(ins) > 2 and ins[2] >= 0:
        acc = acc + np.asarray(tensor(ins[2])).astype(np.int64)
    scale_in, scale_out, zero_out = (float(q[ins[0]]["scales"][0]), float(q[out]["scales"][0]),
                                     int(q[out]["zero_points"][0]))
    pairs = [quantize_multiplier(scale_in * float(s) / scale_out)
             for s in np.broadcast_to(q[ins[1]]["scales"].astype(np.float64), (units,))]
    clamp = _activation_range(data, out, scale_out, zero_out)
    if clamp is None:
        return None
    values = requantize(acc, [m for m, _ in pairs], [s for _, s in pairs], single=single) + zero_out
    return np.clip(values, *clamp).astype(np.int8)


def first_differences(path: str | Path, fed: np.ndarray) -> list[dict]:
    """For each input, TFLM and LiteRT's reference kernels run keeping every tensor, compared operator by operator
    in execution order: {} when every tensor is equal; otherwise the first operator whose output differs and
    whether every difference is FULLY_CONNECTED's rounding (`ROUNDING`): each operator whose inputs agree gives the
    same output, but a FULLY_CONNECTED whose output is, exactly, its input requantized with two roundings in TFLM
    and with one in LiteRT. (An operator fed a tensor that already differs cannot be compared.)"""
    data = Path(path).read_bytes()
    tm, it = interpreter(path, every_tensor=True), _reference(path, every_tensor=True)
    ops = it._get_ops_details()  # noqa: SLF001 (LiteRT lists its operators no other way)
    details = {d["index"]: d for d in it.get_tensor_details()}
    made = {int(i) for op in ops for i in op["outputs"]}  # tensors an operator writes: the ones that can differ
    mine, found = functools.partial(_tflm_tensor, tm), []
    for x in fed:
        tm.set_input(x[None], 0)
        tm.invoke()
        it.set_tensor(it.get_input_details()[0]["index"], x[None])
        it.invoke()
        differ: set[int] = set()
        first, rounding = {}, True
        for op in ops:
            out = int(op["outputs"][0])
            if np.array_equal(mine(out).reshape(-1), it.get_tensor(out).reshape(-1)):
                continue
            first = first or {"operator": op["op_name"], "tensor": details.get(out, {}).get("name", str(out))}
            fed_a_difference = bool(differ & {int(i) for i in op["inputs"] if int(i) in made})
            differ.add(out)
            if fed_a_difference:
                continue  # an operator fed a tensor that already differs cannot be compared
            rounding = rounding and op["op_name"] == "FULLY_CONNECTED" and all(
                (exact := fully_connected(op, data, details, get, single=single)) is not None
                and np.array_equal(exact.reshape(-1), np.asarray(get(out)).reshape(-1))
                for get, single in ((mine, False), (it.get_tensor, True)))
        found.append({**first, "rounding": rounding} if first else {})
    return found


def _tflm_tensor(tm, index: int) -> np.ndarray:
    return np.asarray(tm.GetTensor(int(index), 0)["tensor_data"])


class MicroModel(TFLiteModel):
    """A .tflite file run by TFLM's interpreter (`runtime.load(path, backend="micro")`): one image per invoke, as
    on a microcontroller. LiteRT reads the file's description (tensors, graph); TFLM computes every output."""

    def __init__(self, path, threads, sidecar, options=None):
        super().__init__(path, None, sidecar, options)
        self.backend = "micro"
        self._micro = interpreter(path)
        self.batch, self._loop, self._resized, self._one_ready = 1, True, 1, True

    def _invoke(self, x: np.ndarray, pixels: bool) -> np.ndarray:
        fed = self._tensor(self._feed(x, pixels))
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
        fed = self._tensor(self._feed(x, pixels))
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
