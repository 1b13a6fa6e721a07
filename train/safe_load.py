"""Loading a Keras model file as data, never as a program, unless the user trusts it.

A `.keras` or `.h5` file describes its model in a JSON config, and Keras rebuilds the model from
it. Most layers are plain data, but some are code: a `Lambda` layer carries marshalled Python
bytecode that runs while the model is rebuilt, `TFOpLambda` calls any TensorFlow function by
name (`tf.io.write_file` included), and a custom class needs code the user supplies. A
SavedModel directory is a TensorFlow graph, a program in its own right.

So before anything is deserialized, `load_model_file` reads the config (from the HDF5 attributes
with h5py, or from `config.json` in the `.keras` zip) and walks it: every object must be a class
tf_keras ships as data (its layers, initializers, regularizers, constraints, the Functional and
Sequential models). A `.keras` file is then loaded with Keras's own safe mode as well. Anything
else is refused with UntrustedModel (exit 2) unless `trust=True` (`--trust-model`, the meaning of
Hugging Face's `trust_remote_code`).
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

from runtime.errors import ArtifactError, EdgeKitError, UntrustedModel, first_line
from runtime.fsutil import check_readable_file
from runtime.limits import json_loads

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
CODE_LAYERS = {"Lambda": "a Lambda layer (Python bytecode that runs when the model is loaded)",
               "__lambda__": "a serialized Python lambda"}
# TFOpLambda layers (what `tf.nn.relu(x)` on a Keras tensor becomes, as in MobileNetV3) call the TensorFlow
# function their config names. Pure tensor arithmetic is data; anything else (tf.io.write_file, tf.py_function,
# tf.raw_ops ...) is a program.
OP_LAYERS = ("TFOpLambda", "SlicingOpLambda")
SAFE_OPS = ("__operators__.", "math.", "nn.", "image.resize", "linalg.", "compat.v1.transpose", "reshape", "transpose",
            "concat", "stack", "unstack", "split", "squeeze", "expand_dims", "cast", "clip_by_value", "identity",
            "tile", "pad", "slice", "strided_slice", "reduce_", "where", "maximum", "minimum", "matmul", "ones_like",
            "zeros_like", "shape", "rank", "size", "gather", "one_hot", "argmax", "argmin", "broadcast_to")
_MARKERS = {"__tuple__", "__numpy__", "__tensor__", "__bytes__", "__typespec__", "function"}
HINT = "Pass --trust-model to load it anyway, only if you trust where the file came from."


@lru_cache(maxsize=1)
def allowed_classes() -> frozenset[str]:
    """Class names tf_keras deserializes as plain data."""
    from train.backend import keras

    names = {"Functional", "Sequential", "Model", "InputLayer", "Policy", "DTypePolicy", "LossScaleOptimizer"}
    for module in (keras.layers, keras.initializers, keras.regularizers, keras.constraints, keras.optimizers,
                   keras.losses, keras.metrics, keras.optimizers.schedules):
        names |= {name for name in dir(module) if isinstance(getattr(module, name, None), type)}
    return frozenset(names - set(CODE_LAYERS)) | _MARKERS


def read_config(path: Path) -> dict:
    """The model config a .keras or .h5 file carries, read as JSON without deserializing anything."""
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json_loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            if raw is None:
                raise EdgeKitError(f"{path} holds weights only (no model_config); expected a whole model saved "
                                   "with model.save().")
            return json_loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except EdgeKitError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read {path} as a Keras model file ({first_line(exc)}); expected a .keras or "
                            ".h5 file written by model.save().") from exc


def code_in_config(config) -> list[str]:
    """What in a model config would run code when deserialized: ['layer "f": a Lambda layer ...', ...]."""
    allowed, found = allowed_classes(), []

    def walk(node, where: str):
        if isinstance(node, dict):
            name = node.get("class_name")
            label = (node.get("config") or {}).get("name") if isinstance(node.get("config"), dict) else None
            here = f"layer '{label}'" if label else where
            if isinstance(name, str):
                module = node.get("module")
                if name in CODE_LAYERS:
                    found.append(f"{here}: {CODE_LAYERS[name]}")
                elif name in OP_LAYERS:
                    function = (node.get("config") or {}).get("function")
                    if not (isinstance(function, str) and function.startswith(SAFE_OPS)):
                        found.append(f"{here}: a {name} layer calling tf.{function}, which is not tensor arithmetic")
                elif name not in allowed:
                    found.append(f"{here}: unknown class '{name}' (a custom object: code the file cannot carry)")
                elif isinstance(module, str) and not module.startswith(("keras", "tf_keras", "builtins")):
                    found.append(f"{here}: class '{name}' from module '{module}'")
                registered = node.get("registered_name")
                if isinstance(registered, str) and ">" in registered:  # package>Name: a registered custom object
                    found.append(f"{here}: registered custom object '{registered}'")
            for key, value in node.items():
                walk(value, here)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(config, "the model")
    return found


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file())


def load_model_file(path: str | Path, trust: bool = False):
    """Load a tf_keras model from a .keras/.h5 file (checked first) or, with `trust`, a SavedModel."""
    from train.backend import keras

    path = Path(path)
    if is_saved_model(path):
        if not trust:
            raise UntrustedModel(f"{path} is a TensorFlow SavedModel: a program (its graph runs when the model is "
                                 f"used), not a data file. {HINT}")
    else:
        check_readable_file(path, "model file")
        if path.suffix not in KERAS_SUFFIXES:
            raise EdgeKitError(f"{path}: expected a .keras or .h5 model file, or a SavedModel directory; got "
                               f"'{path.suffix or 'no suffix'}'.")
        if not trust:
            found = code_in_config(read_config(path))
            if found:
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                raise UntrustedModel(f"{path} would run code when loaded: {found[0]}{more}. {HINT}")
    try:
        if path.suffix == ".keras":
            return keras.models.load_model(path, compile=False, safe_mode=not trust)
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for unreadable or foreign files
        raise ArtifactError(f"cannot load {path} as a tf_keras model: {first_line(exc)}") from exc
