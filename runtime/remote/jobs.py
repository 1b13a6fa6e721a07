"""The three jobs a device runs for the host (`python -m runtime.remote bench|classes|rounds SPEC`, each in a
fresh process the agent starts), and the host's side of each: what it sends, and the rows it rebuilds from
what comes back (every figure checked, every text escaped).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from runtime.bench import bench, check_budget, check_loadable, compare, machine, measure_rounds, model_files
from runtime.errors import EdgeKitError, run_cli
from runtime.limits import json_loads
from runtime.load import finite, load
from runtime.remote.device import (MAX_TEXT, MS, ROW_FIGURES, ROW_TEXT, STAT_FIGURES, DeviceError, add_device,
                                   device_text, figure)
from runtime.remote.session import Session, Target, remote_names, remote_path
from runtime.text import terminal

UPLOADS_ENV = "EDGEKIT_UPLOADS"  # where a job finds them


def checked_rows(results, back: dict[str, Path], where: str) -> list[dict]:
    """A device's bench rows rebuilt from what EdgeKit reads: every figure of its type and range, every text cut
    and escaped, each row's model its file here (`back`: the name it was sent under -> the local path)."""
    bad = DeviceError(f"{terminal(where)} sent bench rows EdgeKit does not read; is its EdgeKit the host's?")
    if not isinstance(results, list) or len(results) > 10**5:
        raise bad
    rows = []
    for row in results:
        if not isinstance(row, dict) or not isinstance(row.get("model"), str) or row["model"] not in back:
            raise bad
        stats = {part: row.get(part) for part in ("invoke_ms", "call_ms")}
        cold = row.get("cold_start")
        if (not all(figure(row.get(k), kind) for k, kind in ROW_FIGURES.items())
                or not all(isinstance(s, dict) and all(figure(s.get(k), kind) for k, kind in STAT_FIGURES.items())
                           and s["median"] > 0 for s in stats.values())
                or not isinstance(cold, dict) or not figure(cold.get("peak_rss_mb"), ROW_FIGURES["peak_rss_mb"])
                or not (cold.get("seconds") is None or figure(cold.get("seconds"), (float, 0.0, 1e5)))):
            raise bad
        local = back[row["model"]]
        rows.append({**{k: row[k] for k in ROW_FIGURES}, **{k: device_text(row.get(k)) for k in ROW_TEXT},
                     **{part: {k: s[k] for k in STAT_FIGURES} for part, s in stats.items()},
                     "cold_start": {"seconds": cold.get("seconds"), "peak_rss_mb": cold["peak_rss_mb"]},
                     "model": str(local), "name": local.name, "remote_model": device_text(row["model"], MAX_TEXT)})
    return rows


def bench_on(target: Target, paths, threads_text: str, batch: int = 1, runs=None, seconds=None, warmup: int = 10,
             inputs: str = "pixels", options: dict | None = None, progress=None) -> tuple[list[dict], dict]:
    """`runtime.bench.bench` on the device: (rows as a local bench's, the device's hello), each row naming it."""

    runs, seconds = check_budget(runs, seconds, batch, warmup)
    files = model_files(paths)
    options = check_loadable(files, options)
    with Session(target, progress) as session:
        threads = session.threads(threads_text)
        names = remote_names(files)
        session.send(names)
        spec = {"paths": [remote_path(names, f) for f in files], "threads": threads, "batch": batch, "runs": runs,
                "seconds": seconds, "warmup": warmup, "inputs": inputs, "options": options}
        budget = len(files) * len(threads) * (120 + (seconds or runs * 0.5))
        data = session.run_json("bench", spec, "bench", 300 + budget)
        info = session.info
    back = {remote_path(names, f): f for f in files}
    rows = checked_rows(data.get("results") if isinstance(data, dict) else None, back, target.name)
    return add_device(compare(rows), info, target.name), info


