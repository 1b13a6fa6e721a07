"""Making each format's bytes from a source: the table MAKERS says which function makes a format from which kind
of source (a Keras model, a quantization-aware one, an ONNX file, a float .tflite file), by the format's backend;
the formats' own properties (runtime/vocabulary.py: sparse, calibrated, the sources that make it) do the rest.
A Maker holds what one export run shares between its formats: the calibration images, the float ONNX graph
(made once), the files --keep-float already made, a pruned model's fraction of zero weights.
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import numpy as np

from export import onnx_source
from export.settings import Settings
from export.source import Source
from optimize.api import qat_float_twin
from runtime.backends.tflite import tflite_census
from runtime.datasets import SPLIT_SEED, Dataset
from runtime.errors import AccuracyBudgetMissed, ConversionError, EdgeKitError, first_line
from runtime.vocabulary import FileFormat


def calibration_images(dataset: Dataset, samples: int) -> np.ndarray:
    """A fixed, seeded sample of the training split: the representative data for calibration."""
    x, _ = dataset.arrays("train")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))[:samples]
    return x[np.sort(order)]


def metadata(source: Source) -> dict[str, str]:
    return {"edgekit.labels": json.dumps(list(source.dataset.labels)),
            "edgekit.preprocessing": json.dumps(source.dataset.preprocessing.to_dict()),
            "edgekit.source": str(source.path.name)}


def check_file(fmt: FileFormat, data: bytes) -> None:
    """The file opens in the usual tools: onnx.checker for ONNX (LiteRT loads TFLite in verification)."""
    if fmt.backend == "onnx":
        import onnx

        try:
            onnx.checker.check_model(onnx.load_from_string(data))
        except onnx.checker.ValidationError as exc:
            raise EdgeKitError(f"{fmt.key}: onnx.checker rejects the file: {exc}") from None


def sparse_if_smaller(src, fmt, dense: bytes, calibration, quantization_aware, zeros, progress):
    """(the file's bytes, its sidecar record): the sparse encoding when it is 1% smaller than `dense`, else
    `dense`."""
    from export import convert

    try:
        sparse = convert.to_tflite(src.model, fmt.key, calibration, quantization_aware, sparse=True)
    except ConversionError as exc:
        progress(f"{fmt.key}: no sparse encoding ({first_line(exc)}); the file stays dense")
        return dense, None
    if len(sparse) >= 0.99 * len(dense):
        return dense, None
    progress(f"{fmt.key}: sparse encoding, {len(sparse):,} bytes instead of {len(dense):,} "
             f"({len(sparse) / len(dense):.2f}x; {zeros:.0%} of the weights are zero)")
    return sparse, {"sparse_encoding": {"dense_bytes": len(dense), "weights_zero": round(zeros, 4)}}


def onnx_float(src: Source, opset: int | None):
    """The float ModelProto: tf2onnx's of a Keras model, an ONNX source's own graph, or torch.onnx.export's of a
    .pt2 program (src.made records how)."""
    from export import convert

    if src.kind == "onnx":
        proto, src.made = onnx_source.float_model(src.model, metadata(src))
        return proto
    if src.kind == "torch":
        proto, src.made = src.model.onnx(metadata(src), opset)
        return proto
    return convert.to_onnx(src.model, opset or convert.DEFAULT_OPSET, metadata(src))


def unsupported_layers(src) -> str:
    """The kinds of layer a quantization-aware artifact's technique skipped as unsupported, with counts."""

    skipped = ((src.manifest or {}).get("facts") or {}).get("skipped") or {}
    types = {layer.name: type(layer).__name__ for layer in src.model.layers}
    kinds = Counter(types.get(name, name) for name, why in skipped.items() if "not supported" in str(why))
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) or "none listed"


def qat_int8(src, calibration, trust, progress, key: str = "int8") -> tuple[bytes, dict | None]:
    return qat_int8_file(src.model, lambda: qat_float_twin(src.path, src.manifest, src.model, trust), calibration,
                         excludes=bool(((src.manifest or {}).get("recipe") or {}).get("exclude")),
                         unsupported=unsupported_layers(src), progress=progress, key=key)


