"""The report's statistics and decisions: intervals and p-values against published reference values, the
accuracy budget, ties, Pareto fronts and the recommendation, on rows whose figures are known exactly."""

import numpy as np
import pytest

from runtime.errors import EdgeKitError
from runtime.report.decide import OBJECTIVES, Comparer, fronts, judge, recommend
from runtime.stats import accuracy_interval, mcnemar, median_interval

SIZE, LATENCY = OBJECTIVES[0], OBJECTIVES[2]


# --- statistics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("correct, total, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_intervals_match_newcombe(correct, total, low, high):
    assert accuracy_interval(correct, total) == pytest.approx((low, high), abs=5e-5)


def _pairs(first_only, second_only, both=50, neither=10):
    """Correctness of two classifiers on the same images with the given discordant counts."""
    first = [1] * first_only + [0] * second_only + [1] * both + [0] * neither
    second = [0] * first_only + [1] * second_only + [1] * both + [0] * neither
    return np.array(first, bool), np.array(second, bool)


def test_exact_mcnemar_matches_the_reference_values():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91: 1 vs 7 discordant pairs, exact p = 0.070
    test = mcnemar(*_pairs(1, 7))
    assert (test["first_only"], test["second_only"]) == (1, 7)
    assert test["p_value"] == pytest.approx(0.0703125)  # 2 * (1 + 8) / 2**8
    assert mcnemar(*_pairs(7, 1))["p_value"] == pytest.approx(0.0703125)  # symmetric
    assert mcnemar(*_pairs(0, 5))["p_value"] == pytest.approx(0.0625)  # 2 / 2**5: five flips are not enough
    assert mcnemar(*_pairs(0, 6))["p_value"] == pytest.approx(0.03125)  # ... six are
    assert mcnemar(*_pairs(0, 0))["p_value"] == 1.0  # identical predictions
    assert mcnemar(*_pairs(4, 4))["p_value"] == 1.0


def test_median_interval_is_the_order_statistics_of_the_rounds():
    median, low, high = median_interval([9, 2, 7, 4, 5, 6, 3, 8, 1, 10])
    assert (median, low, high) == (5.5, 2, 9)  # n = 10: the 2nd and 9th smallest cover the median at 97.9%
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few rounds for 95%: the whole range


# --- decisions on synthetic rows --------------------------------------------------------------------------

IMAGES = 400


def _row(variant, fmt, size, correct, latency=None):
    """A verified, evaluated row: `correct` images right out of IMAGES (the first ones), or a boolean array."""
    flags = np.arange(IMAGES) < correct if np.isscalar(correct) else np.asarray(correct, bool)
    row = {"variant": variant, "format": fmt, "status": "verified", "file": f"/r/{variant}/model.{fmt}.tflite",
           "size_bytes": size, "gzip_bytes": size, "test_images": IMAGES, "correct": int(flags.sum()),
           "accuracy": float(flags.mean()), "_correct": flags, "_predicted": flags.astype(int), "_images": "digits"}
    if latency is not None:
        median, low, high = latency
        row.update(latency_median_ms_1t=median, latency_low_ms_1t=low, latency_high_ms_1t=high)
    return row


def _decide(rows, budget=1.0):
    judge(rows, budget)
    comparer = Comparer()
    return fronts(rows, comparer), recommend(rows, comparer, budget), comparer


