"""bench, eval and report on a device over SSH, through a real OpenSSH server (Debian's openssh-server) started on
127.0.0.1 with a temporary host key and client key; and every way reaching the device fails, each one line, exit 1,
nothing left on the device."""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NEEDS_SSHD, ROOT, free_port, keygen, run_module

FIXTURES = ROOT / "tests" / "fixtures" / "sparse"


def with_option(options: list[str], flag: str, value: str | None) -> list[str]:
    """`options` with FLAG's value replaced (or FLAG removed when value is None)."""
    out, skip = [], False
    for i, item in enumerate(options):
        if skip:
            skip = False
            continue
        if item == flag:
            skip = True
            if value is not None:
                out += [flag, value]
            continue
        out.append(item)
    return out


def left_on_device(sshd) -> list[str]:
    return sorted(p.name for p in sshd["device"].iterdir())


def one_line_failure(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@NEEDS_SSHD
def test_bench_on_the_device(sshd):
    files = [FIXTURES / "int8.dense.tflite", FIXTURES / "float32.dense.tflite"]
    done = run_module("runtime", "bench", *map(str, files), *sshd["options"], "--threads", "1,all", "--runs", "20",
                      "--json", "--input", "float")  # the fixtures have no sidecars: float input, not pixels
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = report["results"]
    assert [(Path(r["model"]), r["threads"]) for r in rows] == [(f, n) for f in files for n in (1, os.cpu_count())]
    for row in rows:
        device = row["device"]
        assert device["host"].endswith(f"127.0.0.1:{sshd['port']}")
        assert device["machine"] == platform.machine() and device["cores"] == os.cpu_count()
        assert device["edgekit"] and device["python"] == platform.python_version()
        assert row["call_ms"]["n"] == 20 and row["call_ms"]["median"] > 0
    assert rows[2]["size_ratio"] == pytest.approx(files[1].stat().st_size / files[0].stat().st_size)
    assert report["device"]["cpu"] == report["machine"]["cpu"]
    assert left_on_device(sshd) == []
    table = run_module("runtime", "bench", str(files[0]), *sshd["options"], "--runs", "5", "--input", "float")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"on {rows[0]['device']['host']} (") and "int8.dense.tflite" in table.stdout
    assert "[1/1] int8.dense.tflite, 1 thread(s)" in table.stderr  # the device's progress, passed on
    csv = run_module("runtime", "bench", str(files[0]), *sshd["options"], "--runs", "5", "--csv", "--input", "float")
    assert csv.returncode == 0, csv.stderr
    header, row = csv.stdout.splitlines()[:2]
    assert header.endswith(",model,device") and f"127.0.0.1:{sshd['port']} (" in row


@NEEDS_SSHD
def test_eval_on_the_device_computes_what_this_machine_computes(sshd, exported):
    artifact, _ = exported
    model = artifact / "model.int8.tflite"
    done = run_module("runtime", "eval", str(model), *sshd["options"], "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    here = json.loads(run_module("runtime", "eval", str(model), "--json").stdout)
    assert result["accuracy"] == here["accuracy"] and result["samples"] == here["samples"] == 359
    assert result["this_machine"] == {"accuracy": here["accuracy"], "same_predictions": 359}
    assert result["device"]["machine"] == platform.machine()
    text = run_module("runtime", "eval", str(model), *sshd["options"])
    assert text.returncode == 0 and "the same predicted class for 359 of 359 images" in text.stdout
    assert left_on_device(sshd) == []


@NEEDS_SSHD
def test_report_measures_latency_on_the_device(sshd, exported, tmp_path):
    artifact = tmp_path / "tiny"
    shutil.copytree(exported[0], artifact)
    for stale in ("report.md", "report.json", "bench.json"):
        (artifact / stale).unlink(missing_ok=True)
    done = run_module("runtime", "report", str(artifact), *sshd["options"], "--threads", "1", "--rounds", "3",
                      "--runs", "5", "--objective", "latency")
    assert done.returncode == 0, done.stderr
    report = json.loads((artifact / "report.json").read_text())
    assert report["machine"]["host"].endswith(f"127.0.0.1:{sshd['port']}")
    measured = [r for r in report["rows"] if r.get("latency_median_ms_1t")]
    assert len(measured) >= 5
    md = (artifact / "report.md").read_text()
    assert "Latency measured on the device" in md and "| device |" in md
    assert left_on_device(sshd) == []
    again = run_module("runtime", "report", str(artifact), "--threads", "1", "--rounds", "3", "--runs", "5",
                       "--objective", "latency")  # here: the device's cached figures are not this machine's
    assert again.returncode == 0, again.stderr
    assert "host" not in json.loads((artifact / "report.json").read_text())["machine"]
    assert len(json.loads((artifact / "bench.json").read_text())["runs"]) == 2


@NEEDS_SSHD
def test_each_way_of_failing_is_one_line_and_leaves_nothing(sshd, tmp_path):
    model = str(FIXTURES / "int8.dense.tflite")
    base = sshd["options"]

    def bench(options):
        return run_module("runtime", "bench", model, *options, "--runs", "3", "--input", "float", timeout=120)

    one_line_failure(bench(with_option(base, "--port", str(free_port()))), "refused the connection")
    stranger = keygen(tmp_path / "stranger")
    one_line_failure(bench(with_option(base, "--identity", str(stranger))), "refused the login", "--identity")
    keygen(tmp_path / "other_host")
    changed = tmp_path / "changed_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd['port']} {(tmp_path / 'other_host.pub').read_text()}")
    one_line_failure(bench(with_option(base, "--ssh-option", f"UserKnownHostsFile={changed}")),
                     "REMOTE HOST IDENTIFICATION HAS CHANGED", "refused")
    unknown = tmp_path / "empty_hosts"
    unknown.write_text("")
    one_line_failure(bench(with_option(base, "--ssh-option", f"UserKnownHostsFile={unknown}")),
                     "not in known_hosts", "never accepts")
    assert unknown.read_text() == ""  # the key was not added
    one_line_failure(bench(with_option(base, "--remote-python", "/nonexistent/python3")), "not found",
                     "--remote-python")
    bare = tmp_path / "bare-python"  # a Python without site-packages: no EdgeKit
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    one_line_failure(bench(with_option(base, "--remote-python", str(bare))), "EdgeKit is not installed",
                     "pip install")
    old = tmp_path / "old"  # EdgeKit whose metadata says another version
    (old / "edgekit_ml-0.0.9.dist-info").mkdir(parents=True)
    (old / "edgekit_ml-0.0.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: edgekit-ml\n"
                                                                 "Version: 0.0.9\n")
    older = tmp_path / "older-python"
    older.write_text(f'#!/bin/sh\nPYTHONPATH={old} exec {sys.executable} "$@"\n')
    older.chmod(0o755)
    one_line_failure(bench(with_option(base, "--remote-python", str(older))), "runs EdgeKit 0.0.9",
                     "--allow-version-mismatch")
    allowed = run_module("runtime", "bench", model, *with_option(base, "--remote-python", str(older)),
                         "--allow-version-mismatch", "--runs", "3", "--json", "--input", "float")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["results"][0]["device"]["edgekit"] == "0.0.9"
    assert left_on_device(sshd) == []


