"""Selective int8 for TFLite: which Keras layers int8 hurts, and a file that keeps exactly those float.

The model is calibrated once (the TFLite converter's calibrate-only mode); every variant after that
is one `mlir_quantize` call on the calibrated model with some graph nodes denylisted, which takes
milliseconds, so trying each layer is cheap. Graph nodes are mapped back to Keras layers by the
layer names in their (fused) names; the node that makes the model's output is the output layer's.

What "keeping a layer float" must include: a tensor is quantized at both ends. A layer whose output
range is hostile to per-tensor int8 (one channel a thousand times the others) damages its output
tensor whether or not the layer itself runs float, for its consumer quantizes that tensor again. So a
layer is always kept float together with the layers that consume its output (through reshapes and
other layers that pass int8 through unchanged): its *keep set*.

Sensitivity of a layer = validation accuracy with its keep set float, minus full int8's; layers are
ranked by it (the measured effect, which a per-tensor error ratio such as TFLite's QuantizationDebugger
`rmse/scale` misses: the hostile layer's error is small against its own huge range). Each layer's
output error in full int8 is shown too: the median over channels of the per-channel SQNR (dB)
against the float values of the calibrated model, which sees the channels a large one drowns.
`auto` then keeps the most sensitive keep sets float, one at a time, until the validation accuracy
is within the budget; the export's verification then judges the file on the test split as usual.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from export.convert import onnx_int8
from runtime.charts import pyplot, save_png
from runtime.errors import ConversionError, EdgeKitError, suggest
from runtime.fsutil import held_output
from runtime.load import load
from runtime.text import terminal  # layer names: an ONNX source's node names are the file's text
from train.backend import keras, tf

# Layers that pass an int8 tensor through with its quantization unchanged: the tensor's damage is done
# where it was made, so a keep set reaches through them to the next layer that computes.
PASS_THROUGH = ("Flatten", "Reshape", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise",
                "GaussianDropout", "ActivityRegularization", "Permute", "ZeroPadding2D", "Cropping2D")
TOP_FOR_TEST = 5  # --explain measures the test accuracy of this many of the most sensitive keep sets


@dataclasses.dataclass
class Layer:
    name: str
    kind: str  # the Keras class
    nodes: list[str]  # the TFLite graph nodes made from it
    keep: list[str]  # its keep set: itself and the layers that consume its output
    sqnr_db: float | None = None  # median per-channel SQNR of its output in full int8
    worst_channel_db: float | None = None
    val_accuracy: float | None = None  # with its keep set float
    gain_points: float | None = None  # over full int8, on the validation split
    test_accuracy: float | None = None  # with its keep set float (the most sensitive only)


def all_layers(model) -> list:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(all_layers(layer))
    return out


def _consumers(layer) -> list:
    return [node.outbound_layer for node in getattr(layer, "_outbound_nodes", [])]


def keep_set(layer, has_nodes=lambda name: True) -> list[str]:
    """The layer and the layers that quantize its output again: its consumers, reached through pass-through
    layers and through layers with no graph node of their own (a BatchNormalization or activation the
    converter fused into the layer before it)."""
    keep, todo = [layer.name], list(_consumers(layer))
    seen = set()
    while todo:
        nxt = todo.pop(0)
        if nxt.name in seen or isinstance(nxt, keras.Model):
            continue
        seen.add(nxt.name)
        if has_nodes(nxt.name):
            keep.append(nxt.name)
        if type(nxt).__name__ in PASS_THROUGH or not has_nodes(nxt.name):
            todo.extend(_consumers(nxt))
    return keep


class _Selective:
    """What both backends share: the layers that can be kept float, their graph nodes and keep sets."""

    suffix = ""
    format = ""

    def _assign(self, nodes: list[tuple[str, bool]]) -> None:
        """Map graph nodes to Keras layers by the layer names in their (fused, '/'-separated) names; a node
        with no layer name that makes the model's output (True) is the output layer's."""
        keras_layers = {layer.name: layer for layer in all_layers(self.model)}
        output_layer = (getattr(self.model, "output_names", None) or [self.model.layers[-1].name])[0]
        self.nodes_of: dict[str, list[str]] = {}
        for node, makes_output in nodes:
            owners = [part for name in node.split(";") for part in name.split("/") if part in keras_layers]
            owner = owners[-1] if owners else (output_layer if makes_output else None)
            if owner is not None:
                self.nodes_of.setdefault(owner, []).append(node)
        self.layers: dict[str, Layer] = {}
        for name, nodes_ in self.nodes_of.items():
            kind = type(keras_layers[name]).__name__
            if kind not in PASS_THROUGH and not isinstance(keras_layers[name], keras.Model):
                keep = keep_set(keras_layers[name], lambda n: n in self.nodes_of)
                self.layers[name] = Layer(name, kind, nodes_, keep)

    def excluded(self, keep_float) -> list[str]:
        return [node for name in keep_float for node in self.nodes_of.get(name, [])]

    def check_names(self, names: list[str]) -> list[str]:
        """The names, or a clear error for one that is not a quantized layer of this model."""
        for name in names:
            if name not in self.layers:
                raise EdgeKitError(terminal(f"--keep-float: the model has no quantized layer '{name}'; its layers "
                                            f"are {', '.join(self.layers)}.{suggest(name, self.layers)}"))
        return names

    def quantize(self, keep_float=()) -> bytes:
        raise NotImplementedError

    def output_errors(self, calibration: np.ndarray, samples: int = 32) -> None:
        """Per-layer output SQNR in full int8 (TFLite only; ONNX leaves it unmeasured)."""


class Selective(_Selective):
    """A Keras model calibrated once for TFLite int8, quantized again with any set of layers kept float."""

    suffix, format = ".tflite", "int8"

    def __init__(self, model, calibration: np.ndarray, dense_per_tensor: bool = False):
        self.model, self.dense_per_tensor = model, dense_per_tensor  # the micro format's fully connected weights
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        converter.experimental_mlir_quantizer = True
        converter._experimental_calibrate_only = True  # noqa: SLF001 (what QuantizationDebugger does)
        try:
            with warnings.catch_warnings(), held_output():
                warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
                self.calibrated = converter.convert()
        except Exception as exc:  # the converter raises assorted types
            raise ConversionError(f"the TFLite converter could not calibrate the model: {exc}") from exc

        interpreter = Interpreter(model_content=self.calibrated)
        tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
        graph_outputs = {d["index"] for d in interpreter.get_output_details()}
        self._assign([(tensors[op["outputs"][0]], bool(graph_outputs & set(op["outputs"])))
                      for op in interpreter._get_ops_details()  # noqa: SLF001 (LiteRT lists ops no other way)
                      if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE") and len(op["outputs"])])

    def quantize(self, keep_float=()) -> bytes:
        """The int8 file (int8 input and output, as the int8 format) with the named layers float."""
        from tensorflow.lite.python import convert as lite_convert

        nodes = self.excluded(keep_float)
        try:
            with held_output():
                return lite_convert.mlir_quantize(self.calibrated, fully_quantize=True, input_data_type=tf.int8,
                                                  output_data_type=tf.int8, denylisted_nodes=nodes,
                                                  disable_per_channel_for_dense_layers=self.dense_per_tensor)
        except Exception as exc:
            raise ConversionError(f"the TFLite quantizer could not keep {', '.join(keep_float)} float: "
                                  f"{exc}") from exc

    def output_errors(self, calibration: np.ndarray, samples: int = 32) -> None:
        """Each layer's output error in full int8: median and worst per-channel SQNR against the calibrated
        (float) model, on the first `samples` calibration images."""

        def run(content):
            with warnings.catch_warnings():  # "intended for debugging purposes only": that is the purpose here
                warnings.simplefilter("ignore")
                interpreter = Interpreter(model_content=content, experimental_preserve_all_tensors=True)
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]
            scale, zero = detail["quantization"]
            names = {t["name"]: t for t in interpreter.get_tensor_details()}
            values = {}
            for x in calibration[:samples]:
                x = x[None]
                if detail["dtype"] != np.float32:
                    x = np.clip(np.rint(x / scale) + zero, -128, 127).astype(detail["dtype"])
                interpreter.set_tensor(detail["index"], x)
                interpreter.invoke()
                for layer in self.layers.values():
                    for node in layer.nodes:
                        t = names.get(node)
                        if t is None:
                            continue
                        v = interpreter.get_tensor(t["index"]).astype(np.float32)
                        s, z = t["quantization"]
                        if s:
                            v = (v - z) * s
                        values.setdefault(node, []).append(v)
            return values

        floats, quantized = run(self.calibrated), run(self.quantize())
        for layer in self.layers.values():
            node = layer.nodes[-1]
            if node not in floats or node not in quantized:
                continue
            f = np.concatenate(floats[node]).reshape(-1, floats[node][0].shape[-1])
            q = np.concatenate(quantized[node]).reshape(f.shape)
            signal, noise = np.sum(f ** 2, axis=0), np.sum((f - q) ** 2, axis=0)
            live = signal > 0
            if not live.any():
                continue
            db = 10 * np.log10(signal[live] / np.maximum(noise[live], 1e-30))
            layer.sqnr_db, layer.worst_channel_db = float(np.median(db)), float(db.min())


class ONNXSelective(_Selective):
    """The float ONNX model calibrated once (onnxruntime's calibration cache), quantized again to QDQ int8 as
    the onnx-int8 format is, with the nodes of the named layers in `nodes_to_exclude`."""

    suffix, format = ".onnx", "onnx-int8"

    def __init__(self, model, float_proto, calibration: np.ndarray, method: str, metadata: dict):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.model, self._calibration, self._method, self._metadata = model, calibration, method, metadata
        self._tmp = tempfile.TemporaryDirectory()
        source, self._prepared = (os.path.join(self._tmp.name, n) for n in ("float.onnx", "prepared.onnx"))
        self._cache = os.path.join(self._tmp.name, "ranges.json")
        onnx.save(float_proto, source)
        try:
            quant_pre_process(source, self._prepared)
        except Exception as exc:  # onnxruntime.quantization raises assorted types
            raise ConversionError(f"onnxruntime could not prepare the model for int8: {exc}") from exc
        graph = onnx.load(self._prepared).graph
        outputs = {o.name for o in graph.output}
        self._assign([(node.name, bool(outputs & set(node.output))) for node in graph.node if node.name])

    def quantize(self, keep_float=()) -> bytes:
        return onnx_int8(self._prepared, self._calibration, self._method, self._metadata,
                         exclude=self.excluded(keep_float), cache=self._cache)


def accuracy_of(content: bytes, x: np.ndarray, y: np.ndarray, suffix: str = ".tflite") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "candidate" + suffix)
        with open(path, "wb") as fh:
            fh.write(content)
        return float(np.mean(load(path).logits(x).argmax(axis=1) == y))


def plain_int8(selective: Selective, x_val, y_val) -> tuple[float, float, bytes]:
    """(float, full int8) accuracy on the validation split, and the full int8 file: what `--keep-float auto`
    checks before any sweep, and where `explain` starts."""
    float_val = float(np.mean(selective.model.predict(x_val, batch_size=64, verbose=0).argmax(1) == y_val))
    full = selective.quantize()
    return float_val, accuracy_of(full, x_val, y_val, selective.suffix), full


def explain(selective: Selective, x_val, y_val, x_test, y_test, calibration, progress=None) -> dict:
    """The sensitivity table: every quantized layer, most sensitive first (see the module docstring)."""
    float_val, full_val, full = plain_int8(selective, x_val, y_val)
    suffix = selective.suffix
    full_test = accuracy_of(full, x_test, y_test, suffix)
    selective.output_errors(calibration)
    for i, layer in enumerate(selective.layers.values()):
        if progress:
            progress(terminal(f"  [{i + 1}/{len(selective.layers)}] {layer.name}: keep {', '.join(layer.keep)} float"))
        layer.val_accuracy = accuracy_of(selective.quantize(layer.keep), x_val, y_val, suffix)
        layer.gain_points = (layer.val_accuracy - full_val) * 100
    ranked = sorted(selective.layers.values(),
                    key=lambda entry: (-entry.gain_points, entry.sqnr_db if entry.sqnr_db is not None else math.inf))
    for layer in ranked[:TOP_FOR_TEST]:
        layer.test_accuracy = accuracy_of(selective.quantize(layer.keep), x_test, y_test, suffix)
    return {"format": selective.format, "float_val_accuracy": float_val, "int8_val_accuracy": full_val, "int8_test_accuracy": full_test,
            "validation_images": int(len(y_val)), "test_images": int(len(y_test)),
            "layers": [dataclasses.asdict(layer) for layer in ranked], "ranked": [layer.name for layer in ranked]}


def choose(selective: Selective, table: dict, x_val, y_val, budget_points: float) -> list[str] | None:
    """`--keep-float auto`: the fewest most sensitive keep sets whose union keeps the validation accuracy within
    the budget of the float model's (greedy, in the table's order); [] when full int8 already is; None when
    even every layer float is not."""
    target = table["float_val_accuracy"] - budget_points / 100
    if table["int8_val_accuracy"] >= target:
        return []
    kept: list[str] = []
    for name in table["ranked"]:
        kept = list(dict.fromkeys([*kept, *selective.layers[name].keep]))
        if accuracy_of(selective.quantize(kept), x_val, y_val, selective.suffix) >= target:
            return kept
    return None


def timed_ratio(candidate: bytes, reference: bytes, x: np.ndarray, suffix: str = ".tflite", rounds: int = 7,
                calls: int = 30) -> float:
    """Median latency of `predict` on `x` (batch 1, 1 thread) of one file over another's, measured in
    alternating rounds in this process: what keeping layers float costs in speed."""

    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for name, content in (("candidate", candidate), ("reference", reference)):
            path = os.path.join(tmp, f"{name}{suffix}")
            with open(path, "wb") as fh:
                fh.write(content)
            models.append(load(path, threads=1))
        medians = [[], []]
        for _ in range(rounds):
            for i, model in enumerate(models):
                model.predict(x)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    model.predict(x)
                    times.append(time.perf_counter() - t0)
                medians[i].append(float(np.median(times)))
    return float(np.median(medians[0]) / np.median(medians[1]))


def plot_sensitivity(table: dict, path) -> bool:
    """A bar per layer (most sensitive on top): validation accuracy gained over full int8 when its keep set
    stays float; the label gives the output's median per-channel SQNR in full int8. No layer gaining anything
    makes no plot (an empty chart says less than "int8 loses nothing here"): returns whether it was drawn."""

    if not any(r["gain_points"] > 0 for r in table["layers"]):
        Path(path).unlink(missing_ok=True)  # a plot from an earlier run would contradict the table
        return False

    plt = pyplot()
    rows = table["layers"][:25]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.8))
    names = [f"{r['name']} ({r['kind']})" for r in rows][::-1]
    gains = [r["gain_points"] for r in rows][::-1]
    ax.barh(names, gains, color=["#d62728" if g > 0 else "#9e9e9e" for g in gains])
    for i, r in enumerate(rows[::-1]):
        sqnr = "" if r["sqnr_db"] is None else f"  SQNR {r['sqnr_db']:.1f} dB"
        ax.text(max(r["gain_points"], 0), i, sqnr, va="center", fontsize=7)
    ax.set_xlabel(f"validation accuracy gained over full int8 (points) when the layer and its consumers stay float; "
                  f"{table['validation_images']} images")
    ax.set_title(f"{table['format']} sensitivity: float {table['float_val_accuracy']:.1%}, full int8 "
                 f"{table['int8_val_accuracy']:.1%}", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


