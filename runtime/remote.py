"""A device reached over SSH: files copied there, checked by sha256, run by the device's own EdgeKit, results
brought back, nothing left behind.

    python -m runtime bench model.int8.tflite --host pi@raspberrypi.local
    python -m runtime eval model.int8.tflite --host pi@raspberrypi.local --remote-python /home/pi/venv/bin/python

The system's OpenSSH client does the connecting, so the user's ~/.ssh/config, agent and known_hosts apply; it
runs with BatchMode=yes (never a password prompt) and never accepts a host key by itself. On the device,
`python -m runtime.remote agent` (this module) talks to the host over the session's stdin and stdout, one JSON
object a line:

    device -> host   {"hello": {...}}                      what the device is (machine, CPU, board, versions)
    host -> device   {"files": [{name, size, sha256}], "dir": DIR|null}, then the files' bytes in that order
    device -> host   {"stored": N}
    host -> device   {"run": ["runtime.remote", "bench"|"classes"|"rounds", SPEC], "timeout": S}
    device -> host   {"progress": LINE}..., then {"done": {"returncode", "stdout", "stderr"}}
    host -> device   {"bye": true}, or end of input
    device -> host   {"error": ..., "kind": ...} at any point, and the agent exits 1

The agent makes a private directory (mode 0700) under DIR (default the device's TMPDIR): the files go in its
`uploads/`, and a job runs with its working directory in the empty `run/` and its TMPDIR in `tmp/`, so nothing the
host sent is ever on a job's import path (`python -m` puts the working directory first; PYTHONSAFEPATH too on
Python 3.11+); a job reaches the files by name through EDGEKIT_UPLOADS, and only those. The agent runs EdgeKit's
three jobs and nothing else. It removes its directory when the host says bye, when its input ends (the host was
interrupted or killed, the connection dropped) and on any error (a refused request, a line that is not the
protocol, JSON nested too deep, any exception: one error message, exit 1), and kills a running job's process group
first. What the device sends back is untrusted too: every line is bounded before it is held (stdout and stderr
alike), every figure checked for type and range, and text escaped before it reaches a terminal or a spreadsheet.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from runtime.errors import EdgeKitError, WorkFailed
from runtime.text import terminal

DISTRIBUTION = "edgekit-ml"
MAX_LINE = 32 * 2**20  # one protocol line (a bench's JSON, an eval's predictions) is far smaller
MAX_FILES = 1000  # files in one request (a report's run sends a few dozen)
MAX_STDERR = 2**16  # bytes of the device's stderr kept (ssh's and the shell's messages: why it failed)
MAX_TEXT = 300  # characters of any text a device sends that is printed
UPLOADS = "uploads"  # the agent's directory for the host's files, beside the job's empty working directory
UPLOADS_ENV = "EDGEKIT_UPLOADS"  # where a job finds them
HELLO_SECONDS = 120  # a Pi Zero imports numpy in a few seconds; an agent that says nothing in 2 minutes is hung
BYE_SECONDS = 30
SPACE_MARGIN = 2**20
# ARM's CPU part numbers (implementer 0x41) in /proc/cpuinfo, which names no model on arm64; the Pi's cores first
ARM_PARTS = {0xb76: "ARM1176", 0xc07: "Cortex-A7", 0xc08: "Cortex-A8", 0xc09: "Cortex-A9", 0xc0f: "Cortex-A15",
             0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
             0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
             0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd41: "Cortex-A78", 0xd44: "Cortex-X1",
             0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd4b: "Cortex-A78C"}


class DeviceError(WorkFailed):
    """The device could not be reached, refused the login, or could not do the work (exit 1)."""


def edgekit_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import runtime

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


def device_info() -> dict:
    """What this machine is, as the agent says hello: `runtime.bench.machine()`, the board, EdgeKit's version."""
    from runtime.bench import machine

    return {**machine(), "board": board(), "edgekit": edgekit_version(), "python": sys.version.split()[0],
            "tmp": tempfile.gettempdir()}


def describe(info: dict, host: str | None = None) -> str:
    """'pi@raspberrypi (Raspberry Pi 4 Model B Rev 1.4, Cortex-A72, 4 cores, aarch64; Python 3.11.2, EdgeKit
    0.1.0)', every part escaped for a terminal."""
    parts = [info.get("board"), info.get("cpu"), f"{info.get('cores')} cores", info.get("machine")]
    what = ", ".join(terminal(p) for p in parts if p)
    versions = f"Python {terminal(info.get('python'))}, EdgeKit {terminal(info.get('edgekit'))}"
    return f"{terminal(host) + ' ' if host else ''}({what}; {versions})"


