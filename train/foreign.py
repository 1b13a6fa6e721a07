"""A Keras model EdgeKit did not train, made an artifact that every stage takes.

    python -m optimize prune model.h5 --dataset cifar10 --mean 0 --std 1 --out runs/mine/pruned
    python -m pipeline --from model.h5 --dataset cifar10 --mean 0 --std 1

`import_model` loads the file as data (train.safe_load: no Lambda layers, no custom objects unless trusted),
flattens nested models into one graph (`flatten`: a layer inside a sub-model is a layer, so tfmot prunes,
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

from runtime.errors import EdgeKitError
from runtime.fsutil import sha256_file, staged_dir
from runtime.artifacts.manifest import MODEL_FILE, write_manifest

KIND = "imported"
MAX_NESTING = 16  # sub-models inside sub-models: a model file is untrusted


def output_layer(model):
    """The layer that makes a Keras model's (first) output, inside nested models too, and inside tfmot's wrappers
    (pruning, clustering, quantization): a wrapper whose last layer is a model ending in Softmax ends in Softmax."""
    layer = model
    for _ in range(MAX_NESTING * 2):  # nesting depth; a model file is untrusted
        inner = getattr(layer, "layers", None)
        if inner:
            outputs = getattr(layer, "outputs", None) or []
            history = getattr(outputs[0], "_keras_history", None) if outputs else None
            layer = history.layer if history is not None else inner[-1]
        elif hasattr(layer, "layer") and not hasattr(layer, "activation"):  # tfmot's wrappers hold the layer
            layer = layer.layer
        else:
            return layer
    return layer


def ends_in_softmax(model) -> bool:
    """Whether the layer that makes the output is a Softmax, an Activation('softmax') or has activation='softmax'."""
    last = output_layer(model)
    return getattr(getattr(last, "activation", None), "__name__", "") == "softmax" or type(last).__name__ == "Softmax"


def flatten(model):
    """`model` as one Functional graph whose layers are the layers of every nested model (the same layer objects,
    so the same weights); a model without sub-models is returned as it is. A layer whose name another layer of
    the graph has already is renamed `<its model>_<name>`."""
    from train.backend import keras

    if not any(isinstance(layer, keras.Model) for layer in model.layers):
        return model
    names: set[str] = set()
    inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    outputs = _inline(model, inputs, names, 0, keras)
    try:
        return keras.Model(inputs, outputs, name=model.name)
    except (ValueError, TypeError) as exc:
        raise EdgeKitError(f"{model.name}'s nested models do not flatten into one graph ({str(exc)[:200]}); save "
                           "it as one Functional model.") from None


class _Reused(list):
    """A tensor that every consumer may take (tf_keras's Node.map_arguments pops one per use)."""

    def pop(self, *args):
        return self[0]


def _inline(model, inputs: list, names: set, depth: int, keras):
    import tensorflow as tf

    if depth > MAX_NESTING:
        raise EdgeKitError(f"{model.name} nests models more than {MAX_NESTING} deep; expected a classifier.")
    if not getattr(model, "_is_graph_network", False):
        raise EdgeKitError(f"{model.name} is a subclassed model (its call() is Python code, not a graph); EdgeKit "
                           "optimizes Functional and Sequential models only.")
    tensors = {str(id(x)): _Reused([y]) for x, y in zip(model.inputs, inputs)}  # tf_keras keys by str(id)
    for level in sorted(model._nodes_by_depth, reverse=True):  # tf_keras's own order (Functional._run_internal_graph)
        for node in model._nodes_by_depth[level]:
            if node.is_input:
                continue
            args, kwargs = node.map_arguments(tensors)
            layer = node.layer
            if isinstance(layer, keras.Model):
                outputs = _inline(layer, tf.nest.flatten((args, kwargs)), names, depth + 1, keras)
            else:
                while layer.name in names:  # unique in the flat graph (the weights stay): <model>_<name>
                    layer._name = f"{model.name}_{layer.name}"
                names.add(layer.name)
                outputs = layer(*args, **kwargs)
            for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                tensors[x_id] = _Reused([y])
    found = [tensors[str(id(x))][0] for x in model.outputs]
    return found[0] if len(found) == 1 else found


def load_classifier(path: Path, dataset_name: str, data_dir, mean=None, std=None, trust: bool = False):
    """(the Keras model in `path`, loaded as data; the dataset at its input size, with --mean/--std as its
    preprocessing when given), or one line why not: not an image classifier, other classes."""
    from runtime.datasets import dataset_for_model
    from runtime.artifacts.preprocessing import Preprocessing
    from train.safe_load import load_model_file

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
    from runtime.metrics import check_above_chance
    from train.trainer import evaluate, save_model

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

