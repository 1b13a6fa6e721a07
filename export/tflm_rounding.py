"""Where TFLM and LiteRT's reference kernels part, proven operator by operator: export's check of a micro file
(export/micro.py) runs both interpreters keeping every tensor and shows that each difference is FULLY_CONNECTED's
rounding (`ROUNDING`), recomputed exactly from the operator's inputs and weights, or the file fails.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from runtime.backends.tflm import interpreter, parse_model


def reference_interpreter(path: str | Path, every_tensor: bool = False):
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=every_tensor)
    it.allocate_tensors()
    return it


def reference_outputs(path: str | Path, fed: np.ndarray) -> np.ndarray:
    """LiteRT's reference kernels (OpResolverType.BUILTIN_REF: no XNNPACK, no optimized kernels) on the same
    inputs: the implementation TFLM's kernels follow, to the bit, but for FULLY_CONNECTED's rounding
    (`first_differences`)."""
    it = reference_interpreter(path)
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


def activation_range(data: bytes, output: int, scale: float, zero: int) -> tuple[int, int] | None:
    """The int8 clamp of the FULLY_CONNECTED writing tensor `output`: its fused activation (TFLite's
    CalculateActivationRangeQuantized), or None for one this check does not model."""
    schema, model = parse_model(data)
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
    clamp = activation_range(data, out, scale_out, zero_out)
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
    tm, it = interpreter(path, every_tensor=True), reference_interpreter(path, every_tensor=True)
    ops = it._get_ops_details()  # noqa: SLF001 (LiteRT lists its operators no other way)
    details = {d["index"]: d for d in it.get_tensor_details()}
    made = {int(i) for op in ops for i in op["outputs"]}  # tensors an operator writes: the ones that can differ
    mine, found = functools.partial(tflm_tensor, tm), []
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


def tflm_tensor(tm, index: int) -> np.ndarray:
    return np.asarray(tm.GetTensor(int(index), 0)["tensor_data"])
