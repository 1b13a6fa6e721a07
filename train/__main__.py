"""`python -m train`: train a registered model on a dataset and write an artifact directory."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from runtime.artifacts.manifest import check_out_apart
from runtime.datasets import DATASET_NAMES, MAX_IMAGE_SIDE
from runtime.errors import ArgumentParser, EdgeKitError, run_cli
from runtime.fsutil import check_output_dir, output_lock
from train import resume
from train.devices import check_spec
from train.models import model_list  # names and descriptions only; no TensorFlow
from train.trainer import TrainConfig, is_chief, train, write_artifact

EPILOG = """\
examples:
  python -m train --model fashion_cnn --dataset digits --out artifacts/fashion_cnn
  python -m train --model mobilenet --dataset fashion_mnist --data-dir ~/data/fashion --augment
  python -m train --model resnet --model-arg depth=20 --dataset folder:~/photos --image-size 32
  python -m train --model mobilenet_v2 --model-arg alpha=0.35 --weights imagenet --dataset folder:~/photos \
      --image-size 96 --freeze-backbone --fine-tune-from block_13_expand

datasets: digits (embedded, offline), mnist, fashion_mnist (IDX files in --data-dir, the
Keras cache, or downloaded), cifar10, folder:PATH (PATH/<class>/<image>.png|jpg).

devices: --devices auto (default) uses every visible GPU, else the CPU; cpu:N splits the CPU into
N replicas (MirroredStrategy). Set TF_CONFIG on each machine for multi-machine training
(MultiWorkerMirroredStrategy; only the chief writes --out); scripts/train-multiworker N starts N
local workers to try it on one machine.

