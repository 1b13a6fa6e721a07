"""The report's two plots: accuracy vs size (file and gzip) and accuracy vs latency (1 thread, all threads).

What a reader can rely on in every report: one colour per format and one marker per menu variant
(runtime.vocabulary; every search trial one marker, its label naming the recipe), ONNX files hollow so a TFLite
file under them still shows; accuracy in %, its typical 95% interval in the axis title (on a few hundred test
images every file's interval is wider than the whole spread of accuracies: drawn per point, the bars hid the
points; each file's is in the table), latency with its interval as a horizontal bar; the
budget as a dashed line, over-budget files grey (pinned to the axis floor with their accuracy written, when
far below); the Pareto front of the files within budget as a step line; one label per group of points that
fall together ("base, pruned50 and 3 more dynamic"), bold when one of them is Pareto-optimal, placed (as
adjustText would, but deterministic) so it covers no point, no interval bar and no other label.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from runtime.charts import pyplot, save_png
from runtime.report.decide import OBJECTIVES, candidates, group_label
from runtime.report.rows import label, points
from runtime.text import terminal
from runtime.vocabulary import FILE_FORMATS, MENU, colour, format_rank, marker

FIGURES = {"accuracy_vs_size.png": ("size", "gzip"), "accuracy_vs_latency.png": ("latency_1t", "latency_all")}
OVER = "#b0b0b0"
CHOSEN = "#111111"  # the ring around the file the panel's objective recommends
CLOSE_PX = 14  # points closer than this on the page share a label
TRIAL_MARKER = "*"  # every search trial (a variant that is not on the menu): its label names the recipe


def _marker(variant: str) -> str:
    return marker(variant) if variant in MENU else TRIAL_MARKER


def missing() -> str | None:
    """Why plots cannot be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"not drawn: {exc.name} is not installed (`pip install '.[report]'` in EdgeKit's repository)."
    return None


def place(where: dict) -> str:
    """'pi@raspberrypi: Raspberry Pi 4 Model B Rev 1.4, Cortex-A72, aarch64' or 'this machine: <CPU>, x86_64'
    (escaped: a device's words)."""

    what = ", ".join(terminal(where[k])[:80] for k in ("board", "cpu", "machine") if where.get(k))
    text = f"{terminal(where['host'])[:80]}: {what}" if where.get("host") else f"this machine: {what}"
    return text.replace("$", r"\$")  # no mathtext


def plot(rows: list[dict], root: Path, budget: float, base: dict | None, where: dict | None = None,
         recommendations: list[dict] = ()) -> dict[str, str]:
    """Write the figures that have data as PNG; return {file name: the same figure as SVG text} (for report.html;
    every point's group has the id `ekpt-<objective>-<row index>`), empty when matplotlib is missing. `where`: the
    machine latency was measured on (runtime.bench.machine, or a device's hello with its host), named in the
    latency figure's title; `recommendations` (decide.recommend): each panel rings its objective's choice."""
    if missing():
        return {}

    plt = pyplot()
    written = {}
    for name, fig in figures(rows, budget, base, where, recommendations):
        save_png(fig, root / name)
        buffer = io.StringIO()
        with plt.rc_context({"svg.hashsalt": "edgekit", "svg.fonttype": "path"}):  # the same bits every run
            fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        text = buffer.getvalue()
        written[name] = text[text.index("<svg"):]  # no XML prolog: it goes inline in the page
    return written


