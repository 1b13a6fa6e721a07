"""The search's study storage and its workers: checking a storage URL (its password masked wherever it is
printed), the study's trials as a table, the worker processes on this machine, trials orphaned by a killed
worker, and waiting for a run directory's lock."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime.artifacts.manifest import MANIFEST
from runtime.errors import Busy, EdgeKitError
from runtime.fsutil import output_lock
from runtime.text import public_url

STUDY = "edgekit-search"
DB_FILE = "search.db"  # the study's SQLite file in the run directory, by default
STORAGE_ENV = "EDGEKIT_STORAGE"  # --storage's default: a password kept off command lines (`ps` shows those)


def run_workers(argv: list[str], jobs: int, storage: str | None = None) -> list[subprocess.Popen]:
    """`jobs - 1` more workers of the same command, as child processes (`--worker`: no report of their own). The
    storage URL goes to them in the environment, not on their command line, where any user's `ps` would show its
    password."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--storage":
            skip = True
        elif not arg.startswith("--storage="):
            kept.append(arg)
    env = {**os.environ, **({STORAGE_ENV: storage} if storage else {})}
    return [subprocess.Popen([sys.executable, "-m", "pipeline", *kept, "--worker"], env=env,
                             preexec_fn=die_with_parent) for _ in range(jobs - 1)]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, however it dies (kill -9, the OOM killer), so that
    no worker is left running as an orphan (Linux's PR_SET_PDEATHSIG; elsewhere the workers' heartbeats end)."""

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def trials_table(storage_url: str, study_name: str | None = None) -> list[dict]:
    """Every trial of the study (by default the storage's one EdgeKit study): its number, state, recipe, format,
    accuracy, objective and budget figures."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if study_name is None:
        names = [n for n in optuna.get_all_study_names(storage_url) if n.startswith(STUDY)]
        if len(names) != 1:
            raise KeyError(f"{len(names)} EdgeKit studies in the storage; name one")
        study_name = names[0]
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                     **{k: v for k, v in t.user_attrs.items()}, "values": list(t.values) if t.values else None})
    return rows


def masked(text: str, url: str) -> str:
    """`text` (a driver's error) with the URL's password masked wherever it appears."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        password = None
    text = text.replace(url, public_url(url))
    return text.replace(str(password), "***") if password else text


def check_storage(url: str, out: Path) -> None:
    """A --storage that workers can share and that writes into no artifact: an in-memory SQLite database is
    one process's alone (and Optuna's heartbeat thread fails on it), and a database file inside an artifact
    directory (the run's base model, say) would change an artifact the report checks."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise EdgeKitError(f"--storage takes a SQLAlchemy URL (sqlite:////path/search.db, "
                           f"postgresql+psycopg2://user@host/db); got {public_url(url)!r}.") from None
    if not parsed.drivername.startswith("sqlite"):
        return
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:") or "mode=memory" in url:
        raise EdgeKitError(f"--storage {public_url(url)} is an in-memory database, which no other worker can share "
                           f"and which is gone when this process ends; name a file (sqlite:////path/{DB_FILE}) or "
                           "leave --storage out for one in the run directory.")

    path, run = Path(database).expanduser().resolve(), Path(out).resolve()
    for parent in path.parents:
        if (parent / MANIFEST).is_file() or (parent != run and parent.is_relative_to(run)):  # the run's artifacts
            raise EdgeKitError(f"--storage {public_url(url)} would write the study into the artifact {parent}; "
                               f"name a file outside every artifact (the run directory {out} is one place).")


def fail_orphans(storage, study, grace: float) -> int:
    """Fail the study's running trials that never sent a heartbeat and started more than `grace` seconds ago:
    their worker died before its first heartbeat, and Optuna's own stale-trial check (which needs one) would
    leave them running forever. Returns how many."""

    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    failed = 0
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if started is None or (now - started).total_seconds() <= grace:
            continue
        with storage.scoped_session() as session:
            beat = models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session)
        if beat is None and storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            failed += 1
    return failed


@contextlib.contextmanager
def waiting_lock(path: Path, say=None, patience: float = 3600):
    """`output_lock(path)`, waited for instead of refused: another worker of the same search may hold it
    (training the base model, making the same recipe, writing the report); this one goes on when it is done,
    and then finds that work made."""

    deadline, told = time.monotonic() + patience, False
    while True:
        held = output_lock(path)
        try:
            held.__enter__()
            break
        except Busy:
            if time.monotonic() > deadline:
                raise
            if say and not told:
                say(f"waiting for another worker of this search to finish writing {path} ...")
                told = True
            time.sleep(1)
    try:
        yield
    finally:
        held.__exit__(None, None, None)
