"""`python -m export`: write TFLite and ONNX files from an artifact or a Keras model, each verified."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from export.api import export
from export.settings import check_settings
from export.source import file_kind
from runtime.arguments import add_normalization
from runtime.errors import EXIT_FAILED, ArgumentParser, EdgeKitError, run_cli, suggest
from runtime.limits import size_argument
from runtime.text import terminal
from runtime.vocabulary import EXPORT_ALL, get_format

TFLITE_QUANTIZE = {None: "float32", "float32": "float32", "float16": "float16", "dynamic": "dynamic",
                   "int8": "int8", "int16x8": "int16x8"}
ONNX_QUANTIZE = {None: "onnx-float32", "float32": "onnx-float32", "int8": "onnx-int8"}
EPILOG = """\
examples:
  python -m export --tflite artifacts/cnn                      # model.float32.tflite
  python -m export --tflite --quantize int8 artifacts/cnn      # full integer, calibrated on 300 train images
  python -m export --onnx artifacts/cnn                        # model.onnx-float32.onnx
  python -m export --onnx --quantize int8 artifacts/cnn        # QDQ int8 via onnxruntime
  python -m export --all artifacts/cnn                         # all seven formats
  python -m export --micro --max-ram 256KiB --max-flash 1MiB artifacts/cnn   # a microcontroller's file
  python -m export --tflite --quantize int8 --explain artifacts/cnn      # which layers int8 hurts
  python -m export --tflite --quantize int8 --keep-float auto artifacts/cnn   # int8, or int8-mixed within budget
  python -m export --onnx --quantize int8 --keep-float dense_1 artifacts/cnn  # onnx-int8-mixed, dense_1 float
  python -m export --tflite model.keras --dataset digits       # a bare Keras file
  python -m export --micro resnet8.h5 --dataset cifar10 --mean 0 --std 1   # one that takes raw 0..255 pixels
  python -m export --micro model_int8.tflite --dataset cifar10              # a fully integer .tflite, for TFLM
  python -m export --onnx --quantize int8 model.onnx --dataset digits --mean 127.5 --std 127.5
                                              # a PyTorch file: model-export/, float32 and int8 verified
  python -m export --all --micro model.pt2 --dataset digits --mean 127.5 --std 127.5
                                              # a PyTorch program (torch.export.save): TFLite, TFLM, ONNX

