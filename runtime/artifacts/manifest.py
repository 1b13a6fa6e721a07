"""Artifacts: the manifest and sidecar schema, the file names, and the integrity check.

Every stage writes an artifact directory with a `manifest.json` (see ../shared/DESIGN.md,
"Artifacts"): what it is, where it came from, how well it does, and `files`, the sha256 and
size of every file it owns. Every exported model has a sidecar `model.<variant>.json`. Both
are untrusted input, and this module is the one place that reads them:

- `read_manifest` checks the schema (required keys, types, every file name a plain name);
- `verify_artifact` checks every file it lists against its size and sha256 before anything
  reads it or derives from it (ArtifactError, exit 1, naming each problem);
- `artifact_file` resolves a name an artifact gives to a regular file inside the artifact
  (no absolute path, no `..`, no symlink that leaves the directory);
- `read_sidecar` validates a sidecar field by field, and checks its sha256 against the manifest
  beside it when there is one;
- `export_problem` says whether an exported file is still the one its artifact's model made.

It is TensorFlow-free: the runtime, the pipeline and the report use the same rules.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
from importlib import metadata
from pathlib import Path

from runtime.artifacts.preprocessing import Preprocessing
from runtime.errors import ArtifactError, EdgeKitError
from runtime.fsutil import atomic_write_json, check_readable_file, sha256_file
from runtime.limits import json_loads
from runtime.vocabulary import QUANTIZATION_AWARE

MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"  # trained, pruned and clustered artifacts
QAT_WEIGHTS_FILE = "model.weights.h5"  # qat, pqat, cqat: the quantization-aware weights ...
BASE_FILE = "base.keras"  # ... and the float model QAT was applied to
SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "name", "kind", "model", "dataset", "parent", "created", "versions",
    "preprocessing", "labels", "input_shape", "metrics", "files",
)
# Libraries whose versions decide what an artifact contains; absent ones are skipped.
TRACKED_LIBRARIES = (
    "edgekit-ml", "numpy", "tensorflow", "tf-keras", "tensorflow-model-optimization",
    "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "Pillow", "scikit-learn",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64")


def library_versions() -> dict[str, str]:
    """Installed versions of the tracked libraries, read from package metadata (no imports)."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def plain_name(name, what: str, where) -> str:
    """A file name an artifact gives must be a plain name inside its directory."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ArtifactError(f"{where} names {what} {name!r}; expected a plain file name inside the artifact "
                            "directory (no path, no '..'). The artifact was tampered with; re-create it.")
    return name


def artifact_file(directory: str | Path, name, what: str = "file") -> Path:
    """The path of a file an artifact names: a plain name, and (symlinks resolved) inside the directory."""
    directory = Path(directory)
    plain_name(name, what, directory / MANIFEST)
    path = directory / name
    try:
        inside = path.resolve(strict=False).is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise ArtifactError(f"{path} is a symbolic link that leaves the artifact directory {directory}; an "
                            "artifact's files must be inside it. Re-create the artifact.")
    return path


# --- manifests ----------------------------------------------------------------------------------
def write_manifest(directory: str | Path, manifest: dict, files: list[str], known: dict | None = None) -> dict:
    """Complete and write the manifest atomically, with the sha256 and size of `files` (names in `directory`).

    `known`: entries already checked in this run (name -> {"sha256", "bytes"}), kept instead of hashing the
    file again, so that a file changed behind our back is never blessed with a new checksum.
    """
    directory = Path(directory)
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("created", utc_now())
    manifest.setdefault("versions", library_versions())
    known = known or {}
    manifest["files"] = {name: known[name] if name in known else file_entry(directory / name) for name in files}
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:  # a programming error in a stage, not a user mistake
        raise ValueError(f"manifest lacks required keys: {missing}")
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _damaged(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path} {what}; re-create the artifact with the stage that wrote it.")


def read_manifest(directory: str | Path) -> dict:
    """Read an artifact's manifest and check its schema; a clear error if it is not an artifact."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        if not directory.exists():
            raise EdgeKitError(f"{directory} does not exist; expected an EdgeKit artifact directory "
                               f"(one holding {MANIFEST}), such as the --out of `python -m train`.")
        raise EdgeKitError(
            f"{directory} is not a directory; expected an EdgeKit artifact directory "
            f"(one holding {MANIFEST}), such as the --out of `python -m train`."
        )
    if not path.exists() and not path.is_symlink():
        raise EdgeKitError(
            f"{directory} holds no {MANIFEST}; expected an EdgeKit artifact directory. "
            "Was the run that writes it interrupted? Run that stage again."
        )
    check_readable_file(artifact_file(directory, MANIFEST, "the manifest"), "manifest")
    try:
        manifest = json_loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"is not valid JSON ({exc})") from None
    except OSError as exc:
        raise EdgeKitError(f"cannot read {path}: {exc.strerror}.") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"holds a {type(manifest).__name__}; expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise _damaged(path, f"lacks required keys {missing}")
    _check_schema(manifest, path)
    return manifest


