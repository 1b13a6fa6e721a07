"""The pipeline's plan, its stages, and resuming them.

    OUT/                      runs/<model>-<dataset> by default
      pipeline.json           the plan, and each stage's outcome and time
      <model>/                the trained model (train), exported (export)
      <model>-<variant>/      each optimized variant (optimize), exported (export)
      bench.json              benchmark cache, keyed by file checksum
      report.md .csv .json, accuracy_vs_size.png, accuracy_vs_latency.png

A stage is skipped when its artifact is complete and valid: its manifest reads, every
file it lists matches its sha256, and it was made from the current parent (by the
parent model's sha256). Anything else (missing, damaged, or made from a parent that
has since changed) is made again. Artifacts are written to a temporary name and
renamed, and exported files are recorded only after they pass their check, so an
interrupted run leaves nothing that looks complete but is not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import optimize
from export import export
from runtime.artifacts.manifest import (DEVICE_RUNTIMES, check_out_apart, core_names, export_problem, library_versions,
                                        model_sha256, needs_edgekit, read_manifest, read_sidecar, utc_now, verify_files)
from runtime.bench import check_seconds
from runtime.datasets import registry
from runtime.errors import AccuracyBudgetMissed, EdgeKitError, unknown
from runtime.fsutil import atomic_write_json, check_readable_file, output_lock, sha256_file
from runtime.limits import json_loads
from runtime.remote.session import Session
from runtime.report import build
from runtime.report.decide import CHOICES
from runtime.vocabulary import (DEFAULT_VARIANTS, MAX_ACCURACY_DROP, QAT_FORMATS, QUANTIZATION_AWARE, VARIANTS,
                                check_max_accuracy_drop, get_format)
from train.foreign import import_model
from train.models import get_spec
from train.safe_load import KERAS_SUFFIXES
from train.trainer import TrainConfig, train, write_artifact

PLAN_FILE = "pipeline.json"


FLOAT_FORMATS = ("float32", "float16", "dynamic", "int8", "onnx-float32", "onnx-int8")
# --quick: a smoke run whose models are still worth looking at. The full-size fashion_cnn for 10 epochs
# (98-99% on digits); 2 fine-tuning epochs keep pruned80 within a point or so of it (one epoch, or a smaller
# model, collapsed it to 41%), and the report's budget flags what falls outside.
QUICK = {"epochs": 10, "finetune_epochs": 2, "variants": ("pruned80", "qat"),
         "formats": ("float32", "int8", "onnx-float32"), "runs": 5, "model_args": {}}


@dataclasses.dataclass
class Plan:
    model: str = "fashion_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    formats: tuple[str, ...] | None = None  # None: FLOAT_FORMATS (QAT_FORMATS for QAT variants)
    out: Path | None = None
    quick: bool = False
    epochs: int | None = None  # training epochs (early stopping usually ends sooner); None: 40, or 2 quick
    finetune_epochs: int | None = None  # optimize epochs; None: each technique's default, or 1 quick
    model_args: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    threads: list[int] | None = None  # benchmark thread counts; None: 1 and all cores
    bench_seconds: float = 0.5
    bench_runs: int | None = None  # fixed calls per file and round instead of seconds (5 quick)
    bench: bool = True
    max_accuracy_drop: float = MAX_ACCURACY_DROP  # the budget of export's verification and of the report
    objective: str = "size"  # what the report's recommendation answers first (runtime.report.decide.CHOICES)
    target: str | None = None  # "micro": every variant also exported for TensorFlow Lite Micro, the report's answer
    max_ram: int | None = None  # a microcontroller's RAM for the tensor arena: micro files over it are marked
    max_flash: int | None = None  # and its flash
    runtime: str = "litert"  # what runs the files on the device: the user's own LiteRT app, or EdgeKit's runtime
    source: Path | None = None  # --from: a Keras model file from elsewhere, imported instead of training one
    mean: tuple[float, ...] | None = None  # how pixels become its input, in pixel units (--mean/--std)
    std: tuple[float, ...] | None = None
    allow_untrained: bool = False  # take a source that scores under twice chance

    def __post_init__(self):
        if self.target not in (None, "micro"):
            raise unknown("target", self.target, ["micro"])
        if self.runtime not in DEVICE_RUNTIMES:
            raise unknown("runtime", self.runtime, DEVICE_RUNTIMES)
        if self.max_ram is not None or self.max_flash is not None:
            self.target = "micro"  # a budget for a microcontroller asks for its files
        if self.quick:
            self.epochs = self.epochs or QUICK["epochs"]
            self.finetune_epochs = self.finetune_epochs or QUICK["finetune_epochs"]
            self.variants = self.variants if self.variants != DEFAULT_VARIANTS else QUICK["variants"]
            self.formats = self.formats or QUICK["formats"]
            self.bench_runs = self.bench_runs or QUICK["runs"]
            self.model_args = self.model_args or QUICK["model_args"].get(self.model, {})
            self.threads = self.threads or [1]
        self.variants = resolve_variants(self.variants)

        if self.objective not in CHOICES:
            raise unknown("objective", self.objective, list(CHOICES))
        if self.objective == "latency" and not self.bench:
            raise EdgeKitError("--objective latency needs the benchmarks; drop --no-bench.")

        if self.source is not None:
            self._check_source()
        else:
            get_spec(self.model)  # an unknown model or dataset fails here, before anything is written
            if self.mean is not None or self.std is not None or self.allow_untrained:
                raise EdgeKitError("--mean, --std and --allow-untrained are for a model file from elsewhere "
                                   "(--from MODEL.keras|.h5); a registered model is trained on the dataset's own "
                                   "preprocessing.")
        if not self.dataset.startswith("folder:") and self.dataset not in registry():
            raise unknown("dataset", self.dataset, [*registry(), "folder:PATH"])
        if self.formats is not None:
            # an unknown name gets the registry's error, with a suggestion; an alias becomes its key
            self.formats = tuple(get_format(key).key for key in self.formats)

        check_seconds(self.bench_seconds, "--bench-seconds")
        self.max_accuracy_drop = check_max_accuracy_drop(self.max_accuracy_drop)
        for name in ("epochs", "finetune_epochs", "bench_runs"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise EdgeKitError(f"--{name.replace('_', '-')} must be 1 or more; got {value!r}.")
        if self.out is None:
            name = self.dataset.split(":")[-1].rstrip("/").split("/")[-1] if self.dataset.startswith("folder:") \
                else self.dataset
            self.out = Path("runs") / f"{self.model}-{name}{'-quick' if self.quick else ''}"
        self.out = Path(self.out)
        if self.dataset.startswith("folder:"):
            check_out_apart(self.out, [Path(self.dataset.removeprefix("folder:")).expanduser()])

    def _check_source(self) -> None:
        self.source = Path(self.source)
        if self.source.suffix.lower() not in KERAS_SUFFIXES or self.source.is_dir():
            raise EdgeKitError(f"--from takes a Keras model file (.keras, .h5); got {self.source}. For an .onnx or "
                               ".tflite file: python -m export FILE --dataset D, then python -m runtime report.")
        check_readable_file(self.source, "model file")
        self.model = self.source.stem  # the artifacts' names: runs/<stem>-<dataset>/<stem>, <stem>-pruned80, ...

    @property
    def sparse(self) -> bool:
        """A pruned model's files sparse-encoded (smaller): only for a device that runs EdgeKit's runtime (bare
        LiteRT's XNNPACK refuses them), and not for a gzip objective (its zeros compress better dense)."""
        return self.runtime == "edgekit" and self.objective != "gzip"

    def formats_for(self, variant: str) -> list[str]:
        allowed = QAT_FORMATS if variant != "base" and VARIANTS[variant].quantization_aware else FLOAT_FORMATS
        chosen = self.formats or FLOAT_FORMATS
        formats = [f for f in chosen if f in allowed] or ([] if self.formats else list(allowed))
        return [f for f in formats if f != "micro"] + (["micro"] if self.target == "micro" else [])

    def identity(self) -> dict:
        """What the artifacts depend on: a rerun with other values here must not reuse them."""
        identity = {"model": self.model, "dataset": self.dataset, "epochs": self.epochs, "seed": self.seed,
                    "model_args": self.model_args, "finetune_epochs": self.finetune_epochs}
        if self.source is not None:  # another file, or other preprocessing, is another base model
            identity.update(source=sha256_file(self.source), mean=self.mean and list(self.mean),
                            std=self.std and list(self.std))
        return identity

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["source"] = str(self.source) if self.source is not None else None
        return data


def resolve_variants(names) -> tuple[str, ...]:
    """Validate variant names and add the parents they need (pqat needs pruned80), parents first."""
    ordered = []

    def add(name):
        if name == "base" or name in ordered:
            return
        if name not in VARIANTS:
            raise unknown("variant", name, VARIANTS)
        add(VARIANTS[name].parent)
        ordered.append(name)

    for name in names:
        add(name)
    return tuple(ordered)


class Pipeline:
    """Runs a Plan stage by stage, skipping what is already complete."""

    def __init__(self, plan: Plan, force: bool = False, verbose: bool = False, say=print, device=None,
                 threads_text: str | None = None):
        """`device`: a runtime.remote.session.Target where the report measures latency, with `threads_text` counted in
        its cores."""
        self.plan, self.force, self.verbose, self.say = plan, force, verbose, say
        self.device, self.threads_text = device, threads_text
        self.progress = say is print  # progress bars on stderr; a caller with its own `say` gets none
        self.out = plan.out
        self.status = {}
        self.stage_total = 2 + 2 * len(plan.variants) + 1
        self.stage_index = 0

    # --- bookkeeping ------------------------------------------------------------------------
    def dir_of(self, variant: str) -> Path:
        return self.out / (self.plan.model if variant == "base" else f"{self.plan.model}-{variant}")

    def prepare_out(self) -> None:
        plan_file = self.out / PLAN_FILE
        if self.out.exists() and not self.out.is_dir():
            raise EdgeKitError(f"output path {self.out} is a file; expected a directory. Choose another --out.")
        if self.force and self.out.is_dir():
            if any(self.out.iterdir()) and not plan_file.is_file():
                raise EdgeKitError(f"{self.out} is not a pipeline directory (no {PLAN_FILE}); --force will not "
                                   "delete it. Choose another --out.")
            shutil.rmtree(self.out)
        if self.out.is_dir() and any(self.out.iterdir()):
            if not plan_file.is_file():
                raise EdgeKitError(f"{self.out} is not empty and holds no {PLAN_FILE}: it is not a pipeline's "
                                   "output. Choose another --out.")
            try:
                previous = json_loads(plan_file.read_text("utf-8"))["identity"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                previous = None  # a damaged plan file: the stages' own manifests decide
            if previous is not None and previous != self.plan.identity():
                changed = sorted(k for k in previous if previous.get(k) != self.plan.identity().get(k))
                raise EdgeKitError(
                    f"{self.out} was made with other settings ({', '.join(changed)} differ); pass --force to start "
                    "over there, or choose another --out.")
        self.out.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.out / PLAN_FILE, {"identity": self.plan.identity(), "plan": self.plan.to_dict(),
                                                 "updated": utc_now(), "stages": self.status,
                                                 "versions": library_versions()})

    def _stage(self, name: str, what: str):
        self.stage_index += 1
        return _StageTimer(self, f"[{self.stage_index}/{self.stage_total}] {what}", name)

    # --- validity ------------------------------------------------------------------------------
    @staticmethod
    def core_intact(directory: Path) -> dict | None:
        """The manifest, if the artifact's own files (not its exports) are all intact."""
        try:
            manifest = read_manifest(directory)
        except EdgeKitError:
            return None
        if model_sha256(manifest) is None or verify_files(directory, manifest, core_names(manifest)):
            return None
        return manifest

    def _model_sha(self, variant: str) -> str | None:
        manifest = self.core_intact(self.dir_of(variant))
        return None if manifest is None else model_sha256(manifest)

    # --- stages --------------------------------------------------------------------------------------
    def train(self) -> None:
        plan, directory = self.plan, self.dir_of("base")
        if plan.source is not None:
            return self._import()
        with self._stage("train", f"train {plan.model} on {plan.dataset}") as stage:
            manifest = self.core_intact(directory)
            if manifest is not None and manifest.get("kind") == "trained":
                return stage.skip(f"{manifest['metrics']['accuracy']:.2%}")
            config = TrainConfig(model=plan.model, dataset=plan.dataset, data_dir=plan.data_dir, seed=plan.seed,
                                 model_args=dict(plan.model_args), **({"epochs": plan.epochs} if plan.epochs else {}))
            result = train(config, quiet=not self.verbose)
            manifest = write_artifact(result, directory, force=True)
            stage.done(f"test accuracy {manifest['metrics']['accuracy']:.2%}, "
                       f"{manifest['training']['epochs_run']} epochs")

    def _import(self) -> None:
        """--from: the model file as the base artifact (train/foreign.py), instead of training one."""

        plan, directory = self.plan, self.dir_of("base")
        with self._stage("train", f"import {plan.source.name} on {plan.dataset}") as stage:
            manifest = self.core_intact(directory)
            if manifest is not None and manifest.get("kind") == "imported" and \
                    (manifest.get("source") or {}).get("sha256") == sha256_file(plan.source):
                return stage.skip(f"{manifest['metrics']['accuracy']:.2%}")
            try:
                manifest = import_model(plan.source, plan.dataset, directory, data_dir=plan.data_dir, mean=plan.mean,
                                        std=plan.std, force=True, allow_untrained=plan.allow_untrained)
            except EdgeKitError:  # without the base model nothing after it can run: one error line, its exit code
                stage.fail("the model file was not imported (the error below)")
                raise
            flat = ", nested models flattened" if manifest["source"]["nested_models_flattened"] else ""
            stage.done(f"test accuracy {manifest['metrics']['accuracy']:.2%}{flat}")

    def optimize(self, variant: str) -> None:
        spec = VARIANTS[variant]
        directory, parent = self.dir_of(variant), self.dir_of(spec.parent)
        with self._stage(f"optimize:{variant}", f"optimize {variant}: {spec.summary}") as stage:
            parent_sha = self._model_sha(spec.parent)
            if parent_sha is None:
                return stage.fail(f"its parent {spec.parent} failed or is damaged")
            manifest = self.core_intact(directory)
            if manifest is not None and (manifest.get("parent") or {}).get("model_sha256") == parent_sha:
                return stage.skip(self._change(manifest))
            settings = dict(spec.settings)
            if self.plan.finetune_epochs:
                settings["epochs"] = self.plan.finetune_epochs
            manifest = getattr(optimize, spec.verb)(parent, directory, force=True, quiet=not self.verbose,
                                                   data_dir=self.plan.data_dir, **settings)
            stage.done(self._change(manifest))

    @staticmethod
    def _change(manifest: dict) -> str:
        m = manifest["metrics"]
        facts = []
        if m.get("model_sparsity") and manifest.get("kind") in ("pruned", "pqat"):  # QAT's zeros are chance, not a recipe
            facts.append(f"sparsity {m['model_sparsity']:.2f}")
        if m.get("max_unique") and manifest.get("kind") == "clustered":
            facts.append(f"{m['max_unique']} unique values")
        extra = f", {', '.join(facts)}" if facts else ""
        return f"test accuracy {m['accuracy']:.2%} ({m.get('accuracy_change', 0) * 100:+.2f} pts){extra}"

    def export(self, variant: str) -> None:
        directory = self.dir_of(variant)
        formats = self.plan.formats_for(variant)
        with self._stage(f"export:{variant}", f"export {variant}: {', '.join(formats) or 'nothing'}") as stage:
            manifest = self.core_intact(directory)
            if manifest is None:
                return stage.fail(f"{directory.name} failed or is damaged, so there is nothing to export")
            if not formats:
                return stage.skip("no format chosen applies")
            model_sha = model_sha256(manifest)
            todo = [f for f in formats if not self._export_valid(directory, manifest, f, model_sha)
                    or self._needs_edgekit(directory, f)]
            if not todo:
                return stage.skip(f"{len(formats)} verified")
            progress = (lambda m: self.say(f"      {m}")) if self.verbose else None
            results = export(directory, todo, data_dir=self.plan.data_dir, max_accuracy_drop=self.plan.max_accuracy_drop,
                             progress=progress, sparse=self.plan.sparse)
            failed = [r for r in results if not r.passed]
            note = f"{len(results) - len(failed)}/{len(results)} verified" + (
                f", {len(formats) - len(todo)} already were" if len(todo) < len(formats) else "")
            missed = next((r for r in failed if r.format == "int8" and r.rule == AccuracyBudgetMissed.rule), None)
            if missed is not None and manifest["kind"] not in QUANTIZATION_AWARE:
                # plain int8 misses the budget: keep the layers it hurts float (export --keep-float auto)
                mixed = export(directory, ["int8"], data_dir=self.plan.data_dir, keep_float="auto",
                               max_accuracy_drop=self.plan.max_accuracy_drop, progress=progress)[0]
                if mixed.passed and mixed.format == "int8-mixed":
                    failed.remove(missed)
                    note += (f"; int8 missed the budget, so int8-mixed keeps "
                             f"{', '.join(mixed.figures['kept_float']['layers'])} float "
                             f"({mixed.figures['accuracy']:.2%})")
                else:
                    note += f"; int8-mixed could not meet the budget either ({mixed.message or 'see the report'})"
            if failed:
                return stage.fail(note + "; failed: " + "; ".join(r.message for r in failed))
            stage.done(note)

    def _needs_edgekit(self, directory: Path, key: str) -> bool:
        """A file written for a device with EdgeKit's runtime (sparse), where the plan's device has none: export it
        again, dense."""

        if self.plan.runtime == "edgekit":
            return False
        try:
            return needs_edgekit(read_sidecar(directory / get_format(key).filename)) is not None
        except EdgeKitError:
            return False  # a damaged sidecar: _export_valid's check says so

    @staticmethod
    def _export_valid(directory: Path, manifest: dict, key: str, model_sha: str) -> bool:
        """A verified file for `key`; for int8, a verified int8-mixed made because plain int8 missed the budget."""

        if not export_problem(directory, manifest, key, get_format(key).filename, model_sha):
            return True
        return key == "int8" and (manifest.get("exports", {}).get("int8") or {}).get("failed_rule") == AccuracyBudgetMissed.rule \
            and not export_problem(directory, manifest, "int8-mixed", get_format("int8-mixed").filename, model_sha)

    def report(self) -> dict:
        plan = self.plan
        report = {"rows": [], "notes": [], "summary": [], "budget": plan.max_accuracy_drop}

        title = "evaluate, benchmark " + (f"on {self.device.name} " if self.device else "") + "and report"
        with self._stage("report", title) as stage, \
                (Session(self.device, self._device_says) if self.device else nullcontext()) as device:
            threads = device.threads(self.threads_text or ("1" if plan.quick else "1,all")) if device else plan.threads
            report = build(self.out, threads, plan.bench_seconds, plan.bench_runs, bench=plan.bench,
                           data_dir=plan.data_dir, progress=self.progress, budget=plan.max_accuracy_drop,
                           objective=plan.objective, device=device, max_ram=plan.max_ram,
                           max_flash=plan.max_flash, runtime=plan.runtime)
            verified = sum(r["status"] == "verified" for r in report["rows"])
            replaced = {r["artifact"] for r in report["rows"] if r["format"] == "int8-mixed" and r["status"] == "verified"}
            failed = [f"{r['variant']} {r['format']} ({r['reason']})" for r in report["rows"]
                      if r["status"] != "verified" and not (r["format"] == "int8" and r["artifact"] in replaced)]
            if failed:
                stage.fail(f"{verified} of {len(report['rows'])} files verified; failed: {'; '.join(failed)}")
            else:
                stage.done(f"{verified} of {len(report['rows'])} files verified")
        return report

    def _device_says(self, line: str) -> None:
        if self.verbose:
            self.say(f"  device: {line}")

    def run(self) -> dict:
        """Every stage is attempted: a failed one is recorded in pipeline.json, the stages that do not depend
        on it still run, and the caller exits 1 (see `failed_stages` in the returned report)."""
        with output_lock(self.out):
            return self._run()

    def _run(self) -> dict:
        started = time.perf_counter()
        self.prepare_out()
        plan = self.plan
        self.say(f"EdgeKit pipeline: {plan.model} on {plan.dataset} -> {self.out}/  "
                 f"(variants: {', '.join(plan.variants) or 'none'})")
        self.train()
        self.export("base")
        for variant in plan.variants:
            self.optimize(variant)
            self.export(variant)
        report = self.report()
        seconds = time.perf_counter() - started
        self.status["total"] = {"seconds": round(seconds, 1)}
        self._save()
        failed = [name for name, s in self.status.items() if s.get("status") == "failed"]
        self.say(f"\ndone in {seconds // 60:.0f} min {seconds % 60:.0f} s: {self.out / 'report.md'}")
        for note in report["notes"]:
            self.say(f"- {note}")
        if report["summary"]:
            self.say(f"to ship, within the {report['budget']:g}-point budget:")
            for line in report["summary"]:
                self.say(f"  {line}")
        if failed:
            self.say(f"stages that failed: {', '.join(failed)} (see above); rerun to retry them")
        report["failed_stages"] = failed
        return report


class _StageTimer:
    """Announces a stage, then prints and records its outcome (in pipeline.json) when it ends."""

    def __init__(self, pipeline: Pipeline, title: str, name: str):
        self.pipeline, self.title, self.name, self.outcome = pipeline, title, name, None

    def __enter__(self):
        self.started = time.perf_counter()
        self.pipeline.say(f"{self.title} ...")
        return self

    def _record(self, status: str, text: str):
        seconds = time.perf_counter() - self.started
        self.outcome = status
        self.pipeline.status[self.name] = {"status": status, "note": text, "seconds": round(seconds, 1)}
        self.pipeline._save()
        took = "" if status == "skipped" else f" in {seconds:.0f} s"
        self.pipeline.say(f"      {status}{took}: {text}")

    def skip(self, text: str):
        self._record("skipped", f"complete, {text}")

    def done(self, text: str):
        self._record("done", text)

    def fail(self, text: str):
        self._record("failed", text)

    def __exit__(self, exc_type, exc, tb):
        """A stage's error is its failure, recorded; the pipeline goes on with what does not depend on it."""
        if exc_type is not None and self.outcome is None and issubclass(exc_type, EdgeKitError):
            self._record("failed", " ".join(str(exc).split("\n")))
            if self.pipeline.verbose:
                traceback.print_exception(exc.__cause__ or exc.__context__ or exc)
            return True
        return False


def run(plan: Plan, force: bool = False, verbose: bool = False, say=print, device=None,
        threads_text: str | None = None) -> dict:
    """Run the whole pipeline (see the module docstring); returns the report. `device`: see Pipeline."""
    return Pipeline(plan, force, verbose, say, device, threads_text).run()
