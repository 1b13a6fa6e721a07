"""The options every EdgeKit command shares, and the model they name: --mean/--std/--layout (how pixels become a
float model's input), --resize, --labels, --backend and --threads, checked as they are parsed."""

from __future__ import annotations

import argparse
import sys

from runtime.artifacts.preprocessing import RESIZE_METHODS
from runtime.artifacts.run_directory import is_run_directory, recommended
from runtime.bench import check_seconds
from runtime.errors import EdgeKitError
from runtime.limits import threads
from runtime.load import load
from runtime.text import terminal


def load_model(args):
    if is_run_directory(args.model):  # a pipeline's run: the file its report recommends
        args.model = str(recommended(args.model))

        print(f"the report's recommended file: {terminal(args.model)}", file=sys.stderr)
    return load(args.model, threads=args.threads, **model_options(args))


def model_options(args) -> dict:
    """--mean, --std, --resize, --labels and --layout, as runtime.load takes them."""
    return {"mean": args.mean, "std": args.std, "resize": args.resize,
            "labels": getattr(args, "labels", None), "layout": args.layout, "backend": getattr(args, "backend", None)}


def numbers(text: str) -> tuple[float, ...]:
    """An argparse type: numbers separated by commas (runtime.load's Options checks how many and their values)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or one per channel separated by commas, in pixel "
                                         f"units (e.g. 127.5 or 123.7,116.3,103.5); got {text!r}") from None


def add_normalization(group) -> None:
    """--mean, --std and --layout: how pixels become a float model's input tensor (runtime.load's Options);
    `python -m export` takes them for an .onnx source too."""
    group.add_argument("--mean", type=numbers, metavar="M", help="subtracted from pixels 0..255, one value or one "
                       "per channel, as the model was trained: input = (pixel - mean) / std (Normalize(0.5, 0.5) is "
                       "--mean 127.5 --std 127.5; ImageNet's 123.675,116.28,103.53 and 58.395,57.12,57.375)")
    group.add_argument("--std", type=numbers, metavar="S", help="divides after the mean, one value or one per "
                       "channel (0 and 255 give [0, 1])")
    group.add_argument("--layout", choices=("nchw", "nhwc"),
                       help="the model input's layout, where its shape reads both ways (default: read from the shape, "
                            "[N, 3, H, W] is NCHW as PyTorch exports, [N, H, W, 3] NHWC); images and .npy pixels are "
                            "always (H, W, C) and transposed for the model")


def add_model_options(parser, labels: bool = True) -> None:
    group = parser.add_argument_group(
        "models from elsewhere (no sidecar), or overriding the sidecar",
        "A model with 8-bit input and no sidecar takes the resized pixels as its quantized input (int8: pixels - "
        "128); its own scale and zero point say what they stand for. A float-input model without a sidecar "
        "needs --mean and --std.")
    add_normalization(group)
    group.add_argument("--resize", choices=RESIZE_METHODS, help="how images of another size are resized "
                       "(default: the sidecar's, else bilinear)")
    if labels:
        group.add_argument("--labels", metavar="FILE", help="class names, one a line, optionally after their index "
                           "('0 matured'); default: the sidecar's, else the file packed in the model's TFLite "
                           "metadata, else indices")
    parser.add_argument("--backend", choices=("micro", "litert"),
                        help="micro: run a fully integer .tflite file in TensorFlow Lite Micro's interpreter, one image "
                             "per invoke, as a microcontroller does (the micro extra); its latency here is TFLM's "
                             "reference kernels on this CPU, not a board's (README, Microcontrollers). A micro file "
                             "(export --micro) runs in TFLM by default; litert runs it in LiteRT instead, for its "
                             "figure beside TFLM's")


def seconds(text: str) -> float:
    """An argparse type for runtime.bench.check_seconds."""

    try:
        return check_seconds(float(text))
    except (ValueError, EdgeKitError):
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most 3600; got {text!r}") from None


def thread_count(text: str) -> int:
    """An argparse type: a thread count from 1 to the cores (runtime.limits)."""

    try:
        return threads(int(text) if text.strip().lstrip("-").isdigit() else text)
    except EdgeKitError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--threads ")) from None


def add_threads(parser, default):
    parser.add_argument("--threads", type=thread_count, default=default, metavar="N",
                        help="interpreter threads, at most the cores (default: the backend's own choice)")
