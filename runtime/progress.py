"""One progress bar per long step, on stderr (tqdm, imported lazily: without it, steps run silently)."""

from __future__ import annotations

import sys


def bar(iterable, total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "file"):
    """`iterable`, wrapped in a tqdm bar when `enabled` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)
