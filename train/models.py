"""Model registry: `create_model(name, input_shape, num_classes, **overrides)`.

Every model is a tf_keras Functional model with logits out (no softmax), no
subclassed and no Lambda layers, so tfmot can wrap it and both converters can read
it. Every layer is named by block and role (`block2_conv1`, `stage3_unit1_bn2`,
`block4_depthwise_bn`), so pruning and quantization can target layers by name and
Netron shows a readable graph. A variant is a registry entry with other defaults,
not a new function.

BatchNorm momentum defaults to 0.9 (Keras: 0.99): with ~40 steps an epoch on small
datasets, 0.99 leaves the moving statistics far from the data, and a model that
trains well would evaluate near chance.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from runtime.errors import EdgeKitError, unknown
from train.backbones import build


def _keras():
    from train.backend import keras  # lazy: listing and checking models needs no TensorFlow

    return keras


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable  # builder(input_shape, num_classes, **kwargs) -> keras.Model
    defaults: dict  # keyword arguments of this variant
    min_size: int  # smallest input height/width the architecture handles
    description: str
    backbone: bool = False  # a tf_keras.applications network with a new head (train.backbones)


_REGISTRY: dict[str, ModelSpec] = {}


_NOT_ARGUMENTS = {"input_shape", "num_classes", "weights", "download"}  # given at build time, not model args


def register_model(name: str, builder: Callable, *, min_size: int, description: str, backbone: bool = False,
                   **defaults) -> None:
    accepted = set(inspect.signature(builder).parameters) - _NOT_ARGUMENTS
    if set(defaults) - accepted:
        raise ValueError(f"{name}: {sorted(set(defaults) - accepted)} are not arguments of {builder.__name__}")
    _REGISTRY[name] = ModelSpec(name, builder, defaults, min_size, description, backbone)


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise unknown("model", name, _REGISTRY)
    return _REGISTRY[name]


def model_arguments(name: str, overrides: dict | None = None) -> dict:
    """The full keyword arguments a model is built with: builder defaults, variant, overrides."""
    spec = get_spec(name)
    params = inspect.signature(spec.builder).parameters
    args = {k: p.default for k, p in params.items() if k not in _NOT_ARGUMENTS}
    bad = set(overrides or {}) - set(args)
    if bad:
        raise EdgeKitError(
            f"model '{name}' does not take {sorted(bad)}; it accepts: {', '.join(sorted(args))}."
        )
    return {**args, **spec.defaults, **(overrides or {})}


def check_input_shape(name: str, input_shape) -> tuple[int, int, int]:
    spec = get_spec(name)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise EdgeKitError(f"input shape must be (height, width, channels) of positive ints; got {shape}.")
    if min(shape[:2]) < spec.min_size:
        raise EdgeKitError(
            f"model '{name}' needs inputs of at least {spec.min_size}x{spec.min_size}; got "
            f"{shape[0]}x{shape[1]}. Pass --image-size {spec.min_size} or larger."
        )
    return shape


def create_model(name: str, input_shape, num_classes: int, *, weights: str | None = None, download: bool = True,
                 **overrides):
    """Build a registered model; overrides replace its default arguments. `weights` (backbone models only):
    None, 'imagenet' or a weights file (train.backbones)."""
    spec = get_spec(name)
    shape = check_input_shape(name, input_shape)
    if num_classes < 2:
        raise EdgeKitError(f"a classifier needs at least 2 classes; got {num_classes}.")
    if spec.backbone:
        return spec.builder(shape, num_classes, weights=weights, download=download, **model_arguments(name, overrides))
    if weights is not None:
        raise EdgeKitError(f"--weights applies to the models on Keras applications backbones "
                           f"({', '.join(n for n, s in _REGISTRY.items() if s.backbone)}); '{name}' starts from "
                           "random weights.")
    return spec.builder(shape, num_classes, **model_arguments(name, overrides))


# --- building blocks -------------------------------------------------------------

def _conv_bn(x, filters, kernel, names, *, strides=1, momentum=0.9, activation="relu"):
    """conv (no bias) -> BN -> ReLU / ReLU6 / nothing; `names` = (conv, bn, activation) layer names."""
    keras = _keras()
    conv_name, bn_name, act_name = names
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                            name=conv_name)(x)
    x = keras.layers.BatchNormalization(momentum=momentum, name=bn_name)(x)
    if activation == "relu":
        x = keras.layers.ReLU(name=act_name)(x)
    elif activation == "relu6":
        x = keras.layers.ReLU(max_value=6.0, name=act_name)(x)
    return x


def _head(x, num_classes, dropout, pool=True):
    keras = _keras()
    if pool:
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_drop")(x)
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)  # fp32 even under mixed precision


def _check_positive(model, **values):
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and value > 0):
            raise EdgeKitError(f"model '{model}': {key} must be a positive number; got {value!r}.")


# --- fashion_cnn ----------------------------------------------------------------

def fashion_cnn(input_shape, num_classes, filters=(32, 64), dense=128, dropout=0.25,
                head_dropout=0.4, bn_momentum=0.9):
    """The classic Fashion-MNIST CNN: per block two conv-BN-ReLU, 2x2 max pool, dropout.

    28x28x1 -> block1 28x28x32 -> pool 14x14 -> block2 14x14x64 -> pool 7x7 -> dense 128 -> logits
    """
    keras = _keras()
    _check_positive("fashion_cnn", dense=dense, **{f"filters[{i}]": f for i, f in enumerate(filters)})
    inputs = keras.Input(input_shape, name="input")
    x = inputs
    for b, width in enumerate(filters, start=1):
        for c in (1, 2):
            x = _conv_bn(x, width, 3, (f"block{b}_conv{c}", f"block{b}_bn{c}", f"block{b}_relu{c}"),
                         momentum=bn_momentum)
        x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
        x = keras.layers.Dropout(dropout, name=f"block{b}_drop")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    x = keras.layers.Dense(dense, activation="relu", name="head_dense")(x)
    outputs = _head(x, num_classes, head_dropout, pool=False)
    return keras.Model(inputs, outputs, name="fashion_cnn")


# --- resnet ---------------------------------------------------------------------

def resnet(input_shape, num_classes, depth=8, widths=(16, 32, 64), bn_momentum=0.9):
    """A CIFAR-style ResNet (He et al. 2016): depth = 6n + 2, n residual units per stage.

    Unit: 3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut (1x1 conv-BN projection when the
    stride or width changes), ReLU. Stages 2 and 3 halve the resolution: 28 -> 14 -> 7.
    """
    keras = _keras()
    if not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0):
        raise EdgeKitError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...); got {depth!r}.")
    units = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="input")
    x = _conv_bn(inputs, widths[0], 3, ("stem_conv", "stem_bn", "stem_relu"), momentum=bn_momentum)
    channels = widths[0]
    for s, width in enumerate(widths, start=1):
        for u in range(1, units + 1):
            p = f"stage{s}_unit{u}"
            stride = 2 if (s > 1 and u == 1) else 1
            y = _conv_bn(x, width, 3, (f"{p}_conv1", f"{p}_bn1", f"{p}_relu1"), strides=stride, momentum=bn_momentum)
            y = _conv_bn(y, width, 3, (f"{p}_conv2", f"{p}_bn2", None), momentum=bn_momentum, activation=None)
            shortcut = x
            if stride != 1 or channels != width:
                shortcut = _conv_bn(x, width, 1, (f"{p}_shortcut_conv", f"{p}_shortcut_bn", None),
                                    strides=stride, momentum=bn_momentum, activation=None)
            x = keras.layers.Add(name=f"{p}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{p}_relu2")(x)
            channels = width
    outputs = _head(x, num_classes, dropout=0.0)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


# --- mobilenet ------------------------------------------------------------------

# MobileNetV2 stages for small inputs: (expansion t, channels c, repeats n, first stride s).
# Two stride-2 stages only: 28 -> 14 -> 7 (32 -> 16 -> 8), never down to 1x1.
MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1), (6, 96, 1, 1))


def _make_divisible(value, divisor=8):
    """Round channels to a multiple of 8 without losing more than 10% (as in MobileNetV2)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def mobilenet(input_shape, num_classes, width=1.0, stages=MOBILENET_STAGES, head_channels=256,
              dropout=0.2, bn_momentum=0.9):
    """MobileNetV2-style (Sandler et al. 2018) inverted residuals, ReLU6, width multiplier.

    Block: 1x1 expand-BN-ReLU6 (skipped when t = 1), 3x3 depthwise-BN-ReLU6, 1x1
    project-BN (linear bottleneck), + input when the stride is 1 and widths match.
    """
    keras = _keras()
    _check_positive("mobilenet", width=width, head_channels=head_channels)
    inputs = keras.Input(input_shape, name="input")
    channels = _make_divisible(32 * width)
    x = _conv_bn(inputs, channels, 3, ("stem_conv", "stem_bn", "stem_relu"), momentum=bn_momentum,
                 activation="relu6")
    block = 0
    for t, c, n, s in stages:
        out_channels = _make_divisible(c * width)
        for i in range(n):
            block += 1
            p, stride, inp = f"block{block}", (s if i == 0 else 1), x
            y = x
            if t != 1:
                y = _conv_bn(y, channels * t, 1, (f"{p}_expand", f"{p}_expand_bn", f"{p}_expand_relu"),
                             momentum=bn_momentum, activation="relu6")
            y = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                             name=f"{p}_depthwise")(y)
            y = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{p}_depthwise_bn")(y)
            y = keras.layers.ReLU(max_value=6.0, name=f"{p}_depthwise_relu")(y)
            y = _conv_bn(y, out_channels, 1, (f"{p}_project", f"{p}_project_bn", None),
                         momentum=bn_momentum, activation=None)
            if stride == 1 and channels == out_channels:
                y = keras.layers.Add(name=f"{p}_add")([inp, y])
            x, channels = y, out_channels
    x = _conv_bn(x, _make_divisible(head_channels * max(1.0, width)), 1,
                 ("head_conv", "head_bn", "head_relu"), momentum=bn_momentum, activation="relu6")
    outputs = _head(x, num_classes, dropout)
    return keras.Model(inputs, outputs, name="mobilenet")


