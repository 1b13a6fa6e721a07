"""Every tfmot technique on a tiny real model: measured sparsity, the 2:4 pattern, cluster
counts, preserved sparsity and clusters after PQAT/CQAT, lineage, and the CLI's errors."""

import dataclasses
import json
import re

import numpy as np
import pytest

from conftest import run_module
from optimize import (ClusterRecipe, CQATRecipe, PQATRecipe, PruneRecipe, QATRecipe, cluster, cqat, load_model,
                      pqat, prune, qat, recipe_from_dict)
from optimize.measure import kernel_facts, satisfies_m_by_n
from runtime.errors import EdgeKitError
from runtime.artifacts.manifest import read_manifest, verify_files

FAST = {"epochs": 2, "quiet": True}


@pytest.fixture(scope="session")
def pruned(tiny):
    return prune(tiny, tiny.with_name("pruned"), sparsity=0.8, **FAST), tiny.with_name("pruned")


@pytest.fixture(scope="session")
def clustered(tiny):
    return cluster(tiny, tiny.with_name("clustered"), clusters=8, **FAST), tiny.with_name("clustered")


def test_prune_reaches_the_target_in_every_pruned_kernel(tiny, pruned):
    manifest, out = pruned
    facts = manifest["facts"]
    assert facts["touched"] == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "head_dense",
                                "logits"]
    for name in facts["touched"]:
        assert facts["layers"][name]["sparsity"] >= 0.79, name
    assert manifest["metrics"]["sparsity"] >= 0.79
    assert manifest["metrics"]["gzip_bytes"] < 0.6 * manifest["metrics"]["parent_gzip_bytes"]
    assert verify_files(out) == []


def test_pruned_model_is_plain_keras_with_the_parents_layer_names(tiny, pruned):
    from train.backend import keras

    model = keras.models.load_model(pruned[1] / "model.keras", compile=False)  # no tfmot scope needed
    parent = keras.models.load_model(tiny / "model.keras", compile=False)
    assert [layer.name for layer in model.layers] == [layer.name for layer in parent.layers]
    # The facts are counted in the saved weights, not copied from the schedule.
    assert kernel_facts(model)["layers"]["head_dense"]["zeros"] == pruned[0]["facts"]["layers"]["head_dense"]["zeros"]


def test_manifest_records_lineage_recipe_and_accuracy_on_the_same_split(tiny, pruned):
    manifest, _ = pruned
    parent = read_manifest(tiny)
    assert manifest["kind"] == "pruned" and manifest["parent"]["name"] == "tiny"
    assert manifest["parent"]["model_sha256"] == parent["files"]["model.keras"]["sha256"]
    assert recipe_from_dict(manifest["recipe"]) == PruneRecipe(sparsity=0.8, epochs=2)
    assert [step["technique"] for step in manifest["lineage"]] == ["prune"]
    assert manifest["dataset"] == parent["dataset"] and manifest["preprocessing"] == parent["preprocessing"]
    assert manifest["metrics"]["accuracy_change"] == pytest.approx(
        manifest["metrics"]["accuracy"] - parent["metrics"]["accuracy"])
    assert manifest["fine_tuning"]["end_step"] <= manifest["fine_tuning"]["total_steps"]


def test_structured_2_4_holds_along_input_channels(tiny):
    manifest = prune(tiny, tiny.with_name("2of4"), structured="2:4", **FAST)
    facts = manifest["facts"]
    assert facts["skipped"] == {"block1_conv1": "1 input channels is not a multiple of 4"}
    model = load_model(tiny.with_name("2of4"))
    for name in facts["touched"]:
        kernel = model.get_layer(name).kernel.numpy()
        assert satisfies_m_by_n(kernel, 2, 4), name
        assert facts["layers"][name]["sparsity"] >= 0.5
    assert manifest["facts"]["checks"]["m_by_n"]["violations"] == []


def test_m_by_n_check_catches_a_violation():
    kernel = np.ones((3, 3, 8, 4), np.float32)  # (H, W, Cin, Cout)
    kernel[:, :, 0::2, :] = 0  # zeros at input channels 0, 2, 4, 6: 2 of every 4
    assert satisfies_m_by_n(kernel, 2, 4)
    kernel[1, 1, 2, 3] = 0.5  # one block of 4 input channels now has only 1 zero
    assert not satisfies_m_by_n(kernel, 2, 4)
    assert satisfies_m_by_n(np.zeros((8, 2)), 2, 4) and not satisfies_m_by_n(np.ones((8, 2)), 1, 4)


def test_cluster_leaves_at_most_n_values_per_kernel(clustered):
    manifest, out = clustered
    model = load_model(out)
    for name in manifest["facts"]["touched"]:
        assert np.unique(model.get_layer(name).kernel.numpy()).size <= 8, name
    assert manifest["metrics"]["max_unique"] <= 8 and manifest["kind"] == "clustered"


