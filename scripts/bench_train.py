#!/usr/bin/env python3
"""Training throughput: images per second per epoch, and time to a target accuracy, per registered model
and device layout, on a Fashion-MNIST-sized set (60,000 images of 28x28x1).

    python scripts/bench_train.py                                   # every model, cpu and cpu:2, 2 epochs
    python scripts/bench_train.py --models fashion_cnn --devices cpu,cpu:2 --steps-per-execution 1,16

The images are the 1,797 real digits (scikit-learn), shifted by up to 2 pixels and given Gaussian noise
to make 60,000 distinct ones: a learnable set of Fashion-MNIST's size, so that the time to reach the
target validation accuracy (on the real digits' validation split) means something; synthetic is fine
for a speed figure, not for an accuracy claim. Training is EdgeKit's own (train.trainer: the same
tf.data pipeline, shuffled, batched and prefetched in memory, the same compile and strategy). Each
(model, devices, steps per execution) runs in a fresh process, as `--devices cpu:N` requires. Epoch 1
includes tracing; "img/s" is the median of the later epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time


def synthetic(images: int, seed: int):
    import numpy as np

    from runtime.datasets import load_dataset

    digits = load_dataset("digits")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits.x_train), images)
    x = digits.x_train[pick].astype(np.int16)
    shifts = rng.integers(-2, 3, (images, 2))
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            rows = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            x[rows] = np.roll(x[rows], (dy, dx), axis=(1, 2))
    x += rng.normal(0, 12, x.shape).astype(np.int16)
    x = np.clip(x, 0, 255).astype(np.uint8)
    return dataclasses.replace(digits, x_train=x, y_train=digits.y_train[pick])


def worker(model_name: str, devices: str, steps: int, epochs: int, images: int, batch: int, target: float) -> dict:
    from train.backend import keras, tf
    from train.devices import strategy as make_strategy
    from train.models import create_model
    from train.trainer import compile_model, fit, seed_everything

    strategy, described = make_strategy(tf, devices)
    seed_everything(0)
    dataset = synthetic(images, 0)
    with strategy.scope():
        model = create_model(model_name, dataset.input_shape, dataset.num_classes)
        compile_model(model, 1e-3, steps)
    seconds, reached = [], None
    start = time.perf_counter()

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            nonlocal reached
            seconds.append(time.perf_counter() - self.t0)
            if reached is None and logs["val_accuracy"] >= target:
                reached = time.perf_counter() - start

    history = fit(model, dataset, epochs=epochs, batch_size=batch, seed=0, quiet=True, callbacks=[Clock()])
    later = sorted(seconds[1:]) or seconds
    return {"model": model_name, "devices": devices, "replicas": described["replicas"], "steps_per_execution": steps,
            "images": images, "batch": batch, "epoch_seconds": seconds,
            "images_per_second": images / later[len(later) // 2], "first_epoch_ips": images / seconds[0],
            "val_accuracy": history["val_accuracy"], "target": target, "seconds_to_target": reached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all",
                        help="comma-separated registered models (default: all but the Keras applications backbones)")
    parser.add_argument("--devices", default="cpu,cpu:2", help="comma-separated --devices layouts (default: cpu,cpu:2)")
    parser.add_argument("--steps-per-execution", default="1", help="comma-separated values (default: 1)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--images", type=int, default=60000, help="training images (default: 60000)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default: 32, train's default)")
    parser.add_argument("--target", type=float, default=0.95, help="validation accuracy to time (default: 0.95)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "DEVICES", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, devices, steps = args.worker
        print(json.dumps(worker(model, devices, int(steps), args.epochs, args.images, args.batch_size, args.target)))
        return 0
    from train.models import list_models

    from train.models import get_spec

    models = [n for n in list_models() if not get_spec(n).backbone] if args.models == "all" else args.models.split(",")
    layouts = args.devices.split(",")
    steps_list = [int(s) for s in args.steps_per_execution.split(",")]
    results = []
    print(f"{args.images} images 28x28x1, batch {args.batch_size}, {args.epochs} epochs; target val accuracy "
          f"{args.target:.0%}", flush=True)
    print(f"{'model':<12} {'devices':<8} {'spe':>4} {'img/s':>8} {'epoch 1 img/s':>14} {'to target':>10} "
          f"{'val acc':>8}", flush=True)
    for model in models:
        for devices in layouts:
            for steps in steps_list:
                command = [sys.executable, __file__, "--worker", model, devices, str(steps), "--epochs",
                           str(args.epochs), "--images", str(args.images), "--batch-size", str(args.batch_size),
                           "--target", str(args.target)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(f"{model:<12} {devices:<8} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(r)
                to_target = f"{r['seconds_to_target']:.0f} s" if r["seconds_to_target"] else "not reached"
                print(f"{model:<12} {devices:<8} {steps:>4} {r['images_per_second']:>8.0f} {r['first_epoch_ips']:>14.0f} "
                      f"{to_target:>10} {r['val_accuracy'][-1]:>8.2%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
