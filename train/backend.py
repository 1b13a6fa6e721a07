"""The one place EdgeKit imports TensorFlow, with Keras 2 (tf_keras) selected.

TensorFlow >= 2.16 ships Keras 3, but tensorflow-model-optimization, the TFLite
converter's `from_keras_model` and tf2onnx's `from_keras` work reliably only with
Keras 2. `TF_USE_LEGACY_KERAS=1` must be set before TensorFlow is first imported,
so every module that needs TensorFlow imports it from here:

    from train.backend import tf, keras
"""

import os
import sys
import warnings

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep C++ INFO/WARNING noise off the console

if "tensorflow" in sys.modules:  # imported before us: tf.keras may already be bound to Keras 3
    warnings.warn("tensorflow was imported before train.backend; tf.keras may be Keras 3. "
                  "Import train.backend first.", stacklevel=2)

from runtime.fsutil import held_output  # noqa: E402

with held_output():  # TensorFlow's C++ start-up lines (oneDNN, CUDA) come before its log level applies
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras"]
