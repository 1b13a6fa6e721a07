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
(twice the budget) is pruned before export. The default menu (the pipeline's fixed variants) is the baseline the
search is judged against, never a trial: a recipe that is one of the menu's is the menu's own artifact
(`<model>-pruned50/`, made once, by either), and the report compares the study's best with the menu's best files
in the run directory (`python -m pipeline` into the same --out makes them). `--finetune-epochs N` caps every
trial's fine-tuning epochs at N. The console shows a line per finished trial under a progress bar.

The study is stored in `search.db` in the run directory (SQLite through Optuna's RDBStorage) unless
`--storage URL` names another (any SQLAlchemy URL: PostgreSQL, MySQL). Workers send a heartbeat: a trial
whose worker stops (Ctrl-C, kill -9, a lost machine) is failed after `3 x --heartbeat` seconds and run
again by the next worker (Optuna's RetryFailedTrialCallback). `--trials N` counts finished trials of the
whole study, whoever ran them, so several workers stop together.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

import optimize
from export import export
from pipeline.space import SEARCH_TECHNIQUES, Recipe, suggest
from pipeline.storage import (DB_FILE, STUDY, check_storage, fail_orphans, masked, run_workers, trials_table,
                              waiting_lock)
from runtime.artifacts.manifest import model_sha256, read_manifest
from runtime.bench import run_worker
from runtime.datasets import load_for_manifest
from runtime.errors import EdgeKitError, WorkFailed, first_line
from runtime.fsutil import atomic_write_json
from runtime.limits import cores, whole
from runtime.load import finite, load
from runtime.report.trials import SEARCH_FILE, value_text
from runtime.text import public_url, terminal

LOG_FILE = "search.log"  # a line per trial started: when, which trial, recipe, format, host:pid
OBJECTIVES = {"gzip": "gzip_bytes", "size": "size_bytes", "latency": "latency_ms", "arena": "arena_bytes"}
PRUNE_FACTOR = 2.0  # a fine-tuned model this many budgets below the baseline is not exported
STARTUP_TRIALS = 6  # random trials before TPE models the space


class Search:
    """One worker of the study: makes, exports, evaluates and measures each trial's artifact."""

    def __init__(self, pipeline, objective: str, budget: float, storage: str | None, heartbeat: int,
                 alone: bool = True, techniques: tuple[str, ...] = SEARCH_TECHNIQUES):
        self.pipeline, self.plan, self.out = pipeline, pipeline.plan, pipeline.out
        self.techniques = techniques
        # the sampler's seed: the run's when one worker makes the study (reproducible); with several, each its own
        # (the run's and its host:pid), or they would all draw the same random first trials
        self.seed = self.plan.seed if alone else \
            (self.plan.seed * 1_000_003 + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())) % 2**31
        self.objective, self.budget, self.heartbeat = objective, budget, heartbeat
        self.storage_url = storage or f"sqlite:///{(self.out / DB_FILE).resolve()}"
        self.public_url = public_url(self.storage_url)  # what is printed and written: never the password
        if storage is not None:
            check_storage(storage, self.out)
        self._dataset = None
        self.console = None
        self._name = None
        self._baseline = None

    # --- the study -------------------------------------------------------------------------------
    def definition(self) -> dict:
        """What defines this run's study: the model, the dataset, the objective, the budget and the base model
        the trials derive from. Runs that differ in any of them are different studies, even in one storage."""

        definition = {"model": self.plan.model, "dataset": self.plan.dataset, "objective": self.objective,
                      "budget_points": self.budget,
                      "base_model_sha256": model_sha256(read_manifest(self.pipeline.dir_of("base")))}
        if self.techniques != SEARCH_TECHNIQUES:  # another space is another study (Optuna's choices cannot change)
            definition["techniques"] = list(self.techniques)
        return definition

    @property
    def study_name(self) -> str:
        if self._name is None:
            d = self.definition()
            self._name = (f"{STUDY}-{d['model']}-{d['dataset']}-{d['objective']}-{d['budget_points']:g}pts-"
                          f"{d['base_model_sha256'][:12]}" + ("-" + "+".join(d["techniques"]) if "techniques" in d
                                                              else ""))
        return self._name

    def storage(self):
        """The study's RDBStorage, with heartbeats; a storage that cannot be opened is one line without its
        password (exit 1)."""

        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        engine = {"connect_args": {"timeout": 60}} if self.storage_url.startswith("sqlite") else {}
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(self.storage_url, engine_kwargs=engine, heartbeat_interval=self.heartbeat,
                                  grace_period=3 * self.heartbeat,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as exc:  # SQLAlchemy's many errors: a bad URL, a server that is not there, a damaged file
            raise WorkFailed(f"cannot open the study's storage {self.public_url}: "
                             f"{masked(first_line(exc), self.storage_url)}. Check the URL, its driver and that the "
                             "server is up; a damaged SQLite file: remove it to start the search again.") from None

    def study(self):
        import optuna

        storage = self.storage()
        # infeasible: more than the budget below the baseline (each trial sets its constraint)
        sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=STARTUP_TRIALS)
        name, definition = self.study_name, self.definition()
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                        directions=["maximize", "minimize"])
        except Exception as exc:  # a damaged database: the work failed, not the command line
            raise WorkFailed(f"cannot use the study in {self.public_url}: {masked(first_line(exc), self.storage_url)}"
                             "; remove it (or pass another --storage) to start the search again.") from None
        recorded = study.user_attrs.get("definition")
        if recorded is not None and recorded != definition:
            differ = ", ".join(f"{k} {recorded.get(k)!r} here, {v!r} asked" for k, v in definition.items()
                               if recorded.get(k) != v)
            raise EdgeKitError(f"the study {name} in {self.public_url} belongs to another run ({differ}); pass another "
                               "--storage or --out.")
        fail_orphans(storage, study, 3 * self.heartbeat)
        if recorded is None:
            with waiting_lock(self.out / ".search"):  # one worker records what the study is
                again = optuna.load_study(study_name=name, storage=storage)
                if again.user_attrs.get("definition") is None:
                    study.set_user_attr("definition", definition)
                    study.set_user_attr("objective", self.objective)
                    study.set_user_attr("budget_points", self.budget)
        if study.user_attrs.get("objective", self.objective) != self.objective:
            raise EdgeKitError(f"the study in {self.public_url} minimizes {study.user_attrs['objective']}, not "
                               f"{self.objective}; pass --objective {study.user_attrs['objective']} or another --out.")
        return study

    def run(self, trials: int, timeout: float | None, console: bool = False) -> None:
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.study()
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        self.console = Console(self, trials) if console else None
        study.optimize(self._objective, timeout=timeout, catch=(WorkFailed,),
                       callbacks=[MaxTrialsCallback(trials, states=done), *([self.console] if console else [])])

    def close_console(self) -> None:
        """The trials the other workers finished last, then the bar closed."""
        if self.console is not None:
            import optuna

            self.console(optuna.load_study(study_name=self.study_name, storage=self.storage_url), None)
            self.console.close()
            self.console = None

    # --- one trial ---------------------------------------------------------------------------
    def _objective(self, trial):
        import optuna

        recipe = suggest(trial, self.plan.finetune_epochs or 8, self.techniques,
                         "micro" if self.objective == "arena" else None)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        trial.set_user_attr("worker", worker)
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as log:  # one short append: whole lines, any worker
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} trial {trial.number} {self.name(recipe)} {recipe.format} "
                      f"{worker}\n")
        trial.set_user_attr("recipe", self.name(recipe))
        trial.set_user_attr("menu", recipe.menu_variant(self.plan.finetune_epochs) is not None)
        trial.set_user_attr("format", recipe.format)
        directory = self._make(recipe)

        drop = (self._base_keras_accuracy() - read_manifest(directory)["metrics"]["accuracy"]) * 100
        if drop > PRUNE_FACTOR * self.budget:
            trial.set_user_attr("drop_points", drop)
            trial.set_constraint("accuracy_budget", drop - self.budget)
            raise optuna.TrialPruned(f"{self.name(recipe)}: {drop:.2f} points below the baseline after fine-tuning")
        file = self._export(directory, recipe.format)
        accuracy, value = self._measure(file)
        if value is None:
            raise WorkFailed(f"{file.name} has no {self.objective} figure in its sidecar; export it again.")
        trial.set_user_attr("file", os.path.relpath(file, self.out))
        trial.set_user_attr("accuracy", accuracy)
        drop = (self._baseline_accuracy() - accuracy) * 100
        trial.set_user_attr("drop_points", drop)
        trial.set_user_attr("over_budget", drop > self.budget + 1e-9)
        trial.set_constraint("accuracy_budget", drop - self.budget)
        trial.set_user_attr(OBJECTIVES[self.objective], value)
        return accuracy, value

    def name(self, recipe: Recipe) -> str:
        """The artifact's name after `<model>-`: the menu variant's when the recipe is one, else its slug."""
        return recipe.menu_variant(self.plan.finetune_epochs) or recipe.slug()

    def _make(self, recipe: Recipe) -> Path:
        """The recipe's artifact (and its parent's), reused when a valid one is there."""

        if recipe.technique == "none":
            return self.pipeline.dir_of("base")
        parent = self._make(recipe.parent()) if recipe.parent() else self.pipeline.dir_of("base")
        directory = self.out / f"{self.plan.model}-{self.name(recipe)}"
        with waiting_lock(directory):  # two workers on one recipe: the second reuses what the first made
            manifest = self.pipeline.core_intact(directory)
            parent_manifest = self.pipeline.core_intact(parent)
            if manifest is not None and parent_manifest is not None and \
                    (manifest.get("parent") or {}).get("model_sha256") == model_sha256(parent_manifest):
                return directory
            settings = recipe.settings()
            verb = settings.pop("verb")
            getattr(optimize, verb)(parent, directory, force=True, quiet=True, data_dir=self.plan.data_dir,
                                    **{k: v for k, v in settings.items() if v is not None})
        return directory

    def _export(self, directory: Path, fmt: str) -> Path:
        key = "int8" if fmt == "int8-mixed" else fmt
        with waiting_lock(directory):  # another worker may be exporting another format of the same artifact
            manifest = read_manifest(directory)
            for made in ("int8-mixed", key) if fmt == "int8-mixed" else (key,):
                record = manifest.get("exports", {}).get(made) or {}
                if record.get("passed") and record.get("file") and (directory / record["file"]).is_file():
                    return directory / record["file"]
            results = export(directory, [key], data_dir=self.plan.data_dir, max_accuracy_drop=100.0,
                             keep_float="auto" if fmt == "int8-mixed" else None, progress=None,
                             sparse=self.plan.runtime == "edgekit" and self.objective != "gzip")
        passed = [r for r in results if r.passed]
        if not passed:
            raise WorkFailed(f"{directory.name}: {fmt} failed: {results[0].message}")
        return passed[0].file

    def _measure(self, file: Path) -> tuple[float, float]:
        """Test accuracy through the runtime, and the objective's value."""

        model = load(file)
        dataset = self._data()
        accuracy = float(np.mean(finite(model.logits(dataset.x_test), model).argmax(1) == dataset.y_test))
        if self.objective == "latency":
            value = run_worker(file, 1, 1, None, 0.5, 10)["call_ms"]["median"]
        elif self.objective == "size":
            value = file.stat().st_size
        elif self.objective == "arena":  # TFLM's measurement, recorded by export
            value = ((model.sidecar or {}).get("micro") or {}).get("arena_bytes")
        else:
            value = (model.sidecar or {}).get("gzip_bytes")
        return accuracy, None if value is None else float(value)  # the baseline's float32 file has no arena

    def _data(self):
        if self._dataset is None:
            self._dataset = load_for_manifest(read_manifest(self.pipeline.dir_of("base")), self.plan.data_dir)
        return self._dataset

    def _base_keras_accuracy(self) -> float:
        return read_manifest(self.pipeline.dir_of("base"))["metrics"]["accuracy"]

    def _baseline_accuracy(self) -> float:
        """The float baseline's test accuracy: the trained model's float32 TFLite file."""
        if self._baseline is None:
            self._baseline = self._measure(self._export(self.pipeline.dir_of("base"), "float32"))[0]
        return self._baseline


