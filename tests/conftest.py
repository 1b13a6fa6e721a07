"""Shared fixtures. Nothing downloads: EDGEKIT_OFFLINE=1 and an empty Keras cache."""

import atexit
import ctypes
import gc
import gzip
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["EDGEKIT_OFFLINE"] = "1"
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="edgekit-keras-home-")  # no cached datasets
atexit.register(shutil.rmtree, os.environ["KERAS_HOME"], True)
ROOT = Path(__file__).resolve().parents[1]

# The suite's memory: TensorFlow's graphs, converters and interpreters are freed module by module (below), and
# glibc keeps two malloc arenas instead of eight per core and gives freed pages back (malloc_trim), so one
# pytest process stays small; `pytest_terminal_summary` prints the peak.
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(-8, 2)  # M_ARENA_MAX
except (OSError, AttributeError):  # not glibc
    _LIBC = None


_MEMORY = []  # (module, resident GiB after it, the process's peak GiB after it)


def _status_gib(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            line = next(line for line in fh if line.startswith(field + ":"))
        return int(line.split()[1]) / 2**20  # kB
    except (OSError, StopIteration):
        return 0.0


@pytest.fixture(autouse=True, scope="module")
def _release_memory(request):
    yield
    if "tf_keras" in sys.modules:
        sys.modules["tf_keras"].backend.clear_session()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    _MEMORY.append((request.module.__name__, _status_gib("VmRSS"), _status_gib("VmHWM")))


# Tests that run TensorFlow-heavy processes beside this one (search workers, in_subprocess children): first, while
# this one is small, so that the two together stay small (the suite's summed peak, README: Tests)
FIRST = ("test_search.py", "test_qat_int8.py", "test_foreign.py", "test_zoo.py", "test_backbones.py",
         "test_train_devices.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def in_subprocess(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh Python process (spawned, never forked from one running TensorFlow), its
    result pickled back: what TensorFlow's converters and graphs hold goes back to the system when it exits,
    instead of staying in this process for the rest of the suite. `fn` must be a module-level function."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def pytest_terminal_summary(terminalreporter):
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    terminalreporter.write_line(f"peak memory (max RSS) of the pytest process: {own:.2f} GiB")
    before = 0.0
    rises = []
    for module, resident, peak in _MEMORY:
        if peak > before + 0.05:
            rises.append(f"{module} {peak:.2f}")
        before = peak
    if rises:
        terminalreporter.write_line("  the peak (GiB) rose in: " + ", ".join(rises) +
                                    f"; resident after the last module {_MEMORY[-1][1]:.2f} GiB")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_idx_dir(directory: Path, n_train=60, n_test=20, gz=True, seed=0) -> dict:
    """Four small real IDX files, MNIST layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write_idx(directory / (name + (".gz" if gz else "")), array)
    return arrays


def run_module(*args, env=None, timeout=600):
    """Run `python -m ...` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def digits():
    from runtime.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small fashion_cnn (8/16 filters, dense 32) trained 4 epochs on digits."""
    from train.__main__ import main as train_main

    out = tmp_path_factory.mktemp("optimize") / "tiny"
    assert train_main(["--model", "fashion_cnn", "--model-arg", "filters=[8,16]", "--model-arg", "dense=32",
                       "--epochs", "4", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory):
    """`tiny` exported to every format: (artifact directory, {format: Result})."""
    import shutil

    from export import EXPORT_ALL, export

    artifact = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(tiny, artifact)
    results = {r.format: r for r in export(artifact, list(EXPORT_ALL), progress=lambda s: None)}
    return artifact, results


@pytest.fixture(scope="session")
def keras_reference(tiny, digits):
    """(test images, labels, Keras logits) of `tiny` on the digits test split."""
    from train.backend import keras

    model = keras.models.load_model(tiny / "model.keras", compile=False)
    x, y = digits.arrays("test")
    return x, y, model.predict(x, verbose=0)


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
NEEDS_SSHD = pytest.mark.skipif(not Path(SSHD).is_file() or not shutil.which("ssh"),
                                reason="needs OpenSSH's server and client (apt-get install openssh-server; .ci/run "
                                       "installs it)")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgekit-test", "-f", str(path)], check=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 with a temporary host key and client key: {"options": the command-line
    options that reach it as a device (--host ... --remote-dir), "device": the directory the device's files go to,
    "home", "port"}. Tests that use it carry NEEDS_SSHD."""
    home = tmp_path_factory.mktemp("sshd")
    host_key, client = keygen(home / "host_key"), keygen(home / "client")
    (home / "authorized_keys").write_text((home / "client.pub").read_text())
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {home}/authorized_keys\n"
        f"PidFile {home}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n")
    known = home / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {(home / 'host_key.pub').read_text()}")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory, when it runs as root
    log = open(home / "sshd.log", "w")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while "Server listening" not in (home / "sshd.log").read_text():
        assert server.poll() is None and time.monotonic() < deadline, (home / "sshd.log").read_text()
        time.sleep(0.05)
    device = home / "device"
    device.mkdir()
    options = ["--host", "root@127.0.0.1" if os.geteuid() == 0 else f"{os.environ.get('USER', 'root')}@127.0.0.1",
               "--port", str(port), "--identity", str(client), "--ssh-option", f"UserKnownHostsFile={known}",
               "--remote-python", sys.executable, "--remote-dir", str(device)]
    yield {"options": options, "home": home, "device": device, "port": port}
    server.terminate()
    server.wait(10)
    log.close()


def check_micro_answer(run: Path, report: dict, digits) -> None:
    """A pipeline run for a microcontroller: every micro file measured in TFLM, the answer the smallest arena within
    the budget, and deploy/ holding its C sources and a main.cc that carries the first test image with the class
    EdgeKit's TFLM run gives it (scripts/check-micro-firmware builds and runs it against TFLM)."""
    import re

    from runtime.load import load

    micro = [r for r in report["rows"] if r["format"] == "micro"]
    assert all(r["arena_bytes"] > 0 and r["macs"] > 0 and r["evaluated_by"] == "tflite-micro" for r in micro)
    chosen = next(r for r in report["recommendations"] if r["objective"] == "arena")["choice"]
    row = next(r for r in micro if r["file"] == chosen["file"])
    assert row["arena_bytes"] == min(r["arena_bytes"] for r in micro if not r["over_budget"])
    assert "smallest RAM on a microcontroller" in (run / "report.md").read_text().splitlines()[2]
    deploy, artifact = run / "deploy", (run / chosen["file"]).parent
    assert sorted(p.name for p in deploy.iterdir()) == ["main.cc", "model.micro.cc", "model.micro.h"]
    assert all((deploy / n).read_bytes() == (artifact / n).read_bytes() for n in ("model.micro.cc", "model.micro.h"))
    main = (deploy / "main.cc").read_text()
    pixels = re.search(r"kTestImage\[(\d+)\] = \{([^}]*)\}", main)
    assert int(pixels[1]) == digits.x_test[0].size
    assert np.array_equal(np.array([int(v) for v in pixels[2].split(",")]), digits.x_test[0].ravel())
    expected = load(run / chosen["file"]).logits(digits.x_test[:1]).argmax()  # in TFLM, as the report evaluated
    assert f"constexpr int kTestImageClass = {expected};" in main and "int Classify(const uint8_t* pixels)" in main
