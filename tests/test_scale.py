"""Many workers on one database: the connection budget of a worker process, reconnecting
without pre-ping, and workers through a real PgBouncer in transaction pooling mode."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import tomllib
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.claim import claim_trial
from hpo.cli import app
from hpo.settings import PoolSettings, SettingsError, lock_database
from hpo.spec import parse_spec
from hpo.storage import StorageError, engine_options, open_storage, study_lock
from hpo.study import create_or_load_study, load_study, superseded_trials

from .conftest import tiny_study_text
from .databases import ADMIN_URLS, logs, scratch_database, start_worker, wait_all, worker_env
from .pgbouncer import pgbouncer, through, waiting_clients

PREFIX = "scale_"


def _spec(**kwargs):
    return parse_spec(tomllib.loads(tiny_study_text(**kwargs)), source="test", default_name="tiny")


def _create_study(url: str, **kwargs) -> None:
    loaded = create_or_load_study(_spec(**kwargs), url, parallel=True)
    loaded.storage.engine.dispose()  # this test process holds no connection of its own


def _finished_exactly(url: str, total: int) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    finally:
        storage.engine.dispose()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    replaced = superseded_trials(trials)
    counted = [t for t in trials if t.number not in replaced]
    assert len(counted) == total, [(t.number, t.state.name) for t in trials]
    return counted


class ServerConnections:
    """Samples ``pg_stat_activity`` for one database every 20 ms in a thread: the peak
    number of server connections to it (the sampler's own admin connection is to another
    database, so it does not count)."""

    def __init__(self, database: str) -> None:
        self.database, self.peak, self.samples = database, 0, 0
        self._stop = threading.Event()
        self._engine = sqlalchemy.create_engine(ADMIN_URLS["postgresql"])
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name")
        with self._engine.connect() as connection:
            while not self._stop.wait(0.02):
                count = connection.execute(query, {"name": self.database}).scalar()
                connection.rollback()
                self.peak, self.samples = max(self.peak, count), self.samples + 1

    def __enter__(self) -> ServerConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._engine.dispose()


def _database(url: str) -> str:
    return sqlalchemy.engine.make_url(url).database or ""


@pytest.fixture
def postgres() -> Iterator[str]:
    with scratch_database("postgresql", prefix=PREFIX) as url:
        yield url


def test_pool_settings_default_to_one_kept_and_one_overflow_connection(monkeypatch) -> None:
    for name in ("HPO_DB_POOL_SIZE", "HPO_DB_MAX_OVERFLOW", "HPO_DB_PRE_PING"):
        monkeypatch.delenv(name, raising=False)
    assert PoolSettings.from_env() == PoolSettings(size=1, max_overflow=1, pre_ping=False)
    assert PoolSettings.from_env().max_connections == 2
    monkeypatch.setenv("HPO_DB_POOL_SIZE", "3")
    monkeypatch.setenv("HPO_DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("HPO_DB_PRE_PING", "1")
    assert PoolSettings.from_env() == PoolSettings(size=3, max_overflow=0, pre_ping=True)


@pytest.mark.parametrize(
    ("name", "value"),
    [("HPO_DB_POOL_SIZE", "0"), ("HPO_DB_POOL_SIZE", "two"), ("HPO_DB_MAX_OVERFLOW", "-1"),
     ("HPO_DB_PRE_PING", "yes")],
)  # fmt: skip
def test_bad_pool_settings_name_the_variable(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=f"\\${name} = '{value}'"):
        PoolSettings.from_env()


def test_engine_options_bound_the_pool_and_never_prepare_statements() -> None:
    pool = PoolSettings(size=1, max_overflow=1)
    options = engine_options("postgresql+psycopg://u:p@127.0.0.1:6432/db", pool)
    assert (options["pool_size"], options["max_overflow"], options["pool_pre_ping"]) == (
        1,
        1,
        False,
    )
    # A prepared statement lives on one server connection; PgBouncer's transaction pooling
    # hands the next transaction another one.
    assert options["connect_args"]["prepare_threshold"] is None
    mariadb = engine_options("mysql+pymysql://root@127.0.0.1/db", pool)
    assert "prepare_threshold" not in mariadb["connect_args"]
    assert mariadb["pool_size"] + mariadb["max_overflow"] == 2
    assert engine_options("sqlite:///x.db", pool) == {"connect_args": {"timeout": 60}}


@pytest.mark.db
def test_opened_storage_uses_the_pool_budget(postgres: str, monkeypatch) -> None:
    monkeypatch.setenv("HPO_DB_POOL_SIZE", "2")
    storage = open_storage(postgres)
    try:
        assert storage.engine.pool.size() == 2
    finally:
        storage.engine.dispose()


@pytest.mark.db
def test_each_worker_process_holds_at_most_two_server_connections(
    postgres: str, tmp_path: Path
) -> None:
    _create_study(postgres, epochs=2, train_size=128, val_size=64)
    env = worker_env(postgres, tmp_path / "checkpoints")
    with ServerConnections(_database(postgres)) as connections:
        workers = [start_worker("tiny", 6, env, tmp_path) for _ in range(3)]
        codes = wait_all(workers)

    assert codes == [0, 0, 0], logs(tmp_path)
    _finished_exactly(postgres, 6)
    assert connections.samples > 50
    # Before the budget: 4 per worker (the CLI's idle pool plus the worker's own).
    assert 1 <= connections.peak <= 3 * PoolSettings().max_connections


@pytest.mark.db
def test_workers_without_pre_ping_survive_their_connections_being_killed(
    postgres: str, tmp_path: Path
) -> None:
    # Trials of a few seconds, so that connections are still there to kill on a fast CPU.
    _create_study(postgres, epochs=3, train_size=2048, val_size=64, pruner="none")
    env = worker_env(postgres, tmp_path / "checkpoints", HPO_DB_PRE_PING="0")
    workers = [start_worker("tiny", 4, env, tmp_path) for _ in range(2)]
    admin = sqlalchemy.create_engine(ADMIN_URLS["postgresql"], isolation_level="AUTOCOMMIT")
    kill = sqlalchemy.text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name"
    )
    killed = 0
    try:
        deadline = time.monotonic() + 120
        while killed < 3 and time.monotonic() < deadline and workers[0].poll() is None:
            time.sleep(2)
            with admin.connect() as connection:
                killed += connection.execute(kill, {"name": _database(postgres)}).scalar() > 0
    finally:
        admin.dispose()
    codes = wait_all(workers)

    assert killed >= 1, "workers finished before any connection could be killed"
    assert codes == [0, 0], logs(tmp_path)
    counted = _finished_exactly(postgres, 4)
    assert all(t.state == TrialState.COMPLETE for t in counted)


@pytest.mark.db
@pytest.mark.parametrize("lock_alias", [False, True], ids=["one pool", "lock alias"])
def test_workers_through_pgbouncer_share_two_server_connections(
    postgres: str, tmp_path: Path, lock_alias: bool
) -> None:
    # Three workers contend for the study lock over two server connections: a lock waited
    # for inside an open transaction would deadlock here (see storage._postgres_lock).
    # With HPO_LOCK_DATABASE (every worker process gets it) their claims go through an
    # alias with one server connection of its own, and still give each trial of the
    # budget to exactly one worker.
    database = _database(postgres)
    aliases = {f"{database}_lock": (database, 1)} if lock_alias else {}
    with pgbouncer(pool_size=2, aliases=aliases) as port:
        bounced = through(postgres, port)
        _create_study(bounced, epochs=2, train_size=128, val_size=64)
        extra = {"HPO_LOCK_DATABASE": f"{database}_lock"} if lock_alias else {}
        env = worker_env(bounced, tmp_path / "checkpoints", **extra)
        with ServerConnections(database) as connections:
            workers = [start_worker("tiny", 6, env, tmp_path) for _ in range(3)]
            codes = wait_all(workers)
        counted = _finished_exactly(bounced, 6)

    assert codes == [0, 0, 0], logs(tmp_path)
    assert {t.state for t in counted} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({t.user_attrs["worker"] for t in counted}) >= 2
    assert 1 <= connections.peak <= (3 if lock_alias else 2)


@pytest.mark.db
def test_more_workers_than_pgbouncer_server_connections_start_at_once_and_claim_promptly(
    postgres: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Eight workers open the storage at the same instant through a PgBouncer with two
    # server connections. With Optuna's own schema check (a session held open while a
    # second connection is opened) each pinned a server connection and waited for another
    # until PgBouncer's query_wait_timeout (120 s), then retried (docs/scale.md).
    starters, bound_s = 8, 30.0
    caplog.set_level(logging.WARNING, logger="hpo.storage")
    with pgbouncer(pool_size=2) as port:
        bounced = through(postgres, port)
        _create_study(bounced)
        barrier = threading.Barrier(starters)
        claimed_after: list[float] = []
        errors: list[BaseException] = []

        def start_and_claim() -> None:
            try:
                barrier.wait()
                started = time.monotonic()
                loaded = load_study("tiny", bounced, parallel=True)
                trial = claim_trial(loaded, starters)
                assert not isinstance(trial, str), trial
                claimed_after.append(time.monotonic() - started)
                loaded.study.tell(trial, 0.5)
                loaded.storage.engine.dispose()
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=start_and_claim, daemon=True) for _ in range(starters)]
        deadline = time.monotonic() + bound_s
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        stalled = sum(thread.is_alive() for thread in threads)
        # A thread's own error is the first thing a failure should show, before the count.
        counted = _finished_exactly(bounced, starters) if not (stalled or errors) else []

    assert not stalled, f"{stalled} of {starters} workers still starting after {bound_s}s"
    assert not errors, errors
    assert len(claimed_after) == starters and max(claimed_after) < bound_s
    assert not [r.message for r in caplog.records if "unreachable" in r.message]
    assert {t.state for t in counted} == {TrialState.COMPLETE}


@pytest.mark.parametrize("value", ["hpo lock", "hpo;drop", "a" * 64, "-x"])
def test_a_bad_lock_database_names_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setenv("HPO_LOCK_DATABASE", value)
    with pytest.raises(SettingsError, match=r"\$HPO_LOCK_DATABASE = "):
        lock_database()


def test_a_lock_database_is_refused_for_a_storage_other_than_postgresql(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HPO_LOCK_DATABASE", "hpo_lock")
    with pytest.raises(StorageError, match=r"HPO_LOCK_DATABASE is for PostgreSQL .* sqlite"):
        open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")


@pytest.mark.db
def test_a_lock_database_that_is_not_the_storages_own_is_refused(
    postgres: str, monkeypatch
) -> None:
    # The claim writes its trial on the lock's connection: another database would get it.
    monkeypatch.setenv("HPO_LOCK_DATABASE", "postgres")
    with pytest.raises(StorageError, match=r"reaches database 'postgres'.* not the storage's"):
        open_storage(postgres)
    missing = sqlalchemy.engine.make_url(postgres).set(password="s3cret-pw")
    monkeypatch.setenv("HPO_LOCK_DATABASE", "scale_no_such_database")
    with pytest.raises(StorageError, match="cannot open the study lock's database") as raised:
        open_storage(missing.render_as_string(hide_password=False))
    assert "s3cret-pw" not in str(raised.value)


@pytest.mark.db
def test_waiters_for_the_study_lock_on_its_own_pgbouncer_pool_leave_the_main_pool_free(
    postgres: str, monkeypatch
) -> None:
    # 256 workers claiming at once through a pool of 20: each waiter for the lock waits in
    # a transaction, so 19 held a server connection and every other call of every worker
    # queued for the last one (measured with storage_scale.py at 256 workers). On an alias with a pool of its
    # own, waiters queue in PgBouncer instead, in the order they came, and a reader finds
    # the main pool free. Without HPO_LOCK_DATABASE the holder and the first waiter take
    # both main connections here, and the read waits for the holder.
    alias = f"{_database(postgres)}_lock"
    with pgbouncer(pool_size=2, aliases={alias: (_database(postgres), 1)}) as port:
        bounced = through(postgres, port)
        _create_study(bounced)
        monkeypatch.setenv("HPO_LOCK_DATABASE", alias)
        holder, reader = load_study("tiny", bounced), load_study("tiny", bounced)
        waiters = [load_study("tiny", bounced) for _ in range(3)]
        order: list[int] = []
        threads = []
        with study_lock(holder.storage, "tiny"):
            for index, waiter in enumerate(waiters):

                def wait_and_record(waiter=waiter, index=index) -> None:
                    with study_lock(waiter.storage, "tiny"):
                        order.append(index)

                threads.append(threading.Thread(target=wait_and_record, daemon=True))
                threads[-1].start()
                _until(lambda n=index + 1: waiting_clients(port, alias) >= n)
            read = threading.Thread(target=reader.study.get_trials, daemon=True)
            read.start()
            read.join(timeout=10)
            read_while_held = not read.is_alive()
            assert waiting_clients(port, _database(postgres)) == 0
        for thread in threads:
            thread.join(timeout=30)
        for loaded in (holder, reader, *waiters):
            loaded.storage.dispose()
    assert read_while_held, "a read waited for the study lock's holder"
    assert order == [0, 1, 2]


def _until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _connections_to(database: str) -> int:
    engine = sqlalchemy.create_engine(ADMIN_URLS["postgresql"])
    try:
        with engine.connect() as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = :name"
            return connection.execute(sqlalchemy.text(query), {"name": database}).scalar()
    finally:
        engine.dispose()


@pytest.mark.db
@pytest.mark.parametrize(
    "command",
    [
        ["launch", "--study", "tiny", "--workers", "2"],
        ["worker", "--study", "tiny", "--gpus", "all"],
    ],
    ids=["launch --workers", "worker --gpus"],
)
def test_a_parent_of_worker_processes_holds_no_connection_while_they_train(
    postgres: str, tiny_study: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # The parent waits for its children for the whole run: an idle pooled connection
    # there is one server connection per node for nothing.
    _create_study(postgres)
    held: list[int] = []

    def children_train(*args: object, **kwargs: object) -> int:
        held.append(_connections_to(_database(postgres)))
        return 0

    monkeypatch.setattr("hpo.launcher.run_worker_processes", children_train)
    result = CliRunner().invoke(app, [*command, "--storage", postgres])
    assert held == [0], result.output


@pytest.mark.db
def test_storage_scale_quick_point_holds_the_study_on_both_paths(tmp_path: Path) -> None:
    # benchmarks/storage_scale.py --quick: 16 simulated workers (hpo's real claim /
    # heartbeat / report / tell loop, sleeping instead of training), direct and through
    # PgBouncer.
    out = tmp_path / "scale.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "storage_scale.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    points = json.loads(out.read_text())
    assert [(p["workers"], p["via"]) for p in points] == [(16, "direct"), (16, "pgbouncer")]
    for point in points:
        assert (point["lost"], point["duplicated"], point["stuck_running"]) == (0, 0, 0), point
        assert point["trials_per_min"] > 0 and point["claim_p50_ms"] > 0
        for key in ("claim_p99_ms", "report_p99_ms", "tell_p99_ms", "server_connections_peak"):
            assert point[key] > 0, key
    direct, bounced = points
    assert direct["server_connections_peak"] <= 16 * PoolSettings().max_connections
    assert bounced["server_connections_peak"] <= 20  # the benchmark's PgBouncer pool size


@pytest.mark.db
def test_trial_cost_counts_the_statements_of_each_call(tmp_path: Path) -> None:
    # benchmarks/trial_cost.py: one worker on hpo's real loop, each storage call measured
    # apart. On PostgreSQL the claim is one message, suggest, report and the pruner's check
    # one statement each, tell three (Optuna's Study.tell reads the trial before and after
    # its one-statement write); these counts are the capacity model's.
    out = tmp_path / "cost.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "trial_cost.py"
    run = subprocess.run(
        [sys.executable, str(script), "--url", ADMIN_URLS["postgresql"], "--trials", "4",
         "--epochs", "3", "--finished", "3", "--running", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    statements = {name: call["statements"] for name, call in result["calls"].items()}
    assert statements == {
        "claim": 1, "suggest": 1, "report": 1, "should_prune": 1, "tell": 3, "heartbeat": 1
    }  # fmt: skip
    assert result["statements_per_trial"] == 1 + 1 + 3 * (1 + 1) + 3
    assert all(call["client_cpu_ms"] > 0 for call in result["calls"].values())
    assert [row["trial_minutes"] for row in result["capacity"]] == [1, 5, 30]
    engine = sqlalchemy.create_engine(ADMIN_URLS["postgresql"])
    with engine.connect() as connection:
        left = connection.execute(
            sqlalchemy.text("SELECT datname FROM pg_database WHERE datname LIKE 'hpo_cost_%'")
        ).all()
    engine.dispose()
    assert left == []  # its database dropped