def _check_schema(manifest: dict, path: Path) -> None:
    """The fields every command relies on, by type; a wrong one would become a traceback later."""
    def expect(ok: bool, what: str):
        if not ok:
            raise _damaged(path, what)

    for key in ("name", "kind", "model"):
        expect(isinstance(manifest[key], str) and manifest[key], f"has a {key!r} that is not a non-empty string")
    files = manifest["files"]
    expect(isinstance(files, dict), "has 'files' that is not an object")
    for name, entry in files.items():
        plain_name(name, "a file", path)
        expect(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
               and _SHA256.fullmatch(entry["sha256"]) is not None
               and type(entry.get("bytes")) is int and entry["bytes"] >= 0,
               f"records {name!r} without a valid sha256 and byte count")
    for key in ("model_file", "base_file"):
        if key in manifest:
            plain_name(manifest[key], f"its {key}", path)
            expect(manifest[key] in files, f"names {key} {manifest[key]!r}, which its 'files' does not list")
    labels = manifest["labels"]
    expect(isinstance(labels, list) and labels and all(isinstance(v, str) for v in labels),
           "has 'labels' that are not a list of strings")
    shape = manifest["input_shape"]
    expect(isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape),
           "has an 'input_shape' that is not three positive integers")
    expect(isinstance(manifest["preprocessing"], dict), "has 'preprocessing' that is not an object")
    expect(isinstance(manifest["metrics"], dict), "has 'metrics' that is not an object")
    expect(manifest["parent"] is None or isinstance(manifest["parent"], dict), "has a 'parent' that is not an object")
    expect(isinstance(manifest["dataset"], (dict, str)), "has a 'dataset' that is neither an object nor a name")
    exports = manifest.get("exports", {})
    expect(isinstance(exports, dict) and all(isinstance(e, dict) for e in exports.values()),
           "has 'exports' that are not objects")
    for entry in exports.values():
        if entry.get("file") is not None:
            plain_name(entry["file"], "an exported file", path)


def verify_files(directory: str | Path, manifest: dict | None = None, names=None) -> list[str]:
    """Problems with the files a manifest lists (missing, wrong size or checksum); [] if intact.

    `names`: check only these (default: every file the manifest lists). The size is compared
    first, so a truncated or swapped file is caught without reading it.
    """
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    problems = []
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        try:
            path = artifact_file(directory, name)
        except ArtifactError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{name}: missing" if not path.exists() else f"{name}: not a regular file")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size:,} bytes, manifest says {entry['bytes']:,} (changed or truncated)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    return problems


def verify_artifact(directory: str | Path, manifest: dict | None = None, names=None) -> dict:
    """The manifest, once every file it lists (or `names`) matches its size and sha256; else ArtifactError."""
    manifest = manifest if manifest is not None else read_manifest(directory)
    problems = verify_files(directory, manifest, names)
    if problems:
        raise ArtifactError(f"{directory} is damaged: {'; '.join(problems)}. Nothing was written; re-create it "
                            "with the stage that wrote it.")
    return manifest


def exported_names(manifest: dict) -> set[str]:
    """The exported model files and their sidecars that a manifest lists."""
    return {name for entry in manifest.get("exports", {}).values() if entry.get("file")
            for name in (entry["file"], sidecar_name(entry["file"]))}


def core_names(manifest: dict) -> set[str]:
    """What the artifact is made of, apart from its exports: the model, its plots, its base model."""
    return set(manifest["files"]) - exported_names(manifest)


def model_file(directory: str | Path, manifest: dict) -> Path:
    """The artifact's Keras model file (or QAT weights), checked to be a plain name inside it."""
    name = manifest.get("model_file", MODEL_FILE)
    if manifest["kind"] in QUANTIZATION_AWARE and "base_file" not in manifest:
        raise _damaged(Path(directory) / MANIFEST, f"is {manifest['kind']} but names no base_file")
    path = artifact_file(directory, name, "its model file")
    if not name.endswith((".keras", ".h5")):
        raise ArtifactError(f"{Path(directory) / MANIFEST} names model file {name!r}; expected a .keras or .h5 "
                            "file. Re-create the artifact.")
    return path