formats (--format KEY): float32, float16, dynamic, int8, int16x8 (TFLite); onnx-float32 (or onnx), onnx-int8;
micro (--micro: int8 for TensorFlow Lite Micro, with model.micro.cc/.h; not part of --all unless --micro).
Every file is loaded with EdgeKit's runtime and compared with the Keras model on the whole test
split, by one rule. Float (float32, onnx): every output within 1e-4 + 1e-3 x |Keras output|.
Quantized (float16, dynamic, int8, int16x8, onnx-int8): accuracy at most --max-accuracy-drop
points below Keras (default 1.0) and top-1 agreement with Keras at least 95%; the output fidelity
(SQNR in dB, cosine) is recorded. Files go next to the model (or --out) with a sidecar
model.<variant>.json that records the figures and the rule.
A QAT/PQAT/CQAT artifact exports to int8 alone, fully integer: from its learned ranges, or, where
they leave float operators (layers tfmot does not support) or its recipe has --exclude, from the
weights QAT trained with calibrated activation ranges (recorded in the sidecar).
An artifact's files are checked against its manifest first. A model file that would run code
when loaded (a Lambda layer, a custom object, any SavedModel) is refused unless --trust-model.
Exit codes: 0 all verified; 1 a format failed (every format is still attempted, each failure
reported; a failed file is removed), the artifact is damaged, or the disk is full; 2 a usage
error (nothing was done).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m export", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Export a model to TFLite and ONNX, verifying every file.",
                                     epilog=EPILOG)
    parser.add_argument("source", help="artifact directory, a .keras/.h5 file or SavedModel directory, an .onnx "
                                       "or .tflite file, or a .pt2 program (torch.export.save)")
    kinds = parser.add_argument_group("what to write")
    kinds.add_argument("--tflite", action="store_true", help="a TFLite file (float32 unless --quantize)")
    kinds.add_argument("--onnx", action="store_true", help="an ONNX file (float32 unless --quantize int8)")
    kinds.add_argument("--quantize", help="TFLite: float16, dynamic, int8, int16x8; ONNX: int8")
    kinds.add_argument("--format", action="append", default=[], metavar="KEY", help="a format by key (repeatable)")
    kinds.add_argument("--all", action="store_true",
                       help="every format the source makes (int8 only for a QAT artifact; an .onnx file's ONNX "
                            "formats, a .tflite file's quantized ones, a .pt2 program's seven)")
    kinds.add_argument("--micro", action="store_true",
                       help="a microcontroller file (format micro): int8 for TensorFlow Lite Micro, verified in its "
                            "interpreter, with model.micro.cc and .h (C array, op resolver) and the arena measured; "
                            "needs the micro extra")
    kinds.add_argument("--max-ram", type=size_argument("--max-ram"), metavar="SIZE",
                       help="with --micro: refuse a file whose tensor arena exceeds SIZE (256KiB, 1MiB, bytes)")
    kinds.add_argument("--max-flash", type=size_argument("--max-flash"), metavar="SIZE",
                       help="with --micro: refuse a file larger than SIZE (its flash)")
    parser.add_argument("--out", help="output directory (default: the artifact directory itself)")
    parser.add_argument("--calibration-samples", type=int, default=300,
                        help="training images used to calibrate integer formats (default: 300; at most the "
                             "training split, and the number used is recorded)")
    parser.add_argument("--calibration-method", help="onnx-int8 only: minmax (default), entropy, percentile")
    parser.add_argument("--opset", type=int, help="ONNX opset, 13 to 18 (default: 17, tf2onnx's; a .pt2 program's "
                                                  "ONNX file: torch.onnx.export's, 20)")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                        help="quantized formats: the accuracy budget, in points below the Keras model (default 1.0)")
    selective = parser.add_argument_group("selective int8 (TFLite int8 and onnx-int8)")
    selective.add_argument("--explain", action="store_true",
                           help="rank the Keras layers by what int8 costs: validation accuracy gained when a layer "
                                "and its consumers stay float (and, TFLite, its output's per-channel SQNR); printed, "
                                "and saved as sensitivity.<format>.json and .png beside the exports")
    selective.add_argument("--keep-float", metavar="LAYERS|auto",
                           help="keep these Keras layers (comma-separated) float in an int8 file, written as the "
                                "format int8-mixed (onnx-int8-mixed); 'auto': write plain int8 if it meets the "
                                "budget, else keep the fewest most sensitive layers float until it does")
    parser.add_argument("--sparse", action="store_true",
                        help="a pruned model's float32, dynamic and int8 files in the converter's sparse encoding "
                             "when that makes them 1%% smaller. Such a file needs EdgeKit's runtime on the device "
                             "(it densifies them at load): bare LiteRT's XNNPACK refuses a sparse int8 or dynamic "
                             "file, and its sidecar, info and the report say so. Default: dense files, which run "
                             "in any LiteRT")
    parser.add_argument("--dataset", help="for a bare model file: dataset giving preprocessing, labels, data")
    foreign = parser.add_argument_group(
        "a model file from elsewhere: .keras, .h5, SavedModel, .onnx (PyTorch's torch.onnx.export, any exporter), "
        ".tflite, or .pt2 (PyTorch's torch.export.save)",
        "--dataset gives its labels, test and calibration images; --mean and --std say how pixels become its input "
        "as it was trained (without them the dataset's own scaling is fed, and export says so; a model scoring "
        "under twice chance on the test split is refused: its preprocessing is most likely another). An .onnx "
        "file exports to onnx-float32 and onnx-int8 (onnx-int8-mixed with --keep-float NODE,... by ONNX node "
        "name), each verified against the source file run by onnxruntime; an opset below 13 is upgraded first; "
        "external data (model.onnx.data) must be beside the file; no TFLite file is made from ONNX. --layout is "
        "for an .onnx file (a Keras model takes NHWC). A .pt2 file (torch.export.save; the torch extra) exports to "
        "float32, int8 (PT2E), dynamic, float16 and --micro by litert-torch, and to onnx-float32 and onnx-int8 by "
        "torch.onnx.export, each verified against the program run by torch; its files take NHWC images, or the "
        "program's own NCHW with --layout nchw; it is loaded without running pickled code unless --trust-model.")
    add_normalization(foreign)
    foreign.add_argument("--allow-untrained", action="store_true",
                         help="export a model that scores under twice chance on the test split (an untrained "
                              "architecture, for its size and speed); its files are verified against it all the same")
    parser.add_argument("--data-dir", help="where the dataset files are")
    parser.add_argument("--trust-model", action="store_true",
                        help="load a model file even if loading runs code (Lambda layers, custom objects, a "
                             "SavedModel): only for files you trust, as Hugging Face's trust_remote_code")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--verbose", action="store_true", help="on an error, show its original cause")
    return parser