def test_qat_artifact_reloads_to_the_same_predictions(tiny, digits):
    manifest = qat(tiny, tiny.with_name("qat"), **FAST)
    model = load_model(tiny.with_name("qat"))
    assert any(layer.name.startswith("quant_") for layer in model.layers)
    x, y = digits.arrays("test")
    assert np.mean(model.predict(x, verbose=0).argmax(axis=1) == y) == pytest.approx(manifest["metrics"]["accuracy"])
    assert set(manifest["files"]) == {"model.weights.h5", "base.keras"}


def test_pqat_keeps_the_parents_sparsity(pruned):
    parent_manifest, parent = pruned
    manifest = pqat(parent, parent.with_name("pqat"), **FAST)
    for name in parent_manifest["facts"]["touched"]:
        assert manifest["facts"]["layers"][name]["sparsity"] >= parent_manifest["facts"]["layers"][name]["sparsity"] - 0.005
    assert manifest["facts"]["checks"]["sparsity_kept"] is True
    assert [step["technique"] for step in manifest["lineage"]] == ["prune", "pqat"]


def test_cqat_keeps_the_parents_clusters(clustered):
    _, parent = clustered
    manifest = cqat(parent, parent.with_name("cqat"), **FAST)
    assert manifest["recipe"]["preserve_sparsity"] is False  # resolved: the parent has no zeros
    parent_clustered = read_manifest(parent)["facts"]["touched"]
    for name in parent_clustered:
        assert manifest["facts"]["layers"][name]["unique_per_channel"] <= 8, name
    assert manifest["metrics"]["max_unique"] <= 8
    assert manifest["facts"]["checks"]["clusters_kept"] is True


# --- errors -------------------------------------------------------------------------

def test_pqat_refuses_a_parent_that_is_not_pruned(tiny, tmp_path):
    with pytest.raises(EdgeKitError, match="trained, not pruned.*optimize prune"):
        pqat(tiny, tmp_path / "x", **FAST)


def test_cqat_refuses_a_parent_that_is_not_clustered(pruned, tmp_path):
    with pytest.raises(EdgeKitError, match="pruned, not clustered"):
        cqat(pruned[1], tmp_path / "x", **FAST)


def test_excluding_every_layer_is_an_error(tiny, tmp_path):
    with pytest.raises(EdgeKitError, match="found no layer to work on"):
        prune(tiny, tmp_path / "x", exclude=("*",), **FAST)
    assert not (tmp_path / "x").exists()


def test_exclude_leaves_named_layers_dense(tiny, tmp_path):
    manifest = prune(tiny, tmp_path / "x", sparsity=0.5, exclude=("logits", "block1_*"), **FAST)
    assert "logits" not in manifest["facts"]["touched"] and manifest["facts"]["skipped"]["logits"].startswith("excluded")
    assert manifest["facts"]["layers"]["logits"]["sparsity"] < 0.1


@pytest.mark.parametrize("make, message", [
    (lambda: PruneRecipe(sparsity=1.0), "strictly between 0 and 1"),
    (lambda: PruneRecipe(sparsity=0), "strictly between 0 and 1"),
    (lambda: PruneRecipe(structured="2-4"), "M:N"),
    (lambda: ClusterRecipe(clusters=1), "from 2 to 256"),
    (lambda: ClusterRecipe(clusters=100000), "from 2 to 256"),
    (lambda: ClusterRecipe(init="kmeans"), "Did you mean 'kmeans\\+\\+'"),
    (lambda: QATRecipe(epochs=0), "--epochs must be a positive integer"),
    (lambda: recipe_from_dict({"technique": "distill"}), "unknown technique 'distill'"),
    (lambda: recipe_from_dict({"technique": "prune", "sparsty": 0.5}), "unknown settings \\['sparsty'\\]"),
])
def test_recipe_validation(make, message):
    with pytest.raises(EdgeKitError, match=message):
        make()


@pytest.mark.parametrize("recipe", [PruneRecipe(), PruneRecipe(structured="2:4", exclude=("logits",)),
                                    ClusterRecipe(clusters=8, init="density"), QATRecipe(lr=1e-3),
                                    PQATRecipe(), CQATRecipe(preserve_sparsity=True)])
def test_recipes_round_trip_through_json(recipe):
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 99


