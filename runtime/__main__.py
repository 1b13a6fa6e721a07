"""`python -m runtime`: TensorFlow-free commands for artifacts and models."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from runtime import fileinfo
from runtime.artifacts.manifest import DEVICE_RUNTIMES, MANIFEST, read_manifest, verify_files
from runtime.artifacts.preprocessing import RESIZE_METHODS, Preprocessing, image_to_pixels
from runtime.artifacts.run_directory import every_file, is_run_directory, recommended
from runtime.backends.raw import describe_outputs, load_raw, parse_shapes, save_outputs
from runtime.bench import (DEFAULT_SECONDS, DEFAULT_WARMUP, bench, check_seconds, machine, parse_threads, to_csv,
                           to_table)
from runtime.datasets import load_dataset, load_for_manifest
from runtime.errors import ArgumentParser, ArtifactError, EdgeKitError, run_cli
from runtime.fsutil import check_readable_file, output_lock
from runtime.limits import json_loads, size_bytes, threads
from runtime.load import NotAClassifier, Options, finite, input_layout, load, read_inputs, read_npy
from runtime.metrics import classification_summary
from runtime.remote.device import describe, device_record
from runtime.remote.jobs import bench_on, classes_on
from runtime.remote.session import Session, add_arguments as add_device_arguments, target
from runtime.report import build
from runtime.report.decide import CHOICES, DEFAULT_CHOICE
from runtime.report.latency import ROUNDS, check_rounds
from runtime.text import terminal
from runtime.vocabulary import MAX_ACCURACY_DROP


def _number(value, spec: str, unit: str = "") -> str:
    return format(value, spec) + unit if type(value) in (int, float) else "-"


def _info(args) -> int:


    directory = Path(args.artifact)
    if directory.suffix.lower() in (".tflite", ".onnx") and not directory.is_dir():

        info = fileinfo.describe(directory)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            fileinfo.show(info)
        return 0
    if (directory / "pipeline.json").is_file() and not (directory / MANIFEST).exists():
        return _run_info(directory, args.json)
    manifest = read_manifest(args.artifact)
    problems = verify_files(args.artifact, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, "intact": not problems, "problems": problems}, indent=2))
    else:
        metrics = manifest["metrics"]
        parent = manifest.get("parent") or {}
        lines = [
            ("name", manifest["name"]),
            ("kind", manifest["kind"]),
            ("model", manifest["model"]),
            ("dataset", manifest["dataset"].get("name") if isinstance(manifest["dataset"], dict)
             else manifest["dataset"]),
            ("parent", "-" if not parent else
             f"{parent.get('name') or parent.get('path')} ({parent.get('kind', '?')}, test accuracy "
             f"{_number(parent.get('accuracy'), '.2%')}, model sha256 {parent.get('model_sha256', '-')})"),
        ]
        if manifest.get("recipe"):
            lines.append(("recipe", _recipe(manifest["recipe"])))
        if len(manifest.get("lineage") or []) > 1:
            lines.append(("lineage", " -> ".join(step.get("technique", "?") for step in manifest["lineage"])))
        lines += [
            ("created", manifest["created"]),
            ("input shape", "x".join(str(v) for v in manifest["input_shape"])),
            ("labels", ", ".join(map(terminal, manifest["labels"]))),
            ("test accuracy", _number(metrics.get("accuracy"), ".2%")),
            ("model size", _number(metrics.get("size_bytes"), ",", " bytes")
             + (" (the float model; its int8 export is the file to ship)" if metrics.get("qat_weights_bytes") else "")),
        ]
        if "params" in metrics:
            lines.append(("parameters", _number(metrics["params"], ",")))
        exports = manifest.get("exports", {})
        if exports:
            lines.append(("exports", ", ".join(f"{key} {'verified' if e.get('passed') else 'FAILED'}"
                                               for key, e in exports.items())))
        lines.append(("checksums", "all match" if not problems else "; ".join(problems)))
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key:<{width}}  {value}")
        print("files:")
        names = sorted(manifest["files"])
        name_width = max((len(n) for n in names), default=0)
        for name in names:
            record = manifest["files"][name]
            print(f"  {name:<{name_width}}  {_number(record.get('bytes'), ',', ' bytes'):>16}  "
                  f"sha256 {record.get('sha256', '-')}")
    if problems:
        raise ArtifactError(f"{args.artifact} is damaged: {'; '.join(problems)}. Re-create it with the stage that "
                            "wrote it.")
    return 0


def _recipe(recipe: dict) -> str:
    """'prune: sparsity 0.8; 2 epochs, lr 0.0003, batch 32, seed 0'."""
    training = ("epochs", "lr", "batch_size", "seed", "exclude")
    own = [f"{k.replace('_', ' ')} {v}" for k, v in recipe.items()
           if k != "technique" and k not in training and v not in (None, [], {})]
    tuning = [f"{recipe['epochs']} epochs" if "epochs" in recipe else None,
              f"lr {recipe['lr']:g}" if "lr" in recipe else None,
              f"batch {recipe['batch_size']}" if "batch_size" in recipe else None,
              f"seed {recipe['seed']}" if "seed" in recipe else None,
              f"exclude {', '.join(recipe['exclude'])}" if recipe.get("exclude") else None]
    return f"{recipe.get('technique', '?')}: " + "; ".join(
        part for part in (", ".join(own), ", ".join(t for t in tuning if t)) if part)


def _run_info(directory, as_json: bool) -> int:
    """A pipeline's run directory: its plan, stages, artifacts and the report's recommendation."""

    try:
        status = json_loads((directory / "pipeline.json").read_text("utf-8"))
        plan, stages = status["plan"], status.get("stages", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{directory}/pipeline.json is damaged ({exc}); rerun `python -m pipeline`.") from None
    artifacts = sorted(p.name for p in directory.iterdir() if (p / MANIFEST).is_file())
    report = None
    try:
        report = json_loads((directory / "report.json").read_text("utf-8"))
    except (OSError, ValueError):
        pass
    if as_json:
        print(json.dumps({"run_directory": str(directory), "plan": plan, "stages": stages, "artifacts": artifacts,
                          "report": report}, indent=2))
        return 0
    print(f"{directory} is a pipeline run directory ({plan.get('model')} on {plan.get('dataset')}), "
          f"not an artifact: {len(artifacts)} artifacts ({', '.join(artifacts) or 'none'}).")
    failed = [name for name, s in stages.items() if isinstance(s, dict) and s.get("status") == "failed"]
    print("stages: " + (f"{len(failed)} failed ({', '.join(failed)})" if failed else "none failed"))
    if report and report.get("summary"):
        print(f"report: {directory / 'report.md'}; to ship, within the {report.get('budget_points', 1):g}-point "
              "budget:")
        for line in report["summary"]:
            print(f"  {line}")
    else:
        print(f"no report yet: python -m runtime report {directory}")
    print(f"one artifact: python -m runtime info {directory / (artifacts[0] if artifacts else '<artifact>')}")
    return 0


def _load(args):

    if is_run_directory(args.model):  # a pipeline's run: the file its report recommends
        args.model = str(recommended(args.model))

        print(f"the report's recommended file: {terminal(args.model)}", file=sys.stderr)
    return load(args.model, threads=args.threads, **_model_options(args))


def _model_options(args) -> dict:
    """--mean, --std, --resize, --labels and --layout, as runtime.load takes them."""
    return {"mean": args.mean, "std": args.std, "resize": args.resize,
            "labels": getattr(args, "labels", None), "layout": args.layout, "backend": getattr(args, "backend", None)}


def _numbers(text: str) -> tuple[float, ...]:
    """An argparse type: numbers separated by commas (runtime.load's Options checks how many and their values)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or one per channel separated by commas, in pixel "
                                         f"units (e.g. 127.5 or 123.7,116.3,103.5); got {text!r}") from None


