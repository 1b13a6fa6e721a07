"""`python -m runtime eval`: a model's accuracy on a dataset's split, here or on a device (--host), with its
classes matched to the dataset's by name."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from runtime.arguments import load_model, model_options
from runtime.artifacts.manifest import read_manifest
from runtime.backends.model import finite
from runtime.datasets import load_dataset, load_for_manifest
from runtime.errors import EdgeKitError
from runtime.metrics import classification_summary
from runtime.remote.device import describe, device_record
from runtime.remote.jobs import classes_on
from runtime.remote.session import target
from runtime.text import terminal


def eval_dataset(args, model):
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


def eval_command(args) -> int:
    device, here = target(args), None  # --host's options checked before any work
    model = load_model(args)
    if args.dataset and model.preprocessing is None:  # a --dataset's own scaling would be a guess, silently wrong
        raise model.unknown_preprocessing()
    dataset = eval_dataset(args, model)
    if args.split == "all":
        pixels = np.concatenate([dataset.x_train, dataset.x_val, dataset.x_test])
        y = np.concatenate([dataset.y_train, dataset.y_val, dataset.y_test])
    else:
        pixels, y = getattr(dataset, f"x_{args.split}"), getattr(dataset, f"y_{args.split}")
    to_dataset, labels = class_mapping(dataset, model)
    if len(y) == 0:
        raise EdgeKitError(f"the {args.split} split of {dataset.name} is empty; choose another --split.")
    started = time.perf_counter()
    # the model's own preprocessing (its sidecar's, or --mean/--std) when it has one, else its artifact's (the
    # manifest beside it says how it was trained)
    x = pixels if model.preprocessing is not None else dataset.preprocessing.apply(pixels)

    predicted = finite(model.logits(x, batch_size=args.batch_size), model).argmax(axis=1)
    seconds = time.perf_counter() - started
    if device:  # the device's predictions are the result; this machine's show whether it computes the same
        progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
        started = time.perf_counter()
        theirs, where = classes_on(device, model.path, x, args.threads, model_options(args), args.batch_size,
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


def class_mapping(dataset, model):
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
