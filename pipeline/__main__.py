"""`python -m pipeline`: train, optimize, export, verify, benchmark and report in one command."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.run import FLOAT_FORMATS, QUICK, Pipeline, Plan, run
from pipeline.search import run_search
from pipeline.space import parse_techniques
from runtime.arguments import add_normalization
from runtime.bench import parse_threads
from runtime.errors import EdgeKitError
from runtime.remote.session import add_arguments as add_device_arguments, target
from runtime.vocabulary import DEFAULT_VARIANTS, MAX_ACCURACY_DROP, VARIANTS
from train.models import model_list

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ log, errors included: exceptions carry them

from runtime.artifacts.manifest import DEVICE_RUNTIMES
from runtime.errors import ArgumentParser, run_cli
from runtime.limits import size_argument


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    variants = "\n".join(f"  {v.name:<12} {v.summary}" for v in VARIANTS.values())
    parser = ArgumentParser(
        prog="python -m pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="EdgeKit's main job. Train a model, derive the optimized variants, export each to the formats "
                    "that make sense for it, verify every file against its Keras model, evaluate and benchmark "
                    "each with the TensorFlow-free runtime, and write the accuracy-vs-size-vs-latency report "
                    "(report.md, .csv, .json and two plots) into the output directory. A rerun skips every stage "
                    "whose artifacts are complete and valid, and redoes the rest.",
        epilog=f"models (default fashion_cnn; as python -m train):\n{model_list()}\n\n"
               f"variants (default: {','.join(DEFAULT_VARIANTS)}):\n{variants}\n\n"
               f"formats (default: {','.join(FLOAT_FORMATS)}; int8 only for the QAT variants)\n\n"
               f"--quick: {QUICK['epochs']} training epochs, {QUICK['finetune_epochs']} fine-tuning epochs, variants "
               f"{','.join(QUICK['variants'])}, formats {','.join(QUICK['formats'])}, {QUICK['runs']} timed calls per "
               "file and round; into runs/<model>-<dataset>-quick.\n\n"
               "examples:\n"
               "  python -m pipeline                                  # fashion_cnn on digits, offline\n"
               "  python -m pipeline --quick                          # a smoke run in about a minute\n"
               "  python -m pipeline --model mobilenet --variants pruned80,qat\n"
               "  python -m pipeline --dataset fashion_mnist --data-dir ~/data/fashion   # IDX files there\n"
               "  python -m pipeline --search --objective gzip --trials 16   # the smallest file within 1 point\n"
               "  python -m pipeline --from resnet8.h5 --dataset cifar10 --mean 0 --std 1   # a model you have")
    parser.add_argument("--model", help="a registered model (listed below; default fashion_cnn)")
    parser.add_argument("--from", dest="source", metavar="MODEL",
                        help="a Keras model file from elsewhere (.keras, .h5) as the base model, instead of training "
                             "one: imported (nested models flattened, evaluated on --dataset with --mean/--std), "
                             "then the whole menu and the report as for a trained model")
    parser.add_argument("--dataset", default="digits",
                        help="digits (default, embedded), mnist, fashion_mnist, cifar10 or folder:PATH")
    parser.add_argument("--data-dir", help="where the dataset's files are (IDX .gz, CIFAR batches)")
    parser.add_argument("--variants", type=_csv, default=DEFAULT_VARIANTS, metavar="LIST",
                        help="optimized variants, comma-separated; 'none' for the trained model only")
    parser.add_argument("--formats", type=_csv, metavar="LIST", help="export formats, comma-separated")
    parser.add_argument("--out", help="output directory (default: runs/<model>-<dataset>)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (see below)")
    parser.add_argument("--epochs", type=int, help="training epochs at most (default 40; early stopping ends sooner)")
    parser.add_argument("--finetune-epochs", type=int, metavar="N",
                        help="fine-tuning epochs of every optimization (default: each technique's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and fine-tuning (default 0)")
    parser.add_argument("--threads", metavar="LIST", help="benchmark thread counts (default 1,all)")
    parser.add_argument("--bench-seconds", type=float, default=0.5, metavar="S",
                        help="benchmark time per file and thread count, above 0 and at most 3600 (default 0.5)")
    parser.add_argument("--no-bench", action="store_true", help="skip latency measurements")
    parser.add_argument("--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP, metavar="POINTS",
                        help="the accuracy budget in points below the float model: export fails a quantized file "
                             "further below its Keras model, and the report marks a file further below the float "
                             f"baseline as over budget, never recommended (default {MAX_ACCURACY_DROP:g})")
    micro = parser.add_argument_group(
        "microcontrollers", "Every variant is also exported for TensorFlow Lite Micro (format micro: verified in its "
        "interpreter, arena measured, C sources beside it; the micro extra), and the report answers for a "
        "microcontroller: the micro file with the smallest tensor arena within every budget.")
    micro.add_argument("--target", choices=("micro",), help="micro: make and report microcontroller files")
    micro.add_argument("--max-ram", type=size_argument("--max-ram"), metavar="SIZE",
                       help="the board's RAM for the tensor arena (256KiB, 1MiB, bytes); implies --target micro")
    micro.add_argument("--max-flash", type=size_argument("--max-flash"), metavar="SIZE",
                       help="the board's flash for the model; implies --target micro")
    parser.add_argument("--runtime", choices=DEVICE_RUNTIMES, default="litert",
                        help="what runs the file on the device: litert (default), the user's own LiteRT or "
                             "onnxruntime app, so every file is written to run there (dense); edgekit, EdgeKit's "
                             "runtime installed there, so a pruned model's files are written sparse (smaller; it "
                             "densifies them at load) and may be recommended")
    parser.add_argument("--objective", choices=("size", "gzip", "latency", "arena"),
                        help="what the report's recommendation answers first, and what the search minimizes: the "
                             "smallest file (size), the smallest download (gzip), the fastest at 1 thread "
                             "(latency) or a microcontroller's smallest tensor arena (arena: every trial a micro file); "
                             "default size, gzip with --search (where pruning's gain shows), arena with --target micro")
    search = parser.add_argument_group("search (Optuna): the best file within the budget, beyond the fixed menu")
    search.add_argument("--search", action="store_true",
                        help="search the recipe space (technique, its settings, fine-tuning epochs, format) for the "
                             "smallest or fastest file within --max-accuracy-drop, instead of the fixed variants")
    search.add_argument("--techniques", metavar="LIST",
                        help="search only these techniques (comma-separated: none, prune, prune24, cluster, qat, pqat, "
                             "cqat; default all); another set is another study")
    search.add_argument("--trials", type=int, default=16, metavar="N",
                        help="finished trials of the whole study, all workers together (default 16)")
    search.add_argument("--timeout", type=float, metavar="S", help="stop starting trials after S seconds")
    search.add_argument("--storage", metavar="URL", default=os.environ.get("EDGEKIT_STORAGE") or None,
                        help="the study's storage: a SQLAlchemy URL (postgresql+psycopg2://..., mysql://...) shared by "
                             "machines that run the same command with a shared --out (default: $EDGEKIT_STORAGE, "
                             "which keeps a password off the command line, else search.db, SQLite, in the run "
                             "directory); its password is never printed or written")
    search.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes on this machine (default 1)")
    search.add_argument("--heartbeat", type=int, default=10, metavar="S",
                        help="a worker silent for 3 x S seconds is taken for dead and its trial run again (default 10)")
    search.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    add_device_arguments(parser, "Measure the report's latency on the device (training, export and accuracy stay "
                                 "here; a search's trials are timed here too).")

    foreign = parser.add_argument_group("--from: how pixels become the model's input, as it was trained")
    add_normalization(foreign)
    foreign.add_argument("--allow-untrained", action="store_true",
                         help="take a --from model that scores under twice chance on the test split as it is")
    parser.add_argument("--force", action="store_true", help="start over: delete the output directory's results")
    parser.add_argument("--verbose", action="store_true", help="show every epoch and every export step")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    device = target(args)
    if device and args.no_bench:
        raise EdgeKitError("--host measures latency on the device; it has nothing to do with --no-bench.")
    if device and args.search and args.objective == "latency":
        raise EdgeKitError("--search --objective latency times its trials on this machine, not on --host; search "
                           "for size or gzip, or run the search here and `runtime report DIR --host` after it.")
    variants = () if args.variants == ("none",) or args.search else args.variants
    if args.source and args.model:
        raise EdgeKitError("give --model (a registered model, trained here) or --from (a model file you have), not "
                           "both.")
    plan = Plan(model=args.model or "fashion_cnn", dataset=args.dataset, data_dir=args.data_dir, variants=variants,
                formats=args.formats or (("float32",) if args.search else None), out=args.out, quick=args.quick,
                epochs=args.epochs,
                finetune_epochs=args.finetune_epochs, seed=args.seed,
                threads=parse_threads(args.threads) if args.threads and not device else None,
                bench_seconds=args.bench_seconds, bench=not args.no_bench, max_accuracy_drop=args.max_accuracy_drop,
                objective=args.objective or ("arena" if args.target or args.max_ram or args.max_flash else
                                             "gzip" if args.search else "size"),
                target=args.target or ("micro" if args.objective == "arena" else None), max_ram=args.max_ram,
                max_flash=args.max_flash, runtime=args.runtime, source=args.source, mean=args.mean, std=args.std,
                allow_untrained=args.allow_untrained)
    if args.layout:
        raise EdgeKitError("--layout is for an .onnx file; a Keras model takes channels-last (NHWC) input.")
    if args.search:
        argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--worker"]
        report = run_search(Pipeline(plan, force=args.force and not args.worker, verbose=args.verbose,
                                     device=device, threads_text=args.threads),
                            objective=plan.objective, trials=args.trials, timeout=args.timeout, storage=args.storage,
                            jobs=args.jobs, heartbeat=args.heartbeat, argv=argv, worker=args.worker,
                            techniques=parse_techniques(args.techniques))
        return 0
    report = run(plan, force=args.force, verbose=args.verbose, device=device, threads_text=args.threads)
    return 1 if report["failed_stages"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