# --- the host's side ------------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where to run: the options of `--host`."""

    host: str
    port: int | None = None
    identity: str | None = None
    options: list[str] = field(default_factory=list)
    python: str = "python3"
    directory: str | None = None
    allow_version_mismatch: bool = False

    def __post_init__(self):
        bad = [c for c in self.host if c.isspace() or ord(c) < 32 or c == "\x7f"]
        if not self.host or self.host.startswith("-") or bad:
            raise EdgeKitError(f"--host takes [USER@]HOST (a name from ~/.ssh/config, a host name or an address); "
                               f"got {self.host!r}.")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise EdgeKitError(f"--port takes a TCP port from 1 to 65535; got {self.port}.")
        if self.identity is not None:
            from runtime.artifacts.manifest import check_readable_file

            check_readable_file(self.identity, "--identity key")
        for option in self.options:
            if "=" not in option and " " not in option.strip() or option.startswith("-") or "\n" in option:
                raise EdgeKitError(f"--ssh-option takes one ssh_config option as KEY=VALUE, passed to ssh as -o "
                                   f"(e.g. ConnectTimeout=5); got {option!r}.")
        if not self.python or "\n" in self.python or "\0" in self.python:
            raise EdgeKitError(f"--remote-python takes the device's Python as a path or a command name; got "
                               f"{self.python!r}.")

    @property
    def name(self) -> str:
        return self.host + (f":{self.port}" if self.port else "")

    def ssh_command(self, remote: str) -> list[str]:
        """The ssh command line: BatchMode first (ssh keeps an option's first value), then the user's options,
        then defaults they may override."""
        command = ["ssh", "-T", "-e", "none", "-o", "BatchMode=yes"]
        if self.port:
            command += ["-p", str(self.port)]
        if self.identity:
            command += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        for option in self.options:
            command += ["-o", option]
        command += ["-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                    "-o", "ClearAllForwardings=yes", "--", self.host, remote]
        return command


def add_arguments(parser, what: str) -> None:
    """--host and its options, on bench, eval, report and pipeline."""
    group = parser.add_argument_group(
        "on a device over SSH",
        f"{what} Reached with the system's ssh (your ~/.ssh/config, agent and known_hosts apply; BatchMode, so "
        "never a password prompt, and an unknown or changed host key is refused). The device needs the host's "
        "EdgeKit version installed (README, Raspberry Pi); files go to a private temporary directory there, "
        "checked by sha256, and are removed afterwards, also on Ctrl-C.")
    group.add_argument("--host", metavar="[USER@]HOST", help="the device, as ssh takes it (e.g. pi@raspberrypi.local "
                       "or a Host from ~/.ssh/config)")
    group.add_argument("--port", type=int, metavar="N", help="its SSH port (default: ssh's, 22)")
    group.add_argument("--identity", metavar="KEY", help="the private key to log in with (ssh -i)")
    group.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                       help="an ssh_config option passed as ssh -o (repeatable), e.g. ConnectTimeout=5 or "
                            "UserKnownHostsFile=~/.ssh/pi_hosts")
    group.add_argument("--remote-python", default="python3", metavar="PATH",
                       help="the device's Python with EdgeKit installed (default python3; a venv's, quoted so that ~ "
                            "is the device's home: '~/edgekit/bin/python')")
    group.add_argument("--remote-dir", metavar="DIR", help="where the device's temporary directory is made "
                       "(default: its TMPDIR or /tmp)")
    group.add_argument("--allow-version-mismatch", action="store_true",
                       help="run although the device's EdgeKit version differs from this one's")


def target(args) -> Target | None:
    """The Target the parsed arguments name, or None without --host (its options are then refused)."""
    if getattr(args, "host", None) is None:
        given = [flag for flag, value in (("--port", args.port), ("--identity", args.identity),
                                          ("--ssh-option", args.ssh_option), ("--remote-dir", args.remote_dir),
                                          ("--allow-version-mismatch", args.allow_version_mismatch))
                 if value not in (None, [], False)]
        if given or args.remote_python != "python3":
            raise EdgeKitError(f"{(given or ['--remote-python'])[0]} is for a device: give --host [USER@]HOST too.")
        return None
    return Target(args.host, args.port, args.identity, list(args.ssh_option), args.remote_python, args.remote_dir,
                  args.allow_version_mismatch)


