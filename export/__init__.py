"""EdgeKit export: TFLite and ONNX in every quantization mode, each file verified.

    from export import export, EXPORT_ALL
    export("artifacts/cnn", ["float32", "int8", "onnx-float32", "onnx-int8"])
"""

from export.api import Result, export
from runtime.vocabulary import EXPORT_ALL, FileFormat, get_format

__all__ = ["EXPORT_ALL", "FileFormat", "Result", "export", "get_format"]
