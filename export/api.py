"""Exporting a model to every deployable format, each file verified before it counts.

    from export import export
    results = export("artifacts/cnn", ["float32", "int8", "onnx-float32"])

Each file is written under a temporary name, loaded with EdgeKit's own TensorFlow-free
runtime, compared with the Keras model on the fixed test split, and only then renamed
to its final name next to its sidecar `model.<variant>.json`. A file that fails its
check is deleted; every failure is reported at once.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import gzip
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from export.formats import (MAX_ACCURACY_DROP, MIXED_OF, QAT_FORMATS, Format, check_max_accuracy_drop, check_options,
                            get_format, verify)
from export.micro import check
from export.onnx_source import MIN_OPSET, ONNX_FORMATS, TFLITE_REFUSAL, is_onnx, node_selective
from export.tflite_source import check_formats, is_tflite
from optimize.api import qat_float_twin
from runtime.artifacts.manifest import (MANIFEST, QUANTIZATION_AWARE, check_out_apart, library_versions, lineage_paths,
                                        model_file, model_sha256, read_manifest, utc_now, write_manifest)
from runtime.artifacts.preprocessing import pixel_statistics
from runtime.datasets import SPLIT_SEED, Dataset, load_for_manifest
from runtime.errors import ConversionError, EdgeKitError, VerificationError, first_line, suggest
from runtime.fsutil import atomic_write_json, atomic_write_text, output_lock, sha256_file, temp_file, write_error
from runtime.load import Options, load, tflite_census
from runtime.metrics import check_above_chance, describe_preprocessing
from runtime.text import terminal
from train.foreign import load_classifier
from train.graph import ends_in_softmax
from train.safe_load import KERAS_SUFFIXES, is_saved_model

DEFAULT_CALIBRATION_SAMPLES = 300
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
OPSETS = range(13, 19)  # per-channel QDQ needs 13; tf2onnx 1.17 writes up to 18
VERIFY_BATCH = 32  # images per runtime call when verifying: bounds the interpreter's arena on large models


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
    def reference(self) -> str:
        """What every file is verified against."""
        return {"onnx": "the source ONNX file", "tflite": "the source TFLite file"}.get(self.kind, "Keras")

    def onnx_input(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed NHWC images as the ONNX graph's input: tf2onnx's graphs take NHWC, an ONNX source's its own."""
        return self.model.feed(x) if self.kind == "onnx" else x


@dataclasses.dataclass
class Result:
    format: str
    file: Path | None  # None when the export failed
    passed: bool
    figures: dict  # size, gzip size, max diff, agreement, accuracy
    message: str = ""
    error: BaseException | None = dataclasses.field(default=None, repr=False)  # the cause, for --verbose


def _load_source(source: str | Path, dataset_name: str | None, data_dir, trust: bool, options=None) -> Source:
    from export import onnx_source, tflite_source

    path = Path(source)
    if onnx_source.is_onnx(path) and not path.is_dir():
        model, dataset = onnx_source.load_source(path, dataset_name, data_dir, options)
        return Source(path, model, dataset, None, path, "onnx")
    if tflite_source.is_tflite(path):
        model, dataset = tflite_source.load_source(path, dataset_name, data_dir, options)
        return Source(path, model, dataset, None, path, "tflite")
    if (path / MANIFEST).is_file() or (path.is_dir() and (path / MANIFEST).is_symlink()):
        from optimize import load_model  # optimize's public loader rebuilds quantization-aware models

        manifest = read_manifest(path)  # load_model checks its files (not the exports, which may be redone)
        return Source(path, load_model(path, trust, manifest), load_for_manifest(manifest, data_dir), manifest,
                      model_file(path, manifest), manifest["kind"])
    if not (is_saved_model(path) or path.suffix in KERAS_SUFFIXES):
        if not path.exists():
            raise EdgeKitError(f"{path} does not exist; expected an EdgeKit artifact directory, a .keras or .h5 "
                               "file, a SavedModel directory, an .onnx or a .tflite file.")
        raise EdgeKitError(
            f"{path} is neither an EdgeKit artifact directory nor a model file; expected an artifact, "
            "a .keras or .h5 file, a SavedModel directory, an .onnx or a .tflite file."
        )
    if dataset_name is None:
        raise EdgeKitError(
            f"{path} is a bare model file, so its preprocessing, labels and calibration data are unknown; "
            "pass --dataset NAME (e.g. --dataset digits) to take them from that dataset."
        )

    model, dataset = load_classifier(path, dataset_name, data_dir, options and options.mean, options and options.std,
                                     trust)
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