def _reason(stderr: str) -> str:
    """The line of ssh's stderr that says why, escaped."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("@")
             and "Warning: Permanently added" not in line]
    return terminal(lines[-1] if lines else "no message")[:300]


def connection_error(target: Target, returncode: int, stderr: str) -> DeviceError:
    """One line for why ssh or the agent did not start: unreachable, refused, authentication, host key, no
    Python, no EdgeKit."""
    name, reason, py = terminal(target.name), _reason(stderr), terminal(target.python)
    if reason == "no message":
        reason = f"exit {returncode}"
    text = stderr.lower()
    install = (f"install EdgeKit {edgekit_version()} there: python -m build --sdist here, copy "
               f"dist/edgekit_ml-{edgekit_version()}.tar.gz to the device and pip install it into that Python "
               "(README, Raspberry Pi)")
    if "remote host identification has changed" in text:
        return DeviceError(f"{name}'s host key is not the one in known_hosts (REMOTE HOST IDENTIFICATION HAS "
                           "CHANGED): refused. If the device was reinstalled, check its new key, remove the old one "
                           f"with ssh-keygen -R, and connect once with ssh.")
    if "host key verification failed" in text or "no matching host key" in text:
        return DeviceError(f"{name}'s host key is not in known_hosts ({reason}); EdgeKit never accepts a key by "
                           "itself: connect once with ssh to check and accept it.")
    if "permission denied" in text or "too many authentication failures" in text:
        return DeviceError(f"{name} refused the login ({reason}); give a key it accepts with --identity KEY or "
                           "ssh-agent (EdgeKit never asks for a password: BatchMode).")
    if "connection refused" in text:
        return DeviceError(f"{name} refused the connection ({reason}); is sshd running there, and on that --port?")
    if any(s in text for s in ("could not resolve", "name or service not known", "no route to host",
                               "network is unreachable", "timed out", "connection closed", "connection reset")):
        return DeviceError(f"{name} is unreachable ({reason}); check the name, the network and --port.")
    if returncode == 127 or "not found" in text and "no module" not in text:
        return DeviceError(f"{py} is not found on {name} ({reason}); give the device's Python with "
                           "--remote-python PATH (the venv where EdgeKit is installed).")
    if "no module named" in text:
        return DeviceError(f"EdgeKit is not installed for {py} on {name} ({reason}); {install}.")
    if not stderr.strip():
        return DeviceError(f"the session with {name} ended (exit {returncode}) before EdgeKit's agent there said "
                           f"hello, and without a message; is {py} there the Python of EdgeKit {edgekit_version()}?")
    return DeviceError(f"ssh to {name} failed (exit {returncode}): {reason}.")


class Session:
    """One SSH session with the device's agent: `with Session(target) as device: device.send(files); device.run(
    ...)`. Leaving the block (normally, on an error or on Ctrl-C) ends the agent, which removes its directory."""

    def __init__(self, target: Target, progress=None):
        self.target, self.progress = target, progress
        self.info: dict = {}
        self._lines: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._proc = None

    # the connection
    def __enter__(self) -> "Session":
        python = self.target.python  # '~/edgekit/bin/python' is the device's home, expanded there
        python = '"$HOME"/' + shlex.quote(python[2:]) if python.startswith("~/") else shlex.quote(python)
        remote = f"exec {python} -m runtime.remote agent"
        try:
            self._proc = subprocess.Popen(self.target.ssh_command(remote), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise DeviceError("ssh is not installed here; --host needs OpenSSH's client (apt-get install "
                              "openssh-client).") from None
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        try:
            hello = self._next("hello", HELLO_SECONDS)
            self.info = self._check_hello(hello)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.stdin.write(b'{"bye": true}\n')
                proc.stdin.flush()
        except OSError:
            pass
        try:
            proc.stdin.close()  # end of input: the agent stops its job and removes its directory
        except OSError:
            pass
        try:
            proc.wait(BYE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _read_stdout(self) -> None:
        """The agent's lines, each read with its bound (MAX_LINE) before it is held; whatever ends the reading,
        the waiting side hears of it."""
        from runtime.limits import json_loads

        stream = self._proc.stdout
        try:
            while True:
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE:
                    self._lines.put(("broken", f"a line longer than {MAX_LINE} bytes"))
                    break
                try:
                    message = json_loads(line)
                except ValueError:
                    continue  # not the agent's (a login banner, the shell's chatter), or nested past the bound
                if isinstance(message, dict) and len(message) >= 1:
                    self._lines.put(("message", message))
        except Exception as exc:  # noqa: BLE001 -- a reader that dies silently would leave the host waiting
            self._lines.put(("broken", f"a line EdgeKit cannot read ({type(exc).__name__})"))
        finally:
            self._lines.put(("eof", None))

    def _read_stderr(self) -> None:
        """ssh's and the device's stderr, read in lines of at most 4 KiB; the first MAX_STDERR bytes kept, the rest
        read and dropped (a device writing gigabytes without a newline holds 4 KiB here)."""
        kept = 0
        for line in iter(lambda: self._proc.stderr.readline(4096), b""):
            if kept < MAX_STDERR:
                text = line.decode("utf-8", "replace")
                self._stderr.append(text)
                kept += len(text)

    def _next(self, expected: str, timeout: float) -> dict:
        """The next message of kind `expected` (progress passed on), or a DeviceError saying why none came."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, message = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DeviceError(f"{terminal(self.target.name)} sent nothing for {timeout:.0f} s (waiting for "
                                  f"{expected}); the connection or the device is stuck.") from None
            if kind == "eof":
                returncode = self._wait_exit()
                if not self.info:
                    raise connection_error(self.target, returncode, "".join(self._stderr))
                raise DeviceError(f"the connection to {terminal(self.target.name)} ended before {expected} "
                                  f"(exit {returncode}: {_reason(''.join(self._stderr))}).")
            if kind == "broken":
                raise DeviceError(f"{terminal(self.target.name)} sent {message}; is its EdgeKit the host's?")
            if "error" in message:
                raise DeviceError(f"{terminal(self.target.name)}: {terminal(str(message['error'])[:500])}")
            if "progress" in message:
                if self.progress:
                    self.progress(terminal(str(message["progress"])[:MAX_TEXT]))
                continue
            if expected in message:
                return message[expected]

    def _wait_exit(self) -> int:
        """ssh's exit code, once its stderr is read to the end (why it failed is there: reading it races the end
        of stdout otherwise)."""
        try:
            code = self._proc.wait(BYE_SECONDS)
        except subprocess.TimeoutExpired:
            return -1
        self._stderr_reader.join(5)
        return code

    def _check_hello(self, hello) -> dict:
        if not isinstance(hello, dict) or not isinstance(hello.get("edgekit"), str):
            raise DeviceError(f"{terminal(self.target.name)} answered, but not as EdgeKit's agent does; install "
                              f"EdgeKit {edgekit_version()} there.")
        ours, theirs = edgekit_version(), hello["edgekit"]
        if theirs != ours and not self.target.allow_version_mismatch:
            raise DeviceError(f"{terminal(self.target.name)} runs EdgeKit {terminal(theirs)[:40]} and this machine "
                              f"{ours}: its figures would not be this version's. Install {ours} there (README: On "
                              "a device), or pass --allow-version-mismatch.")
        return checked_hello(hello)

    def threads(self, text: str) -> list[int]:
        """A --threads list as the device counts its cores ('all' is the device's)."""
        from runtime.bench import parse_threads

        return parse_threads(text, self.info["cores"])

    # the work
    def send(self, files: dict[str, Path]) -> None:
        """Copy files to the device's directory, under the relative names given; each is checked there by its
        sha256."""
        records = []
        for name, path in files.items():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    digest.update(chunk)
            records.append({"name": name, "size": path.stat().st_size, "sha256": digest.hexdigest()})
        self._write(json.dumps({"files": records, "dir": self.target.directory}).encode() + b"\n")
        try:
            for path in files.values():
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(2**20), b""):
                        self._proc.stdin.write(chunk)
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the agent stopped reading: its message says why
        self._next("stored", 600 + sum(r["size"] for r in records) / 2**16)

    def _write(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass

    def run(self, job: str, spec: dict, timeout: float = 3600) -> dict:
        """Run the device's job `python -m runtime.remote JOB SPEC`; {"returncode", "stdout", "stderr"}, each of
        the type it must be."""
        self._write(json.dumps({"run": ["runtime.remote", job, json.dumps(spec)], "timeout": timeout}).encode()
                    + b"\n")
        done = self._next("done", timeout + 60)
        if (not isinstance(done, dict) or type(done.get("returncode")) is not int
                or not -256 < done["returncode"] < 256
                or not all(isinstance(done.get(k, ""), str) for k in ("stdout", "stderr"))):
            raise DeviceError(f"{terminal(self.target.name)} sent a result EdgeKit does not read.")
        return {"returncode": done["returncode"], "stdout": done.get("stdout", ""), "stderr": done.get("stderr", "")}

    def run_json(self, job: str, spec: dict, what: str, timeout: float = 3600) -> object:
        """`run`, its stdout's last JSON line parsed; the device's error becomes this side's, with its exit code."""
        from runtime.limits import json_loads

        result = self.run(job, spec, timeout)
        lines = result["stdout"].strip().splitlines()  # a job prints its result as one JSON line, last
        if result["returncode"] == 0 and lines:
            try:
                return json_loads(lines[-1])
            except ValueError:
                pass
        last = (result["stderr"].strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        error = (WorkFailed if result["returncode"] == 1 else EdgeKitError)
        raise error(f"{what} on {terminal(self.target.name)} failed: {terminal(last[:400])}")


def remote_names(paths: list[Path]) -> dict[str, Path]:
    """Each model file and its companions (sidecar, ONNX external data) under a name for the device: the file
    name, or directory/name where names repeat (three artifacts' model.int8.tflite)."""
    from runtime.artifacts.manifest import sidecar_path

    names: dict[str, Path] = {}
    repeated = len({p.name for p in paths}) < len(paths)
    for path in paths:
        folder = _safe(f"{len(names)}-{path.parent.name}"[:80]) + "/" if repeated else ""
        for companion in (path, sidecar_path(path), Path(str(path) + ".data")):  # model.onnx.data: external data
            if companion.is_file() and companion.resolve() not in {p.resolve() for p in names.values()}:
                names[folder + _safe(companion.name)] = companion
    return names


def remote_path(names: dict[str, Path], path: Path) -> str:
    return next(name for name, p in names.items() if p == path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".") or "file"


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
    import math

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


def checked_rows(results, back: dict[str, Path], where: str) -> list[dict]:
    """A device's bench rows rebuilt from what EdgeKit reads: every figure of its type and range, every text cut
    and escaped, each row's model its file here (`back`: the name it was sent under -> the local path)."""
    bad = DeviceError(f"{terminal(where)} sent bench rows EdgeKit does not read; is its EdgeKit the host's?")
    if not isinstance(results, list) or len(results) > 10**5:
        raise bad
    rows = []
    for row in results:
        if not isinstance(row, dict) or not isinstance(row.get("model"), str) or row["model"] not in back:
            raise bad
        stats = {part: row.get(part) for part in ("invoke_ms", "call_ms")}
        cold = row.get("cold_start")
        if (not all(figure(row.get(k), kind) for k, kind in ROW_FIGURES.items())
                or not all(isinstance(s, dict) and all(figure(s.get(k), kind) for k, kind in STAT_FIGURES.items())
                           and s["median"] > 0 for s in stats.values())
                or not isinstance(cold, dict) or not figure(cold.get("peak_rss_mb"), ROW_FIGURES["peak_rss_mb"])
                or not (cold.get("seconds") is None or figure(cold.get("seconds"), (float, 0.0, 1e5)))):
            raise bad
        local = back[row["model"]]
        rows.append({**{k: row[k] for k in ROW_FIGURES}, **{k: device_text(row.get(k)) for k in ROW_TEXT},
                     **{part: {k: s[k] for k in STAT_FIGURES} for part, s in stats.items()},
                     "cold_start": {"seconds": cold.get("seconds"), "peak_rss_mb": cold["peak_rss_mb"]},
                     "model": str(local), "name": local.name, "remote_model": device_text(row["model"], MAX_TEXT)})
    return rows


def bench_on(target: Target, paths, threads_text: str, batch: int = 1, runs=None, seconds=None, warmup: int = 10,
             inputs: str = "pixels", options: dict | None = None, progress=None) -> tuple[list[dict], dict]:
    """`runtime.bench.bench` on the device: (rows as a local bench's, the device's hello), each row naming it."""
    from runtime.bench import check_budget, check_loadable, compare, model_files

    runs, seconds = check_budget(runs, seconds, batch, warmup)
    files = model_files(paths)
    options = check_loadable(files, options)
    with Session(target, progress) as session:
        threads = session.threads(threads_text)
        names = remote_names(files)
        session.send(names)
        spec = {"paths": [remote_path(names, f) for f in files], "threads": threads, "batch": batch, "runs": runs,
                "seconds": seconds, "warmup": warmup, "inputs": inputs, "options": options}
        budget = len(files) * len(threads) * (120 + (seconds or runs * 0.5))
        data = session.run_json("bench", spec, "bench", 300 + budget)
        info = session.info
    back = {remote_path(names, f): f for f in files}
    rows = checked_rows(data.get("results") if isinstance(data, dict) else None, back, target.name)
    return add_device(compare(rows), info, target.name), info


def classes_on(target: Target, model_path: Path, x, threads: int | None, options: dict, batch_size: int,
               num_classes: int, progress=None) -> tuple[list[int], dict]:
    """The device's predicted class for every image in `x` (sent once, as an .npz checked by sha256), and its
    hello."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="edgekit-split-") as tmp:
        split = Path(tmp) / "split.npz"
        np.savez(split, x=x)
        with Session(target, progress) as session:
            if threads is not None:
                session.threads(str(threads))
            names = remote_names([model_path])
            names["split.npz"] = split
            session.send(names)
            spec = {"model": remote_path(names, model_path), "data": "split.npz", "threads": threads,
                    "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                                if v is not None and k != "labels"}, "batch_size": batch_size}
            data = session.run_json("classes", spec, "eval", 600 + len(x) * 0.1)
            info = session.info
    predicted = data.get("predicted") if isinstance(data, dict) else None
    if (not isinstance(predicted, list) or len(predicted) != len(x)
            or not all(type(v) is int and 0 <= v < num_classes for v in predicted)):
        raise DeviceError(f"{terminal(target.name)} sent predictions EdgeKit does not read (expected {len(x)} class indices "
                          f"below {num_classes}).")
    return predicted, info


class Rounds:
    """The report's latency rounds on a device: one session, the files sent once (when first measured), then
    the device's rounds job per thread count; called as `runtime.bench.run_rounds_worker`."""

    def __init__(self, session: Session):
        self.session, self.names = session, None

    @property
    def identity(self) -> dict:
        """What a cached figure must have been measured on."""
        return {k: self.session.info.get(k) for k in ("machine", "cpu", "board", "cores", "edgekit")} | {
            "host": self.session.target.name}

    def __call__(self, paths: list[Path], threads: int, rounds: int, runs, seconds, warmup: int = 10) -> dict:
        if self.names is None:
            self.names = remote_names(paths)
            self.session.send(self.names)
        spec = {"paths": [remote_path(self.names, p) for p in paths], "threads": threads, "rounds": rounds,
                "runs": runs, "seconds": seconds, "warmup": warmup}
        expected = len(paths) * (seconds or rounds * runs * 0.05)
        data = self.session.run_json("rounds", spec, "the latency rounds", 600 + 20 * expected + 30 * len(paths))
        back = {remote_path(self.names, p): str(p) for p in paths}
        bad = DeviceError(f"{terminal(self.session.target.name)} sent latency rounds EdgeKit does not read.")
        if not isinstance(data, dict) or set(data) - set(back):
            raise bad
        results = {}
        for name, result in data.items():
            if not isinstance(result, dict):
                raise bad
            medians = result.get("round_medians_ms")
            if "error" in result:
                results[back[name]] = {"error": device_text(result["error"], MAX_TEXT)}
            elif (isinstance(medians, list) and 0 < len(medians) <= 10**4
                  and all(figure(m, MS) and m > 0 for m in medians)
                  and figure(result.get("p90_ms"), MS) and figure(result.get("n"), STAT_FIGURES["n"])):
                results[back[name]] = {"round_medians_ms": medians, "p90_ms": result["p90_ms"], "n": result["n"]}
            else:
                raise bad
        return results


# --- the device's side ----------------------------------------------------------------------------------------
class Refused(Exception):
    """What the host sent cannot be served; `kind` says which rule it broke (the host shows the message)."""

    def __init__(self, message: str, kind: str = "protocol"):
        super().__init__(message)
        self.kind = kind


def _checked_files(request: dict) -> list[dict]:
    """The announced files, each {name, size, sha256} with a name of one or two plain parts (letters, digits, '.',
    '_', '-'; no part starting with '.'), a size from 0 to 1 TiB and a sha256 in hex; no name twice and none that
    is another's folder. Everything is checked before the first byte is stored."""
    import re

    files = request.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        raise Refused(f"the host's request names no files or more than {MAX_FILES}")
    names = set()
    for record in files:
        if not isinstance(record, dict) or type(record.get("size")) is not int or not 0 <= record["size"] <= 2**40:
            raise Refused("the host's request is not EdgeKit's (each file needs a size from 0 to 1 TiB)")
        name = record.get("name")
        parts = name.split("/") if isinstance(name, str) and len(name) <= 200 else []
        if not 1 <= len(parts) <= 2 or not all(re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,99}", p) for p in parts):
            raise Refused(f"refused the file name {str(name)[:100]!r} (one or two plain parts: letters, digits, "
                          "'.', '_', '-')", "name")
        if not isinstance(record.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", record["sha256"]):
            raise Refused(f"{name} comes without a sha256 in hex", "protocol")
        names.add(name)
    folders = {name.split("/")[0] for name in names if "/" in name}
    if len(names) < len(files) or folders & names:
        raise Refused("the host's request names a file twice, or a file and a folder alike", "name")
    return files


def _storage(request: dict) -> Path:
    """The existing directory the agent's private directory goes in: the request's "dir", or the TMPDIR."""
    base = request.get("dir")
    if base is None:
        return Path(tempfile.gettempdir())
    if not isinstance(base, str) or not base or len(base) > 4096 or "\0" in base:
        raise Refused(f"--remote-dir takes a directory on the device; got {str(base)[:100]!r}", "dir")
    path = Path(os.path.expanduser(base))
    if not path.is_dir():
        raise Refused(f"{base} is not a directory on the device; give --remote-dir DIR", "dir")
    return path


def _job_argv(command: dict) -> list[str]:
    """The job a "run" asks for: `runtime.remote NAME SPEC`, NAME one of the device's jobs; nothing else runs."""
    argv = command.get("run")
    if (not isinstance(argv, list) or len(argv) != 3 or argv[0] != "runtime.remote" or argv[1] not in DEVICE_JOBS
            or not isinstance(argv[2], str)):
        raise Refused(f"refused the job {str(argv)[:200]} (the agent runs EdgeKit's own jobs only: "
                      f"runtime.remote {'|'.join(DEVICE_JOBS)} SPEC)")
    return argv


class _Agent:
    """The agent's state: the private directory (its files in `uploads/`, the job's working directory `run/`,
    its TMPDIR `tmp/`), the running job, and the host's messages read by a thread into `commands`."""

    def __init__(self, stdin, stdout):
        self.stdin, self.stdout = stdin, stdout
        self.lock = threading.Lock()
        self.commands: queue.Queue = queue.Queue()  # dict | None (end of input) | Refused (a bad line)
        self.root: Path | None = None
        self.job = None

    def send(self, message: dict) -> None:
        with self.lock:
            self.stdout.write(json.dumps(message).encode() + b"\n")
            self.stdout.flush()

    def read_line(self) -> dict | None:
        """The host's next message, None at the end of its input; Refused for a line that is not one."""
        from runtime.limits import json_loads

        line = self.stdin.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE:
            raise Refused(f"the host sent a line longer than {MAX_LINE} bytes")
        try:
            message = json_loads(line)
        except ValueError as exc:
            raise Refused(f"the host sent a line that is not EdgeKit's JSON ({str(exc)[:100]})") from None
        if not isinstance(message, dict):
            raise Refused("the host sent JSON that is not an object")
        return message

    def serve(self) -> int:
        self.send({"hello": device_info()})
        request = self.read_line()
        if request is None or "bye" in request:
            return 0
        if "files" not in request:
            raise Refused("the host's first request names no files")
        if not self.receive(request):
            return 1  # the host went away mid-file
        threading.Thread(target=self._commands, daemon=True).start()
        while True:
            command = self.commands.get()
            if isinstance(command, Refused):
                raise command
            if command is None or "run" not in command:
                return 0
            if not self.run(command):
                return 1

    def _commands(self) -> None:
        """The reader thread: every message into `commands`; whatever ends it (the end of input, a line that is
        not the protocol, any exception) is put there too, so the main loop never waits for nothing."""
        try:
            while True:
                message = self.read_line()
                self.commands.put(message)
                if message is None:
                    return
        except Refused as exc:
            self.commands.put(exc)
        except BaseException as exc:  # noqa: BLE001 -- a reader that dies silently would hang the agent
            self.commands.put(Refused(f"the agent could not read the host's input ({type(exc).__name__})"))

    def receive(self, request: dict) -> bool:
        files = _checked_files(request)
        base = _storage(request)
        total = sum(f["size"] for f in files)
        try:
            free = shutil.disk_usage(base).free
        except OSError as exc:
            raise Refused(f"cannot use {base} for the files ({exc.strerror}); give --remote-dir DIR", "dir") from None
        if free < total + SPACE_MARGIN:
            raise Refused(f"{base} has {free / 2**20:.1f} MiB free and the files need "
                          f"{(total + SPACE_MARGIN) / 2**20:.1f} MiB; free space there or give --remote-dir DIR",
                          "space")
        try:
            self.root = Path(tempfile.mkdtemp(prefix="edgekit-device-", dir=base))
            for part in (UPLOADS, "run", "tmp"):
                (self.root / part).mkdir(mode=0o700)
        except OSError as exc:
            raise Refused(f"cannot make a private directory in {base} ({exc.strerror}); give --remote-dir DIR",
                          "dir") from None
        for record in files:
            target = self.root / UPLOADS / record["name"]
            digest, left = hashlib.sha256(), record["size"]
            try:
                target.parent.mkdir(mode=0o700, exist_ok=True)
                with open(target, "xb") as fh:
                    while left:
                        chunk = self.stdin.read(min(left, 2**20))
                        if not chunk:
                            return False  # the host went away
                        digest.update(chunk)
                        fh.write(chunk)
                        left -= len(chunk)
            except OSError as exc:
                import errno

                full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                raise Refused(f"{'the disk is full' if full else 'cannot write'} in {base} while copying "
                              f"{record['name']} ({exc.strerror}); free space there or give --remote-dir DIR",
                              "space" if full else "write") from None
            if digest.hexdigest() != record["sha256"]:
                raise Refused(f"{record['name']} arrived with sha256 {digest.hexdigest()}, not the host's "
                              f"{record['sha256']}", "sha256")
        self.send({"stored": len(files)})
        return True

    def run(self, command: dict) -> bool:
        """Run one job in a fresh Python whose working directory (`run/`, empty) holds nothing the host sent, so
        `-m` puts no uploaded module on its path; the files are reached through EDGEKIT_UPLOADS."""
        argv = _job_argv(command)
        timeout = command.get("timeout")
        timeout = float(timeout) if type(timeout) in (int, float) and 0 < timeout <= 86400 else 3600.0
        env = {**os.environ, "TMPDIR": str(self.root / "tmp"), "TF_CPP_MIN_LOG_LEVEL": "2",
               UPLOADS_ENV: str(self.root / UPLOADS), "PYTHONSAFEPATH": "1"}  # Python 3.11+: no cwd on sys.path
        self.job = subprocess.Popen([sys.executable, "-m", *argv], cwd=self.root / "run", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        out: list[bytes] = []
        err: list[str] = []
        readers = [threading.Thread(target=lambda: out.append(self.job.stdout.read(MAX_LINE)), daemon=True),
                   threading.Thread(target=self._progress, args=(err,), daemon=True)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout
        while self.job.poll() is None:
            try:
                message = self.commands.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.stop_job()
                    raise Refused(f"the job took longer than {timeout:.0f} s and was stopped", "time") from None
                continue
            self.commands.put(message)  # the next command, or the end: either waits for this job, or ends it
            if message is None or isinstance(message, Refused) or "bye" in message:
                self.stop_job()
                return False
        for reader in readers:
            reader.join(10)
        self.send({"done": {"returncode": self.job.returncode, "stdout": b"".join(out).decode("utf-8", "replace"),
                            "stderr": "".join(err[-20:])}})
        self.job = None
        return True

    def _progress(self, kept: list[str]) -> None:
        """The job's stderr, line by line (each cut at 4 KiB): the last lines kept, each sent as progress."""
        for line in iter(lambda: self.job.stderr.readline(4096), b""):
            text = line.decode("utf-8", "replace").rstrip()[:300]
            kept.append(text + "\n")
            del kept[:-40]
            if text and not text.startswith("error:"):
                self.send({"progress": text})

    def stop_job(self) -> None:
        import signal

        job, self.job = self.job, None
        if job is None or job.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(job.pid, sig)
            except OSError:
                return
            try:
                job.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def cleanup(self) -> None:
        self.stop_job()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def agent() -> int:
    """The device's side of a session: serve the host on stdin/stdout, and leave nothing behind. Whatever goes
    wrong (a request it refuses, a line that is not the protocol, any exception) ends it with one error message,
    its directory removed, exit 1."""
    import signal

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but the protocol on stdout
    state = _Agent(stdin, stdout)

    def hang_up(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, hang_up)
    try:
        return state.serve()
    except (BrokenPipeError, ConnectionError):
        return 1
    except Exception as exc:  # noqa: BLE001 -- one message to the host, never a traceback, nothing left behind
        refused = exc if isinstance(exc, Refused) else Refused(f"the agent failed ({type(exc).__name__}: "
                                                               f"{str(exc)[:200]})", "agent")
        try:
            state.send({"error": str(refused), "kind": refused.kind})
        except OSError:
            pass
        return 1
    finally:
        state.cleanup()


# --- the jobs the agent runs (python -m runtime.remote NAME SPEC, in a fresh process) ---------------------------
def uploaded(name) -> str:
    """The path of a file the host sent, by the name it sent it under: a relative name inside the agent's
    uploads directory (EDGEKIT_UPLOADS), never a path elsewhere on the device."""
    base = Path(os.environ.get(UPLOADS_ENV, "."))
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
        raise EdgeKitError(f"a job names {str(name)[:100]!r}; expected the name of a file the host sent.")
    return str(base / name)


def _classes(spec: dict) -> dict:
    """The device's side of `eval --host`: the predicted class of every image in an .npz."""
    import numpy as np

    from runtime.load import finite, load

    model = load(uploaded(spec["model"]), threads=spec.get("threads"), **(spec.get("options") or {}))
    with np.load(uploaded(spec["data"]), allow_pickle=False) as data:
        x = data["x"]
    predicted = finite(model.logits(x, batch_size=int(spec.get("batch_size") or 256)), model).argmax(axis=1)
    return {"predicted": predicted.astype(int).tolist()}


def _bench(spec: dict) -> dict:
    """The device's side of `bench --host`: `runtime.bench.bench`, its progress on stderr for the host to show;
    each row's model the name the host sent it under."""
    from runtime.bench import bench, machine

    paths = {uploaded(name): name for name in spec["paths"]}
    results = bench(list(paths), spec["threads"], spec["batch"], spec["runs"], spec["seconds"], spec["warmup"],
                    progress=lambda m: print(m, file=sys.stderr, flush=True), inputs=spec["inputs"],
                    options=spec["options"])
    for row in results:
        row["model"], row["baseline"] = paths.get(row["model"], row["model"]), paths.get(row["baseline"])
    return {"machine": machine(), "results": results}


def _rounds(spec: dict) -> dict:
    """The device's side of the report's latency rounds (`runtime.bench.measure_rounds`, in this fresh process),
    keyed by the names the host sent."""
    from runtime.bench import measure_rounds

    paths = {uploaded(name): name for name in spec["paths"]}
    results = measure_rounds(list(paths), spec["threads"], spec["rounds"], spec["runs"], spec["seconds"],
                             spec["warmup"])
    return {paths[path]: result for path, result in results.items()}


DEVICE_JOBS = {"bench": _bench, "classes": _classes, "rounds": _rounds}


def job(name: str, spec_text: str) -> int:
    """`python -m runtime.remote bench|classes|rounds SPEC`: one job of the agent, its result as one JSON line."""
    from runtime.errors import run_cli
    from runtime.limits import json_loads

    def main(_argv):
        try:
            spec = json_loads(spec_text)
            result = DEVICE_JOBS[name](spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgeKitError(f"the job's spec is not EdgeKit's ({type(exc).__name__}: {str(exc)[:200]}).") from exc
        print(json.dumps(result))
        return 0

    return run_cli(main, [])


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        code = agent()  # its answer is on its streams and in its exit code, its directory already removed
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter teardown: a library's destructors aborted it there (SIGABRT after a clean refusal, 1 suite
        # run in 5), replacing the exit code the host reads
        os._exit(code)
    if len(sys.argv) == 3 and sys.argv[1] in DEVICE_JOBS:
        sys.exit(job(sys.argv[1], sys.argv[2]))
    print("usage: python -m runtime.remote agent   (run by the host through ssh; see python -m runtime bench --help)",
          file=sys.stderr)
    sys.exit(2)
