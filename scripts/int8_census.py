"""Are the int8 files of QAT, PQAT and CQAT fully integer? Op and tensor-type census of each, per model.

    python scripts/int8_census.py [--models fashion_cnn,resnet,resnet20,mobilenet] [--techniques qat,pqat,cqat]
    python scripts/int8_census.py --models mobilenet_v2,mobilenet_v3_small,efficientnet_b0 --techniques qat

For every model named (trained one epoch on 96 digits images; a Keras applications backbone on them
resized to 32x32 RGB, MobileNetV2 at alpha 0.35, MobileNetV3Small at 0.75), converts the post-training int8
file and each technique's int8 file as export makes it (from the learned ranges; calibrated from the weights
QAT trained when the learned ranges leave float operators), and prints: where the activation ranges came
from, file size, size against post-training int8, the operators, tensor dtypes and float operators (a fully
integer file has none). CQAT on the deeper
models takes minutes (tfmot's cluster-preserving graph is slow to fine-tune and convert).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fashion_cnn,resnet,resnet20,mobilenet")
    parser.add_argument("--techniques", default="qat,pqat,cqat")
    args = parser.parse_args()
    from runtime.datasets import load_dataset
    from runtime.load import tflite_census
    from test_qat_int8 import SMALL_ARGS, int8_files
    from train.models import get_spec

    SMALL_ARGS.update(mobilenet_v2={"alpha": 0.35}, mobilenet_v3_small={"alpha": 0.75})

    def small(backbone):
        digits = load_dataset("digits", **({"image_size": (32, 32), "channels": 3} if backbone else {}))
        return dataclasses.replace(digits, x_train=digits.x_train[:96], y_train=digits.y_train[:96],
                                   x_val=digits.x_val[:32], y_val=digits.y_val[:32])

    print("| model | file | activation ranges | bytes | vs int8 | float ops | dtypes | ops |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        files, records = int8_files(name, small(bool(get_spec(name).backbone)), args.techniques.split(","))
        for technique, data in files.items():
            census = tflite_census(data)
            ops = ", ".join(f"{op} {n}" for op, n in sorted(census["ops"].items()))
            ranges = "calibrated" if technique == "plain" or records[technique] else "learned"
            print(f"| {name} | {technique} | {ranges} | {len(data):,} | {len(data) / len(files['plain']):.3f} | "
                  f"{len(census['float_ops'])} | {census['dtypes']} | {ops} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