def figures(rows: list[dict], budget: float, base: dict | None, where: dict | None = None,
            recommendations: list[dict] = ()):
    """(file name, figure) for each figure with data, its labels placed on the final layout; the caller closes
    each figure."""

    plt = pyplot()
    chosen = {r["objective"]: r["choice"] for r in recommendations if r.get("choice")}
    evaluated = [r for r in rows if r["status"] == "verified" and r.get("accuracy") is not None]
    for name, keys in FIGURES.items():
        objectives = [o for o in OBJECTIVES if o.key in keys and any(r.get(o.cost) is not None for r in evaluated)]
        if not objectives:
            continue
        fig, axes = plt.subplots(1, len(objectives), figsize=(8 * len(objectives), 6.5), squeeze=False)
        floor = _floor(evaluated, budget, base)
        labels = [_panel(ax, objective, evaluated, budget, base, floor, rows, chosen.get(objective.key))
                  for ax, objective in zip(axes[0], objectives)]
        widths = sorted((r["accuracy_high"] - r["accuracy_low"]) * 50 for r in evaluated)
        axes[0][0].set_ylabel(f"test accuracy (%), each ±{widths[len(widths) // 2]:.1f} points "
                              "(95%: the table)")
        _legend(fig, evaluated, base is not None, len(objectives), bool(chosen))
        what = "size" if "size" in name else "latency"
        title = f"accuracy vs {what}" + (f" (budget: {points(budget)} below {label(base)})" if base else "")
        if what == "latency" and where:
            title += "\nmeasured on " + place(where)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        for ax, items in zip(axes[0], labels):  # once the layout is final: labels off points and each other
            _place_labels(ax, items)
        yield name, fig


def _floor(rows: list[dict], budget: float, base: dict | None) -> float | None:
    """The lowest accuracy (%) the axis shows: the budget line and every file within budget fit above it."""
    within = [r["accuracy"] * 100 for r in rows if not r.get("over_budget")]
    if base is not None:
        within.append(base["accuracy"] * 100 - budget)
    if not within:
        return None
    top = max(r["accuracy"] * 100 for r in rows)
    low = min(within)
    return max(0.0, low - max(0.15 * (top - low), 0.3))


def _panel(ax, objective, rows, budget, base, floor, all_rows, choice: dict | None = None) -> tuple[list, list]:
    """Draw one objective's points (each a group with the id `ekpt-<objective>-<index in all_rows>`), ring `choice`;
    return their labels (x, y, text, style), latency bars and the ring's point, placed once the layout is final."""
    index = {id(r): i for i, r in enumerate(all_rows)}
    points = [r for r in rows if r.get(objective.cost) is not None]
    scale = 1 / 1024 if objective.cost.endswith("bytes") else 1.0
    drawn = []  # (x, shown y, over budget, pinned to the floor, row)
    for r in points:
        x, y = r[objective.cost] * scale, r["accuracy"] * 100
        pinned = floor is not None and y < floor
        shown_y = floor if pinned else y
        over = bool(r.get("over_budget"))
        hollow = _hollow(r["format"])
        c = OVER if over else colour(r["format"])
        xerr = None
        if objective.tag:
            low, high = r[f"latency_low_ms_{objective.tag}"], r[f"latency_high_ms_{objective.tag}"]
            xerr = [[x - low], [high - x]]
        if xerr is not None:
            ax.errorbar(x, shown_y, xerr=xerr, fmt="none", ecolor=c, elinewidth=0.8, capsize=2, alpha=0.5,
                        zorder=2)
        # ONNX hollow and larger, drawn on top: a TFLite file at the same spot still shows inside the ring
        ax.scatter(x, shown_y, s=130 if hollow else 60, marker=_marker(r["variant"]), zorder=4 if hollow else 3,
                   facecolors="none" if hollow else c, edgecolors=c, linewidths=1.8 if hollow else 0.8,
                   gid=f"ekpt-{objective.key}-{index.get(id(r), 0)}")
        if r is choice:
            ax.scatter(x, shown_y, s=520, marker="o", facecolors="none", edgecolors=CHOSEN, linewidths=2.2, zorder=5)
        drawn.append((x, shown_y, over, pinned, r))
    front = sorted((r[objective.cost] * scale, r["accuracy"] * 100) for r in candidates(all_rows, objective)
                   if r.get(f"pareto_{objective.key}"))
    if front:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="black", linewidth=1, alpha=0.6, zorder=1)
    if base is not None:
        ax.axhline(base["accuracy"] * 100 - budget, color="#d62728", linestyle="--", linewidth=1, zorder=1)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    if floor is not None:
        top = max(r["accuracy"] * 100 for r in points)
        ax.set_ylim(floor - 0.03 * (top - floor), top + 0.15 * (top - floor))
    log_ticks(ax)
    ax.set_xlabel(f"{objective.axis} ({'KiB' if scale != 1 else 'ms'}, log scale)"
                  + (": what a download costs" if objective.key == "gzip" else ""))
    ax.grid(True, which="major", alpha=0.3)
    # points closer than CLOSE_PX on the page share one label, a name per line
    # (the recommended file has a label of its own)
    clusters: list[list] = []
    for x, y, over, pinned, r in sorted(drawn, key=lambda d: d[4] is not choice):
        px, py = ax.transData.transform((x, y))
        for cluster in clusters:
            if cluster[2:4] == [over, pinned] and math.hypot(px - cluster[5], py - cluster[6]) < CLOSE_PX \
                    and r is not choice and cluster[4][0] is not choice:
                cluster[4].append(r)
                break
        else:
            clusters.append([x, y, over, pinned, [r], px, py])
    labels = [(x, y, ("recommended: " if members[0] is choice else "")
               + group_label(members, 2) + (f" ({members[0]['accuracy']:.1%})" if pinned else ""),
               {"color": "#808080" if over else "#202020",
                "fontweight": "bold" if any(r.get(f"pareto_{objective.key}") for r in members) else "normal"})
              for x, y, over, pinned, members, _, _ in clusters]
    bars = [(r[f"latency_low_ms_{objective.tag}"], r[f"latency_high_ms_{objective.tag}"], y)
            for _, y, _, _, r in drawn] if objective.tag else []
    ring = next(((x, y) for x, y, _, _, r in drawn if r is choice), None)
    return labels, bars, ring


