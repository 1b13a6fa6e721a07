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
from optimize.recipes import RECIPES, Recipe, Technique, recipe_from_dict
from runtime.artifacts.manifest import (BASE_FILE, MODEL_FILE, QAT_WEIGHTS_FILE, base_file, check_out_apart, core_names,
                                        lineage_paths, model_file, read_manifest, verify_artifact, write_manifest)
from runtime.datasets import Dataset, load_for_manifest
from runtime.errors import ArtifactError, EdgeKitError, VerificationError, first_line
from runtime.fsutil import check_output_dir, output_lock, sha256_file, staged_dir
from runtime.vocabulary import QUANTIZATION_AWARE
from train.safe_load import load_model_file
from train.trainer import compile_model, evaluate, fit, save_model, seed_everything

KIND = {Technique.PRUNE: "pruned", Technique.CLUSTER: "clustered", Technique.QAT: "qat",
        Technique.PQAT: "pqat", Technique.CQAT: "cqat"}
TOLERANCE = 0.005  # measured sparsity may fall this far below the target (rounding per kernel)


def load_model(artifact: str | Path, trust: bool = False, manifest: dict | None = None, verified: bool = False):
    """Load an artifact's Keras model, rebuilding quantization-aware ones, after checking its files.

    The model file (and base model) must match the sha256 the manifest records, and is loaded as
    data (`train.safe_load`: no Lambda layers or custom objects unless `trust`). `verified`: the caller has
    just checked them against `manifest` (each file is hashed once).
    A qat/pqat/cqat artifact holds the float model QAT was applied to (`base.keras`)
    and the quantization-aware weights (`model.weights.h5`): tfmot's own serialization
    loses the prune- and cluster-preserving quantizers (their configs save as the plain
    8-bit ones) and its `.keras` files do not load back (tensorflow/model-optimization#1123),
    so the model is rebuilt from its recipe and the weights are loaded into it.
    """

    manifest = manifest if manifest is not None else read_manifest(artifact)
    path = model_file(artifact, manifest)
    if not verified:
        verify_artifact(artifact, manifest, core_names(manifest))
    if manifest["kind"] not in QUANTIZATION_AWARE:
        return load_model_file(path, trust)
    from optimize.techniques import prepare_qat

    if not isinstance(manifest.get("recipe"), dict):
        raise ArtifactError(f"{artifact}/manifest.json holds no recipe to rebuild its {manifest['kind']} model from; "
                            "re-create the artifact.")
    base = load_model_file(base_file(artifact, manifest), trust)
    model = prepare_qat(base, recipe_from_dict(manifest["recipe"]), steps_per_epoch=1).model
    try:
        model.load_weights(path)
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path} does not fit the model rebuilt from its recipe ({first_line(exc)}); "
                            "it was written by another EdgeKit version. Run the optimize step again.") from exc
    return model


def qat_float_twin(artifact: str | Path, manifest: dict, quantized, trust: bool = False):
    """(float twin, the layers its recipe's --exclude names) of a qat/pqat/cqat artifact: its base model with
    the weights QAT trained (`techniques.float_twin`), to calibrate into an int8 file when the learned ranges
    cannot make the right one: to keep exactly the excluded layers float, which the converter will not do from
    the fake-quantized model (it quantizes a layer whenever the tensors on both sides carry ranges:
    tensorflow/tensorflow#46073), or to make a fully integer file of a model with layers tfmot's scheme left
    without ranges (the converter leaves those float)."""
    from optimize.techniques import float_twin, is_excluded

    patterns = (manifest.get("recipe") or {}).get("exclude") or []
    twin = float_twin(quantized, load_model_file(base_file(artifact, manifest), trust))
    return twin, [layer.name for layer in twin.layers if patterns and is_excluded(layer.name, patterns)]


@dataclasses.dataclass
class Optimized:
    model: object  # the stripped (or quantization-aware) keras.Model
    facts: dict  # kernel_facts + touched/skipped layers + checks
    history: dict
    seconds: float
    details: dict


def _check_parent(manifest: dict, recipe: Recipe) -> None:
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


