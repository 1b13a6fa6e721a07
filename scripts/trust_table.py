"""Try EdgeKit as an adversary would and print what each bad input gets: exit code and message.

    python scripts/trust_table.py [--workdir DIR]

Trains a tiny model on digits, exports it, then runs every command on the bad inputs of issues 10, 25 and 36
(code in model files, tampered artifacts, bad images and arrays, impossible options; unbounded counts, memory
bombs, NaN models, storage passwords, escape sequences, crafted checkpoints, TF_CONFIG; round three: a hostile
host talking to the device agent over its stdin, a hostile device played by a fake `ssh` on PATH, crafted sparse
indices, ONNX external data in a subgraph, inputs EdgeKit does not feed) and prints a Markdown table: input ->
command -> exit code -> the one `error:` line. Takes about 3 minutes on 2 cores. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(*args, prefix=(), stdin: bytes | None = None, env: dict | None = None) -> tuple[int, str]:
    """`python -m ARGS`, or with ARGS = ("@env", "NAME=value", python, "-m", ...) that command under env; `stdin`:
    bytes for its standard input (the device agent's protocol)."""
    command = ["env", *map(str, args[1:])] if args and args[0] == "@env" else \
        [*prefix, sys.executable, "-m", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, input=stdin, timeout=900,
                          env={**os.environ, "EDGEKIT_OFFLINE": "1", **(env or {})})
    done.stdout, done.stderr = (done.stdout or b"").decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    if stdin is not None:  # the agent: its error is a protocol message on stdout
        done.stderr += "".join(f"error: {m['error']} (kind {m['kind']})\n" for m in map(json.loads,
                               done.stdout.splitlines()) if "error" in m)
    if "S3cretPW" in done.stdout + done.stderr:
        return done.returncode, "PASSWORD PRINTED"
    if "\x1b" in done.stdout:
        return done.returncode, "RAW ESCAPE SEQUENCE ON THE TERMINAL"
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    if "Traceback" in done.stderr:
        lines.append("TRACEBACK")
    return done.returncode, " / ".join(lines) or "(no error line)"


def cases(w: Path) -> list[tuple[str, list]]:
    """(what was tried, python -m arguments) after building the files they need in `w`."""
    from PIL import Image

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from runtime.datasets import load_dataset
    from test_trust import _png_header_only as png_header  # the bombs the tests use
    from runtime.fsutil import sha256_file

    art, model = w / "art", w / "art" / "model.int8.tflite"
    digits = load_dataset("digits")
    # code in model files
    from train.backend import keras, tf

    marker = w / "pwned"

    def net(middle):
        inputs = keras.Input((28, 28, 1))
        return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(middle(inputs))))

    net(keras.layers.Lambda(lambda x, p=str(marker): (open(p, "w").close(), x)[1])).save(w / "lambda.h5")

    class Writer(keras.layers.Layer):
        def call(self, x):
            with tf.control_dependencies([tf.io.write_file(str(marker), "pwned")]):
                return tf.identity(x)

    net(Writer()).save(w / "saved", save_format="tf")
    marker.unlink(missing_ok=True)
    # tampered artifacts
    for name in ("abs", "dotdot", "swapped"):
        shutil.copytree(art, w / name)
    for name, model_file in (("abs", "/etc/x.h5"), ("dotdot", "../lambda.h5")):
        manifest = json.loads((w / name / "manifest.json").read_text())
        manifest["model_file"] = model_file
        manifest["files"][model_file] = manifest["files"]["model.keras"]
        (w / name / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(w / "lambda.h5", w / "swapped" / "model.keras")
    for stem, change in (("scale", lambda s: s["input"].update(scale="abc")), ("nosha", lambda s: s.pop("sha256")),
                         ("labels", lambda s: s.update(labels=[f"class {v}" for v in s["labels"]]))):
        shutil.copy(art / "model.int8.tflite", w / f"{stem}.int8.tflite")  # alone: no manifest beside it
        sidecar = json.loads((art / "model.int8.json").read_text())
        change(sidecar)
        (w / f"{stem}.int8.json").write_text(json.dumps(sidecar))
    shutil.copytree(art, w / "edited")
    (w / "edited" / "model.int8.json").write_text((w / "labels.int8.json").read_text())
    # bad images and arrays
    Image.fromarray(digits.x_test[0, ..., 0].astype(np.uint16) * 257).save(w / "digit16.png")
    np.save(w / "float255.npy", digits.x_test[:3].astype(np.float32))
    np.save(w / "empty.npy", np.zeros((0, 28, 28, 1), np.uint8))
    with open(w / "huge.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (292 << 30,)})
    png_header(w / "bomb.png", 20000, 20000)
    png_header(w / "bomb31.png", 2**31 - 1, 2**31 - 1)
    os.mkfifo(w / "fifo.png")
    (w / "dir.png").mkdir()
    (w / "loop.png").symlink_to(w / "loop.png")
    np.save(w / "unreadable.npy", digits.x_test[:1])
    os.chmod(w / "unreadable.npy", 0)
    idx = w / "idx"
    idx.mkdir()
    header = bytes([0, 0, 8, 3]) + struct.pack(">III", 60000, 1000000, 1000)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (idx / name).write_bytes(gzip.compress(header))
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (idx / name).write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + b"\0"))
    failed = w / "failed"
    failed.mkdir()
    (failed / "manifest.json").write_text(json.dumps({
        "name": "failed", "kind": "export", "model": "bare", "dataset": {"name": "digits"}, "parent": {"path": "x"},
        "created": "2026-11-23T00:00:00+00:00", "versions": {}, "preprocessing": {"size": [28, 28], "channels": 1},
        "labels": list("0123456789"), "input_shape": [28, 28, 1], "metrics": {"accuracy": None, "size_bytes": 0},
        "files": {}, "exports": {"float32": {"file": None, "passed": False, "message": "converter refused"}}}))
    assert sha256_file(model)
    # round two (issue 25)
    import io
    import zipfile

    np.save(w / "digit.npy", digits.x_test[0])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        packed.writestr("labels.txt", b"\0" * (200 << 20))
    lying = bytearray(buffer.getvalue())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # declared 20 bytes, inflates to 200 MB
        start = lying.find(signature)
        lying[start + offset:start + offset + 4] = (20).to_bytes(4, "little")
    (w / "bomb.int8.tflite").write_bytes(model.read_bytes() + bytes(lying))
    (w / "twice.txt").write_text("zero\n1\n2\n3\n4\n5\n6\n7\n8\nzero\n")
    (w / "ansi.txt").write_text("\n".join(f"{i}\x1b]8;;http://attacker.example/\x07x\x1b[2J" for i in range(10)))
    (w / "garbage.db").write_bytes(np.random.default_rng(0).bytes(4096))
    (w / "tbfile").write_text("x")
    nan_net = net(lambda x: x)
    kernel, bias = nan_net.layers[-1].get_weights()
    kernel[0, 0] = np.nan
    nan_net.layers[-1].set_weights([kernel, bias])
    nan_net.save(w / "nan.keras")
    (w / "nan.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(nan_net).convert())
    import h5py

    with h5py.File(w / "bomb.h5", "w") as f:
        f.attrs["layer_names"] = [b"conv"]
        f.create_dataset("conv/conv/kernel:0", shape=(2 ** 31,), dtype="float32")
    crafted = w / "o9.checkpoint"
    crafted.mkdir(exist_ok=True)
    (crafted / "config.json").write_text("{}")
    (crafted / "state.json").write_text(json.dumps({"states": [{
        "epoch": 2, "history": {"loss": [1.0, 0.5]}, "best_file": "/etc/passwd", "stopped": False,
        "stopper": {"wait": 0, "best": 0.5, "best_epoch": 1, "stopped_epoch": 0},
        "plateau": {"wait": 0, "best": 0.5, "cooldown_counter": 0}}]}))
    env = ("env",)
    round_two = [
        ("predict --threads 1000000", ["runtime", "predict", model, w / "digit.npy",
                                       "--threads", "1000000"]),
        ("bench --threads 298 (ONNX hung)", ["runtime", "bench", art / "model.onnx-int8.onnx", "--threads", "298"]),
        ("pipeline --search --jobs 100", ["pipeline", "--search", "--jobs", "100", "--out", w / "o10"]),
        ("train --devices cpu:64", ["train", "--model", "fashion_cnn", "--devices", "cpu:64", "--out", w / "o11"]),
        ("train --weights: 2^31 elements declared, never written", ["train", "--model", "mobilenet_v2", "--image-size",
                                                                     "32", "--channels", "3", "--weights", w / "bomb.h5",
                                                                     "--out", w / "o12"]),
        (".tflite whose packed labels declare 20 bytes, inflate to 200 MB", ["runtime", "predict",
                                                                             w / "bomb.int8.tflite", w / "digit.npy"]),
        ("--std 1e-45", ["runtime", "predict", model, w / "digit.npy", "--mean", "0", "--std", "1e-45"]),
        ("--mean without --std", ["runtime", "predict", model, w / "digit.npy", "--mean", "127.5"]),
        ("--mean 1e30 --std 1e-30", ["runtime", "predict", model, w / "digit.npy", "--mean", "1e30", "--std", "1e-30"]),
        ("--labels with a repeated name", ["runtime", "predict", model, w / "digit.npy", "--labels", w / "twice.txt"]),
        ("--labels with OSC/ANSI escapes (printed escaped)", ["runtime", "predict", model, w / "digit.npy", "--labels",
                                                             w / "ansi.txt"]),
        ("Keras model with NaN weights", ["export", "--tflite", w / "nan.keras", "--dataset", "digits", "--out",
                                          w / "o13"]),
        ("TFLite file with NaN outputs", ["runtime", "predict", w / "nan.tflite", w / "digit.npy", "--mean", "0",
                                          "--std", "255"]),
        ("--storage with a password, no server", ["pipeline", "--search", "--out", w / "o14", "--storage",
                                                  "postgresql+psycopg2://edgekit:S3cretPW@127.0.0.1:1/edgekit"]),
        ("--storage sqlite:// (in memory)", ["pipeline", "--search", "--out", w / "o14", "--storage", "sqlite://"]),
        ("--storage inside the base artifact", ["pipeline", "--search", "--out", w / "o14", "--storage",
                                                f"sqlite:///{art}/search.db"]),
        ("--storage: a corrupted database", ["pipeline", "--search", "--out", w / "o14", "--storage",
                                             f"sqlite:///{w}/garbage.db"]),
        ("state.json best_file /etc/passwd", ["train", "--model", "fashion_cnn", "--resume", "--out", w / "o9"]),
        ("TF_CONFIG not json", ["TF_CONFIG=not json", sys.executable, "-m", "train", "--model", "fashion_cnn",
                                "--out", w / "o15"]),
        ("TF_CONFIG []", ["TF_CONFIG=[]", sys.executable, "-m", "train", "--model", "fashion_cnn", "--out", w / "o15"]),
        ("TF_CONFIG worker index 5", ['TF_CONFIG={"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", '
                                      '"index": 5}}', sys.executable, "-m", "train", "--model", "fashion_cnn", "--out",
                                      w / "o15"]),
        ("TF_CONFIG task type ps", ['TF_CONFIG={"cluster": {"ps": ["localhost:1"], "worker": ["localhost:2"]}, "task": '
                                    '{"type": "ps", "index": 0}}', sys.executable, "-m", "train", "--model",
                                    "fashion_cnn", "--out", w / "o15"]),
        ("--tensorboard a file", ["train", "--model", "fashion_cnn", "--tensorboard", w / "tbfile", "--out", w / "o16"]),
        ("--tensorboard inside --out", ["train", "--model", "fashion_cnn", "--tensorboard", w / "o16" / "logs",
                                        "--out", w / "o16"]),
    ]
    return [
        (".h5 with a Lambda that creates a file", ["export", "--all", w / "lambda.h5", "--dataset", "digits",
                                                    "--out", w / "o1"]),
        ("SavedModel with tf.io.write_file", ["export", "--tflite", "--onnx", w / "saved", "--dataset", "digits",
                                              "--out", w / "o2"]),
        ("manifest model_file: absolute path", ["export", "--tflite", w / "abs"]),
        ("manifest model_file: ../lambda.h5", ["optimize", "prune", w / "dotdot", "--out", w / "o3"]),
        ("swapped model.keras", ["export", "--tflite", w / "swapped"]),
        ("swapped model.keras", ["runtime", "info", w / "swapped"]),
        ('sidecar "scale": "abc"', ["runtime", "predict", w / "scale.int8.tflite", w / "digit16.png"]),
        ("sidecar without sha256", ["runtime", "predict", w / "nosha.int8.tflite", w / "digit16.png"]),
        ("sidecar edited in an artifact", ["runtime", "predict", w / "edited" / "model.int8.tflite",
                                           w / "digit16.png"]),
        ("16-bit PNG of a digit", ["runtime", "predict", model, w / "digit16.png"]),
        ("unreadable .npy (as a user without root's override)", ["runtime", "predict", model,
                                                                 w / "unreadable.npy"]),
        ("optimize --force A --out A", ["optimize", "prune", "--force", art, "--out", art]),
        ("optimize --out inside the parent", ["optimize", "prune", art, "--out", art / "sub"]),
        ("optimize --out containing the parent", ["optimize", "prune", "--force", art, "--out", w]),
        ("float pixels 0..255 to a [0, 1] model", ["runtime", "predict", model, w / "float255.npy"]),
        ("20000x20000 PNG header", ["runtime", "predict", model, w / "bomb.png"]),
        ("2^31-1 x 2^31-1 PNG header", ["runtime", "predict", model, w / "bomb31.png"]),
        (".npy header claiming 292 GiB", ["runtime", "predict", model, w / "huge.npy"]),
        ("0-sized .npy", ["runtime", "predict", model, w / "empty.npy"]),
        ("IDX header promising 60 TB", ["train", "--model", "fashion_cnn", "--dataset", "mnist", "--data-dir", idx,
                                        "--out", w / "o4"]),
        ("a FIFO as an image", ["runtime", "predict", model, w / "fifo.png"]),
        ("a directory as an image", ["runtime", "predict", model, w / "dir.png"]),
        ("a symlink loop as an image", ["runtime", "predict", model, w / "loop.png"]),
        ("bench --seconds nan", ["runtime", "bench", model, "--seconds", "nan"]),
        ("bench --seconds inf", ["runtime", "bench", model, "--seconds", "inf"]),
        ("report --seconds nan", ["runtime", "report", art, "--seconds", "nan"]),
        ("pipeline --bench-seconds inf", ["pipeline", "--bench-seconds", "inf", "--out", w / "o5"]),
        ("train --image-size 100000", ["train", "--model", "fashion_cnn", "--image-size", "100000", "--out",
                                       w / "o6"]),
        ("cluster --clusters 100000", ["optimize", "cluster", "--clusters", "100000", art, "--out", w / "o7"]),
        ("export --opset 1", ["export", "--onnx", "--opset", "1", art]),
        ("prune --structured 2:4 --sparsity 0.5", ["optimize", "prune", "--structured", "2:4", "--sparsity", "0.5",
                                                   art, "--out", w / "o8"]),
        ("runtime info, every format failed", ["runtime", "info", failed]),
    ] + [(what, ["@env", *command] if str(command[0]).startswith("TF_CONFIG=") else command)
         for what, command in round_two]


def round_three(w: Path) -> list[tuple[str, str, int, str]]:
    """Issue 36's cases: (input tried, command, exit code, message), each run as the tests run it."""
    import hashlib

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import test_hostile_device as device
    import test_sparse as sparse

    rows = []
    store, marker = w / "device", w / "imported"
    store.mkdir(exist_ok=True)
    model = (w / "art" / "model.int8.tflite").read_bytes()
    evil = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n".encode()
    spec = {**device.BENCH_SPEC, "paths": ["model.tflite"]}
    for what, files in (("upload runtime/__init__.py, runtime/bench.py", {"runtime/__init__.py": evil,
                                                                           "runtime/bench.py": evil}),
                        ("upload json.py, argparse.py", {"json.py": evil, "argparse.py": evil})):
        files = {"model.tflite": model, **files}
        agent = device.Agent()
        agent.write(device._request(files, store))
        agent.read()
        agent.write(device._run_line(["runtime.remote", "bench", json.dumps(spec)]))
        done = agent.until("done")
        code, _ = agent.end()
        rows.append((f"{what}, then the bench job", "runtime.remote agent", code,
                     f"job exit {done.get('done', {}).get('returncode')}; uploaded code imported: "
                     f"{'YES' if marker.exists() else 'no'}; left on the device: {len(list(store.iterdir()))}"))
    digest = hashlib.sha256(b"x").hexdigest()
    stored = device._request({"model.tflite": model}, store)
    for what, stdin in (
            ("job runtime.bench (not EdgeKit's agent job)", stored + device._run_line(["runtime.bench", "{}"])),
            ('`{"run":` + 200,000 `[` after the files', stored + b'{"run":' + b"[" * 200_000 + b"\n"),
            ("a first line of 200,000 `[`", b"[" * 200_000 + b"\n"),
            ("a file name with \\u0000", json.dumps({"files": [{"name": "a\u0000b", "size": 1, "sha256": digest}],
                                                      "dir": str(store)}).encode() + b"\nx"),
            ("files `a` then `a/b`", json.dumps({"files": [{"name": "a", "size": 1, "sha256": digest},
                                                           {"name": "a/b", "size": 1, "sha256": digest}],
                                                 "dir": str(store)}).encode() + b"\nxx"),
            ('"dir": "/etc/hostname"', json.dumps({"files": [{"name": "a", "size": 1, "sha256": digest}],
                                                   "dir": "/etc/hostname"}).encode() + b"\nx")):
        code, message = run("runtime.remote", "agent", stdin=stdin)
        rows.append((what, "runtime.remote agent", code, f"{message}; left: {len(list(store.iterdir()))}"))
    # a hostile device: the fake ssh of the tests
    fake = w / "fake-ssh"
    fake.mkdir(exist_ok=True)
    (fake / "ssh").write_text(device.FAKE_SSH.format(python=sys.executable, root=str(ROOT)))
    (fake / "ssh").chmod(0o755)
    bench = subprocess.run([sys.executable, "-m", "runtime", "bench", str(w / "art" / "model.int8.tflite"), "--runs",
                            "3", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    fake_env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
                "FAKE_ROW": json.dumps(json.loads(bench.stdout)["results"][0])}
    formula = '=HYPERLINK("http://example.invalid/","x")'
    for what, case, extra in (
            ('a row with "size_bytes": 0', {"row": {"size_bytes": 0}}, []),
            ('a row with "size_bytes": 1e308', {"row": {"size_bytes": 1e308}}, []),
            ("a row whose model is a list", {"row": {"model": ["model.int8.tflite"]}}, []),
            ('"done" with "stdout" an object', {"done": {"stdout": {"x": 1}}}, []),
            ('"files" sent as a list (no longer read)', {"done": {"files": [1, 2]}}, []),
            ("a hello nested 200,000 deep", {"hello_deep": 200_000}, []),
            ("400 MiB on stderr, no newline (host's peak RSS)", {"stderr_mib": 400}, []),
            (f"backend `{formula}` into --csv", {"row": {"backend": formula}}, ["--csv"])):
        args = ["bench", str(w / "art" / "model.int8.tflite"), "--host", "pi@device", "--runs", "3", *extra]
        env = {**fake_env, "FAKE_DEVICE": json.dumps(case)}
        if "stderr_mib" in case:
            code_text = ("import atexit, runpy, sys\ndef peak():  # VmHWM: ru_maxrss would count the parent it forked from\n"
                         "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
                         "    print('error: peak RSS', int(line.split()[1]) // 1024, 'MiB', file=sys.stderr)\n"
                         "atexit.register(peak)\n"
                         f"sys.argv = ['runtime', *{args!r}]\nrunpy.run_module('runtime', run_name='__main__')\n")
            code, message = run("@env", *[f"{k}={v}" for k, v in env.items()], sys.executable, "-c", code_text)
        elif extra:
            done = subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, **env}, timeout=300)
            cell = next(csv.DictReader(io.StringIO(done.stdout)))["backend"] if done.returncode == 0 else "-"
            code, message = done.returncode, f"CSV cell: `{cell}`"
        else:
            code, message = run("runtime", *args, env=env)
        rows.append((what, "runtime bench --host (fake ssh)", code, message))
    # crafted files
    for what, change in (("sparse CSR index -3", sparse._negative_index), ("sparse index repeated in a row",
                                                                           sparse._repeated_index)):
        path = sparse._hostile(w, change)
        target = w / f"{change.__name__.strip('_')}.tflite"
        path.rename(target)
        rows.append((what, "runtime info", *run("runtime", "info", target)))
    graph = device._classifier_with_an_if(w / "if.onnx", "/etc/passwd")
    rows.append(("ONNX If branch with external data /etc/passwd", "export --onnx",
                 *run("export", "--onnx", graph, "--dataset", "digits", "--out", w / "o20")))
    rows.append(("the same file", "runtime info", *run("runtime", "info", graph)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to build the files (default: a temporary directory)")
    parser.add_argument("--round", choices=("all", "3"), default="all", help="every round, or round three alone")
    args = parser.parse_args()
    w = Path(args.workdir or tempfile.mkdtemp(prefix="edgekit-trust-"))
    w.mkdir(parents=True, exist_ok=True)
    code, message = run("train", "--model", "fashion_cnn", "--model-arg", "filters=[8,16]", "--model-arg", "dense=32",
                        "--epochs", "2", "--quiet", "--out", w / "art", "--force")
    assert code == 0, message
    code, message = run("export", "--tflite", "--onnx", "--quantize", "int8", w / "art", "--quiet")
    assert code == 0, message
    print("| input tried | command | exit | message |\n|---|---|---|---|")
    for what, command in (cases(w) if args.round == "all" else []):
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--") \
            if "unreadable" in what and os.geteuid() == 0 else ()
        code, message = run(*command, prefix=prefix)
        shown = " ".join(str(a).replace(str(w) + "/", "") for a in
                         (command[:2] if command[0] != "@env" else ["TF_CONFIG=...", *command[4:5]]))
        print(f"| {what} | `{shown}` | {code} | {message.replace(str(w) + '/', '').replace('|', '/')} |", flush=True)
    for what, shown, code, message in round_three(w):
        message = message.replace(str(w) + "/", "").replace("|", "/")
        message = re.sub(r"(.)\1{19,}", lambda m: f"{m.group(1)}... ({len(m.group())} of them)", message)
        print(f"| {what} | `{shown}` | {code} | {message} |", flush=True)
    marker = w / "pwned"
    print(f"\nfile created by model code: {'YES' if marker.exists() else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
