"""Many simulated workers on one PostgreSQL, directly and through PgBouncer: does the
study hold (nothing lost, duplicated or stuck), what does each step cost, and how many
server connections does it take.

A simulated worker runs hpo's real worker loop, the one ``hpo worker`` runs
(``hpo.claim.claim_trial`` under the study lock, ``run_one`` with its heartbeat thread,
``tell``, ``retry_on_disconnect``), with a stand-in objective that sleeps instead of
training (no torch in these processes): ``--epochs`` "epochs" of ``--epoch-s`` seconds
each (uniform in the range), one ``report`` + ``should_prune`` per epoch (the spec's median
pruner), heartbeats every ``--heartbeat-s`` seconds. ``--workers`` are processes x
``--threads`` threads (threads where memory binds: each thread has its own storage and so
its own connection pool, like a process; they share one process's CPU).

Per point (workers, via): trials finished per minute; p50/p99 latency of claim, report
(``report`` + ``should_prune``) and tell; peak server connections to the study's database
(``pg_stat_activity``, sampled every 50 ms); database CPU seconds per trial (``/proc`` of
the backends serving that database, sampled: backends that live < 0.2 s are missed);
lost / duplicated / stuck-RUNNING trials from the final study. Claim latency is also
given without each worker's first claim (``claim_steady_p99_ms``): all workers start at
once, so first claims queue behind each other under the study lock. ``--kill 0.1`` SIGKILLs a
tenth of the worker processes once a third of the trials finished: their trials must be
re-queued (after ``--grace-s``) and finished by the others, the total exact
(``killed_trials``: the trials RUNNING in the killed processes; ``killed_trials_requeued``:
those of them failed and re-queued, whose retries then count in the total).
``lock_wait_p50_ms`` / ``lock_wait_p99_ms``: how long a worker waited for the study lock;
``lock_held_p50_ms`` / ``lock_held_p99_ms``: how long it held it (claims and re-queues);
``lock_busy_share``: the share of the point's wall time the lock was held at all;
``lock_holder_cpu_share``: the CPU time the holding thread got while it held the lock,
over that wall time (a starved holder makes every waiter wait longer);
``load_avg``: ``/proc/loadavg``'s 1-minute figure at the start and end of the point.
``retried_errors``: storage calls that failed for a lost or refused connection and were
retried (``hpo.storage.retry_on_disconnect``'s warnings), e.g. PgBouncer's
``query_wait_timeout``. ``--start-spread-s S`` starts the workers at random moments over
S seconds instead of all at once (a Slurm array or a Kubernetes Job starts its pods over
seconds to minutes). ``--settle-s S``: each worker waits S seconds after its first claim
before it starts the trial, so that the first claims of a fleet started at once are
measured without the started trials' CPU on the same cores (an analysis of where the
first claims' time goes; on a cluster each worker has its own CPU).

Databases ``hpo_scale_<pid>_<n>`` are created on ``--url``'s server and dropped after;
``--private-postgres N`` runs the whole sweep on a private PostgreSQL started for it
(``tests/private_postgres.py``) with ``max_connections = N``, for points that need more
connections than a shared server allows. PgBouncer (Debian package) is started on a free
loopback port by ``tests/pgbouncer.py``.

  uv run python benchmarks/storage_scale.py --quick --json scale.json
  uv run python benchmarks/storage_scale.py --workers 8,64,256 --via direct,pgbouncer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/pgbouncer.py

from hpo.claim import claim_trial, prepare_to_claim  # noqa: E402
from hpo.spec import parse_spec  # noqa: E402
from hpo.storage import retry_on_disconnect  # noqa: E402
from hpo.study import LoadedStudy, create_or_load_study, load_study, superseded_trials  # noqa: E402
from hpo.worker import StopSignal, run_one, wait_before_claiming_again  # noqa: E402

TIMED = ("claim", "claim_first", "report", "tell", "numbers")
TIMED += ("lock_wait", "lock_held", "lock_held_cpu", "events")
# The claim's parts, for the timeline: the one-message claim, the long way's checks before
# the lock, and building the optuna.Trial after it.
TIMED += ("claim_message", "stale_check", "budget_check", "build_trial")


def _record(timings: dict, key: str, started: float, ended: float) -> None:
    """One latency of ``key`` (``started``/``ended``: ``time.monotonic()``, which every
    process of the machine shares), kept for the percentiles and for ``--timeline``."""
    timings[key].append(ended - started)
    timings["events"].append((key, started, ended - started))


STUDY = "scale"
SPEC = {
    "seed": 0,
    "dataset": {"kind": "synthetic", "train_size": 64, "val_size": 32, "image_size": 32},
    "model": {"name": "small-cnn"},
    "search": {
        "batch_size_min": 16,
        "batch_size_max": 64,
        "lr_low": 1e-4,
        "lr_high": 1.0,
        "weight_decay_low": 1e-6,
        "weight_decay_high": 1e-3,
        "optimizer": "sgd",
        # The simulated objectives draw no batch size: there is no top two to replicate,
        # and the claims measured are the search's.
        "replicates": 0,
    },
    "budget": {"epochs": 10, "n_trials": 10},
    "pruner": {"kind": "median", "min_epochs": 3, "n_startup_trials": 5},
    "sampler": {"kind": "random", "seed": 0},
    "objective": {"metric": "val_auc"},
}


class _NoProgress:
    """What the worker tells a terminal about a trial: nothing here (hpo.objective's
    SilentProgress would import torch)."""

    def ended(self, trial_number: int, state: str, value: float | None, reason: str | None) -> None:
        pass


class SleepObjective:
    """Stands in for ``hpo.objective.Objective``: sleeps per epoch, reports, may prune."""

    checkpoint_root = None
    progress = _NoProgress()
    tracker = None  # no MLflow
    idle_seconds = 0.0  # set by the worker before each trial, as on Objective

    def __init__(self, epochs: int, epoch_s: tuple[float, float], timings: dict) -> None:
        self.epochs, self.epoch_s, self.timings = epochs, epoch_s, timings

    def __call__(self, trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        quality = 1 - abs(math.log10(lr) + 2) / 4
        value = 0.5
        for epoch in range(1, self.epochs + 1):
            time.sleep(random.uniform(*self.epoch_s))
            value = 0.5 + 0.4 * quality * (1 - math.exp(-epoch / 3)) + random.gauss(0, 0.01)
            started = time.monotonic()
            trial.report(value, epoch)
            prune = trial.should_prune()
            _record(self.timings, "report", started, time.monotonic())
            if prune:
                raise optuna.TrialPruned()
        return value


def _simulated_worker(
    loaded: LoadedStudy, total: int, args: argparse.Namespace, timings: dict
) -> None:
    """``hpo.worker.run_worker``'s loop, less device, data and torch."""
    url = loaded.storage.url
    objective = SleepObjective(args.epochs, args.epoch_s, timings)
    tell = loaded.study.tell

    def timed_tell(*a, **k):
        started = time.monotonic()
        try:
            return tell(*a, **k)
        finally:
            _record(timings, "tell", started, time.monotonic())

    loaded.study.tell = timed_tell  # run_one tells through the study
    stop = StopSignal()
    claimed_before = False
    time.sleep(random.uniform(0, args.start_spread_s))
    while True:
        started = time.monotonic()
        claimed = retry_on_disconnect(lambda: claim_trial(loaded, total), what="claim", url=url)
        # Each worker's first claim queues behind all workers starting at once; kept apart.
        key = "claim" if claimed_before else "claim_first"
        _record(timings, key, started, time.monotonic())
        if not claimed_before and args.settle_s:
            time.sleep(args.settle_s)
        claimed_before = True
        if claimed == "done":
            break
        if claimed == "wait":
            time.sleep(wait_before_claiming_again())
            continue
        timings["numbers"].append(claimed.number)
        run_one(loaded, claimed, objective, stop)
    loaded.storage.dispose()


