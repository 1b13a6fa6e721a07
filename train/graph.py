"""A Keras model's graph, read as data: the layer that makes its output and whether it is a softmax (inside nested
models and tfmot's wrappers), and nested models flattened into one graph of the same layers and weights.
"""

from __future__ import annotations

from runtime.errors import EdgeKitError

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