def qat_int8_file(quantized, twin, calibration: np.ndarray, *, excludes: bool = False, unsupported: str = "",
                  progress=print, key: str = "int8") -> tuple[bytes, dict | None]:
    """The int8 file of a quantization-aware model, and None when it comes from the learned ranges, or the
    sidecar's record of how it was made otherwise. `twin()` gives (the float twin: the base model with the
    weights QAT trained, `optimize.api.qat_float_twin`; the layers the recipe's --exclude names).

    From the learned ranges unless (1) the recipe excludes layers: the converter quantizes a layer whose
    neighbours carry learned ranges, so the file is made from the float twin calibrated, the excluded layers'
    graph nodes denylisted, so those layers and no other are float; or (2) the learned ranges leave float
    operators (layers tfmot's 8-bit scheme does not support, such as TFOpLambda, Multiply, Rescaling:
    MobileNetV3's hard-swish, EfficientNet's swish and squeeze-excite, which the converter leaves float):
    the float twin calibrated makes a fully integer file. `key` "micro": fully connected weights per tensor
    (convert.to_tflite)."""
    from export import convert, selective as sel

    twin = functools.cache(twin)  # built once: an --exclude that names no graph node falls through to below
    if excludes:
        model, names = twin()
        chooser = sel.Selective(model, calibration, dense_per_tensor=key == "micro")
        kept = [name for name in names if name in chooser.layers]
        if kept:
            progress(f"int8: keeping {', '.join(kept)} float (the recipe's --exclude): the trained weights, "
                     f"activation ranges calibrated on {len(calibration)} training images")
            return chooser.quantize(kept), {"kept_float": {
                "layers": kept, "chosen": "by the quantization-aware recipe's --exclude",
                "how": "the weights quantization-aware training gave, activation ranges calibrated, the layers' "
                       "graph nodes denylisted: the converter quantizes a layer whose neighbours carry learned "
                       "ranges, so the learned ranges cannot keep it float"}}
    learned = convert.to_tflite(quantized, key, None, True)
    float_ops = len(tflite_census(learned)["float_ops"])
    if not float_ops:
        return learned, None
    del learned
    progress(f"int8: the learned ranges leave {float_ops} float ops (layers tfmot's 8-bit scheme does not "
             f"support: {unsupported or 'see facts.skipped'}); making the file from the trained weights with "
             f"activation ranges calibrated on {len(calibration)} training images: fully integer")
    chooser = sel.Selective(twin()[0], calibration, dense_per_tensor=key == "micro")
    return chooser.quantize([]), {"activation_ranges": {
        "source": "calibrated",
        "why": f"from the learned ranges the file held {float_ops} float ops: tfmot's 8-bit scheme leaves layers "
               f"it does not support ({unsupported or 'see facts.skipped'}) without ranges, and the converter "
               "leaves them float",
        "how": "the weights quantization-aware training gave (each kernel as its weight quantizer feeds it), "
               "every activation range calibrated"}}


class Maker:
    """The bytes (and the sidecar's record of how they were made, or None) of each format asked for from `src`."""

    def __init__(self, src: Source, settings: Settings, calibration: np.ndarray, progress, zeros: float = 0.0):
        self.src, self.settings, self.calibration, self.progress, self.zeros = src, settings, calibration, progress, zeros
        self.onnx_proto = None  # the float ModelProto, made once for every ONNX format
        self.mixed: dict = {}  # --keep-float's files: format -> (bytes, record), None when none met the budget

    def make(self, fmt: FileFormat) -> tuple[bytes, dict | None]:
        if fmt.key in self.mixed:  # made while choosing what to keep float (export/selective.py)
            if self.mixed[fmt.key] is None:
                raise AccuracyBudgetMissed("even with every layer float, the file misses the accuracy budget on the "
                                           "validation split; nothing was written")
            data, kept = self.mixed[fmt.key]
            return data, {"kept_float": kept, **(self.src.made or {})}
        return MAKERS[(self.src.maker, fmt.backend)](self, fmt)

    def float_onnx(self):
        if self.onnx_proto is None:
            self.onnx_proto = onnx_float(self.src, self.settings.opset)
        return self.onnx_proto


def _tflite_from_keras(maker: Maker, fmt: FileFormat) -> tuple[bytes, dict | None]:
    """The TFLite converter's file; a pruned model's sparse encoding where the format allows it and it is smaller."""
    from export import convert

    data = convert.to_tflite(maker.src.model, fmt.key, maker.calibration, False)
    if fmt.sparse and maker.zeros >= convert.SPARSE_ZEROS:
        return sparse_if_smaller(maker.src, fmt, data, maker.calibration, False, maker.zeros, maker.progress)
    return data, None


def _tflite_from_qat(maker: Maker, fmt: FileFormat) -> tuple[bytes, dict | None]:
    """A quantization-aware model's integer file: from its learned ranges, or its trained weights calibrated."""
    return qat_int8(maker.src, maker.calibration, maker.settings.trust, maker.progress, fmt.key)


def _tflite_from_tflite(maker: Maker, fmt: FileFormat) -> tuple[bytes, dict | None]:
    """A float .tflite source quantized by ai-edge-quantizer (int8 once, also the micro file; dynamic; float16); an
    integer one as it is."""
    return maker.src.model.quantize(fmt.key, maker.calibration)


def _tflite_from_torch(maker: Maker, fmt: FileFormat) -> tuple[bytes, dict | None]:
    """litert-torch's float file of a torch.export program, its PT2E int8 file (also the micro file), or the float
    file's dynamic or float16 file by ai-edge-quantizer."""
    if fmt.kind == "float":
        return maker.src.model.float32()
    if fmt.calibrated:
        return maker.src.model.int8(maker.calibration)
    return maker.src.model.quantize(fmt.key)


def _onnx(maker: Maker, fmt: FileFormat) -> tuple[bytes, dict | None]:
    """tf2onnx's float graph (an ONNX source's own, torch.onnx.export's of a program), and onnxruntime's static int8
    of it."""
    from export import convert

    proto = maker.float_onnx()
    if fmt.kind == "float":
        return proto.SerializeToString(), maker.src.made
    return convert.onnx_int8(proto, maker.src.onnx_input(maker.calibration), maker.settings.method,
                             metadata(maker.src), ticking=maker.settings.ticking), maker.src.made


# (what the source is, the format's backend) -> what makes the file; a pair not here is refused before anything
# is made (export/source.py checks the formats against each format's `sources`)
MAKERS = {
    ("keras", "tflite"): _tflite_from_keras,
    ("keras", "onnx"): _onnx,
    ("qat", "tflite"): _tflite_from_qat,
    ("onnx", "onnx"): _onnx,
    ("tflite", "tflite"): _tflite_from_tflite,
    ("torch", "tflite"): _tflite_from_torch,
    ("torch", "onnx"): _onnx,
}