class Console:
    """An Optuna callback: a line per finished trial of the whole study (any worker's, as this one learns of
    them), under a progress bar of finished trials (tqdm, on stderr) when the pipeline shows progress."""

    def __init__(self, search: Search, total: int):
        self.search, self.total, self.printed, self.bar = search, total, set(), None
        if search.pipeline.progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="search", unit="trial", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, study, _trial) -> None:
        from optuna.trial import TrialState

        ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        trials = sorted(study.get_trials(deepcopy=False, states=ended), key=lambda t: t.number)
        for t in trials:
            if t.number not in self.printed:
                self.printed.add(t.number)
                self._say(self.line(t))
        if self.bar is not None:
            self.bar.n = min(self.total, sum(t.state != TrialState.FAIL for t in trials))
            self.bar.refresh()

    def line(self, t) -> str:
        """A finished trial as one line; its attributes come from the study's storage, which other machines
        write: numbers are checked, text escaped for the terminal."""

        def number(value):
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        a = t.user_attrs
        what = f"trial {t.number:>3} {a.get('recipe', '?')} {a.get('format', '?')}"
        if t.state.name == "FAIL":
            return terminal(f"{what}: failed ({first_line(str(t.system_attrs.get('fail_reason', 'see search.log')))})")
        if t.state.name == "PRUNED":
            drop = number(a.get("drop_points"))
            return terminal(f"{what}: pruned, " + (f"{drop:.2f} points" if drop is not None else "too far")
                            + " below the baseline after fine-tuning")
        objective, accuracy = self.search.objective, number(a.get("accuracy"))
        budget = "over budget" if a.get("over_budget") is True else "within budget"
        took = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else 0
        return terminal(f"{what}: " + (f"{accuracy:.2%}" if accuracy is not None else "?") + ", "
                        f"{value_text(objective, number(a.get(OBJECTIVES[objective])))}, {budget} ({took:.0f} s, "
                        f"{a.get('worker', '?')})")

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            self.search.pipeline.say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()




