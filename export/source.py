"""What export makes files from: an EdgeKit artifact, a Keras model file, an .onnx or a .tflite file, loaded with
its dataset, and what is known of it (its kind, the reference every file is verified against, its output kind).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from export import onnx_source, tflite_source, torch_source
from export.onnx_source import TFLITE_REFUSAL, is_onnx
from export.tflite_source import check_formats, is_tflite
from optimize import load_model  # optimize's public loader rebuilds quantization-aware models
from runtime.artifacts.manifest import MANIFEST, model_file, read_manifest
from runtime.backends.model import Options
from runtime.datasets import Dataset, load_for_manifest
from runtime.errors import EdgeKitError
from runtime.metrics import check_above_chance
from runtime.vocabulary import QUANTIZATION_AWARE, formats_from
from train.foreign import load_classifier
from train.graph import ends_in_softmax
from train.safe_load import KERAS_SUFFIXES, is_saved_model


@dataclasses.dataclass
class Source:
    path: Path  # the artifact directory or the bare model file
    model: object  # keras.Model
    dataset: Dataset
    manifest: dict | None  # None for a bare model file
    model_file: Path
    kind: str
    model_sha256: str | None = None  # of model_file: the source every sidecar names (set once per export)
    output_kind: str = "logits"  # or "probabilities" for a model ending in softmax (set once per export)
    made: dict | None = None  # an ONNX source: how the float file was made from it (export/onnx_source.py)

    @property
    def layout(self) -> str | None:
        """The model input's layout when it is not NHWC's default (an ONNX source's NCHW)."""
        return getattr(self.model, "layout", None)

    @property
    def maker(self) -> str:
        """What its files are made from (runtime.vocabulary's FileFormat.sources): keras, qat (a quantization-aware
        model), onnx, tflite or torch (a torch.export program)."""
        if self.kind in ("onnx", "tflite", "torch"):
            return self.kind
        return "qat" if self.kind in QUANTIZATION_AWARE else "keras"

    @property
    def reference(self) -> str:
        """What every file is verified against."""
        return {"onnx": "the source ONNX file", "tflite": "the source TFLite file",
                "torch": "the source PyTorch program"}.get(self.kind, "Keras")

    def onnx_input(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed NHWC images as the ONNX graph's input: tf2onnx's graphs take NHWC, an ONNX source's and a
        .pt2 program's their own."""
        return self.model.feed(x) if self.kind in ("onnx", "torch") else x


def load_source(source: str | Path, dataset_name: str | None, data_dir, trust: bool, options=None) -> Source:

    path = Path(source)
    if onnx_source.is_onnx(path) and not path.is_dir():
        model, dataset = onnx_source.load_source(path, dataset_name, data_dir, options)
        return Source(path, model, dataset, None, path, "onnx")
    if tflite_source.is_tflite(path):
        model, dataset = tflite_source.load_source(path, dataset_name, data_dir, options)
        return Source(path, model, dataset, None, path, "tflite")
    if torch_source.is_pt2(path):
        model, dataset = torch_source.load_source(path, dataset_name, data_dir, options, trust)
        return Source(path, model, dataset, None, path, "torch")
    if (path / MANIFEST).is_file() or (path.is_dir() and (path / MANIFEST).is_symlink()):
        manifest = read_manifest(path)  # load_model checks its files (not the exports, which may be redone)
        return Source(path, load_model(path, trust, manifest), load_for_manifest(manifest, data_dir), manifest,
                      model_file(path, manifest), manifest["kind"])
    if not (is_saved_model(path) or path.suffix in KERAS_SUFFIXES):
        if not path.exists():
            raise EdgeKitError(f"{path} does not exist; expected an EdgeKit artifact directory, a .keras or .h5 "
                               "file, a SavedModel directory, an .onnx, a .tflite or a .pt2 file.")
        raise EdgeKitError(
            f"{path} is neither an EdgeKit artifact directory nor a model file; expected an artifact, "
            "a .keras or .h5 file, a SavedModel directory, an .onnx, a .tflite or a .pt2 file (torch.export.save)."
        )
    if dataset_name is None:
        raise EdgeKitError(
            f"{path} is a bare model file, so its preprocessing, labels and calibration data are unknown; "
            "pass --dataset NAME (e.g. --dataset digits) to take them from that dataset."
        )

    model, dataset = load_classifier(path, dataset_name, data_dir, options and options.mean, options and options.std,
                                     trust)
    return Source(path, model, dataset, None, path, "bare")


def file_kind(path: Path) -> str | None:
    """The kind of source a model file from elsewhere is (FileFormat.sources: onnx, tflite, torch); None for an
    artifact or a Keras model."""
    if path.is_dir():
        return None
    return "onnx" if is_onnx(path) else "tflite" if is_tflite(path) else "torch" if torch_source.is_pt2(path) else None


def source_options(path: Path, fmts, opset, mean, std, layout):
    """runtime.load's Options for a model file from elsewhere (checked before anything loads): --mean and --std for
    an .onnx, .tflite, .pt2 or Keras file (how pixels become its input), --layout for an .onnx file (its input's)
    and a .pt2 program (its files'); an artifact's preprocessing is its manifest's, so they are refused there."""

    if torch_source.is_pt2(path):
        other = [f.key for f in fmts if "torch" not in f.sources]
        if other:
            raise EdgeKitError(f"{', '.join(other)}: a .pt2 source is exported to "
                               f"{', '.join(formats_from('torch'))} (litert-torch and ai-edge-quantizer for TFLite, "
                               "torch.onnx.export and onnxruntime for ONNX).")
        return Options(mean, std, None, None, layout) if {mean, std, layout} != {None} else None
    if is_tflite(path):
        check_formats(path, [f.key for f in fmts])
        if layout is not None:
            raise EdgeKitError("--layout is for an .onnx source or a .pt2 program; a .tflite file's layout is read from "
                               "its shape.")
        return Options(mean, std, None, None, None) if mean is not None or std is not None else None
    if not (is_onnx(path) and not path.is_dir()):
        if (path / MANIFEST).is_file() and (mean is not None or std is not None or layout is not None):
            raise EdgeKitError(f"{path} is an EdgeKit artifact: its preprocessing is the one its manifest records; "
                               "--mean, --std and --layout are for a model file from elsewhere.")
        if layout is not None:
            raise EdgeKitError("--layout is for an .onnx source or a .pt2 program; a Keras model takes channels-last "
                               "(NHWC) input.")
        return Options(mean, std, None, None, None) if mean is not None or std is not None else None
    other = [f.key for f in fmts if "onnx" not in f.sources]
    if other:
        raise EdgeKitError(f"{', '.join(other)}: {TFLITE_REFUSAL}.")
    if opset is not None:
        raise EdgeKitError("--opset does not apply to an .onnx source: its graph keeps its own opset (upgraded to "
                           "13 when older, for int8).")
    return Options(mean, std, None, None, layout)


def output_kind(model, reference: np.ndarray) -> str:
    """'probabilities' when the Keras model ends in softmax (the layer that makes its output, followed into nested
    models: a Softmax layer, an Activation('softmax'), or a layer with activation='softmax') and its outputs on the
    test split are probabilities (non-negative, rows summing to 1); else 'logits'. An ONNX source: what the
    runtime reads from its graph."""
    if hasattr(model, "output_kind"):
        return model.output_kind

    declared = ends_in_softmax(model)
    confirmed = bool(len(reference)) and bool((reference >= 0).all()) and \
        bool(np.allclose(reference.sum(axis=1), 1.0, atol=1e-3))
    return "probabilities" if declared and confirmed else "logits"


def check_reference(src: Source, reference: np.ndarray, y_test: np.ndarray) -> None:
    """A model from elsewhere must score above chance (runtime.metrics.check_above_chance); an EdgeKit artifact's
    preprocessing is the one it was trained with, so it is not judged here."""
    if src.manifest is None:
        check_above_chance(src.path.name, float(np.mean(reference.argmax(axis=1) == y_test)), len(y_test),
                           reference.shape[1], src.dataset.name, src.dataset.preprocessing)
