"""tests/fixtures/sparse/: a tiny image classifier (8x8x1 -> flatten -> dense 64 with 80% of its weights zero ->
dense 10) converted by the TFLite converter twice, dense and with its sparse encoding (Optimize.EXPERIMENTAL_SPARSITY),
as float32 and int8: what tests/test_sparse.py densifies and breaks on purpose without TensorFlow.

    python scripts/make_sparse_fixtures.py        # rewrites tests/fixtures/sparse/*.tflite
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.backend import keras, tf  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sparse"


def main() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    kernel, bias = model.layers[1].get_weights()
    rng = np.random.default_rng(0)
    kernel[rng.random(kernel.shape) < 0.8] = 0  # 80% zeros, as pruned80
    model.layers[1].set_weights([kernel, bias])
    calibration = rng.random((32, 8, 8, 1), np.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    for key in ("float32", "int8"):
        for sparse in (False, True):
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            optimizations = [tf.lite.Optimize.DEFAULT] if key == "int8" else []
            converter.optimizations = optimizations + ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
            if key == "int8":
                converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(32))
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            path = OUT / f"{key}.{'sparse' if sparse else 'dense'}.tflite"
            path.write_bytes(converter.convert())
            print(path.name, path.stat().st_size)


if __name__ == "__main__":
    main()