def elapsed(started: float) -> str:
    seconds = time.perf_counter() - started
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def run_search(pipeline, *, objective: str, trials: int, timeout: float | None, storage: str | None,
               jobs: int, heartbeat: int, argv: list[str], worker: bool,
               techniques: tuple[str, ...] = SEARCH_TECHNIQUES) -> dict | None:
    """The whole `--search` command: train and export the base model (once, under the run's lock), run this
    worker and `jobs - 1` more until the study has `trials` finished trials or `timeout` passes, then (unless
    this is a `--worker`) write the report. Returns the report, or None for a worker."""
    if objective not in OBJECTIVES:
        raise EdgeKitError(f"--objective must be one of {', '.join(OBJECTIVES)}; got '{objective}'.")

    whole(trials, "--trials", 1, 100_000)
    whole(heartbeat, "--heartbeat", 1, 3600)
    # each worker trains models in its own process (about 1 GB): more than the cores only shares them and
    # multiplies the memory (100 were OOM-killed)
    whole(jobs, "--jobs", 1, cores(), f" (the cores this process may use: {cores()}; more workers go on other "
                                      "machines with --storage)")
    if timeout is not None and not (timeout > 0):
        raise EdgeKitError(f"--timeout is in seconds, above 0; got {timeout!r}.")
    started = time.perf_counter()
    budget = pipeline.plan.max_accuracy_drop
    search = Search(pipeline, objective, budget, storage, heartbeat, alone=jobs == 1 and storage is None and not worker,
                    techniques=techniques)
    if storage is not None and not worker:
        search.storage()  # a storage that cannot be opened fails now, not after training the base model
    if not worker:
        with waiting_lock(pipeline.out, pipeline.say):
            pipeline.prepare_out()
            points = f"{budget:g} point{'' if budget == 1 else 's'}"
            pipeline.say(f"EdgeKit search: {pipeline.plan.model} on {pipeline.plan.dataset} -> {pipeline.out}/  "
                         f"(minimize {objective} within {points} of the float baseline; {trials} trials, "
                         f"{jobs} worker(s))")
            pipeline.train()
            pipeline.export("base")
    search.study()  # the storage opens and the menu is enqueued before any other worker starts
    children = run_workers(argv, jobs, storage) if not worker else []
    try:
        search.run(trials, timeout, console=not worker)
    finally:
        codes = [child.wait() for child in children]
        search.close_console()
    if worker:
        return None
    if any(codes):
        pipeline.say(f"note: {sum(1 for c in codes if c)} worker(s) exited with an error; the study keeps what they "
                     "finished")
    rows = trials_table(search.storage_url, search.study_name)
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    pipeline.say(f"search: {len(finished)} trials finished ({sum(r['state'] == 'pruned' for r in rows)} pruned "
                 f"over budget) in {elapsed(started)}; study {search.study_name} in {search.public_url}")

    with waiting_lock(pipeline.out, pipeline.say):
        atomic_write_json(pipeline.out / SEARCH_FILE, {"objective": objective, "budget_points": budget,
                                                      "storage": search.public_url, "study": search.study_name,
                                                      "trials": rows})
        report = pipeline.report()
    report["search"] = rows
    for line in report.get("summary", []):
        pipeline.say(f"  {line}")
    return report


