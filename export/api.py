"""Exporting a model to every deployable format, each file verified before it counts.

    from export import export
    results = export("artifacts/cnn", ["float32", "int8", "onnx-float32"])

Each file is written under a temporary name, loaded with EdgeKit's own TensorFlow-free
runtime, compared with the Keras model on the fixed test split, and only then renamed
to its final name next to its sidecar `model.<variant>.json`. A file that fails its
check is deleted; every failure is reported at once.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np

from export.keep_float import selective_formats
from export.make import Maker, calibration_images, check_file
from export.onnx_source import is_onnx
from export.publish import Result, record_exports, verify_and_publish
from export.settings import DEFAULT_CALIBRATION_SAMPLES, Settings, check_settings
from export.source import Source, check_reference, load_source, output_kind, source_options
from runtime.artifacts.manifest import MANIFEST, check_out_apart, lineage_paths, model_sha256, read_manifest
from runtime.errors import EdgeKitError, NonFiniteOutputs
from runtime.fsutil import output_lock, sha256_file, temp_file
from runtime.metrics import describe_preprocessing
from runtime.vocabulary import MAX_ACCURACY_DROP, get_format


def export(source: str | Path, formats: list[str], out: str | Path | None = None, *,
           calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES, opset: int | None = None,
           calibration_method: str | None = None, dataset: str | None = None, data_dir=None,
           progress=print, trust: bool = False, max_accuracy_drop: float = MAX_ACCURACY_DROP,
           keep_float: list[str] | str | None = None, explain: bool = False, mean=None, std=None,
           layout: str | None = None, sparse: bool = False, max_ram: int | None = None,
           max_flash: int | None = None, allow_untrained: bool = False) -> list[Result]:
    """Export `source` (artifact dir, bare Keras model file, or .onnx file) to `formats`; verify and record each.

    A model file from elsewhere takes `mean`, `std` (pixel units, Preprocessing.in_pixel_units) as runtime.load
    does; an .onnx source (export/onnx_source.py) `layout` too, and exports to the ONNX formats only,
    onnx-float32 always (the report's baseline). Such a model scoring under twice chance on the test split is
    refused (its preprocessing is most likely another) unless `allow_untrained` (an untrained architecture,
    exported for its size and speed).

    Every TFLite and ONNX file is verified twice: in EdgeKit's runtime, and as the user's own app runs it (bare
    LiteRT with its default options, a default onnxruntime session: export/portable.py); it fails if either
    refuses it or answers outside the rule.

    With `sparse`, a pruned model's float32, dynamic and int8 files (a third or more of its kernel weights zero)
    are written with the converter's sparse encoding when that makes them at least 1% smaller: bare LiteRT's
    XNNPACK refuses such an int8 or dynamic file, so its sidecar says it needs EdgeKit's runtime on the device.

    The `micro` format (export/micro.py) is held to `max_ram` (its tensor arena) and `max_flash` (its bytes).

    `progress`: where each step's line goes (None: nowhere, and no live line for a long step either).

    The artifact's files are checked against its manifest first (ArtifactError, exit 1), and a
    model that needs code to load is refused unless `trust`. Every format is attempted; each
    failure (a converter's refusal, a failed check) is returned in its Result, not raised.
    """
    fmts = check_settings(formats, calibration_samples=calibration_samples, opset=opset,
                          calibration_method=calibration_method, max_accuracy_drop=max_accuracy_drop,
                          keep_float=keep_float, explain=explain)
    if (max_ram is not None or max_flash is not None) and all(f.key != "micro" for f in fmts):
        raise EdgeKitError("--max-ram and --max-flash hold a microcontroller file to its budget: add --micro.")
    path = Path(source)
    options = source_options(path, fmts, opset, mean, std, layout)

    onnx_file = is_onnx(path) and not path.is_dir()
    if onnx_file and all(f.key != "onnx-float32" for f in fmts):  # the report's baseline comes too
        fmts = [get_format("onnx-float32"), *fmts]
    default = path if (path / MANIFEST).exists() else path.with_name(path.stem + "-export")
    out = Path(out) if out else default
    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        check_out_apart(out, [path], allow_same=True)
        check_out_apart(out, lineage_paths(path, manifest)[1:])
    else:
        check_out_apart(out, [path])
    settings = Settings(calibration_samples, opset, calibration_method, float(max_accuracy_drop), keep_float, explain,
                        sparse, max_ram, max_flash, trust, allow_untrained, ticking=progress is not None)
    with output_lock(out):
        return _export(path, fmts, out, settings, dataset, data_dir, options, progress or _silent)


def _silent(message: str) -> None:
    del message


def _export(path: Path, fmts: list, out: Path, settings: Settings, dataset: str | None, data_dir, options,
            progress) -> list[Result]:
    """Load the source, check it can be the reference, then make, verify and publish every format (each failure
    reported with the others, none raised), and record them all in the manifest."""
    from export import convert

    src = load_source(path, dataset, data_dir, settings.trust, options)
    _note_preprocessing(src, options, progress)
    _check_formats(src, fmts, settings)
    x_test, y_test = src.dataset.arrays("test")
    reference = convert.keras_logits(src.model, x_test)
    bad = int(reference.size - np.count_nonzero(np.isfinite(reference)))
    if bad:  # nothing made from it could be verified: NaN is never a result
        raise NonFiniteOutputs(f"{src.path.name} gives {bad:,} NaN or infinite outputs on the {len(x_test)} test "
                               "images; a model whose outputs are not numbers cannot be exported. Train it again "
                               "(check its weights and learning rate).")
    src.output_kind = output_kind(src.model, reference)
    if not settings.allow_untrained:
        check_reference(src, reference, y_test)
    _check_writable(out)
    src.model_sha256 = (model_sha256(src.manifest) if src.manifest else
                        sha256_file(src.model_file) if src.model_file.is_file() else None)
    calibration = calibration_images(src.dataset, settings.calibration_samples)
    if len(calibration) < settings.calibration_samples and any(f.calibrated for f in fmts) and src.maker != "qat":
        progress(f"note: --calibration-samples {settings.calibration_samples} asked, but the training split holds "
                 f"{len(calibration)} images; calibrating on all {len(calibration)} (recorded in each sidecar)")
    zeros = convert.zero_fraction(src.model) if settings.sparse and src.maker == "keras" and any(
        f.sparse for f in fmts) else 0.0
    maker = Maker(src, settings, calibration, progress, zeros)
    if settings.keep_float is not None or settings.explain:
        if {"onnx-int8", "onnx-int8-mixed"} & {f.key for f in fmts}:
            maker.float_onnx()
        fmts, maker.mixed = selective_formats(src, fmts, out, calibration, settings.keep_float, settings.explain,
                                              settings.max_accuracy_drop, progress, maker.onnx_proto,
                                              settings.method)
    large = src.model.count_params() > convert.LARGE_MODEL_PARAMS
    results = []
    # ONNX first: tf2onnx's peak comes on top of what TFLite conversions leave behind otherwise
    # (ResNet50 at 64x64, --all: 2.8 GB peak RSS in this order, 3.2 GB in table order)
    for fmt in sorted(fmts, key=lambda f: f.backend != "onnx"):
        progress(f"{fmt.key}: converting ...")
        try:
            data, record = maker.make(fmt)  # record: what the sidecar says of how a file not made plainly was made
            check_file(fmt, data)
            if large:
                gc.collect()  # the converter's graphs: a large model's memory goes back before the next format
            results.append(verify_and_publish(fmt, data, out, src, reference, x_test, y_test, settings,
                                              len(calibration), record))
        except EdgeKitError as exc:  # every format is attempted; each failure is reported with the others
            if exc.exit_code != 1:
                raise
            results.append(Result(fmt.key, None, False, {}, f"{fmt.key}: {exc}", exc))
    results.sort(key=lambda r: [f.key for f in fmts].index(r.format))  # as asked
    if src.manifest is not None or results:
        record_exports(out, src, results)
    return results


def _note_preprocessing(src: Source, options, progress) -> None:
    """Say which preprocessing a model file from elsewhere is fed when no --mean/--std was given."""
    if (src.kind == "onnx" and src.model.runtime.preprocessing is None) or (src.kind == "bare" and options is None):
        progress(f"note: no --mean/--std given; feeding the model the dataset's preprocessing, "
                 f"{describe_preprocessing(src.dataset.preprocessing)}: pass --mean and --std as the model was trained")
    elif src.kind == "torch" and options is None:
        progress(f"note: no --mean/--std given; feeding the program the dataset's preprocessing, "
                 f"{describe_preprocessing(src.dataset.preprocessing)}: pass --mean and --std as the model was trained "
                 "(pixel units: 127.5 and 127.5 for Normalize(0.5, 0.5))")
    elif src.kind == "tflite" and options is None:
        how = "as its own int8 quantization says (pixels - 128)" if src.model.integer else "as the dataset's"
        progress(f"note: no --mean/--std given; pixels become the file's input {how}, "
                 f"{describe_preprocessing(src.dataset.preprocessing)}: pass --mean and --std if the model was "
                 "trained otherwise")


def _check_formats(src: Source, fmts: list, settings: Settings) -> None:
    """The formats this source makes (each format's `sources`; an integer .tflite file makes micro alone)."""
    if src.kind == "tflite" and src.model.integer and any(f.key != "micro" for f in fmts):
        raise EdgeKitError(f"{src.path.name} is fully integer already: it is a source for --micro only.")
    if src.maker == "qat" and any("qat" not in f.sources for f in fmts):
        raise EdgeKitError(f"{src.path.name} is quantization-aware ({src.kind}): it exports to int8 only (its "
                           "learned ranges make the integer model), and to micro, that file made for a microcontroller.")
    if src.maker == "qat" and (settings.keep_float is not None or settings.explain):
        raise EdgeKitError(f"{src.path.name} is quantization-aware: its int8 file comes from its learned ranges, "
                           "so --keep-float and --explain do not apply.")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = temp_file(out, "write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EdgeKitError(f"cannot write to output directory {out}: {exc.strerror}. Choose another --out.") from None
