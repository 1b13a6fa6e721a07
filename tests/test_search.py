"""The search (python -m pipeline --search): workers sharing one study in the run directory run every trial
exactly once and lose none; a search killed mid-trial resumes with its finished trials kept and the
interrupted one run again."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

FAST = ["--epochs", "2", "--finetune-epochs", "1", "--no-bench", "--heartbeat", "1", "--techniques", "none,prune,prune24,cluster"]


def _search(out, *args, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "--search", "--out", str(out), *FAST, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _trials(out):
    from pipeline.storage import DB_FILE, trials_table

    try:
        return trials_table(f"sqlite:///{out / DB_FILE}")
    except KeyError:  # the study is not created yet
        return []


def _started(out):
    from pipeline.search import LOG_FILE

    path = out / LOG_FILE
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """A search of 4 trials by two worker processes on one study in the run directory."""
    out = tmp_path_factory.mktemp("search") / "run"
    done = _search(out, "--trials", "4", "--jobs", "2")
    stdout, stderr = done.communicate(timeout=900)
    assert done.returncode == 0, stderr[-3000:]
    return out, stdout, stderr


def test_two_workers_run_every_trial_once_and_lose_none(searched):
    out, stdout, stderr = searched
    trials = _trials(out)
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    assert len(finished) >= 4 and all(t["state"] in ("complete", "pruned", "waiting") for t in trials)
    started = [int(line[2]) for line in _started(out)]
    assert sorted(started) == sorted(set(started))  # no trial ran twice
    assert set(started) == {t["number"] for t in finished}  # and every one that ran finished
    assert len({t["worker"] for t in finished}) == 2  # both workers took trials
    for t in finished:
        if t["state"] == "complete":
            assert (out / t["file"]).is_file() and t["accuracy"] > 0.5
    assert "search: " in stdout and "to ship" not in stderr
    lines = [line for line in stdout.splitlines() if line.startswith("trial ")]  # one per trial, with its unit
    assert sorted(int(line.split()[1]) for line in lines) == sorted(t["number"] for t in finished)
    complete = [line for line in lines if " budget (" in line]
    assert len(complete) == sum(t["state"] == "complete" for t in finished)
    assert all(" KiB gzip, " in line for line in complete), complete
    from runtime.vocabulary import VARIANTS

    assert all(t["menu"] is (t["recipe"] in VARIANTS) for t in finished)  # a menu recipe is named as the menu
    md = (out / "report.md").read_text()  # the report's search section: every trial, judged like every file
    assert "## Search" in md and md.count("\n| ") >= len(trials) and (out / "search.png").is_file()
    assert all(f"| {t['number']} | {t['recipe']} |" in md for t in finished)


def test_a_killed_search_resumes_and_runs_the_interrupted_trial_again(searched, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(searched[0], out)  # 4 trials done; the study goes on to 7
    first = _search(out, "--trials", "7")
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 while a trial runs, after this run has finished one
        trials = _trials(out)
        if sum(t["state"] in ("complete", "pruned") for t in trials) > 4 and any(t["state"] == "running"
                                                                              for t in trials):
            break
        time.sleep(0.5)
    else:
        first.kill()
        pytest.fail("the search never had a finished and a running trial at once")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = {t["number"]: t for t in _trials(out)}
    interrupted = [t for t in before.values() if t["state"] == "running"]
    assert len(interrupted) == 1
    time.sleep(4)  # longer than 3 heartbeats: the interrupted trial is now stale
    again = _search(out, "--trials", "7")
    stdout, stderr = again.communicate(timeout=900)
    assert again.returncode == 0, stderr[-3000:]
    after = {t["number"]: t for t in _trials(out)}
    for number, trial in before.items():  # finished trials are kept as they were
        if trial["state"] == "complete":
            assert after[number]["state"] == "complete" and after[number]["values"] == trial["values"]
    lost = interrupted[0]
    assert after[lost["number"]]["state"] == "fail"
    retried = [t for t in after.values() if t["number"] > lost["number"] and t["params"] == lost["params"]]
    assert retried and retried[0]["state"] in ("complete", "pruned")
    assert sum(t["state"] in ("complete", "pruned") for t in after.values()) >= 7


def test_a_recipe_of_the_menu_is_the_menu_variant_not_a_new_name():
    """The pipeline's menu (fine-tuning epochs: prune 8, cluster 4, qat/pqat/cqat 3) is the search's baseline: a
    trial that draws one of its recipes is that variant's artifact, whatever the format."""
    from pipeline.space import Recipe

    assert Recipe("prune", 8, 0.5, format="dynamic").menu_variant(None) == "pruned50"
    assert Recipe("prune", 8, 0.8).menu_variant(None) == "pruned80"
    assert Recipe("prune24", 8).menu_variant(None) == "2of4"
    assert Recipe("cluster", 4, clusters=16, init="linear").menu_variant(None) == "clustered16"
    assert Recipe("qat", 3).menu_variant(None) == "qat"
    assert Recipe("prune", 7, 0.5).menu_variant(None) is None  # other epochs: another model
    assert Recipe("prune", 8, 0.51).menu_variant(None) is None
    assert Recipe("cluster", 4, clusters=16, init="density").menu_variant(None) is None
    # pqat fine-tunes pruned80 (8 epochs of pruning) for 3 epochs: the search's pqat prunes with its own epochs,
    # so only when those are the menu's is it the menu's model
    assert Recipe("pqat", 3, 0.8).menu_variant(None) is None
    assert Recipe("pqat", 1, 0.8).menu_variant(1) == "pqat" and Recipe("qat", 1).menu_variant(1) == "qat"


def test_a_trial_line_survives_what_another_machine_wrote(tmp_path):
    """The console's line per trial reads the study's storage, which other machines write: a string where a number
    belongs, or a terminal escape in a recipe, is shown, never a crash or a raw escape."""
    import optuna

    from pipeline.search import Console

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    for key, value in {"recipe": "prune\x1b]8;;http://x\x07", "format": "int8", "accuracy": "0.99",
                       "gzip_bytes": [1], "over_budget": "no", "worker": "h:1"}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, [0.5, 1.0])

    class Search:
        objective = "gzip"

    console = Console.__new__(Console)
    console.search = Search()
    line = console.line(study.trials[0])
    assert "\x1b" not in line and "\\x1b" in line and ": ?, -, within budget" in line


def test_an_arena_search_makes_every_trial_a_micro_file():
    """--objective arena: whatever the technique (QAT's too), the trial's file is the micro format, and the value
    minimized is the arena TFLM measured (the sidecar's micro.arena_bytes)."""
    import optuna

    from pipeline.search import OBJECTIVES
    from pipeline.space import suggest

    for params in ({"technique": "qat", "epochs": 2}, {"technique": "prune", "sparsity": 0.5, "epochs": 1},
                   {"technique": "none"}):
        assert suggest(optuna.trial.FixedTrial(params), 8, fmt="micro").format == "micro"
    assert suggest(optuna.trial.FixedTrial({"technique": "none", "format": "dynamic"}), 8).format == "dynamic"
    assert OBJECTIVES["arena"] == "arena_bytes"
