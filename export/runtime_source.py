"""A model file from elsewhere (an .onnx or a .tflite file) run by EdgeKit's runtime, standing where export
otherwise holds a Keras model: what export asks of a source (its layout, what its outputs are, its outputs on
preprocessed images) answered by runtime.load's Model. export/onnx_source.py and export/tflite_source.py add
what each kind needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class RuntimeSource:
    path: Path
    runtime: object  # runtime.load's Model of the file

    @property
    def layout(self) -> str:
        return self.runtime.layout

    @property
    def output_kind(self) -> str:
        return self.runtime.output_kind

    def predict(self, x: np.ndarray, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        """Outputs on preprocessed NHWC images, as keras.Model.predict gives them (export.convert.keras_logits)."""
        del verbose
        return self.runtime.logits(x, batch_size=batch_size)