def _check_file(fmt: Format, data: bytes) -> None:
    """The file opens in the usual tools: onnx.checker for ONNX (LiteRT loads TFLite in verification)."""
    if fmt.backend == "onnx":
        import onnx

        try:
            onnx.checker.check_model(onnx.load_from_string(data))
        except onnx.checker.ValidationError as exc:
            raise EdgeKitError(f"{fmt.key}: onnx.checker rejects the file: {exc}") from None


def check_settings(formats, *, calibration_samples=DEFAULT_CALIBRATION_SAMPLES, opset=None,
                   calibration_method=None, max_accuracy_drop=MAX_ACCURACY_DROP, keep_float=None,
                   explain=False) -> list[Format]:
    """Every option checked against what is possible, before TensorFlow loads or anything is read."""
    fmts = [get_format(key) for key in formats]
    if not fmts:
        raise EdgeKitError("nothing to export; name at least one format.")
    keys = {f.key for f in fmts}
    selective = keys & {*MIXED_OF, *MIXED_OF.values()}
    if keep_float is not None:
        if keep_float != "auto" and not (isinstance(keep_float, list) and keep_float
                                         and all(isinstance(n, str) and n for n in keep_float)):
            raise EdgeKitError(f"--keep-float takes Keras layer names separated by commas, or auto; got {keep_float!r}.")
        if not selective:
            raise EdgeKitError("--keep-float applies to int8 (`--tflite --quantize int8` or `--onnx --quantize int8`); "
                               "no int8 format was asked for.")
    for mixed in keys & set(MIXED_OF.values()):
        if keep_float is None:
            raise EdgeKitError(f"{mixed} needs --keep-float LAYER[,LAYER...] or --keep-float auto.")
    if explain and not selective:
        raise EdgeKitError("--explain ranks the layers int8 hurts; ask for it with `--tflite --quantize int8` or "
                           "`--onnx --quantize int8`.")
    for fmt in fmts:
        check_options(fmt, {"opset": opset, "calibration_method": calibration_method})
    if calibration_method is not None and calibration_method not in CALIBRATION_METHODS:
        raise EdgeKitError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}; "
                           f"got '{calibration_method}'.")
    if type(calibration_samples) is not int or calibration_samples < 1:
        raise EdgeKitError(f"--calibration-samples must be a positive integer; got {calibration_samples!r}.")
    check_max_accuracy_drop(max_accuracy_drop)
    if opset is not None and (type(opset) is not int or opset not in OPSETS):
        raise EdgeKitError(f"--opset must be {OPSETS.start}..{OPSETS.stop - 1} (per-channel int8 needs 13; tf2onnx "
                           f"writes up to {OPSETS.stop - 1}); got {opset!r}.")
    return fmts


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
    options = _source_options(path, fmts, opset, mean, std, layout)

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
    with output_lock(out):
        return _export(path, fmts, out, calibration_samples, opset, calibration_method, dataset, data_dir,
                       progress or _silent, trust, float(max_accuracy_drop), keep_float, explain, options, sparse,
                       {"ram": max_ram, "flash": max_flash}, ticking=progress is not None,
                       allow_untrained=allow_untrained)