@NEEDS_SSHD
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="a tiny tmpfs needs root")
def test_a_full_disk_on_the_device(sshd, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], check=True)
    try:
        done = run_module("runtime", "bench", str(FIXTURES / "float32.dense.tflite"),
                          *with_option(sshd["options"], "--remote-dir", str(full)), "--runs", "3")
        one_line_failure(done, "MiB free", "--remote-dir")
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


@NEEDS_SSHD
def test_interrupted_it_leaves_nothing_on_the_device(sshd):
    command = [sys.executable, "-m", "runtime", "bench", str(FIXTURES / "int8.dense.tflite"), *sshd["options"],
               "--seconds", "60", "--input", "float"]
    # Ctrl-C's SIGINT, restored to its default: a shell starts background jobs with it ignored, and Python then
    # never raises KeyboardInterrupt
    bench = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any((p / "uploads" / "int8.dense.tflite").is_file() for p in sshd["device"].iterdir()):
        assert bench.poll() is None and time.monotonic() < deadline, bench.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # the device's bench is running
    bench.send_signal(signal.SIGINT)
    _, err = bench.communicate(timeout=60)
    assert bench.returncode == 130 and "interrupted" in err, err
    deadline = time.monotonic() + 20
    while left_on_device(sshd) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left_on_device(sshd) == []
    workers = subprocess.run(["pgrep", "-f", "runtime.remote"], capture_output=True, text=True).stdout.split()
    assert [pid for pid in workers if int(pid) != os.getpid()] == []


def test_device_options_are_checked_first():
    for options, words in ((["--port", "22"], "--port is for a device"),
                           (["--host=-oProxyCommand=touch /tmp/x"], "--host takes [USER@]HOST"),
                           (["--host", "pi@raspberrypi", "--ssh-option=-F/dev/null"], "KEY=VALUE")):
        done = run_module("runtime", "bench", str(FIXTURES / "int8.dense.tflite"), *options)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and words in done.stderr, done.stderr


def _agent(request: dict, payload: bytes = b"") -> tuple[int, list[dict]]:
    """The device's side of a session, run here on stdin and stdout as sshd would run it."""
    done = subprocess.run([sys.executable, "-m", "runtime.remote", "agent"], cwd=ROOT, capture_output=True,
                          input=json.dumps(request).encode() + b"\n" + payload, timeout=120)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_the_agent_refuses_what_a_host_should_never_send_and_keeps_nothing(tmp_path):
    """The agent's own checks, without SSH: a name that leaves its directory, a negative size, bytes whose sha256
    is not the one announced. Each is one error message; the directory it made is gone when it exits."""
    import hashlib

    data = b"model bytes"
    good = {"name": "model.tflite", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    cases = (({**good, "name": "../escape.tflite"}, "name"), ({**good, "size": -1}, "protocol"),
             ({**good, "sha256": "0" * 64}, "sha256"))
    for record, kind in cases:
        code, messages = _agent({"files": [record], "dir": str(tmp_path)}, data)
        assert "hello" in messages[0] and messages[-1].get("kind") == kind, messages
        assert code == 1 and list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape.tflite").exists()
    code, messages = _agent({"files": [good], "dir": str(tmp_path)}, data)  # stored, then the host went away
    assert code == 0 and messages[-1] == {"stored": 1} and list(tmp_path.iterdir()) == []
    code, messages = _agent({"files": [good], "dir": str(tmp_path)}, data[:4])  # cut off mid-file
    assert code == 1 and list(tmp_path.iterdir()) == []
