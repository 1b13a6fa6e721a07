"""Registered models on tf_keras.applications backbones, for transfer learning.

    python -m train --model mobilenet_v2 --model-arg alpha=0.35 --weights imagenet --freeze-backbone \\
        --fine-tune-from block_13_expand --dataset folder:~/photos

Each is the Keras applications network without its top (its layer names kept, so `--fine-tune-from`,
pruning and quantization name them as Keras does) and a new head: global average pooling, dropout and a
`logits` layer with the dataset's classes. The backbone's own preprocessing travels as data in the
manifest (`preprocessing`), so export, eval and the runtime repeat it:

    mobilenet_v2        pixels / 127.5 - 1
    mobilenet_v3_small  pixels as they are (the network rescales them itself)
    efficientnet_b0     pixels as they are (the network rescales and normalizes them itself)
    resnet50            pixels - ImageNet mean per channel (Keras's "caffe" mode; the first convolution's
                        input channels are reordered from Keras's BGR to RGB when ImageNet weights load)

Weights (`--weights`): `none` (random), `imagenet` (Keras's own download into ~/.keras/models; offline, the
file must be there already) or a path to weights saved from the same backbone (`model.save_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np

from runtime.datasets import downloads_allowed
from runtime.errors import EdgeKitError, first_line
from runtime.fsutil import check_readable_file


@dataclasses.dataclass(frozen=True)
class Backbone:
    application: str  # the tf_keras.applications constructor
    scale: float  # preprocessing, as runtime.artifacts.preprocessing.Preprocessing: pixels * scale - mean
    mean: tuple[float, ...]
    fine_tune_from: str  # a good default layer to unfreeze from (the top blocks), shown in errors
    first_conv: str  # the first convolution (whose kernel takes the pixels)


BACKBONES = {
    "mobilenet_v2": Backbone("MobileNetV2", 1 / 127.5, (1.0,), "block_13_expand", "Conv1"),
    "mobilenet_v3_small": Backbone("MobileNetV3Small", 1.0, (0.0,), "expanded_conv_9/expand", "Conv"),
    "efficientnet_b0": Backbone("EfficientNetB0", 1.0, (0.0,), "block6a_expand_conv", "stem_conv"),
    "resnet50": Backbone("ResNet50", 1.0, (123.68, 116.779, 103.939), "conv5_block1_1_conv", "conv1_conv"),
}
HEAD = ("head_pool", "head_drop", "logits")


def preprocessing(name: str, dataset_preprocessing):
    """The dataset's preprocessing (size, resize filter, background) with the backbone's arithmetic."""
    spec = BACKBONES[name]
    return dataclasses.replace(dataset_preprocessing, scale=spec.scale, mean=spec.mean, std=(1.0,))


@contextlib.contextmanager
def keras_download(allowed: bool):
    """Keras's own download and cache of application weights, with one clear line instead of a failed
    fetch: offline (or when `allowed` is false) a file not in the cache is refused at once, naming it."""
    from tf_keras.src.utils import data_utils

    original = data_utils.get_file

    def get_file(fname=None, origin=None, *args, cache_subdir="datasets", cache_dir=None, **kwargs):
        where = Path(os.path.expanduser(cache_dir or os.path.join("~", ".keras"))) / cache_subdir
        if not (where / str(fname)).is_file():
            if not downloads_allowed(allowed):
                raise EdgeKitError(f"--weights imagenet needs Keras's file {fname} in {where}, and downloads are off "
                                   f"(offline); copy it there from a machine that has it ({origin}), or pass "
                                   "--weights PATH.")
            try:
                return original(fname, origin, *args, cache_subdir=cache_subdir, cache_dir=cache_dir, **kwargs)
            except Exception as exc:  # Keras raises a bare Exception on a failed fetch
                raise EdgeKitError(f"--weights imagenet could not download {fname} from {origin} "
                                   f"({first_line(exc)}); copy it into {where} from a machine that has it, or pass "
                                   "--weights PATH.") from exc
        return original(fname, origin, *args, cache_subdir=cache_subdir, cache_dir=cache_dir, **kwargs)

    data_utils.get_file = get_file
    try:
        yield
    finally:
        data_utils.get_file = original


def build(name: str, input_shape, num_classes: int, *, head_dropout: float = 0.2, bn_momentum: float = 0.9,
          weights: str | None = None, download: bool = True, **application_args):
    """The backbone (Keras's layers and names) and a new head; weights None, 'imagenet' or a path.

    BatchNorm momentum is set to `bn_momentum` (Keras applications use 0.99 to 0.999): with tens of steps an
    epoch on a small dataset, the moving statistics otherwise stay near their initial values and a model
    trained from scratch evaluates at chance (MobileNetV2 on digits: 10.03%)."""
    from train.backend import keras

    spec = BACKBONES[name]
    if input_shape[-1] != 3:
        raise EdgeKitError(f"model '{name}' takes RGB input (3 channels); got {input_shape[-1]}. Pass --channels 3 "
                           "(grayscale is repeated to 3 channels).")
    app = getattr(keras.applications, spec.application)
    inputs = keras.Input(input_shape, name="input")
    imagenet_here = weights == "imagenet" and name != "resnet50"  # resnet50: copied below with channels reordered
    try:
        with keras_download(download):
            base = app(include_top=False, weights="imagenet" if imagenet_here else None, input_tensor=inputs,
                       **application_args)
    except ValueError as exc:  # Keras's own refusals: an alpha without ImageNet weights, too small an input
        raise EdgeKitError(f"model '{name}': Keras applications refuses these settings ({first_line(exc)}).") from None
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    x = keras.layers.GlobalAveragePooling2D(name=HEAD[0])(base.output)
    if head_dropout:
        x = keras.layers.Dropout(head_dropout, name=HEAD[1])(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name=HEAD[2])(x)
    model = keras.Model(inputs, outputs, name=name)
    if weights == "imagenet" and name == "resnet50":
        with keras_download(download):
            reference = app(include_top=False, weights="imagenet", input_shape=tuple(input_shape), **application_args)
        _copy_by_name(reference, model, flip_first=spec.first_conv)
    elif weights not in (None, "imagenet"):
        load_weights(model, name, weights)
    return model


def _copy_by_name(source, target, flip_first: str | None = None) -> None:
    layers = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        values = layer.get_weights()
        if values and layer.name in layers:
            if layer.name == flip_first:  # Keras's ResNet50 takes BGR; EdgeKit's pixels are RGB
                values = [values[0][:, :, ::-1, :], *values[1:]]
            layers[layer.name].set_weights(values)


def load_weights(model, name: str, path: str) -> None:
    """Weights saved from the same backbone (HDF5, `model.save_weights`), matched by layer name; every backbone
    layer with weights must be in the file (a file of another network is refused, not half-loaded)."""
    import h5py

    size = check_readable_file(path, "weights file").st_size
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            stored = {n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("layer_names", [])}
            _check_datasets(f, path, size)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise EdgeKitError(f"--weights {path} is not a Keras HDF5 weights file ({first_line(exc)}); expected one "
                           "saved with model.save_weights('....h5').") from None
    needed = [layer.name for layer in model.layers if layer.weights and layer.name not in HEAD]
    missing = [n for n in needed if n not in stored]
    if missing:
        raise EdgeKitError(f"--weights {path} has no weights for {len(missing)} of the {name} backbone's {len(needed)} "
                           f"layers (first: {missing[0]}); expected weights saved from a {name} model of the same "
                           "settings.")
    try:
        model.load_weights(path, by_name=True)
    except (ValueError, OSError) as exc:
        raise EdgeKitError(f"--weights {path} does not fit the {name} model ({first_line(exc)}); expected weights "
                           "saved from the same backbone and settings (alpha, input channels).") from None


MAX_H5_OBJECTS = 100_000


def _check_datasets(f, path, size: int) -> None:
    """Every dataset of a weights file read against its declared shape before Keras allocates anything: the
    declared bytes, all datasets together, must fit in the file (Keras writes them uncompressed; a 2 MB file
    declaring 2^31 elements once took 5.6 GB), and every weight must be a finite number."""
    import h5py

    datasets, count = [], 0

    def visit(name, obj):
        nonlocal count
        count += 1
        if count > MAX_H5_OBJECTS:
            raise ValueError(f"more than {MAX_H5_OBJECTS:,} objects")
        if isinstance(obj, h5py.Dataset):
            datasets.append(obj)

    f.visititems(visit)
    declared = 0
    for ds in datasets:
        if ds.dtype.kind not in "fiub":
            raise EdgeKitError(f"--weights {path}: dataset {ds.name} holds {ds.dtype}; expected numeric weights saved "
                               "with model.save_weights('....h5').")
        declared += int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize
        if declared > size:
            raise EdgeKitError(f"--weights {path} declares at least {declared:,} bytes of weights (dataset {ds.name}, "
                               f"shape {list(ds.shape)}) but the file holds {size:,}; it is damaged or crafted. "
                               "Expected weights saved with model.save_weights('....h5').")
    for ds in datasets:
        if ds.dtype.kind == "f" and not np.isfinite(ds[()]).all():
            raise EdgeKitError(f"--weights {path}: dataset {ds.name} holds NaN or infinite weights; expected trained "
                               "weights (a model made from them gives no numbers).")


def freeze(model, name: str, fine_tune_from: str | None = None) -> int:
    """Freeze the backbone; with `fine_tune_from`, unfreeze it from that layer on, BatchNormalization kept
    frozen (in inference mode), as Keras's transfer-learning guide does. Returns the trainable backbone layers."""
    from train.backend import keras

    layers = _backbone_layers(model)
    start = len(layers) if fine_tune_from is None else check_layer(model, name, fine_tune_from)
    count = 0
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
        count += int(layer.trainable and bool(layer.weights))
    return count


def _backbone_layers(model) -> list:
    return [layer for layer in model.layers if layer.name not in HEAD and layer.name != "input"]


def check_layer(model, name: str, layer: str) -> int:
    """The backbone position of `layer` (--fine-tune-from), or one clear line: checked before any training."""
    names = [each.name for each in _backbone_layers(model)]
    if layer not in names:
        raise EdgeKitError(f"--fine-tune-from {layer!r} is not a layer of {name}; expected one of its layer names, "
                           f"e.g. {BACKBONES[name].fine_tune_from!r} (the top blocks).")
    return names.index(layer)


def unfreeze(model) -> None:
    """Everything trainable again: what is saved (optimize fine-tunes the whole model)."""
    for layer in model.layers:
        layer.trainable = True
