"""A float .tflite file quantized by Google's ai-edge-quantizer (TensorFlow-free, on LiteRT's own model utilities):
what makes `int8`, `dynamic` and `float16` from a float file EdgeKit did not convert with the TFLite converter
(a .tflite source, litert-torch's file of a .pt2 program).

    format   recipe                                 what the file holds
    int8     static_wi8_ai8                         int8 weights and activations, int8 input and output
    dynamic  dynamic_wi8_afp32                      per-channel int8 weights; activations float, quantized on the
                                                    fly by LiteRT's hybrid kernels (the converter's dynamic range)
    float16  weight-only FLOAT_CASTING, 16 bits     float16 weights, DEQUANTIZE to float32 at load (the
                                                    converter's float16)

int8 is calibrated on preprocessed images, one per run through the file's signature (the files EdgeKit quantizes
this way take batch 1); dynamic and float16 need no images.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from runtime.errors import ConversionError
from runtime.text import terminal

RECIPES = {"int8": "static_wi8_ai8", "dynamic": "dynamic_wi8_afp32",
           "float16": "weight-only FLOAT_CASTING to 16 bits"}  # float16: no named recipe; add_weight_only_config


def _recipe(key: str):
    from ai_edge_quantizer import qtyping, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if key != "float16":
        return getattr(recipe, RECIPES[key])()
    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                   algorithm_key=AlgorithmName.FLOAT_CASTING)
    return manager.get_quantization_recipe()


def record(key: str) -> dict:
    """The sidecar's record of how the file was quantized."""
    return {"quantized_by": {"tool": "ai-edge-quantizer", "version": importlib.metadata.version("ai-edge-quantizer"),
                             "recipe": RECIPES[key]}}


def quantize(data: bytes, key: str, calibration: np.ndarray | None = None) -> bytes:
    """`key`'s file (RECIPES) of the float file `data`; int8 calibrated on `calibration`, one image at a time."""
    from ai_edge_quantizer import quantizer

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its size summary: kept off export's output
            tool = quantizer.Quantizer(bytes(data))
            tool.load_quantization_recipe(_recipe(key))
            if key == "int8":
                signatures = Interpreter(model_content=data).get_signature_list()
                name = next(iter(signatures))
                (tensor,) = signatures[name]["inputs"]
                ranges = tool.calibrate({name: [{tensor: calibration[i:i + 1]} for i in range(len(calibration))]})
                quantized = tool.quantize(ranges).quantized_model
            else:
                quantized = tool.quantize().quantized_model
    except (StopIteration, ValueError, RuntimeError, KeyError) as exc:
        raise ConversionError(f"ai-edge-quantizer could not quantize the file to {key}: "
                              f"{terminal(str(exc)[:300])}") from None
    # Its files past 256 KiB of weights keep them after the flatbuffer, by offset: TFLM (and C arrays, and older
    # runtimes) read only weights inside it. LiteRT's own flatbuffer tools move them in.
    from ai_edge_litert.tools import flatbuffer_utils

    try:
        return bytes(flatbuffer_utils.convert_object_to_bytearray(flatbuffer_utils.read_model_from_bytearray(
            bytearray(quantized))))
    except (ValueError, RuntimeError, IndexError) as exc:
        raise ConversionError(f"the quantized file's weights could not be moved into it: {str(exc)[:300]}") from None