def _silent(message: str) -> None:
    del message


def _source_options(path: Path, fmts, opset, mean, std, layout):
    """runtime.load's Options for a model file from elsewhere (checked before anything loads): --mean and --std for
    an .onnx or a Keras file (how pixels become its input), --layout for an .onnx file; an artifact's preprocessing
    is its manifest's, so they are refused there."""

    if is_tflite(path):
        check_formats(path, [f.key for f in fmts])
        if layout is not None:
            raise EdgeKitError("--layout is for an .onnx source; a .tflite file's layout is read from its shape.")
        return Options(mean, std, None, None, None) if mean is not None or std is not None else None
    if not (is_onnx(path) and not path.is_dir()):
        if (path / MANIFEST).is_file() and (mean is not None or std is not None or layout is not None):
            raise EdgeKitError(f"{path} is an EdgeKit artifact: its preprocessing is the one its manifest records; "
                               "--mean, --std and --layout are for a model file from elsewhere.")
        if layout is not None:
            raise EdgeKitError("--layout is for an .onnx source; a Keras model takes channels-last (NHWC) input.")
        return Options(mean, std, None, None, None) if mean is not None or std is not None else None
    other = [f.key for f in fmts if f.key not in ONNX_FORMATS]
    if other:
        raise EdgeKitError(f"{', '.join(other)}: {TFLITE_REFUSAL}.")
    if opset is not None:
        raise EdgeKitError("--opset does not apply to an .onnx source: its graph keeps its own opset (upgraded to "
                           "13 when older, for int8).")
    return Options(mean, std, None, None, layout)


