"""`python -m runtime`: TensorFlow-free commands for artifacts and models."""

from __future__ import annotations

import argparse
import json
import sys

from runtime.errors import EdgeKitError, run_cli


def _info(args) -> int:
    from runtime.manifest import read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    problems = verify_files(args.artifact, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, "intact": not problems, "problems": problems}, indent=2))
    else:
        metrics = manifest["metrics"]
        lines = [
            ("name", manifest["name"]),
            ("kind", manifest["kind"]),
            ("model", manifest["model"]),
            ("dataset", manifest["dataset"]["name"] if isinstance(manifest["dataset"], dict) else manifest["dataset"]),
            ("parent", manifest["parent"] or "-"),
            ("created", manifest["created"]),
            ("input shape", "x".join(str(v) for v in manifest["input_shape"])),
            ("labels", ", ".join(manifest["labels"])),
            ("test accuracy", f"{metrics['accuracy']:.2%}"),
            ("size", f"{metrics['size_bytes']:,} bytes"),
        ]
        if "params" in metrics:
            lines.append(("parameters", f"{metrics['params']:,}"))
        lines.append(("files", ", ".join(manifest["files"])))
        lines.append(("checksums", "all match" if not problems else "; ".join(problems)))
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key:<{width}}  {value}")
    if problems:
        raise EdgeKitError(f"{args.artifact} is damaged: {'; '.join(problems)}. Re-create it with the stage that wrote it.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime",
        description="EdgeKit's TensorFlow-free runtime: inspect artifacts, and load, run and benchmark models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="show an artifact's manifest and verify its files' checksums",
                               description="Show what an artifact directory holds and check every file "
                                           "against the sha256 in its manifest (exit 2 if any differs).")
    info.add_argument("artifact", help="artifact directory (holding manifest.json)")
    info.add_argument("--json", action="store_true", help="print the manifest and the check as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