def chosen_formats(args) -> list[str]:
    """The format keys the command line asks for (--all: every format of the menu this source makes)."""
    if args.all:  # every format of the menu that this source makes (a model file from elsewhere makes some)
        kind = file_kind(Path(args.source))
        return [*(k for k in EXPORT_ALL if kind is None or kind in get_format(k).sources),
                *(["micro"] if args.micro else [])]
    keys = list(args.format) + (["micro"] if args.micro else [])
    for flag, table in (("tflite", TFLITE_QUANTIZE), ("onnx", ONNX_QUANTIZE)):
        if getattr(args, flag):
            if args.quantize not in table:
                valid = [k for k in table if k]
                raise EdgeKitError(f"--{flag} takes --quantize {', '.join(valid)}; got '{args.quantize}'."
                                   f"{suggest(args.quantize, valid)}")
            keys.append(table[args.quantize])
    if args.quantize and not (args.tflite or args.onnx):
        raise EdgeKitError("--quantize needs --tflite or --onnx, e.g. `--tflite --quantize int8`.")
    if not keys:
        raise EdgeKitError("nothing to export; pass --tflite, --onnx, --micro, --format KEY or --all.")
    return list(dict.fromkeys(keys))


def _differing(ref: dict) -> str:
    """What the micro check found of the images whose TFLM outputs are not bit-equal to LiteRT's reference."""
    differing = ref.get("differing")
    if not differing:
        return ""
    if differing["rounding_alone"] == differing["examined"] == differing["images"]:
        grown = (f", grown to {ref['max_lsb']} steps at the output through the later layers"
                 if ref.get("grown_from_rounding") else "")
        return (f"; the other {differing['images']} differ only by FULLY_CONNECTED's rounding{grown}, both "
                f"recomputed exactly ({differing['why']})")
    return (f"; the other {differing['images']} at most {ref['max_lsb']} step apart, first in "
            f"{', '.join(differing['first_operator'])} ({differing['rounding_alone']} of {differing['examined']} "
            f"examined by FULLY_CONNECTED's rounding alone)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = chosen_formats(args)

    keep_float = None if args.keep_float is None else "auto" if args.keep_float.strip() == "auto" else [
        name.strip() for name in args.keep_float.split(",") if name.strip()]
    check_settings(keys, calibration_samples=args.calibration_samples, opset=args.opset,
                   calibration_method=args.calibration_method, max_accuracy_drop=args.max_accuracy_drop,
                   keep_float=keep_float, explain=args.explain)  # before TensorFlow loads
    results = export(args.source, keys, args.out, calibration_samples=args.calibration_samples,
                     opset=args.opset, calibration_method=args.calibration_method, dataset=args.dataset,
                     data_dir=args.data_dir, progress=None if args.quiet else
                     (lambda s: print(s, flush=True)), trust=args.trust_model,
                     max_accuracy_drop=args.max_accuracy_drop, keep_float=keep_float, explain=args.explain,
                     mean=args.mean, std=args.std, layout=args.layout, sparse=args.sparse,
                     max_ram=args.max_ram, max_flash=args.max_flash, allow_untrained=args.allow_untrained)
    float_size = next((r.figures["size_bytes"] for r in results if get_format(r.format).kind == "float" and r.passed),
                      None)
    width = max([10, *(len(r.format) for r in results)])
    print(f"\n{'format':<{width}} {'size':>10} {'gzip':>10} {'vs float':>8} {'max diff':>9} {'SQNR dB':>8} "
          f"{'agree':>7} {'accuracy':>9}  status")
    for r in results:
        f = r.figures
        if not f or "max_abs_diff" not in f:
            print(f"{r.format:<{width}} {'-':>10} {'-':>10} {'-':>8} {'-':>9} {'-':>8} {'-':>7} {'-':>9}  FAILED: {r.message}")
            continue
        ratio = f"{f['size_bytes'] / float_size:.2f}x" if float_size else "-"
        status = "verified" if r.passed else f"FAILED: {r.message}"
        print(f"{r.format:<{width}} {f['size_bytes']:>10,} {f['gzip_bytes']:>10,} {ratio:>8} {f['max_abs_diff']:>9.2e} "
              f"{f['sqnr_db']:>8.1f} {f['agreement']:>7.2%} {f['accuracy']:>9.2%}  {status}")
    for r in results:
        bare = r.figures.get("bare") if r.passed else None
        if bare and not bare["passed"]:
            print(f"{r.format}: needs EdgeKit's runtime on the device ({terminal(bare['reason'])})")
        micro = r.figures.get("micro") if r.passed else None
        if micro:
            ref = micro["reference"]
            print(f"{r.format}: tensor arena {micro['arena_bytes']:,} bytes (RAM, measured by TFLM), flash "
                  f"{micro['flash_bytes']:,} bytes, {micro['macs']:,} MACs per inference; operators "
                  f"{', '.join(micro['operators'])}; TFLM vs LiteRT's reference kernels: {ref['bit_equal_images']} of "
                  f"{ref['images']} images bit-equal{_differing(ref)}")
    checked = [r for r in results if r.passed and (r.figures.get("bare") or {}).get("passed")]
    if checked:
        runtimes = "; ".join(dict.fromkeys(r.figures["bare"]["runtime"] for r in checked))
        print(f"verified also as the user's own app runs them ({runtimes}; one image per call): "
              f"{', '.join(r.format for r in checked)}")
    if results and results[0].figures:
        print(f"(accuracy on {results[0].figures['test_samples']} test images; "
              f"{results[0].figures.get('reference', 'Keras')}: {results[0].figures['keras_accuracy']:.2%})")
    written = [r for r in results if r.passed]
    if written:
        print(f"\nwrote {', '.join(str(r.file) for r in written)}")
        print(f"next: python -m runtime eval {written[0].file}\n      python -m runtime bench "
              f"{written[0].file.parent}")
    failed = [r for r in results if not r.passed]
    if failed:
        print(f"error: {len(failed)} of {len(results)} export(s) failed: {'; '.join(r.message for r in failed)}",
              file=sys.stderr)
        if args.verbose:
            for r in failed:
                if r.error is not None and (r.error.__cause__ or r.error.__context__):
                    print(f"{r.format} caused by:", file=sys.stderr)
                    traceback.print_exception(r.error.__cause__ or r.error.__context__, file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
