"""`manifest.json`: what an artifact directory is, where it came from, how well it does.

Every stage writes one (see ../shared/DESIGN.md, "Artifacts"). The required keys
below are checked on read; stages add their own sections (`training`, `recipe`,
`exports`, ...). `files` maps every file the artifact owns to its sha256 and size,
so a later stage or a resumed pipeline can tell a complete artifact from a broken one.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

from runtime.errors import EdgeKitError
from runtime.fsutil import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "name", "kind", "model", "dataset", "parent", "created", "versions",
    "preprocessing", "labels", "input_shape", "metrics", "files",
)
# Libraries whose versions decide what an artifact contains; absent ones are skipped.
TRACKED_LIBRARIES = (
    "edgekit", "numpy", "tensorflow", "tf-keras", "tensorflow-model-optimization",
    "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "Pillow", "scikit-learn",
)


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


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: str | Path, manifest: dict, files: list[str]) -> dict:
    """Hash `files` (names inside `directory`), complete and write the manifest atomically."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("created", utc_now())
    manifest.setdefault("versions", library_versions())
    manifest["files"] = {name: file_entry(directory / name) for name in files}
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:  # a programming error in a stage, not a user mistake
        raise ValueError(f"manifest lacks required keys: {missing}")
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """Read and check an artifact's manifest; a clear error if it is not an artifact."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise EdgeKitError(
            f"{directory} is not a directory; expected an EdgeKit artifact directory "
            f"(one holding {MANIFEST}), such as the --out of `python -m train`."
        )
    if not path.is_file():
        raise EdgeKitError(
            f"{directory} holds no {MANIFEST}; expected an EdgeKit artifact directory. "
            "Was the run that writes it interrupted? Run that stage again."
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeKitError(f"{path} is not valid JSON ({exc}); re-create the artifact.") from None
    if not isinstance(manifest, dict):
        raise EdgeKitError(f"{path} holds a {type(manifest).__name__}; expected a JSON object.")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise EdgeKitError(f"{path} lacks required keys {missing}; re-create the artifact.")
    return manifest


def verify_files(directory: str | Path, manifest: dict | None = None) -> list[str]:
    """Problems with the files a manifest lists (missing, wrong size or checksum); [] if intact."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    problems = []
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    return problems
