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
    device -> host   {"stored": N} | {"error": ..., "kind": "space"|"sha256"|"name"}
    host -> device   {"run": [MODULE, ARG...], "timeout": S, "return": [NAME...]}
    device -> host   {"progress": LINE}..., then {"done": {"returncode", "stdout", "stderr", "files"}}
    host -> device   {"bye": true}, or end of input

The files live in a private temporary directory (mode 0700) made by the agent under DIR (default the device's
TMPDIR), which the job also gets as its TMPDIR; the agent removes it when the host says bye, when its input
ends (the host was interrupted or killed, the connection dropped) and on any error, and kills a running job's
process group first. What the device sends back is untrusted: lines are bounded, JSON is checked, and text is
escaped before it reaches a terminal.
"""

from __future__ import annotations

import base64
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

DISTRIBUTION = "edgekit-ml"
MAX_LINE = 32 * 2**20  # one protocol line (a bench's JSON, an eval's predictions) is far smaller
MAX_RETURNED = 16 * 2**20  # bytes of files a job may send back
JOBS = ("runtime.bench", "runtime.remote")  # the modules the agent runs
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
    from runtime.text import terminal

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
            from runtime.manifest import check_readable_file

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
    from runtime.text import terminal

    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("@")
             and "Warning: Permanently added" not in line]
    return terminal(lines[-1] if lines else "no message")[:300]


def connection_error(target: Target, returncode: int, stderr: str) -> DeviceError:
    """One line for why ssh or the agent did not start: unreachable, refused, authentication, host key, no
    Python, no EdgeKit."""
    from runtime.text import terminal

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
        threading.Thread(target=self._read_stderr, daemon=True).start()
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
        stream = self._proc.stdout
        while True:
            line = stream.readline(MAX_LINE + 1)
            if not line:
                break
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                self._lines.put(("broken", f"a line longer than {MAX_LINE} bytes"))
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not the agent's (a login banner, the shell's chatter)
            if isinstance(message, dict) and len(message) >= 1:
                self._lines.put(("message", message))
        self._lines.put(("eof", None))

    def _read_stderr(self) -> None:
        kept = 0
        for line in iter(self._proc.stderr.readline, b""):
            if kept < 2**16:
                text = line.decode("utf-8", "replace")
                self._stderr.append(text)
                kept += len(text)

    def _next(self, expected: str, timeout: float) -> dict:
        """The next message of kind `expected` (progress passed on), or a DeviceError saying why none came."""
        from runtime.text import terminal

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
                raise DeviceError(f"{terminal(self.target.name)}: {terminal(message['error'])[:500]}")
            if "progress" in message:
                if self.progress:
                    self.progress(terminal(message["progress"])[:300])
                continue
            if expected in message:
                return message[expected]

    def _wait_exit(self) -> int:
        try:
            return self._proc.wait(BYE_SECONDS)
        except subprocess.TimeoutExpired:
            return -1

    def _check_hello(self, hello) -> dict:
        from runtime.text import terminal

        if not isinstance(hello, dict) or not isinstance(hello.get("edgekit"), str):
            raise DeviceError(f"{terminal(self.target.name)} answered, but not as EdgeKit's agent does; install "
                              f"EdgeKit {edgekit_version()} there.")
        ours, theirs = edgekit_version(), hello["edgekit"]
        if theirs != ours and not self.target.allow_version_mismatch:
            raise DeviceError(f"{terminal(self.target.name)} runs EdgeKit {terminal(theirs)[:40]} and this machine "
                              f"{ours}: its figures would not be this version's. Install {ours} there (README: On "
                              "a device), or pass --allow-version-mismatch.")
        cores = hello.get("cores")
        hello["cores"] = cores if type(cores) is int and 0 < cores < 4096 else 1
        return hello

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

    def run(self, module: str, args: list[str], timeout: float = 3600, returned: tuple[str, ...] = ()) -> dict:
        """Run `python -m MODULE ARGS...` in the device's directory; {"returncode", "stdout", "stderr",
        "files": {name: bytes}}."""
        self._write(json.dumps({"run": [module, *args], "timeout": timeout, "return": list(returned)}).encode()
                    + b"\n")
        done = self._next("done", timeout + 60)
        if not isinstance(done, dict) or type(done.get("returncode")) is not int:
            raise DeviceError(f"{self.target.name} sent a result EdgeKit does not read.")
        files = {}
        for name, text in (done.get("files") or {}).items():
            if name in returned and isinstance(text, str):
                files[name] = base64.b64decode(text)
        return {"returncode": done["returncode"], "stdout": str(done.get("stdout", "")),
                "stderr": str(done.get("stderr", "")), "files": files}

    def run_json(self, module: str, args: list[str], what: str, timeout: float = 3600,
                 returned: tuple[str, ...] = ()) -> tuple[object, dict]:
        """`run`, its stdout's last JSON line parsed; the device's error becomes this side's, with its exit code."""
        from runtime.text import terminal

        result = self.run(module, args, timeout, returned)
        lines = result["stdout"].strip().splitlines()  # a job prints its result as one JSON line, last
        if result["returncode"] == 0 and lines:
            try:
                return json.loads(lines[-1]), result["files"]
            except ValueError:
                pass
        last = (result["stderr"].strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        error = (WorkFailed if result["returncode"] == 1 else EdgeKitError)
        raise error(f"{what} on {terminal(self.target.name)} failed: {terminal(last)[:400]}")


def remote_names(paths: list[Path]) -> dict[str, Path]:
    """Each model file and its companions (sidecar, ONNX external data) under a name for the device: the file
    name, or directory/name where names repeat (three artifacts' model.int8.tflite)."""
    from runtime.manifest import sidecar_path

    names: dict[str, Path] = {}
    repeated = len({p.name for p in paths}) < len(paths)
    for path in paths:
        folder = f"{len(names)}-{path.parent.name}"[:80] + "/" if repeated else ""
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


def _number(value) -> bool:
    import math

    return type(value) in (int, float) and math.isfinite(value)


ROW_NUMBERS = ("size_bytes", "threads", "batch", "load_ms", "first_ms", "overhead", "throughput_ips",
               "throughput_p50_ips", "peak_rss_mb")
ROW_TEXT = ("name", "backend", "format", "input_dtype", "inputs", "one_image_path")


def checked_rows(results, back: dict[str, Path], where: str) -> list[dict]:
    """A device's bench rows, every figure a finite number and every text escaped, each row's model its file here
    (`back`: the device's name -> the local path)."""
    from runtime.text import terminal

    bad = DeviceError(f"{where} sent bench rows EdgeKit does not read; is its EdgeKit the host's?")
    if not isinstance(results, list):
        raise bad
    rows = []
    for row in results:
        if not isinstance(row, dict) or row.get("model") not in back:
            raise bad
        stats = [row.get("invoke_ms"), row.get("call_ms")]
        cold = row.get("cold_start")
        if (not all(_number(row.get(k)) for k in ROW_NUMBERS)
                or not all(isinstance(s, dict) and all(_number(s.get(k)) for k in ("median", "p90", "p99", "mean",
                                                                                     "std", "min", "n")) for s in stats)
                or not all(s["median"] > 0 for s in stats)
                or not isinstance(cold, dict) or not _number(cold.get("peak_rss_mb"))
                or not (cold.get("seconds") is None or _number(cold.get("seconds")))):
            raise bad
        local = back[row["model"]]
        row.update({k: terminal(row.get(k, "-"))[:100] for k in ROW_TEXT})
        row.update(model=str(local), name=local.name, remote_model=terminal(row["model"])[:300])
        rows.append(row)
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
        data, _ = session.run_json("runtime.remote", ["bench", json.dumps(spec)], "bench", 300 + budget)
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
            data, _ = session.run_json("runtime.remote", ["classes", json.dumps(spec)], "eval",
                                       600 + len(x) * 0.1)
            info = session.info
    predicted = data.get("predicted") if isinstance(data, dict) else None
    if (not isinstance(predicted, list) or len(predicted) != len(x)
            or not all(type(v) is int and 0 <= v < num_classes for v in predicted)):
        raise DeviceError(f"{target.name} sent predictions EdgeKit does not read (expected {len(x)} class indices "
                          f"below {num_classes}).")
    return predicted, info


class Rounds:
    """The report's latency rounds on a device: one session, the files sent once (when first measured), then
    `runtime.bench`'s rounds worker per thread count; called as `runtime.bench.run_rounds_worker`."""

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
        spec = {"mode": "rounds", "paths": [remote_path(self.names, p) for p in paths], "threads": threads,
                "rounds": rounds, "runs": runs, "seconds": seconds, "warmup": warmup}
        expected = len(paths) * (seconds or rounds * runs * 0.05)
        data, _ = self.session.run_json("runtime.bench", [json.dumps(spec)], "the latency rounds",
                                        600 + 20 * expected + 30 * len(paths))
        back = {remote_path(self.names, p): str(p) for p in paths}
        if not isinstance(data, dict) or set(data) - set(back):
            raise DeviceError(f"{self.session.target.name} sent latency rounds EdgeKit does not read.")
        results = {}
        for name, result in data.items():
            medians = result.get("round_medians_ms") if isinstance(result, dict) else None
            if isinstance(result, dict) and "error" in result:
                from runtime.text import terminal

                results[back[name]] = {"error": terminal(result["error"])[:300]}
            elif (isinstance(medians, list) and medians and all(_number(m) and m > 0 for m in medians)
                  and _number(result.get("p90_ms")) and _number(result.get("n"))):
                results[back[name]] = {"round_medians_ms": medians, "p90_ms": result["p90_ms"], "n": result["n"]}
            else:
                raise DeviceError(f"{self.session.target.name} sent latency rounds EdgeKit does not read.")
        return results


# --- the device's side ----------------------------------------------------------------------------------------
class _Agent:
    def __init__(self, stdin, stdout):
        self.stdin, self.stdout = stdin, stdout
        self.lock = threading.Lock()
        self.commands: queue.Queue = queue.Queue()
        self.work: Path | None = None
        self.job = None

    def send(self, message: dict) -> None:
        with self.lock:
            self.stdout.write(json.dumps(message).encode() + b"\n")
            self.stdout.flush()

    def read_line(self):
        line = self.stdin.readline(MAX_LINE + 1)
        if not line:
            return None
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def serve(self) -> int:
        self.send({"hello": device_info()})
        request = self.read_line()
        if not request or "files" not in request:
            return 0
        if not self.receive(request):
            return 1
        threading.Thread(target=self._commands, daemon=True).start()
        while True:
            command = self.commands.get()
            if command is None or "run" not in command:
                return 0
            if not self.run(command):
                return 1

    def _commands(self) -> None:
        while True:
            message = self.read_line()
            self.commands.put(message)
            if message is None:
                return

    def receive(self, request: dict) -> bool:
        files = request.get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and type(f.get("size")) is int
                                                  and 0 <= f["size"] <= 2**40 for f in files):
            self.send({"error": "the host's request is not EdgeKit's", "kind": "protocol"})
            return False
        base = request.get("dir") or tempfile.gettempdir()
        try:
            total = sum(int(f["size"]) for f in files)
            free = shutil.disk_usage(base).free
        except (OSError, KeyError, TypeError, ValueError) as exc:
            self.send({"error": f"cannot use {base} for the files ({exc}); give --remote-dir DIR", "kind": "dir"})
            return False
        if free < total + SPACE_MARGIN:
            self.send({"error": f"{base} has {free / 2**20:.1f} MiB free and the files need "
                                f"{(total + SPACE_MARGIN) / 2**20:.1f} MiB; free space there or give --remote-dir DIR",
                       "kind": "space"})
            return False
        self.work = Path(tempfile.mkdtemp(prefix="edgekit-device-", dir=base))
        for record in files:
            name = PurePosixPath(str(record.get("name")))
            if name.is_absolute() or any(part in ("", ".", "..") for part in name.parts) or len(name.parts) > 2:
                self.send({"error": f"refused the file name {str(name)!r}", "kind": "name"})
                return False
            target = self.work / name
            target.parent.mkdir(exist_ok=True)
            digest, left = hashlib.sha256(), int(record["size"])
            try:
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
                self.send({"error": f"{'the disk is full' if full else 'cannot write'} in {base} while copying "
                                    f"{name} ({exc.strerror}); free space there or give --remote-dir DIR",
                           "kind": "space" if full else "write"})
                return False
            if digest.hexdigest() != record.get("sha256"):
                self.send({"error": f"{name} arrived with sha256 {digest.hexdigest()}, not the host's "
                                    f"{record.get('sha256')}", "kind": "sha256"})
                return False
        self.send({"stored": len(files)})
        return True

    def run(self, command: dict) -> bool:
        argv = command.get("run")
        if not isinstance(argv, list) or not argv or argv[0] not in JOBS or not all(isinstance(a, str) for a in argv):
            self.send({"error": f"refused the job {str(argv)[:200]}", "kind": "protocol"})
            return False
        timeout = command.get("timeout") if type(command.get("timeout")) in (int, float) else 3600
        env = {**os.environ, "TMPDIR": str(self.work), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.job = subprocess.Popen([sys.executable, "-m", *argv], cwd=self.work, stdin=subprocess.DEVNULL,
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
                    self.send({"error": f"the job took longer than {timeout:.0f} s and was stopped", "kind": "time"})
                    return False
                continue
            self.commands.put(message)  # the next command, or the end: either waits for this job, or ends it
            if message is None or "bye" in message:
                self.stop_job()
                return False
        for reader in readers:
            reader.join(10)
        files = {}
        for name in command.get("return") or []:
            path = self.work / str(name)
            if path.is_file() and path.resolve().parent == self.work.resolve() and path.stat().st_size <= MAX_RETURNED:
                files[str(name)] = base64.b64encode(path.read_bytes()).decode()
        self.send({"done": {"returncode": self.job.returncode, "stdout": b"".join(out).decode("utf-8", "replace"),
                            "stderr": "".join(err[-20:]), "files": files}})
        self.job = None
        return True

    def _progress(self, kept: list[str]) -> None:
        for line in iter(self.job.stderr.readline, b""):
            text = line.decode("utf-8", "replace").rstrip()
            kept.append(text + "\n")
            del kept[:-40]
            if text and not text.startswith("error:"):
                self.send({"progress": text[:300]})

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
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)


def agent() -> int:
    """The device's side of a session: serve the host on stdin/stdout, and leave nothing behind."""
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
    finally:
        state.cleanup()


def _classes(spec: dict) -> dict:
    """The device's side of `eval --host`: the predicted class of every image in an .npz."""
    import numpy as np

    from runtime.load import finite, load

    model = load(spec["model"], threads=spec.get("threads"), **(spec.get("options") or {}))
    with np.load(spec["data"], allow_pickle=False) as data:
        x = data["x"]
    predicted = finite(model.logits(x, batch_size=int(spec.get("batch_size") or 256)), model).argmax(axis=1)
    return {"predicted": predicted.astype(int).tolist()}


def _bench(spec: dict) -> dict:
    """The device's side of `bench --host`: `runtime.bench.bench`, its progress on stderr for the host to show."""
    from runtime.bench import bench, machine

    results = bench(spec["paths"], spec["threads"], spec["batch"], spec["runs"], spec["seconds"], spec["warmup"],
                    progress=lambda m: print(m, file=sys.stderr, flush=True), inputs=spec["inputs"],
                    options=spec["options"])
    return {"machine": machine(), "results": results}


def job(name: str, spec_text: str) -> int:
    """`python -m runtime.remote bench|classes SPEC`: one job of the agent, its result as one JSON line."""
    from runtime.errors import run_cli

    def main(_argv):
        print(json.dumps({"bench": _bench, "classes": _classes}[name](json.loads(spec_text))))
        return 0

    return run_cli(main, [])


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        sys.exit(agent())
    if sys.argv[1:2] in (["bench"], ["classes"]) and len(sys.argv) == 3:
        sys.exit(job(sys.argv[1], sys.argv[2]))
    print("usage: python -m runtime.remote agent   (run by the host through ssh; see python -m runtime bench --help)",
          file=sys.stderr)
    sys.exit(2)
