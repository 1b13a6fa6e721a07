"""The report's latency: every verified file at each thread count, measured together in interleaved rounds
(`runtime.bench.measure_rounds`, one fresh process per thread count), as the median of the per-round
medians with its distribution-free 95% interval. Results are cached in bench.json under the exact set of
files (by sha256 and format: an int8 file and the micro file with the same bytes run in different runtimes) and
settings, so a rerun over unchanged files measures nothing, and a changed file makes every file be measured
again, together."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from runtime.bench import REWARM_SECONDS, run_rounds_worker
from runtime.errors import EdgeKitError
from runtime.fsutil import atomic_write_json
from runtime.limits import json_loads
from runtime.progress import bar
from runtime.remote.jobs import Rounds
from runtime.report.rows import baseline
from runtime.stats import median_interval

BENCH_CACHE = "bench.json"
ROUNDS = 10  # 10 rounds: the median's 95% interval runs from the 2nd to the 9th smallest round median
CACHE_VERSION = 3  # 3: results keyed by sha256 and format


def _read_cache(path: Path, rebench: bool) -> dict:
    if rebench or not path.is_file():
        return {}
    try:
        data = json_loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a damaged cache is only a cache: measure again
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("runs"), dict):
        return {}
    return data["runs"]


def benchmark(rows: list[dict], root: Path, threads: list[int], seconds: float, runs: int | None = None,
              rounds: int = ROUNDS, rebench: bool = False, progress: bool = False, device=None) -> dict:
    """Latency fields of every verified row at the first and last thread count; returns the settings. `device`: a
    `runtime.remote.session.Session` to measure on (its identity is part of the cache's key)."""
    settings = {"threads": threads, "rounds": rounds, "seconds": None if runs else seconds, "runs": runs,
                "batch": 1, "warmup": 10, "rewarm_s": REWARM_SECONDS, "input": "uint8 pixels"}
    runner = run_rounds_worker
    if device is not None:
        runner = Rounds(device)
        settings["device"] = runner.identity
    todo = [r for r in rows if r["status"] == "verified" and r.get("accuracy") is not None]
    if not todo:
        return settings
    cache_path = root / BENCH_CACHE
    cache = _read_cache(cache_path, rebench)
    shas = sorted({_measured(r) for r in todo})
    for n in bar(threads, len(threads), f"latency ({len(todo)} files x {rounds} rounds)", progress, "thread count"):
        spec = {k: v for k, v in settings.items() if k != "threads"}
        key = hashlib.sha256(json.dumps([shas, n, spec], sort_keys=True).encode()).hexdigest()[:16]
        if key not in cache:
            by_path = runner([Path(r["file"]) for r in todo], n, rounds, runs, None if runs else seconds)
            cache[key] = {_measured(r): by_path[str(Path(r["file"]))] for r in todo}
            atomic_write_json(cache_path, {"version": CACHE_VERSION, "runs": cache})
        for row in todo:
            result = cache[key].get(_measured(row)) or {"error": "not measured"}
            if "error" in result:
                row.update(status="failed", reason=f"benchmark failed: {result['error']}")
                continue
            median, low, high = median_interval(result["round_medians_ms"])
            row.setdefault("_latency", {})[n] = {"median": median, "low": low, "high": high,
                                                 "p90": result["p90_ms"], "n": result["n"]}
    _fields(rows, threads)
    return settings


def _measured(row: dict) -> str:
    """What one measurement is of: the file's bytes in its format's runtime (a micro file runs in TFLM, the int8
    file with the same bytes in LiteRT)."""
    return f"{row['sha256']} {row['format']}"


def _fields(rows: list[dict], threads: list[int]) -> None:
    """latency_{median,low,high,p90}_ms_{1t,all}, speedup and the verdict against the baseline."""
    one, many = threads[0], threads[-1]
    tags = (("1t", one), ("all", many)) if many != one else (("1t", one),)
    base = baseline(rows)
    for row in rows:
        measured = row.get("_latency")
        if not measured or row["status"] != "verified":
            continue
        if many != one:
            row["threads_all"] = many
        for tag, n in tags:
            if n not in measured:
                continue
            m = measured[n]
            row.update({f"latency_median_ms_{tag}": m["median"], f"latency_low_ms_{tag}": m["low"],
                        f"latency_high_ms_{tag}": m["high"], f"latency_p90_ms_{tag}": m["p90"]})
            ref = (base or {}).get("_latency", {}).get(n)
            if ref:
                row[f"speedup_{tag}"] = ref["median"] / m["median"]
                row[f"vs_baseline_{tag}"] = ("faster" if m["high"] < ref["low"] else
                                             "slower" if ref["high"] < m["low"] else "tied")


def check_rounds(value) -> int:
    if type(value) is not int or not 1 <= value <= 1000:
        raise EdgeKitError(f"--rounds must be a whole number from 1 to 1000 (default {ROUNDS}); got {value!r}.")
    return value