def test_a_file_over_budget_is_marked_and_never_optimal_or_recommended():
    base = _row("base", "float32", 400_000, 396)  # 99.00%
    int8 = _row("base", "int8", 100_000, 394)  # 98.50%: -0.5 points, within a 1-point budget
    broken = _row("pruned80", "int8", 30_000, 166)  # 41.50%: the smallest file, and useless
    groups, recs, _ = _decide([base, int8, broken])
    assert broken["over_budget"] and not int8["over_budget"] and not base["over_budget"]
    assert broken["significant"] and broken["p_value"] < 1e-10
    assert not int8["significant"] and int8["p_value"] == pytest.approx(0.5)  # 2 discordant images: p = 2 / 4
    assert broken["pareto_size"] is False and int8["pareto_size"] is True
    assert [[r["format"] for r in g] for g in groups["size"]] == [["int8"]]  # base is dominated: bigger, tied
    smallest = next(r for r in recs if r["objective"] == "size")
    assert smallest["choice"] is int8 and smallest["cost_vs_baseline"] == -1
    # with a budget that admits it, the broken file is what the smallest-file objective ships
    groups, recs, _ = _decide([base, int8, broken], budget=60)
    assert not broken["over_budget"] and next(r for r in recs if r["objective"] == "size")["choice"] is broken


def test_the_budget_is_measured_from_the_float_baseline_in_points():
    base = _row("base", "float32", 400_000, 400)  # 100%
    edge = _row("base", "int8", 100_000, 396)  # exactly 1.00 point below
    beyond = _row("base", "dynamic", 150_000, 395)  # 1.25 points below
    judge([base, edge, beyond], 1.0)
    assert edge["accuracy_change_pts"] == pytest.approx(-1.0) and not edge["over_budget"]
    assert beyond["over_budget"]


def test_tied_files_are_merged_into_one_group():
    base = _row("base", "float32", 1_000_000, 396)
    tied = [_row(v, "dynamic", size, 396) for v, size in (("base", 467_000), ("pruned80", 467_300),
                                                         ("clustered16", 467_500))]
    bigger = _row("qat", "int8", 480_000, 396)  # 2.8% bigger than the group, same accuracy: dominated
    groups, recs, comparer = _decide([base, *tied, bigger])
    assert [[r["variant"] for r in g] for g in groups["size"]] == [["base", "pruned80", "clustered16"]]
    assert not bigger["pareto_size"] and not base["pareto_size"]
    smallest = next(r for r in recs if r["objective"] == "size")
    assert smallest["choice"] is tied[0] and smallest["tied"] == tied[1:]


def test_a_significantly_more_accurate_file_stays_on_the_front():
    base = _row("base", "float32", 400_000, 396)
    small = _row("pruned80", "int8", 100_000, 390)  # -1.5 points: McNemar on 6 flips, p = 0.03: significant
    medium = _row("base", "int8", 110_000, 396)
    groups, _, _ = _decide([base, small, medium], budget=2.0)
    assert small["significant"] and small["p_value"] == pytest.approx(0.03125)
    assert [[r["variant"] for r in g] for g in groups["size"]] == [["pruned80"], ["base"]]
    assert medium["pareto_size"] and small["pareto_size"]


def test_faster_only_when_the_latency_intervals_separate():
    base = _row("base", "float32", 400_000, 396, latency=(0.116, 0.110, 0.125))
    overlapping = _row("base", "int8", 100_000, 396, latency=(0.113, 0.108, 0.119))
    separate = _row("qat", "int8", 100_000, 396, latency=(0.080, 0.078, 0.083))
    comparer = Comparer()
    assert comparer.cost(overlapping, base, LATENCY) == 0  # 0.113 vs 0.116 ms: tied, not "faster"
    assert comparer.cost(separate, base, LATENCY) == -1 and comparer.cost(base, separate, LATENCY) == 1
    groups, recs, _ = _decide([base, overlapping, separate])
    assert [[r["variant"] for r in g] for g in groups["latency_1t"]] == [["qat"]]
    fastest = next(r for r in recs if r["objective"] == "latency_1t")
    assert fastest["choice"] is separate and fastest["cost_vs_baseline"] == -1


def test_sizes_within_one_percent_are_tied():
    a, b, c = _row("a", "int8", 100_000, 396), _row("b", "int8", 100_900, 396), _row("c", "int8", 102_000, 396)
    assert Comparer.cost(a, b, SIZE) == 0 and Comparer.cost(a, c, SIZE) == -1 and Comparer.cost(c, a, SIZE) == 1


