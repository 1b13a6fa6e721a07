"""`python -m optimize TECHNIQUE PARENT --out DIR`: prune, cluster or quantization-aware train an artifact."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimize.api import run
from optimize.recipes import RECIPES
from runtime.arguments import add_normalization
from runtime.artifacts.manifest import MANIFEST, check_out_apart, lineage_paths, read_manifest
from runtime.errors import ArgumentParser, EdgeKitError, run_cli, unknown
from runtime.fsutil import check_output_dir, sha256_file
from runtime.vocabulary import TECHNIQUES
from train.foreign import import_model
from train.safe_load import KERAS_SUFFIXES

EPILOG = """\
examples:
  python -m optimize prune --sparsity 0.8 artifacts/cnn --out artifacts/cnn-pruned80
  python -m optimize prune --structured 2:4 artifacts/cnn --out artifacts/cnn-2of4
  python -m optimize cluster --clusters 16 artifacts/cnn --out artifacts/cnn-clustered16
  python -m optimize qat artifacts/cnn --out artifacts/cnn-qat
  python -m optimize pqat artifacts/cnn-pruned80 --out artifacts/cnn-pqat
  python -m optimize cqat artifacts/cnn-clustered16 --out artifacts/cnn-cqat
  python -m optimize prune resnet8.h5 --dataset cifar10 --mean 0 --std 1 --out runs/mine/resnet8-pruned80
                                  # a Keras file from elsewhere: imported as runs/mine/resnet8 first

