"""The statistics EdgeKit's figures are stated in, from scipy.stats (imported lazily: a plain runtime install
on a device has no scipy; `pip install '.[report]'` in EdgeKit's repository adds it).

- an accuracy: k correct of n test images, with its 95% Wilson score interval;
- a change of accuracy between two files judged on the same images: the exact McNemar test, a two-sided
  binomial test on the discordant pairs (images exactly one of the two gets right);
- a latency: the median of per-round medians, with the distribution-free 95% interval of the median
  (order statistics, `scipy.stats.quantile_test`), so one file is faster than another only when the
  intervals separate.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import EdgeKitError

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # a change is significant when its p-value is below this


def _scipy_stats():
    try:
        import scipy.stats
    except ImportError:
        raise EdgeKitError("the report's statistics need scipy, which is not installed here; install it with "
                           "`pip install '.[report]'` in EdgeKit's repository (or `pip install scipy`).") from None
    return scipy.stats


def accuracy_interval(correct: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of `correct` out of `total`."""
    if total <= 0:
        raise EdgeKitError(f"an accuracy needs at least one test image; got {total}.")
    ci = _scipy_stats().binomtest(int(correct), int(total)).proportion_ci(CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(first_correct, second_correct) -> dict:
    """Exact McNemar test of two classifiers on the same images (boolean arrays: was image i right).

    Returns the discordant counts (`first_only`: images only the first gets right, `second_only`) and the
    two-sided p-value; with no discordant image the two are indistinguishable (p = 1)."""
    first, second = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
    if first.shape != second.shape:
        raise EdgeKitError(f"McNemar's test compares predictions on the same images; got {first.shape[0]} and "
                           f"{second.shape[0]} images.")
    first_only, second_only = int(np.sum(first & ~second)), int(np.sum(second & ~first))
    discordant = first_only + second_only
    p = 1.0 if discordant == 0 else float(_scipy_stats().binomtest(first_only, discordant, 0.5).pvalue)
    return {"first_only": first_only, "second_only": second_only, "p_value": min(p, 1.0)}


def median_interval(values) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and its distribution-free 95% interval. With fewer than
    six values no interval reaches 95%; then it is the whole range (min, max)."""
    values = np.sort(np.asarray(values, float))
    if not len(values):
        raise EdgeKitError("a median needs at least one measurement.")
    median = float(np.median(values))
    if len(values) < 6:
        return median, float(values[0]), float(values[-1])
    ci = _scipy_stats().quantile_test(values, p=0.5).confidence_interval(CONFIDENCE)
    return median, float(ci.low), float(ci.high)
