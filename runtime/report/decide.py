"""What the report concludes from the rows: each file's accuracy against the budget and the baseline,
which files are tied, the Pareto fronts, and the file to ship for each objective.

The rules, stated once:
- over budget: accuracy more than `budget` points below the float baseline (the export verification's
  `--max-accuracy-drop`, default 1.0). Such a file is reported, never Pareto-optimal, never recommended.
- more accurate: only when the exact McNemar test on the same images says so (p < 0.05); on different
  test sets, only when the Wilson intervals separate. Otherwise tied.
- smaller: by more than SIZE_TIE (1%) of the larger file; faster: only when the latency intervals
  separate. Otherwise tied.
- slower than the baseline: a quantized file whose median latency is above the float baseline's (speedup
  below 1x) at a thread count is marked so and never recommended for latency there: quantizing exists to buy
  speed or size, and onnxruntime's QDQ int8 can cost speed on small models (a PyTorch CNN: 0.7x).
- one graph: files with the same operators, shapes and dtypes (`Model.graph`) and sizes within SIZE_TIE run
  alike, so for file size and latency they are one option, represented by the most accurate of them (then the
  smallest download); for gzip they stay apart (pruning and clustering change what gzip finds), and for a
  microcontroller's arena too (TFLM measured 54,400 bytes for a QAT file of the graph whose parent needs 55,520).
- Pareto-optimal (per objective): within budget and not dominated, where a file dominates another when it
  is nowhere worse and somewhere better by the rules above. Optimal files tied on both axes form one group.
"""

from __future__ import annotations

import dataclasses

from runtime.artifacts.manifest import DEVICE_RUNTIMES
from runtime.errors import unknown
from runtime.report.rows import agreement, baseline, label
from runtime.stats import ALPHA, accuracy_interval, mcnemar
from runtime.vocabulary import FILE_FORMATS

SIZE_TIE = 0.01


@dataclasses.dataclass(frozen=True)
class Objective:
    key: str  # the Pareto flag is pareto_<key>
    cost: str  # the row's field to minimize
    goal: str  # what a person wants: "smallest file"
    axis: str  # the plot's axis: "file size"
    tag: str = ""  # latency: "1t" or "all"


# what `--objective` names (report, pipeline) -> the objectives that answer it, the first measured one decides
CHOICES = {"size": ("size",), "gzip": ("gzip",), "latency": ("latency_1t", "latency_all"), "arena": ("arena",)}
DEFAULT_CHOICE = "size"

OBJECTIVES = (
    Objective("size", "size_bytes", "smallest file", "file size"),
    Objective("gzip", "gzip_bytes", "smallest download (gzip)", "gzip size"),
    Objective("latency_1t", "latency_median_ms_1t", "fastest at 1 thread", "latency at 1 thread", "1t"),
    Objective("latency_all", "latency_median_ms_all", "fastest at all threads", "latency at all threads", "all"),
    # microcontroller files only (format micro): the tensor arena TFLM measured, the RAM a board must have
    Objective("arena", "arena_bytes", "smallest RAM on a microcontroller (tensor arena)", "tensor arena"),
)


RUNTIMES = DEVICE_RUNTIMES


EXCLUDED = {"edgekit": "needs EdgeKit", "micro": "for a microcontroller", "not micro": "not for a microcontroller"}


def for_device(rows: list[dict], runtime: str, objective: str = DEFAULT_CHOICE) -> None:
    """Mark `excluded` (never a candidate; EXCLUDED says why) each file the target does not run: one that needs
    EdgeKit's runtime (`needs_edgekit`, from its sidecar) when the device runs the user's own LiteRT or onnxruntime
    app; a microcontroller file (format micro, run by TFLM) unless the answer is for a board (objective arena,
    which `--target micro` means), and every other file when it is. Targets stay apart: a run directory that
    holds both kinds (a --target micro run, then a plain one) never answers for a Pi with a firmware's file."""

    if runtime not in RUNTIMES:
        raise unknown("runtime", runtime, RUNTIMES)
    board = objective == "arena"
    for row in rows:
        micro = row.get("format") == "micro"
        if micro != board:
            row["excluded"] = EXCLUDED["not micro" if board else "micro"]
        elif row.get("needs_edgekit") and runtime != "edgekit":
            row["excluded"] = EXCLUDED["edgekit"]


