"""EdgeKit runtime: the TensorFlow-free layer that ships to the device.

It reads datasets and applies preprocessing with numpy and Pillow, reads and
verifies artifact manifests, and (as the next stages land) loads .tflite and .onnx
files to predict, evaluate and benchmark. It never imports TensorFlow.
"""

from runtime.datasets import Dataset, load_dataset
from runtime.errors import EdgeKitError
from runtime.manifest import read_manifest, verify_files
from runtime.preprocessing import Preprocessing

__version__ = "0.1.0"
__all__ = ["Dataset", "EdgeKitError", "Preprocessing", "load_dataset", "read_manifest", "verify_files"]
