"""The report's search section, when the directory holds a search (`python -m pipeline --search` writes
search.json beside the study): every trial with its recipe, file, accuracy and interval (from the report's
own rows, judged like every file), objective value and budget; the study's Pareto front; and
search.png, the trials against the default menu's files.

search.json is read as untrusted data: anything but the expected shape is ignored with a note.
"""

from __future__ import annotations

from pathlib import Path

from runtime.charts import pyplot, save_png
from runtime.limits import json_loads
from runtime.report.plots import log_ticks
from runtime.report.rows import label, points
from runtime.text import markdown, public_url
from runtime.vocabulary import VARIANTS

SEARCH_FILE = "search.json"
PLOT = "search.png"
# the search's --objective -> (the row's field, axis label, scale, the report objective whose Pareto flag applies)
UNITS = {"gzip": ("gzip_bytes", "gzip size (KiB)", 1 / 1024, "gzip"),
         "size": ("size_bytes", "file size (KiB)", 1 / 1024, "size"),
         "latency": ("latency_median_ms_1t", "latency at 1 thread (ms)", 1.0, "latency_1t"),
         "arena": ("arena_bytes", "tensor arena (KiB)", 1 / 1024, "arena")}


MAX_BYTES = 64 << 20


def read(root: Path) -> tuple[dict | None, str | None]:
    """(search.json, None), (None, None) when there is none, or (None, why it is damaged)."""
    path = root / SEARCH_FILE
    if not path.exists():
        return None, None
    try:
        if path.stat().st_size > MAX_BYTES:
            return None, f"it has {path.stat().st_size:,} bytes (at most {MAX_BYTES >> 20} MB expected)"
        data = json_loads(path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # truncated, not UTF-8, nested past Python's stack
        return None, f"it is not the JSON the search writes ({type(exc).__name__}: {str(exc)[:80]})"
    if not (isinstance(data, dict) and data.get("objective") in UNITS and isinstance(data.get("trials"), list)
            and all(isinstance(t, dict) and type(t.get("number")) is int for t in data["trials"])):
        return None, "it does not hold an objective and a list of numbered trials"
    return data, None


def _file(value) -> str | None:
    """A trial's file: a relative path inside the run directory, else None."""
    if not isinstance(value, str) or not value or "\x00" in value or value.startswith("/") \
            or ".." in Path(value).parts or len(value) > 4096:
        return None
    return value


def section(root: Path, rows: list[dict], recommendations: list[dict], budget: float) -> tuple[list[str], list[str]]:
    """(report.md lines, plots written) for the search, or ([], []) without one."""
    data, damaged = read(root)
    if damaged:
        return ["## Search", "", f"**{SEARCH_FILE} is damaged**: {markdown(damaged)}. The search's trials are not "
                "shown; run the same `python -m pipeline --search` command again to write it anew (the study keeps "
                "every finished trial)."], []
    if data is None:
        return [], []
    by_file = {str(Path(r["file"]).resolve()): r for r in rows if r.get("file")}
    key, axis, scale, objective = UNITS[data["objective"]]
    trials = []
    for t in sorted(data["trials"], key=lambda t: t["number"]):
        file = _file(t.get("file"))
        row = by_file.get(str((root / file).resolve())) if file else None
        trials.append((t, row))
    lines = ["## Search", "",
             f"{len(trials)} trials of the study ({markdown(public_url(str(data.get('storage', 'search.db'))))}), "
             f"minimizing {axis} within "
             f"{points(budget)} of the float baseline. Accuracy and its interval are the report's own, on the "
             "same test images as every file above.", "",
             f"| trial | recipe | format | state | accuracy (95% CI) | change (pts) | {axis} | budget | worker |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, row in trials:
        acc = "-" if row is None or row.get("accuracy") is None else (
            f"{row['accuracy']:.2%} ({row['accuracy_low']:.1%}-{row['accuracy_high']:.1%})")
        change = "-" if row is None or row.get("accuracy_change_pts") is None else f"{row['accuracy_change_pts']:+.2f}"
        value = "-" if row is None or row.get(key) is None else f"{row[key] * scale:,.1f}"
        within = "-" if row is None or "over_budget" not in row else ("**over**" if row["over_budget"] else "within")
        lines.append(f"| {t['number']} | {markdown(t.get('recipe', '-'))} | {markdown(t.get('format', '-'))} | "
                     f"{markdown(t.get('state', '-'))} | {acc} | {change} | {value} | {within} | "
                     f"{markdown(t.get('worker', '-'))} |")
    optimal = [row for _, row in trials if row is not None and row.get(f"pareto_{objective}")]
    if optimal:
        lines += ["", "Pareto front of the study (within budget, by the report's rules): "
                  + "; ".join(f"{label(r)} ({r[key] * scale:,.1f}, {r['accuracy']:.2%})"
                              for r in sorted(optimal, key=lambda r: r[key])) + "."]
    menu_rows = _menu(rows, trials)
    chosen = next((rec for rec in recommendations if rec["objective"] == objective), None)
    if chosen and chosen.get("choice") is not None:
        menu_best = min((r for r in menu_rows if r.get(key) is not None and not r.get("over_budget")
                         and r["status"] == "verified"), key=lambda r: r[key], default=None)
        c = chosen["choice"]
        if menu_best is None:
            versus = ("; no file of the default menu is here to compare with (`python -m pipeline` into the same "
                      "--out makes them)")
        elif menu_best is c:
            versus = "; it is a file of the default menu: the search found nothing better"
        else:
            versus = (f", {c[key] / menu_best[key]:.2f}x the default menu's best within budget, {label(menu_best)} "
                      f"at {value_text(data['objective'], menu_best[key])}")
        lines += ["", f"Recommended for {chosen['goal']}: **{label(c)}** at {value_text(data['objective'], c[key])}, "
                      f"{c['accuracy']:.2%}{versus}."]
    plots = [PLOT] if _plot(root, trials, rows, menu_rows, key, axis, scale, objective, budget) else []
    if plots:
        lines += ["", f"![search]({PLOT})"]
    return lines, plots


def value_text(objective: str, value: float | None) -> str:
    """An objective's value with its unit: '113.0 KiB gzip', '470.4 KiB', '0.106 ms at 1 thread'."""
    if value is None:
        return "-"
    if objective == "latency":
        return f"{value:.3f} ms at 1 thread"
    return f"{value / 1024:,.1f} KiB" + (" gzip" if objective == "gzip" else " of arena" if objective == "arena" else "")


def _plot(root, trials, rows, menu_rows, key, axis, scale, objective, budget) -> bool:
    try:
        plt = pyplot()
    except ImportError:
        return False
    points = [row for _, row in trials if row is not None and row.get(key) is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in points:
        over = row.get("over_budget")
        ax.errorbar(row[key] * scale, row["accuracy"] * 100,
                    yerr=[[(row["accuracy"] - row["accuracy_low"]) * 100], [(row["accuracy_high"] - row["accuracy"]) * 100]],
                    fmt="o", color="#b0b0b0" if over else "#1f77b4", ms=7, mec="white", mew=0.8, elinewidth=0.6,
                    alpha=0.9, zorder=4)
    front = sorted((row[key] * scale, row["accuracy"] * 100) for row in points
                   if row.get(f"pareto_{objective}"))
    if front:
        ax.step(*zip(*front), where="post", color="#1f77b4", linewidth=1.2, label="the study's Pareto front")
    menu = [r for r in menu_rows if r.get(key) is not None and r.get("accuracy") is not None]
    if menu:
        ax.scatter([r[key] * scale for r in menu], [r["accuracy"] * 100 for r in menu], marker="s", s=90,
                   facecolors="none", edgecolors="black", linewidths=1.2, zorder=3,
                   label="default menu's files (a trial inside one: the same file)")
    base = next((r for r in rows if r.get("accuracy_change_pts") == 0 and r["variant"] == "base"), None)
    if base is not None:
        ax.axhline(base["accuracy"] * 100 - budget, color="#d62728", linestyle="--", linewidth=1,
                   label="accuracy budget")
    ax.scatter([], [], color="#1f77b4", edgecolors="white", label="search trials (grey: over budget)")
    ax.set_xscale("log")
    log_ticks(ax)
    ax.set_xlabel(f"{axis}, log scale")
    ax.set_ylabel("test accuracy (%), 95% interval")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("search trials against the default menu", fontsize=10)
    fig.tight_layout()
    save_png(fig, root / PLOT)
    plt.close(fig)
    return True


def _menu(rows: list[dict], trials) -> list[dict]:
    """The default menu's files: the pipeline's own variants in this directory, and the trials whose recipe is a
    menu variant's (marked `menu` in search.json: they are that variant's artifact)."""
    menu = [r for r in rows if r["variant"] in VARIANTS]
    seen = {id(r) for r in menu}
    for t, row in trials:
        if row is not None and t.get("menu") is True and id(row) not in seen:
            menu.append(row)
            seen.add(id(row))
    return menu