def judge(rows: list[dict], budget: float, max_ram: int | None = None, max_flash: int | None = None) -> dict | None:
    """Each evaluated row's interval, change against the baseline with its significance, and whether it is
    over the budget (accuracy) or, a microcontroller file, over `max_ram` (its arena) or `max_flash` (its bytes):
    `over_memory`, which also keeps it out of every recommendation. Returns the baseline row."""
    base = baseline(rows)
    for row in rows:
        if row.get("arena_bytes") is not None:
            row["over_memory"] = bool(max_ram is not None and row["arena_bytes"] > max_ram
                                      or max_flash is not None and row["flash_bytes"] > max_flash)
        if row.get("accuracy") is None:
            continue
        row["accuracy_low"], row["accuracy_high"] = accuracy_interval(row["correct"], row["test_images"])
        if base is None:
            continue
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
        row["accuracy_change_pts"] = (row["accuracy"] - base["accuracy"]) * 100
        row["agreement"] = agreement(row, base)
        if row is base:
            row.update(p_value=1.0, significant=False, over_budget=False)
            continue
        if row["_images"] == base["_images"]:
            test = mcnemar(row["_correct"], base["_correct"])
            row.update(p_value=test["p_value"], significant=test["p_value"] < ALPHA,
                       only_this_right=test["first_only"], only_baseline_right=test["second_only"])
        else:  # judged on other images: only separated intervals count
            row.update(p_value=None, significant=(row["accuracy_high"] < base["accuracy_low"]
                                                  or base["accuracy_high"] < row["accuracy_low"]))
        row["over_budget"] = row["accuracy_change_pts"] < -budget - 1e-9
    return base


class Comparer:
    """Pairwise comparisons by the module's rules; McNemar tests are computed once per pair."""

    def __init__(self):
        self._tests = {}

    def accuracy(self, a: dict, b: dict) -> int:
        """1: a is significantly more accurate than b; -1: less; 0: tied."""
        if a is b or a["correct"] == b["correct"] and a["test_images"] == b["test_images"]:
            return 0
        if a["_images"] == b["_images"]:
            pair = (id(a), id(b))
            if pair not in self._tests:
                self._tests[pair] = mcnemar(a["_correct"], b["_correct"])["p_value"]
            if self._tests[pair] >= ALPHA:
                return 0
            return 1 if a["accuracy"] > b["accuracy"] else -1
        if a["accuracy_low"] > b["accuracy_high"]:
            return 1
        return -1 if a["accuracy_high"] < b["accuracy_low"] else 0

    @staticmethod
    def cost(a: dict, b: dict, objective: Objective) -> int:
        """-1: a is cheaper (smaller, faster) than b; 1: dearer; 0: tied."""
        x, y = a[objective.cost], b[objective.cost]
        if objective.tag:  # latency: intervals must separate
            if a[f"latency_high_ms_{objective.tag}"] < b[f"latency_low_ms_{objective.tag}"]:
                return -1
            return 1 if b[f"latency_high_ms_{objective.tag}"] < a[f"latency_low_ms_{objective.tag}"] else 0
        if abs(x - y) <= SIZE_TIE * max(x, y):
            return 0
        return -1 if x < y else 1

    def dominates(self, a: dict, b: dict, objective: Objective) -> bool:
        cost, accuracy = self.cost(a, b, objective), self.accuracy(a, b)
        return cost <= 0 and accuracy >= 0 and (cost < 0 or accuracy > 0)


def slower_quantized(row: dict, tag: str) -> bool:
    """A quantized file whose median latency at `tag` ("1t", "all") is above the float baseline's."""

    fmt = FILE_FORMATS.get(row.get("format"))
    return fmt is not None and fmt.kind == "quantized" and (row.get(f"speedup_{tag}") or 1.0) < 1.0


def candidates(rows: list[dict], objective: Objective) -> list[dict]:
    """Evaluated files within the budget that have the objective's cost (for latency, no quantized file slower
    than the baseline), and not `excluded` (a file that needs EdgeKit's runtime, for a device without it)."""
    return [r for r in rows if r["status"] == "verified" and r.get("accuracy") is not None
            and not r.get("over_budget") and not r.get("over_memory") and not r.get("excluded")
            and r.get(objective.cost) is not None
            and not (objective.tag and slower_quantized(r, objective.tag))]


def fronts(rows: list[dict], comparer: Comparer) -> dict[str, list[list[dict]]]:
    """Set each row's pareto_<objective> flag; return the front of each objective as groups of tied files,
    cheapest first."""
    out = {}
    for objective in OBJECTIVES:
        pool = candidates(rows, objective)
        if not pool:
            continue
        for row in rows:
            if row.get(objective.cost) is not None and row["status"] == "verified":
                row[f"pareto_{objective.key}"] = False
        optimal = [r for r in pool if not any(comparer.dominates(o, r, objective) for o in pool if o is not r)]
        # files of one graph run alike (same_graph): one option, so on the front together. Marked apart, a latency
        # difference of noise decided which of them the front named, and the recommendation (the most accurate of
        # the graph) could fall off it
        on_front = {id(r) for r in optimal}
        optimal = [r for group in same_graph(pool, objective) if any(id(m) in on_front for m in group) for r in group]
        for row in optimal:
            row[f"pareto_{objective.key}"] = True
        out[objective.key] = tie_groups(optimal, comparer, objective)
    return out


