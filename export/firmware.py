"""The C sources a firmware builds a micro file into: `model.micro.cc` (the model as a 16-byte aligned array) and
`model.micro.h` (everything the firmware needs to use it without EdgeKit's sidecar).

The header declares the array and its length, the tensor arena TFLM measured, `EdgeKitOpResolver` (a
MicroMutableOpResolver<N> with exactly the file's operators, registered by `RegisterEdgeKitOps`), and the model's
contract with the application, as constants:

    g_model_input_dims[4], g_model_input_layout   the input tensor's shape and layout ("NHWC" or "NCHW")
    g_model_pixel_scale, g_model_mean[C], g_model_std[C]
                                                  how a camera's pixel p (0..255) of channel c becomes the float
                                                  input x = (p * pixel_scale - mean[c]) / std[c]
    g_model_input_scale, g_model_input_zero_point x as the int8 the input tensor holds:
                                                  q = clamp(round(x / input_scale) + input_zero_point, -128, 127)
    g_model_output_scale, g_model_output_zero_point
                                                  an int8 output q as its value: (q - zero_point) * scale
    g_model_output_is_probabilities               whether the graph ends in softmax (else the values are logits)
    g_model_num_classes, g_model_labels[]         the classes, by output index

`main()` in scripts/check-micro-firmware uses nothing else and reproduces TFLM's Python answers bit for bit.
"""

from __future__ import annotations

import re

from runtime.backends.model import contract as model_contract

# the MicroMutableOpResolver method that adds each operator: the name in CamelCase, except these
_METHOD_EXCEPTIONS = {"PADV2": "PadV2", "CONV_2D": "Conv2D", "DEPTHWISE_CONV_2D": "DepthwiseConv2D",
                      "AVERAGE_POOL_2D": "AveragePool2D", "MAX_POOL_2D": "MaxPool2D", "L2_POOL_2D": "L2Pool2D",
                      "TRANSPOSE_CONV": "TransposeConv", "BATCH_MATMUL": "BatchMatMul"}


def method(operator: str) -> str:
    """The MicroMutableOpResolver method that registers an operator: 'CONV_2D' -> 'AddConv2D'."""
    return "Add" + _METHOD_EXCEPTIONS.get(operator, "".join(part.capitalize() for part in operator.split("_")))


def c_identifier(name: str) -> str:
    text = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return text if text and not text[0].isdigit() else f"m_{text}"


def c_string(text: str) -> str:
    """A C string literal of untrusted text (a label): printable ASCII as it is, every other byte of its UTF-8 as
    an octal escape, so no label can end the literal, start a comment or a trigraph."""
    out = []
    for byte in str(text).encode("utf-8"):
        char = chr(byte)
        out.append(char if 0x20 <= byte < 0x7f and char not in '"\\?' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_float(value: float) -> str:
    """A float constant that reads back as the same float32 (9 significant digits)."""
    text = f"{float(value):.9g}"
    return text + ("" if any(c in text for c in ".e") else ".0") + "f"  # 0f is no C literal; 0.0f is


def contract(model, preprocessing, labels: list[str], output_kind: str, name: str) -> list[str]:
    """The header's constants for the model's input and output (see the module docstring), from the one record of
    them (runtime.backends.model.contract)."""
    c = model_contract(model, preprocessing, labels, output_kind)
    dims = [int(d) if d and d > 0 else 1 for d in model.input.shape]  # the batch of one a firmware runs
    channels = len(c["mean"])
    probabilities = c["output_is_probabilities"]
    return [
        f"// The input tensor: int8 {dims} {c['layout'].upper()}. A pixel p (0..255) of channel c becomes",
        f"//   x = (p * {name}_pixel_scale - {name}_mean[c]) / {name}_std[c]",
        f"//   q = clamp(round(x / {name}_input_scale) + {name}_input_zero_point, -128, 127)",
        f"constexpr int {name}_input_dims[4] = {{{', '.join(map(str, dims))}}};",
        f'constexpr char {name}_input_layout[] = "{c["layout"].upper()}";',
        f"constexpr float {name}_pixel_scale = {c_float(c['pixel_scale'])};",
        f"constexpr float {name}_mean[{channels}] = {{{', '.join(map(c_float, c['mean']))}}};",
        f"constexpr float {name}_std[{channels}] = {{{', '.join(map(c_float, c['std']))}}};",
        f"constexpr float {name}_input_scale = {c_float(c['input_scale'])};",
        f"constexpr int {name}_input_zero_point = {c['input_zero_point']};",
        f"// The output tensor: int8 [1, {len(c['labels'])}]; a value q is (q - {name}_output_zero_point) * "
        f"{name}_output_scale,",
        "// " + ("probabilities (the graph ends in softmax)." if probabilities else
                 "logits: the largest is the class (apply softmax for probabilities)."),
        f"constexpr float {name}_output_scale = {c_float(c['output_scale'])};",
        f"constexpr int {name}_output_zero_point = {c['output_zero_point']};",
        f"constexpr bool {name}_output_is_probabilities = {'true' if probabilities else 'false'};",
        f"constexpr int {name}_num_classes = {len(c['labels'])};",
        f"constexpr const char* {name}_labels[{len(c['labels'])}] = {{{', '.join(c_string(v) for v in c['labels'])}}};",
    ]


def c_sources(data: bytes, ops: list[str], arena: int | None, constants: list[str],
              header_name: str = "model.micro.h", name: str = "g_model") -> tuple[str, str]:
    """(the .cc, the .h) of a microcontroller build (the module docstring): `constants` from `contract`."""
    name = c_identifier(name)
    guard = c_identifier(header_name).upper() + "_"
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    cc = "\n".join([
        "// Generated by EdgeKit (python -m export --micro): the model file as a C array. Do not edit.",
        f'#include "{header_name}"',
        "",
        f"alignas(16) const unsigned char {name}[] = {{",
        *(f"    {row}," for row in rows),
        "};",
        f"const unsigned int {name}_len = {len(data)};",
        ""])
    registrations = "\n".join(f"  if (resolver.{method(op)}() != kTfLiteOk) return kTfLiteError;" for op in ops)
    h = "\n".join([
        "// Generated by EdgeKit (python -m export --micro). Do not edit.",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        f"extern const unsigned char {name}[];  // 16-byte aligned, in flash",
        f"extern const unsigned int {name}_len;  // {len(data):,} bytes",
        *([f"// The tensor arena TFLM's RecordingMicroAllocator measured for this model: {arena:,} bytes (on a",
           "// 64-bit host; a 32-bit core needs a little less). Add your application's own buffers.",
           f"constexpr unsigned int {name}_arena_bytes = {arena};"] if arena is not None else []),
        "",
        *constants,
        "",
        '#if __has_include("tensorflow/lite/micro/micro_mutable_op_resolver.h")',
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"',
        f"// Exactly the operators the model uses: {', '.join(ops)}.",
        f"using EdgeKitOpResolver = tflite::MicroMutableOpResolver<{len(ops)}>;",
        "inline TfLiteStatus RegisterEdgeKitOps(EdgeKitOpResolver& resolver) {",
        registrations,
        "  return kTfLiteOk;",
        "}",
        "#endif",
        "",
        f"#endif  // {guard}",
        ""])
    return cc, h

