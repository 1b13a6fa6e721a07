"""One progress bar per long step, on stderr (tqdm, imported lazily: without it, steps run silently)."""

from __future__ import annotations

import sys
import threading


def bar(iterable, total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "file"):
    """`iterable`, wrapped in a tqdm bar when `enabled` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


class Ticking:
    """A step that cannot report its own progress (onnxruntime's quantizer, one call of minutes on a large graph),
    shown alive: `desc`, a note the step may set (`note`), and the time elapsed, redrawn every second on stderr.
    Nothing appears for a step shorter than `delay` seconds; when not `enabled` or without tqdm, nothing at all.

        with Ticking("onnx-int8: quantizing 10,002 nodes in onnxruntime") as tick:
            ...; tick.note("calibration 120/300"); ...
    """

    def __init__(self, desc: str, delay: float = 5.0, enabled: bool = True):
        self.desc, self.delay, self.enabled = desc, delay, enabled
        self._bar = None
        self._stop = None

    def __enter__(self) -> "Ticking":
        if not self.enabled:
            return self
        try:
            from tqdm import tqdm
        except ImportError:
            return self
        self._bar = tqdm(total=None, desc=self.desc, bar_format="{desc}{postfix} [{elapsed}]", file=sys.stderr,
                         delay=self.delay, dynamic_ncols=True, leave=True)
        self._stop = threading.Event()
        threading.Thread(target=self._redraw, daemon=True).start()
        return self

    def _redraw(self) -> None:
        if self._stop.wait(self.delay):  # done before the delay: nothing was shown
            return
        while True:
            self._bar.refresh()
            if self._stop.wait(1.0):
                return

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._stop.set()
            self._bar.close()