# --- micro_cnn ------------------------------------------------------------------

def micro_cnn(input_shape, num_classes, filters=(8, 16, 32), bn_momentum=0.9):
    """A CNN for microcontrollers: each stage one 3x3 conv-BN-ReLU with stride 2, then global average pooling.

    28x28x1 -> 14x14x8 -> 7x7x16 -> 4x4x32 -> logits: every activation stays small, so TFLM's tensor arena does
    (the largest two live tensors at once, with its bookkeeping); about 6k parameters.
    """
    keras = _keras()
    _check_positive("micro_cnn", **{f"filters[{i}]": f for i, f in enumerate(filters)})
    inputs = keras.Input(input_shape, name="input")
    x = inputs
    for s, width in enumerate(filters, start=1):
        x = _conv_bn(x, width, 3, (f"block{s}_conv", f"block{s}_bn", f"block{s}_relu"), strides=2,
                     momentum=bn_momentum)
    outputs = _head(x, num_classes, dropout=0.0)
    return keras.Model(inputs, outputs, name="micro_cnn")


register_model("fashion_cnn", fashion_cnn, min_size=8,
               description="classic Fashion-MNIST CNN: 2 blocks of conv-BN-ReLU x2, max pool, dropout; dense head")
register_model("resnet", resnet, min_size=8, depth=8,
               description="small ResNet (ResNet-8, the shape of MLPerf Tiny's image classifier: stacks of 16/32/64 "
                           "filters, about 78k parameters at 32x32x3): residual units of 3x3 conv-BN, projection "
                           "shortcuts")