def test_an_over_budget_file_whose_change_is_not_significant_says_why():
    from runtime.report.render import notes

    rows = [{"variant": "base", "format": "float32", "status": "verified", "accuracy_change_pts": 0.0,
             "over_budget": False, "significant": False, "test_images": 359},
            {"variant": "pqat", "format": "int8", "status": "verified", "accuracy_change_pts": -1.11,
             "over_budget": True, "significant": False, "test_images": 359},
            {"variant": "pruned80", "format": "int8", "status": "verified", "accuracy_change_pts": -4.5,
             "over_budget": True, "significant": True, "test_images": 359}]
    lines = notes(rows, {}, 1.0)
    said = [line for line in lines if line.startswith("Over the budget, yet not significantly")]
    assert len(said) == 1 and "(pqat int8)" in said[0] and "359 test images" in said[0], lines
    assert "pruned80" not in said[0]


def test_files_of_one_graph_are_one_option_for_size_and_latency_but_not_for_gzip():
    base = _row("base", "float32", 400_000, 396, latency=(0.200, 0.190, 0.210))
    rows = [base]
    for i, (variant, correct, ms) in enumerate([("base", 394, 0.101), ("pruned50", 395, 0.099),
                                                ("clustered16", 393, 0.098), ("pruned80", 392, 0.100)]):
        row = _row(variant, "dynamic", 100_000 + i, correct, latency=(ms, ms - 0.004, ms + 0.004))
        row.update(graph="g-dynamic", gzip_bytes=90_000 - 10_000 * i)  # pruning and clustering: gzip only
        rows.append(row)
    _, recs, _ = _decide(rows)
    by = {r["objective"]: r for r in recs}
    for key in ("size", "latency_1t"):  # the most accurate of the graph, whichever measured 1 us faster
        assert by[key]["choice"]["variant"] == "pruned50", key
        assert {r["variant"] for r in by[key]["same_graph"]} == {"base", "clustered16", "pruned80"}
        assert by[key]["tied"] == []
    assert by["gzip"]["choice"]["variant"] == "pruned80" and by["gzip"]["same_graph"] == []
    rows[2]["graph"] = "another"  # another graph of the same size is another option, tied on size
    _, recs, _ = _decide(rows)
    size = next(r for r in recs if r["objective"] == "size")
    assert size["choice"]["variant"] == "pruned50" and [r["variant"] for r in size["tied"]] == ["base"]


def test_the_choice_is_on_the_front_when_a_file_of_its_graph_measured_faster():
    """A suite run failed when the latency front named qat int8 (measured faster) and the recommendation chose base
    int8 of the same graph (the most accurate of it): files of one graph are one option, on the front together."""
    base = _row("base", "float32", 400_000, 396, latency=(0.200, 0.190, 0.210))
    accurate = _row("base", "int8", 100_000, 396, latency=(0.1081, 0.1078, 0.1084))
    faster = _row("qat", "int8", 100_200, 395, latency=(0.1065, 0.1062, 0.1068))  # its interval apart: faster
    for row in (accurate, faster):
        row["graph"] = "g-int8"
    _, recs, _ = _decide([base, accurate, faster])
    latency = next(r for r in recs if r["objective"] == "latency_1t")
    assert latency["choice"] is accurate and accurate["pareto_latency_1t"] and faster["pareto_latency_1t"]


def _crowd():
    """A default pipeline's crowd: 7 variants x 6 formats at four sizes, gzip sizes spread by pruning, accuracies
    on seven levels, latency intervals."""
    rng = np.random.default_rng(0)
    base = _row("base", "float32", 1_875_000, 396, latency=(0.40, 0.38, 0.42))
    rows = [base]
    sizes = {"float32": 1_875_000, "float16": 940_000, "dynamic": 480_000, "int8": 482_000,
             "onnx-float32": 1_880_000, "onnx-int8": 490_000}
    for variant, pruned in [("base", 1.0), ("pruned50", 0.6), ("pruned80", 0.3), ("2of4", 0.55),
                            ("clustered16", 0.35), ("qat", 1.0), ("pqat", 0.32)]:
        for fmt, size in sizes.items():
            if (variant, fmt) == ("base", "float32"):
                continue
            ms = 0.1 + rng.random() * 0.3
            row = _row(variant, fmt, size + int(rng.integers(0, 300)), 392 + int(rng.integers(0, 6)),
                       latency=(ms, ms * 0.95, ms * 1.05))
            row["gzip_bytes"] = int(row["size_bytes"] * (0.9 if fmt in ("float32", "float16", "onnx-float32") else pruned))
            rows.append(row)
    return base, rows