def base_file(directory: str | Path, manifest: dict) -> Path:
    path = artifact_file(directory, manifest.get("base_file", BASE_FILE), "its base model")
    if path.suffix != ".keras":
        raise ArtifactError(f"{Path(directory) / MANIFEST} names base model {path.name!r}; expected a .keras file.")
    return path


def model_sha256(manifest: dict) -> str | None:
    """The sha256 the manifest records for its model file (check it with verify_artifact first); None for an
    artifact that holds no model (the exports of a bare model file)."""
    return manifest["files"].get(manifest.get("model_file", MODEL_FILE), {}).get("sha256")


def lineage_paths(directory: str | Path, manifest: dict | None = None, limit: int = 64) -> list[Path]:
    """The artifact and every ancestor it records (parent.path, then its parent's ...), resolved."""
    chain, seen = [Path(directory).resolve()], set()
    while manifest is not None and len(chain) < limit:
        parent = (manifest.get("parent") or {}).get("path")
        if not isinstance(parent, str) or parent in seen:
            break
        seen.add(parent)
        chain.append(Path(parent).resolve())
        try:
            manifest = json_loads((Path(parent) / MANIFEST).read_text("utf-8"))
            manifest = manifest if isinstance(manifest, dict) else None
        except (OSError, ValueError):
            manifest = None
    return chain


def check_out_apart(out: str | Path, sources, allow_same: bool = False, flag: str = "--out") -> None:
    """Refuse an output directory equal to, inside or containing a source or any of its ancestors.

    Replacing it would delete what the work reads or derives from (its own lineage).
    """
    out = Path(out).resolve()
    for source in sources:
        source = Path(source).resolve()
        if out == source and allow_same:
            continue
        if out == source or out.is_relative_to(source) or source.is_relative_to(out):
            relation = "is" if out == source else "is inside" if out.is_relative_to(source) else "contains"
            raise EdgeKitError(f"{flag} {out} {relation} {source}, which this command reads from (the source or "
                               f"one of its ancestors); writing there would replace what it derives from. Choose "
                               f"an {flag} outside it.")


# --- sidecars --------------------------------------------------------------------------------------
def sidecar_name(filename: str) -> str:
    """model.int8.tflite -> model.int8.json"""
    return filename[: -len(Path(filename).suffix)] + ".json" if Path(filename).suffix else filename + ".json"


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(sidecar_name(path.name))


def _tensor_problem(record) -> str | None:
    if not isinstance(record, dict):
        return "is not an object"
    shape = record.get("shape")
    if not (isinstance(shape, list) and shape and all(type(d) is int and (d > 0 or d == -1) for d in shape)):
        return f"has shape {shape!r}; expected a list of positive integers (-1 for a dynamic one)"
    if record.get("dtype") not in _DTYPES:
        return f"has dtype {record.get('dtype')!r}; expected one of {', '.join(_DTYPES)}"
    scale, zero_point = record.get("scale", 0.0), record.get("zero_point", 0)
    if type(scale) not in (int, float) or not math.isfinite(scale) or scale < 0:
        return f"has scale {scale!r}; expected a finite number >= 0"
    if type(zero_point) is not int or not -(1 << 31) <= zero_point < (1 << 31):
        return f"has zero_point {zero_point!r}; expected an integer"
    return None


