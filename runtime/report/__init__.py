"""`python -m runtime report DIR`: the report that decides which file to ship.

    python -m runtime report runs/fashion_cnn-digits

DIR holds one artifact per variant (the trained model and what `optimize` derived from it), each with
the files `export` wrote. The parts, in the order `build` runs them:

    rows.py     collect every exported file, check it against its manifest, evaluate it on its test split
    decide.py   intervals, significance and the budget; ties, Pareto fronts and the recommendation
    search.py   the search's trials (search.json from `pipeline --search`), its front, search.png
    latency.py  latency in interleaved rounds, with intervals, cached in bench.json
    plots.py    accuracy_vs_size.png and accuracy_vs_latency.png
    render.py   report.md, report.csv, report.json and the console summary

Everything here is TensorFlow-free, so the report also runs on a device. The statistics need scipy and
the plots matplotlib (`pip install '.[report]'` in EdgeKit's repository).
"""

from __future__ import annotations

from pathlib import Path

from runtime.artifacts.manifest import utc_now
from runtime.bench import machine
from runtime.errors import EdgeKitError, WriteFailed
from runtime.limits import cores
from runtime.report import deploy
from runtime.report.decide import (CHOICES, DEFAULT_CHOICE, OBJECTIVES, RUNTIMES, Comparer, for_device, fronts, judge,
                                   primary, recommend)
from runtime.report.latency import BENCH_CACHE, ROUNDS, benchmark
from runtime.report.plots import FIGURES, missing, plot
from runtime.report.render import CSV_COLUMNS, console_summary, notes, write
from runtime.report.rows import collect, evaluate
from runtime.report.trials import PLOT as SEARCH_PLOT, section as search_section
from runtime.vocabulary import MAX_ACCURACY_DROP, check_max_accuracy_drop

__all__ = ["BENCH_CACHE", "CHOICES", "CSV_COLUMNS", "OBJECTIVES", "ROUNDS", "RUNTIMES", "build"]


def build(root: str | Path, threads: list[int] | None = None, seconds: float = 0.5, runs: int | None = None,
          bench: bool = True, rebench: bool = False, data_dir=None, progress: bool = False,
          budget: float = MAX_ACCURACY_DROP, rounds: int = ROUNDS, objective: str = DEFAULT_CHOICE,
          device=None, max_ram: int | None = None, max_flash: int | None = None, runtime: str = "litert") -> dict:
    """Evaluate, judge, benchmark and write the report for every exported file under `root`; `objective` (size,
    gzip, latency) is what its recommendation answers first. `device`: an open `runtime.remote.session.Session`, where
    latency is measured instead of here. `max_ram`, `max_flash`: a microcontroller file whose tensor arena or bytes
    exceed them is marked over RAM/flash and never recommended (`objective` "arena" recommends among them).
    `runtime`: what the device runs the file with, "litert" (the user's own LiteRT or onnxruntime app: a file that
    needs EdgeKit's runtime is never recommended) or "edgekit" (EdgeKit's runtime is installed there)."""

    budget = check_max_accuracy_drop(budget)
    if objective not in CHOICES:
        raise EdgeKitError(f"--objective must be one of {', '.join(CHOICES)}; got {objective!r}.")
    if objective == "latency" and not bench:
        raise EdgeKitError("--objective latency needs the benchmarks; drop --no-bench.")
    root = Path(root)
    if not root.is_dir():
        raise EdgeKitError(f"{root} is not a directory; expected the output directory of `python -m pipeline`.")
    threads = threads or sorted({1, cores()})
    rows = collect(root)
    test_sets = evaluate(rows, data_dir, progress)
    for_device(rows, runtime, objective)
    base = judge(rows, budget, max_ram, max_flash)
    where = {**device.info, "host": device.target.name} if device else machine()
    settings = benchmark(rows, root, threads, seconds, runs, rounds, rebench, progress, device) if bench else None
    comparer = Comparer()
    groups = fronts(rows, comparer)
    recommendations = recommend(rows, comparer, budget)
    answer = primary(recommendations, objective)
    try:  # an extra beside the report: a full disk costs deploy/, not the report
        choice = answer["choice"] if answer else None
        deployed = deploy.write(root, choice, test_sets.get(choice["_images"]) if choice else None)
        deploy_problem = None
    except WriteFailed as exc:
        deployed, deploy_problem = [], str(exc)
    figures = plot(rows, root, budget, base, where, recommendations)  # {PNG name: the figure as SVG}
    plots = list(figures)
    search_lines, search_plots = search_section(root, rows, recommendations, budget)
    for stale in {*FIGURES, SEARCH_PLOT} - {*plots, *search_plots}:  # e.g. a latency plot from a run with benchmarks
        (root / stale).unlink(missing_ok=True)
    first = next((r for r in rows if r.get("model")), {})
    info = {"created": utc_now(), "machine": where, "model": first.get("model"), "dataset": first.get("dataset"),
            "budget": budget, "objective": objective, "baseline_row": base, "bench_settings": settings, "rows": rows,
            "recommendations": recommendations, "notes": notes(rows, groups, budget),
            "summary": console_summary(recommendations, root, objective), "plots": plots, "plots_svg": figures, "plots_missing": missing(),
            "search_lines": search_lines, "search_plots": search_plots, "deploy": deployed}
    if deploy_problem:
        info["notes"].append(f"deploy/ was not written: {deploy_problem}")
    write(root, info)
    return {**info, "baseline": f"{base['variant']} {base['format']}" if base else None}
