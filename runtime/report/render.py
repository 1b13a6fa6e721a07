"""The report's files: report.md (recommendation first, then a header, the table, notes and plots),
report.csv (one row per file) and report.json (everything), with paths relative to the report's
directory and booleans as true/false."""

from __future__ import annotations

import csv
import io
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import runtime
from runtime.artifacts.manifest import sidecar_path
from runtime.bench import format_ms
from runtime.fsutil import atomic_write_json, atomic_write_text, relative
from runtime.report.decide import EXCLUDED, OBJECTIVES, SIZE_TIE, Comparer, group_label, primary, slower_quantized
from runtime.report.html import write_html
from runtime.report.rows import baseline, foreign_sources, is_float, label, points
from runtime.stats import ALPHA, CONFIDENCE
from runtime.text import markdown, spreadsheet

CSV_COLUMNS = (
    "variant", "format", "file", "status", "reason", "test_images", "accuracy", "accuracy_low", "accuracy_high",
    "accuracy_change_pts", "p_value", "significant", "over_budget", "agreement", "size_bytes", "gzip_bytes",
    "size_ratio", "latency_median_ms_1t", "latency_low_ms_1t", "latency_high_ms_1t", "latency_p90_ms_1t",
    "speedup_1t", "vs_baseline_1t", "threads_all", "latency_median_ms_all", "latency_low_ms_all",
    "latency_high_ms_all", "latency_p90_ms_all", "speedup_all", "vs_baseline_all", "pareto_size", "pareto_gzip",
    "pareto_latency_1t", "pareto_latency_all", "kind", "parent", "artifact", "macs", "arena_bytes", "flash_bytes",
    "over_memory", "pareto_arena", "needs_edgekit", "evaluated_by")


# --- figures as text ---------------------------------------------------------------------------------

def kib(value) -> str:
    return f"{value / 1024:,.0f} KiB" if value >= 10 * 1024 else f"{value / 1024:,.1f} KiB"


def ms(value) -> str:
    return f"{format_ms(value)} ms"


def accuracy_text(row: dict) -> str:
    return (f"{row['accuracy']:.2%} ({CONFIDENCE:.0%} CI {row['accuracy_low']:.1%} to {row['accuracy_high']:.1%}, "
            f"{row['test_images']} images)")


def change_text(row: dict) -> str:
    if row.get("accuracy_change_pts") is None:
        return "no baseline to compare with"
    change = f"{row['accuracy_change_pts']:+.2f} points"
    if row.get("p_value") is None:
        return f"{change}, {'significant' if row.get('significant') else 'not significant'} (intervals, other images)"
    verdict = "significant" if row["significant"] else "not significant"
    return f"{change}, {verdict} (exact McNemar p = {row['p_value']:.3g})"


def cost_text(row: dict, objective) -> str:
    value = row[objective.cost]
    if objective.tag:
        return (f"{ms(value)} median at {row.get('threads_all', 1) if objective.tag == 'all' else 1} thread(s) "
                f"(95% CI {ms(row[f'latency_low_ms_{objective.tag}'])} to {ms(row[f'latency_high_ms_{objective.tag}'])})")
    if objective.key == "arena":
        return f"{kib(value)} of RAM, {kib(row['flash_bytes'])} of flash"
    return kib(value) + (" gzip" if objective.key == "gzip" else "")


def _versus(a: dict, b: dict, objective, verdict: int) -> str:
    """'4.02x smaller' / '1.90x larger' / '1.31x faster (intervals separate)' / '1.90x slower (...)' / 'tied':
    the ratio always at least 1, read with its word."""
    x, y = a[objective.cost], b[objective.cost]
    if objective.tag:
        if verdict == 0:
            return f"tied ({y / x:.2f}x, intervals overlap)"
        return f"{max(x, y) / min(x, y):.2f}x {'faster' if verdict < 0 else 'slower'} (intervals separate)"
    if verdict == 0:
        return f"tied (within {SIZE_TIE:.0%})"
    return f"{max(x, y) / min(x, y):.2f}x {'smaller' if verdict < 0 else 'larger'}"


