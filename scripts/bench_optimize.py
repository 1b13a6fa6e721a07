#!/usr/bin/env python3
"""Measure every optimization technique on one model, from the CLI, and print a table.

    python scripts/bench_optimize.py --model fashion_cnn --root artifacts/bench

Trains the model on digits (unless ROOT/MODEL exists), then runs prune 80%, 2:4,
cluster 16, qat, pqat (on the pruned) and cqat (on the clustered) with default
settings through `python -m optimize`, and prints accuracy, its change, sparsity,
unique values and gzip size per technique, as the issue's targets are stated.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEPS = [  # (name, parent, command arguments)
    ("pruned80", None, ["prune", "--sparsity", "0.8"]),
    ("2of4", None, ["prune", "--structured", "2:4"]),
    ("clustered16", None, ["cluster", "--clusters", "16"]),
    ("qat", None, ["qat"]),
    ("pqat", "pruned80", ["pqat"]),
    ("cqat", "clustered16", ["cqat"]),
]


def run(args):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion_cnn")
    parser.add_argument("--root", default="artifacts/bench")
    args = parser.parse_args()
    root = Path(args.root)
    base = root / args.model
    if not (base / "manifest.json").exists():
        seconds = run(["train", "--model", args.model, "--out", str(base), "--quiet"])
        print(f"trained {base} in {seconds:.0f}s", flush=True)
    parent_manifest = json.loads((base / "manifest.json").read_text())
    rows = [("trained", parent_manifest["metrics"]["accuracy"], 0.0, 0.0, "-",
             parent_manifest["metrics"]["size_bytes"], None, parent_manifest["training"]["train_seconds"])]
    for name, parent, command in STEPS:
        out = root / f"{args.model}-{name}"
        parent_dir = root / f"{args.model}-{parent}" if parent else base
        seconds = run(["optimize", *command, str(parent_dir), "--out", str(out), "--force", "--quiet"])
        m = json.loads((out / "manifest.json").read_text())["metrics"]
        rows.append((name, m["accuracy"], m["accuracy_change"], m["sparsity"], m["max_unique"], m["size_bytes"],
                     m["gzip_ratio_vs_parent"], seconds))
        print(f"{name} done in {seconds:.0f}s", flush=True)
    print(f"\n{args.model} on digits (test split: {parent_manifest['dataset']['split']['sizes']['test']} images)")
    print(f"{'variant':<12} {'accuracy':>9} {'change':>8} {'sparsity':>9} {'unique':>7} {'bytes':>10} "
          f"{'gzip/parent':>12} {'time':>6}")
    for name, acc, change, sparsity, unique, size, ratio, seconds in rows:
        ratio_text = f"{ratio:.3f}" if ratio is not None else "-"
        print(f"{name:<12} {acc:>9.2%} {change * 100:>+7.2f}p {sparsity:>9.3f} {unique!s:>7} {size:>10,} "
              f"{ratio_text:>12} {seconds:>5.0f}s")


if __name__ == "__main__":
    main()