def _place_labels(ax, panel) -> None:
    """Label every point where the label covers no marker, no interval bar, no other label and no leader line:
    right of its point if that is free, else the nearest free spot up or down that side, else on the left, else
    anywhere free in the panel; a moved label gets a leader line, which crosses no other label's text either.
    (What adjustText does, made deterministic: on log axes adjustText left same-height labels overlapping.)"""
    from matplotlib.path import Path as Segment
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_points = 72 / ax.figure.dpi
    items, bars, ring = panel
    points = [ax.transData.transform((x, y)) for x, y, _, _ in items]
    taken = [Bbox.from_extents(px - 6, py - 6, px + 6, py + 6) for px, py in points]  # the markers
    if ring is not None:  # the recommended file's ring
        rx, ry = ax.transData.transform(ring)
        taken.append(Bbox.from_extents(rx - 13, ry - 13, rx + 13, ry + 13))
    for low, high, y in bars:  # latency intervals, in pixels of the final layout
        (x0, py), (x1, _) = ax.transData.transform([(low, y), (high, y)])
        taken.append(Bbox.from_extents(x0 - 2, py - 3, x1 + 2, py + 3))
    texts: list = []  # the labels placed so far, and their leader lines (point, label centre)
    leaders: list = []

    def free(box, point, leader: bool) -> bool:
        if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
            return False
        t = np.asarray([b.extents for b in taken])  # 1.5 px apart at least
        if np.any((t[:, 0] < box.x1 + 1.5) & (box.x0 - 1.5 < t[:, 2]) & (t[:, 1] < box.y1 + 1.5)
                  & (box.y0 - 1.5 < t[:, 3])) or any(line.intersects_bbox(box) for line in leaders):
            return False
        line = Segment([point, ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)])
        return not leader or not any(line.intersects_bbox(other.padded(2)) for other in texts)

    order = sorted(range(len(items)), key=lambda i: (-points[i][1], points[i][0]))  # top to bottom
    for i in order:
        x, y, text, style = items[i]
        probe = ax.annotate(text, (x, y), xytext=(8, 0), textcoords="offset points", va="center", fontsize=7, **style)
        box = probe.get_window_extent(renderer)
        probe.remove()
        width, height = box.width, box.height
        px, py = points[i]
        gap = 15 if ring is not None and (x, y) == ring else 9  # clear of the ring
        chosen = None
        for side in (1, -1):
            for step in [0, *[k * sign for k in range(1, 30) for sign in (1, -1)]]:
                left = px + gap if side > 0 else px - gap - width
                bottom = py - height / 2 + step * 0.6 * height
                candidate = Bbox.from_extents(left, bottom, left + width, bottom + height)
                if free(candidate, (px, py), bool(step) or side < 0):
                    chosen = (side, step, candidate)
                    break
            if chosen:
                break
        if chosen is None:  # crowded near the point: the nearest free spot anywhere in the panel, with a leader
            spots = sorted((Bbox.from_extents(left, bottom, left + width, bottom + height)
                            for left in _steps(frame.x0 + 2, frame.x1 - width - 2, 6)
                            for bottom in _steps(frame.y0 + 2, frame.y1 - height - 2, height / 2)),
                           key=lambda b: math.hypot((b.x0 + b.x1) / 2 - px, (b.y0 + b.y1) / 2 - py))
            best = next((b for b in spots if free(b, (px, py), True)), None)
            if best is not None:
                chosen = (1 if best.x0 >= px else -1, 1, best)
        side, step, candidate = chosen or (1, 0, Bbox.from_extents(px + gap, py - height / 2, px + gap + width,
                                                                  py + height / 2))
        taken.append(candidate)
        texts.append(candidate)
        leader = bool(step) or side < 0
        if leader:
            leaders.append(Segment([(px, py), ((candidate.x0 + candidate.x1) / 2, (candidate.y0 + candidate.y1) / 2)]))
        offset = ((candidate.x0 - px if side > 0 else candidate.x1 - px) * to_points,
                  (candidate.y0 + height / 2 - py) * to_points)
        ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", va="center",
                    ha="left" if side > 0 else "right", fontsize=7, zorder=5, **style,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5, "shrinkA": 0, "shrinkB": 4}
                    if leader else None)


