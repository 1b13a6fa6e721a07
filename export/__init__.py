"""EdgeKit export: TFLite and ONNX in every quantization mode, each file verified.

    from export import export, FORMATS
    export("artifacts/cnn", ["float32", "int8", "onnx-float32", "onnx-int8"])
"""

from export.api import Result, export
from export.formats import FORMATS, Format, get_format

__all__ = ["FORMATS", "Format", "Result", "export", "get_format"]