def add_normalization(group) -> None:
    """--mean, --std and --layout: how pixels become a float model's input tensor (runtime.load's Options);
    `python -m export` takes them for an .onnx source too."""
    group.add_argument("--mean", type=_numbers, metavar="M", help="subtracted from pixels 0..255, one value or one "
                       "per channel, as the model was trained: input = (pixel - mean) / std (Normalize(0.5, 0.5) is "
                       "--mean 127.5 --std 127.5; ImageNet's 123.675,116.28,103.53 and 58.395,57.12,57.375)")
    group.add_argument("--std", type=_numbers, metavar="S", help="divides after the mean, one value or one per "
                       "channel (0 and 255 give [0, 1])")
    group.add_argument("--layout", choices=("nchw", "nhwc"),
                       help="the model input's layout, where its shape reads both ways (default: read from the shape, "
                            "[N, 3, H, W] is NCHW as PyTorch exports, [N, H, W, 3] NHWC); images and .npy pixels are "
                            "always (H, W, C) and transposed for the model")


def _add_model_options(parser, labels: bool = True) -> None:

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


def _predict(args) -> int:


    if args.raw:
        return _predict_raw(args)
    if args.shape:
        raise EdgeKitError("--shape is for --raw (a model's dynamic input dimensions); a classifier's images set "
                           "its shape.")
    if args.top_k < 1:
        raise EdgeKitError(f"--top-k must be 1 or more; got {args.top_k}.")

    try:
        model = _load(args)
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


