"""Every registered model builds, trains a step and keeps its layer names."""

import re

import numpy as np
import pytest

from runtime.errors import EdgeKitError
from train.models import create_model, get_spec, list_models

# block/stage/stem/head + role, or the two fixed names: no Keras auto-names like "conv2d_3".
LAYER_NAME = re.compile(r"^(input|logits|(stem|head|block\d+|stage\d+_unit\d+)_[a-z0-9_]+)$")


@pytest.fixture(scope="module")
def keras():
    from train.backend import keras

    return keras


@pytest.mark.parametrize("name", [n for n in list_models() if not get_spec(n).backbone])  # test_backbones.py
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_model_builds_with_stable_role_names(keras, name, shape):
    model = create_model(name, shape, 10)
    assert model.input_shape == (None, *shape) and model.output_shape == (None, 10)
    names = [layer.name for layer in model.layers]
    bad = [n for n in names if not LAYER_NAME.match(n)]
    assert not bad, f"layers without a block/role name: {bad}"
    assert len(set(names)) == len(names)
    assert [layer.name for layer in create_model(name, shape, 10).layers] == names  # no global counters
    kinds = {type(layer).__name__ for layer in model.layers}
    assert not kinds & {"Lambda", "TFOpLambda"}, "Lambda layers break tfmot and the converters"
    assert model.layers[-1].name == "logits" and model.layers[-1].activation.__name__ == "linear"


@pytest.mark.parametrize("name", [n for n in list_models() if not get_spec(n).backbone])
def test_model_trains_a_step_that_updates_every_weight(keras, digits, name):
    keras.utils.set_random_seed(0)
    model = create_model(name, digits.input_shape, digits.num_classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = digits.arrays("train")
    before = [w.numpy().copy() for w in model.trainable_weights]
    assert np.isfinite(model.train_on_batch(x[:32], y[:32]))
    frozen = [w.name for w, old in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), old)]
    assert not frozen, f"weights no gradient reached: {frozen}"


def test_resnet_depth_sets_units_per_stage(keras):
    model = create_model("resnet", (28, 28, 1), 10, depth=20)
    assert {layer.name for layer in model.layers} >= {"stage3_unit3_add", "stage1_unit1_conv1"}
    assert get_spec("resnet20").defaults["depth"] == 20


def test_mobilenet_keeps_a_28x28_input_above_1x1(keras):
    model = create_model("mobilenet", (28, 28, 1), 10)
    assert model.get_layer("head_conv").output_shape[1:3] == (7, 7)
    narrow = create_model("mobilenet", (28, 28, 1), 10, width=0.5)
    assert narrow.count_params() < 0.5 * model.count_params()


@pytest.mark.parametrize("call, message", [
    (lambda: create_model("resnt", (28, 28, 1), 10), "unknown model 'resnt'.*Did you mean 'resnet'"),
    (lambda: create_model("resnet", (28, 28, 1), 10, dept=20), r"does not take \['dept'\].*accepts: .*depth"),
    (lambda: create_model("resnet", (28, 28, 1), 10, depth=9), "6n\\+2"),
    (lambda: create_model("mobilenet", (8, 8, 1), 10), "at least 16x16; got 8x8"),
    (lambda: create_model("fashion_cnn", (28, 28), 10), "height, width, channels"),
    (lambda: create_model("fashion_cnn", (28, 28, 1), 1), "at least 2 classes"),
    (lambda: create_model("mobilenet", (28, 28, 1), 10, width=0), "width must be a positive"),
])
def test_model_errors_say_what_was_expected(call, message):
    with pytest.raises(EdgeKitError, match=message):
        call()
