"""What the converter's sparse encoding buys a pruned model: file size, gzip size and latency of each TFLite
format written dense and sparse, from the same artifact, measured together in interleaved rounds.

    python scripts/bench_sparse.py runs/fashion_cnn-digits/fashion_cnn-pruned50 runs/fashion_cnn-digits/fashion_cnn-pruned80 \
        runs/fashion_cnn-digits/fashion_cnn-2of4 --threads 1 --seconds 4

Each artifact is exported twice into a temporary directory (the default, dense, and `export --sparse`) to
float32, dynamic and int8, every file verified as export verifies it, in EdgeKit's runtime and in bare LiteRT
(its default options, XNNPACK: the sidecar's `bare`); then every file is benchmarked through EdgeKit's whole
`predict` on one image (runtime.bench.measure_rounds: one fresh process, rounds interleaved, the median of round
medians with its 95% interval). The sparse files run densified there (runtime/sparse.py); the table says whether
bare LiteRT runs each sparse file at all.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ["float32", "dynamic", "int8"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0, help="benchmark time per file, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    from export import export
    from runtime.bench import run_rounds_worker
    from runtime.stats import median_interval

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in args.artifacts:
            for dense in (True, False):
                out = Path(tmp) / f"{artifact.name}-{'dense' if dense else 'sparse'}"
                for result in export(artifact, FORMATS, out, sparse=not dense, progress=None):
                    if not result.passed:
                        print(f"{artifact.name} {result.format}: {result.message}", file=sys.stderr)
                        return 1
                    rows.append({"artifact": artifact.name, "format": result.format,
                                 "encoding": "dense" if dense else "sparse", "file": result.file,
                                 "accuracy": result.figures["accuracy"],
                                 "bare": "runs" if result.figures["bare"]["passed"] else "refused"})
        measured = run_rounds_worker([r["file"] for r in rows], args.threads, args.rounds, None, args.seconds)
        for r in rows:
            median, low, high = median_interval(measured[str(r["file"])]["round_medians_ms"])
            data = Path(r["file"]).read_bytes()
            r.update(size=len(data), gzip=len(gzip.compress(data, 9, mtime=0)), ms=median, low=low, high=high)
    print(f"| artifact | format | dense bytes | sparse bytes | sparse/dense | gzip dense | gzip sparse | "
          f"EdgeKit dense ms ({args.threads}t) | EdgeKit sparse ms | bare LiteRT, sparse | accuracy dense / sparse |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for artifact in args.artifacts:
        for fmt in FORMATS:
            d, s = (next(r for r in rows if r["artifact"] == artifact.name and r["format"] == fmt
                         and r["encoding"] == e) for e in ("dense", "sparse"))
            print(f"| {artifact.name} | {fmt} | {d['size']:,} | {s['size']:,} | {s['size'] / d['size']:.2f}x | "
                  f"{d['gzip']:,} | {s['gzip']:,} | {d['ms']:.3f} ({d['low']:.3f}-{d['high']:.3f}) | "
                  f"{s['ms']:.3f} ({s['low']:.3f}-{s['high']:.3f}) | {s['bare']} | "
                  f"{d['accuracy']:.2%} / {s['accuracy']:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
