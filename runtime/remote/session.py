"""The host's side of a device: `--host` and its options, and one SSH session with the device's agent
(runtime/remote/agent.py), through the system's OpenSSH client.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.artifacts.manifest import sidecar_path
from runtime.bench import parse_threads
from runtime.errors import EdgeKitError, WorkFailed
from runtime.fsutil import check_readable_file
from runtime.limits import json_loads
from runtime.remote.device import MAX_TEXT, DeviceError, checked_hello, edgekit_version
from runtime.text import terminal

MAX_LINE = 32 * 2**20  # one protocol line (a bench's JSON, an eval's predictions) is far smaller
MAX_STDERR = 2**16  # bytes of the device's stderr kept (ssh's and the shell's messages: why it failed)
HELLO_SECONDS = 120  # a Pi Zero imports numpy in a few seconds; an agent that says nothing in 2 minutes is hung
BYE_SECONDS = 30


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
