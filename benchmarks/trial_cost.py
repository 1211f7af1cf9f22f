"""What one trial costs the database, call by call, and the capacity model built on it.

One simulated worker runs hpo's real worker loop (``claim_trial``, then ``run_one`` with
its heartbeat thread and ``study.tell``) on a fresh database on PostgreSQL, ``--trials``
trials of ``--epochs`` epochs each, with no sleep: each epoch reports and asks the median
pruner. The study already holds ``--finished`` finished trials (the pruner's history) and
``--running`` RUNNING trials of other workers, with fresh heartbeats, so that a cost
that grows with the study or the fleet shows.

Per call (claim, suggest, report, should_prune, tell, heartbeat), the median over the
trials after the first: the statements sent (SQLAlchemy's ``before_cursor_execute``; the
one-message claim, five statements in one round trip, counts once) and the client's CPU (``time.thread_time``). Per trial:
the database's CPU (its backends' CPU from /proc, over the same trials), and the
statements. From those, the capacity model: statements per worker-minute for trials of
N minutes, and how many such workers one PostgreSQL core carries at 50 %.

The pruner's reads of other workers' finished trials grow with the fleet (each worker
reads each finished trial once: ``hpo.compat.finished_trials_cache``); here they are
the study's ``--finished`` trials, read in the first trial (so not in the medians) and
then none. ``benchmarks/storage_scale.py`` measures a fleet's DB CPU per trial.

  uv run python benchmarks/storage_scale.py ...            # the fleet
  uv run python benchmarks/trial_cost.py --trials 100     # one worker, call by call
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hpo.storage.one_message  # noqa: E402
from benchmarks.storage_scale import SPEC, STUDY, DatabaseMonitor, _NoProgress  # noqa: E402
from hpo.claim import claim_trial, prepare_to_claim  # noqa: E402
from hpo.spec import parse_spec  # noqa: E402
from hpo.study import create_or_load_study, load_study  # noqa: E402
from hpo.worker import StopSignal, run_one  # noqa: E402

CALLS = ("claim", "suggest", "report", "should_prune", "tell", "heartbeat")


class Meter:
    """Statements and client CPU of the call being measured, in this thread."""

    def __init__(self) -> None:
        self.statements: dict[str, list[int]] = defaultdict(list)
        self.cpu_ms: dict[str, list[float]] = defaultdict(list)
        self._local = threading.local()
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", self._sent)
        rows_of = hpo.storage.one_message.rows_of  # the one-message claim, sent on the DBAPI cursor

        def counted(*args: object):
            self._sent()
            return rows_of(*args)

        hpo.storage.one_message.rows_of = counted

    def _sent(self, *args: object) -> None:
        if getattr(self._local, "count", None) is not None:
            self._local.count += 1

    @contextlib.contextmanager
    def call(self, name: str):
        self._local.count, cpu = 0, time.thread_time()
        try:
            yield
        finally:
            self.cpu_ms[name].append(1000 * (time.thread_time() - cpu))
            self.statements[name].append(self._local.count)
            self._local.count = None


class MeteredObjective:
    """``SleepObjective`` without the sleep: suggests, and reports a constant each epoch
    (no trial is ever worse than the median, so every trial runs all its epochs)."""

    checkpoint_root = None
    progress = _NoProgress()
    tracker = None  # no MLflow
    idle_seconds = 0.0  # set by the worker before each trial, as on Objective

    def __init__(self, epochs: int, meter: Meter) -> None:
        self.epochs, self.meter = epochs, meter

    def __call__(self, trial: optuna.Trial) -> float:
        with self.meter.call("suggest"):
            trial.suggest_float("lr", 1e-4, 1.0, log=True)
        for epoch in range(1, self.epochs + 1):
            with self.meter.call("report"):
                trial.report(0.5, epoch)
            with self.meter.call("should_prune"):
                pruned = trial.should_prune()
            assert not pruned
        return 0.5


def _fill(url: str, finished: int, running: int, epochs: int) -> None:
    """The study's history: ``finished`` COMPLETE trials with every epoch's value, and
    ``running`` RUNNING trials with a heartbeat (other workers' trials)."""
    storage = optuna.storages.RDBStorage(url)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    for _ in range(finished):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        for epoch in range(1, epochs + 1):
            trial.report(0.5, epoch)
        study.tell(trial, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beats = optuna.storages.RDBStorage(url, heartbeat_interval=60)
    for _ in range(running):
        beats.record_heartbeat(study.ask()._trial_id)
    # Vacuumed and analyzed now, so that autovacuum, whose CPU would count as the
    # database's, does not start on these rows during the measured trials.
    with beats.engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    storage.engine.dispose()
    beats.engine.dispose()


def measure(args: argparse.Namespace) -> dict:
    admin = make_url(args.url)
    database = f"hpo_cost_{os.getpid()}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {database}")
    url = admin.set(database=database).render_as_string(hide_password=False)
    try:
        budget = {"epochs": args.epochs, "n_trials": 10}
        spec = parse_spec(SPEC | {"budget": budget}, source="trial_cost", default_name=STUDY)
        create_or_load_study(spec, url, parallel=True).storage.engine.dispose()
        _fill(url, args.finished, args.running, args.epochs)
        meter = Meter()
        loaded = load_study(STUDY, url, parallel=True)
        total = args.finished + args.running + args.trials
        prepare_to_claim(loaded, total)
        tell = loaded.study.tell

        def metered_tell(*a, **k):
            with meter.call("tell"):
                return tell(*a, **k)

        loaded.study.tell = metered_tell
        objective = MeteredObjective(args.epochs, meter)
        with DatabaseMonitor(args.url, database) as monitor:
            for number in range(args.trials):
                if number == 1:  # as the medians: after the first trial, whose pruner
                    time.sleep(0.5)  # reads the study's history (the monitor samples)
                    before, started = monitor.cpu_seconds, time.monotonic()
                with meter.call("claim"):
                    trial = claim_trial(loaded, total)
                assert isinstance(trial, optuna.Trial), trial
                run_one(loaded, trial, objective, StopSignal())
            wall = time.monotonic() - started
            time.sleep(0.5)  # the monitor's last sample
            db_cpu = monitor.cpu_seconds - before
            for _ in range(args.trials):
                with meter.call("heartbeat"):
                    loaded.storage.record_heartbeat_once(trial._trial_id)
        states = {t.state for t in loaded.study.get_trials(deepcopy=False)[-args.trials :]}
        assert states == {TrialState.COMPLETE}, states
        loaded.storage.engine.dispose()
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        engine.dispose()
    calls = {}
    for name in CALLS:
        later = slice(args.epochs if name in ("report", "should_prune") else 1, None)
        calls[name] = {
            "statements": statistics.median(meter.statements[name][later]),
            "client_cpu_ms": round(statistics.median(meter.cpu_ms[name][later]), 2),
        }
    per_trial = sum(
        calls[name]["statements"] * (args.epochs if name in ("report", "should_prune") else 1)
        for name in ("claim", "suggest", "report", "should_prune", "tell")
    )
    return {
        "epochs": args.epochs,
        "finished": args.finished,
        "running": args.running,
        "trials": args.trials,
        "calls": calls,
        "statements_per_trial": per_trial,
        # the worker's own calls, over the trials after the first (no heartbeat beats
        # inside them: the thread's first beat is an interval after a trial starts)
        "db_cpu_ms_per_trial": round(1000 * db_cpu / (args.trials - 1), 2),
        "trials_per_s": round((args.trials - 1) / wall, 1),
    }


def capacity(result: dict, heartbeat_s: float) -> list[dict]:
    """Statements per worker-minute and workers per PostgreSQL core at 50 %, for trials
    of N minutes (``result``'s epochs each, one report per epoch)."""
    rows = []
    cpu_s = result["db_cpu_ms_per_trial"] / 1000
    for minutes in (1, 5, 30):
        per_minute = result["statements_per_trial"] / minutes + 60 / heartbeat_s
        rows.append(
            {
                "trial_minutes": minutes,
                "statements_per_worker_minute": round(per_minute, 1),
                # one core at 50 %: 30 s of CPU per minute; a worker spends cpu_s per trial
                "workers_per_core_at_half": int(30 * minutes / cpu_s),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--finished", type=int, default=200)
    parser.add_argument("--running", type=int, default=256)
    parser.add_argument("--heartbeat-s", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.trials < 2:
        parser.error("--trials must be at least 2 (the first is not measured)")
    # The worker's heartbeat thread beats an interval after a trial starts: with the
    # default, never inside these trials; heartbeats are measured apart.
    os.environ.update(HPO_HEARTBEAT_S=str(int(args.heartbeat_s)), HPO_GRACE_S="600")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = measure(args)
    result["capacity"] = capacity(result, args.heartbeat_s)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
