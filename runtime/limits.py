"""The bounds every command holds its numbers to: one checked parser per kind of number.

A thread count, a worker count or a replica count above the cores this process may run on buys nothing
and can cost the machine (a million interpreter threads crash LiteRT; a hundred search workers exhaust
memory), so each is bounded by `cores()`. A divisor that normalizes pixels must be a positive normal
number: a subnormal one (1e-45) turns every pixel into an infinity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

from runtime.errors import EdgeKitError

# the smallest positive normal float32: a std below it makes (pixel - mean) / std overflow or lose every bit
MIN_NORMAL = 1.1754944e-38
# JSON from outside (a manifest, a sidecar, a device's answer, a host's request) nests at most this deep: EdgeKit's
# own deepest is 5 (a manifest's metrics), and Python's parser meets 200,000 '[' with a RecursionError
MAX_JSON_DEPTH = 64
# preprocessed input past this is no image (float32 holds 3.4e38; the interpreters' arithmetic needs headroom)
MAX_INPUT = 1e6


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def whole(value, what: str, low: int = 1, high: int | None = None, why: str = "") -> int:
    """`value` as a whole number in [low, high], or one line saying what was expected."""
    number = value  # a whole number, not a str, float or bool that looks like one (the CLI parses its text first)
    if type(number) is not int or number < low or (high is not None and number > high):
        limit = f"from {low} to {high}{why}" if high is not None else f"of {low} or more"
        raise EdgeKitError(f"{what} takes a whole number {limit}; got {value!r}.")
    return number


def threads(value, what: str = "--threads") -> int:
    """A thread count, at most this machine's cores."""
    return whole(value, what, 1, cores(), f" (the cores this process may use: {cores()})")


def positive_normal(values, what: str) -> tuple[float, ...]:
    """Each value a positive normal float32 (a std, a scale): not 0, negative, subnormal, inf or NaN."""
    for v in values:
        if not (type(v) in (int, float) and math.isfinite(v) and MIN_NORMAL <= v):
            raise EdgeKitError(f"{what} must be a positive normal number (at least {MIN_NORMAL:.4g}, it divides); "
                               f"got {v!r}.")
    return tuple(float(v) for v in values)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}


def size_bytes(text, flag: str) -> int:
    """A memory size as microcontroller datasheets give it: '256KiB', '1MiB', '32kB' or plain bytes."""

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if not found or unit not in _UNITS or float(found.group(1)) * _UNITS[unit] < 1:
        raise EdgeKitError(f"{flag} takes a size such as 256KiB, 1MiB, 32kB or a number of bytes; got {text!r}.")
    return int(float(found.group(1)) * _UNITS[unit])


def size_text(n: int) -> str:
    """'256 KiB (262,144 bytes)'."""
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.4g} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_loads(data: str | bytes):
    """`json.loads` of untrusted text, nested at most MAX_JSON_DEPTH deep; anything else (bad JSON, too deep) is a
    json.JSONDecodeError, a ValueError, so one `except ValueError` holds every way it can be wrong."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # only then can it be too deep: walk its brackets
        depth = 0
        for token in _JSON_TOKENS.finditer(raw):
            bracket = token.group()
            if bracket in (b"[", b"{"):
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", token.start())
            elif bracket in (b"]", b"}"):
                depth -= 1
    try:
        return json.loads(raw)
    except RecursionError:  # cannot happen after the walk; kept so that no input reaches past this function
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", 0) from None


def size_argument(flag: str):
    """An argparse type for size_bytes (--max-ram, --max-flash)."""
    def parse(text: str) -> int:
        try:
            return size_bytes(text, flag)
        except EdgeKitError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(flag + " ")) from None
    return parse