def _other_costs(choice: dict, base: dict | None, objective) -> list[str]:
    """The recommendation's size and latency lines besides its objective's: each against the float baseline with
    its interval, and a quantized file slower than the baseline said so in the recommendation itself."""
    lines = []
    for other in (o for o in OBJECTIVES if o.key in ("size", "latency_1t") and o.key != objective.key
                  and not (objective.tag and o.tag)):
        if choice.get(other.cost) is None:
            continue
        line = f"- {other.axis.capitalize()}: {cost_text(choice, other)}"
        if base is not None and base is not choice and base.get(other.cost) is not None:
            line += (f"; against the float baseline ({cost_text(base, other)}): "
                     f"{_versus(choice, base, other, Comparer.cost(choice, base, other))}")
        if other.tag and slower_quantized(choice, other.tag):
            line += (f". **Slower than the float baseline** at 1 thread: quantized for {objective.axis}, it costs "
                     "speed here (`--objective latency` answers for speed)")
        lines.append(line + ".")
    return lines


def names(rows: list[dict], limit: int = 3) -> str:
    """'a int8, b int8 and 4 more (see the table)': a list kept short."""
    shown = ", ".join(label(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more (see the table)" if len(rows) > limit else "")


def unresolved(row: dict, objective) -> bool:
    """A latency whose 95% interval is wider than its median: too few or too noisy rounds to rank it."""
    if not objective.tag:
        return False
    tag = objective.tag
    return row[f"latency_high_ms_{tag}"] - row[f"latency_low_ms_{tag}"] > row[f"latency_median_ms_{tag}"]


def fence(text: str, info: str = "bash") -> list[str]:
    """A Markdown code block around `text`, its fence longer than any run of backticks in it."""

    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [ticks + info, text, ticks]


def interpreter() -> str:
    """The Python that runs EdgeKit here, as a new shell at the current directory reaches it (`.venv/bin/python`
    below it, else its absolute path): printed commands then run without activating anything."""

    path = Path(sys.executable)
    shown = relative(path, Path.cwd()) if path.is_absolute() else str(path)
    return shlex.quote(shown if not shown.startswith("..") else str(path))


def commands(row: dict) -> str:
    """What to run, from the current directory, as printed in a new shell: evaluate the file here (with the
    Python that made the report); build EdgeKit's source package (one file for any CPU: pip builds it on the
    device), copy it with the model and its sidecar, install and run there."""

    here = relative(row["file"], Path.cwd())
    py = interpreter()
    name = Path(row["file"]).name
    sidecar = relative(sidecar_path(row["file"]), Path.cwd())
    repository = Path(runtime.__file__).resolve().parents[1]
    source = relative(repository, Path.cwd()) if (repository / "pyproject.toml").is_file() else "EDGEKIT_REPOSITORY"
    try:
        version = metadata.version("edgekit-ml")
    except metadata.PackageNotFoundError:
        version = "VERSION"
    if row.get("format") == "micro":  # a firmware's files, not a Python install
        folder = relative(Path(row["file"]).parent, Path.cwd())
        sources = " ".join(shlex.quote(str(Path(folder) / f"model.micro.{ext}")) for ext in ("cc", "h"))
        return "\n".join([
            f"{py} -m runtime eval {shlex.quote(here)} --backend micro   # in TFLM's interpreter, here",
            f"cp {sources} FIRMWARE/src/   # the model as a C array, its arena size and op resolver",
            "# in the firmware (TFLM): const tflite::Model* model = tflite::GetModel(g_model);",
            "#   EdgeKitOpResolver resolver; RegisterEdgeKitOps(resolver);",
            "#   alignas(16) static uint8_t arena[g_model_arena_bytes];",
            "#   tflite::MicroInterpreter interpreter(model, resolver, arena, sizeof(arena));"])
    sdist = f"edgekit_ml-{version}.tar.gz"
    copy = " ".join(shlex.quote(p) for p in (f"dist/{sdist}", here, *([sidecar] if Path(sidecar).is_file() else [])))
    return "\n".join([
        f"{py} -m runtime eval {shlex.quote(here)}          # again, here",
        f"{py} -m build --sdist --outdir dist {shlex.quote(source)}   # EdgeKit as one file for any CPU",
        f"scp {copy} pi@raspberrypi.local:   # your device",
        "# on the device: the runtime only, no TensorFlow (README, Raspberry Pi)",
        f"python3 -m venv ~/edgekit && ~/edgekit/bin/pip install ~/{sdist}",
        f"~/edgekit/bin/python -m runtime predict ~/{shlex.quote(name)} IMAGE.png",
        f"~/edgekit/bin/python -m runtime bench ~/{shlex.quote(name)} --threads 1,all   # its latency there, at 1 "
        "thread and all of its cores",
        "# or, back here, over SSH: the device's figures beside this machine's (README, Raspberry Pi)",
        f"{py} -m runtime bench {shlex.quote(here)} --host pi@raspberrypi.local "
        "--remote-python '~/edgekit/bin/python' --threads 1,all"])


def recommendation_md(info: dict, root: Path) -> list[str]:
    """The answer first: the file to ship for the objective the user named, its cost against the float baseline,
    why it beat the next best, and the commands; then one line for each other objective."""

    recs, choice_name = info["recommendations"], info.get("objective") or "size"
    rec = primary(recs, choice_name)
    if rec is None:
        return ["## Recommendation", "", f"Nothing measured answers `--objective {choice_name}`"
                + (" (latency needs benchmarks: drop --no-bench)." if choice_name == "latency" else ".")]
    objective = next(o for o in OBJECTIVES if o.key == rec["objective"])
    md = [f"## Recommendation: {rec['goal']}, within the budget of {points(rec['budget'])}", ""]
    if rec["choice"] is None and rec["closest"].get("over_memory"):
        c = rec["closest"]
        md += [f"No microcontroller file fits `--max-ram`/`--max-flash`: the smallest arena, {label(c)} "
               f"(`{markdown(relative(c['file'], root))}`), needs {cost_text(c, objective)}. Choose a smaller model "
               "(`micro_cnn`) or a board with more memory."]
    elif rec["choice"] is None:
        c = rec["closest"]
        md += [f"No file is within the budget of {points(rec['budget'])} below the float baseline; the closest is "
               f"{label(c)} (`{markdown(relative(c['file'], root))}`) at {accuracy_text(c)}, {change_text(c)}. "
               "Raise `--max-accuracy-drop` only if that loss is acceptable, or train longer."]
    else:
        choice, base = rec["choice"], rec.get("baseline")
        md += [f"**Ship {label(choice)}**: `{markdown(relative(choice['file'], root))}`", ""]
        cost = f"- {objective.axis.capitalize()}: {cost_text(choice, objective)}"
        if base is not None and base is not choice and rec.get("cost_vs_baseline") is not None:
            cost += (f"; against the float baseline ({label(base)}, {cost_text(base, objective)}): "
                     f"{_versus(choice, base, objective, rec['cost_vs_baseline'])}")
        md.append(cost + ".")
        md.append(f"- Accuracy: {accuracy_text(choice)}" + (f"; against the float baseline: {change_text(choice)}."
                                                            if base is not None and base is not choice else "."))
        md += _other_costs(choice, base, objective)
        if base is choice:
            md.append("- It is the float baseline itself: no optimized file within the budget beats it here." if
                      is_float(choice) else "- It is the baseline itself: no float file was exported to compare "
                      "it with (see the notes).")
        runner = rec.get("runner_up")
        if runner is not None and runner is not base:
            md.append(f"- Why this one: against the next best, {label(runner)} ({cost_text(runner, objective)}, "
                      f"{runner['accuracy']:.2%}): {_versus(choice, runner, objective, Comparer.cost(choice, runner, objective))}.")
        if rec.get("same_graph"):
            md.append(f"- One graph with {names(rec['same_graph'])}: the same operators and shapes, so the same "
                      f"{'speed' if objective.tag else 'file size'}; this one is the most accurate of them.")
        if rec.get("tied"):
            md.append(f"- Tied on {objective.axis} and accuracy with {names(rec['tied'])}; chosen as the most "
                      "accurate.")
        if unresolved(choice, objective):
            md.append(f"- Unresolved: its latency interval is wider than the latency itself at "
                      f"{(info.get('bench_settings') or {}).get('rounds', '?')} rounds; `--rounds 30 --rebench` "
                      "measures it again, longer.")
        m = info["machine"]
        if objective.key == "arena":
            md.append("- The arena is TensorFlow Lite Micro's own figure (its RecordingMicroAllocator, on this 64-bit "
                      "machine; a 32-bit core's is slightly smaller); accuracy is TFLM's outputs, verified at export. "
                      "Add your firmware's own buffers to the RAM.")
        elif m.get("host"):
            md.append(f"- Latency measured on the device, {machine_md(m)}. "
                      + ("This ranking is that device's." if objective.tag else
                         "Size and accuracy are the same on any device."))
        else:
            md.append(f"- Measured on this machine ({machine_md(m)}). "
                      + ("A device ranks latency by its own CPU: measure it there (`--host`, or the last command "
                         "below)." if objective.tag else "Size and accuracy are the same on any device; latency is "
                                                         "not (`--host` measures it there)."))
        md += ["", *fence(commands(choice))]
        deployed = info.get("deploy") or []
        if "deploy/predict.py" in deployed:
            package = "onnxruntime" if str(choice["file"]).endswith(".onnx") else "ai-edge-litert"
            md += ["", f"Without EdgeKit on the device: `deploy/` holds the file and `predict.py`, which needs only "
                   f"`{package}`, numpy and Pillow (the preprocessing, quantization and labels are written in):", "",
                   *fence(f"scp -r {shlex.quote(relative(root / 'deploy', Path.cwd()))} pi@raspberrypi.local:\n"
                          f"# on the device\npip install {package} numpy Pillow\npython3 deploy/predict.py IMAGE.png")]
        elif "deploy/main.cc" in deployed:
            md += ["", "`deploy/main.cc` classifies images with nothing but TFLM and the generated header "
                   "(`deploy/model.micro.cc`, `deploy/model.micro.h`): copy the three into the firmware; its "
                   "`main()` checks the board on the first test image (`-DEDGEKIT_NO_MAIN` when the firmware has "
                   "its own), and `python scripts/check-micro-firmware RUN` in EdgeKit's repository builds it "
                   "against TFLM on this machine and runs the test split through it."]
    others = [r for r in recs if r is not rec]
    if others:
        md += ["", "Other objectives, within the same budget:", ""]
        for r in others:
            o = next(x for x in OBJECTIVES if x.key == r["objective"])
            if r["choice"] is None:
                md.append(f"- {r['goal'].capitalize()}: no file within the budget.")
                continue
            c = r["choice"]
            extra = [f"one graph with {len(r['same_graph'])} more"] if r.get("same_graph") else []
            extra += [f"tied with {len(r['tied'])} more"] if r.get("tied") else []
            extra += ["interval unresolved"] if unresolved(c, o) else []
            md.append(f"- {r['goal'].capitalize()}: {label(c)} (`{markdown(relative(c['file'], root))}`), "
                      f"{cost_text(c, o)}, {c['accuracy']:.2%}" + (f" ({', '.join(extra)})" if extra else "") + ".")
    return md


def console_summary(recommendations: list[dict], root: Path, choice: str = "size") -> list[str]:
    """The last lines the pipeline and `runtime report` print: one line per objective, `--objective`'s first."""

    first = primary(recommendations, choice)
    out = []
    for rec in sorted(recommendations, key=lambda r: r is not first):
        objective = next(o for o in OBJECTIVES if o.key == rec["objective"])
        if rec["choice"] is None:
            c = rec["closest"]
            out.append(f"{rec['goal']}: no micro file fits --max-ram/--max-flash; the smallest, {label(c)}, needs "
                       f"{cost_text(c, objective)}" if c.get("over_memory") else
                       f"{rec['goal']}: nothing within the {rec['budget']:g}-point budget; closest {label(c)} "
                       f"({c['accuracy_change_pts']:+.2f} points)")
            continue
        c = rec["choice"]
        verdict = "n.s." if not c.get("significant") else f"p = {c['p_value']:.3g}" if c.get("p_value") else "sig."
        change = f", {c['accuracy_change_pts']:+.2f} pts {verdict}" if c.get("accuracy_change_pts") is not None else ""
        out.append(f"{rec['goal']}: {label(c)}, {cost_text(c, objective)}, {c['accuracy']:.2%}{change} -> "
                   f"{relative(c['file'], root)}")
    return out


def notes(rows: list[dict], groups: dict, budget: float) -> list[str]:
    out = []
    over = [f"{label(r)} ({r['accuracy_change_pts']:+.2f})" for r in rows if r.get("over_budget")]
    out.append(f"Over the {budget:g}-point budget (never on a Pareto front, never recommended): "
               + (", ".join(over) if over else "none") + ".")
    unsure = [r for r in rows if r.get("over_budget") and not r.get("significant")]
    if unsure:
        out.append(f"Over the budget, yet not significantly less accurate ({', '.join(label(r) for r in unsure)}): "
                   f"the budget limits the measured drop, and each measured more than {points(budget)} below the "
                   f"baseline on its {unsure[0].get('test_images', 0):,} test images, while a change that size is "
                   "within chance there (McNemar p >= 0.05). Such a file may be as good; a larger test split "
                   "would tell.")
    for objective in OBJECTIVES:
        front = groups.get(objective.key)
        if front:
            parts = [f"{group_label(g)}" + (" (tied)" if len(g) > 1 else "") for g in front]
            out.append(f"Pareto front, accuracy vs {objective.axis} (cheapest first, tied files grouped): "
                       f"{'; '.join(parts)}.")
    for tag, where in (("1t", "1 thread"), ("all", "all threads")):
        slower = [f"{label(r)} {r[f'speedup_{tag}']:.2f}x" + ("" if r.get(f"vs_baseline_{tag}") == "slower" else
                                                              " (within noise)")
                  for r in rows if slower_quantized(r, tag)]
        if slower:
            out.append(f"Quantized but slower than the float baseline at {where} (speed vs baseline; never "
                       f"recommended for latency): {', '.join(slower)}.")
    first = baseline(rows)
    if first is not None and not is_float(first):
        out.append(f"No float file among these: the baseline is {label(first)}, itself quantized, so every change is "
                   "measured against it; export the float file too (--tflite, or --format float32) to see what "
                   "quantization cost"
                   + (f", against the source's own {first['reference_accuracy'] * 100:.2f}%."
                      if first.get("reference") else "."))
    base = {r["format"]: r for r in rows if r["variant"] == "base" and r.get("size_bytes")}
    pairs = [(r, base[r["format"]]) for r in rows if r.get("kind") in ("clustered", "cqat") and r.get("size_bytes")
             and r["format"] in base]
    if pairs:
        c, b = min(pairs, key=lambda p: p[0]["gzip_bytes"] / p[1]["gzip_bytes"])
        out.append(f"Clustering pays in gzip only: a clustered file stores every weight at full width, so it is as "
                   f"large as its parent's ({label(c)} {kib(c['size_bytes'])}, {label(b)} {kib(b['size_bytes'])}); "
                   f"gzip finds its repeated values ({kib(c['gzip_bytes'])} against {kib(b['gzip_bytes'])} gzip).")
    excluded = [label(r) for r in rows if r.get("excluded") == EXCLUDED["edgekit"]]
    if excluded:
        out.append(f"Needs EdgeKit's runtime on the device (bare LiteRT or onnxruntime refused it at export; never "
                   f"recommended unless `--runtime edgekit` says the device runs EdgeKit): {', '.join(excluded)}.")
    sparse = [r for r in rows if (r.get("sparse_encoding") or {}).get("dense_bytes")]
    if sparse:
        out.append("Sparse encoding (`export --sparse`, the converter's, for pruned weights; EdgeKit's runtime "
                   "densifies it at load, so it runs as fast as the dense one there, and bare LiteRT's XNNPACK "
                   "refuses an int8 or dynamic one): " + ", ".join(
                       f"{label(r)} {kib(r['size_bytes'])} instead of {kib(r['sparse_encoding']['dense_bytes'])}"
                       for r in sparse) + ". Its gzip may be larger than the dense file's, whose zeros compress: "
                   "`--objective gzip` writes pruned files dense.")
    failed = [f"{label(r)}: {markdown(r['reason'])}" for r in rows if r["status"] != "verified"]
    out.append("Failed: " + ("; ".join(failed) if failed else "none") + ".")
    return out


# --- report.md ----------------------------------------------------------------------------------------

def _cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "kib":
        return f"{value / 1024:,.1f}"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "bool":
        return "yes" if value else ""
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    n_all = next((r["threads_all"] for r in rows if r.get("threads_all")), None)
    head = ["variant", "format", "size KiB", "gzip KiB", "size vs float", "accuracy (95% CI)", "change (pts)",
            "McNemar p", "agreement", "p50 ms 1t (95% CI)", f"p50 ms {n_all}t (95% CI)", "speed vs float 1t",
            "MACs", "arena KiB", "Pareto", "budget", "status"]
    micro = any(r.get("arena_bytes") is not None for r in rows)
    keep = [i for i, h in enumerate(head) if (n_all or f"{n_all}t" not in h) and (micro or h != "arena KiB")]
    lines = ["| " + " | ".join(head[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    for r in rows:
        fronts = ", ".join(tag for tag, key in (("size", "pareto_size"), ("gzip", "pareto_gzip"),
                                                ("1t", "pareto_latency_1t"), (f"{n_all}t", "pareto_latency_all"))
                           if r.get(key))
        acc = (f"{r['accuracy']:.2%} ({r['accuracy_low']:.1%}-{r['accuracy_high']:.1%})"
               + (" by TFLM" if r.get("evaluated_by") == "tflite-micro" else "")
               if r.get("accuracy") is not None else "-")
        change = "-" if r.get("accuracy_change_pts") is None else (
            f"{r['accuracy_change_pts']:+.2f}" + ("" if r.get("significant") or r.get("p_value") == 1.0
                                                   and r["accuracy_change_pts"] == 0 else " (n.s.)"))
        latency = {tag: ("-" if r.get(f"latency_median_ms_{tag}") is None else
                         f"{r[f'latency_median_ms_{tag}']:.3f} ({r[f'latency_low_ms_{tag}']:.3f}-"
                         f"{r[f'latency_high_ms_{tag}']:.3f})") for tag in ("1t", "all")}
        speed = "-" if r.get("speedup_1t") is None else f"{r['speedup_1t']:.2f}x ({r['vs_baseline_1t']})"
        cells = [r["variant"], r["format"], _cell(r.get("size_bytes"), "kib"), _cell(r.get("gzip_bytes"), "kib"),
                 _cell(r.get("size_ratio"), "ratio"), acc, change,
                 "-" if r.get("p_value") is None else f"{r['p_value']:.3g}",
                 "-" if r.get("agreement") is None else f"{r['agreement']:.2%}", latency["1t"], latency["all"],
                 speed, "-" if r.get("macs") is None else f"{r['macs'] / 1e6:,.2f} M",
                 _cell(r.get("arena_bytes"), "kib"), fronts,
                 "**over**" if r.get("over_budget") else "**over RAM/flash**" if r.get("over_memory") else
                 f"**{r['excluded']}**" if r.get("excluded") else ("within" if "over_budget" in r else "-"),
                 "verified" if r["status"] == "verified" else f"failed: {markdown(r['reason'])}"]
        lines.append("| " + " | ".join(str(cells[i]).replace("|", "/") for i in keep) + " |")
    return "\n".join(lines)


def machine_md(m: dict) -> str:
    """'`pi@raspberrypi`: Raspberry Pi 4 Model B Rev 1.4, Cortex-A72, 4 cores (aarch64)', escaped: a device's own
    words are untrusted."""
    what = ", ".join(markdown(m[k]) for k in ("board", "cpu") if m.get(k))
    where = f"{markdown(m['host'])}: " if m.get("host") else ""
    return f"{where}{what}, {markdown(m.get('cores'))} cores ({markdown(m.get('machine'))})"


def source_rows(rows: list[dict]) -> list[tuple[str, str]]:
    """A model from elsewhere (a PyTorch program, an ONNX or TFLite file) that the files were made from and verified
    against: its own accuracy on the test split, as export measured it running the source itself."""
    return [("source", f"{markdown(s['reference'])} {markdown(s['model'] or '')}: {s['accuracy'] * 100:.2f}% on the "
                       f"{s['test_images'] or '-'} test images, run by its own framework at export (every file "
                       "verified against it)")
            for s in foreign_sources(rows)]


def header_rows(info: dict) -> list[tuple[str, str]]:
    """The header's (name, value) pairs, values as Markdown (escaped)."""
    m, base, settings = info["machine"], info.get("baseline_row"), info.get("bench_settings")
    images = sorted({r["test_images"] for r in info["rows"] if r.get("test_images")})
    rows = [
        ("model", markdown(info.get("model") or "-")),
        ("dataset", f"{markdown(info.get('dataset') or '-')}, test split of {' / '.join(map(str, images)) or '-'} images"),
        *source_rows(info["rows"]),
        ("float baseline" if base is None or is_float(base) else "baseline (no float file)",
         f"{label(base)}: {accuracy_text(base)}" if base else "none"),
        ("accuracy budget", f"{points(info['budget'])} below the baseline" +
         (f" (files under {base['accuracy'] * 100 - info['budget']:.2f}% are over budget)" if base else "")),
        ("significance", f"exact McNemar test on the same images, p < {ALPHA:g}; intervals {CONFIDENCE:.0%} "
                         "(Wilson score for accuracy, order statistics of round medians for latency)"),
        ("latency", "not measured (--no-bench)" if not settings else
         f"whole `predict` on one image of uint8 pixels (batch 1), threads {', '.join(map(str, settings['threads']))}; "
         f"{settings['rounds']} interleaved rounds of "
         + (f"{settings['runs']} calls" if settings.get("runs") else f"{settings['seconds'] / settings['rounds']:.3g} s")
         + " per file"),
        ("device" if m.get("host") else "machine", machine_md(m) + f", {markdown(m.get('system'))}"
         + (" (latency measured there over SSH; accuracy here)" if m.get("host") else "")),
        ("libraries", ", ".join(f"{markdown(k)} {markdown(v)}" for k, v in (m.get("versions") or {}).items())),
        ("created", info["created"]),
    ]
    return rows


def header(info: dict) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {str(v).replace('|', '/')} |" for k, v in header_rows(info))]


def write(root: Path, info: dict) -> None:
    """report.json, report.csv and report.md, each written atomically."""
    rows = info["rows"]
    atomic_write_json(root / "report.json", to_json(root, info))
    atomic_write_text(root / "report.csv", to_csv(rows, root))
    verified = sum(r["status"] == "verified" for r in rows)
    md = [f"# EdgeKit report: {markdown(info['model'] or root.name)} on {markdown(info['dataset'] or '?')}", "",
          ]
    if info["recommendations"]:
        recommendation = recommendation_md(info, root)
    else:
        recommendation = ["## Recommendation", "", "No file was evaluated, so there is nothing to recommend."]
    md += recommendation
    md += ["", *header(info), "", f"## All files ({verified} of {len(rows)} verified)", "",
           "Accuracy on the fixed test split through EdgeKit's TensorFlow-free runtime. A change is significant only "
           "by the exact McNemar test on the same images; one file is faster than another only when the latency "
           "intervals separate. `--rounds` and `--seconds` measure longer; `--rebench` measures again.", "",
           markdown_table(rows), ""]
    if info.get("search_lines"):
        md += [*info["search_lines"], ""]
    md += ["## Notes", ""]
    md += [f"- {n}" for n in info["notes"]]
    if info["plots"]:
        md += ["", "## Plots", ""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in info["plots"]]
    elif info.get("plots_missing"):
        md += ["", f"Plots: {info['plots_missing']}"]
    atomic_write_text(root / "report.md", "\n".join(md) + "\n")
    write_html(root, info, recommendation, header_rows(info))


def to_csv(rows: list[dict], root: Path) -> str:
    """report.csv: one row per file, paths relative to the report, every cell a spreadsheet shows as text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_value(k, r.get(k), root) for k in CSV_COLUMNS})
    return buffer.getvalue()


def _csv_value(key: str, value, root: Path):
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in ("file", "artifact"):
        return spreadsheet(relative(value, root))
    return spreadsheet(value)


def public(row: dict, root: Path) -> dict:
    """A row as written: no working fields (those starting with _), paths relative to the report."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    for key in ("file", "artifact"):
        out[key] = relative(out.get(key), root)
    return out


def to_json(root: Path, info: dict) -> dict:
    def brief(row):
        return None if row is None else {"label": label(row), "file": relative(row["file"], root)}

    recs = [{"objective": r["objective"], "goal": r["goal"], "budget": r["budget"], "choice": brief(r["choice"]),
             "closest": brief(r.get("closest")), "tied": [brief(t) for t in r.get("tied", [])],
             "runner_up": brief(r.get("runner_up")), "same_graph": [brief(t) for t in r.get("same_graph", [])]}
            for r in info["recommendations"]]
    return {"created": info["created"], "directory": ".", "model": info["model"], "dataset": info["dataset"],
            "machine": info["machine"], "budget_points": info["budget"], "objective": info.get("objective"),
            "baseline": label(info["baseline_row"]) if info["baseline_row"] else None,
            "sources": foreign_sources(info["rows"]),
            "bench_settings": info["bench_settings"], "recommendations": recs, "summary": info["summary"],
            "notes": info["notes"], "plots": [*info["plots"], *info.get("search_plots", [])],
            "rows": [public(r, root) for r in info["rows"]]}