def test_plots_name_every_mark_and_no_label_or_leader_crosses_another_label(tmp_path):
    """The report's figures as they are saved (runtime.report.plots.figures), on a default pipeline's crowd: a legend
    entry for every format's colour and every variant's marker, the front, the budget and the ring; the ring on
    each panel's recommended file and its label saying so; no two labels overlapping, no label on a point or a
    latency bar, no leader line crossing another label's text (the bounding boxes matplotlib reports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from runtime.report.plots import FIGURES, figures

    base, rows = _crowd()
    _, recs, _ = _decide(rows)
    chosen = {r["objective"]: r["choice"] for r in recs}
    seen = []
    for name, fig in figures(rows, 1.0, base, None, recs):
        fig.savefig(tmp_path / name)  # to look at when this fails
        renderer = fig.canvas.get_renderer()
        legend = {t.get_text() for t in fig.legends[0].get_texts()}
        assert {f"format {r['format']}" for r in rows} | {f"variant {r['variant']}" for r in rows} <= legend
        assert {"accuracy budget", "recommended for the panel's axis"} <= legend
        assert any(text.startswith("Pareto front") for text in legend)
        for ax, objective in zip(fig.axes, [o for o in OBJECTIVES if o.key in FIGURES[name]]):
            seen.append(objective.key)
            texts = ax.texts
            boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text, not its leader line
            assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), name
            for i, text in enumerate(texts):
                if text.arrow_patch is not None:
                    leader = text.arrow_patch.get_transform().transform_path(text.arrow_patch.get_path())
                    crossed = [texts[j].get_text() for j, b in enumerate(boxes) if j != i and leader.intersects_bbox(b)]
                    assert crossed == [], (name, text.get_text(), crossed)
            for r in rows:
                px, py = ax.transData.transform((r[objective.cost] / (1024 if "bytes" in objective.cost else 1),
                                                 r["accuracy"] * 100))
                assert not any(b.contains(px, py) for b in boxes), (name, r["variant"], r["format"])
                if objective.tag:
                    (x0, _), (x1, _) = ax.transData.transform([(r["latency_low_ms_1t"], 0), (r["latency_high_ms_1t"], 0)])
                    assert not any(b.x0 < x1 and x0 < b.x1 and b.y0 < py < b.y1 for b in boxes)
            ring = [t for t in texts if t.get_text().startswith("recommended: ")]
            choice = chosen[objective.key]
            assert len(ring) == 1 and f"{choice['variant']} {choice['format']}" in ring[0].get_text()
            assert len(texts) < len([r for r in rows if r.get(objective.cost) is not None])  # groups share labels
            assert any(len(line.get_xdata()) > 1 and line.get_color() == "black" for line in ax.lines)  # the front
        plt.close(fig)
    assert seen == ["size", "gzip", "latency_1t"]


def test_report_html_escapes_what_came_from_outside(tmp_path):
    from pathlib import Path

    from runtime.report.html import _inline, _table, _with_tooltips
    from runtime.report.plots import plot
    from runtime.text import markdown

    row = {"variant": "<img src=x onerror=alert(1)>", "format": "int8", "file": "/r/x/model.int8.tflite",
           "status": "failed", "reason": "</td><script>alert(1)</script>"}
    html = _table([row], Path("/r"))
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
    base = _row("base", "float32", 400_000, 396, latency=(0.4, 0.3, 0.5))
    rows = [base, _row("<script>alert(1)</script>", "int8", 100_000, 395, latency=(0.1, 0.09, 0.11)),
            _row("b-->x<!--", "dynamic", 90_000, 395, latency=(0.2, 0.19, 0.21))]
    _, recs, _ = _decide(rows)
    figures = plot(rows, tmp_path, 1.0, base, {"host": "<img src=x onerror=alert(1)>", "cpu": "&"}, recs)
    assert list(figures) == ["accuracy_vs_size.png", "accuracy_vs_latency.png"]
    page = "".join(_with_tooltips(svg, rows, Path("/r")) for svg in figures.values())
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;alert(1)" in page  # a tooltip
    line = _inline("**Ship base int8**: `a.tflite`; " + markdown("**not bold** <b>x</b> `tick`"))
    assert line.startswith("<strong>Ship base int8</strong>: <code>a.tflite</code>")
    assert "<b>" not in line and "**not bold**" in line and "<code>tick</code>" not in line


def test_a_microcontroller_answer_is_the_smallest_arena_that_fits_every_budget():
    base = _row("base", "float32", 400_000, 396)
    small = {**_row("base", "micro", 100_000, 395), "arena_bytes": 50_000, "flash_bytes": 100_000}
    tiny = {**_row("micro_cnn", "micro", 12_000, 394), "arena_bytes": 5_000, "flash_bytes": 12_000}
    broken = {**_row("pruned80", "micro", 30_000, 166), "arena_bytes": 1_000, "flash_bytes": 30_000}
    judge([base, small, tiny, broken], 1.0, max_ram=32 * 1024)
    assert small["over_memory"] and not tiny["over_memory"] and not broken["over_memory"]
    assert "over_memory" not in base  # a file that is no microcontroller's has no RAM budget
    comparer = Comparer()
    fronts([base, small, tiny, broken], comparer)
    arena = next(r for r in recommend([base, small, tiny, broken], comparer, 1.0) if r["objective"] == "arena")
    assert arena["choice"] is tiny  # broken is over the accuracy budget, small over the RAM
    judge([base, small, tiny], 1.0, max_ram=4 * 1024)  # nothing fits: the answer names the smallest arena
    rec = next(r for r in recommend([base, small, tiny], Comparer(), 1.0) if r["objective"] == "arena")
    assert rec["choice"] is None and rec["closest"] is tiny
    judge([base, small, tiny], 1.0, max_flash=50_000)
    assert small["over_memory"] and not tiny["over_memory"]


def test_a_file_that_needs_edgekits_runtime_is_recommended_only_for_a_device_that_runs_it():
    """The default run's answer was a sparse file that plain LiteRT refuses (issue 37): for a device running the
    user's own LiteRT app (the default) it is never a candidate; with --runtime edgekit it may be the answer."""
    from runtime.report.decide import for_device

    for runtime, expected in (("litert", "int8"), ("edgekit", "int8-sparse")):
        base = _row("base", "float32", 400_000, 396)
        dense = _row("pruned80", "int8", 100_000, 396)
        sparse = {**_row("pruned80", "int8-sparse", 60_000, 396),
                  "needs_edgekit": "its weights are sparse-encoded, which bare LiteRT's XNNPACK refuses"}
        rows = [base, dense, sparse]
        for_device(rows, runtime)
        _, recs, _ = _decide(rows)
        assert next(r for r in recs if r["objective"] == "size")["choice"]["format"] == expected, runtime
        assert bool(sparse.get("excluded")) is (runtime == "litert") and not dense.get("excluded")
    with pytest.raises(EdgeKitError, match="unknown runtime 'tflite'"):
        for_device(rows, "tflite")


