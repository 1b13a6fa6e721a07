"""The device's side: `python -m runtime.remote agent`, as the host's ssh starts it (the protocol:
runtime/remote/__init__.py). It stores the host's files, checked by sha256, in a private directory, runs
EdgeKit's own jobs (runtime/remote/jobs.py) and nothing else, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runtime.bench import machine
from runtime.limits import json_loads
from runtime.remote.device import board, edgekit_version
from runtime.remote.jobs import DEVICE_JOBS, UPLOADS_ENV
from runtime.remote.session import MAX_LINE

MAX_FILES = 1000  # files in one request (a report's run sends a few dozen)
UPLOADS = "uploads"  # the agent's directory for the host's files, beside the job's empty working directory
SPACE_MARGIN = 2**20


def device_info() -> dict:
    """What this machine is, as the agent says hello: `runtime.bench.machine()`, the board, EdgeKit's version."""

    return {**machine(), "board": board(), "edgekit": edgekit_version(), "python": sys.version.split()[0],
            "tmp": tempfile.gettempdir()}


class Refused(Exception):
    """What the host sent cannot be served; `kind` says which rule it broke (the host shows the message)."""

    def __init__(self, message: str, kind: str = "protocol"):
        super().__init__(message)
        self.kind = kind


def _checked_files(request: dict) -> list[dict]:
    """The announced files, each {name, size, sha256} with a name of one or two plain parts (letters, digits, '.',
    '_', '-'; no part starting with '.'), a size from 0 to 1 TiB and a sha256 in hex; no name twice and none that
    is another's folder. Everything is checked before the first byte is stored."""

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