register_model("micro_cnn", micro_cnn, min_size=8,
               description="a CNN for microcontrollers: three stride-2 conv-BN-ReLU (8/16/32 filters), global "
                           "average pool; about 6k parameters, a TFLM arena under 32 KB at 28x28")
register_model("resnet20", resnet, min_size=8, depth=20,
               description="ResNet-20: the resnet with 3 units per stage")
register_model("mobilenet", mobilenet, min_size=16, width=1.0,
               description="MobileNetV2-style inverted residuals with ReLU6 and a width multiplier")


# --- Keras applications backbones with a new head (train.backbones) ----------------------------------

def mobilenet_v2(input_shape, num_classes, alpha=1.0, head_dropout=0.2, bn_momentum=0.9, weights=None, download=True):
    """Keras's MobileNetV2 (`alpha`: width multiplier; ImageNet weights exist for 0.35 to 1.4)."""

    return build("mobilenet_v2", input_shape, num_classes, head_dropout=head_dropout, bn_momentum=bn_momentum, weights=weights,
                 download=download, alpha=alpha)


def mobilenet_v3_small(input_shape, num_classes, alpha=1.0, minimalistic=False, head_dropout=0.2, bn_momentum=0.9, weights=None,
                       download=True):
    """Keras's MobileNetV3Small (hard-swish, squeeze-excite; ImageNet weights for alpha 0.75 and 1.0)."""

    return build("mobilenet_v3_small", input_shape, num_classes, head_dropout=head_dropout, bn_momentum=bn_momentum,
                 weights=weights,
                 download=download, alpha=alpha, minimalistic=minimalistic)


def efficientnet_b0(input_shape, num_classes, head_dropout=0.2, bn_momentum=0.9, weights=None, download=True):
    """Keras's EfficientNetB0 (MBConv blocks with squeeze-excite and swish)."""

    return build("efficientnet_b0", input_shape, num_classes, head_dropout=head_dropout, bn_momentum=bn_momentum, weights=weights,
                 download=download)


def resnet50(input_shape, num_classes, head_dropout=0.2, bn_momentum=0.9, weights=None, download=True):
    """Keras's ResNet50 (bottleneck residual blocks, 23.6 M parameters without the top)."""

    return build("resnet50", input_shape, num_classes, head_dropout=head_dropout, bn_momentum=bn_momentum, weights=weights,
                 download=download)


register_model("mobilenet_v2", mobilenet_v2, min_size=32, backbone=True,
               description="Keras applications MobileNetV2 backbone + new head (--weights, --fine-tune-from)")
register_model("mobilenet_v3_small", mobilenet_v3_small, min_size=32, backbone=True,
               description="Keras applications MobileNetV3Small backbone + new head")
register_model("efficientnet_b0", efficientnet_b0, min_size=32, backbone=True,
               description="Keras applications EfficientNetB0 backbone + new head")
register_model("resnet50", resnet50, min_size=32, backbone=True,
               description="Keras applications ResNet50 backbone + new head")


def model_list() -> str:
    """The registered models, one per line with its description: what every --help lists."""
    return "\n".join(f"  {name:<18} {spec.description}" for name, spec in _REGISTRY.items())