def test_targets_stay_apart():
    """A run directory with micro files from an earlier `--target micro` run answered a Pi with "Ship base micro"
    (issue 37): a Pi's answer never names a micro file, a board's answer names nothing else."""
    from runtime.report.decide import for_device

    def rows():
        base, int8 = _row("base", "float32", 400_000, 396), _row("base", "int8", 100_000, 396)
        micro = {**_row("base", "micro", 90_000, 396), "arena_bytes": 20_000, "flash_bytes": 90_000}
        return [base, int8, micro]

    for objective, expected in (("size", "int8"), ("gzip", "int8"), ("arena", "micro")):
        table = rows()
        for_device(table, "litert", objective)
        _, recs, _ = _decide(table)
        shipped = {r["objective"]: r["choice"]["format"] for r in recs if r["choice"] is not None}
        key = "arena" if objective == "arena" else objective
        assert shipped[key] == expected, (objective, shipped)
        assert all(f == "micro" for f in shipped.values()) is (objective == "arena"), shipped
        if objective != "arena":  # a Pi's report has no board answer at all: not "nothing within the budget"
            assert "arena" not in {r["objective"] for r in recs}, recs


def test_the_recommendation_states_size_accuracy_and_latency_and_says_when_it_is_slower():
    """A PyTorch model's onnx-int8 file was recommended for size at 0.53x the float file's speed, said only in a
    note (issue 37): the recommendation itself now gives its latency against the baseline, and says "slower"."""
    from pathlib import Path

    from runtime.report.render import recommendation_md

    base = _row("base", "onnx-float32", 400_000, 396, latency=(0.30, 0.29, 0.31))
    int8 = _row("base", "onnx-int8", 100_000, 396, latency=(0.57, 0.55, 0.59))
    base.update(artifact="/r/base", file="/r/base/model.onnx-float32.onnx", speedup_1t=1.0)
    int8.update(artifact="/r/base", file="/r/base/model.onnx-int8.onnx", speedup_1t=0.30 / 0.57)
    _, recs, _ = _decide([base, int8])
    info = {"recommendations": recs, "objective": "size", "machine": {"cpu": "x86"}, "bench_settings": {}}
    text = "\n".join(recommendation_md(info, Path("/r")))
    assert "**Ship base onnx-int8**" in text and "- File size: 98 KiB" in text, text
    assert "- Accuracy: 99.00%" in text, text
    latency = next(line for line in text.splitlines() if line.startswith("- Latency at 1 thread"))
    assert "0.570 ms" in latency and "1.90x slower (intervals separate)" in latency, latency
    assert "**Slower than the float baseline**" in latency, latency


