"""`python -m pipeline --search`: the smallest (or fastest) file within the accuracy budget, found by Optuna.

    python -m pipeline --search --objective gzip --trials 16          # one machine, the study in the run directory
    python -m pipeline --search --jobs 2                               # two worker processes on it
    python -m pipeline --search --storage postgresql://...            # many machines, one study (shared --out)

A multi-objective study (maximize test accuracy, minimize the objective: gzip bytes, bytes, or latency at 1
thread) over EdgeKit's recipe space: the technique and its settings (prune 0.3-0.95 sparsity, prune 2:4,
cluster 4-64 clusters and the centroid init, qat, pqat on a pruned parent, cqat on a clustered parent, or
none), fine-tuning epochs, and the export format (float16, dynamic, int8, onnx-int8, int8-mixed). A trial is
a real artifact, `<model>-<recipe>/` in the run directory, made by the same optimize and export code as the
pipeline (so it is cached: a recipe made before is reused, and the report shows it), evaluated on the test
split by the TensorFlow-free runtime. A file more than the budget below the float baseline is infeasible
(an Optuna constraint, `trial.set_constraint`); a model that is clearly over budget after fine-tuning
(twice the budget) is pruned before export. The default menu's recipes are enqueued first, so the search starts where the
pipeline stops.

The study is stored in `search.db` in the run directory (SQLite through Optuna's RDBStorage) unless
`--storage URL` names another (any SQLAlchemy URL: PostgreSQL, MySQL). Workers send a heartbeat: a trial
whose worker stops (Ctrl-C, kill -9, a lost machine) is failed after `3 x --heartbeat` seconds and run
again by the next worker (Optuna's RetryFailedTrialCallback). `--trials N` counts finished trials of the
whole study, whoever ran them, so several workers stop together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from runtime.errors import EdgeKitError, WorkFailed
from runtime.fsutil import output_lock
from runtime.manifest import model_sha256

STUDY = "edgekit-search"
DB_FILE = "search.db"
LOG_FILE = "search.log"  # a line per trial started: when, which trial, recipe, format, host:pid
OBJECTIVES = {"gzip": "gzip_bytes", "size": "size_bytes", "latency": "latency_ms"}
TECHNIQUES = ("none", "prune", "prune24", "cluster", "qat", "pqat", "cqat")
FORMATS = ("float16", "dynamic", "int8", "onnx-int8", "int8-mixed")
QUANTIZATION_AWARE = ("qat", "pqat", "cqat")
PRUNE_FACTOR = 2.0  # a fine-tuned model this many budgets below the baseline is not exported
# the default pipeline's menu, enqueued first (technique, settings, format)
MENU = (("none", {}, "int8"), ("prune", {"sparsity": 0.5}, "int8"), ("prune", {"sparsity": 0.8}, "int8"),
        ("prune24", {}, "int8"), ("cluster", {"clusters": 16, "init": "linear"}, "int8"), ("qat", {}, "int8"),
        ("pqat", {"sparsity": 0.8}, "int8"))


@dataclasses.dataclass(frozen=True)
class Recipe:
    technique: str
    epochs: int | None = None
    sparsity: float | None = None
    clusters: int | None = None
    init: str | None = None
    format: str = "int8"

    def slug(self) -> str:
        """The artifact's name after `<model>-`: every setting that changes the model."""
        name = {"none": "base", "prune24": "prune2of4"}.get(self.technique, self.technique)
        if self.sparsity is not None:
            name += f"{self.sparsity:.2f}"
        if self.clusters is not None:
            name += f"{self.clusters}{self.init}"
        return name + (f"-e{self.epochs}" if self.epochs else "")

    def parent(self) -> Recipe | None:
        """pqat fine-tunes a pruned parent, cqat a clustered one (made with the same epochs)."""
        if self.technique == "pqat":
            return Recipe("prune", self.epochs, sparsity=self.sparsity)
        if self.technique == "cqat":
            return Recipe("cluster", self.epochs, clusters=self.clusters, init=self.init)
        return None

    def settings(self) -> dict:
        """The optimize verb and its settings."""
        verb = {"prune24": "prune", "none": None}.get(self.technique, self.technique)
        settings = {"epochs": self.epochs}
        if self.technique == "prune":
            settings["sparsity"] = self.sparsity
        elif self.technique == "prune24":
            settings["structured"] = "2:4"
        elif self.technique == "cluster":
            settings.update(clusters=self.clusters, init=self.init)
        return {"verb": verb, **settings}


