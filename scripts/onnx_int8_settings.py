"""Which onnxruntime static-quantization settings make int8 faster than float for small PyTorch CNNs on this CPU?

    python scripts/onnx_int8_settings.py                      # the committed PyTorch fixtures, 1 thread
    python scripts/onnx_int8_settings.py --models cnn_opset17 --runs 400 --rounds 7
    python scripts/onnx_int8_settings.py --models cnn3.pt2    # a .pt2 program, exported as export does (torch extra)

For each committed PyTorch ONNX fixture (tests/fixtures/torch/: the digits CNN from the legacy and the dynamo
exporters, the 3-channel CNN with ImageNet's mean and std), every combination of QDQ or QOperator, per-channel
or per-tensor weights, the activation and weight types, `reduce_range`, and the first and last nodes kept float
is quantized as export does (`export.convert.calibration_stride`, 300 training images with the split seed) and
run in a bare onnxruntime session, as a user's app runs it, with the float file, at 1 thread (batch 1): the
latency ratio int8/float (median of per-round medians over interleaved rounds) and the accuracy on the digits
test split. Each session's graph optimization level is also tried (all, extended, basic) on float and int8 alike.
A `.pt2` program (versions.json's "programs": `cnn3.pt2`, the larger CNN, 7.4 million MACs) is made into its
float ONNX file as `python -m export --onnx --layout nchw` makes it (torch.onnx.export's dynamo exporter), NCHW.
Prints one table per model, the settings ranked by their worst ratio over the models, and the figures as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.datasets import SPLIT_SEED, load_dataset  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "torch"
MODELS = ("cnn_opset17", "cnn_dynamo", "rgb_imagenet")


def _normalized(pixels: np.ndarray, mean, std) -> np.ndarray:
    x = (pixels.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _images(name: str, meta: dict):
    data = load_dataset("digits")
    x_train = data.x_train  # uint8 pixels, (N, H, W, 1)
    channels = 3 if name.startswith("rgb_imagenet") else 1

    def pixels(x):
        return np.repeat(x, 3, axis=3) if channels == 3 else x

    order = np.random.default_rng(SPLIT_SEED).permutation(len(x_train))[:300]
    calibration = _normalized(pixels(x_train[np.sort(order)]), meta["mean"], meta["std"])
    return calibration, _normalized(pixels(data.x_test), meta["mean"], meta["std"]), data.y_test


def _quantize(source: str, target: str, calibration: np.ndarray, setting: dict) -> None:
    """export's own onnx_int8 (its calibration, 300 images in strides) with the setting's scheme."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType

    from export.convert import onnx_int8

    model = onnx.load(source)
    nodes = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    types = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}
    scheme = {"quant_format": QuantFormat.QDQ if setting["format"] == "QDQ" else QuantFormat.QOperator,
              "per_channel": setting["per_channel"], "reduce_range": setting["reduce_range"],
              "activation_type": types[setting["activations"]], "weight_type": types[setting["weights"]]}
    exclude = [nodes[0], nodes[-1]] if setting["exclude_ends"] and len(nodes) > 2 else ()
    Path(target).write_bytes(onnx_int8(model, calibration, "minmax", {}, exclude=exclude, scheme=scheme))


def _program_onnx(name: str, tmp: str) -> str:
    """A .pt2 fixture's float ONNX file, NCHW, made by export's own path (export/torch_source.py)."""
    from export.torch_source import load_source
    from runtime.backends.model import Options

    source, _ = load_source(FIXTURES / name, "digits", None, Options(None, None, None, None, "nchw"), trust=False)
    proto, _ = source.onnx({}, None)
    path = os.path.join(tmp, name.replace(".pt2", ".onnx"))
    Path(path).write_bytes(proto.SerializeToString())
    return path