def _export(source, fmts, out, calibration_samples, opset, calibration_method, dataset, data_dir, progress,
            trust, max_accuracy_drop, keep_float=None, explain=False, options=None, sparse=False,
            budgets=None, ticking: bool = False, allow_untrained: bool = False) -> list[Result]:

    from export import convert

    src = _load_source(source, dataset, data_dir, trust, options)
    if (src.kind == "onnx" and src.model.runtime.preprocessing is None) or (src.kind == "bare" and options is None):
        progress(f"note: no --mean/--std given; feeding the model the dataset's preprocessing, "
                 f"{describe_preprocessing(src.dataset.preprocessing)}: pass --mean and --std as the model was trained")
    elif src.kind == "tflite" and options is None:
        how = "as its own int8 quantization says (pixels - 128)" if src.model.integer else "as the dataset's"
        progress(f"note: no --mean/--std given; pixels become the file's input {how}, "
                 f"{describe_preprocessing(src.dataset.preprocessing)}: pass --mean and --std if the model was "
                 "trained otherwise")
    if src.kind == "tflite" and src.model.integer and any(f.key != "micro" for f in fmts):
        raise EdgeKitError(f"{src.path.name} is fully integer already: it is a source for --micro only.")
    quantization_aware = src.kind in QUANTIZATION_AWARE
    if quantization_aware and any(f.key not in QAT_FORMATS for f in fmts):
        raise EdgeKitError(f"{src.path.name} is quantization-aware ({src.kind}): it exports to int8 only (its "
                           "learned ranges make the integer model), and to micro, that file made for a microcontroller.")
    x_test, y_test = src.dataset.arrays("test")
    reference = convert.keras_logits(src.model, x_test)
    bad = int(reference.size - np.count_nonzero(np.isfinite(reference)))
    if bad:  # nothing made from it could be verified: NaN is never a result

        raise VerificationError(f"{src.path.name} gives {bad:,} NaN or infinite outputs on the {len(x_test)} test "
                                "images; a model whose outputs are not numbers cannot be exported. Train it again "
                                "(check its weights and learning rate).")
    src.output_kind = _output_kind(src.model, reference)
    if not allow_untrained:
        _check_reference(src, reference, y_test)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = temp_file(out, "write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EdgeKitError(f"cannot write to output directory {out}: {exc.strerror}. Choose another --out.") from None
    src.model_sha256 = (model_sha256(src.manifest) if src.manifest else
                        sha256_file(src.model_file) if src.model_file.is_file() else None)
    calibration = _calibration(src.dataset, calibration_samples)
    if len(calibration) < calibration_samples and any(f.options & {"calibration_samples"} for f in fmts) \
            and not quantization_aware:
        progress(f"note: --calibration-samples {calibration_samples} asked, but the training split holds "
                 f"{len(calibration)} images; calibrating on all {len(calibration)} (recorded in each sidecar)")
    large = src.model.count_params() > convert.LARGE_MODEL_PARAMS
    mixed, onnx_proto = {}, None  # format -> (bytes, the sidecar's record of the layers kept float) or None
    if keep_float is not None or explain:
        if quantization_aware:
            raise EdgeKitError(f"{src.path.name} is quantization-aware: its int8 file comes from its learned ranges, "
                               "so --keep-float and --explain do not apply.")
        if {"onnx-int8", "onnx-int8-mixed"} & {f.key for f in fmts}:
            onnx_proto = _onnx_float(src, opset)
        fmts, mixed = _selective(src, fmts, out, calibration, keep_float, explain, max_accuracy_drop, progress,
                                 onnx_proto, calibration_method or "minmax")
    results = []
    zeros = convert.zero_fraction(src.model) if sparse and src.kind != "onnx" and any(
        f.key in convert.SPARSE_FORMATS for f in fmts) else 0.0
    # ONNX first: tf2onnx's peak comes on top of what TFLite conversions leave behind otherwise
    # (ResNet50 at 64x64, --all: 2.8 GB peak RSS in this order, 3.2 GB in table order)
    for fmt in sorted(fmts, key=lambda f: f.backend != "onnx"):
        progress(f"{fmt.key}: converting ...")
        record = None  # what the sidecar says of how a file not made the plain way was made
        try:
            if fmt.key in mixed:
                if mixed[fmt.key] is None:
                    raise VerificationError("even with every layer float, the file misses the accuracy budget on "
                                            "the validation split; nothing was written")
                data, record = mixed[fmt.key][0], {"kept_float": mixed[fmt.key][1], **(src.made or {})}
            elif src.kind == "tflite":  # the integer file (a float one quantized once), checked and verified
                data, record = src.model.int8(calibration)
            elif fmt.key in ("int8", "micro") and quantization_aware:
                data, record = _qat_int8(src, calibration, trust, progress, fmt.key)
            elif fmt.key == "micro":
                data = convert.to_tflite(src.model, "micro", calibration, False)
            elif fmt.backend == "tflite":
                data = convert.to_tflite(src.model, fmt.key, calibration, quantization_aware)
                if fmt.key in convert.SPARSE_FORMATS and zeros >= convert.SPARSE_ZEROS:
                    data, record = _sparse_if_smaller(src, fmt, data, calibration, quantization_aware, zeros,
                                                      progress)
            else:
                if onnx_proto is None:
                    onnx_proto = _onnx_float(src, opset)
                data = (onnx_proto.SerializeToString() if fmt.key == "onnx-float32" else
                        convert.onnx_int8(onnx_proto, src.onnx_input(calibration), calibration_method or "minmax",
                                          _metadata(src), ticking=ticking))
                record = src.made
            _check_file(fmt, data)
            if large:
                gc.collect()  # the converter's graphs: a large model's memory goes back before the next format
            results.append(_verify_and_publish(fmt, data, out, src, reference, x_test, y_test, load,
                                               len(calibration), calibration_method, opset, max_accuracy_drop,
                                               record, budgets))
        except EdgeKitError as exc:  # every format is attempted; each failure is reported with the others
            if exc.exit_code != 1:
                raise
            results.append(Result(fmt.key, None, False, {}, f"{fmt.key}: {exc}", exc))
    results.sort(key=lambda r: [f.key for f in fmts].index(r.format))  # as asked
    if src.manifest is not None or results:
        _record(out, src, results)
    return results


def _sparse_if_smaller(src, fmt, dense: bytes, calibration, quantization_aware, zeros, progress):
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


def _onnx_float(src: Source, opset: int | None):
    """The float ModelProto: tf2onnx's of a Keras model, or an ONNX source's own graph (src.made records how)."""
    from export import convert, onnx_source

    if src.kind == "onnx":
        proto, src.made = onnx_source.float_model(src.model, _metadata(src))
        return proto
    return convert.to_onnx(src.model, opset or convert.DEFAULT_OPSET, _metadata(src))


def _unsupported(src) -> str:
    """The kinds of layer a quantization-aware artifact's technique skipped as unsupported, with counts."""

    skipped = ((src.manifest or {}).get("facts") or {}).get("skipped") or {}
    types = {layer.name: type(layer).__name__ for layer in src.model.layers}
    kinds = Counter(types.get(name, name) for name, why in skipped.items() if "not supported" in str(why))
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) or "none listed"


