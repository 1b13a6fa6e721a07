"""Converters: a tf_keras model in, the bytes of a .tflite or .onnx file out."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import tempfile
import warnings
from collections import OrderedDict

import numpy as np

from runtime.errors import ConversionError, first_line
from runtime.fsutil import held_output
from runtime.progress import Ticking
from train.backend import tf

DEFAULT_OPSET = 17  # a current opset onnxruntime 1.31 runs fully
LARGE_MODEL_PARAMS = 5_000_000  # above this, tf2onnx's graph copies are collected between passes


def _representative(calibration: np.ndarray):
    def generator():
        for i in range(len(calibration)):
            yield [calibration[i:i + 1]]
    return generator


SPARSE_ZEROS = 0.3  # the fraction of zero weights from which a sparse encoding is tried


def zero_fraction(model) -> float:
    """The fraction of zeros among the model's kernels (Dense and Conv weights of 1,024 values or more)."""
    zeros = total = 0
    for weight in model.weights:
        if "kernel" in weight.name and int(np.prod(weight.shape)) >= 1024:
            value = weight.numpy()
            zeros, total = zeros + int(np.count_nonzero(value == 0)), total + value.size
    return zeros / total if total else 0.0


def to_tflite(model, key: str, calibration: np.ndarray | None, quantization_aware: bool,
              sparse: bool = False) -> bytes:
    """`sparse`: the converter's sparse encoding (Optimize.EXPERIMENTAL_SPARSITY), for pruned weights; the runtime
    densifies such a file when it loads it (runtime/backends/sparse.py). `micro` is `int8` with fully connected weights
    quantized per tensor: TFLM refused per-channel FULLY_CONNECTED until September 2024 (tflite-micro #2602,
    #2673), and one multiplier is less arena than one per unit."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if key == "micro":
        key = "int8"
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    if key != "float32" or quantization_aware:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if sparse:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if key == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif key == "int8":
        if not quantization_aware:  # QAT models carry their ranges; others are calibrated
            converter.representative_dataset = _representative(calibration)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif key == "int16x8":
        converter.representative_dataset = _representative(calibration)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    try:
        with warnings.catch_warnings(), held_output():  # QAT models carry their ranges; the converter asks anyway
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            return converter.convert()
    except Exception as exc:  # the converter raises ConverterError and assorted others
        raise ConversionError(f"the TFLite converter rejected the model for {key}: {_reason(exc)}") from exc


def _collecting(factory):
    """A tf2onnx optimizer factory that first collects garbage. tf2onnx deep-copies the whole graph (weights
    included) before every optimizer pass, and the copies sit in reference cycles that Python frees only
    when its collector runs: ResNet50 at 64x64 peaked at 6.9 GB converting, 2.6 GB with this."""
    def make():
        gc.collect()
        return factory()
    return make


def to_onnx(model, opset: int, metadata: dict[str, str]):
    """A float ONNX ModelProto with a dynamic batch dimension and EdgeKit metadata_props."""

    import tf2onnx
    import tf2onnx.convert
    import tf2onnx.optimizer

    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input")]
    large = model.count_params() > LARGE_MODEL_PARAMS  # a collection per pass costs seconds on small models
    optimizers = OrderedDict((name, _collecting(factory) if large else factory)
                             for name, factory in tf2onnx.optimizer._get_optimizers().items())
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset,
                                              output_path=None, optimizers=optimizers)
    except Exception as exc:
        raise ConversionError(f"tf2onnx could not convert the model (opset {opset}): {_reason(exc)}") from exc
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def onnx_int8(model, calibration: np.ndarray, method: str, metadata: dict[str, str], exclude=(),
              cache: str | None = None, ticking: bool = False, scheme: dict | None = None) -> bytes:
    """Static QDQ quantization with onnxruntime: per-channel int8 weights, int8 activations (export's scheme;
    `scheme` overrides quantize_static's quant_format, per_channel, activation_type, weight_type or reduce_range:
    scripts/onnx_int8_settings.py measures others).

    `model`: a float ModelProto, or the path of one already through `quant_pre_process`. `exclude`: graph nodes
    left float (`nodes_to_exclude`). `cache`: a file for onnxruntime's calibration cache, so that quantizing the
    same model again (other nodes excluded) does not calibrate again. `ticking`: show the step alive on stderr
    when it runs past 5 s (runtime.progress.Ticking).
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    class Reader(CalibrationDataReader):
        """One image at a time, in strides (CalibStridedMinMax sets each stride's range: its ranges are merged)."""

        def __init__(self, input_name, tick):
            self._name, self._tick, self._read = input_name, tick, 0
            self.set_range(0, len(calibration))

        def __len__(self):
            return len(calibration)

        def set_range(self, start_index: int, end_index: int):
            self._items = iter(range(start_index, min(end_index, len(calibration))))

        def get_next(self):
            i = next(self._items, None)
            if i is None:
                return None
            self._read += 1
            self._tick.note(f"calibrated on {self._read}/{len(calibration)} images")
            return {self._name: calibration[i:i + 1]}

    nodes = len((onnx.load(model, load_external_data=False) if isinstance(model, str) else model).graph.node)
    # onnxruntime's quantizer takes time that grows with the square of the node count (its calibrator and QDQ pass
    # search the whole graph for each tensor): seconds for a CNN, minutes for thousands of nodes (README, Trust)
    with tempfile.TemporaryDirectory() as tmp, \
            Ticking(f"onnx-int8: onnxruntime quantizing {nodes:,} nodes", enabled=ticking) as tick:
        target = os.path.join(tmp, "int8.onnx")
        try:
            if isinstance(model, str):
                prepared = model
            else:
                source, prepared = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "prep.onnx")
                onnx.save(model, source)
                quant_pre_process(source, prepared)
            input_name = onnx.load(prepared, load_external_data=False).graph.input[0].name
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(prepared, target, Reader(input_name, tick), **{
                                    "quant_format": QuantFormat.QDQ, "per_channel": True,
                                    "activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, **(scheme or {})},
                                calibrate_method=methods[method], nodes_to_exclude=list(exclude) or None,
                                calibration_cache_path=cache,
                                # ranges computed every stride of images and merged, instead of every
                                # intermediate output of every image held at once (ResNet50 at 64x64: 9.9 GB)
                                extra_options={"CalibStridedMinMax": calibration_stride(len(calibration))})
            quantized = onnx.load(target)
        except OSError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises assorted types
            raise ConversionError(f"onnxruntime could not quantize the model to int8: {_reason(exc)}") from exc
    del quantized.metadata_props[:]
    for key, value in metadata.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    return quantized.SerializeToString()


def calibration_stride(samples: int, most: int = 16) -> int:
    """The images onnxruntime's calibrator holds at once: the largest divisor of `samples` up to `most`
    (CalibStridedMinMax takes strides that divide the count). Not CalibMaxIntermediateOutputs: onnxruntime 1.31
    clears what it has collected when it reaches that count without computing its ranges, so a calibration kept the
    last `samples % 16` images (12 of 300), and none at all for a multiple of 16 ("No data is collected")."""
    return max(d for d in range(1, min(most, samples) + 1) if samples % d == 0) if samples else 1


def _reason(exc: BaseException) -> str:
    """The converter's own words, in one line: the first line that says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and len(line) > 20:
            return line[:400]
    return first_line(exc)[:400]


def keras_logits(model, x: np.ndarray) -> np.ndarray:
    return model.predict(x, batch_size=32, verbose=0)