checkpoints: every epoch is backed up in <out>.checkpoint/ until the artifact is written; after
Ctrl-C, kill -9 or a lost worker, run the same command with --resume to continue from the last
completed epoch.
"""


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=20); got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, tuple(parsed) if isinstance(parsed, list) else parsed


def _devices(text: str) -> str:
    try:
        return check_spec(text)
    except EdgeKitError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--devices takes ")) from exc


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH (e.g. 32 or 28x28); got {text!r}")

    if max(size) > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGE_SIDE} pixels a side (edge classifiers take "
                                         f"28 to 224); got {text!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    models = model_list()
    parser = ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an image classifier and write an EdgeKit artifact directory "
                    "(model.keras, manifest.json, training.png, confusion.png).\n\nmodels:\n" + models,
        epilog=EPILOG)
    parser.add_argument("--model", required=True, help="registered model name (see above)")
    parser.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASET_NAMES)} (default: digits)")
    parser.add_argument("--data-dir", help="directory holding the dataset files (searched first, and only there)")
    parser.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    parser.add_argument("--image-size", type=_image_size, help="resize images to SIZE or HxW (default: the dataset's)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    parser.add_argument("--epochs", type=int, default=40, help="maximum epochs; early stopping ends sooner (default: 40)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, recorded in the manifest (default: 0)")
    parser.add_argument("--patience", type=int, default=6,
                        help="epochs without validation-loss improvement before stopping (default: 6)")
    parser.add_argument("--augment", action="store_true", help="random shifts, zoom and rotation while training")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="bfloat16 compute on a CPU, float16 on GPUs (weights and saved model float32)")
    parser.add_argument("--devices", default="auto", type=_devices, metavar="SPEC",
                        help="auto, cpu, cpu:N (N replicas on the CPU), gpu or gpu:0,1 (default: auto)")
    backbone = parser.add_argument_group("transfer learning (the Keras applications backbones)")
    backbone.add_argument("--weights", default="none", metavar="none|imagenet|PATH",
                          help="none (random, default), imagenet (Keras's download, cached in ~/.keras/models), or "
                               "a weights file saved from the same backbone")
    backbone.add_argument("--freeze-backbone", action="store_true",
                          help="train the new head only, the backbone frozen")
    backbone.add_argument("--fine-tune-from", metavar="LAYER",
                          help="after the head, unfreeze the backbone from LAYER (e.g. block_13_expand) and train on "
                               "at a tenth of the learning rate (BatchNorm stays frozen)")
    parser.add_argument("--steps-per-execution", type=int, default=1, metavar="N",
                        help="batches per call into TensorFlow: less Python per step, same updates (default: 1)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted training from <out>.checkpoint/ (same options)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="write TensorBoard logs (loss, accuracy, learning rate per epoch; the graph) to DIR")
    parser.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="override a model argument, e.g. depth=20 or width=0.5 (repeatable)")
    parser.add_argument("--out", help="artifact directory to write (default: artifacts/<model>-<dataset>)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")
    parser.add_argument("--verbose", action="store_true", help="on an error, show its original cause")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    config = TrainConfig(
        model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, patience=args.patience, augment=args.augment, mixed_precision=args.mixed_precision,
        model_args=dict(args.model_arg), data_dir=args.data_dir, image_size=args.image_size,
        channels=args.channels, download=not args.no_download, devices=args.devices,
        steps_per_execution=args.steps_per_execution, weights=args.weights, freeze_backbone=args.freeze_backbone,
        fine_tune_from=args.fine_tune_from)
    safe_name = args.dataset.split(":")[0]
    out = Path(args.out or f"artifacts/{args.model}-{safe_name}")
    if args.dataset.startswith("folder:"):
        check_out_apart(out, [Path(args.dataset.removeprefix("folder:")).expanduser()])
    check_output_dir(out, args.force)  # fail before spending minutes on training
    if args.tensorboard is not None:
        _check_tensorboard(Path(args.tensorboard), out)

    backup = resume.checkpoint_dir(out)
    options = dict(quiet=args.quiet, checkpoint=backup, resume=args.resume, force=args.force,
                   tensorboard=args.tensorboard)
    if not is_chief():  # other workers save to a scratch directory, as MultiWorkerMirroredStrategy requires
        result = train(config, **options)
        scratch = Path(tempfile.mkdtemp())
        write_artifact(result, scratch / "artifact")
        shutil.rmtree(scratch, ignore_errors=True)
        return 0

    with output_lock(out):  # a second run on the same --out is refused at once, not after training
        check_output_dir(out, args.force)
        try:
            result = train(config, **options)
        except KeyboardInterrupt:
            if (backup / resume.STATE).exists():
                print(f"interrupted: the completed epochs are kept in {backup}; run the same command with --resume "
                      "to continue", file=sys.stderr)
            raise
        manifest = write_artifact(result, out, force=args.force)
        resume.finish(backup, chief=True)
    metrics, training = manifest["metrics"], manifest["training"]
    if training.get("resumed_from_epoch"):
        print(f"resumed after epoch {training['resumed_from_epoch']} from {backup}")
    print(f"test accuracy {metrics['accuracy']:.2%} on {manifest['dataset']['split']['sizes']['test']} images; "
          f"{metrics['params']:,} parameters, {metrics['size_bytes'] / 1024:.0f} KiB; "
          f"{training['epochs_run']} epochs (best {training['best_epoch']}) in {training['train_seconds']:.0f}s")
    print(f"wrote {out}/: model.keras, manifest.json, training.png, confusion.png")
    print(f"next: python -m runtime info {out}")
    return 0


def _check_tensorboard(logs, out) -> None:
    """--tensorboard checked before training, as every option: a directory that can be written, and not
    inside the artifact (which is replaced whole when training ends)."""

    if logs.resolve() == out.resolve() or logs.resolve().is_relative_to(out.resolve()):
        raise EdgeKitError(f"--tensorboard {logs} is inside --out {out}, which is replaced whole when training ends; "
                           "choose a directory outside it.")
    if logs.exists() and not logs.is_dir():
        raise EdgeKitError(f"--tensorboard {logs} is a file; expected a directory for TensorBoard's event files.")
    existing = next((p for p in (logs, *logs.resolve().parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise EdgeKitError(f"--tensorboard {logs}: {existing} is not writable; choose a directory you can write.")


if __name__ == "__main__":
    sys.exit(run_cli(main))