def _qat_int8(src, calibration, trust, progress, key: str = "int8") -> tuple[bytes, dict | None]:
    return qat_int8_file(src.model, lambda: qat_float_twin(src.path, src.manifest, src.model, trust), calibration,
                         excludes=bool(((src.manifest or {}).get("recipe") or {}).get("exclude")),
                         unsupported=_unsupported(src), progress=progress, key=key)


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


def _selective(src, fmts, out, calibration, keep_float, explain, budget, progress, onnx_proto, method):
    """--explain and --keep-float (export/selective.py), per backend asked for: write the sensitivity table, and
    return the formats to make and {mixed format: (bytes, record), or None when nothing meets the budget}."""
    from export import selective as sel

    x_val, y_val = src.dataset.arrays("val")
    x_test, y_test = src.dataset.arrays("test")
    keys = [f.key for f in fmts]
    mixed = {}
    if keep_float not in (None, "auto"):  # names checked before the calibration they would waste
        known = ([n.name for n in src.model.proto.graph.node if n.name] if src.kind == "onnx" else
                 [layer.name for layer in sel._all_layers(src.model)])
        for name in keep_float:
            if name not in known:
                raise EdgeKitError(terminal(f"--keep-float: {src.path.name} has no "
                                            f"{'node' if src.kind == 'onnx' else 'layer'} named '{name}'."
                                            f"{suggest(name, known)}"))
    for plain, mixed_key in MIXED_OF.items():
        if plain not in keys and mixed_key not in keys:
            continue
        progress(f"{plain}: calibrating once for selective quantization ...")
        if src.kind == "onnx":

            chooser = node_selective(src.model, onnx_proto, calibration, method, _metadata(src))
        else:
            chooser = (sel.Selective(src.model, calibration) if plain == "int8" else
                       sel.ONNXSelective(src.model, onnx_proto, calibration, method, _metadata(src)))
        if keep_float not in (None, "auto"):
            chooser.check_names(keep_float)
        table = None
        if keep_float == "auto" and not explain:  # plain int8 first: the sweep only when it misses the budget
            float_val, int8_val, _ = sel.plain_int8(chooser, x_val, y_val)
            if int8_val >= float_val - budget / 100 - 1e-9:
                progress(f"{plain}: full int8 is within the {budget:g}-point budget on the validation split "
                         f"({int8_val:.2%} vs float {float_val:.2%}); written as {plain}, no layer kept float")
                keys = [k for k in keys if k != mixed_key] + ([] if plain in keys else [plain])
                continue
        if explain or keep_float == "auto":
            table = sel.explain(chooser, x_val, y_val, x_test, y_test, calibration, progress)
            if explain:
                _write_sensitivity(out, table, progress)
        if keep_float is None:
            continue
        if keep_float == "auto":
            kept = sel.choose(chooser, table, x_val, y_val, budget)
            if kept == []:
                progress(f"{plain}: full int8 is within the {budget:g}-point budget on the validation split "
                         f"({table['int8_val_accuracy']:.2%} vs float {table['float_val_accuracy']:.2%}); "
                         f"written as {plain}")
                keys = [k for k in keys if k != mixed_key] + ([] if plain in keys else [plain])
                continue
            how = "auto: the most sensitive keep sets, greedily, until the validation accuracy is within the budget"
        else:
            kept, how = list(keep_float), "by name (--keep-float)"
        keys = list(dict.fromkeys(mixed_key if k == plain else k for k in [*keys, mixed_key]))
        if kept is None:
            progress(f"{mixed_key}: even with every layer float the validation accuracy misses the "
                     f"{budget:g}-point budget")
            mixed[mixed_key] = None
            continue
        data = chooser.quantize(kept)
        record = _kept_record(chooser, kept, how, table, data, x_val, y_val)
        progress(terminal(f"{mixed_key}: keeping {', '.join(kept)} float ({how}); validation accuracy "
                 f"{record['val_accuracy']:.2%} against full int8's {record['int8_val_accuracy']:.2%}"))
        mixed[mixed_key] = (data, record)
    return [get_format(k) for k in keys], mixed


