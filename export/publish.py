"""A made file verified and published: written under a temporary name, judged where it runs, renamed with its
sidecar, and every result recorded in the manifest (`exports`, with the rule a failed file broke)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from export import portable
from export.micro import check
from export.settings import Settings
from export.source import Source
from export.verify import verify
from runtime.artifacts.manifest import MANIFEST, library_versions, read_manifest, utc_now, write_manifest
from runtime.artifacts.preprocessing import pixel_statistics
from runtime.backends.tflite import tflite_census
from runtime.datasets import SPLIT_SEED
from runtime.errors import ConversionError, EdgeKitError, NotPortable, Unloadable, first_line
from runtime.fsutil import atomic_write_json, atomic_write_text, temp_file, write_error
from runtime.load import load
from runtime.vocabulary import QUANTIZATION_AWARE, FileFormat, get_format

VERIFY_BATCH = 32  # images per runtime call when verifying: bounds the interpreter's arena on large models


@dataclasses.dataclass
class Result:
    format: str
    file: Path | None  # None when the export failed
    passed: bool
    figures: dict  # size, gzip size, max diff, agreement, accuracy
    message: str = ""
    error: BaseException | None = dataclasses.field(default=None, repr=False)  # the cause, for --verbose

    @property
    def rule(self) -> str | None:
        """The rule a failed file broke (runtime.errors' VerificationError.rule; "conversion" for a converter's
        refusal), None for a verified file."""
        if self.passed:
            return None
        return getattr(self.error, "rule", None) or ("conversion" if isinstance(self.error, ConversionError)
                                                     else "failed")


def verify_and_publish(fmt: FileFormat, data: bytes, out: Path, src: Source, reference: np.ndarray,
                       x_test: np.ndarray, y_test: np.ndarray, settings: Settings, samples: int,
                       record: dict | None = None) -> Result:
    """Write `data` under a temporary name, run it in the runtime its format names (`fmt.verifier`: TFLM for a
    microcontroller's file, else EdgeKit's LiteRT or onnxruntime and then bare LiteRT or a default onnxruntime
    session, export/portable.py), judge it by the one rule (export/verify.py) against `reference`, and only then
    rename it and write its sidecar. A failure is returned with the rule it broke; nothing of it is left."""
    tmp, sources = None, None
    try:
        fd, tmp = temp_file(out, fmt.filename, fmt.suffix)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            model = load(tmp, layout=src.layout)
        except EdgeKitError as exc:
            reason = first_line(exc.__cause__) if exc.__cause__ is not None else str(exc)
            raise Unloadable(f"the runtime ({'LiteRT' if fmt.suffix == '.tflite' else 'onnxruntime'}) cannot "
                             f"run the file the converter wrote: {reason}") from exc
        if fmt.verifier == "tflite-micro":  # TFLM's outputs are verified; LiteRT's reference kernels check them
            logits, micro_record, sources = check(tmp, data, model, x_test, settings.budgets,
                                                  src.dataset.preprocessing, list(src.dataset.labels), src.output_kind)
            record = {**(record or {}), "micro": micro_record}
        else:
            logits = model.logits(x_test, batch_size=VERIFY_BATCH)

        def judge(outputs):
            return verify(fmt, outputs, reference, y_test, settings.max_accuracy_drop, src.reference)

        figures, failure = judge(logits)
        bare = None
        if fmt.verifier != "tflite-micro":  # where it runs: the user's own LiteRT or onnxruntime app
            bare = portable.check(fmt, Path(tmp), model, x_test, logits, judge)
            sparse = bool((record or {}).get("sparse_encoding"))
            if not bare["passed"] and not sparse and not failure:
                failure = NotPortable(f"EdgeKit's runtime verifies it, but {bare['runtime']} does not: "
                                      f"{bare['reason']}; a file must run where the user deploys it")
        figures["reference"] = src.reference
        figures.update(size_bytes=len(data), gzip_bytes=len(gzip.compress(data, compresslevel=9)))
        if fmt.key == "int8" and src.kind in QUANTIZATION_AWARE:  # fully integer unless tfmot left layers float
            figures["float_ops"] = len(tflite_census(data)["float_ops"])
        if failure:
            return Result(fmt.key, None, False, figures, f"{fmt.key}: {failure}", failure)
        final = out / fmt.filename
        for name, text in (sources or {}).items():  # the C sources first: a file that is there has its sources
            atomic_write_text(out / name, text)
        os.replace(tmp, final)
    except OSError as exc:
        raise write_error(out / fmt.filename, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    calibrated = fmt.calibrated and (
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
                   "sha256": src.model_sha256, **origin(src)},
        "calibration": ({"samples": samples, "split": "train", "seed": SPLIT_SEED,
                         "method": settings.method if fmt.backend == "onnx" else
                         f"{tool['tool']} {tool['recipe']}" if tool else "tflite-minmax"}
                        if calibrated else None),
        "opset": opset_of(data) if fmt.backend == "onnx" else None,
        **(record or {}),
        "verification": {**figures, "passed": True, "runtime": fmt.runtime},
        # the file in bare LiteRT (default options) or a default onnxruntime session; passed false: it needs
        # EdgeKit's runtime on the device (a sparse file: runtime.artifacts.manifest.needs_edgekit)
        "bare": bare,
        "versions": library_versions(), "created": utc_now(),
    }
    atomic_write_json(out / fmt.sidecar, sidecar)
    figures["bare"] = bare
    return Result(fmt.key, final, True, figures)


def origin(src: Source) -> dict:
    """What a sidecar and the manifest record of an ONNX source: its producer and opset, how it was upgraded."""
    if src.kind == "tflite":
        return {"producer": src.model.producer(), "layout": src.layout}
    if src.kind == "torch":  # the program takes (1, C, H, W); its files NHWC (to_channel_last_io) unless --layout nchw
        return {"producer": src.model.producer(), "layout": src.layout, "program_layout": "nchw",
                "program_input": list(src.model.shape)}
    if src.kind != "onnx":
        return {}
    return {"producer": src.model.producer(), "opset": src.model.opset(), "layout": src.layout,
            "external_data": src.model.data_files}


def opset_of(data: bytes) -> int:
    """The ONNX file's default-domain opset, as it was written."""
    import onnx

    return next((o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx")), 0)


def record_exports(out: Path, src: Source, results: list[Result]) -> None:
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
            manifest["source"] = {"file": src.path.name, "sha256": src.model_sha256, **origin(src)}
            manifest["layout"] = src.layout
        if (out / MANIFEST).is_file():
            manifest = {**manifest, **{k: v for k, v in read_manifest(out).items() if k in ("exports", "files")}}
    exports = dict(manifest.get("exports", {}))
    for result in results:
        exports[result.format] = {"file": str(result.file.name) if result.file else None, "passed": result.passed,
                                  "message": result.message, **result.figures, "failed_rule": result.rule}
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