def _predict_raw(args) -> int:
    """predict --raw: every output tensor of any model, for inputs given as .npy arrays (NAME=file.npy, or in
    the model's input order) or, for one image input, an image file preprocessed with --mean/--std."""


    model = load_raw(args.model, threads=args.threads, shapes=parse_shapes(args.shape))
    options = Options(args.mean, args.std, args.resize, None, args.layout)  # checked: both or neither
    names = [t.name for t in model.inputs]
    feeds = {}
    for i, given in enumerate(args.inputs):
        name, sep, file = given.partition("=") if "=" in given and given.split("=", 1)[0] in names else ("", "", given)
        if not sep:
            if i >= len(names):
                raise EdgeKitError(f"{Path(args.model).name} takes {len(names)} input(s) ({', '.join(names)}); got "
                                   f"{len(args.inputs)} files. Name each: NAME=file.npy.")
            name = names[i]
        check_readable_file(file, "input")
        if Path(file).suffix.lower() == ".npy":
            feeds[name] = read_npy(Path(file))
        else:
            feeds[name] = _raw_image(model, name, Path(file), options)
    outputs = model.run(feeds)
    out = Path(args.out or f"{Path(args.model).stem}.outputs.npz")
    keys = save_outputs(outputs, out)
    if args.json:
        print(json.dumps({"model": str(model.path), "file": str(out), "keys": keys,
                          "outputs": describe_outputs(outputs)}, indent=1))
        return 0

    for record in describe_outputs(outputs):
        span = "" if record.get("min") is None else f"  min {record['min']:.6g} max {record['max']:.6g}"
        bad = f"  {record['non_finite']} NaN/inf" if record.get("non_finite") else ""
        print(f"{terminal(record['name'])}  {record['shape']} {record['dtype']}{span}{bad}")
    print(f"wrote {out} (numpy.load; keys: {', '.join(terminal(k) for k in keys.values())})")
    return 0


def _raw_image(model, name: str, path, options):
    """An image file as the input `name` of a raw model: resized to its height and width (in its layout),
    pixels for an 8-bit input (int8: pixels - 128), else (pixels - mean) / std."""


    tensor = next(t for t in model.inputs if t.name == name)
    shape = model.shapes[name]
    if len(shape) != 4:
        raise EdgeKitError(f"input {name!r} of shape {list(shape)} is not an image input; give it a .npy array.")
    layout = input_layout(shape, options.layout, None, model.path.name)
    h, w, c = (shape[2], shape[3], shape[1]) if layout == "nchw" else shape[1:]
    if c not in (1, 3):
        raise EdgeKitError(f"input {name!r} takes {c} channels; an image gives 1 or 3. Give it a .npy array.")
    pixels = image_to_pixels(path, (h, w), c, options.resize or "bilinear")[None].repeat(shape[0], axis=0)
    if tensor.dtype == "uint8":
        x = pixels
    elif tensor.dtype == "int8":
        x = (pixels.astype(np.int16) - 128).astype(np.int8)
    elif options.mean is None:
        raise EdgeKitError(f"input {name!r} takes {tensor.dtype}; pass --mean and --std to say how pixels become "
                           "it (e.g. 127.5 and 127.5 for [-1, 1], 0 and 255 for [0, 1]).")
    else:  # the one preprocessing code, as a model with a sidecar uses it

        x = Preprocessing((h, w), c, scale=1.0, mean=options.mean, std=options.std).apply(pixels).astype(tensor.dtype)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x