def suggest(trial) -> Recipe:
    """The recipe space, define-by-run."""
    technique = trial.suggest_categorical("technique", TECHNIQUES)
    sparsity = clusters = init = epochs = None
    if technique in ("prune", "pqat"):
        sparsity = trial.suggest_float("sparsity", 0.3, 0.95, step=0.01)
    if technique in ("cluster", "cqat"):
        clusters = trial.suggest_int("clusters", 4, 64)
        init = trial.suggest_categorical("init", ("linear", "kmeans++", "density"))
    if technique != "none":
        epochs = trial.suggest_int("epochs", 1, 8)
    fmt = "int8" if technique in QUANTIZATION_AWARE else trial.suggest_categorical("format", FORMATS)
    return Recipe(technique, epochs, sparsity, clusters, init, fmt)


class Search:
    """One worker of the study: makes, exports, evaluates and measures each trial's artifact."""

    def __init__(self, pipeline, objective: str, budget: float, storage: str | None, heartbeat: int):
        self.pipeline, self.plan, self.out = pipeline, pipeline.plan, pipeline.out
        self.objective, self.budget, self.heartbeat = objective, budget, heartbeat
        self.storage_url = storage or f"sqlite:///{(self.out / DB_FILE).resolve()}"
        self._dataset = None
        self._baseline = None

    # --- the study -------------------------------------------------------------------------------
    def study(self):
        import warnings

        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        engine = {"connect_args": {"timeout": 60}} if self.storage_url.startswith("sqlite") else {}
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(self.storage_url, engine_kwargs=engine, heartbeat_interval=self.heartbeat,
                                     grace_period=3 * self.heartbeat,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as exc:  # SQLAlchemy's many errors: a bad URL, a server that is not there
            raise EdgeKitError(f"cannot open the study's storage {self.storage_url}: {exc}") from None
        # infeasible: more than the budget below the baseline (each trial sets its constraint)
        sampler = optuna.samplers.TPESampler(seed=self.plan.seed, n_startup_trials=len(MENU))
        study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler, load_if_exists=True,
                                    directions=["maximize", "minimize"])
        if not study.user_attrs.get("menu_enqueued"):
            with waiting_lock(self.out / ".search"):  # one worker enqueues the menu
                if not optuna.load_study(study_name=STUDY, storage=storage).user_attrs.get("menu_enqueued"):
                    for technique, settings, fmt in MENU:
                        params = {"technique": technique, **settings}
                        if technique != "none":
                            params["epochs"] = self.plan.finetune_epochs or _default_epochs(technique)
                        if technique not in QUANTIZATION_AWARE:
                            params["format"] = fmt
                        study.enqueue_trial(params, skip_if_exists=True)
                    study.set_user_attr("menu_enqueued", True)
                    study.set_user_attr("objective", self.objective)
                    study.set_user_attr("budget_points", self.budget)
        if study.user_attrs.get("objective", self.objective) != self.objective:
            raise EdgeKitError(f"the study in {self.storage_url} minimizes {study.user_attrs['objective']}, not "
                               f"{self.objective}; pass --objective {study.user_attrs['objective']} or another --out.")
        return study

    def run(self, trials: int, timeout: float | None) -> None:
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.study()
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        study.optimize(self._objective, timeout=timeout, catch=(WorkFailed,),
                       callbacks=[MaxTrialsCallback(trials, states=done)])

    # --- one trial ---------------------------------------------------------------------------
    def _objective(self, trial):
        import optuna

        recipe = suggest(trial)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        trial.set_user_attr("worker", worker)
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as log:  # one short append: whole lines, any worker
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} trial {trial.number} {recipe.slug()} {recipe.format} "
                      f"{worker}\n")
        trial.set_user_attr("recipe", recipe.slug())
        trial.set_user_attr("format", recipe.format)
        directory = self._make(recipe)
        from runtime.manifest import read_manifest

        drop = (self._base_keras_accuracy() - read_manifest(directory)["metrics"]["accuracy"]) * 100
        if drop > PRUNE_FACTOR * self.budget:
            trial.set_user_attr("drop_points", drop)
            trial.set_constraint("accuracy_budget", drop - self.budget)
            raise optuna.TrialPruned(f"{recipe.slug()}: {drop:.2f} points below the baseline after fine-tuning")
        file = self._export(directory, recipe.format)
        accuracy, value = self._measure(file)
        trial.set_user_attr("file", os.path.relpath(file, self.out))
        trial.set_user_attr("accuracy", accuracy)
        drop = (self._baseline_accuracy() - accuracy) * 100
        trial.set_user_attr("drop_points", drop)
        trial.set_user_attr("over_budget", drop > self.budget + 1e-9)
        trial.set_constraint("accuracy_budget", drop - self.budget)
        trial.set_user_attr(OBJECTIVES[self.objective], value)
        return accuracy, value

    def _make(self, recipe: Recipe) -> Path:
        """The recipe's artifact (and its parent's), reused when a valid one is there."""
        import optimize

        if recipe.technique == "none":
            return self.pipeline.dir_of("base")
        parent = self._make(recipe.parent()) if recipe.parent() else self.pipeline.dir_of("base")
        directory = self.out / f"{self.plan.model}-{recipe.slug()}"
        with waiting_lock(directory):  # two workers on one recipe: the second reuses what the first made
            manifest = self.pipeline._core_intact(directory)
            parent_manifest = self.pipeline._core_intact(parent)
            if manifest is not None and parent_manifest is not None and \
                    (manifest.get("parent") or {}).get("model_sha256") == model_sha256(parent_manifest):
                return directory
            settings = recipe.settings()
            verb = settings.pop("verb")
            getattr(optimize, verb)(parent, directory, force=True, quiet=True, data_dir=self.plan.data_dir,
                                    **{k: v for k, v in settings.items() if v is not None})
        return directory

    def _export(self, directory: Path, fmt: str) -> Path:
        from export import export
        from runtime.manifest import read_manifest

        key = "int8" if fmt == "int8-mixed" else fmt
        with waiting_lock(directory):  # another worker may be exporting another format of the same artifact
            manifest = read_manifest(directory)
            for made in ("int8-mixed", key) if fmt == "int8-mixed" else (key,):
                record = manifest.get("exports", {}).get(made) or {}
                if record.get("passed") and record.get("file") and (directory / record["file"]).is_file():
                    return directory / record["file"]
            results = export(directory, [key], data_dir=self.plan.data_dir, max_accuracy_drop=100.0,
                             keep_float="auto" if fmt == "int8-mixed" else None, progress=lambda s: None)
        passed = [r for r in results if r.passed]
        if not passed:
            raise WorkFailed(f"{directory.name}: {fmt} failed: {results[0].message}")
        return passed[0].file

    def _measure(self, file: Path) -> tuple[float, float]:
        """Test accuracy through the runtime, and the objective's value."""
        import numpy as np

        from runtime.load import load

        model = load(file)
        dataset = self._data()
        accuracy = float(np.mean(model.logits(dataset.x_test).argmax(1) == dataset.y_test))
        if self.objective == "latency":
            from runtime.bench import run_worker

            value = run_worker(file, 1, 1, None, 0.5, 10)["call_ms"]["median"]
        elif self.objective == "size":
            value = file.stat().st_size
        else:
            value = (model.sidecar or {}).get("gzip_bytes")
        return accuracy, float(value)

    def _data(self):
        if self._dataset is None:
            from runtime.datasets import load_for_manifest
            from runtime.manifest import read_manifest

            self._dataset = load_for_manifest(read_manifest(self.pipeline.dir_of("base")), self.plan.data_dir)
        return self._dataset

    def _base_keras_accuracy(self) -> float:
        from runtime.manifest import read_manifest

        return read_manifest(self.pipeline.dir_of("base"))["metrics"]["accuracy"]

    def _baseline_accuracy(self) -> float:
        """The float baseline's test accuracy: the trained model's float32 TFLite file."""
        if self._baseline is None:
            self._baseline = self._measure(self._export(self.pipeline.dir_of("base"), "float32"))[0]
        return self._baseline