The dataset, split and preprocessing come from the parent's manifest; the new manifest
records the recipe, the parent, accuracy on the same test split, measured sparsity and
unique values per layer, and gzip size against the parent's.
"""


def _common(parser, epochs, lr):
    parser.add_argument("parent", help="artifact directory to optimize (from python -m train or optimize), or a "
                                       "Keras model file from elsewhere (.keras, .h5) with --dataset")
    parser.add_argument("--out", help="artifact directory to write (default: PARENT-TECHNIQUE)")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"fine-tuning epochs (default: {epochs})")
    parser.add_argument("--lr", type=float, default=lr, help=f"fine-tuning Adam learning rate (default: {lr:g})")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--exclude", action="append", default=[], metavar="LAYER",
                        help="layer name or glob to leave untouched, e.g. 'logits' or 'block1_*' (repeatable); "
                             "after qat, pqat or cqat that layer alone is float in the int8 export")
    parser.add_argument("--data-dir", help="where the parent's dataset files are, if they moved")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out (never the parent or any "
                                                                 "of its ancestors)")
    parser.add_argument("--trust-model", action="store_true",
                        help="load the parent's model even if loading runs code (Lambda layers, custom objects)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--verbose", action="store_true", help="on an error, show its original cause")

    foreign = parser.add_argument_group(
        "a Keras model file from elsewhere",
        "Imported first as an artifact beside --out, named after the file (train/foreign.py: nested models "
        "flattened, so a layer inside a sub-model is optimized too; evaluated on --dataset's test split; refused "
        "under twice chance, most likely other preprocessing), then optimized like a trained model.")
    foreign.add_argument("--dataset", help="the dataset it was trained on: digits, mnist, fashion_mnist, cifar10 or "
                                           "folder:PATH (labels, splits, fine-tuning data)")
    add_normalization(foreign)
    foreign.add_argument("--allow-untrained", action="store_true",
                         help="take a model that scores under twice chance as it is")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m optimize", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Optimize an EdgeKit artifact with tensorflow-model-optimization.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="technique", metavar="TECHNIQUE")
    for name, help_text in TECHNIQUES.items():
        recipe = RECIPES[name]()
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common(sub, recipe.epochs, recipe.lr)
        if name == "prune":
            sub.add_argument("--sparsity", type=float, default=None,
                             help="target fraction of zeros in each pruned kernel, 0 to 1 (default: 0.8)")
            sub.add_argument("--structured", metavar="M:N",
                             help="structured sparsity instead, e.g. 2:4 (Conv2D/Dense, along input channels)")
        if name == "cluster":
            sub.add_argument("--clusters", type=int, default=recipe.clusters,
                             help="shared values per kernel, 2 to 256 (default: 16)")
            sub.add_argument("--init", default="linear", help="centroid init: linear, kmeans++, density, random")
        if name == "cqat":
            sub.add_argument("--preserve-sparsity", dest="preserve_sparsity", action=argparse.BooleanOptionalAction,
                             default=None, help="also keep zeros (default: when the parent has them)")
    return parser


def _suffix(recipe) -> str:
    """Default output name: cnn -> cnn-pruned80, cnn-2of4, cnn-clustered16, cnn-qat."""
    technique = recipe.technique.value
    if technique == "prune" and recipe.structured:
        return "{}of{}".format(*recipe.m_by_n)
    if technique == "prune":
        return f"pruned{round(recipe.sparsity * 100)}"
    if technique == "cluster":
        return f"clustered{recipe.clusters}"
    return technique


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in TECHNIQUES:
        raise unknown("technique", argv[0], TECHNIQUES)
    args = parser.parse_args(argv)
    if args.technique is None:
        parser.print_help()
        return 2

    settings = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                "exclude": tuple(args.exclude)}
    if args.technique == "prune":
        settings.update(sparsity=args.sparsity, structured=args.structured)
    elif args.technique == "cluster":
        settings.update(clusters=args.clusters, init=args.init)
    elif args.technique == "cqat":
        settings.update(preserve_sparsity=args.preserve_sparsity)
    recipe = RECIPES[args.technique](**settings)  # validates before TensorFlow is imported
    parent = Path(args.parent)

    if parent.suffix.lower() in KERAS_SUFFIXES and not parent.is_dir():
        out = Path(args.out) if args.out else parent.with_name(f"{parent.stem}-{_suffix(recipe)}")
        parent = _imported(parent, out, args)
    elif args.dataset or args.mean is not None or args.std is not None or args.layout or args.allow_untrained:
        raise EdgeKitError(f"--dataset, --mean, --std, --layout and --allow-untrained are for a Keras model file from "
                           f"elsewhere; {parent} is an artifact, whose manifest records them.")
    out = Path(args.out) if args.out else parent.with_name(f"{parent.name}-{_suffix(recipe)}")
    # clear errors for a missing or non-artifact parent, or an --out in its lineage, before the slow imports
    check_out_apart(out, lineage_paths(parent, read_manifest(parent)))
    check_output_dir(out, args.force)

    manifest = run(parent, recipe, out, force=args.force, quiet=args.quiet, data_dir=args.data_dir,
                   trust=args.trust_model)
    m = manifest["metrics"]
    facts = [f"sparsity {m['sparsity']:.3f}" if args.technique in ("prune", "pqat") else None,
             f"max unique values per kernel {m['max_unique']}" if args.technique in ("cluster", "cqat") else None]
    print(f"test accuracy {m['accuracy']:.2%} ({m['accuracy_change'] * 100:+.2f} points vs parent); "
          + "; ".join(f for f in facts if f) + ("; " if any(facts) else "")
          + (f"gzip {m['gzip_bytes'] / 1024:.0f} KiB ({m['gzip_ratio_vs_parent']:.2f}x parent)"
             if "qat_weights_bytes" not in m else "quantization-aware: its int8 export is the file to ship"))
    skipped = manifest["facts"]["skipped"]
    by_reason = {}
    for layer, why in skipped.items():
        by_reason.setdefault(why, []).append(layer)
    for why, layers in by_reason.items():  # a backbone skips dozens of layers for one reason: a line per reason
        named = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more (facts.skipped in {out}/manifest.json)"
                                          if len(layers) > 4 else "")
        print(f"left as they were ({why}): {named}")
    print(f"wrote {out}/")
    export = "--tflite --quantize int8" if "qat_weights_bytes" in m else "--all"
    print(f"next: python -m export {export} {out}")
    print(f"      python -m runtime info {out}")
    return 0


def _imported(path, out, args):
    """The artifact of the Keras file `path`, beside `out` and named after the file: made now, or an earlier
    import of the same file (its sha256) with the same dataset and preprocessing reused."""

    if not args.dataset:
        raise EdgeKitError(f"{path} is a bare model file, so its labels, splits and fine-tuning data are unknown; "
                           "pass --dataset NAME (and --mean/--std as it was trained).")
    if args.layout:
        raise EdgeKitError("--layout is for an .onnx file; a Keras model takes channels-last (NHWC) input.")
    artifact = out.parent / path.stem
    if (artifact / MANIFEST).is_file():
        manifest = read_manifest(artifact)
        source = manifest.get("source") or {}
        if manifest.get("kind") == "imported" and source.get("sha256") == sha256_file(path):
            print(f"{path.name}: imported earlier as {artifact}/ (test accuracy {manifest['metrics']['accuracy']:.2%})")
            return artifact
        raise EdgeKitError(f"{artifact} exists and is not an import of {path.name}; choose another --out directory.")

    manifest = import_model(path, args.dataset, artifact, data_dir=args.data_dir, mean=args.mean, std=args.std,
                            trust=args.trust_model, allow_untrained=args.allow_untrained)
    flattened = " (nested models flattened)" if manifest["source"]["nested_models_flattened"] else ""
    print(f"{path.name}: imported as {artifact}/{flattened}, test accuracy {manifest['metrics']['accuracy']:.2%} on "
          f"{sum(map(sum, manifest['metrics']['confusion']))} images")
    return artifact


if __name__ == "__main__":
    sys.exit(run_cli(main))