def tie_groups(rows: list[dict], comparer: Comparer, objective: Objective) -> list[list[dict]]:
    """Rows tied on both axes, merged (transitively) into groups; groups cheapest first."""
    groups: list[list[dict]] = []
    for row in sorted(rows, key=lambda r: r[objective.cost]):
        joined = [g for g in groups if any(comparer.cost(row, o, objective) == 0 and comparer.accuracy(row, o) == 0
                                           for o in g)]
        merged = [row] + [o for g in joined for o in g]
        groups = [g for g in groups if g not in joined] + [merged]
    for g in groups:
        g.sort(key=lambda r: (r[objective.cost], -r["accuracy"]))
    return sorted(groups, key=lambda g: g[0][objective.cost])


def group_label(group: list[dict], limit: int = 4) -> str:
    """'base, pruned80, clustered16 dynamic' when they share a format, else 'base int8, qat int8'; past `limit`
    files, 'and N more'."""
    more = f" and {len(group) - limit} more" if len(group) > limit else ""
    formats = {r["format"] for r in group}
    if len(formats) == 1 and len(group) > 1:
        return f"{', '.join(r['variant'] for r in group[:limit])}{more} {group[0]['format']}"
    return ", ".join(label(r) for r in group[:limit]) + more


def same_graph(pool: list[dict], objective: Objective) -> list[list[dict]]:
    """`pool` as options for `objective`: files of one graph (the module's rules) together, the most accurate first
    (then the smallest download, then the given order); for gzip and the arena, every file alone (the quick
    pipeline's QAT micro file needed a 54,400-byte arena, its parent's 55,520)."""
    groups: list[list[dict]] = []
    for row in pool:
        group = next((g for g in groups if objective.key not in ("gzip", "arena") and row.get("graph") is not None
                      and g[0].get("graph") == row["graph"]
                      and abs(g[0]["size_bytes"] - row["size_bytes"]) <= SIZE_TIE * max(g[0]["size_bytes"],
                                                                                      row["size_bytes"])), None)
        if group is None:
            groups.append([row])
        else:
            group.append(row)
    return [sorted(g, key=lambda r: (-r["accuracy"], r.get("gzip_bytes") or 0)) for g in groups]


def primary(recommendations: list[dict], choice: str) -> dict | None:
    """The recommendation that answers `--objective` (CHOICES): the first of its objectives that was measured."""
    for key in CHOICES[choice]:
        for rec in recommendations:
            if rec["objective"] == key:
                return rec
    return None


def recommend(rows: list[dict], comparer: Comparer, budget: float) -> list[dict]:
    """For each objective with figures: the file to ship within the budget, the files tied with it, the
    runner-up it beat, the files of its graph (`same_graph`) and the baseline; or, when no file fits the budget,
    the closest one."""
    base = baseline(rows)
    out = []
    for objective in OBJECTIVES:
        measured = [r for r in rows if r["status"] == "verified" and r.get("accuracy") is not None
                    and r.get(objective.cost) is not None]
        if not measured:
            continue
        pool = candidates(rows, objective)
        if not pool and all(r.get("excluded") for r in measured):
            continue  # the files with this figure are for another target (a micro file's arena, for a Pi): not asked
        if not pool:
            fitting = [r for r in measured if not r.get("over_budget")]  # within the accuracy budget, over RAM/flash
            closest = (min(fitting, key=lambda r: r[objective.cost]) if fitting and objective.key == "arena" else
                       max(measured, key=lambda r: (r.get("accuracy_change_pts", 0), -r[objective.cost])))
            out.append({"objective": objective.key, "goal": objective.goal, "choice": None, "closest": closest,
                        "budget": budget})
            continue
        options = same_graph(pool, objective)
        members = {id(g[0]): g[1:] for g in options}
        pool = [g[0] for g in options]
        optimal = [r for r in pool if r.get(f"pareto_{objective.key}")]  # set by `fronts`, when it ran
        front = optimal or pool
        cheapest = min(front, key=lambda r: r[objective.cost])
        tied = [r for r in front if comparer.cost(r, cheapest, objective) == 0]
        choice = max(tied, key=lambda r: (r["accuracy"], -r[objective.cost]))
        beaten = [r for r in pool if comparer.cost(choice, r, objective) < 0]
        runner_up = min(beaten, key=lambda r: r[objective.cost]) if beaten else None
        out.append({"objective": objective.key, "goal": objective.goal, "choice": choice,
                    "tied": [r for r in tied if r is not choice], "runner_up": runner_up, "baseline": base,
                    "same_graph": members[id(choice)],
                    "cost_vs_baseline": comparer.cost(choice, base, objective) if base is not None
                    and base.get(objective.cost) is not None else None, "budget": budget})
    return out