def _kept_record(chooser, kept, how, table, data, x_val, y_val) -> dict:
    """What the sidecar and the manifest say of an int8-mixed file: the layers kept float and what each cost."""
    from export.selective import accuracy_of, timed_ratio

    full = chooser.quantize()
    full_val = table["int8_val_accuracy"] if table else accuracy_of(full, x_val, y_val, chooser.suffix)
    per_layer = []
    for name in kept:
        alone = chooser.quantize([name])
        entry = (table or {}).get("layers") and next((e for e in table["layers"] if e["name"] == name), None)
        per_layer.append({"layer": name, "kind": chooser.layers[name].kind,
                          "size_cost_bytes": len(alone) - len(full),
                          "val_gain_points_of_its_keep_set": entry["gain_points"] if entry else None,
                          "sqnr_db_in_full_int8": entry["sqnr_db"] if entry else None})
    return {"layers": list(kept), "chosen": how, "validation_images": int(len(y_val)),
            "int8_val_accuracy": full_val, "val_accuracy": accuracy_of(data, x_val, y_val, chooser.suffix),
            "size_cost_bytes": len(data) - len(full), "int8_size_bytes": len(full),
            "latency_ratio_vs_int8": timed_ratio(data, full, x_val[:1], chooser.suffix), "per_layer": per_layer}


def _write_sensitivity(out: Path, table: dict, progress) -> None:
    """sensitivity.<format>.json, sensitivity.<format>.png and the table on the console."""
    from export.selective import plot_sensitivity

    name = f"sensitivity.{table['format']}"
    atomic_write_json(out / f"{name}.json", table)
    drawn = plot_sensitivity(table, out / f"{name}.png")
    progress(f"{table['format']} sensitivity: float {table['float_val_accuracy']:.2%}, full int8 {table['int8_val_accuracy']:.2%} "
             f"on {table['validation_images']} validation images (full int8 on the test split: "
             f"{table['int8_test_accuracy']:.2%})")
    progress(f"  {'layer':<28} {'kind':<22} {'SQNR dB med/worst':>17} {'val, kept float':>15} {'gain':>7} "
             f"{'test':>7}  keep set")
    for row in table["layers"]:
        sqnr = ("-" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}/{row['worst_channel_db']:.1f}")
        test = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.2%}"
        progress(terminal(f"  {row['name'][:28]:<28} {row['kind'][:22]:<22} {sqnr:>17} {row['val_accuracy']:>15.2%} "
                          f"{row['gain_points']:>+7.2f} {test:>7}  {', '.join(row['keep'])}"))
    if not drawn:
        progress(f"  {table['format']} loses nothing here: no layer kept float gains validation accuracy, so there "
                 "is no plot")
    progress(f"  wrote {out / (name + '.json')}" + (f" and {out / (name + '.png')}" if drawn else ""))


