"""Exporting a model to every deployable format, each file verified before it counts.

    from export import export
    results = export("artifacts/cnn", ["float32", "int8", "onnx"])

Each file is written under a temporary name, loaded with EdgeKit's own TensorFlow-free
runtime, compared with the Keras model on the fixed test split, and only then renamed
to its final name next to its sidecar `model.<variant>.json`. A file that fails its
check is deleted; every failure is reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from export.formats import (FORMATS, MAX_ABS_DIFF, MAX_ACCURACY_DROP, MIN_AGREEMENT, QAT_FORMATS, Format,
                            check_options, get_format)
from runtime.datasets import SPLIT_SEED, Dataset, load_dataset, load_for_manifest
from runtime.errors import EdgeKitError
from runtime.fsutil import atomic_write_json, sha256_file
from runtime.manifest import MANIFEST, library_versions, read_manifest, utc_now, write_manifest

DEFAULT_CALIBRATION_SAMPLES = 300
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZATION_AWARE = ("qat", "pqat", "cqat")


@dataclasses.dataclass
class Source:
    path: Path  # the artifact directory or the bare model file
    model: object  # keras.Model
    dataset: Dataset
    manifest: dict | None  # None for a bare model file
    model_file: Path
    kind: str


@dataclasses.dataclass
class Result:
    format: str
    file: Path | None  # None when the export failed
    passed: bool
    figures: dict  # size, gzip size, max diff, agreement, accuracy
    message: str = ""


def _load_source(source: str | Path, dataset_name: str | None, data_dir) -> Source:
    from train.backend import keras

    path = Path(source)
    if (path / MANIFEST).is_file():
        from optimize import load_model  # optimize's public loader rebuilds quantization-aware models
        from optimize.api import model_path

        manifest = read_manifest(path)
        return Source(path, load_model(path), load_for_manifest(manifest, data_dir), manifest,
                      model_path(path, manifest), manifest["kind"])
    is_saved_model = path.is_dir() and (path / "saved_model.pb").is_file()
    if not (is_saved_model or (path.is_file() and path.suffix in (".keras", ".h5"))):
        raise EdgeKitError(
            f"{path} is neither an EdgeKit artifact directory nor a Keras model; expected an artifact, "
            "a .keras or .h5 file, or a SavedModel directory."
        )
    if dataset_name is None:
        raise EdgeKitError(
            f"{path} is a bare model file, so its preprocessing, labels and calibration data are unknown; "
            "pass --dataset NAME (e.g. --dataset digits) to take them from that dataset."
        )
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for unreadable files
        raise EdgeKitError(f"cannot load {path} as a tf_keras model: {str(exc)[:300]}") from None
    height, width, channels = model.input_shape[1:]
    dataset = load_dataset(dataset_name, data_dir, image_size=(height, width), channels=channels)
    if model.output_shape[-1] != dataset.num_classes:
        raise EdgeKitError(f"{path} outputs {model.output_shape[-1]} classes, but {dataset_name} has "
                           f"{dataset.num_classes}; pass the dataset the model was trained on.")
    return Source(path, model, dataset, None, path, "bare")


def _calibration(dataset: Dataset, samples: int) -> np.ndarray:
    """A fixed, seeded sample of the training split: the representative data for calibration."""
    x, _ = dataset.arrays("train")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))[:samples]
    return x[np.sort(order)]


def _metadata(source: Source) -> dict[str, str]:
    return {"edgekit.labels": json.dumps(list(source.dataset.labels)),
            "edgekit.preprocessing": json.dumps(source.dataset.preprocessing.to_dict()),
            "edgekit.source": str(source.path.name)}


def _figures(fmt: Format, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> tuple[dict, str]:
    """Compare with Keras on the test split; return the figures and '' or why the check failed."""
    keras_accuracy = float(np.mean(reference.argmax(1) == labels))
    accuracy = float(np.mean(logits.argmax(1) == labels))
    figures = {
        "max_abs_diff": float(np.max(np.abs(logits - reference))),
        "agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
        "accuracy": accuracy, "keras_accuracy": keras_accuracy, "accuracy_change": accuracy - keras_accuracy,
        "test_samples": int(len(labels)), "criterion": fmt.check,
    }
    if fmt.check == "max_abs_diff" and figures["max_abs_diff"] > MAX_ABS_DIFF:
        return figures, f"max |logit difference| {figures['max_abs_diff']:.2e} > {MAX_ABS_DIFF:g}"
    if fmt.check == "agreement" and figures["agreement"] < MIN_AGREEMENT:
        return figures, f"top-1 agreement {figures['agreement']:.2%} < {MIN_AGREEMENT:.1%}"
    if fmt.check == "accuracy" and accuracy < keras_accuracy - MAX_ACCURACY_DROP:
        return figures, (f"accuracy {accuracy:.2%} is {(keras_accuracy - accuracy) * 100:.2f} points below "
                         f"Keras's {keras_accuracy:.2%} (limit {MAX_ACCURACY_DROP * 100:.1f})")
    return figures, ""


def _check_file(fmt: Format, data: bytes) -> None:
    """The file opens in the usual tools: onnx.checker for ONNX (LiteRT loads TFLite in verification)."""
    if fmt.backend == "onnx":
        import onnx

        try:
            onnx.checker.check_model(onnx.load_from_string(data))
        except onnx.checker.ValidationError as exc:
            raise EdgeKitError(f"{fmt.key}: onnx.checker rejects the file: {exc}") from None


def export(source: str | Path, formats: list[str], out: str | Path | None = None, *,
           calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES, opset: int | None = None,
           calibration_method: str | None = None, dataset: str | None = None, data_dir=None,
           progress=print) -> list[Result]:
    """Export `source` (artifact dir or bare model file) to `formats`; verify and record each."""
    from export import convert
    from runtime.load import load

    fmts = [get_format(key) for key in formats]
    for fmt in fmts:
        check_options(fmt, {"opset": opset, "calibration_method": calibration_method})
    if calibration_method is not None and calibration_method not in CALIBRATION_METHODS:
        raise EdgeKitError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}; "
                           f"got '{calibration_method}'.")
    if not isinstance(calibration_samples, int) or calibration_samples < 1:
        raise EdgeKitError(f"--calibration-samples must be a positive integer; got {calibration_samples!r}.")
    src = _load_source(source, dataset, data_dir)
    quantization_aware = src.kind in QUANTIZATION_AWARE
    if quantization_aware and any(f.key not in QAT_FORMATS for f in fmts):
        raise EdgeKitError(f"{src.path.name} is quantization-aware ({src.kind}): it exports to "
                           f"{', '.join(QAT_FORMATS)} only (its learned ranges make the integer model).")
    out = Path(out) if out else (src.path if src.manifest else src.path.with_name(src.path.stem + "-export"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise EdgeKitError(f"cannot write to output directory {out}: {exc.strerror}. Choose another --out.") from None

    x_test, y_test = src.dataset.arrays("test")
    reference = convert.keras_logits(src.model, x_test)
    calibration = _calibration(src.dataset, calibration_samples)
    onnx_proto, results = None, []
    for fmt in fmts:
        progress(f"{fmt.key}: converting ...")
        try:
            if fmt.backend == "tflite":
                data = convert.to_tflite(src.model, fmt.key, calibration, quantization_aware)
            else:
                if onnx_proto is None:
                    onnx_proto = convert.to_onnx(src.model, opset or convert.DEFAULT_OPSET, _metadata(src))
                data = (onnx_proto.SerializeToString() if fmt.key == "onnx" else
                        convert.onnx_int8(onnx_proto, calibration, calibration_method or "minmax", _metadata(src)))
            _check_file(fmt, data)
        except EdgeKitError as exc:
            results.append(Result(fmt.key, None, False, {}, str(exc)))
            continue
        results.append(_verify_and_publish(fmt, data, out, src, reference, x_test, y_test, load,
                                           calibration_samples, calibration_method, opset))
    if src.manifest is not None or results:
        _record(out, src, results)
    return results


def _verify_and_publish(fmt, data, out, src, reference, x_test, y_test, load, samples, method, opset) -> Result:
    import gzip

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f".{fmt.filename}", dir=out)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    try:
        model = load(tmp)
        logits = model.logits(x_test)
        figures, failure = _figures(fmt, logits, reference, y_test)
        figures.update(size_bytes=len(data), gzip_bytes=len(gzip.compress(data, compresslevel=9)))
        if failure:
            return Result(fmt.key, None, False, figures, f"{fmt.key}: {failure}")
        final = out / fmt.filename
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    calibrated = fmt.key in ("int8", "int16x8", "onnx-int8") and src.kind not in QUANTIZATION_AWARE
    sidecar = {
        "format": fmt.key, "description": fmt.description, "file": fmt.filename, "backend": fmt.backend,
        "sha256": sha256_file(final), "size_bytes": figures["size_bytes"], "gzip_bytes": figures["gzip_bytes"],
        "input": model.input.to_dict(), "output": {**model.output.to_dict(), "kind": "logits"},
        "preprocessing": src.dataset.preprocessing.to_dict(), "labels": list(src.dataset.labels),
        "source": {"path": str(src.path), "kind": src.kind, "model_file": src.model_file.name,
                   "sha256": sha256_file(src.model_file) if src.model_file.is_file() else None},
        "calibration": ({"samples": samples, "split": "train", "seed": SPLIT_SEED,
                         "method": (method or "minmax") if fmt.backend == "onnx" else "tflite-minmax"}
                        if calibrated else None),
        "opset": (opset or _default_opset()) if fmt.backend == "onnx" else None,
        "verification": {**figures, "passed": True, "runtime": "ai-edge-litert" if fmt.backend == "tflite"
                         else "onnxruntime"},
        "versions": library_versions(), "created": utc_now(),
    }
    atomic_write_json(out / fmt.sidecar, sidecar)
    return Result(fmt.key, final, True, figures)


def _default_opset() -> int:
    from export.convert import DEFAULT_OPSET

    return DEFAULT_OPSET


def _record(out: Path, src: Source, results: list[Result]) -> None:
    """Add the verified files and their figures to the manifest of `out` (the artifact itself by default)."""
    if src.manifest is not None and out.resolve() == src.path.resolve():
        manifest = read_manifest(out)
    else:
        pre = src.dataset.preprocessing
        manifest = {"name": out.name, "kind": "export", "model": (src.manifest or {}).get("model", src.path.stem),
                    "dataset": src.dataset.describe(), "parent": {"path": str(src.path.resolve())},
                    "preprocessing": pre.to_dict(), "labels": list(src.dataset.labels),
                    "input_shape": list(pre.input_shape), "metrics": {}, "files": {}}
        if (out / MANIFEST).is_file():
            manifest = {**manifest, **{k: v for k, v in read_manifest(out).items() if k in ("exports", "files")}}
    exports = dict(manifest.get("exports", {}))
    for result in results:
        exports[result.format] = {"file": str(result.file.name) if result.file else None, "passed": result.passed,
                                  "message": result.message, **result.figures}
    manifest["exports"] = exports
    manifest.setdefault("metrics", {}).setdefault("accuracy", next(
        (r.figures["keras_accuracy"] for r in results if r.figures), None))
    manifest["metrics"].setdefault("size_bytes", src.model_file.stat().st_size if src.model_file.is_file() else 0)
    files = set(manifest.get("files", {}))
    for result in results:
        fmt = FORMATS[result.format]
        if result.passed:
            files |= {fmt.filename, fmt.sidecar}
        else:  # a failed export leaves nothing that looks valid
            files -= {fmt.filename, fmt.sidecar}
            for name in (fmt.filename, fmt.sidecar):
                if (out / name).exists():
                    (out / name).unlink()
    if manifest.get("kind") == "export":
        manifest.pop("versions", None)  # refreshed by write_manifest
    write_manifest(out, manifest, sorted(f for f in files if (out / f).is_file()))