class _RetryCounter(logging.Handler):
    """Counts ``retry_on_disconnect``'s warnings: storage calls retried after a lost,
    refused or timed-out connection."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "unreachable during" in record.getMessage()


def _time_the_claims_parts(timings: dict) -> None:
    """Record, in this process, how long each hold of the study lock lasts and how much
    CPU the holding thread got meanwhile, and how long each part of a claim takes (the
    one-message claim, the long way's checks, building the optuna.Trial)."""
    import hpo.claim
    import hpo.storage.one_message

    real = hpo.claim.study_lock

    @contextlib.contextmanager
    def timed(*args, **kwargs):
        asked = time.monotonic()
        with real(*args, **kwargs):
            wall, cpu = time.monotonic(), time.thread_time()
            _record(timings, "lock_wait", asked, wall)
            try:
                yield
            finally:
                _record(timings, "lock_held", wall, time.monotonic())
                timings["lock_held_cpu"].append(time.thread_time() - cpu)

    hpo.claim.study_lock = timed

    def timed_call(real, key: str):
        def timed(*args, **kwargs):
            started = time.monotonic()
            try:
                return real(*args, **kwargs)
            finally:
                _record(timings, key, started, time.monotonic())

        return timed

    for owner, name, key in (
        (hpo.storage.one_message, "create_at_once", "claim_message"),
        (hpo.storage.ReconnectingRDBStorage, "has_stale_trials", "stale_check"),
        (hpo.claim, "_budget_is_handed_out", "budget_check"),
        (hpo.claim, "_build_trial", "build_trial"),
    ):
        setattr(owner, name, timed_call(getattr(owner, name), key))


def _load_avg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _worker_process(url: str, total: int, args: argparse.Namespace, out: str, barrier) -> None:
    os.nice(args.nice)
    if args.claim == "long":
        import hpo.claim

        hpo.claim._new_trial_at_once = lambda *a: None  # every claim under study_lock
    timings: dict = {key: [] for key in TIMED}
    _time_the_claims_parts(timings)
    retries = _RetryCounter()
    logging.getLogger("hpo.storage").addHandler(retries)
    # Each worker opens the study before the start: on a cluster every worker starts on
    # its own node's CPU, while here 256 would share two cores with the database, and the
    # first claims would measure that instead of the claim.
    studies = [load_study(STUDY, url, parallel=True) for _ in range(args.threads)]
    for loaded in studies:
        loaded.study.sampler.reseed_rng()
        prepare_to_claim(loaded, total)  # as hpo worker does before its first claim
    # Threads started before the start too: started after it, each waited for the GIL
    # behind the ones already claiming, and the last began its first claim up to 3 s late.
    go = threading.Event()

    def worker(loaded: LoadedStudy) -> None:
        go.wait()
        _simulated_worker(loaded, total, args, timings)

    threads = [threading.Thread(target=worker, args=(loaded,)) for loaded in studies]
    for thread in threads:
        thread.start()
    barrier.wait()
    go.set()
    for thread in threads:
        thread.join()
    timings["retried_errors"] = [retries.count]
    Path(out).write_text(json.dumps(timings))


class DatabaseMonitor:
    """Peak server connections to one database, and the CPU its backends used."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.database, self.peak = database, 0
        self.cpu_ticks: dict[int, int] = {}
        self._engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = sqlalchemy.text("SELECT pid FROM pg_stat_activity WHERE datname = :name")
        last_cpu = 0.0
        with self._engine.connect() as connection:
            while not self._stop.wait(0.05):
                pids = connection.execute(query, {"name": self.database}).scalars().all()
                self.peak = max(self.peak, len(pids))
                if time.monotonic() - last_cpu >= 0.2:
                    last_cpu = time.monotonic()
                    for pid in pids:
                        with contextlib.suppress(OSError, IndexError, ValueError):
                            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                            self.cpu_ticks[pid] = int(fields[11]) + int(fields[12])

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> DatabaseMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._engine.dispose()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_point(workers: int, via: str, args: argparse.Namespace, index: int) -> dict:
    admin = make_url(args.url)
    database = f"hpo_scale_{os.getpid()}_{index}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        connection.exec_driver_sql(f"CREATE DATABASE {database}")
    direct = admin.set(database=database).render_as_string(hide_password=False)
    url = direct
    stack = contextlib.ExitStack()
    if via == "pgbouncer":
        from tests.pgbouncer import pgbouncer

        lock = f"{database}_lock"
        aliases = {lock: (database, args.lock_pool)} if args.lock_pool else {}
        port = stack.enter_context(pgbouncer(args.pgbouncer_pool, args.url, aliases))
        url = make_url(direct).set(host="127.0.0.1", port=port)
        url = url.render_as_string(hide_password=False)
        # Forked children inherit it; hpo.settings reads it when each opens its storage.
        os.environ.pop("HPO_LOCK_DATABASE", None)
        if args.lock_pool:
            os.environ["HPO_LOCK_DATABASE"] = lock
    try:
        pruner = SPEC["pruner"] if args.pruner == "median" else {"kind": "none"}
        budget = {"epochs": args.epochs, "n_trials": 10}
        spec = parse_spec(SPEC | {"budget": budget, "pruner": pruner},
                          source="storage_scale", default_name=STUDY)  # fmt: skip
        create_or_load_study(spec, url, parallel=True).storage.engine.dispose()
        total = workers * args.trials_per_worker
        processes = max(1, workers // args.threads)
        outputs = [Path(args.tmp) / f"point{index}-{n}.json" for n in range(processes)]
        context = multiprocessing.get_context("fork")
        barrier = context.Barrier(processes + 1)
        children = [
            context.Process(target=_worker_process, args=(url, total, args, str(out), barrier))
            for out in outputs
        ]
        for child in children:
            child.start()
        killed, killed_trials = 0, []
        load_start = _load_avg()
        with DatabaseMonitor(args.url, database) as monitor:
            barrier.wait()
            started = time.monotonic()
            victims = random.sample(children, round(args.kill * processes)) if args.kill else []
            while any(child.is_alive() for child in children):
                if victims and _finished(direct) >= total / 3:
                    for child in victims:
                        os.kill(child.pid, signal.SIGKILL)
                    killed_trials = _running_in(direct, {child.pid for child in victims})
                    killed, victims = len(victims), []
                time.sleep(0.5)
            wall = time.monotonic() - started
        timings: dict = {key: [] for key in TIMED}
        timings["retried_errors"] = []
        for out in outputs:
            if out.exists():
                for key, values in json.loads(out.read_text()).items():
                    timings[key] += values
        if args.timeline:
            events = sorted(
                (key, round(t - started, 4), round(d, 4)) for key, t, d in timings["events"]
            )
            args.timelines.append({"workers": workers, "via": via, "events": events})
        storage_check = _integrity(direct, total, timings["numbers"])
        finished = storage_check.pop("finished")
        requeued = storage_check.pop("replaced")
        return {
            "workers": workers,
            "via": via,
            "lock_pool": args.lock_pool if via == "pgbouncer" else None,
            "pruner": args.pruner,
            "processes": processes,
            "threads_per_process": args.threads,
            "killed_workers": killed * args.threads,
            "killed_trials": len(killed_trials),
            "killed_trials_requeued": len(set(killed_trials) & requeued),
            "start_spread_s": args.start_spread_s,
            "settle_s": args.settle_s,
            "nice": args.nice,
            "claim": args.claim,
            "retried_errors": sum(timings["retried_errors"]),
            "trials": total,
            "wall_s": round(wall, 1),
            "trials_per_min": round(finished / wall * 60, 1),
            "claim_p50_ms": round(_percentile(timings["claim"] + timings["claim_first"], 0.5), 1),
            "claim_p99_ms": round(_percentile(timings["claim"] + timings["claim_first"], 0.99), 1),
            "claim_steady_p99_ms": round(_percentile(timings["claim"], 0.99), 1),
            "first_claim_max_ms": round(_percentile(timings["claim_first"], 1.0), 1),
            "report_p50_ms": round(_percentile(timings["report"], 0.5), 1),
            "report_p99_ms": round(_percentile(timings["report"], 0.99), 1),
            "tell_p50_ms": round(_percentile(timings["tell"], 0.5), 1),
            "tell_p99_ms": round(_percentile(timings["tell"], 0.99), 1),
            "lock_wait_p50_ms": round(_percentile(timings["lock_wait"], 0.5), 1),
            "lock_wait_p99_ms": round(_percentile(timings["lock_wait"], 0.99), 1),
            "lock_held_p50_ms": round(_percentile(timings["lock_held"], 0.5), 1),
            "lock_held_p99_ms": round(_percentile(timings["lock_held"], 0.99), 1),
            "lock_busy_share": round(sum(timings["lock_held"]) / wall, 3),
            "lock_holder_cpu_share": round(
                sum(timings["lock_held_cpu"]) / max(1e-9, sum(timings["lock_held"])), 2
            ),
            "load_avg": [load_start, _load_avg()],
            "server_connections_peak": monitor.peak,
            "db_cpu_s_per_trial": round(monitor.cpu_seconds / max(1, finished), 3),
            **storage_check,
        }
    finally:
        stack.close()
        with engine.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        engine.dispose()


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _running_in(url: str, pids: set[int]) -> list[int]:
    """Numbers of the trials RUNNING in processes ``pids`` (``run_one`` stores the worker's
    host:pid on each trial)."""
    return [
        t.number
        for t in _trials(url)
        if t.state == TrialState.RUNNING
        and int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1]) in pids
    ]


def _finished(url: str) -> int:
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in done for t in _trials(url))


def _integrity(url: str, total: int, claimed_numbers: list[int]) -> dict:
    """lost: fewer counted finished trials than the total; duplicated: more, or a trial
    number claimed twice; stuck: RUNNING or WAITING at the end."""
    trials = _trials(url)
    replaced = superseded_trials(trials)
    counted = [t for t in trials if t.number not in replaced]
    finished = [t for t in counted if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    claimed_twice = sum(n - 1 for n in Counter(claimed_numbers).values() if n > 1)
    stuck = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    states = Counter(t.state.name for t in counted)
    return {
        "finished": len(finished),
        "replaced": replaced,
        "states": dict(states),
        "retried": len(replaced),
        "lost": max(0, total - len(counted)),
        "duplicated": max(0, len(counted) - total) + claimed_twice,
        "stuck_running": len(stuck),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workers", default="8,64,256", help="comma-separated sweep")
    parser.add_argument("--via", default="direct,pgbouncer")
    parser.add_argument("--threads", type=int, default=4, help="simulated workers per process")
    parser.add_argument("--trials-per-worker", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-s", default="0.5,2", help="min,max seconds of one epoch")
    parser.add_argument("--heartbeat-s", type=float, default=2)
    parser.add_argument("--grace-s", type=float, default=10)
    parser.add_argument("--pgbouncer-pool", type=int, default=20)
    parser.add_argument(
        "--lock-pool",
        type=int,
        default=0,
        help="through PgBouncer: take the study lock on an alias of the database with this "
        "many server connections ($HPO_LOCK_DATABASE); 0: on the database itself",
    )
    parser.add_argument(
        "--pruner",
        default="median",
        choices=("median", "none"),
        help="the study's pruner: median (the default: reads the study's trials at every "
        "report) or none",
    )
    parser.add_argument("--kill", type=float, default=0, help="fraction of processes to kill -9")
    parser.add_argument(
        "--claim",
        default="at-once",
        choices=("at-once", "long"),
        help="at-once: hpo's claim (on PostgreSQL one message where it can); long: every "
        "claim the long way, under study_lock (for comparison)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the simulated workers at this niceness: with 10, PostgreSQL and PgBouncer "
        "get the CPU first, as on a cluster where they have their own machine",
    )
    parser.add_argument(
        "--start-spread-s",
        type=float,
        default=0,
        help="start each worker at a random moment within this many seconds",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=0,
        help="wait this many seconds after the first claim before starting the trial (the "
        "first claims measured without the trials' CPU)",
    )
    parser.add_argument(
        "--private-postgres",
        type=int,
        metavar="MAX_CONNECTIONS",
        help="run on a private PostgreSQL with this max_connections",
    )
    parser.add_argument("--quick", action="store_true", help="16 workers, both paths, short")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--timeline",
        type=Path,
        help="write every timed call as [kind, seconds since the point started, duration]",
    )
    args = parser.parse_args()
    args.timelines = []
    if args.quick:
        args.workers, args.epochs, args.epoch_s, args.trials_per_worker = "16", 4, "0.2,0.5", 2
    args.epoch_s = tuple(float(x) for x in args.epoch_s.split(","))
    # hpo.settings reads these in every process (forked children inherit them).
    os.environ.update(HPO_HEARTBEAT_S=str(args.heartbeat_s), HPO_GRACE_S=str(args.grace_s))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import tempfile

    from tests.private_postgres import private_postgres

    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        args.tmp = tmp
        if args.private_postgres:
            args.url = stack.enter_context(private_postgres(args.private_postgres)).url()
        index = 0
        for workers in [int(w) for w in args.workers.split(",")]:
            for via in args.via.split(","):
                index += 1
                result = run_point(workers, via, args, index)
                print(json.dumps(result), flush=True)
                results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.timeline:
        args.timeline.write_text(json.dumps(args.timelines) + "\n")


if __name__ == "__main__":
    main()