def _eval_dataset(args, model):
    """The dataset to evaluate on: --dataset, else the one in the artifact's manifest next to the model."""


    download = not args.no_download
    if args.dataset:
        h, w, c = model.input_shape
        return load_dataset(args.dataset, args.data_dir, image_size=(h, w), channels=c, download=download,
                            test_only=args.split == "test")
    manifest = Path(args.model).parent / "manifest.json"
    if not manifest.is_file():
        raise EdgeKitError(f"no --dataset given and no manifest.json next to {args.model} to say which dataset it "
                           "was trained on; pass --dataset (digits, mnist, fashion_mnist, cifar10 or folder:PATH).")
    return load_for_manifest(read_manifest(manifest.parent), args.data_dir, download=download)


def _eval(args) -> int:



    target(args)  # --host's options checked before any work
    model = _load(args)
    if args.dataset and model.preprocessing is None:  # a --dataset's own scaling would be a guess, silently wrong
        raise model.unknown_preprocessing()
    dataset = _eval_dataset(args, model)
    if args.split == "all":
        pixels = np.concatenate([dataset.x_train, dataset.x_val, dataset.x_test])
        y = np.concatenate([dataset.y_train, dataset.y_val, dataset.y_test])
    else:
        pixels, y = getattr(dataset, f"x_{args.split}"), getattr(dataset, f"y_{args.split}")
    to_dataset, labels = _class_mapping(dataset, model)
    if len(y) == 0:
        raise EdgeKitError(f"the {args.split} split of {dataset.name} is empty; choose another --split.")
    started = time.perf_counter()
    # the model's own preprocessing (its sidecar's, or --mean/--std) when it has one, else its artifact's (the
    # manifest beside it says how it was trained)
    x = pixels if model.preprocessing is not None else dataset.preprocessing.apply(pixels)

    predicted = finite(model.logits(x, batch_size=args.batch_size), model).argmax(axis=1)
    seconds = time.perf_counter() - started
    device, here = target(args), None
    if device:  # the device's predictions are the result; this machine's show whether it computes the same

        progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
        started = time.perf_counter()
        theirs, where = classes_on(device, model.path, x, args.threads, _model_options(args), args.batch_size,
                                   model.num_classes, progress)
        seconds = time.perf_counter() - started
        here, predicted = predicted, np.asarray(theirs, np.int64)
    if to_dataset is not None:
        predicted = to_dataset[predicted]
        here = None if here is None else to_dataset[here]

    summary = classification_summary(y, predicted, labels)
    recorded = ((model.sidecar or {}).get("verification") or {}).get("accuracy")
    result = {"model": str(model.path), "format": model.format, "backend": model.backend, "dataset": dataset.name,
              "split": args.split,
              "labels": labels, **summary, "seconds": seconds,
              "recorded_accuracy": recorded}
    if device:

        result["device"] = device_record(where, device.name)
        result["this_machine"] = {"accuracy": float(np.mean(here == y)), "same_predictions": int(np.sum(here == predicted))}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    correct = int(round(summary["accuracy"] * summary["samples"]))
    print(f"{model.path.name} on {dataset.name}, {args.split} split: {summary['samples']} images "
          f"in {seconds:.2f} s" + (f" on {describe(where, device.name)}" if device else ""))
    line = f"accuracy  {summary['accuracy']:.2%}  ({correct}/{summary['samples']})" + (
        "  by TFLM's interpreter" if model.backend == "micro" else "")
    if recorded is not None and args.split == "test":
        line += f"   recorded at export: {recorded:.2%}"
    print(line)
    if device:
        same = result["this_machine"]["same_predictions"]
        print(f"this machine: {result['this_machine']['accuracy']:.2%}; the same predicted class for {same} of "
              f"{len(y)} images" + ("" if same == len(y) else " (an 8-bit file's activations may round differently "
                                    "on another CPU's kernels)"))

    per_class = [summary["per_class_accuracy"][label] for label in labels]
    labels = [terminal(label) for label in labels]  # a label's escape sequences never reach the terminal
    width = max(len(label) for label in labels)
    support = [sum(row) for row in summary["confusion"]]
    print("per class:")
    for label, n, value in zip(labels, support, per_class):
        print(f"  {label:<{width}}  {'-' if value is None else f'{value:7.2%}'}  ({n} images)")
    if len(labels) <= 20:
        cell = max(3, len(str(max(support))) + 1, *(len(label) + 1 for label in labels))
        print("confusion (rows: true class, columns: predicted):")
        print(" " * (width + 2) + "".join(f"{label[:cell - 1]:>{cell}}" for label in labels))
        for label, row in zip(labels, summary["confusion"]):
            print(f"  {label:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return 0


def _class_mapping(dataset, model):
    """(model output index -> dataset class index, or None when they are the same; the labels to report).

    A dataset whose class names are the model's labels in the same order needs nothing; otherwise classes
    are matched by name (class folders named after the labels), and outputs of classes the dataset does not
    have count as "(other)". Without names on either side, the classes must match in number and order.
    """

    ours, theirs = list(dataset.labels), model.labels
    if ours == theirs:
        return None, ours
    named = theirs != [str(i) for i in range(model.num_classes)]
    if not named:
        if len(ours) != model.num_classes:
            raise EdgeKitError(f"{dataset.name} has {len(ours)} classes, but {model.path.name} has {model.num_classes} "
                               "outputs and no labels to match them by name; evaluate it on the dataset it was "
                               "trained for, or pass --labels FILE.")
        return None, ours
    index = {label: i for i, label in enumerate(theirs)}
    missing = [label for label in ours if label not in index]
    if missing:
        raise EdgeKitError(f"{dataset.name} has classes {missing[:5]} that are not among {model.path.name}'s labels "
                           f"({', '.join(theirs[:5])}{', ...' if len(theirs) > 5 else ''}); name the class folders "
                           "after the labels, or pass the matching --labels FILE.")
    other = len(ours) if len(ours) < model.num_classes else None
    mapping = np.full(model.num_classes, other if other is not None else 0, np.int64)
    for i, label in enumerate(ours):
        mapping[index[label]] = i
    return mapping, ours + (["(other)"] if other is not None else [])


def _size(flag: str):
    """An argparse type for runtime.limits.size_bytes."""
    def parse(text: str) -> int:

        try:
            return size_bytes(text, flag)
        except EdgeKitError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(flag + " ")) from None
    return parse