def optimize_model(model, recipe: Recipe, dataset: Dataset, quiet: bool = False,
                   parent_facts: dict | None = None) -> Optimized:
    """Apply a recipe to a keras model in memory: wrap, fine-tune, strip, measure, check."""
    from optimize.techniques import PREPARE, steps_per_epoch

    seed_everything(recipe.seed)
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
            raise VerificationError(f"{recipe.structured} pattern not met after pruning in layers {bad}.")
    elif technique == "prune":
        checks["target_sparsity"] = recipe.sparsity
        if facts["sparsity"] < recipe.sparsity - TOLERANCE:
            raise VerificationError(
                f"pruning reached sparsity {facts['sparsity']:.3f}, short of the target {recipe.sparsity}; "
                "raise --epochs so the schedule can complete."
            )
    elif technique == "cluster":
        over = {n: facts["layers"][n]["unique"] for n in touched if facts["layers"][n]["unique"] > recipe.clusters}
        checks["max_unique"] = facts["max_unique"]
        if over:
            raise VerificationError(f"clustering left more than {recipe.clusters} unique values in {over}.")
    elif technique == "pqat" and parent_facts:
        before = parent_facts.get("sparsity", 0.0)
        checks["parent_sparsity"], checks["sparsity_kept"] = before, facts["sparsity"] >= before - TOLERANCE
    elif technique == "cqat" and parent_facts:
        clusters = parent_facts.get("clusters")
        checks["parent_clusters"] = clusters
        checks["clusters_kept"] = clusters is not None and facts["max_unique"] <= clusters
    return checks


def run(parent: str | Path, recipe: Recipe, out: str | Path, *, force: bool = False, quiet: bool = False,
        data_dir: str | Path | None = None, trust: bool = False) -> dict:
    """Optimize the artifact at `parent` with `recipe`, writing the child artifact at `out`.

    Every file of the parent is checked first (ArtifactError, exit 1, if one differs from its
    manifest), and `out` may be neither the parent nor any of its ancestors, nor inside or around them.
    """
    parent, out = Path(parent), Path(out)
    manifest = read_manifest(parent)
    check_out_apart(out, lineage_paths(parent, manifest))
    with output_lock(out):
        return _run(parent, manifest, recipe, out, force, quiet, data_dir, trust)


def _run(parent, manifest, recipe, out, force, quiet, data_dir, trust) -> dict:
    verify_artifact(parent, manifest)
    _check_parent(manifest, recipe)
    check_output_dir(out, force)
    parent_file = model_file(parent, manifest)
    dataset = load_for_manifest(manifest, data_dir)
    model = load_model(parent, trust, manifest, verified=True)
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
    name = QAT_WEIGHTS_FILE if quantization_aware else MODEL_FILE
    files = [name, BASE_FILE] if quantization_aware else [name]
    with staged_dir(out, force=force) as stage:
        if quantization_aware:  # see load_model: float base + quantization-aware weights
            shutil.copyfile(parent_file, stage / BASE_FILE)
            result.model.save_weights(stage / name)
        else:
            save_model(result.model, stage / name)
        # the model's size: for a quantization-aware artifact the float model it is (base.keras), not the
        # weights file that also holds its quantizers' training state
        sized = stage / (BASE_FILE if quantization_aware else name)
        size, gzipped, parent_gzipped = (sized.stat().st_size, measure.gzip_bytes(sized),
                                         measure.gzip_bytes(parent_file))
        child = {
            "name": out.name,
            "kind": KIND[recipe.technique],
            "model": manifest["model"],
            "model_args": manifest.get("model_args", {}),
            "model_file": name,
            **({"base_file": BASE_FILE} if quantization_aware else {}),
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
                **({"qat_weights_bytes": (stage / name).stat().st_size} if quantization_aware else {}),
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

    def verb(parent, out, *, force=False, quiet=False, data_dir=None, trust=False, **settings) -> dict:
        return run(parent, recipe_cls(**settings), out, force=force, quiet=quiet, data_dir=data_dir, trust=trust)

    verb.__name__ = technique.value
    verb.__doc__ = f"{technique.value} the artifact at `parent` into `out`; settings as in {recipe_cls.__name__}."
    return verb


prune, cluster, qat, pqat, cqat = (_verb(t) for t in Technique)
