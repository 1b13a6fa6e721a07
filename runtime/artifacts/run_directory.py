"""A pipeline's run directory (pipeline.json, one artifact per variant, the report) as a model argument: `predict`,
`eval` and `bench` take the file the report recommends, `bench --all` every exported file; `info` describes it.

    python -m runtime eval runs/fashion_cnn-digits            # the recommended file
    python -m runtime bench runs/fashion_cnn-digits --all     # every file, the float baseline first

report.json is untrusted like every file: the recommended file must be a plain relative path to a file inside
the run directory.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ArtifactError, EdgeKitError
from runtime.limits import json_loads

PLAN = "pipeline.json"
REPORT = "report.json"


def is_run_directory(path) -> bool:
    return Path(path).is_dir() and (Path(path) / PLAN).is_file()


def _report(directory: Path) -> dict:
    path = directory / REPORT
    if not path.is_file():
        raise EdgeKitError(f"{directory} is a pipeline run directory without a report yet; make it with: "
                           f"python -m runtime report {directory}")
    try:
        report = json_loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is damaged ({exc}); make it again with: python -m runtime report "
                            f"{directory}") from None
    if not isinstance(report, dict):
        raise ArtifactError(f"{path} is not a report; make it again with: python -m runtime report {directory}")
    return report


def _inside(directory: Path, name, what: str) -> Path:
    """A file the report names: a plain relative path inside the run directory, to a file that is there."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ArtifactError(f"{directory / REPORT} names {what} {str(name)[:100]!r}, not a file inside the run "
                            f"directory; make the report again: python -m runtime report {directory}")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()) or not path.is_file():
        raise ArtifactError(f"{directory / REPORT} names {what} {name!r}, which is not in {directory}; make the "
                            f"report again: python -m runtime report {directory}")
    return path


def recommended(directory) -> Path:
    """The file the report recommends for its own objective (its first recommendation with a choice)."""
    directory = Path(directory)
    report = _report(directory)
    recommendations = report.get("recommendations") if isinstance(report.get("recommendations"), list) else []
    objective = str(report.get("objective") or "size")

    def answers(rec: dict) -> bool:  # "latency" is answered by latency_1t (then latency_all): the report's order
        return rec.get("objective") == objective or str(rec.get("objective")).startswith(objective + "_")

    ranked = sorted((r for r in recommendations if isinstance(r, dict) and isinstance(r.get("choice"), dict)),
                    key=lambda r: not answers(r))
    if not ranked:
        raise EdgeKitError(f"the report of {directory} recommends no file (none within its budget); see "
                           f"{directory / 'report.md'}, or name a file: python -m runtime bench {directory} --all")
    return _inside(directory, ranked[0]["choice"].get("file"), "the recommended file")


def every_file(directory) -> list[Path]:
    """Every verified file the report lists, in its order (the float baseline first)."""
    directory = Path(directory)
    rows = _report(directory).get("rows")
    files = [_inside(directory, r.get("file"), "a file") for r in (rows if isinstance(rows, list) else [])
             if isinstance(r, dict) and r.get("status") == "verified"]
    if not files:
        raise EdgeKitError(f"the report of {directory} lists no verified file; run the pipeline again: "
                           f"python -m pipeline --out {directory}")
    return files