def test_without_a_float_file_the_report_says_its_baseline_is_quantized_and_names_the_sources_accuracy():
    """A .pt2 program exported to int8 alone (issue 40): the report's baseline was "the float baseline" though it
    was the int8 file itself. Now the header says there is no float file, the recommendation and a note say
    what that means, and the source's own accuracy (the PyTorch program run by torch at export) is named."""
    from pathlib import Path

    from runtime.report.render import header_rows, notes, recommendation_md

    int8 = _row("pt2", "int8", 70_000, 393)
    onnx_int8 = _row("pt2", "onnx-int8", 81_000, 393)
    for row in (int8, onnx_int8):
        row.update(artifact="/r/pt2", reference="the source PyTorch program", reference_accuracy=0.9861, model="cnn3")
    groups, recs, _ = _decide([int8, onnx_int8])
    info = {"recommendations": recs, "objective": "size", "machine": {"cpu": "x86"}, "bench_settings": {},
            "rows": [int8, onnx_int8], "baseline_row": recs[0]["baseline"], "budget": 1.0, "created": "now"}
    header = dict(header_rows(info))
    assert "float baseline" not in header and header["baseline (no float file)"].startswith("pt2 int8: 98.25%")
    assert header["source"].startswith("the source PyTorch program cnn3: 98.61% on the 400 test images")
    text = "\n".join(recommendation_md(info, Path("/r")))
    assert "It is the float baseline itself" not in text and "no float file was exported" in text, text
    note = next(n for n in notes([int8, onnx_int8], groups, 1.0) if n.startswith("No float file"))
    assert "export the float file too" in note and "the source's own 98.61%" in note, note
