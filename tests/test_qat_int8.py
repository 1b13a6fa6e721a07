"""QAT, PQAT and CQAT give fully integer TFLite files: BatchNorm folded into its convolution, no float
island, and about the size of the post-training int8 file."""

import dataclasses

import pytest

from conftest import in_subprocess
from optimize.api import optimize_model
from optimize.recipes import ClusterRecipe, CQATRecipe, PQATRecipe, PruneRecipe, QATRecipe
from runtime.load import tflite_census

FAST = {"epochs": 1}
# The techniques whose int8 file each model's test converts: QAT, PQAT and CQAT on the plain model, QAT on resnet
# (its residual Adds; tests/test_export.py takes CQAT through --exclude too). resnet's PQAT and CQAT, resnet20
# (resnet's builder, deeper) and mobilenet took 1 to 2 minutes each of the suite on a 2-core Xeon; they are the
# census script's, with every technique: scripts/int8_census.py --models resnet,resnet20,mobilenet --techniques
# qat,pqat,cqat (its figures are in docs/tests.md).
TECHNIQUES = {"fashion_cnn": ("qat", "pqat", "cqat"), "resnet": ("qat",)}
SMALL_ARGS = {"fashion_cnn": {"filters": [8, 16], "dense": 32}}


@pytest.fixture(scope="session")
def small(digits):
    """96 training images: enough to fine-tune each technique for one real epoch in a second or two."""
    return dataclasses.replace(digits, x_train=digits.x_train[:96], y_train=digits.y_train[:96],
                               x_val=digits.x_val[:32], y_val=digits.y_val[:32])


def int8_files(name: str, dataset, techniques) -> tuple[dict[str, bytes], dict[str, dict | None]]:
    """For one registered model: the int8 file of its float parent (trained one epoch; post-training,
    calibrated) and of each technique (pqat on a pruned parent, cqat on a clustered one), made as export makes
    them, and how each technique's was made (None: from the learned ranges)."""
    from export.make import qat_int8_file
    from export.convert import to_tflite
    from optimize.techniques import float_twin
    from train.backend import keras
    from train.models import create_model
    from train.trainer import compile_model, fit, seed_everything

    def fresh(model):  # an independent copy, as each optimize run loads its parent from disk
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        return copy

    seed_everything(0)
    parent = create_model(name, dataset.input_shape, dataset.num_classes, **SMALL_ARGS.get(name, {}))
    compile_model(parent, 1e-3)
    fit(parent, dataset, epochs=1, batch_size=32, seed=0, quiet=True)
    calibration = dataset.arrays("train")[0][:32]
    files, records = {"plain": to_tflite(parent, "int8", calibration, False)}, {}
    sources = {"qat": (QATRecipe(**FAST), lambda: (parent, None))}
    if "pqat" in techniques:
        def pruned():
            result = optimize_model(fresh(parent), PruneRecipe(sparsity=0.5, **FAST), dataset, quiet=True)
            return result.model, result.facts
        sources["pqat"] = (PQATRecipe(**FAST), pruned)
    if "cqat" in techniques:
        def clustered():
            result = optimize_model(fresh(parent), ClusterRecipe(clusters=8, **FAST), dataset, quiet=True)
            return result.model, {**result.facts, "clusters": 8}
        sources["cqat"] = (CQATRecipe(preserve_sparsity=False, **FAST), clustered)
    for technique in techniques:
        recipe, source = sources[technique]
        model, facts = source()
        result = optimize_model(fresh(model), recipe, dataset, quiet=True, parent_facts=facts)
        files[technique], records[technique] = qat_int8_file(
            result.model, lambda q=result.model, b=model: (float_twin(q, b), []), calibration,
            progress=lambda line: None)
    return files, records


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) for name in TECHNIQUES])
# fashion_cnn 50 s, resnet 25 s: `python -m pytest -m slow`; in the suite, test_export's QAT int8 files and the
# quick pipeline's; the backbones: test_backbones.py
def quantization_aware(request, small):
    """Made in a subprocess (conftest.in_subprocess): what the converters hold goes back when it ends."""
    return (request.param, *in_subprocess(int8_files, request.param, small, TECHNIQUES[request.param]))


def test_quantization_aware_int8_files_are_fully_integer(quantization_aware):
    name, files, records = quantization_aware
    plain = tflite_census(files["plain"])
    assert plain["float_ops"] == []
    for technique in TECHNIQUES[name]:
        assert records[technique] is None, (name, technique)  # from the learned ranges, no calibration needed
        census = tflite_census(files[technique])
        assert census["float_ops"] == [], (name, technique, census)
        assert set(census["dtypes"]) <= {"int8", "int32"}, (name, technique, census)  # int32: biases, shapes
        assert census["ops"] == plain["ops"], (name, technique)  # the very graph of post-training int8


def test_quantization_aware_int8_is_the_size_of_post_training_int8(quantization_aware):
    name, files, _ = quantization_aware
    for technique in TECHNIQUES[name]:
        assert abs(len(files[technique]) / len(files["plain"]) - 1) <= 0.03, (name, technique, len(files[technique]),
                                                                               len(files["plain"]))


def test_excluded_layers_and_their_batchnorm_stay_float_in_the_keras_model(small):
    from train.models import create_model

    model = create_model("fashion_cnn", small.input_shape, small.num_classes, **SMALL_ARGS["fashion_cnn"])
    result = optimize_model(model, QATRecipe(exclude=("block2_conv1",), **FAST), small, quiet=True)
    assert result.facts["skipped"] == {"block2_conv1": "excluded by --exclude",
                                       "block2_bn1": "BatchNormalization after a layer that stays float"}
    wrapped = {layer.name for layer in result.model.layers if layer.name.startswith("quant_")}
    assert "quant_block2_conv1" not in wrapped and "quant_block1_conv1" in wrapped
    assert "quant_block1_bn1" in wrapped  # folded with its convolution by tfmot's transform