def validate_sidecar(data, path: Path) -> dict:
    """A sidecar's fields by type and range; ArtifactError naming the first bad one."""
    redo = f"Export the model again, or delete {path.name} to run the model without its sidecar."

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"sidecar {path} {what}. {redo}")

    if not isinstance(data, dict):
        raise bad(f"holds a {type(data).__name__}; expected a JSON object")
    if not (isinstance(data.get("sha256"), str) and _SHA256.fullmatch(data["sha256"])):
        raise bad(f"has sha256 {data.get('sha256')!r}; expected the 64 hex digits of the model's sha256")
    if not (type(data.get("size_bytes")) is int and data["size_bytes"] > 0):
        raise bad(f"has size_bytes {data.get('size_bytes')!r}; expected the model's size in bytes")
    for key in ("input", "output"):
        if key in data:
            problem = _tensor_problem(data[key])
            if problem:
                raise bad(f"'{key}' {problem}")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and labels and all(isinstance(v, str) for v in labels)):
        raise bad("has 'labels' that are not a list of strings")
    pre = data.get("preprocessing")
    if pre is not None:
        if not isinstance(pre, dict):
            raise bad("has 'preprocessing' that is not an object")
        try:
            Preprocessing.from_dict(pre)
        except EdgeKitError as exc:
            raise bad(f"has unusable preprocessing ({exc})") from None
    for key in ("format", "file"):
        if key in data and not isinstance(data[key], str):
            raise bad(f"has a {key!r} that is not a string")
    bare = data.get("bare")
    if bare is not None and not (isinstance(bare, dict) and isinstance(bare.get("passed"), bool)
                                 and isinstance(bare.get("runtime", ""), str)
                                 and (bare.get("reason") is None or isinstance(bare["reason"], str))):
        raise bad("has a 'bare' record that is not {runtime, passed, reason}")
    stats = data.get("input_statistics")
    if stats is not None:
        records = [stats.get(key) for key in ("mean_intensity", "background") if key in stats or
                   key == "mean_intensity"] if isinstance(stats, dict) else [None]
        if not all(isinstance(record, dict) and all(
                type(record.get(k)) in (int, float) and math.isfinite(record[k]) and 0 <= record[k] <= 1
                for k in ("mean", "std", "p01", "p99")) for record in records):
            raise bad("has 'input_statistics' that are not mean, std, p01 and p99 intensities between 0 and 1")
    return data


# what runs a file on the device (`--runtime` of report and pipeline): the user's own LiteRT or onnxruntime app, or
# EdgeKit's runtime, which alone runs a file that `needs_edgekit`
DEVICE_RUNTIMES = {"litert": "the user's own LiteRT or onnxruntime app (default): every file recommended runs there",
                   "edgekit": "EdgeKit's runtime is installed on the device: files that need it (sparse) may be "
                              "recommended"}


def needs_edgekit(sidecar: dict | None) -> str | None:
    """Why a file needs EdgeKit's runtime on the device (bare LiteRT or onnxruntime refused it at export, or its
    weights are sparse-encoded, which bare LiteRT's XNNPACK refuses), or None when it runs in the user's own
    runtime. The one answer export, info, the report and the recommendation give."""
    if not sidecar:
        return None
    bare = sidecar.get("bare")
    if isinstance(bare, dict) and bare.get("passed") is False:
        return str(bare.get("reason") or "bare LiteRT refused it at export")[:300]
    if sidecar.get("sparse_encoding"):
        return "its weights are sparse-encoded, which bare LiteRT's XNNPACK refuses (EdgeKit's runtime densifies them)"
    return None


def read_sidecar(model: str | Path, manifest: dict | None = None) -> dict | None:
    """The validated sidecar of a model file, or None when it has none.

    When the artifact's manifest.json is beside the model (`manifest`, read from there when not given)
    and lists the sidecar, the sidecar must match the sha256 recorded there (one edited after export is
    refused).
    """
    model = Path(model)
    path = sidecar_path(model)
    if not path.exists() and not path.is_symlink():
        return None
    check_readable_file(path, "sidecar")
    raw = path.read_bytes()
    manifest_path = model.parent / MANIFEST
    if manifest is None and manifest_path.is_file():
        manifest = read_manifest(model.parent)
    if manifest is not None:
        entry = manifest["files"].get(path.name)
        if entry is not None:
            if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
                raise ArtifactError(f"sidecar {path} does not match the sha256 that {manifest_path} records for "
                                    "it: it was changed after export. Export the model again.")
    try:
        data = json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"sidecar {path} is not valid JSON ({exc}); export the model again.") from None
    return validate_sidecar(data, path)


def export_problem(directory: Path, manifest: dict, key: str, filename: str, model_sha: str | None = None) -> str:
    """Why the export `key` of an artifact is not usable ('' when it is): it must have passed its check,
    be listed with its sidecar, match both checksums, and have been made from the current model."""
    entry = manifest.get("exports", {}).get(key)
    names = (filename, sidecar_name(filename))
    if not entry:
        return f"{key} was never exported"
    if not entry.get("passed"):
        return f"export check failed: {entry.get('message')}"
    if not set(names) <= set(manifest["files"]):
        return f"{filename} or its sidecar is not listed in the manifest; export again"
    problems = verify_files(directory, manifest, names)
    if problems:
        return "; ".join(problems) + "; export again"
    if model_sha is not None:
        try:
            sidecar = json_loads((directory / names[1]).read_text("utf-8"))
        except (OSError, ValueError):
            return f"{names[1]} is unreadable; export again"
        if not isinstance(sidecar, dict) or (sidecar.get("source") or {}).get("sha256") != model_sha:
            return f"{filename} was made from another version of the model; export again"
    return ""
