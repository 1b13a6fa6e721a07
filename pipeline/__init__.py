"""The main job: train, optimize, export, verify, benchmark and report, in one command.

    python -m pipeline                                   # fashion_cnn on digits, every default variant
    python -m pipeline --model mobilenet --dataset fashion_mnist --data-dir ~/data/fashion
    python -m pipeline --quick                           # a small smoke run

This package sits above the four stages and may use all of them; none of them uses it.
"""

from pipeline.run import Plan, run
from runtime.vocabulary import VARIANTS

__all__ = ["VARIANTS", "Plan", "run"]