def _session(path: str, level: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _accuracy(session, x, y) -> float:
    name = session.get_inputs()[0].name
    out = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return float(np.mean(out.argmax(1) == y))


def _latencies(sessions: dict, x: np.ndarray, rounds: int, runs: int) -> dict:
    """Median of per-round medians (ms) for each session, the sessions interleaved in every round."""
    medians = {key: [] for key in sessions}
    feeds = {key: {s.get_inputs()[0].name: x[:1]} for key, s in sessions.items()}
    for key, s in sessions.items():
        for _ in range(50):
            s.run(None, feeds[key])
    clock = time.perf_counter
    for r in range(rounds):
        keys = list(sessions)
        np.random.default_rng(r).shuffle(keys)
        for key in keys:
            s, feed, times = sessions[key], feeds[key], []
            for _ in range(20):
                s.run(None, feed)
            for _ in range(runs):
                start = clock()
                s.run(None, feed)
                times.append(clock() - start)
            medians[key].append(statistics.median(times) * 1e3)
    return {key: statistics.median(m) for key, m in medians.items()}


SETTINGS = [dict(zip(("format", "per_channel", "activations", "weights", "reduce_range", "exclude_ends"), values))
            for values in itertools.product(("QDQ", "QOperator"), (True, False), ("s8", "u8"), ("s8", "u8"),
                                            (False, True), (False, True))
            if not (values[2] == "s8" and values[3] == "u8")]  # int8 activations with uint8 weights: not a kernel


def _key(setting: dict) -> str:
    return (f"{setting['format']} {'per-channel' if setting['per_channel'] else 'per-tensor'} "
            f"A{setting['activations']}W{setting['weights']}{' reduce_range' if setting['reduce_range'] else ''}"
            f"{' ends-float' if setting['exclude_ends'] else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", metavar="FILE", help="write every figure here too")
    args = parser.parse_args()
    recorded = json.loads((FIXTURES / "versions.json").read_text())
    meta = {**recorded["models"], **recorded["programs"]}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            calibration, x_test, y_test = _images(name, meta[name])
            source = _program_onnx(name, tmp) if name.endswith(".pt2") else str(FIXTURES / f"{name}.onnx")
            files = {}
            for setting in SETTINGS:
                target = os.path.join(tmp, f"{name}-{len(files)}.onnx")
                try:
                    _quantize(source, target, calibration, setting)
                    files[_key(setting)] = target
                except Exception as exc:  # noqa: BLE001 -- onnxruntime's refusal is a finding
                    print(f"{name}: {_key(setting)}: not made ({type(exc).__name__}: {str(exc)[:120]})")
            rows = figures[name] = {}
            for level in ("all", "extended", "basic"):
                sessions = {"float": _session(source, level)}
                sessions.update({key: _session(path, level) for key, path in files.items()})
                latency = _latencies(sessions, x_test, args.rounds, args.runs)
                for key, session in sessions.items():
                    if level == "all" or key == "float":
                        accuracy = _accuracy(session, x_test, y_test)
                    else:
                        accuracy = rows[f"{key} @all"]["accuracy"]
                    rows[f"{key} @{level}"] = {"ms": latency[key], "ratio": latency[key] / latency["float"],
                                               "accuracy": accuracy, "test_images": len(y_test)}
            print(f"\n{name} ({len(y_test)} test images, 1 thread, batch 1; ratio = int8 / float at the same level)")
            for key, row in sorted(rows.items(), key=lambda kv: kv[1]["ratio"]):
                print(f"  {key:<58} {row['ms']:.4f} ms  {row['ratio']:.2f}x  {row['accuracy']:.2%}")
    ranked = {}
    for name, rows in figures.items():
        for key, row in rows.items():
            if not key.startswith("float"):
                ranked.setdefault(key, []).append(row["ratio"])
    print("\nsettings ranked by their worst int8/float ratio over the models:")
    for key, ratios in sorted(ranked.items(), key=lambda kv: max(kv[1]))[:15]:
        print(f"  {key:<58} worst {max(ratios):.2f}x  best {min(ratios):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
