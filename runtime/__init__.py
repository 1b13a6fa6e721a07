"""EdgeKit runtime: the TensorFlow-free layer that ships to the device.

    import runtime
    model = runtime.load("model.int8.tflite")      # .tflite (ai-edge-litert) or .onnx (onnxruntime)
    probabilities = model.predict(pixels)

It loads .tflite and .onnx files to predict, evaluate and benchmark, reads datasets
and applies preprocessing with numpy and Pillow, and reads and verifies artifact
manifests. It never imports TensorFlow.
"""

from runtime.artifacts.manifest import read_manifest, verify_files
from runtime.artifacts.preprocessing import Preprocessing
from runtime.datasets import Dataset, load_dataset
from runtime.errors import EdgeKitError
from runtime.load import Model, load

__version__ = "0.1.0"
__all__ = ["Dataset", "EdgeKitError", "Model", "Preprocessing", "load", "load_dataset", "read_manifest",
           "verify_files"]