def _seconds(text: str) -> float:
    """An argparse type for runtime.bench.check_seconds."""

    try:
        return check_seconds(float(text))
    except (ValueError, EdgeKitError):
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most 3600; got {text!r}") from None


def _bench(args) -> int:

    if args.runs is not None and args.seconds is not None:
        raise EdgeKitError("give --runs or --seconds, not both.")
    progress = None if args.quiet or args.json or args.csv else (lambda m: print(m, file=sys.stderr, flush=True))



    if args.all and not any(is_run_directory(m) for m in args.models):
        raise EdgeKitError("--all benches every file of a pipeline's run directory; give one (runs/...), or name "
                           "the files.")
    args.models = [str(f) for m in args.models for f in (
        (every_file(m) if args.all else [recommended(m)]) if is_run_directory(m) else [m])]
    options = {**_model_options(args), "shapes": parse_shapes(args.shape) or None}
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


def _threads(text: str) -> int:
    """An argparse type: a thread count from 1 to the cores (runtime.limits)."""

    try:
        return threads(int(text) if text.strip().lstrip("-").isdigit() else text)
    except EdgeKitError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--threads ")) from None


def _add_threads(parser, default):
    parser.add_argument("--threads", type=_threads, default=default, metavar="N",
                        help="interpreter threads, at most the cores (default: the backend's own choice)")


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
    info.set_defaults(func=_info)

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
    _add_threads(predict, None)
    _add_model_options(predict)
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
    _add_threads(evaluate, None)
    _add_model_options(evaluate)
    add_device_arguments(evaluate, "Evaluate on the device as well: the split is sent once (checked by sha256), the "
                                   "device's predictions are the result, and this machine's are compared with them.")
    evaluate.set_defaults(func=_eval)

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
    budget.add_argument("--seconds", type=_seconds, metavar="S",
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
    _add_model_options(bench, labels=False)
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
    report.add_argument("--max-ram", type=_size("--max-ram"), metavar="SIZE",
                        help="a microcontroller's RAM for the tensor arena (256KiB, 1MiB, bytes): a micro file needing "
                             "more is marked over and never recommended")
    report.add_argument("--max-flash", type=_size("--max-flash"), metavar="SIZE",
                        help="a microcontroller's flash for the model: a micro file larger is marked over")
    report.add_argument("--threads", default="1,all", metavar="LIST",
                        help="thread counts to benchmark; the first and the last are reported (default 1,all)")
    report.add_argument("--seconds", type=_seconds, default=0.5, metavar="S",
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
