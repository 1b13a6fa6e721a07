"""`python -m optimize TECHNIQUE PARENT --out DIR`: prune, cluster or quantization-aware train an artifact."""

from __future__ import annotations

import argparse
import sys

from runtime.errors import ArgumentParser, run_cli, unknown

TECHNIQUES = {
    "prune": "magnitude pruning to --sparsity (polynomial decay), or --structured 2:4; then stripped",
    "cluster": "weight clustering to --clusters shared values per kernel; then stripped",
    "qat": "quantization-aware training (int8 weights and activations)",
    "pqat": "pruning-preserving QAT: keeps a pruned parent's zeros",
    "cqat": "cluster-preserving QAT: keeps a clustered parent's shared values",
}
EPILOG = """\
examples:
  python -m optimize prune --sparsity 0.8 artifacts/cnn --out artifacts/cnn-pruned80
  python -m optimize prune --structured 2:4 artifacts/cnn --out artifacts/cnn-2of4
  python -m optimize cluster --clusters 16 artifacts/cnn --out artifacts/cnn-clustered16
  python -m optimize qat artifacts/cnn --out artifacts/cnn-qat
  python -m optimize pqat artifacts/cnn-pruned80 --out artifacts/cnn-pqat
  python -m optimize cqat artifacts/cnn-clustered16 --out artifacts/cnn-cqat

The dataset, split and preprocessing come from the parent's manifest; the new manifest
records the recipe, the parent, accuracy on the same test split, measured sparsity and
unique values per layer, and gzip size against the parent's.
"""


def _common(parser, epochs, lr):
    parser.add_argument("parent", help="artifact directory to optimize (from python -m train or optimize)")
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


def build_parser() -> argparse.ArgumentParser:
    from optimize.recipes import ClusterRecipe, CQATRecipe, PQATRecipe, PruneRecipe, QATRecipe

    parser = ArgumentParser(
        prog="python -m optimize", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Optimize an EdgeKit artifact with tensorflow-model-optimization.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="technique", metavar="TECHNIQUE")
    defaults = {"prune": PruneRecipe, "cluster": ClusterRecipe, "qat": QATRecipe, "pqat": PQATRecipe,
                "cqat": CQATRecipe}
    for name, help_text in TECHNIQUES.items():
        recipe = defaults[name]()
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
    from pathlib import Path

    from optimize.recipes import RECIPES

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
    out = Path(args.out) if args.out else parent.with_name(f"{parent.name}-{_suffix(recipe)}")
    from runtime.fsutil import check_output_dir
    from runtime.manifest import read_manifest

    from runtime.manifest import check_out_apart, lineage_paths

    # clear errors for a missing or non-artifact parent, or an --out in its lineage, before the slow imports
    check_out_apart(out, lineage_paths(parent, read_manifest(parent)))
    check_output_dir(out, args.force)

    from optimize.api import run

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


if __name__ == "__main__":
    sys.exit(run_cli(main))
