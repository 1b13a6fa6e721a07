"""`python -m runtime`: TensorFlow-free commands for artifacts and models."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

import numpy as np

from runtime.arguments import add_model_options, add_threads, load_model, model_options, seconds
from runtime.artifacts.manifest import DEVICE_RUNTIMES
from runtime.artifacts.run_directory import every_file, is_run_directory, recommended
from runtime.backends.raw import parse_shapes, predict_raw
from runtime.bench import DEFAULT_SECONDS, DEFAULT_WARMUP, bench, machine, parse_threads, to_csv, to_table
from runtime.errors import ArgumentParser, EdgeKitError, run_cli
from runtime.evaluate import eval_command
from runtime.fileinfo import info_command
from runtime.fsutil import output_lock
from runtime.limits import size_argument
from runtime.load import NotAClassifier, finite, read_inputs
from runtime.remote.device import describe
from runtime.remote.jobs import bench_on
from runtime.remote.session import Session, add_arguments as add_device_arguments, target
from runtime.report import build
from runtime.report.decide import CHOICES, DEFAULT_CHOICE
from runtime.report.latency import ROUNDS, check_rounds
from runtime.text import terminal
from runtime.vocabulary import MAX_ACCURACY_DROP


def _predict(args) -> int:
    if args.raw:
        return predict_raw(args)
    if args.shape:
        raise EdgeKitError("--shape is for --raw (a model's dynamic input dimensions); a classifier's images set "
                           "its shape.")
    if args.top_k < 1:
        raise EdgeKitError(f"--top-k must be 1 or more; got {args.top_k}.")

    try:
        model = load_model(args)
    except NotAClassifier as exc:
        raise NotAClassifier(f"{exc} For every output tensor of any model, pass --raw (and bench times it as it "
                             "is).") from None
    named = read_inputs(args.inputs, model, invert=args.invert)
    for name, _, warning in named:
        if warning:
            print(f"warning: {name} {warning}.", file=sys.stderr)
    probabilities = finite(model.predict(np.concatenate([x for _, x, _ in named])), model)
    k = min(args.top_k, model.num_classes)
    tops = model.top_k(probabilities, k)
    if args.json:
        labels = model.labels
        records = [{"input": name, "top": [{"label": label, "index": labels.index(label), "probability": p}
                                           for label, p in top],
                    "probabilities": [float(v) for v in row]}
                   for (name, _, _), top, row in zip(named, tops, probabilities)]
        print(json.dumps({"model": str(model.path), "predictions": records}, indent=1))
        return 0

    width = max(len(terminal(name)) for name, _, _ in named)
    for (name, _, _), top in zip(named, tops):
        print(f"{terminal(name):<{width}}  " + "   ".join(f"{terminal(label)} {p:7.2%}" for label, p in top))
    return 0


def _bench(args) -> int:
    if args.runs is not None and args.seconds is not None:
        raise EdgeKitError("give --runs or --seconds, not both.")
    progress = None if args.quiet or args.json or args.csv else (lambda m: print(m, file=sys.stderr, flush=True))

    if args.all and not any(is_run_directory(m) for m in args.models):
        raise EdgeKitError("--all benches every file of a pipeline's run directory; give one (runs/...), or name "
                           "the files.")
    args.models = [str(f) for m in args.models for f in (
        (every_file(m) if args.all else [recommended(m)]) if is_run_directory(m) else [m])]
    options = {**model_options(args), "shapes": parse_shapes(args.shape) or None}
    device = target(args)
    if device:
        results, where = bench_on(device, args.models, args.threads, args.batch, args.runs, args.seconds,
                                  args.warmup, args.input, options, progress)
    else:
        results, where = bench(args.models, parse_threads(args.threads), args.batch, args.runs, args.seconds,
                               args.warmup, progress, inputs=args.input, options=options), machine()
    if args.json:
        print(json.dumps({"machine": where, **({"device": results[0]["device"]} if device and results else {}),
                          "results": results}, indent=1))
    elif args.csv:
        print(to_csv(results), end="")
    else:
        if device:
            print(f"on {describe(where, device.name)}")
        print(to_table(results))
    return 0


def _report(args) -> int:
    device, rounds = target(args), check_rounds(args.rounds)
    if args.target == "micro":
        if args.objective not in (DEFAULT_CHOICE, "arena"):
            raise EdgeKitError(f"--target micro answers for the smallest tensor arena; it does not take --objective "
                               f"{args.objective}.")
        args.objective = "arena"
    if device and args.no_bench:
        raise EdgeKitError("--host measures latency on the device; it has nothing to do with --no-bench.")
    progress = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    with output_lock(args.directory), (Session(device, progress) if device else nullcontext()) as session:
        threads = session.threads(args.threads) if session else parse_threads(args.threads)
        report = build(args.directory, threads, args.seconds, args.runs, bench=not args.no_bench,
                       rebench=args.rebench, data_dir=args.data_dir, progress=not args.quiet,
                       budget=args.max_accuracy_drop, rounds=rounds, objective=args.objective, device=session,
                       max_ram=args.max_ram, max_flash=args.max_flash, runtime=args.runtime)
    verified = sum(r["status"] == "verified" for r in report["rows"])
    print(f"{verified} of {len(report['rows'])} files verified; baseline {report['baseline']}")
    for note in report["notes"]:
        print(f"- {note}")
    print(f"to ship, within the {report['budget']:g}-point budget:")
    for line in report["summary"]:
        print(f"  {line}")
    written = ["report.md", "report.html", "report.csv", "report.json", *report["plots"], *report.get("search_plots", [])]
    print(f"wrote {', '.join(f'{args.directory}/{name}' for name in written)}")
    damaged = [r["reason"] for r in report["rows"] if r.get("damaged")]
    for reason in damaged:  # the others are reported; these artifacts could not be
        print(f"error: {reason}", file=sys.stderr)
    return 1 if damaged else 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m runtime",
        description="EdgeKit's TensorFlow-free runtime: inspect artifacts, and run, evaluate and benchmark "
                    ".tflite and .onnx models on this CPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="what an artifact or a bare .tflite/.onnx file is",
                               description="Show what an artifact directory holds and check every file "
                                           "against the sha256 in its manifest (exit 1 if any differs); or, for "
                                           "a bare .tflite or .onnx file from anywhere: every input and output "
                                           "(name, shape, dtype, layout, quantization), opset and producer, the "
                                           "operator census, size, sha256, packed labels, and whether EdgeKit can "
                                           "treat it as an image classifier (and if not, why).",
                               epilog="examples: python -m runtime info runs/fashion_cnn-digits/fashion_cnn   "
                                      "python -m runtime info mnist.onnx")
    info.add_argument("artifact", metavar="ARTIFACT|FILE",
                      help="artifact directory (holding manifest.json), a pipeline's run directory, or a .tflite or "
                           ".onnx file")
    info.add_argument("--json", action="store_true", help="print the manifest and the check as JSON")
    info.set_defaults(func=info_command)

    predict = commands.add_parser(
        "predict", help="top-k labels of images (PNG, JPEG, BMP, GIF, WebP) or .npy arrays",
        description="Classify images with a .tflite or .onnx model. PNG, JPEG, BMP, GIF (first frame) and WebP files are converted to the model's "
                    "channels, resized and preprocessed as in training (from the model's sidecar json). "
                    ".npy files hold uint8 pixels (H, W, C) or (N, H, W, C), or float32 input already "
                    "preprocessed.",
        epilog="example: python -m runtime predict artifacts/fashion_cnn-digits/model.int8.tflite digit.png")
    predict.add_argument("model", help="a .tflite or .onnx file (its sidecar model.<variant>.json gives labels "
                                       "and preprocessing), or a pipeline's run directory (the file its report "
                                       "recommends)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG, JPEG, BMP, GIF or WebP images, or .npy arrays")
    predict.add_argument("--top-k", type=int, default=3, metavar="K", help="labels to show per image (default 3)")
    predict.add_argument("--invert", action="store_true", help="images and uint8 arrays become 255 - pixels first: a "
                         "dark-on-light drawing for a model trained on light strokes on dark, as MNIST's")
    predict.add_argument("--json", action="store_true", help="print every probability as JSON (with --raw: every "
                         "output's shape, dtype, range, and its values when it has at most 4,096)")
    predict.add_argument("--raw", action="store_true",
                         help="any model (pose, segmentation, several inputs or outputs): feed INPUTs as they are "
                              "(.npy arrays, NAME=file.npy, or an image for one image input) and write every output "
                              "tensor to --out (.npz)")
    predict.add_argument("--out", metavar="FILE", help="with --raw: the .npz written (default <model>.outputs.npz here)")
    predict.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                         help="with --raw, and for bench: a dynamic input's shape, e.g. input=1,3,224,224 (repeat for "
                              "several inputs)")
    add_threads(predict, None)
    add_model_options(predict)
    predict.set_defaults(func=_predict)

    evaluate = commands.add_parser(
        "eval", help="accuracy, per-class accuracy and confusion counts on a dataset split",
        description="Evaluate a .tflite or .onnx model on the same fixed split and preprocessing that training "
                    "used, through the TensorFlow-free data code. Without --dataset, the dataset is the one "
                    "recorded in the manifest.json next to the model.",
        epilog="example: python -m runtime eval artifacts/fashion_cnn-digits/model.int8.tflite --dataset digits")
    evaluate.add_argument("model", help="a .tflite or .onnx file, or a pipeline's run directory (the file its "
                                        "report recommends)")
    evaluate.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10 or folder:PATH "
                                            "(default: the artifact's own, from its manifest)")
    evaluate.add_argument("--data-dir", help="directory holding the dataset's files (IDX, CIFAR batches)")
    evaluate.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                          help="which split to evaluate (default: test, fixed by the split seed; all: every image, "
                               "for a model that was not trained on this dataset)")
    evaluate.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per call (default 256)")
    evaluate.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    add_threads(evaluate, None)
    add_model_options(evaluate)
    add_device_arguments(evaluate, "Evaluate on the device as well: the split is sent once (checked by sha256), the "
                                   "device's predictions are the result, and this machine's are compared with them.")
    evaluate.set_defaults(func=eval_command)

    bench = commands.add_parser(
        "bench", help="latency, throughput and memory, several models side by side",
        description="Benchmark models on this CPU. Each model and thread count runs in a fresh process: load "
                    "time, first inference, then bare backend invokes alternating with whole predict calls "
                    "(latency median/p90/p99, mean±std of each, so the runtime's overhead shows), throughput "
                    "and peak RSS. The first model is the baseline for the size and speed ratios.",
        epilog="example: python -m runtime bench artifacts/fashion_cnn-digits --threads 1,2   "
               "(a directory benches every exported model in it, float32 first)")
    bench.add_argument("models", nargs="+", metavar="MODEL",
                       help=".tflite/.onnx files, artifact directories (all their exported models), or a pipeline's "
                            "run directory (the file its report recommends; --all: every file)")
    bench.add_argument("--all", action="store_true",
                       help="with a run directory: every verified file of its report, the float baseline first")
    bench.add_argument("--threads", default="1", metavar="LIST",
                       help="thread counts separated by commas; 'all' = every core (default 1)")
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, metavar="N", help="timed runs per model and thread count")
    budget.add_argument("--seconds", type=seconds, metavar="S",
                        help=f"time budget per model and thread count (default {DEFAULT_SECONDS:g} s when --runs "
                             "is not given)")
    bench.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="K",
                       help=f"untimed calls first (default {DEFAULT_WARMUP})")
    bench.add_argument("--batch", type=int, default=1, metavar="B", help="images per call (default 1)")
    bench.add_argument("--input", choices=("pixels", "float"), default="pixels",
                       help="what predict is given: uint8 pixels it preprocesses itself (default; a float model "
                            "without a sidecar needs --mean/--std for them), or float input already preprocessed "
                            "(normal noise for a float model nothing describes)")
    output = bench.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print every figure as JSON")
    output.add_argument("--csv", action="store_true", help="print one CSV row per model and thread count")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                       help="a model that is not an image classifier is timed raw, on inputs of each tensor's dtype "
                            "and shape: give a dynamic input's shape, e.g. input=1,3,224,224 (repeatable)")
    add_model_options(bench, labels=False)
    add_device_arguments(bench, "Measure on the device: each row names where it ran (host, board, CPU, Python and "
                                "EdgeKit versions); 'all' threads are the device's cores.")
    bench.set_defaults(func=_bench)

    report = commands.add_parser(
        "report", help="the accuracy-vs-size-vs-latency report of a pipeline's artifacts",
        description="Evaluate every exported file under DIRECTORY on its test split (accuracy with its 95% Wilson "
                    "interval), compare it with the float baseline (the trained model's float32 TFLite file) by "
                    "the exact McNemar test on the same images, mark files over the accuracy budget, benchmark "
                    "every file at 1 thread and at all threads in interleaved rounds (median with a 95% "
                    "interval; cached in bench.json), and recommend the file to ship for each objective "
                    "(smallest, smallest download, fastest). Writes report.md (recommendation first), "
                    "report.csv, report.json, accuracy_vs_size.png and accuracy_vs_latency.png into DIRECTORY.",
        epilog="example: python -m runtime report artifacts/fashion_cnn-digits")
    report.add_argument("directory", help="a pipeline's output directory (one artifact per sub-directory), "
                                          "or one exported artifact")
    report.add_argument("--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP, metavar="POINTS",
                        help="the accuracy budget: a file more than POINTS below the float baseline is over budget, "
                             f"never Pareto-optimal and never recommended (default {MAX_ACCURACY_DROP:g}, as export)")
    report.add_argument("--objective", choices=CHOICES, default=DEFAULT_CHOICE,
                        help="what the recommendation at the top answers: the smallest file (size, the default), the "
                             "smallest download (gzip), the fastest file at 1 thread (latency, as the search) or the "
                             "smallest tensor arena of a microcontroller file (arena); the others follow, one line each")
    report.add_argument("--runtime", choices=DEVICE_RUNTIMES, default="litert",
                        help="what runs the file on the device: litert (default), the user's own LiteRT or "
                             "onnxruntime app, where every recommended file was verified at export; edgekit, EdgeKit's "
                             "runtime installed there, so files that need it (export --sparse) may be recommended")
    report.add_argument("--target", choices=("micro",),
                        help="micro: the recommendation is for a microcontroller, the micro file with the smallest "
                             "tensor arena within the budgets (same as --objective arena)")
    report.add_argument("--max-ram", type=size_argument("--max-ram"), metavar="SIZE",
                        help="a microcontroller's RAM for the tensor arena (256KiB, 1MiB, bytes): a micro file needing "
                             "more is marked over and never recommended")
    report.add_argument("--max-flash", type=size_argument("--max-flash"), metavar="SIZE",
                        help="a microcontroller's flash for the model: a micro file larger is marked over")
    report.add_argument("--threads", default="1,all", metavar="LIST",
                        help="thread counts to benchmark; the first and the last are reported (default 1,all)")
    report.add_argument("--seconds", type=seconds, default=0.5, metavar="S",
                        help="benchmark time per file and thread count, over all rounds (default 0.5)")
    report.add_argument("--runs", type=int, metavar="N",
                        help="a fixed number of timed calls per file and round instead of --seconds")
    report.add_argument("--rounds", type=int, default=ROUNDS, metavar="R",
                        help=f"interleaved rounds over all files (default {ROUNDS}): a file's latency is the median "
                             "of its round medians, with a 95%% interval from them")
    report.add_argument("--no-bench", action="store_true", help="sizes and accuracy only, no latency")
    report.add_argument("--rebench", action="store_true", help="ignore the cached benchmarks in bench.json")
    report.add_argument("--data-dir", help="where the dataset files are, if not where the manifests say")
    report.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_device_arguments(report, "Measure latency on the device (accuracy is computed here: the same on any CPU for "
                                 "these files, as eval --host shows); the header, the plots and the latency "
                                 "recommendation say where.")
    report.set_defaults(func=_report)
    for sub in commands.choices.values():
        sub.add_argument("--verbose", action="store_true", help="on an error, show its original cause")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