@pytest.mark.parametrize("args, message", [
    (["prun", "PARENT"], "unknown technique 'prun'.*Did you mean 'prune'"),
    (["prune", "--sparsity", "1.2", "PARENT"], "--sparsity must be strictly between 0 and 1"),
    (["cluster", "--clusters", "1", "PARENT"], "--clusters must be a whole number from 2 to 256"),
    (["cluster", "--clusters", "100000", "PARENT"], "--clusters must be a whole number from 2 to 256"),
    (["prune", "--structured", "2:4", "--sparsity", "0.5", "PARENT"], "sets the sparsity itself.*Give one of them"),
    (["pqat", "PARENT"], "trained, not pruned"),
    (["qat", "/nonexistent/artifact"], "does not exist; expected an EdgeKit artifact"),
    (["qat", "PARENT_MODEL_FILE"], "pass --dataset NAME"),  # a model file from elsewhere needs its dataset
])
def test_cli_errors_are_one_line_with_exit_code_2(tiny, args, message):
    args = [a.replace("PARENT_MODEL_FILE", str(tiny / "model.keras")).replace("PARENT", str(tiny)) for a in args]
    result = run_module("optimize", *args, "--out", str(tiny.with_name("never")))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_cli_prunes_and_names_the_output(tiny, tmp_path):
    import shutil

    parent = tmp_path / "cnn"
    shutil.copytree(tiny, parent)
    result = run_module("optimize", "prune", "--sparsity", "0.5", "--epochs", "1", str(parent))
    assert result.returncode == 0, result.stderr
    assert re.search(r"sparsity 0\.5\d\d", result.stdout) and f"next: python -m export --all {tmp_path}" in result.stdout
    assert read_manifest(tmp_path / "cnn-pruned50")["recipe"]["sparsity"] == 0.5


@pytest.mark.parametrize("verb, parent, settings", [
    (prune, "tiny", {"sparsity": 0.8}), (qat, "tiny", {}),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in (  # 6, 6, 7 and 9 s: `python -m pytest -m slow`
        (prune, "tiny", {"structured": "2:4"}), (cluster, "tiny", {"clusters": 8}), (pqat, "pruned", {}),
        (cqat, "clustered", {}))),
], ids=["prune", "qat", "2of4", "cluster", "pqat", "cqat"])
def test_the_same_seed_gives_the_same_bits(tiny, pruned, clustered, tmp_path, verb, parent, settings):
    """Each technique twice, from the same parent and seed: byte-identical model files (same sha256)."""
    source = tiny.with_name(parent)
    first = verb(source, tmp_path / "a", epochs=1, quiet=True, **settings)
    second = verb(source, tmp_path / "b", epochs=1, quiet=True, **settings)
    assert first["files"] == second["files"]
    assert first["metrics"]["accuracy"] == second["metrics"]["accuracy"]


def test_a_pruned_models_files_are_dense_by_default_and_sparse_only_when_asked(pruned, digits, tmp_path):
    """By default every file runs in bare LiteRT (XNNPACK, its default) and its sidecar says it was verified there.
    With sparse=True (export --sparse): smaller files, verified, that EdgeKit's runtime densifies at load into the
    dense file's bits; bare LiteRT refuses the sparse int8 file, and the sidecar, info and the report say that the
    file needs EdgeKit's runtime."""
    from ai_edge_litert.interpreter import Interpreter

    from export import export
    from runtime.load import load
    from runtime.artifacts.manifest import needs_edgekit
    from runtime.backends.sparse import sparse_tensors

    _, directory = pruned
    formats = ["float32", "int8"]
    dense = {r.format: r for r in export(directory, formats, tmp_path / "dense", progress=lambda s: None)}
    sparse = {r.format: r for r in export(directory, formats, tmp_path / "sparse", sparse=True,
                                          progress=lambda s: None)}
    x, _ = digits.arrays("test")
    for fmt in formats:
        d, s = dense[fmt], sparse[fmt]
        assert d.passed and s.passed, (d.message, s.message)
        assert sparse_tensors(s.file.read_bytes()) > 0 and sparse_tensors(d.file.read_bytes()) == 0
        assert s.file.stat().st_size < 0.8 * d.file.stat().st_size
        assert np.array_equal(load(s.file).logits(x), load(d.file).logits(x))
        sidecar = json.loads(s.file.with_suffix(".json").read_text())
        assert sidecar["sparse_encoding"]["dense_bytes"] == d.file.stat().st_size
        assert needs_edgekit(sidecar) and "needs EdgeKit's runtime" in run_module("runtime", "info", str(s.file)).stdout
        dense_sidecar = json.loads(d.file.with_suffix(".json").read_text())
        assert dense_sidecar["bare"]["passed"] and dense_sidecar["bare"]["agreement"] == 1.0
        assert needs_edgekit(dense_sidecar) is None
        interpreter = Interpreter(model_path=str(d.file))  # the user's own app: bare LiteRT takes the default file
        interpreter.allocate_tensors()
    assert sparse["int8"].figures["bare"]["passed"] is False and "refuses" in sparse["int8"].figures["bare"]["reason"]
    with pytest.raises((RuntimeError, ValueError)):
        interpreter = Interpreter(model_path=str(sparse["int8"].file))
        interpreter.allocate_tensors()
