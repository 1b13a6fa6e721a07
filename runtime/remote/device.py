"""What a device is, and what EdgeKit reads of what it says.

Its identity (the board from the device tree, the CPU by name, EdgeKit's version), as every figure measured on it names it, and the checks every value a device sends goes through before EdgeKit holds it: a figure of its type and range, a text cut and escaped.
"""

from __future__ import annotations

import math
from importlib import metadata
from pathlib import Path

import runtime
from runtime.errors import WorkFailed
from runtime.text import terminal

DISTRIBUTION = "edgekit-ml"
MAX_TEXT = 300  # characters of any text a device sends that is printed
# ARM's CPU part numbers (implementer 0x41) in /proc/cpuinfo, which names no model on arm64; the Pi's cores first
ARM_PARTS = {0xb76: "ARM1176", 0xc07: "Cortex-A7", 0xc08: "Cortex-A8", 0xc09: "Cortex-A9", 0xc0f: "Cortex-A15",
             0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
             0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
             0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd41: "Cortex-A78", 0xd44: "Cortex-X1",
             0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd4b: "Cortex-A78C"}



class DeviceError(WorkFailed):
    """The device could not be reached, refused the login, or could not do the work (exit 1)."""


def edgekit_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return runtime.__version__


def board() -> str | None:
    """The board's name from the device tree ("Raspberry Pi 4 Model B Rev 1.4"), where Linux has one."""
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode("utf-8", "replace")[:200] or None
    except OSError:
        return None


def cpu_name(cpuinfo: str, fallback: str) -> str:
    """The CPU's model: x86's "model name", else ARM's part number by name (a Pi 4's 0xd08 is a Cortex-A72)."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    if fields.get("model name") and not fields["model name"].isdigit():
        return fields["model name"]
    try:
        if int(fields.get("cpu implementer", "0"), 16) == 0x41:
            part = int(fields.get("cpu part", ""), 16)
            if part in ARM_PARTS:
                return ARM_PARTS[part]
    except ValueError:
        pass
    return next((fields[k] for k in ("hardware", "model", "processor") if fields.get(k) and not fields[k].isdigit()),
                fallback)


def describe(info: dict, host: str | None = None) -> str:
    """'pi@raspberrypi (Raspberry Pi 4 Model B Rev 1.4, Cortex-A72, 4 cores, aarch64; Python 3.11.2, EdgeKit
    0.1.0)', every part escaped for a terminal."""
    parts = [info.get("board"), info.get("cpu"), f"{info.get('cores')} cores", info.get("machine")]
    what = ", ".join(terminal(p) for p in parts if p)
    versions = f"Python {terminal(info.get('python'))}, EdgeKit {terminal(info.get('edgekit'))}"
    return f"{terminal(host) + ' ' if host else ''}({what}; {versions})"


def device_record(info: dict, host: str) -> dict:
    """Where a figure was measured: the host as given and what the device said of itself."""
    return {"host": host, **{k: info.get(k) for k in ("machine", "cpu", "board", "cores", "python", "edgekit")}}


def add_device(rows: list[dict], info: dict, host: str) -> list[dict]:
    """Name the device in every row measured on it."""
    device = device_record(info, host)
    for row in rows:
        row["device"] = device
    return rows


# What a device may send, each figure with its type and range (anything else: one line, exit 1). Generous: a Pi
# Zero is slow and a server has many cores, but no figure is negative, infinite, or a 400-digit number.
MS = (float, 0.0, 1e7)  # milliseconds: up to about 3 hours
ROW_FIGURES = {"size_bytes": (int, 1, 2**40), "threads": (int, 1, 4096), "batch": (int, 1, 2**16),
               "warmup": (int, 0, 10**6), "load_ms": MS, "first_ms": MS, "overhead": (float, -1.0, 1e6),
               "throughput_ips": (float, 0.0, 1e9), "throughput_p50_ips": (float, 0.0, 1e9),
               "peak_rss_mb": (float, 0.0, 1e7)}
STAT_FIGURES = {"median": MS, "p90": MS, "p99": MS, "mean": MS, "std": MS, "min": MS, "n": (int, 1, 10**9)}
ROW_TEXT = ("name", "backend", "format", "input_dtype", "inputs", "one_image_path")
HELLO_TEXT = ("machine", "cpu", "board", "system", "python", "edgekit", "tmp")


def figure(value, kind: tuple) -> bool:
    """Whether a device's `value` is a figure of `kind` (type, low, high): an int where an int belongs (a float
    where a float does, an int accepted), finite, within the range."""

    want, low, high = kind
    if type(value) is bool or type(value) not in ((int,) if want is int else (int, float)):
        return False
    return math.isfinite(value) and low <= value <= high


def device_text(value, limit: int = 100) -> str:
    """A device's text for a table or a terminal: a string cut to `limit` characters, then escaped."""
    return terminal(value[:limit]) if isinstance(value, str) else "-"


def checked_hello(hello: dict) -> dict:
    """The hello with only what EdgeKit reads: its texts cut and escaped, its core count a number."""
    checked = {k: device_text(hello.get(k), 200) if hello.get(k) is not None else None for k in HELLO_TEXT}
    versions = hello.get("versions")
    checked["versions"] = ({device_text(k, 60): device_text(v, 60) for k, v in list(versions.items())[:60]}
                           if isinstance(versions, dict) else {})
    checked["cores"] = hello["cores"] if figure(hello.get("cores"), (int, 1, 4096)) else 1
    return checked