def _default_epochs(technique: str) -> int:
    """The fine-tuning epochs the pipeline's menu uses for a technique (optimize.recipes' defaults)."""
    from optimize.recipes import RECIPES

    return RECIPES["prune" if technique == "prune24" else technique]().epochs


def run_workers(argv: list[str], jobs: int) -> list[subprocess.Popen]:
    """`jobs - 1` more workers of the same command, as child processes (`--worker`: no report of their own)."""
    return [subprocess.Popen([sys.executable, "-m", "pipeline", *argv, "--worker"]) for _ in range(jobs - 1)]


def trials_table(storage_url: str) -> list[dict]:
    """Every trial of the study: its number, state, recipe, format, accuracy, objective and budget figures."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=storage_url)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                     "menu": "fixed_params" in t.system_attrs,  # enqueued from the default menu
                     **{k: v for k, v in t.user_attrs.items()}, "values": list(t.values) if t.values else None})
    return rows


def elapsed(started: float) -> str:
    seconds = time.perf_counter() - started
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def run_search(pipeline, *, objective: str, trials: int, timeout: float | None, storage: str | None,
               jobs: int, heartbeat: int, argv: list[str], worker: bool) -> dict | None:
    """The whole `--search` command: train and export the base model (once, under the run's lock), run this
    worker and `jobs - 1` more until the study has `trials` finished trials or `timeout` passes, then (unless
    this is a `--worker`) write the report. Returns the report, or None for a worker."""
    if objective not in OBJECTIVES:
        raise EdgeKitError(f"--objective must be one of {', '.join(OBJECTIVES)}; got '{objective}'.")
    for name, value, low in (("--trials", trials, 1), ("--jobs", jobs, 1), ("--heartbeat", heartbeat, 1)):
        if type(value) is not int or value < low:
            raise EdgeKitError(f"{name} must be a whole number of {low} or more; got {value!r}.")
    if timeout is not None and not (timeout > 0):
        raise EdgeKitError(f"--timeout is in seconds, above 0; got {timeout!r}.")
    started = time.perf_counter()
    budget = pipeline.plan.max_accuracy_drop
    if not worker:
        with waiting_lock(pipeline.out, pipeline.say):
            pipeline._prepare_out()
            points = f"{budget:g} point{'' if budget == 1 else 's'}"
            pipeline.say(f"EdgeKit search: {pipeline.plan.model} on {pipeline.plan.dataset} -> {pipeline.out}/  "
                         f"(minimize {objective} within {points} of the float baseline; {trials} trials, "
                         f"{jobs} worker(s))")
            pipeline.train()
            pipeline.export("base")
    search = Search(pipeline, objective, budget, storage, heartbeat)
    search.study()  # the storage opens and the menu is enqueued before any other worker starts
    children = run_workers(argv, jobs) if not worker else []
    try:
        search.run(trials, timeout)
    finally:
        codes = [child.wait() for child in children]
    if worker:
        return None
    if any(codes):
        pipeline.say(f"note: {sum(1 for c in codes if c)} worker(s) exited with an error; the study keeps what they "
                     "finished")
    rows = trials_table(search.storage_url)
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    pipeline.say(f"search: {len(finished)} trials finished ({sum(r['state'] == 'pruned' for r in rows)} pruned "
                 f"over budget) in {elapsed(started)}; study in {search.storage_url}")
    from runtime.fsutil import atomic_write_json
    from runtime.report.search import SEARCH_FILE

    with waiting_lock(pipeline.out, pipeline.say):
        atomic_write_json(pipeline.out / SEARCH_FILE, {"objective": objective, "budget_points": budget,
                                                      "storage": _public(search.storage_url), "trials": rows})
        report = pipeline.report()
    report["search"] = rows
    for line in report.get("summary", []):
        pipeline.say(f"  {line}")
    return report


def _public(url: str) -> str:
    """A storage URL without its password, fit for a report."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: say nothing of it
        return "(storage)"


@contextlib.contextmanager
def waiting_lock(path: Path, say=None, patience: float = 3600):
    """`output_lock(path)`, waited for instead of refused: another worker of the same search may hold it
    (training the base model, making the same recipe, writing the report); this one goes on when it is done,
    and then finds that work made."""
    from runtime.errors import Busy

    deadline, told = time.monotonic() + patience, False
    while True:
        held = output_lock(path)
        try:
            held.__enter__()
            break
        except Busy:
            if time.monotonic() > deadline:
                raise
            if say and not told:
                say(f"waiting for another worker of this search to finish writing {path} ...")
                told = True
            time.sleep(1)
    try:
        yield
    finally:
        held.__exit__(None, None, None)
