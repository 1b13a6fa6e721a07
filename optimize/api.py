"""Optimizing an artifact: parent in, fine-tuned and measured child artifact out.

    from optimize import prune, cluster, qat, pqat, cqat
    prune("artifacts/cnn", "artifacts/cnn-pruned80", sparsity=0.8)
    prune("artifacts/cnn", "artifacts/cnn-2of4", structured="2:4")
    pqat("artifacts/cnn-pruned80", "artifacts/cnn-pqat")

The dataset, split and preprocessing come from the parent's manifest. The child's
manifest names its parent, holds the recipe, and records what was measured in the
weights: sparsity per layer and overall, unique values per layer, the M:N pattern,
accuracy on the same test split, and gzip size against the parent's.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from optimize import measure
from optimize.recipes import RECIPES, Technique, _Recipe
from runtime.datasets import Dataset, load_for_manifest
from runtime.errors import EdgeKitError
from runtime.fsutil import sha256_file, staged_dir
from runtime.manifest import read_manifest, verify_files, write_manifest

KIND = {Technique.PRUNE: "pruned", Technique.CLUSTER: "clustered", Technique.QAT: "qat",
        Technique.PQAT: "pqat", Technique.CQAT: "cqat"}
QUANTIZATION_AWARE = {"qat", "pqat", "cqat"}
TOLERANCE = 0.005  # measured sparsity may fall this far below the target (rounding per kernel)


def model_path(artifact: str | Path, manifest: dict | None = None) -> Path:
    artifact = Path(artifact)
    manifest = manifest or read_manifest(artifact)
    return artifact / manifest.get("model_file", "model.keras")


def load_model(artifact: str | Path):
    """Load an artifact's Keras model, rebuilding quantization-aware ones.

    A qat/pqat/cqat artifact holds the float model QAT was applied to (`base.keras`)
    and the quantization-aware weights (`model.weights.h5`): tfmot's own serialization
    loses the prune- and cluster-preserving quantizers (their configs save as the plain
    8-bit ones) and its `.keras` files do not load back (tensorflow/model-optimization#1123),
    so the model is rebuilt from its recipe and the weights are loaded into it.
    """
    from train.backend import keras

    manifest = read_manifest(artifact)
    path = model_path(artifact, manifest)
    if not path.is_file() or not path.name.endswith((".keras", ".h5")):
        raise EdgeKitError(
            f"{artifact} holds no Keras model (looked for {path.name}); expected the artifact of "
            "`python -m train` or `python -m optimize`."
        )
    if manifest["kind"] not in QUANTIZATION_AWARE:
        return keras.models.load_model(path, compile=False)
    from optimize.recipes import recipe_from_dict
    from optimize.techniques import prepare_qat

    base = keras.models.load_model(Path(artifact) / manifest["base_file"], compile=False)
    model = prepare_qat(base, recipe_from_dict(manifest["recipe"]), steps_per_epoch=1).model
    try:
        model.load_weights(path)
    except ValueError as exc:
        raise EdgeKitError(f"{path} does not fit the model rebuilt from its recipe ({str(exc)[:200]}); "
                           "it was written by another EdgeKit version. Run the optimize step again.") from None
    return model


@dataclasses.dataclass
class Optimized:
    model: object  # the stripped (or quantization-aware) keras.Model
    facts: dict  # kernel_facts + touched/skipped layers + checks
    history: dict
    seconds: float
    details: dict


def _check_parent(manifest: dict, recipe: _Recipe) -> None:
    technique, kind = recipe.technique.value, manifest["kind"]
    if kind in QUANTIZATION_AWARE:
        raise EdgeKitError(
            f"{manifest['name']} is already quantization-aware ({kind}); {technique} needs a float parent. "
            f"Optimize its parent instead ({(manifest.get('parent') or {}).get('path', 'the trained artifact')})."
        )
    if technique == "pqat" and kind != "pruned":
        raise EdgeKitError(
            f"pqat keeps a pruned parent's sparsity, but {manifest['name']} is {kind}, not pruned. "
            f"Run `python -m optimize prune` on it first, then pqat on the result."
        )
    if technique == "cqat" and kind != "clustered":
        raise EdgeKitError(
            f"cqat keeps a clustered parent's clusters, but {manifest['name']} is {kind}, not clustered. "
            f"Run `python -m optimize cluster` on it first, then cqat on the result."
        )


def optimize_model(model, recipe: _Recipe, dataset: Dataset, quiet: bool = False,
                   parent_facts: dict | None = None) -> Optimized:
    """Apply a recipe to a keras model in memory: wrap, fine-tune, strip, measure, check."""
    from optimize.techniques import PREPARE, steps_per_epoch
    from train.backend import keras
    from train.trainer import compile_model, fit

    keras.utils.set_random_seed(recipe.seed)
    steps = steps_per_epoch(len(dataset.y_train), recipe.batch_size)
    prepared = PREPARE[recipe.technique.value](model, recipe, steps)
    compile_model(prepared.model, recipe.lr)
    start = time.perf_counter()
    history = fit(prepared.model, dataset, epochs=recipe.epochs, batch_size=recipe.batch_size, seed=recipe.seed,
                  quiet=quiet, callbacks=prepared.callbacks)
    seconds = time.perf_counter() - start
    final = prepared.strip(prepared.model)
    # PQAT/CQAT promise to keep what the parent did, so measure over the layers the parent pruned/clustered.
    keeps_parent = recipe.technique.value in ("pqat", "cqat") and parent_facts
    facts = measure.kernel_facts(final, parent_facts["touched"] if keeps_parent else prepared.touched)
    facts.update(touched=prepared.touched, skipped=prepared.skipped, checks=_checks(recipe, facts, final,
                                                                                     prepared.touched, parent_facts))
    return Optimized(final, facts, history, seconds, prepared.details)


def _checks(recipe, facts, model, touched, parent_facts) -> dict:
    """What the technique promised, checked in the weights. A broken promise is an error."""
    checks = {}
    technique = recipe.technique.value
    if technique == "prune" and recipe.structured:
        m, n = recipe.m_by_n
        kernels = measure.effective_kernels(model)
        bad = [name for name in touched if not measure.satisfies_m_by_n(kernels[name][1], m, n)]
        checks["m_by_n"] = {"pattern": recipe.structured, "layers_checked": len(touched), "violations": bad}
        if bad:
            raise EdgeKitError(f"{recipe.structured} pattern not met after pruning in layers {bad}.")
    elif technique == "prune":
        checks["target_sparsity"] = recipe.sparsity
        if facts["sparsity"] < recipe.sparsity - TOLERANCE:
            raise EdgeKitError(
                f"pruning reached sparsity {facts['sparsity']:.3f}, short of the target {recipe.sparsity}; "
                "raise --epochs so the schedule can complete."
            )
    elif technique == "cluster":
        over = {n: facts["layers"][n]["unique"] for n in touched if facts["layers"][n]["unique"] > recipe.clusters}
        checks["max_unique"] = facts["max_unique"]
        if over:
            raise EdgeKitError(f"clustering left more than {recipe.clusters} unique values in {over}.")
    elif technique == "pqat" and parent_facts:
        before = parent_facts.get("sparsity", 0.0)
        checks["parent_sparsity"], checks["sparsity_kept"] = before, facts["sparsity"] >= before - TOLERANCE
    elif technique == "cqat" and parent_facts:
        clusters = parent_facts.get("clusters")
        checks["parent_clusters"] = clusters
        checks["clusters_kept"] = clusters is not None and facts["max_unique"] <= clusters
    return checks


def run(parent: str | Path, recipe: _Recipe, out: str | Path, *, force: bool = False, quiet: bool = False,
        data_dir: str | Path | None = None) -> dict:
    """Optimize the artifact at `parent` with `recipe`, writing the child artifact at `out`."""
    from runtime.fsutil import check_output_dir
    from train.trainer import evaluate, save_model

    parent, out = Path(parent), Path(out)
    manifest = read_manifest(parent)
    problems = verify_files(parent, manifest)
    if problems:
        raise EdgeKitError(f"parent {parent} is damaged ({'; '.join(problems)}); re-create it first.")
    _check_parent(manifest, recipe)
    check_output_dir(out, force)
    parent_file = model_path(parent, manifest)
    dataset = load_for_manifest(manifest, data_dir)
    model = load_model(parent)
    technique = recipe.technique.value
    if not quiet:
        print(f"{technique}: {manifest['name']} ({manifest['model']}, test accuracy "
              f"{manifest['metrics']['accuracy']:.2%}) with {recipe.to_dict()}", flush=True)
    parent_facts = manifest.get("facts")
    if technique == "cqat" and parent_facts is not None:
        parent_facts = {**parent_facts, "clusters": manifest["recipe"]["clusters"]}
        if recipe.preserve_sparsity is None:  # keep zeros only when the parent has them (pruned, then clustered)
            recipe = dataclasses.replace(recipe, preserve_sparsity=parent_facts.get("model_sparsity", 0) > 0.05)
    result = optimize_model(model, recipe, dataset, quiet=quiet, parent_facts=parent_facts)
    evaluation = evaluate(result.model, dataset)
    quantization_aware = technique in QUANTIZATION_AWARE
    model_file = "model.weights.h5" if quantization_aware else "model.keras"
    files = [model_file, "base.keras"] if quantization_aware else [model_file]
    with staged_dir(out, force=force) as stage:
        if quantization_aware:  # see load_model: float base + quantization-aware weights
            shutil.copyfile(parent_file, stage / "base.keras")
            result.model.save_weights(stage / model_file)
        else:
            save_model(result.model, stage / model_file)
        size, gzipped, parent_gzipped = ((stage / model_file).stat().st_size, measure.gzip_bytes(stage / model_file),
                                         measure.gzip_bytes(parent_file))
        child = {
            "name": out.name,
            "kind": KIND[recipe.technique],
            "model": manifest["model"],
            "model_args": manifest.get("model_args", {}),
            "model_file": model_file,
            **({"base_file": "base.keras"} if quantization_aware else {}),
            "dataset": manifest["dataset"],
            "parent": {"name": manifest["name"], "path": str(parent.resolve()), "kind": manifest["kind"],
                       "model_sha256": sha256_file(parent_file), "accuracy": manifest["metrics"]["accuracy"]},
            "lineage": [*manifest.get("lineage", []), recipe.to_dict()],
            "recipe": recipe.to_dict(),
            "preprocessing": manifest["preprocessing"],
            "labels": manifest["labels"],
            "input_shape": manifest["input_shape"],
            "num_classes": manifest.get("num_classes", len(manifest["labels"])),
            "metrics": {
                "accuracy": evaluation["accuracy"],
                "accuracy_change": evaluation["accuracy"] - manifest["metrics"]["accuracy"],
                "loss": evaluation["loss"],
                "size_bytes": size,
                "gzip_bytes": gzipped,
                "parent_gzip_bytes": parent_gzipped,
                "gzip_ratio_vs_parent": gzipped / parent_gzipped,
                "params": int(result.model.count_params()),
                "sparsity": result.facts["sparsity"],
                "model_sparsity": result.facts["model_sparsity"],
                "max_unique": result.facts["max_unique"],
                "per_class_accuracy": evaluation["per_class_accuracy"],
                "confusion": evaluation["confusion"],
            },
            "facts": result.facts,
            "fine_tuning": {"epochs": recipe.epochs, "seconds": round(result.seconds, 2),
                            "history": result.history, **result.details},
        }
        return write_manifest(stage, child, files)


def _verb(technique: Technique):
    recipe_cls = RECIPES[technique.value]

    def verb(parent, out, *, force=False, quiet=False, data_dir=None, **settings) -> dict:
        return run(parent, recipe_cls(**settings), out, force=force, quiet=quiet, data_dir=data_dir)

    verb.__name__ = technique.value
    verb.__doc__ = f"{technique.value} the artifact at `parent` into `out`; settings as in {recipe_cls.__name__}."
    return verb


prune, cluster, qat, pqat, cqat = (_verb(t) for t in Technique)
