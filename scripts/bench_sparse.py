"""What the converter's sparse encoding buys a pruned model: file size, gzip size and latency of each TFLite
format written dense and sparse, from the same artifact, measured together in interleaved rounds.

    python scripts/bench_sparse.py runs/fashion_cnn-digits/fashion_cnn-pruned50 runs/fashion_cnn-digits/fashion_cnn-pruned80 \
        runs/fashion_cnn-digits/fashion_cnn-2of4 --threads 1 --seconds 4

Each artifact is exported twice into a temporary directory (the default, dense, and `export --sparse`) to
float32, dynamic and int8, every file verified as export verifies it, in EdgeKit's runtime and in bare LiteRT
(its default options, XNNPACK: the sidecar's `bare`); then every file is benchmarked through EdgeKit's whole
`predict` on one image (runtime.bench.measure_rounds: one fresh process, rounds interleaved, the median of round
medians with its 95% interval). The sparse files run densified there (runtime/backends/sparse.py). Bare LiteRT is timed
too, as a user's own app runs the file (Interpreter(model_path), default options, one image per invoke: invoke
only, its median over rounds): the dense file with XNNPACK; the sparse file, which XNNPACK refuses to prepare,
with LiteRT's builtin kernels (BUILTIN_WITHOUT_DEFAULT_DELEGATES), the only way plain LiteRT runs it.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ["float32", "dynamic", "int8"]


def bare_litert_ms(path: Path, tensor, threads: int, seconds: float, rounds: int, builtin: bool):
    """Bare LiteRT's invoke time of one input: (median, low, high) of the round medians, or None when it refuses."""
    import time

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from runtime.stats import median_interval

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin else OpResolverType.AUTO
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]["index"]
        interpreter.set_tensor(source, tensor)
        interpreter.invoke()
    except RuntimeError:
        return None
    medians = []
    for _ in range(rounds):
        times, end = [], time.perf_counter() + seconds / rounds
        while time.perf_counter() < end or len(times) < 5:
            interpreter.set_tensor(source, tensor)
            start = time.perf_counter()
            interpreter.invoke()
            times.append((time.perf_counter() - start) * 1000)
        medians.append(sorted(times)[len(times) // 2])
    return median_interval(medians)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0, help="benchmark time per file, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import json

    import runtime
    from export import export
    from runtime.bench import run_rounds_worker
    from runtime.datasets import load_for_manifest
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
        images = {a.name: load_for_manifest(json.loads((a / "manifest.json").read_text())).x_test[:1]
                  for a in args.artifacts}
        for r in rows:
            tensor = runtime.load(r["file"]).input_tensors(images[r["artifact"]])
            r["bare_ms"] = bare_litert_ms(r["file"], tensor, args.threads, args.seconds, args.rounds, builtin=False)
            if r["bare_ms"] is None:
                r["builtin_ms"] = bare_litert_ms(r["file"], tensor, args.threads, args.seconds, args.rounds, True)
        for r in rows:
            median, low, high = median_interval(measured[str(r["file"])]["round_medians_ms"])
            data = Path(r["file"]).read_bytes()
            r.update(size=len(data), gzip=len(gzip.compress(data, 9, mtime=0)), ms=median, low=low, high=high)
    def ms(figures) -> str:
        return "refused" if figures is None else f"{figures[0]:.3f} ({figures[1]:.3f}-{figures[2]:.3f})"

    print(f"| artifact | format | dense bytes | sparse bytes | sparse/dense | gzip dense | gzip sparse | "
          f"EdgeKit dense ms ({args.threads}t) | EdgeKit sparse ms | bare LiteRT dense ms | bare LiteRT sparse "
          f"(default: XNNPACK) | bare LiteRT sparse, builtin kernels ms | accuracy dense / sparse |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for artifact in args.artifacts:
        for fmt in FORMATS:
            d, s = (next(r for r in rows if r["artifact"] == artifact.name and r["format"] == fmt
                         and r["encoding"] == e) for e in ("dense", "sparse"))
            print(f"| {artifact.name} | {fmt} | {d['size']:,} | {s['size']:,} | {s['size'] / d['size']:.2f}x | "
                  f"{d['gzip']:,} | {s['gzip']:,} | {d['ms']:.3f} ({d['low']:.3f}-{d['high']:.3f}) | "
                  f"{s['ms']:.3f} ({s['low']:.3f}-{s['high']:.3f}) | {ms(d['bare_ms'])} | "
                  f"{s['bare']}{'' if s['bare_ms'] is None else ': ' + ms(s['bare_ms'])} | "
                  f"{ms(s.get('builtin_ms')) if s['bare_ms'] is None else '-'} | "
                  f"{d['accuracy']:.2%} / {s['accuracy']:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
