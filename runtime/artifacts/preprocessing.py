"""Preprocessing as data: the exact transform from image pixels to model input.

Training, evaluation and on-device prediction all go through `Preprocessing`, and
its dict form travels in every manifest and sidecar, so the runtime repeats the
transform that training used without importing TensorFlow.

    pixels (uint8, N x H x W x C)  ->  float32 (pixels * scale - mean) / std
"""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import EdgeKitError
from runtime.fsutil import check_readable_file
from runtime.limits import MAX_INPUT, positive_normal

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # a GIF gives its first frame


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]  # (height, width) the model takes
    channels: int  # 1 (grayscale) or 3 (RGB)
    scale: float = 1.0 / 255.0  # multiplies raw uint8 pixels
    mean: tuple[float, ...] = (0.0,)  # per channel, after scaling (one value broadcasts)
    std: tuple[float, ...] = (1.0,)  # per channel, after scaling
    resize: str = "bilinear"  # Pillow filter used when an image has another size
    background: int = 0  # gray level transparent pixels are composited on (0: black, as digits and MNIST)

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

        positive_normal(self.std, "preprocessing std")  # NaN fails too; a subnormal std makes infinities
        if type(self.background) is not int or not 0 <= self.background <= 255:
            raise EdgeKitError(f"preprocessing background must be a gray level 0..255; got {self.background!r}.")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise EdgeKitError(f"preprocessing scale must be a finite number > 0; got {self.scale!r}.")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise EdgeKitError(f"preprocessing mean and std must be finite; got {self.mean} and {self.std}.")
        reach = max(abs(p * self.scale - m) / s for p in (0, 255) for m in self.mean for s in self.std)
        if not reach <= MAX_INPUT:  # pixels must become numbers a model can take, not overflow float32
            raise EdgeKitError(f"preprocessing scale {self.scale:g}, mean {self.mean} and std {self.std} make pixels "
                               f"0..255 into values up to {reach:.3g}; expected at most {MAX_INPUT:g}.")
        if self.resize not in _FILTERS:
            raise EdgeKitError(f"preprocessing resize must be one of {sorted(_FILTERS)}; got {self.resize!r}.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.size, self.channels)

    def to_dict(self) -> dict:
        return {
            "size": list(self.size), "channels": self.channels, "scale": self.scale,
            "mean": list(self.mean), "std": list(self.std), "resize": self.resize, "background": self.background,
            "layout": "NHWC", "input_range": "uint8 pixels 0..255",
        }

    @classmethod
    def in_pixel_units(cls, size, channels: int, mean, std, base: "Preprocessing | None" = None) -> "Preprocessing":
        """--mean/--std as a user gives them for a model from elsewhere: input = (pixel - mean) / std in pixel units
        (TFLite Support's NormalizeOp; 127.5 and 127.5 for Normalize(0.5, 0.5)), one or the other defaulting to 0
        and 1; the resize filter and background of `base` (the sidecar's or the dataset's) kept. The one rule for
        every source: an .onnx or a Keras file in export, a file without a sidecar in the runtime."""
        return cls(tuple(size), channels, scale=1.0, mean=mean or (0.0,), std=std or (1.0,),
                   resize=base.resize if base else "bilinear", background=base.background if base else 0)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise EdgeKitError(f"a preprocessing record must be an object; got {type(data).__name__}.")
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (TypeError, ValueError) as exc:
            raise EdgeKitError(f"preprocessing record is incomplete or malformed ({exc}); got {data}.") from None

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, C) -> float32 model input of the same shape."""
        x = pixels.astype(np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (x - mean) / std

    def load_image(self, path: str | Path) -> np.ndarray:
        """Read an image file as uint8 (H, W, C) pixels at this size and channel count."""
        return image_to_pixels(path, self.size, self.channels, self.resize, self.background)


def resize_filters():
    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "area": Image.Resampling.BOX}  # BOX averages the source pixels each output pixel covers


_FILTERS = ("nearest", "bilinear", "area", "bicubic", "lanczos")
RESIZE_METHODS = _FILTERS


MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000: any camera's photo; a decompression bomb is far beyond


def open_image(path: str | Path):
    """Open an image file with Pillow, refusing a decompression bomb from its header, before decoding it."""

    check_readable_file(path, "image")
    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours is lower and refuses below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise EdgeKitError(f"image {path} claims more pixels than Pillow will decode; expected an image of at most "
                           f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels (a larger one is refused before decoding, as a "
                           "decompression bomb). Resize it first.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise EdgeKitError(f"cannot read image {path} ({exc}); expected a PNG, JPEG, BMP, GIF or WebP file.") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise EdgeKitError(f"image {path} claims {width}x{height} pixels; expected an image of at most "
                           f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels (a larger one is refused before decoding, "
                           "as a decompression bomb). Resize it first.")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError) as exc:
        raise EdgeKitError(f"cannot read image {path} ({exc}); the file is truncated or corrupt.") from None
    try:  # a phone stores a photo as the sensor saw it and says in EXIF how to turn it upright: do so
        upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error) as exc:
        raise EdgeKitError(f"cannot read image {path}: its EXIF orientation is damaged ({exc}).") from None
    return image if upright is None else upright


def to_8bit(image, channels: int, background: int = 0) -> np.ndarray:
    """Pixels of any Pillow mode as uint8 (H, W, channels), each mode read for what it means.

    16-bit (I;16, I) and float (F) images are scaled to 0..255 rather than clipped; transparent
    pixels (LA, RGBA, P with transparency) are composited on `background`; CMYK, YCbCr, LAB and
    the like are converted to RGB; colour becomes gray with ITU-R 601 luma, gray becomes RGB by
    repetition.
    """

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, "L")
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float64))
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in image.info) \
            or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(backdrop, rgba).convert("RGB")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    image = image.convert("L" if channels == 1 else "RGB")
    return np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], channels)


def is_colour(image) -> bool:
    """Whether an image holds colour (not a gray mode), read from its header."""
    return image.mode not in ("1", "L", "LA", "La", "I", "F") and not image.mode.startswith("I;16")


def image_to_pixels(path, size: tuple[int, int], channels: int, resize: str = "bilinear",
                    background: int = 0) -> np.ndarray:

    pixels = to_8bit(open_image(path), channels, background)
    height, width = size
    if pixels.shape[:2] != (height, width):
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else "RGB")
        pixels = np.asarray(image.resize((width, height), resize_filters()[resize]), np.uint8)
    return pixels.reshape(height, width, channels)


# --- how the training images look, so that predict can say when an input does not --------------------

def _border(pixels: np.ndarray) -> np.ndarray:
    """Mean intensity (0..1) of each image's outer ring, an eighth of its side wide (at least one pixel): its
    background, for images of one centred object. pixels: uint8 (N, H, W, C)."""
    n, h, w = pixels.shape[:3]
    k = max(1, min(h, w) // 8)
    ring = np.ones((h, w), bool)
    ring[k:h - k, k:w - k] = False
    return pixels[:, ring].reshape(n, -1).mean(axis=1) / 255.0


def _spread(values: np.ndarray) -> dict:
    return {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "p01": round(float(np.percentile(values, 1)), 4), "p99": round(float(np.percentile(values, 99)), 4)}


def pixel_statistics(pixels: np.ndarray) -> dict:
    """Per-image mean intensity (0 black .. 1 white) and background (the outer ring's intensity) of uint8 images
    (N, H, W, C): what the sidecar records of the training split, so that `predict` can tell an input unlike
    every training image, and an inverted one."""
    means = pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0
    return {"mean_intensity": _spread(means), "background": _spread(_border(pixels)),
            "images": int(len(pixels)), "split": "train"}


def unusual_input(pixels: np.ndarray, statistics: dict | None) -> str | None:
    """Why one uint8 image (H, W, C) is unlike the training images, in words that say what differs, or None.

    Inverted: its background (outer ring) is on the other side of mid-gray from every training image's, and its
    negative's mean intensity is like theirs (a black-on-white drawing for a model trained on light strokes on
    black, as MNIST and digits are): `--invert`. Otherwise, with the background right, only an image far outside
    the training images' mean intensity is flagged: darker than a quarter of their 1st percentile (nearly empty:
    a correctly drawn digit with thin strokes is not), or brighter than their 99th by max(3 std, 0.1) (strokes much thicker, or a light patch). A
    sidecar from before the background was recorded: the mean intensity alone, as before."""
    record = (statistics or {}).get("mean_intensity")
    if not record:
        return None
    mean = float(pixels.mean()) / 255.0
    margin = max(3 * record["std"], 0.1)
    theirs = f"theirs {record['p01']:.2f} to {record['p99']:.2f}"
    background = (statistics or {}).get("background")
    if isinstance(background, dict) and all(isinstance(background.get(k), (int, float)) for k in ("p01", "p99")):
        dark = background["p99"] < 0.5
        if dark or background["p01"] > 0.5:  # the training images agree on their background
            own = float(_border(pixels[None])[0])
            negative_fits = record["p01"] / 2 <= 1 - mean <= record["p99"] + margin
            if (own > 0.5 if dark else own < 0.5) and negative_fits:
                looks = "light strokes on a dark background" if dark else "dark strokes on a light background"
                return (f"looks inverted: its background is {'light' if dark else 'dark'} ({own:.2f}) where the "
                        f"training images' is {'dark' if dark else 'light'} ({background['p01']:.2f} to "
                        f"{background['p99']:.2f}); the model was trained on {looks}: pass --invert")
            low, high = record["p01"] / 4, record["p99"] + margin
            if mean < low:
                return (f"is darker than every training image (mean intensity {mean:.2f}; {theirs}): nearly empty, "
                        "or strokes far thinner or smaller than theirs; the prediction may be wrong")
            if mean > high:
                return (f"is brighter than every training image (mean intensity {mean:.2f}; {theirs}): more of it "
                        "is bright (strokes thicker than theirs, or a light patch); the prediction may be wrong")
            return None
    low, high = record["p01"] - margin, record["p99"] + margin
    if low <= mean <= high:
        return None
    looks = "light strokes on a dark background" if record["mean"] < 0.5 else "dark strokes on a light background"
    if low <= 1 - mean <= high:
        return (f"looks inverted compared with the training images (mean intensity {mean:.2f} vs "
                f"{record['mean']:.2f}); the model was trained on {looks}: pass --invert")
    return (f"is unlike the training images (mean intensity {mean:.2f}; {theirs}); the prediction may be "
            "wrong")
