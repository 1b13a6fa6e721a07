"""Keep libraries' start-up chatter off the console (unless --verbose).

TensorFlow's C++ side writes lines such as `E0000 ... failed call to cuInit: ... (303)` and
`... NodeDef mentions attribute use_unbounded_threadpool ...` straight to file descriptor 2, before
and regardless of TF_CPP_MIN_LOG_LEVEL, and LiteRT prints `INFO: Created TensorFlow Lite XNNPACK
delegate for CPU.` on every first interpreter. None of it is an error of the user's. A CLI entry point
calls `filter_native_stderr()` once: descriptor 2 becomes a pipe, and a thread forwards everything
but those lines to the real stderr as it arrives (so progress bars still move). At exit the pipe is
drained first, so nothing written is lost.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

CHATTER = (
    b"failed call to cuInit",
    b"use_unbounded_threadpool",
    b"Created TensorFlow Lite XNNPACK delegate",
    b"absl::InitializeLog() is called are written to STDERR",
    b"Unable to register cuDNN factory", b"Unable to register cuFFT factory", b"Unable to register cuBLAS factory",
    b"computation placer already registered",
    b"This TensorFlow binary is optimized to use available CPU instructions",
    b"rebuild TensorFlow with the appropriate compiler flags",
    b"oneDNN custom operations are on",
    b"Could not find cuda drivers on your machine",
)
_PREFIXES = (b"E0000", b"W0000", b"I0000", b"INFO: ", b"WARNING: All log", b"To enable the following")
_installed = False


def _chatter(line: bytes) -> bool:
    return any(pattern in line for pattern in CHATTER)


def _held(tail: bytes) -> bool:
    """Whether an unfinished line may still turn out to be chatter (so it waits for its end)."""
    head = tail.lstrip(b"\r")
    return any(head.startswith(p) or p.startswith(head) for p in _PREFIXES) if head else False


def filter_native_stderr() -> None:
    """Route descriptor 2 through the chatter filter for the rest of the process (idempotent)."""
    global _installed
    if _installed:
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    restore = os.dup(real)
    _installed = True

    def pump():
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            out = b"".join(line + b"\n" for line in lines if not _chatter(line))
            if pending and not _held(pending):
                out, pending = out + pending, b""
            if out:
                _write_all(real, out)
        if pending and not _chatter(pending):
            _write_all(real, pending)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def drain():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(restore, 2)  # closes the pipe's last write end: the pump reads what is left, then stops
        thread.join(timeout=5)

    atexit.register(drain)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the console went away: nothing to tell it
        pass