def _verify_and_publish(fmt, data, out, src, reference, x_test, y_test, load, samples, method, opset,
                        max_accuracy_drop, record=None, budgets=None) -> Result:

    from export import portable

    tmp, sources = None, None
    try:
        fd, tmp = temp_file(out, fmt.filename, fmt.suffix)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            model = load(tmp, layout=src.layout)
        except EdgeKitError as exc:
            reason = first_line(exc.__cause__) if exc.__cause__ is not None else str(exc)
            raise VerificationError(f"the runtime ({'LiteRT' if fmt.suffix == '.tflite' else 'onnxruntime'}) cannot "
                                    f"run the file the converter wrote: {reason}") from exc
        if fmt.key == "micro":  # TFLM computes the outputs that are verified; LiteRT's reference kernels check them

            logits, micro_record, sources = check(tmp, data, model, x_test, budgets or {},
                                                  src.dataset.preprocessing, list(src.dataset.labels), src.output_kind)
            record = {**(record or {}), "micro": micro_record}
        else:
            logits = model.logits(x_test, batch_size=VERIFY_BATCH)

        def judge(outputs):
            return verify(fmt, outputs, reference, y_test, max_accuracy_drop, src.reference)

        figures, failure = judge(logits)
        bare = None
        if fmt.key != "micro":  # where it runs: the user's own LiteRT or onnxruntime app (export/portable.py)
            bare = portable.check(fmt, Path(tmp), model, x_test, logits, judge)
            sparse = bool((record or {}).get("sparse_encoding"))
            if not bare["passed"] and not sparse and not failure:
                failure = (f"EdgeKit's runtime verifies it, but {bare['runtime']} does not: {bare['reason']}; "
                           "a file must run where the user deploys it")
        figures["reference"] = src.reference
        figures.update(size_bytes=len(data), gzip_bytes=len(gzip.compress(data, compresslevel=9)))
        if fmt.key == "int8" and src.kind in QUANTIZATION_AWARE:  # fully integer unless tfmot left layers float

            figures["float_ops"] = len(tflite_census(data)["float_ops"])
        if failure:
            return Result(fmt.key, None, False, figures, f"{fmt.key}: {failure}")
        final = out / fmt.filename
        for name, text in (sources or {}).items():  # the C sources first: a file that is there has its sources
            atomic_write_text(out / name, text)
        os.replace(tmp, final)
    except OSError as exc:
        raise write_error(out / fmt.filename, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    calibrated = fmt.key in ("int8", "int16x8", "onnx-int8", "int8-mixed", "onnx-int8-mixed", "micro") and (
        src.kind not in QUANTIZATION_AWARE or bool(record and set(record) - {"micro"})) and not (
        src.kind == "tflite" and src.model.integer)  # QAT from its learned ranges, or an integer source: none
    tool = (record or {}).get("quantized_by")
    figures.update(record or {})
    sidecar = {
        "format": fmt.key, "description": fmt.description, "file": fmt.filename, "backend": fmt.backend,
        "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": figures["size_bytes"], "gzip_bytes": figures["gzip_bytes"],
        "input": model.input.to_dict(), "output": {**model.output.to_dict(), "kind": src.output_kind},
        "preprocessing": src.dataset.preprocessing.to_dict(), "layout": model.layout,
        "labels": list(src.dataset.labels),
        "input_statistics": pixel_statistics(src.dataset.x_train),
        "source": {"path": str(src.path), "kind": src.kind, "model_file": src.model_file.name,
                   "sha256": src.model_sha256, **_origin(src)},
        "calibration": ({"samples": samples, "split": "train", "seed": SPLIT_SEED,
                         "method": (method or "minmax") if fmt.backend == "onnx" else
                         f"{tool['tool']} {tool['recipe']}" if tool else "tflite-minmax"}
                        if calibrated else None),
        "opset": _opset_written(src, opset) if fmt.backend == "onnx" else None,
        **(record or {}),
        "verification": {**figures, "passed": True, "runtime": "tflite-micro" if fmt.key == "micro" else
                         "ai-edge-litert" if fmt.backend == "tflite" else "onnxruntime"},
        # the file in bare LiteRT (default options) or a default onnxruntime session; passed false: it needs
        # EdgeKit's runtime on the device (a sparse file: runtime.artifacts.manifest.needs_edgekit)
        "bare": bare,
        "versions": library_versions(), "created": utc_now(),
    }
    atomic_write_json(out / fmt.sidecar, sidecar)
    figures["bare"] = bare
    return Result(fmt.key, final, True, figures)


def _origin(src: Source) -> dict:
    """What a sidecar and the manifest record of an ONNX source: its producer and opset, how it was upgraded."""
    if src.kind == "tflite":
        return {"producer": src.model.producer(), "layout": src.layout}
    if src.kind != "onnx":
        return {}
    return {"producer": src.model.producer(), "opset": src.model.opset(), "layout": src.layout,
            "external_data": src.model.data_files}


def _opset_written(src: Source, opset: int | None) -> int:
    if src.kind == "onnx":

        return max(src.model.opset(), MIN_OPSET)
    return opset or _default_opset()


def _output_kind(model, reference: np.ndarray) -> str:
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


def _check_reference(src: Source, reference: np.ndarray, y_test: np.ndarray) -> None:
    """A model from elsewhere must score above chance (runtime.metrics.check_above_chance); an EdgeKit artifact's
    preprocessing is the one it was trained with, so it is not judged here."""
    if src.manifest is None:
        check_above_chance(src.path.name, float(np.mean(reference.argmax(axis=1) == y_test)), len(y_test),
                           reference.shape[1], src.dataset.name, src.dataset.preprocessing)


def _default_opset() -> int:
    from export.convert import DEFAULT_OPSET

    return DEFAULT_OPSET


def _record(out: Path, src: Source, results: list[Result]) -> None:
    """Add the verified files and their figures to the manifest of `out` (the artifact itself by default).

    Only the files written now are hashed; every other entry is kept as it was checked, so a file
    changed behind EdgeKit's back keeps failing its check instead of being blessed with a new sha256.
    """
    if src.manifest is not None and out.resolve() == src.path.resolve():
        manifest = read_manifest(out)
    else:
        pre = src.dataset.preprocessing
        manifest = {"name": out.name, "kind": "export", "model": (src.manifest or {}).get("model", src.path.stem),
                    "dataset": src.dataset.describe(), "parent": {"path": str(src.path.resolve())},
                    "preprocessing": pre.to_dict(), "labels": list(src.dataset.labels),
                    "input_shape": list(pre.input_shape), "metrics": {}, "files": {}}
        if src.kind in ("onnx", "tflite"):
            manifest["source"] = {"file": src.path.name, "sha256": src.model_sha256, **_origin(src)}
            manifest["layout"] = src.layout
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
    known = dict(manifest.get("files", {}))
    for result in results:
        fmt = get_format(result.format)
        for name in fmt.files:
            known.pop(name, None)
            if not result.passed and (out / name).exists():  # a failed export leaves nothing that looks valid
                (out / name).unlink()
    written = {name for r in results if r.passed for name in get_format(r.format).files}
    if manifest.get("kind") == "export":
        manifest.pop("versions", None)  # refreshed by write_manifest
    names = sorted(name for name in set(known) | written if (out / name).is_file() or name in known)
    write_manifest(out, manifest, names, known={k: v for k, v in known.items() if k in names})
