"""Preprocessing as data: the exact transform from image pixels to model input.

Training, evaluation and on-device prediction all go through `Preprocessing`, and
its dict form travels in every manifest and sidecar, so the runtime repeats the
transform that training used without importing TensorFlow.

    pixels (uint8, N x H x W x C)  ->  float32 (pixels * scale - mean) / std
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtime.errors import EdgeKitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]  # (height, width) the model takes
    channels: int  # 1 (grayscale) or 3 (RGB)
    scale: float = 1.0 / 255.0  # multiplies raw uint8 pixels
    mean: tuple[float, ...] = (0.0,)  # per channel, after scaling (one value broadcasts)
    std: tuple[float, ...] = (1.0,)  # per channel, after scaling
    resize: str = "bilinear"  # Pillow filter used when an image has another size

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.size) != 2 or min(self.size) < 1:
            raise EdgeKitError(f"preprocessing size must be (height, width) > 0; got {self.size}.")
        if self.channels not in (1, 3):
            raise EdgeKitError(f"preprocessing channels must be 1 or 3; got {self.channels}.")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if len(values) not in (1, self.channels):
                raise EdgeKitError(
                    f"preprocessing {field} needs 1 or {self.channels} values; got {len(values)}."
                )
        if any(v <= 0 for v in self.std):
            raise EdgeKitError(f"preprocessing std must be > 0; got {self.std}.")
        if self.resize not in _FILTERS:
            raise EdgeKitError(f"preprocessing resize must be one of {sorted(_FILTERS)}; got {self.resize!r}.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.size, self.channels)

    def to_dict(self) -> dict:
        return {
            "size": list(self.size), "channels": self.channels, "scale": self.scale,
            "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
            "layout": "NHWC", "input_range": "uint8 pixels 0..255",
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError as exc:
            raise EdgeKitError(f"preprocessing record is incomplete ({exc}); got {data}.") from None

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, C) -> float32 model input of the same shape."""
        x = pixels.astype(np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (x - mean) / std

    def load_image(self, path: str | Path) -> np.ndarray:
        """Read a PNG/JPEG file as uint8 (H, W, C) pixels at this size and channel count."""
        return image_to_pixels(path, self.size, self.channels, self.resize)


def _filters():
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")


def open_image(path: str | Path):
    """Open an image file with Pillow, turning its failures into a clear error."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise EdgeKitError(f"image {path} does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise EdgeKitError(
            f"cannot read image {path} ({exc}); expected a PNG or JPEG file."
        ) from None


def image_to_pixels(path, size: tuple[int, int], channels: int, resize: str = "bilinear") -> np.ndarray:
    image = open_image(path)
    image = image.convert("L" if channels == 1 else "RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), _filters()[resize])
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(height, width, channels)
