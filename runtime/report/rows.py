"""The report's rows: one per exported file under the directory, checked against its manifest, then
evaluated on its artifact's test split through the TensorFlow-free runtime."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from runtime.artifacts.manifest import MANIFEST, export_problem, model_sha256, needs_edgekit, read_manifest
from runtime.backends.tflm import macs
from runtime.datasets import load_for_manifest
from runtime.errors import ArtifactError, EdgeKitError
from runtime.limits import json_loads
from runtime.load import finite, load
from runtime.progress import bar
from runtime.vocabulary import ALIASES, FILE_FORMATS, format_rank


def artifacts(root: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """(directory, manifest) of the artifacts under `root` (itself, and its sub-directories): the trained
    model first, then the variants in the pipeline's order when root holds its pipeline.json, else by
    lineage and name; and (directory, the reason) of those whose manifest is damaged, which are left out."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))  # not staging dirs
    found = [d for d in [root, *subdirs] if (d / MANIFEST).is_file()]
    if not found:
        raise EdgeKitError(f"{root} holds no artifact (no manifest.json in it or its sub-directories); expected "
                           "the output directory of `python -m pipeline`, or an artifact exported with "
                           "`python -m export`.")
    order = []
    try:
        plan = json_loads((root / "pipeline.json").read_text("utf-8"))["plan"]
        order = [plan["model"], *(f"{plan['model']}-{v}" for v in plan["variants"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a pipeline's directory, or its plan file is damaged: lineage order

    def rank(item):
        d, m = item
        return (m.get("parent") is not None, order.index(d.name) if d.name in order else len(order),
                len(m.get("lineage", [])), d.name)

    read, damaged = [], []
    for d in found:
        try:
            read.append((d, read_manifest(d)))
        except ArtifactError as exc:
            damaged.append((d, str(exc)))
    if not read:
        raise ArtifactError(damaged[0][1])
    return sorted(read, key=rank), damaged


def _variant_name(manifest: dict, base_name: str | None) -> str:
    name = manifest["name"]
    if manifest.get("parent") is None:
        return "base"
    if base_name and name.startswith(base_name + "-"):
        return name[len(base_name) + 1:]
    return name


def shown_name(name) -> str:
    """A variant or format name as the report shows it (terminal, Markdown, plots): letters, digits and
    . _ + - = @ kept, anything else (a manifest's name is untrusted: `# heading`, `<script>`, escapes) as _."""

    return re.sub(r"[^\w.+\-=@]", "_", str(name))[:120] or "_"


def collect(root: Path) -> list[dict]:
    """One row per exported file (verified or failed), before evaluation and benchmarks: every file is checked
    against its manifest and must have been made from the artifact's current model."""

    found, damaged = artifacts(root)
    rows = [{"variant": shown_name(d.name), "format": "-", "artifact": str(d), "kind": None, "model": None, "dataset": None,
             "parent": None, "file": str(d / MANIFEST), "status": "failed", "reason": reason, "damaged": True}
            for d, reason in damaged]  # reported with the others, and the command fails (exit 1)
    base_name = next((m["name"] for _, m in found if m.get("parent") is None), None)
    for d, manifest in found:
        exports = manifest.get("exports", {})
        for key in sorted(exports, key=lambda k: format_rank(ALIASES.get(k, k))):
            record = exports[key]
            file = d / record["file"] if record.get("file") else None
            row = {"variant": shown_name(_variant_name(manifest, base_name)), "format": shown_name(ALIASES.get(key, key)),
                   "artifact": str(d), "kind": manifest["kind"], "model": manifest.get("model"),
                   "dataset": (manifest.get("dataset") or {}).get("name"),
                   "parent": (manifest.get("parent") or {}).get("name"), "file": str(file) if file else None,
                   "status": "verified", "reason": None}
            reference, accuracy = record.get("reference"), record.get("keras_accuracy")
            if isinstance(reference, str) and reference != "Keras" and type(accuracy) is float and \
                    0.0 <= accuracy <= 1.0:  # a model from elsewhere (export's Source.reference); untrusted
                row.update(reference=reference[:80], reference_accuracy=accuracy)
            problem = export_problem(d, manifest, key, record.get("file") or f"<{key}>", model_sha256(manifest))
            if problem:
                row.update(status="failed", reason=problem)
            else:
                row["sha256"] = manifest["files"][record["file"]]["sha256"]  # checked: the key of cached benchmarks
            rows.append(row)
    if len(rows) == len(damaged):
        if damaged:
            raise ArtifactError(damaged[0][1])
        raise EdgeKitError(f"no exported file under {root}; run `python -m export --all` on its artifacts first.")
    return rows


def _dataset_for(artifact: str, cache: dict, data_dir):
    """The artifact's test split, and a key that is equal for artifacts judged on the same images."""

    if artifact not in cache:  # one manifest read per artifact, one dataset load per dataset
        manifest = read_manifest(artifact)
        key = json.dumps([manifest["dataset"], manifest["preprocessing"]], sort_keys=True)
        if key not in cache:
            cache[key] = load_for_manifest(manifest, data_dir)
        cache[artifact] = (cache[key], key)
    return cache[artifact]


def evaluate(rows: list[dict], data_dir=None, progress: bool = False) -> dict:
    """Accuracy of every verified file on its test split. Each row keeps which images it got right
    (`_correct`, for the significance tests), what it answered (`_predicted`) and which test set they are
    (`_images`). Returns the test sets by `_images` key."""

    datasets = {}
    todo = [r for r in rows if r["status"] == "verified"]
    for row in bar(todo, len(todo), "evaluate", progress):
        try:
            model = load(row["file"])
            structure = json.dumps(model.graph(), separators=(",", ":"))  # before a batch resizes the graph
            dataset, key = _dataset_for(row["artifact"], datasets, data_dir)
            predicted = finite(model.logits(dataset.x_test), model).argmax(axis=1)
        except EdgeKitError as exc:
            row.update(status="failed", reason=str(exc))
            continue
        correct = predicted == dataset.y_test
        row.update(test_images=int(len(correct)), correct=int(correct.sum()), accuracy=float(correct.mean()),
                   size_bytes=model.size_bytes, graph=hashlib.sha256(structure.encode()).hexdigest()[:16],
                   _correct=correct, _predicted=predicted, _images=key,
                   gzip_bytes=(model.sidecar or {}).get("gzip_bytes") or _gzip_bytes(Path(row["file"])))
        row.update(_micro_fields(Path(row["file"]), model.sidecar or {}))
        row["needs_edgekit"] = needs_edgekit(model.sidecar)
        # who computed the accuracy: TFLM for a micro file (runtime.load's default, the micro extra), else LiteRT or
        # onnxruntime
        row["evaluated_by"] = {"micro": "tflite-micro", "tflite": "ai-edge-litert"}.get(model.backend, model.backend)
        encoding = (model.sidecar or {}).get("sparse_encoding")
        if isinstance(encoding, dict) and type(encoding.get("dense_bytes")) is int and encoding["dense_bytes"] > 0:
            row["sparse_encoding"] = {"dense_bytes": encoding["dense_bytes"]}

    for row in rows:  # an ONNX file is the same network as its artifact's TFLite files: the same MACs
        if row.get("macs") is None and row["status"] == "verified":
            twin = next((r for r in rows if r["artifact"] == row["artifact"] and r.get("macs") is not None), None)
            if twin is not None:
                row["macs"] = twin["macs"]
    return {key: dataset for key, dataset in datasets.items() if not isinstance(dataset, tuple)}


def _micro_fields(path: Path, sidecar: dict) -> dict:
    """MACs per inference of a TFLite file; a microcontroller file's tensor arena and flash, as its sidecar
    recorded them from TFLM (whole numbers, or nothing: a sidecar is untrusted)."""
    fields = {}
    if path.suffix == ".tflite":
        try:
            fields["macs"] = macs(path.read_bytes())
        except Exception:  # a file LiteRT ran but whose tables this reader cannot walk: no figure, no failure
            pass
    record = sidecar.get("micro") if sidecar.get("format") == "micro" else None
    if isinstance(record, dict) and all(type(record.get(k)) is int and record[k] > 0
                                        for k in ("arena_bytes", "flash_bytes")):
        fields.update(arena_bytes=record["arena_bytes"], flash_bytes=record["flash_bytes"])
    return fields


def _gzip_bytes(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def foreign_sources(rows: list[dict]) -> list[dict]:
    """The models from elsewhere (a PyTorch program, an ONNX or TFLite file) the rows' files were verified against,
    each once: their own accuracy on the test split, as export measured it running the source."""
    found: dict = {}
    for r in rows:
        if r.get("reference"):
            found.setdefault((r["reference"], r.get("model")), {
                "reference": r["reference"], "model": r.get("model"), "accuracy": r["reference_accuracy"],
                "test_images": r.get("test_images")})
    return list(found.values())


def is_float(row: dict) -> bool:
    """A float file (float32, onnx-float32): what quantization is measured against."""
    fmt = FILE_FORMATS.get(row["format"])
    return fmt is not None and fmt.kind == "float"


def baseline(rows: list[dict]) -> dict | None:
    """The trained model's float32 TFLite file, else the first evaluated float file, else the first evaluated."""
    evaluated = [r for r in rows if r["status"] == "verified" and "accuracy" in r]
    for candidates in ([r for r in evaluated if r["variant"] == "base" and r["format"] == "float32"],
                       [r for r in evaluated if is_float(r)], evaluated):
        if candidates:
            return candidates[0]
    return None


def agreement(row: dict, base: dict) -> float | None:
    """Top-1 agreement of two files on the same images."""
    if row.get("_images") is None or row.get("_images") != base.get("_images"):
        return None
    return float(np.mean(row["_predicted"] == base["_predicted"]))


def label(row: dict) -> str:
    return f"{row['variant']} {row['format']}"


def points(value: float) -> str:
    """'1 point', '0.5 points'."""
    return f"{value:g} point" + ("" if value == 1 else "s")