def _steps(start: float, stop: float, step: float) -> list[float]:
    return [start + k * step for k in range(int(max(stop - start, 0) // step) + 1)]


def log_ticks(ax) -> None:
    """At least three readable tick labels on a log axis, even when it spans less than a decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    low, high = ax.get_xlim()
    ticks = []
    for subs in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
                 tuple(1 + k / 10 for k in range(90))):
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                 for m in subs if low <= m * 10 ** e <= high]
        if len(ticks) >= 3:
            break
    if len(ticks) > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))


def _legend(fig, rows, with_budget: bool, columns: int, with_choice: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = []
    for key in sorted({r["format"] for r in rows}, key=format_rank):
        hollow = _hollow(key)
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=8, label=f"format {key}",
                              markerfacecolor="white" if hollow else colour(key), markeredgecolor=colour(key)))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for variant in [v for v in variants if _marker(v) != TRIAL_MARKER]:
        handles.append(Line2D([], [], linestyle="none", marker=marker(variant), markersize=8, color="#505050",
                              label=f"variant {variant}"))
    if any(_marker(v) == TRIAL_MARKER for v in variants):
        handles.append(Line2D([], [], linestyle="none", marker=TRIAL_MARKER, markersize=8, color="#505050",
                              label="search trial (label: its recipe)"))
    handles.append(Line2D([], [], color="black", alpha=0.6, label="Pareto front (within budget); bold label: on it"))
    if with_budget:
        handles.append(Line2D([], [], color="#d62728", linestyle="--", label="accuracy budget"))
    if any(r.get("over_budget") for r in rows):
        handles.append(Line2D([], [], linestyle="none", marker="o", color=OVER, label="over budget"))
    if with_choice:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=14, markerfacecolor="none",
                              markeredgecolor=CHOSEN, markeredgewidth=2, label="recommended for the panel's axis"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4 * columns, len(handles)), fontsize=8, frameon=False)


def _hollow(key: str) -> bool:
    """ONNX files are drawn hollow (and over the TFLite file of the same figures)."""
    fmt = FILE_FORMATS.get(key)
    return fmt is not None and fmt.backend == "onnx"
