"""The accuracy-vs-size-vs-latency report, built from artifact directories.

    python -m runtime report artifacts/fashion_cnn-digits

The directory holds one artifact per variant (the trained model and what `optimize`
derived from it), each with the files `export` wrote. Every exported file is
evaluated here, through the TensorFlow-free runtime, on the test split its manifest
names, compared with the float baseline (the trained model's float32 TFLite file),
and benchmarked with `runtime.bench` at 1 thread and at all threads. Benchmarks are
cached in `bench.json` by file checksum, so a rerun measures only what changed.
Writes report.md (with the plots embedded), report.csv, report.json,
accuracy_vs_size.png and accuracy_vs_latency.png.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from runtime.errors import EdgeKitError
from runtime.fsutil import atomic_write_json, atomic_write_text
from runtime.manifest import MANIFEST, library_versions, read_manifest, utc_now

BENCH_CACHE = "bench.json"
NOISE = 0.10  # run-to-run spread of one file's median latency on a shared 2-core machine (measured: 0.385-0.454 ms)
FORMAT_ORDER = ("float32", "float16", "dynamic", "int8", "int16x8", "onnx", "onnx-int8")
CSV_COLUMNS = ("variant", "format", "file", "status", "size_bytes", "gzip_bytes", "size_ratio", "accuracy",
               "accuracy_change", "agreement", "latency_median_ms_1t", "latency_p90_ms_1t", "latency_median_ms_all",
               "latency_p90_ms_all", "threads_all", "speedup_1t", "speedup_all", "pareto_size", "pareto_gzip",
               "pareto_latency", "pareto_latency_all",
               "kind", "parent", "artifact", "reason")


def artifacts(root: Path) -> list[tuple[Path, dict]]:
    """(directory, manifest) of the artifacts under `root` (itself, and its sub-directories): the trained
    model first, then the variants in the pipeline's order when root holds its pipeline.json, else by
    lineage and name."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))  # not staging dirs
    found = [d for d in [root, *subdirs] if (d / MANIFEST).is_file()]
    if not found:
        raise EdgeKitError(f"{root} holds no artifact (no manifest.json in it or its sub-directories); expected "
                           "the output directory of `python -m pipeline`, or an artifact exported with "
                           "`python -m export`.")

    order = []
    try:
        plan = json.loads((root / "pipeline.json").read_text("utf-8"))["plan"]
        order = [plan["model"], *(f"{plan['model']}-{v}" for v in plan["variants"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a pipeline's directory, or its plan file is damaged: lineage order

    def rank(item):
        d, m = item
        return (m.get("parent") is not None, order.index(d.name) if d.name in order else len(order),
                len(m.get("lineage", [])), d.name)

    return sorted(((d, read_manifest(d)) for d in found), key=rank)


def _variant_name(manifest: dict, base_name: str | None) -> str:
    name = manifest["name"]
    if manifest.get("parent") is None:
        return "base"
    if base_name and name.startswith(base_name + "-"):
        return name[len(base_name) + 1:]
    return name


def collect(root: Path) -> list[dict]:
    """One row per exported file (verified or failed), before evaluation and benchmarks: every file is checked
    against its manifest and must have been made from the artifact's current model."""
    from runtime.manifest import export_problem, model_sha256

    rows = []
    found = artifacts(root)
    base_name = next((m["name"] for _, m in found if m.get("parent") is None), None)
    for d, manifest in found:
        exports = manifest.get("exports", {})
        for key in sorted(exports, key=lambda k: FORMAT_ORDER.index(k) if k in FORMAT_ORDER else 99):
            record = exports[key]
            file = d / record["file"] if record.get("file") else None
            row = {"variant": _variant_name(manifest, base_name), "format": key, "artifact": str(d),
                   "kind": manifest["kind"], "parent": (manifest.get("parent") or {}).get("name"),
                   "file": str(file) if file else None, "keras_accuracy": manifest["metrics"].get("accuracy"),
                   "status": "verified", "reason": None}
            problem = export_problem(d, manifest, key, record.get("file") or f"<{key}>", model_sha256(manifest))
            if problem:
                row.update(status="failed", reason=problem)
            else:
                row["sha256"] = manifest["files"][record["file"]]["sha256"]  # checked: the key of cached benchmarks
            rows.append(row)
    if not rows:
        raise EdgeKitError(f"no exported file under {root}; run `python -m export --all` on its artifacts first.")
    return rows


def _dataset_for(artifact: str, cache: dict, data_dir):
    from runtime.datasets import load_for_manifest

    if artifact not in cache:  # one manifest read per artifact, one dataset load per dataset
        manifest = read_manifest(artifact)
        key = json.dumps([manifest["dataset"].get("name"), manifest["preprocessing"]], sort_keys=True)
        if key not in cache:
            cache[key] = load_for_manifest(manifest, data_dir)
        cache[artifact] = cache[key]
    return cache[artifact]


def evaluate(rows: list[dict], data_dir=None, progress=None) -> None:
    """Accuracy of every verified file on its test split, and top-1 agreement with the float baseline."""
    from runtime.load import load

    datasets, predictions = {}, {}
    for i, row in enumerate(rows):
        if row["status"] != "verified":
            continue
        if progress:
            progress(f"  eval [{i + 1}/{len(rows)}] {row['variant']} {row['format']}")
        try:
            model = load(row["file"])
            dataset = _dataset_for(row["artifact"], datasets, data_dir)
            predicted = model.logits(dataset.x_test).argmax(axis=1)
        except EdgeKitError as exc:
            row.update(status="failed", reason=str(exc))
            continue
        row["accuracy"] = float(np.mean(predicted == dataset.y_test))
        row["size_bytes"] = model.size_bytes
        row["gzip_bytes"] = (model.sidecar or {}).get("gzip_bytes") or _gzip_bytes(Path(row["file"]))
        predictions[id(row)] = predicted
    baseline = _baseline(rows)
    for row in rows:
        if id(row) in predictions and baseline is not None:
            row["agreement"] = float(np.mean(predictions[id(row)] == predictions[id(baseline)]))
            row["accuracy_change"] = row["accuracy"] - baseline["accuracy"]
            row["size_ratio"] = row["size_bytes"] / baseline["size_bytes"]


def _gzip_bytes(path: Path) -> int:
    import gzip

    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def _baseline(rows: list[dict]) -> dict | None:
    """The trained model's float32 TFLite file, else the first verified float file."""
    verified = [r for r in rows if r["status"] == "verified" and "accuracy" in r]
    for candidates in ([r for r in verified if r["variant"] == "base" and r["format"] == "float32"],
                       [r for r in verified if r["format"] in ("float32", "onnx")], verified):
        if candidates:
            return candidates[0]
    return None


def benchmark(rows: list[dict], root: Path, threads: list[int], seconds: float, runs: int | None = None,
              rebench: bool = False, progress=None) -> None:
    """Latency at each thread count, cached in root/bench.json by the file's sha256."""
    from runtime.bench import run_worker

    cache_path = root / BENCH_CACHE
    cache = {}
    if cache_path.is_file() and not rebench:
        try:
            cache = json.loads(cache_path.read_text("utf-8")).get("results", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            cache = {}  # a damaged cache is only a cache: measure again
    settings = {"seconds": seconds, "runs": runs, "batch": 1, "warmup": 10}
    todo = [(r, n) for r in rows if r["status"] == "verified" for n in threads]
    started = time.perf_counter()

    for i, (row, n) in enumerate(todo):
        key = _bench_key(row, n, settings)
        if key not in cache:
            if progress:
                progress(f"  bench [{i + 1}/{len(todo)}] {row['variant']} {row['format']}, {n} thread(s) "
                         f"({time.perf_counter() - started:.0f} s so far)")
            try:
                cache[key] = run_worker(Path(row["file"]), n, 1, runs, None if runs else seconds, 10)
            except EdgeKitError as exc:
                row.update(status="failed", reason=f"benchmark failed: {exc}")
                continue
            atomic_write_json(cache_path, {"settings": settings, "results": cache})
        row.setdefault("bench", {})[n] = cache[key]
    base = _baseline(rows)
    one, many = threads[0], threads[-1]
    for row in rows:
        bench = row.get("bench")
        if not bench:
            continue
        tags = (("1t", one), ("all", many)) if many != one else (("1t", one),)
        if many != one:
            row["threads_all"] = many
        for tag, n in tags:
            if n in bench:
                row[f"latency_median_ms_{tag}"] = bench[n]["call_ms"]["median"]
                row[f"latency_p90_ms_{tag}"] = bench[n]["call_ms"]["p90"]
        if base is not None and base.get("bench"):
            for tag, n in tags:
                if n in bench and n in base["bench"]:
                    row[f"speedup_{tag}"] = base["bench"][n]["call_ms"]["median"] / bench[n]["call_ms"]["median"]


def _bench_key(row: dict, threads: int, settings: dict) -> str:
    return f"{row['sha256']}:{threads}:{json.dumps(settings, sort_keys=True)}"


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (cost, accuracy) points no other point beats: cost <= and accuracy >=, one of them strictly."""
    flags = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(c <= cost and a >= acc and (c < cost or a > acc)
                        for j, (c, a) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def mark_pareto(rows: list[dict]) -> None:
    for cost_key, flag in (("size_bytes", "pareto_size"), ("gzip_bytes", "pareto_gzip"),
                           ("latency_median_ms_1t", "pareto_latency"), ("latency_median_ms_all", "pareto_latency_all")):
        candidates = [r for r in rows if r["status"] == "verified" and r.get(cost_key) is not None
                      and r.get("accuracy") is not None]
        for row, optimal in zip(candidates, pareto([(r[cost_key], r["accuracy"]) for r in candidates])):
            row[flag] = optimal


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
        # x86: "model name"; a Raspberry Pi: "Model" (the board) and "Hardware"
        cpu = next((fields[k] for k in ("model name", "model", "hardware") if fields.get(k)
                    and not fields[k].isdigit()), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "system": platform.platform(),
            "versions": library_versions()}


def notes(rows: list[dict]) -> list[str]:
    verified = [r for r in rows if r["status"] == "verified"]
    out = []
    for flag, what in (("pareto_size", "file size"), ("pareto_gzip", "gzip size"),
                       ("pareto_latency", "latency at 1 thread"), ("pareto_latency_all", "latency at all threads")):
        front = [_label(r) for r in verified if r.get(flag)]
        if front:
            out.append(f"Pareto-optimal for accuracy vs {what}: {', '.join(front)}.")
    slow = [f"{_label(r)} ({r['speedup_1t']:.2f}x)" for r in verified if r.get("speedup_1t") is not None
            and r["speedup_1t"] < 1 - NOISE]
    if slow:
        out.append(f"Slower than the float baseline at 1 thread (by more than {NOISE:.0%}): {', '.join(slow)}.")
    failed = [f"{_label(r)}: {r['reason']}" for r in rows if r["status"] != "verified"]
    out.append("Failed verification: " + ("; ".join(failed) if failed else "none") + ".")
    return out


def _label(row: dict) -> str:
    return f"{row['variant']} {row['format']}"


def _fmt(value, kind):
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "pts":
        return f"{value * 100:+.2f}"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "ms":
        from runtime.bench import format_ms

        return format_ms(value)
    if kind == "kib":
        return f"{value / 1024:,.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    n_all = next((r["threads_all"] for r in rows if r.get("threads_all")), None)
    head = ["variant", "format", "size KiB", "gzip KiB", "size vs float", "accuracy", "change (pts)",
            "agreement", "p50 ms 1t", "p90 ms 1t", f"p50 ms {n_all}t", f"p90 ms {n_all}t", "speed vs float",
            "Pareto", "status"]
    keep = [i for i, h in enumerate(head) if n_all or f"{n_all}t" not in h]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pareto_tags = ", ".join(t for t, k in (("size", "pareto_size"), ("gzip", "pareto_gzip"),
                                               ("latency", "pareto_latency"), (f"{n_all}t", "pareto_latency_all"))
                                if r.get(k))
        cells = [r["variant"], r["format"], _fmt(r.get("size_bytes"), "kib"), _fmt(r.get("gzip_bytes"), "kib"),
                 _fmt(r.get("size_ratio"), "ratio"), _fmt(r.get("accuracy"), "pct"),
                 _fmt(r.get("accuracy_change"), "pts"), _fmt(r.get("agreement"), "pct"),
                 _fmt(r.get("latency_median_ms_1t"), "ms"), _fmt(r.get("latency_p90_ms_1t"), "ms"),
                 _fmt(r.get("latency_median_ms_all"), "ms"), _fmt(r.get("latency_p90_ms_all"), "ms"),
                 _fmt(r.get("speedup_1t"), "ratio"), pareto_tags or "",
                 "verified" if r["status"] == "verified" else f"failed: {r['reason']}"]
        if pareto_tags:
            cells[:2] = [f"**{cells[0]}**", f"**{cells[1]}**"]
        lines.append("| " + " | ".join(str(cells[i]).replace("|", "/") for i in keep) + " |")
    lines[:2] = ["| " + " | ".join(head[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return "\n".join(lines)


PANELS = {  # plot file -> panels: (cost key, Pareto flag, x label)
    "accuracy_vs_size.png": (("size_bytes", "pareto_size", "file size (KiB, log scale)"),
                             ("gzip_bytes", "pareto_gzip", "gzip size (KiB, log scale): what a download costs")),
    "accuracy_vs_latency.png": (("latency_median_ms_1t", "pareto_latency", "latency at 1 thread (ms, log scale)"),
                                ("latency_median_ms_all", "pareto_latency_all",
                                 "latency at all threads (ms, log scale)")),
}


def plot(rows: list[dict], root: Path) -> list[str]:
    """accuracy_vs_size.png and accuracy_vs_latency.png; [] when matplotlib is not installed."""
    try:
        from runtime.plots import _pyplot, _save

        plt = _pyplot()
    except ImportError:
        return []
    from matplotlib.ticker import FuncFormatter

    written = []
    verified = [r for r in rows if r["status"] == "verified" and r.get("accuracy") is not None]
    formats = sorted({r["format"] for r in verified}, key=lambda k: FORMAT_ORDER.index(k) if k in FORMAT_ORDER else 99)
    variants = list(dict.fromkeys(r["variant"] for r in verified))
    markers = "osD^vP*Xh<>"
    colors = plt.get_cmap("tab10")
    for name, panels in PANELS.items():
        panels = [p for p in panels if any(r.get(p[0]) is not None for r in verified)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 8), squeeze=False, sharey=True)
        labelled = []
        for ax, (cost_key, flag, xlabel) in zip(axes[0], panels):
            points = [r for r in verified if r.get(cost_key) is not None]
            scale = 1 / 1024 if cost_key.endswith("bytes") else 1.0
            for r in points:
                ax.scatter(r[cost_key] * scale, r["accuracy"] * 100, s=110 if r.get(flag) else 50,
                           marker=markers[variants.index(r["variant"]) % len(markers)],
                           color=colors(formats.index(r["format"]) % 10),
                           edgecolors="black" if r.get(flag) else "none", linewidths=1.5, zorder=3)
            front = sorted((r[cost_key] * scale, r["accuracy"] * 100) for r in points if r.get(flag))
            if len(front) > 1:
                xs, ys = zip(*front)
                ax.step(xs, ys, where="post", color="black", linewidth=1, alpha=0.5, zorder=2)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
            ax.margins(x=0.25, y=0.12)
            low, high = ax.get_ylim()
            if high - low < 1.0:  # a flat accuracy range: show at least one point of accuracy
                mid = (low + high) / 2
                ax.set_ylim(mid - 0.5, mid + 0.5)
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            labelled.append((ax, [(r[cost_key] * scale, r["accuracy"] * 100, _label(r) + (" *" if r.get(flag) else ""))
                                  for r in points]))
        axes[0][0].set_ylabel("test accuracy (%)")
        for fmt in formats:
            axes[0][-1].scatter([], [], color=colors(formats.index(fmt) % 10), marker="o", label=f"format {fmt}")
        for variant in variants:
            axes[0][-1].scatter([], [], color="grey", marker=markers[variants.index(variant) % len(markers)],
                                label=f"variant {variant}")
        handles, names = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(8, len(names)), fontsize=9, frameon=False)
        what = "size" if "size" in name else "latency"
        fig.suptitle(f"accuracy vs {what}: Pareto-optimal points outlined and starred, front as a step line")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        for ax, points in labelled:  # now that the layout and limits are final
            _label_points(ax, points)
        _save(fig, root / name)
        plt.close(fig)
        written.append(name)
    return written


def _label_points(ax, points):
    """Label every point: points at one spot share a label (a name per line), and a label that would
    cover another is moved up or down, with a leader line to its point. Call after the limits are set."""
    groups = []
    for x, y, text in sorted(points, key=lambda p: (p[0], -p[1])):
        for group in groups:
            if abs(np.log10(x) - np.log10(group[0])) < 0.015 and abs(y - group[1]) < 0.02:
                group[2].append(text)
                break
        else:
            groups.append([x, y, [text]])
    to_points = 72 / ax.figure.dpi
    char_w, line_h = 4.3, 8.6  # fontsize 7, in points
    placed = []  # label boxes (x0, x1, y0, y1) in points
    for x, y, texts in groups:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        width, height = char_w * max(len(t) for t in texts), line_h * len(texts)
        for step in [0, *[k * sign for k in range(1, 40) for sign in (1, -1)]]:
            dy = step * line_h
            box = (px + 8, px + 8 + width, py + dy - height / 2, py + dy + height / 2)
            if not any(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate("\n".join(texts), (x, y), textcoords="offset points", xytext=(8, dy), va="center",
                    fontsize=7, alpha=0.9,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if dy else None)


def write(rows: list[dict], root: Path, info: dict) -> dict:
    """report.json, report.csv, report.md and the plots, all written atomically."""
    plots = plot(rows, root)
    report = {"created": utc_now(), "directory": str(root), "machine": machine(), **info,
              "baseline": _label(_baseline(rows)) if _baseline(rows) else None,
              "notes": notes(rows), "plots": plots,
              "rows": [{k: v for k, v in r.items() if k != "bench"} for r in rows]}
    atomic_write_json(root / "report.json", report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in CSV_COLUMNS})
    atomic_write_text(root / "report.csv", buffer.getvalue())
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    verified = sum(r["status"] == "verified" for r in rows)
    md = [f"# EdgeKit report: {root.name}", "",
          f"{verified} of {len(rows)} files verified. Baseline (size, accuracy and speed ratios): "
          f"**{report['baseline']}**. Accuracy on the fixed test split through EdgeKit's TensorFlow-free "
          "runtime; latency is the whole `predict` call on one image (batch 1), median and p90, each file in a "
          f"fresh process. Latency differences under {NOISE:.0%} are within run-to-run noise on a shared machine: "
          "`python -m runtime report DIR --rebench --seconds 2` measures longer.", "",
          markdown_table(rows), "", "## Notes", ""]
    md += [f"- {n}" for n in report["notes"]]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots]
    else:
        md += ["", "Plots need matplotlib (`pip install matplotlib`); it is not installed here."]
    md += ["", "## Machine", "", f"- CPU: {m['cpu']}, {m['cores']} cores ({m['machine']})", f"- system: {m['system']}",
           f"- libraries: {versions}", f"- benchmark: {info.get('bench_settings')}", f"- created: {report['created']}",
           ""]
    atomic_write_text(root / "report.md", "\n".join(md))
    return report


def build(root: str | Path, threads: list[int] | None = None, seconds: float = 0.5, runs: int | None = None,
          bench: bool = True, rebench: bool = False, data_dir=None, progress=None) -> dict:
    """Evaluate, benchmark and write the report for every exported file under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise EdgeKitError(f"{root} is not a directory; expected the output directory of `python -m pipeline`.")
    threads = threads or sorted({1, os.cpu_count() or 1})
    rows = collect(root)
    if progress:
        progress(f"report: {len(rows)} files in {len({r['artifact'] for r in rows})} artifacts")
    evaluate(rows, data_dir, progress)
    if bench:
        benchmark(rows, root, threads, seconds, runs, rebench, progress)
    mark_pareto(rows)
    return write(rows, root, {"bench_settings": {"threads": threads, "seconds": None if runs else seconds,
                                                  "runs": runs, "batch": 1} if bench else None})
