"""The pipeline end to end (--quick), resuming after deleted, corrupted and interrupted work,
and the report: rows, Pareto fronts, and the CSV and JSON schemas."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NEEDS_SSHD, ROOT, check_micro_answer, free_port, run_module
from pipeline.run import PLAN_FILE, Plan, resolve_variants, run
from runtime.report import CSV_COLUMNS


def _quiet(*_):
    pass


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "quick"
    report = run(Plan(quick=True, out=out), say=_quiet)
    return out, report


@pytest.fixture()
def quick_copy(quick_run, tmp_path):
    """A private copy of the quick run, for tests that damage it."""
    out = tmp_path / "quick"
    shutil.copytree(quick_run[0], out)
    return out


def _stages(out):
    return {name: s["status"] for name, s in json.loads((out / PLAN_FILE).read_text())["stages"].items()
            if name != "total"}


def test_quick_pipeline_end_to_end(quick_run):
    out, report = quick_run
    assert report["failed_stages"] == []
    for name in ("report.md", "report.csv", "report.json", "accuracy_vs_size.png", "accuracy_vs_latency.png",
                 "bench.json", PLAN_FILE):
        assert (out / name).is_file(), name
    rows = report["rows"]
    assert [(r["variant"], r["format"]) for r in rows] == [
        ("base", "float32"), ("base", "int8"), ("base", "onnx-float32"),
        ("pruned80", "float32"), ("pruned80", "int8"), ("pruned80", "onnx-float32"), ("qat", "int8")]
    assert all(r["status"] == "verified" for r in rows)
    assert set(_stages(out).values()) == {"done"}
    assert (out / "accuracy_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rows_compare_with_the_float_baseline(quick_run):
    out, report = quick_run
    rows = {(r["variant"], r["format"]): r for r in report["rows"]}
    base = rows["base", "float32"]
    assert report["baseline"] == "base float32" and report["budget"] == 1.0
    assert base["accuracy_change_pts"] == 0 and base["agreement"] == 1 and base["size_ratio"] == 1
    assert base["speedup_1t"] == 1 and base["vs_baseline_1t"] == "tied" and base["p_value"] == 1
    assert rows["base", "int8"]["size_ratio"] < 0.4
    assert rows["pruned80", "int8"]["gzip_bytes"] < 0.6 * rows["base", "int8"]["gzip_bytes"]  # zeros compress
    for row in rows.values():
        assert row["test_images"] == 359 and row["correct"] == round(row["accuracy"] * 359)
        assert 0 <= row["accuracy_low"] < row["accuracy"] < row["accuracy_high"] <= 1
        assert row["latency_low_ms_1t"] <= row["latency_median_ms_1t"] <= row["latency_high_ms_1t"]
        assert row["size_bytes"] == Path(row["file"]).stat().st_size
        assert row["over_budget"] == (row["accuracy_change_pts"] < -1.0)
        if row["over_budget"]:
            assert not any(row[f"pareto_{k}"] for k in ("size", "gzip", "latency_1t"))
    chosen = [rec["choice"] for rec in report["recommendations"]]
    assert [rec["objective"] for rec in report["recommendations"]] == ["size", "gzip", "latency_1t"]
    assert all(c is not None and not c["over_budget"] and c[f"pareto_{rec['objective']}"]
               for c, rec in zip(chosen, report["recommendations"]))


def test_report_files_for_people_and_for_tools(quick_run):
    out, report = quick_run
    with open(out / "report.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 7 and rows[0]["variant"] == "base" and float(rows[0]["size_ratio"]) == 1.0
    assert {r["over_budget"] for r in rows} <= {"true", "false"} and {r["pareto_size"] for r in rows} <= {"true", "false"}
    assert all((out / r["file"]).is_file() and not Path(r["file"]).is_absolute() for r in rows)  # relative paths
    saved = json.loads((out / "report.json").read_text())
    assert {"created", "machine", "baseline", "budget_points", "recommendations", "summary", "notes", "plots", "rows",
            "bench_settings"} <= set(saved)
    assert {"cpu", "cores", "versions"} <= set(saved["machine"]) and "onnxruntime" in saved["machine"]["versions"]
    assert saved["bench_settings"]["threads"] == [1] and saved["bench_settings"]["rounds"] == 10
    assert all(not k.startswith("_") for r in saved["rows"] for k in r)
    assert saved["recommendations"][0]["choice"]["file"] in {r["file"] for r in rows}
    md = (out / "report.md").read_text()
    # the recommendation first, then the header a person reads, then every file
    assert md.index("## Recommendation") < md.index("| dataset | digits, test split of 359 images |") < md.index(
        "| variant | format |")
    assert "## Recommendation: smallest file, within the budget of 1 point" in md and "exact McNemar p = " in md
    assert "| accuracy budget | 1 point below the baseline" in md and "![accuracy vs size](accuracy_vs_size.png)" in md


def test_one_recommendation_for_the_objective_with_commands_that_run_from_here(quick_copy, monkeypatch):
    import shlex

    from runtime.report import build

    monkeypatch.chdir(quick_copy.parent)  # where the user stands: the report's paths differ from the commands'
    report = build("quick", threads=[1, 2], runs=2, rounds=3, objective="latency")  # 1 thread answers it
    rows = {(r["variant"], r["format"]): r for r in report["rows"]}
    # pruning zeroes weights and changes no shape: one graph; quantizing changes the operators
    assert rows["pruned80", "float32"]["graph"] == rows["base", "float32"]["graph"] != rows["base", "int8"]["graph"]
    md = (quick_copy / "report.md").read_text()
    first = md.split("## Recommendation: ")[1]
    assert first.startswith("fastest at 1 thread, within the budget of 1 point") and md.count("## Recommendation") == 1
    rec = next(r for r in report["recommendations"] if r["objective"] == "latency_1t")
    same = {(r["variant"], r["format"]) for r in rec["same_graph"]}
    assert all(rows[k]["graph"] == rec["choice"]["graph"] for k in same)
    assert ("One graph with" in first) == bool(same) and "Other objectives" in first
    assert report["summary"][0].startswith("fastest at 1 thread: ")  # the console's first line answers it too
    block = first.split("```bash\n")[1].split("```")[0].splitlines()
    evaluate = shlex.split(block[0].split("#")[0])
    assert evaluate[:4] == [sys.executable, "-m", "runtime", "eval"] and not Path(evaluate[4]).is_absolute()
    # as printed, in a new shell at that directory: no venv activated, nothing on PATH but the system's
    done = subprocess.run(["bash", "-c", block[0]], capture_output=True, text=True, cwd=quick_copy.parent,
                          env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")})
    assert done.returncode == 0 and f"{rec['choice']['accuracy']:.2%}" in done.stdout, done.stderr
    copy = next(line for line in block if line.startswith("scp "))
    copied = shlex.split(copy.split("#")[0])[1:-1]  # EdgeKit's sdist, the file and its sidecar
    assert [Path(p).suffix for p in copied] == [".gz", ".tflite", ".json"] and all(Path(p).is_file() for p in copied[1:])
    build = shlex.split(next(line for line in block if " -m build " in line).split("#")[0])
    assert (Path(build[-1]) / "pyproject.toml").is_file()  # the repository, from here
    assert subprocess.run([build[0], "-m", "build", "--version"], capture_output=True).returncode == 0
    assert f"pip install ~/{Path(copied[0]).name}" in first


def test_a_report_marks_files_over_budget_and_never_recommends_them(quick_copy):
    from runtime.report import build

    report = build(quick_copy, bench=False, budget=0.25)  # pruned80 loses more than a quarter point
    over = {(r["variant"], r["format"]) for r in report["rows"] if r["over_budget"]}
    assert {("pruned80", "float32"), ("pruned80", "int8"), ("pruned80", "onnx-float32")} <= over
    assert all(rec["choice"] is None or (rec["choice"]["variant"], rec["choice"]["format"]) not in over
               for rec in report["recommendations"])
    md = (quick_copy / "report.md").read_text()
    assert md.count("| **over** |") == len(over) and "Over the 0.25-point budget" in md
    assert not (quick_copy / "accuracy_vs_latency.png").exists()  # --no-bench: no stale latency plot
    with open(quick_copy / "report.csv", newline="") as fh:
        flagged = {(r["variant"], r["format"]) for r in csv.DictReader(fh) if r["over_budget"] == "true"}
    assert flagged == over


def test_rerun_skips_everything_that_is_complete(quick_copy):
    run(Plan(quick=True, out=quick_copy), say=_quiet)
    stages = _stages(quick_copy)
    assert {s for name, s in stages.items() if name != "report"} == {"skipped"}


def test_rerun_redoes_a_deleted_or_corrupted_file(quick_copy):
    (quick_copy / "fashion_cnn-pruned80" / "model.int8.tflite").unlink()
    with open(quick_copy / "fashion_cnn" / "model.onnx-float32.onnx", "r+b") as fh:
        fh.seek(2000)
        fh.write(b"\x00\x01\x02\x03")
    report = run(Plan(quick=True, out=quick_copy), say=_quiet)
    stages = _stages(quick_copy)
    assert stages["export:pruned80"] == "done" and stages["export:base"] == "done"
    assert stages["train"] == stages["optimize:pruned80"] == stages["export:qat"] == "skipped"
    assert all(r["status"] == "verified" for r in report["rows"]) and len(report["rows"]) == 7


@pytest.mark.slow  # 34 s: `python -m pytest -m slow` (README, Tests); resuming stays in the suite's other cases
def test_a_damaged_model_is_trained_again(quick_copy):
    with open(quick_copy / "fashion_cnn" / "model.keras", "r+b") as fh:
        fh.seek(500)
        fh.write(b"\xff\xfe\xfd")
    report = run(Plan(quick=True, out=quick_copy), say=_quiet)
    stages = _stages(quick_copy)
    assert stages["train"] == stages["export:base"] == "done"
    # the same seed trains the same bits (a .keras file carries no save time): its children stay valid
    assert stages["optimize:pruned80"] == stages["optimize:qat"] == stages["export:qat"] == "skipped"
    assert all(r["status"] == "verified" for r in report["rows"])


def test_an_interrupted_export_is_not_taken_for_complete(quick_copy, monkeypatch):
    import export.api

    shutil.rmtree(quick_copy / "fashion_cnn-qat")

    def interrupted(*args, **kwargs):  # Ctrl-C after the file is in place, before it is recorded
        raise KeyboardInterrupt

    monkeypatch.setattr(export.api, "record_exports", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(Plan(quick=True, out=quick_copy), say=_quiet)
    assert (quick_copy / "fashion_cnn-qat" / "model.int8.tflite").is_file()  # on disk, but not recorded
    monkeypatch.undo()
    run(Plan(quick=True, out=quick_copy), say=_quiet)
    stages = _stages(quick_copy)
    assert stages["optimize:qat"] == "skipped" and stages["export:qat"] == "done"


def test_report_command_is_tensorflow_free_and_reads_existing_results(quick_copy):
    code = ("import sys\nfrom runtime.__main__ import main\n"
            f"assert main(['report', {str(quick_copy)!r}, '--quiet', '--runs', '5', '--threads', '1']) == 0\n"
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tf_keras', "
            "'tensorflow_model_optimization', 'tf2onnx'}))")
    result = run_module("runtime", "report", str(quick_copy), "--no-bench", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "7 of 7 files verified" in result.stdout
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_a_damaged_manifest_is_reported_with_the_other_artifacts_and_fails_the_report(quick_copy):
    (quick_copy / "fashion_cnn-qat" / "manifest.json").write_text('{"name": "fashion_cnn-qat"')  # cut short
    result = run_module("runtime", "report", str(quick_copy), "--no-bench", "--quiet")
    assert result.returncode == 1, result.stderr
    assert "6 of 7 files verified" in result.stdout  # the qat artifact's file is not among them
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "fashion_cnn-qat/manifest.json" in error[0] and "Traceback" not in result.stderr
    report = (quick_copy / "report.md").read_text()
    assert "fashion_cnn-qat -: " in report and "pruned80 int8" in report


def test_variants_bring_their_parents_and_bad_names_are_refused():
    assert resolve_variants(["pqat"]) == ("pruned80", "pqat")
    assert resolve_variants(["cqat", "qat"]) == ("clustered16", "cqat", "qat")
    result = run_module("pipeline", "--variants", "pruned80,purned50", "--out", "/tmp/never")
    assert result.returncode == 2 and "unknown variant 'purned50'" in result.stderr
    assert "Did you mean 'pruned50'?" in result.stderr and "Traceback" not in result.stderr


def test_pipeline_refuses_other_settings_and_foreign_directories(quick_copy, tmp_path):
    result = run_module("pipeline", "--quick", "--seed", "3", "--out", str(quick_copy))
    assert result.returncode == 2 and "made with other settings (seed differ" in result.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run_module("pipeline", "--quick", "--out", str(tmp_path / "mine"), "--force")
    assert result.returncode == 2 and "is not a pipeline directory" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_a_failed_stage_is_recorded_and_the_others_still_run(quick_copy):
    """The disk fills up while the qat variant is redone: that stage and its export fail, are recorded in
    pipeline.json, every other stage still runs, nothing half-written is left, and the command exits 1."""
    import resource
    import signal

    (quick_copy / "fashion_cnn-qat" / "model.weights.h5").unlink()  # 597 KB to write again; the rest is smaller

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400 << 10, 400 << 10))

    result = subprocess.run([sys.executable, "-m", "pipeline", "--quick", "--out", str(quick_copy)], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=small_files_only, timeout=900)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    stages = json.loads((quick_copy / PLAN_FILE).read_text())["stages"]
    assert stages["optimize:qat"]["status"] == "failed" and "cannot write" in stages["optimize:qat"]["note"]
    assert stages["export:qat"]["status"] == "failed"
    assert stages["optimize:pruned80"]["status"] == "skipped" and stages["report"]["status"] == "done"
    assert "stages that failed: optimize:qat, export:qat" in result.stdout
    assert [p for p in quick_copy.rglob("*") if ".tmp-" in p.name or ".old-" in p.name] == []
    assert not (quick_copy / "fashion_cnn-qat" / "model.weights.h5").exists()


def test_info_reads_a_run_directory_and_an_artifact(quick_run):
    out, _ = quick_run
    run = run_module("runtime", "info", str(out))
    assert run.returncode == 0, run.stderr
    assert "is a pipeline run directory (fashion_cnn on digits), not an artifact: 3 artifacts" in run.stdout
    assert "to ship, within the 1-point budget:" in run.stdout and "smallest file: " in run.stdout
    art = run_module("runtime", "info", str(out / "fashion_cnn-pruned80"))
    assert art.returncode == 0, art.stderr
    assert "recipe         prune: sparsity 0.8; 2 epochs" in art.stdout
    manifest = json.loads((out / "fashion_cnn-pruned80" / "manifest.json").read_text())
    assert all(f"sha256 {record['sha256']}" in art.stdout for record in manifest["files"].values())
    typo = run_module("runtime", "bnch", str(out))
    assert typo.returncode == 2 and "did you mean 'bench'?" in typo.stderr


def test_report_html_is_self_contained_with_every_file(quick_run):
    from html.parser import HTMLParser

    out, report = quick_run
    page = (out / "report.html").read_text("utf-8")

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.seen = []

        def handle_starttag(self, tag, attrs):
            self.seen.append((tag, dict(attrs)))

    tags = Tags()
    tags.feed(page)
    links = [a.get(k) for _, a in tags.seen for k in ("src", "href") if a.get(k)]
    assert links == [] and not any(t in ("link", "iframe", "object", "embed") for t, _ in tags.seen)  # loads nothing
    assert sum(t == "tr" and a.get("class") is not None for t, a in tags.seen) == len(report["rows"])
    points = [a["id"] for t, a in tags.seen if t == "g" and a.get("id", "").startswith("ekpt-")]
    assert len(points) >= len(report["rows"]) and page.count("<title>") >= len(points)  # a tooltip per point
    assert page.count("<figure><svg") == len(report["plots"]) == 2  # the PNG figures, the same drawing
    assert "Ship " in page and "python -m runtime eval " in page


@pytest.mark.skipif(not shutil.which("chromium") or not shutil.which("chromedriver"),
                    reason="needs Debian's chromium and chromium-driver (scripts/check-report-html installs them)")
def test_report_html_in_a_real_browser(quick_run, tmp_path):
    """Chromium headless (Debian's, through selenium and chromium-driver): the page loads with no console error and
    nothing from the network, a click on a header sorts, the filter keeps matching rows; the screenshot stays in
    this test's tmp_path (pytest keeps the last three runs')."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out, report = quick_run
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get((out / "report.html").as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#files tbody tr")
        assert len(rows) == len(report["rows"])
        header = next(th for th in driver.find_elements(By.CSS_SELECTOR, "#files th") if th.text == "size KiB")
        column = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#files th")].index("size KiB")

        def sizes():
            return [float(r.find_elements(By.TAG_NAME, "td")[column].get_attribute("data-v"))
                    for r in driver.find_elements(By.CSS_SELECTOR, "#files tbody tr")]

        header.click()
        assert sizes() == sorted(sizes()) and header.get_attribute("aria-sort") == "ascending"
        header.click()
        assert sizes() == sorted(sizes(), reverse=True)
        driver.find_element(By.ID, "filter").send_keys("int8")
        shown = [r for r in driver.find_elements(By.CSS_SELECTOR, "#files tbody tr") if r.is_displayed()]
        assert shown and len(shown) < len(report["rows"]) and all("int8" in r.text for r in shown)
        tooltip = driver.execute_script("return document.querySelector('svg g[id^=ekpt] title').textContent")
        assert "accuracy" in tooltip and "KiB" in tooltip
        driver.save_screenshot(str(tmp_path / "report.html.png"))
        assert (tmp_path / "report.html.png").read_bytes()[:4] == b"\x89PNG"
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
    finally:
        driver.quit()


@NEEDS_SSHD
def test_pipeline_measures_latency_on_the_device(quick_copy, sshd):
    """--host: the rerun's stages are skipped and the report's latency comes from the device, named in report.md."""
    done = run_module("pipeline", "--quick", "--out", str(quick_copy), *sshd["options"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"benchmark on {sshd['options'][1]}:{sshd['port']} and report" in done.stdout
    report = json.loads((quick_copy / "report.json").read_text())
    assert report["machine"]["host"] == f"{sshd['options'][1]}:{sshd['port']}"
    assert any(r.get("latency_median_ms_1t") for r in report["rows"])
    assert "Latency measured on the device" in (quick_copy / "report.md").read_text()
    refused = run_module("pipeline", "--quick", "--out", str(quick_copy),
                         *[o if not o.isdigit() else str(free_port()) for o in sshd["options"]])
    assert refused.returncode == 1 and "failed: " in refused.stdout and "refused the connection" in refused.stdout


@pytest.mark.slow  # 61 s: `python -m pytest -m slow`; the suite's micro pipeline is test_foreign's nested model
@pytest.mark.skipif(importlib.util.find_spec("tflite_micro") is None, reason="needs the micro extra")
def test_pipeline_for_a_microcontroller_reports_its_micro_files(quick_copy, digits):
    """--max-ram: every variant's micro file is made and verified in TFLM, and the recommendation is the micro file
    with the smallest arena that fits; deploy/ holds its C sources and main.cc, which carries the first test image
    and the class EdgeKit's TFLM run gives it (scripts/check-micro-firmware builds and runs it against TFLM)."""
    done = run_module("pipeline", "--quick", "--out", str(quick_copy), "--max-ram", "1MiB", "--no-bench")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((quick_copy / "report.json").read_text())
    micro = [r for r in report["rows"] if r["format"] == "micro"]
    assert {r["variant"] for r in micro} == {"base", "pruned80", "qat"} and all(r["status"] == "verified" for r in micro)
    check_micro_answer(quick_copy, report, digits)


def test_a_run_directory_is_a_model_argument_and_every_suggested_fix_works(quick_copy, digits):
    """predict, eval and bench refused the run directory that info accepts, and bench's suggested fix failed too
    (issue 37): now they take the file the report recommends (bench --all: every verified file), and a run without
    a report names the command that makes it, which works."""
    import numpy as np

    report = json.loads((quick_copy / "report.json").read_text())
    chosen = next(r["choice"]["file"] for r in report["recommendations"] if r["choice"])
    np.save(quick_copy / "digit.npy", digits.x_test[0])
    for command in (["eval", str(quick_copy)], ["predict", str(quick_copy), str(quick_copy / "digit.npy")]):
        done = run_module("runtime", *command)
        assert done.returncode == 0 and f"recommended file: {quick_copy / chosen}" in done.stderr, done.stderr
    done = run_module("runtime", "bench", str(quick_copy), "--runs", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert [Path(r["model"]) for r in json.loads(done.stdout)["results"]] == [quick_copy / chosen]
    done = run_module("runtime", "bench", str(quick_copy), "--all", "--runs", "2", "--json")
    verified = [quick_copy / r["file"] for r in report["rows"] if r["status"] == "verified"]
    assert done.returncode == 0 and [Path(r["model"]) for r in json.loads(done.stdout)["results"]] == verified
    (quick_copy / "report.json").unlink()
    done = run_module("runtime", "eval", str(quick_copy))
    assert done.returncode == 2 and done.stderr.count("error:") == 1, done.stderr
    fix = done.stderr.split("make it with: ")[1].strip().split()
    assert fix[:3] == ["python", "-m", "runtime"]
    assert run_module(*fix[2:], "--runs", "2", "--rounds", "2").returncode == 0  # the fix, as suggested
    assert run_module("runtime", "eval", str(quick_copy)).returncode == 0


def test_deploy_predict_py_predicts_what_edgekit_predicts_without_edgekit(quick_run, digits, tmp_path):
    """The report writes deploy/ beside the recommended file (issue 37): predict.py, run in a Python that cannot
    import EdgeKit (no site-packages, only numpy, Pillow and ai_edge_litert on its path), gives EdgeKit's predicted
    class for every image of the test split."""
    import numpy as np

    from runtime.load import load

    out, report = quick_run
    answer = json.loads((out / "report.json").read_text())
    chosen = out / next(r["choice"]["file"] for r in answer["recommendations"] if r["choice"])
    deploy = out / "deploy"
    assert sorted(p.name for p in deploy.iterdir()) == sorted(["predict.py", chosen.name])
    assert (deploy / chosen.name).read_bytes() == chosen.read_bytes()
    site = tmp_path / "site"  # what `pip install ai-edge-litert numpy Pillow` gives a device, and nothing else
    site.mkdir()
    installed = Path(np.__file__).parents[1]
    for name in ("numpy", "numpy.libs", "PIL", "pillow.libs", "ai_edge_litert", "flatbuffers"):
        if (installed / name).exists():
            (site / name).symlink_to(installed / name)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    python = [sys.executable, "-S"]  # no site: EdgeKit's install is not on the path
    assert subprocess.run([*python, "-c", "import runtime"], env=env, capture_output=True, cwd=tmp_path).returncode == 1
    np.save(tmp_path / "test.npy", digits.x_test)
    done = subprocess.run([*python, str(deploy / "predict.py"), "--npy", str(tmp_path / "test.npy")], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    theirs = [line.split()[1] for line in done.stdout.splitlines()]
    model = load(chosen)
    ours = [model.labels[i] for i in model.predict(digits.x_test).argmax(axis=1)]
    assert len(theirs) == len(digits.x_test) and theirs == ours
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.fromarray(digits.x_test[0, ..., 0]).save(tmp_path / "digit.png")
    one = subprocess.run([*python, str(deploy / "predict.py"), str(tmp_path / "digit.png")], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0 and one.stdout.startswith(f"{tmp_path / 'digit.png'}: {ours[0]} "), one.stdout