def classes_on(target: Target, model_path: Path, x, threads: int | None, options: dict, batch_size: int,
               num_classes: int, progress=None) -> tuple[list[int], dict]:
    """The device's predicted class for every image in `x` (sent once, as an .npz checked by sha256), and its
    hello."""

    with tempfile.TemporaryDirectory(prefix="edgekit-split-") as tmp:
        split = Path(tmp) / "split.npz"
        np.savez(split, x=x)
        with Session(target, progress) as session:
            if threads is not None:
                session.threads(str(threads))
            names = remote_names([model_path])
            names["split.npz"] = split
            session.send(names)
            spec = {"model": remote_path(names, model_path), "data": "split.npz", "threads": threads,
                    "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                                if v is not None and k != "labels"}, "batch_size": batch_size}
            data = session.run_json("classes", spec, "eval", 600 + len(x) * 0.1)
            info = session.info
    predicted = data.get("predicted") if isinstance(data, dict) else None
    if (not isinstance(predicted, list) or len(predicted) != len(x)
            or not all(type(v) is int and 0 <= v < num_classes for v in predicted)):
        raise DeviceError(f"{terminal(target.name)} sent predictions EdgeKit does not read (expected {len(x)} class indices "
                          f"below {num_classes}).")
    return predicted, info


class Rounds:
    """The report's latency rounds on a device: one session, the files sent once (when first measured), then
    the device's rounds job per thread count; called as `runtime.bench.run_rounds_worker`."""

    def __init__(self, session: Session):
        self.session, self.names = session, None

    @property
    def identity(self) -> dict:
        """What a cached figure must have been measured on."""
        return {k: self.session.info.get(k) for k in ("machine", "cpu", "board", "cores", "edgekit")} | {
            "host": self.session.target.name}

    def __call__(self, paths: list[Path], threads: int, rounds: int, runs, seconds, warmup: int = 10) -> dict:
        if self.names is None:
            self.names = remote_names(paths)
            self.session.send(self.names)
        spec = {"paths": [remote_path(self.names, p) for p in paths], "threads": threads, "rounds": rounds,
                "runs": runs, "seconds": seconds, "warmup": warmup}
        expected = len(paths) * (seconds or rounds * runs * 0.05)
        data = self.session.run_json("rounds", spec, "the latency rounds", 600 + 20 * expected + 30 * len(paths))
        back = {remote_path(self.names, p): str(p) for p in paths}
        bad = DeviceError(f"{terminal(self.session.target.name)} sent latency rounds EdgeKit does not read.")
        if not isinstance(data, dict) or set(data) - set(back):
            raise bad
        results = {}
        for name, result in data.items():
            if not isinstance(result, dict):
                raise bad
            medians = result.get("round_medians_ms")
            if "error" in result:
                results[back[name]] = {"error": device_text(result["error"], MAX_TEXT)}
            elif (isinstance(medians, list) and 0 < len(medians) <= 10**4
                  and all(figure(m, MS) and m > 0 for m in medians)
                  and figure(result.get("p90_ms"), MS) and figure(result.get("n"), STAT_FIGURES["n"])):
                results[back[name]] = {"round_medians_ms": medians, "p90_ms": result["p90_ms"], "n": result["n"]}
            else:
                raise bad
        return results


def uploaded(name) -> str:
    """The path of a file the host sent, by the name it sent it under: a relative name inside the agent's
    uploads directory (EDGEKIT_UPLOADS), never a path elsewhere on the device."""
    base = Path(os.environ.get(UPLOADS_ENV, "."))
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
        raise EdgeKitError(f"a job names {str(name)[:100]!r}; expected the name of a file the host sent.")
    return str(base / name)


def _classes(spec: dict) -> dict:
    """The device's side of `eval --host`: the predicted class of every image in an .npz."""

    model = load(uploaded(spec["model"]), threads=spec.get("threads"), **(spec.get("options") or {}))
    with np.load(uploaded(spec["data"]), allow_pickle=False) as data:
        x = data["x"]
    predicted = finite(model.logits(x, batch_size=int(spec.get("batch_size") or 256)), model).argmax(axis=1)
    return {"predicted": predicted.astype(int).tolist()}


def _bench(spec: dict) -> dict:
    """The device's side of `bench --host`: `runtime.bench.bench`, its progress on stderr for the host to show;
    each row's model the name the host sent it under."""

    paths = {uploaded(name): name for name in spec["paths"]}
    results = bench(list(paths), spec["threads"], spec["batch"], spec["runs"], spec["seconds"], spec["warmup"],
                    progress=lambda m: print(m, file=sys.stderr, flush=True), inputs=spec["inputs"],
                    options=spec["options"])
    for row in results:
        row["model"], row["baseline"] = paths.get(row["model"], row["model"]), paths.get(row["baseline"])
    return {"machine": machine(), "results": results}


def _rounds(spec: dict) -> dict:
    """The device's side of the report's latency rounds (`runtime.bench.measure_rounds`, in this fresh process),
    keyed by the names the host sent."""

    paths = {uploaded(name): name for name in spec["paths"]}
    results = measure_rounds(list(paths), spec["threads"], spec["rounds"], spec["runs"], spec["seconds"],
                             spec["warmup"])
    return {paths[path]: result for path, result in results.items()}


DEVICE_JOBS = {"bench": _bench, "classes": _classes, "rounds": _rounds}


def job(name: str, spec_text: str) -> int:
    """`python -m runtime.remote bench|classes|rounds SPEC`: one job of the agent, its result as one JSON line."""

    def main(_argv):
        try:
            spec = json_loads(spec_text)
            result = DEVICE_JOBS[name](spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgeKitError(f"the job's spec is not EdgeKit's ({type(exc).__name__}: {str(exc)[:200]}).") from exc
        print(json.dumps(result))
        return 0

    return run_cli(main, [])
