"""Latency, throughput and memory of .tflite and .onnx models, each in a fresh process.

Every (model, thread count) pair is measured in its own Python process, so load
time, first-inference time and peak RSS are those of a cold start, not of a
process that already holds other models. Inside it, calls of the bare backend
invoke (interpreter.invoke / session.run with the input already set) alternate
with calls of the whole `Model.predict` (checks, quantization, copy in and out,
dequantization, softmax), so the runtime's own overhead shows as the gap between
the two under the same conditions.

    python -m runtime bench model.float32.tflite model.int8.tflite --threads 1,2

`python -m runtime.bench '<json>'` is the worker; it prints one JSON object.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.artifacts.manifest import library_versions
from runtime.backends.raw import load_raw
from runtime.errors import EdgeKitError, WorkFailed
from runtime.limits import cores, threads, whole
from runtime.load import BACKENDS, NotAClassifier, load
from runtime.remote.device import board, cpu_name, describe
from runtime.text import spreadsheet
from runtime.vocabulary import format_of, format_rank

DEFAULT_SECONDS = 2.0
DEFAULT_WARMUP = 10
REWARM_SECONDS = 0.005  # untimed calls of a model before its turn in each round of `measure_rounds`


MAX_SECONDS = 3600


def check_seconds(value, flag: str = "--seconds") -> float:
    """A benchmark time budget: finite, above 0, at most an hour (nan and inf would never end)."""
    if not (type(value) in (int, float) and math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise EdgeKitError(f"{flag} must be a number of seconds above 0 and at most {MAX_SECONDS}; got {value!r}.")
    return float(value)


def model_files(paths) -> list[Path]:
    """Model files named on the command line; a directory gives its exported models, float32 first."""

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted((p for p in path.iterdir() if p.suffix in BACKENDS and not p.name.startswith(".")),
                           key=lambda p: (format_rank(format_of(p)), p.name))
            if not found:
                raise EdgeKitError(f"{path} holds no .tflite or .onnx file; export the artifact first "
                                   f"(python -m export --all {path}).")
            files.extend(found)
        else:
            files.append(path)
    return files


def parse_threads(text: str, available: int | None = None) -> list[int]:
    """'1,2' -> [1, 2]; 'all' is the number of CPU cores: this machine's, or `available` (a device's)."""

    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = (available or cores()) if part == "all" else int(part)
        except ValueError:
            raise EdgeKitError(f"--threads takes thread counts separated by commas, e.g. 1,2 or 1,all; "
                               f"got '{text}'.") from None
        if available:
            whole(value, "--threads", 1, available, f" (the device's cores: {available})")
        else:
            threads(value, "--threads")
        if value not in values:
            values.append(value)
    return values


def stats_ms(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1e3
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "std": float(ms.std()),
            "min": float(ms.min()), "n": int(len(ms))}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, where Linux has it: ru_maxrss survives exec, so it
    would count the memory of the parent the worker was forked from."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass

    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def measure(path: str, threads: int, batch: int = 1, runs: int | None = None, seconds: float | None = None,
            warmup: int = DEFAULT_WARMUP, seed: int = 0, spawned: float | None = None,
            inputs: str = "pixels", options: dict | None = None) -> dict:
    """Measure one model at one thread count in this process (the worker's job).

    `spawned`: the wall-clock time the process was started, so the cold start covers
    Python's own start-up and `import runtime` as well as loading and the first prediction.
    """

    options = dict(options or {})
    shapes = options.pop("shapes", None)
    t0 = time.perf_counter()
    try:
        model = load(path, threads=threads, **options)
    except NotAClassifier:  # any other model: its own inputs, every output
        return _measure_raw(path, threads, shapes, runs, seconds, warmup, seed, spawned)
    load_s = time.perf_counter() - t0
    x = _input(model, batch, seed, inputs)
    t0 = time.perf_counter()
    model.predict(x)
    first_s = time.perf_counter() - t0
    cold = {"seconds": time.time() - spawned if spawned else None, "peak_rss_mb": _peak_rss_mb()}
    for _ in range(warmup):
        model.predict(x)
    invoke, call = _alternate(model.invoker(x), lambda: model.predict(x), runs, seconds)
    return {
        "model": str(path), "name": Path(path).name, "backend": model.backend,
        "format": model.format, "size_bytes": model.size_bytes,
        "input_dtype": model.input.dtype, "inputs": "float" if x.dtype != np.uint8 else "pixels",
        "threads": threads, "batch": batch, "warmup": warmup,
        "load_ms": load_s * 1e3, "first_ms": first_s * 1e3,
        "invoke_ms": invoke, "call_ms": call,
        "overhead": call["median"] / invoke["median"] - 1.0,
        **_throughput(batch, call), "peak_rss_mb": _peak_rss_mb(), "cold_start": cold,
        # whether one image's 8-bit pre- and post-processing ran compiled (runtime/backends/kernels.c) or in numpy
        "one_image_path": "compiled" if kernels_built() else "numpy",
    }


def _alternate(invoke, call, runs: int | None, seconds: float | None) -> tuple[dict, dict]:
    """(stats of the bare `invoke`, stats of the whole `call`) timed alternately, so both see the same machine
    state: `runs` pairs, or pairs for `seconds` (at least 5)."""
    bare, whole = [], []
    deadline = time.perf_counter() + (seconds if runs is None else float("inf"))
    clock = time.perf_counter
    while True:
        t0 = clock()
        invoke()
        t1 = clock()
        call()
        t2 = clock()
        bare.append(t1 - t0)
        whole.append(t2 - t1)
        if (runs is not None and len(bare) >= runs) or (runs is None and t2 >= deadline and len(bare) >= 5):
            return stats_ms(bare), stats_ms(whole)


def _measure_raw(path, threads, shapes, runs, seconds, warmup, seed, spawned) -> dict:
    """`measure` for a model that is not an image classifier (runtime.backends.raw): example inputs of each tensor's dtype
    and shape; invoke is the backend's bare call, call is RawModel.run (checks, and every output copied)."""

    t0 = time.perf_counter()
    model = load_raw(path, threads=threads, shapes=shapes)
    load_s = time.perf_counter() - t0
    feeds = model.example(seed)
    t0 = time.perf_counter()
    model.run(feeds)
    first_s = time.perf_counter() - t0
    cold = {"seconds": time.time() - spawned if spawned else None, "peak_rss_mb": _peak_rss_mb()}
    for _ in range(warmup):
        model.run(feeds)
    invoke_ms, call = _alternate(model.invoker(feeds), lambda: model.run(feeds), runs, seconds)
    batch = model.shapes[model.inputs[0].name][0] if model.inputs and model.shapes[model.inputs[0].name] else 1
    return {
        "model": str(path), "name": Path(path).name, "backend": model.backend, "format": format_of(path) or "raw",
        "size_bytes": model.size_bytes, "input_dtype": ",".join(t.dtype for t in model.inputs), "inputs": "raw",
        "input_shapes": {k: list(v) for k, v in model.shapes.items()}, "outputs": len(model.outputs),
        "threads": threads, "batch": batch, "warmup": warmup, "load_ms": load_s * 1e3, "first_ms": first_s * 1e3,
        "invoke_ms": invoke_ms, "call_ms": call, "overhead": call["median"] / invoke_ms["median"] - 1.0,
        **_throughput(batch, call), "peak_rss_mb": _peak_rss_mb(), "cold_start": cold,
        "one_image_path": "-",
    }


def kernels_built() -> bool:
    """Whether the install built runtime.backends.kernels (the compiled one-image path of runtime/load.py)."""

    return importlib.import_module("runtime.backends.tensors").KERNELS is not None


def _input(model, batch: int, seed: int, inputs: str = "pixels"):
    """What predict is given: uint8 pixels (what a camera gives, preprocessed by predict itself), or float input
    the caller preprocessed already (normal noise for a float model nothing describes: --input float). Pixels for
    a float model without a sidecar or --mean/--std are refused, as predict and eval refuse them."""

    rng = np.random.default_rng(seed)
    h, w, c = model.input_shape
    if model.preprocessing is None:
        if inputs == "pixels":
            raise EdgeKitError(f"{model.unknown_preprocessing()} To time it on float input without them: "
                               "--input float.")
        return rng.standard_normal((batch, h, w, c)).astype(np.float32)
    x = rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
    return model.preprocessing.apply(x) if inputs == "float" else x


def measure_rounds(paths: list[str], threads: int, rounds: int, runs: int | None = None,
                   seconds: float | None = None, warmup: int = DEFAULT_WARMUP, seed: int = 0) -> dict:
    """Latency of several models measured in interleaved rounds in this process (the report's worker).

    Every model is loaded once; then, `rounds` times, each model in turn (in a new shuffled order each
    round, so no file always follows the same one) gets untimed calls to warm its caches again and
    then `runs` timed `predict` calls (or `seconds / rounds` of them). Drift of the machine over the
    run hits every file alike, and each file's per-round medians give an interval for its median.
    Returns {path: {"round_medians_ms", "p90_ms", "n"}} or {path: {"error": message}}.
    """

    models, results = {}, {}
    for i, path in enumerate(paths):
        try:
            model = load(path, threads=threads)
            x = _input(model, 1, seed + i)
            for _ in range(warmup):
                model.predict(x)
            models[path] = (model, x)
        except EdgeKitError as exc:
            results[path] = {"error": str(exc)}
    samples = {path: [] for path in models}
    medians = {path: [] for path in models}
    order, shuffle = list(models), random.Random(seed).shuffle
    per_round = None if runs else seconds / rounds
    clock = time.perf_counter
    for _ in range(rounds):
        shuffle(order)
        for path in order:
            model, x = models[path]
            warm_until = clock() + REWARM_SECONDS  # at least two calls and REWARM_SECONDS: thread pools wake up
            model.predict(x)
            while clock() < warm_until:
                model.predict(x)
            times, deadline = [], clock() + (per_round or 0)
            while True:
                t0 = clock()
                model.predict(x)
                t1 = clock()
                times.append(t1 - t0)
                if (len(times) >= runs) if runs else (t1 >= deadline and len(times) >= 3):
                    break
            medians[path].append(float(np.median(times)) * 1e3)
            samples[path].extend(times)
    for path in models:
        ms = np.asarray(samples[path]) * 1e3
        results[path] = {"round_medians_ms": medians[path], "p90_ms": float(np.percentile(ms, 90)),
                         "n": int(len(ms))}
    return results


def _spawn(spec: dict, what: str, timeout: float) -> dict:
    """Run the worker (`python -m runtime.bench SPEC`) in a fresh process; errors come back as EdgeKitError."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run([sys.executable, "-m", "runtime.bench", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise WorkFailed(f"benchmarking {what} took longer than {timeout:.0f} s; use fewer --runs "
                         "or --seconds.") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise (WorkFailed if done.returncode == 1 else EdgeKitError)(
            f"benchmarking {what} failed: {last.removeprefix('error: ')}")
    return json.loads(lines[-1])


def run_rounds_worker(paths: list[Path], threads: int, rounds: int, runs: int | None, seconds: float | None,
                      warmup: int = DEFAULT_WARMUP) -> dict:
    """`measure_rounds` in a fresh process, with a time limit that grows with the work."""
    spec = {"mode": "rounds", "paths": [str(p) for p in paths], "threads": threads, "rounds": rounds,
            "runs": runs, "seconds": seconds, "warmup": warmup}
    expected = len(paths) * (seconds or rounds * runs * 0.05)
    return _spawn(spec, f"{len(paths)} files at {threads} thread(s)", 300 + 10 * expected)


def run_worker(path: Path, threads: int, batch: int, runs, seconds, warmup, timeout: float = 600,
               inputs: str = "pixels", options: dict | None = None) -> dict:
    """`measure` in a fresh Python process; errors come back as EdgeKitError."""
    spec = {"path": str(path), "threads": threads, "batch": batch, "runs": runs, "inputs": inputs,
            "seconds": seconds, "warmup": warmup, "spawned": time.time(), "options": options or {}}
    return _spawn(spec, str(path), timeout)


def machine() -> dict:
    """The CPU, core count, platform and library versions: what a latency figure was measured on."""

    cpu = platform.processor() or platform.machine()
    try:  # x86: "model name"; arm64: the part number of ARM's core (a Pi 4's Cortex-A72)
        cpu = cpu_name(Path("/proc/cpuinfo").read_text(), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "board": board(),
            "system": platform.platform(), "versions": library_versions()}


def compare(results: list[dict]) -> list[dict]:
    """Add size and speed ratios against the first model (the baseline) at the same thread count."""
    if not results:
        return results
    baseline = results[0]["model"]
    base = {r["threads"]: r for r in results if r["model"] == baseline}
    for r in results:
        ref = base.get(r["threads"])
        r["baseline"] = baseline
        r["size_ratio"] = r["size_bytes"] / ref["size_bytes"] if ref else None
        r["speedup"] = ref["call_ms"]["median"] / r["call_ms"]["median"] if ref else None
    return results


def check_loadable(files: list[Path], options: dict | None) -> dict:
    """Load every file once, to fail fast with the loader's own message before any long measurement; returns the
    options a worker takes (no labels: the bench prints none)."""

    options = {k: v for k, v in (options or {}).items() if v is not None and k != "labels"}
    loadable = {k: v for k, v in options.items() if k != "shapes"}
    for path in files:
        try:
            load(path, **loadable)
        except NotAClassifier:
            load_raw(path, shapes=options.get("shapes"))
    return options


def check_budget(runs, seconds, batch: int, warmup: int):
    """The measuring options of `bench` checked; returns (runs, seconds) with the default time budget."""
    if runs is not None and runs < 1:
        raise EdgeKitError(f"--runs must be 1 or more; got {runs}.")
    if seconds is not None:
        check_seconds(seconds)
    if batch < 1:
        raise EdgeKitError(f"--batch must be 1 or more; got {batch}.")
    if warmup < 0:
        raise EdgeKitError(f"--warmup must be 0 or more; got {warmup}.")
    return runs, (DEFAULT_SECONDS if runs is None and seconds is None else seconds)


def bench(paths, threads=(1,), batch: int = 1, runs: int | None = None, seconds: float | None = None,
          warmup: int = DEFAULT_WARMUP, progress=None, inputs: str = "pixels", options: dict | None = None
          ) -> list[dict]:
    """Benchmark every model at every thread count, each in a fresh process; see the module docstring."""
    runs, seconds = check_budget(runs, seconds, batch, warmup)
    files = model_files(paths)
    options = check_loadable(files, options)
    results, total, started = [], len(files) * len(threads), time.perf_counter()
    for path in files:
        for n in threads:
            if progress:
                progress(f"[{len(results) + 1}/{total}] {path.name}, {n} thread(s), batch {batch} ...")
            result = run_worker(path, n, batch, runs, seconds, warmup, inputs=inputs, options=options)
            results.append(result)
            if progress:
                progress(f"    median {result['call_ms']['median']:.3f} ms per call "
                         f"({result['invoke_ms']['n']} runs; {time.perf_counter() - started:.0f} s so far)")
    return compare(results)


CSV_COLUMNS = ("name", "format", "backend", "size_bytes", "threads", "batch", "load_ms", "first_ms",
               "invoke_median_ms", "invoke_p90_ms", "invoke_p99_ms", "invoke_mean_ms", "invoke_std_ms",
               "call_median_ms", "call_p90_ms", "call_p99_ms", "call_mean_ms", "call_std_ms", "runs",
               "overhead", "throughput_ips", "throughput_p50_ips", "peak_rss_mb", "cold_start_s", "cold_rss_mb",
               "size_ratio", "speedup", "one_image_path", "model", "device")


def flat(result: dict) -> dict:
    row = {k: result.get(k) for k in CSV_COLUMNS}
    for part in ("invoke", "call"):
        for stat in ("median", "p90", "p99", "mean", "std"):
            row[f"{part}_{stat}_ms"] = result[f"{part}_ms"][stat]
    row["runs"] = result["call_ms"]["n"]
    row["cold_start_s"] = result["cold_start"]["seconds"]
    row["cold_rss_mb"] = result["cold_start"]["peak_rss_mb"]
    if result.get("device"):  # measured over SSH (runtime.remote): where, in one cell
        row["device"] = describe(result["device"], result["device"].get("host"))
    return row


def to_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: spreadsheet(v) for k, v in flat(r).items()})
    return buffer.getvalue()


def format_ms(value: float) -> str:
    """Milliseconds for tables: three decimals below 10 ms, one above."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _throughput(batch: int, call: dict) -> dict:
    """Images per second: from the mean call (what a loop sustains, its slow calls included), and from the p50."""
    return {"throughput_ips": batch / (call["mean"] / 1e3), "throughput_p50_ips": batch / (call["median"] / 1e3)}


def _shown_names(paths: list[str]) -> dict[str, str]:
    """Each model's name in the table: its file name, or directory/file name where file names repeat (three
    artifacts' model.int8.tflite)."""
    def repeated(name: str) -> bool:  # by other files, not by the same file at other thread counts
        return len({q for q in paths if Path(q).name == name}) > 1

    return {p: str(Path(Path(p).parent.name) / Path(p).name) if repeated(Path(p).name) else Path(p).name
            for p in paths}


def to_table(results: list[dict]) -> str:
    """The table for people: one row per model and thread count."""
    ms = format_ms

    head = ("model", "size", "thr", "load ms", "first ms", "invoke p50", "p90", "p99", "mean±std",
            "call p50", "p90", "overhead", "img/s", "p50 img/s", "RSS MB", "size x", "speed x")
    rows = []
    shown = _shown_names([r["model"] for r in results])
    for r in results:
        inv, call = r["invoke_ms"], r["call_ms"]
        rows.append((
            shown[r["model"]], f"{r['size_bytes'] / 1024:,.0f} KiB", str(r["threads"]), f"{r['load_ms']:.1f}",
            ms(r["first_ms"]), ms(inv["median"]), ms(inv["p90"]), ms(inv["p99"]),
            f"{ms(inv['mean'])}±{ms(inv['std'])}", ms(call["median"]), ms(call["p90"]),
            f"{r['overhead']:+.1%}", f"{r['throughput_ips']:,.0f}", f"{r['throughput_p50_ips']:,.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['size_ratio']:.2f}" if r.get("size_ratio") is not None else "-",
            f"{r['speedup']:.2f}" if r.get("speedup") is not None else "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(v).ljust(wd) if i == 0 else str(v).rjust(wd) for i, (v, wd) in
                       enumerate(zip(row, widths))) for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    batch = results[0]["batch"] if results else 1
    lines.append("")
    lines.append(f"batch {batch}; times in ms. invoke: the backend's bare inference call; call: the whole "
                 "Model.predict (checks, quantize, copy, dequantize, softmax); overhead: call p50 / invoke p50 - 1; img/s: "
                 "batch / mean call (what a loop sustains), p50 img/s: batch / call p50.")
    if any(r.get("inputs") == "raw" for r in results):
        lines.append("raw rows (models that are not image classifiers): fed example inputs of each tensor's dtype "
                     "and shape (input_shapes in --json); call is RawModel.run (checks, every output copied); "
                     "img/s counts the first input's batch.")
    if results and results[0].get("one_image_path") == "numpy":
        lines.append("runtime.backends.kernels is not built (no C compiler or Python headers at install): one image's "
                     "8-bit input and output went through numpy, a few µs slower; same results.")
    if results:
        lines.append(f"size x and speed x are against {Path(results[0]['model']).name} at the same thread "
                     "count (speed x > 1: faster). Each row ran in a fresh process; RSS is its peak.")
        cold = results[0]["cold_start"]
        lines.append(f"cold start of {results[0]['name']}: python start, import runtime, load and first "
                     f"prediction in {cold['seconds']:.2f} s at {cold['peak_rss_mb']:.0f} MB peak RSS.")
    return "\n".join(lines)


def _worker(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        if spec.get("mode") == "rounds":
            print(json.dumps(measure_rounds(spec["paths"], spec["threads"], spec["rounds"], spec["runs"],
                                            spec["seconds"], spec["warmup"])))
            return 0
        result = measure(spec["path"], spec["threads"], spec["batch"], spec["runs"], spec["seconds"],
                         spec["warmup"], spawned=spec.get("spawned"), inputs=spec.get("inputs", "pixels"),
                         options=spec.get("options"))
    except EdgeKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
