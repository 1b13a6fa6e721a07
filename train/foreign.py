"""A Keras model EdgeKit did not train, made an artifact that every stage takes.

    python -m optimize prune model.h5 --dataset cifar10 --mean 0 --std 1 --out runs/mine/pruned
    python -m pipeline --from model.h5 --dataset cifar10 --mean 0 --std 1

`import_model` loads the file as data (train.safe_load: no Lambda layers, no custom objects unless trusted),
flattens nested models into one graph (`train.graph.flatten`: a layer inside a sub-model is a layer, so tfmot prunes,
clusters and quantizes it, and its regularizers and settings come along untouched), evaluates it on the
dataset's test split with the preprocessing given (`--mean/--std` in pixel units, Preprocessing.in_pixel_units;
else the dataset's), refuses it under twice chance (runtime.metrics.check_above_chance, the rule export uses),
and writes the artifact: model.keras and a manifest of kind "imported" that names the source file and its
sha256, the dataset, the preprocessing, the labels and the test accuracy. From there it is a parent like a
trained model: optimize derives from it, export verifies against it, the report compares with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from runtime.artifacts.manifest import MODEL_FILE, write_manifest
from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets import dataset_for_model
from runtime.errors import EdgeKitError
from runtime.fsutil import sha256_file, staged_dir
from runtime.metrics import check_above_chance
from train.graph import flatten
from train.safe_load import load_model_file
from train.trainer import evaluate, save_model

KIND = "imported"


def load_classifier(path: Path, dataset_name: str, data_dir, mean=None, std=None, trust: bool = False):
    """(the Keras model in `path`, loaded as data; the dataset at its input size, with --mean/--std as its
    preprocessing when given), or one line why not: not an image classifier, other classes."""

    model = load_model_file(path, trust)
    shape = getattr(model, "input_shape", None)
    if not (isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])):
        raise EdgeKitError(f"{path} takes input of shape {shape}; expected an image classifier with one NHWC input "
                           "of fixed height, width and channels.")
    dataset = dataset_for_model(path, dataset_name, data_dir, shape[1:], model.output_shape[-1])
    if mean is not None or std is not None:  # the model's own preprocessing, not the dataset's
        pre = Preprocessing.in_pixel_units(shape[1:3], shape[3], mean, std, dataset.preprocessing)
        dataset = dataclasses.replace(dataset, preprocessing=pre)
    return model, dataset


def import_model(path: str | Path, dataset_name: str, out: str | Path, *, data_dir=None, mean=None, std=None,
                 trust: bool = False, force: bool = False, allow_untrained: bool = False) -> dict:
    """Write the artifact of the Keras file `path` at `out` (see the module docstring); its manifest."""

    path, out = Path(path), Path(out)
    model, dataset = load_classifier(path, dataset_name, data_dir, mean, std, trust)
    flat = flatten(model)
    evaluation = evaluate(flat, dataset)
    if not allow_untrained:
        check_above_chance(path.name, evaluation["accuracy"], evaluation["samples"], dataset.num_classes,
                           dataset.name, dataset.preprocessing)
    with staged_dir(out, force=force) as stage:
        save_model(flat, stage / MODEL_FILE)
        manifest = {
            "name": out.name, "kind": KIND, "model": path.stem, "model_args": {}, "dataset": dataset.describe(),
            "parent": None, "model_file": MODEL_FILE, "preprocessing": dataset.preprocessing.to_dict(),
            "labels": list(dataset.labels), "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
            "source": {"file": path.name, "sha256": sha256_file(path), "nested_models_flattened": flat is not model},
            "metrics": {"accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
                        "size_bytes": (stage / MODEL_FILE).stat().st_size, "params": int(flat.count_params()),
                        "per_class_accuracy": evaluation["per_class_accuracy"],
                        "confusion": evaluation["confusion"]},
        }
        return write_manifest(stage, manifest, [MODEL_FILE])

