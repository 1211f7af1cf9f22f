"""The claim (``hpo.claim.claim_trial``): exact study totals under concurrent claimers, and
a critical section that holds the study lock only for what must be serial.

Every worker claims under one study lock, so what the claim does under it is paid once
per trial by the whole fleet, one worker at a time. It must neither read every trial of
the study (Optuna's cache layer re-reads each unfinished trial with all its rows: at
256 RUNNING trials that held the lock ~0.5 s per claim) nor run the sampler.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import tomllib
from optuna.trial import TrialState

import hpo.claim
import hpo.compat
import hpo.storage.one_message
import hpo.worker
from hpo.claim import claim_trial, study_budget_counted
from hpo.spec import parse_spec
from hpo.storage import ReconnectingRDBStorage, retry_on_disconnect
from hpo.study import create_or_load_study, load_study, study_budget, superseded_trials
from hpo.worker import requeue

from .conftest import far_from_utc, tiny_study_text
from .databases import scratch_database, study_storage
from .test_storage_faults import CommitThenDrop


def _spec(sampler: str = "random"):
    text = tiny_study_text(sampler=sampler)
    return parse_spec(tomllib.loads(text), source="test", default_name="tiny")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.db),
                        pytest.param("mariadb", marks=pytest.mark.db)])  # fmt: skip
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with study_storage(request.param, tmp_path) as url:
        yield url


class LockWatch:
    """Wraps ``hpo.claim.study_lock``: ``held`` is True while this thread holds it, and
    ``statements`` counts the SQL statements a storage's engine ran meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._local = threading.local()
        self.statements_held: list[int] = []
        self._count = 0
        real = hpo.claim.study_lock

        @contextlib.contextmanager
        def watched(*args: object, **kwargs: object) -> Iterator[None]:
            with real(*args, **kwargs):
                self._local.held, before = True, self._count
                try:
                    yield
                finally:
                    self._local.held = False
                    self.statements_held.append(self._count - before)

        monkeypatch.setattr(hpo.claim, "study_lock", watched)

    @property
    def held(self) -> bool:
        return bool(getattr(self._local, "held", False))

    def count_statements(self, engine: sqlalchemy.Engine) -> None:
        def count(*args: object) -> None:
            self._count += 1

        sqlalchemy.event.listen(engine, "before_cursor_execute", count)


def _finish(loaded, trial: optuna.Trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)
    loaded.study.tell(trial, 0.5)


def test_concurrent_claimers_start_exactly_the_total(storage_url: str) -> None:
    # Six claimers, each with its own storage (as separate workers), race for 18 trials
    # while some are enqueued and some re-queued (a retry takes its predecessor's place).
    total, claimers = 18, 6
    create_or_load_study(_spec(), storage_url).storage.engine.dispose()
    seed = load_study("tiny", storage_url)
    for x in (0.1, 0.2, 0.3):
        seed.study.enqueue_trial({"x": x})
    seed.storage.engine.dispose()
    claimed: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(claimers)

    def claim_until_done() -> None:
        try:
            loaded = load_study("tiny", storage_url, parallel=True)
            barrier.wait()
            while (trial := claim_trial(loaded, total)) != "done":
                if trial == "wait":
                    time.sleep(0.05)
                    continue
                claimed.append(trial.number)
                if trial.number % 4 == 1:
                    requeue(loaded, trial, "worker stopped (test)")
                else:
                    _finish(loaded, trial)
            loaded.storage.engine.dispose()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=claim_until_done) for _ in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)

    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    assert len(claimed) == len(set(claimed)), sorted(claimed)
    check = load_study("tiny", storage_url)
    trials = check.study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in trials if t.number not in superseded_trials(trials)]
    assert len(counted) == total, [(t.number, t.state.name) for t in trials]
    assert superseded_trials(trials), "no trial was re-queued: the test lost its point"
    assert study_budget_counted(check) == study_budget(check.study)
    check.storage.engine.dispose()


def test_the_budget_counted_by_the_database_is_the_budget_of_the_trials(
    storage_url: str,
) -> None:
    create_or_load_study(_spec(), storage_url).storage.engine.dispose()
    loaded = load_study("tiny", storage_url)
    for end in ("complete", "pruned", "fail", "requeue", "requeue", "running"):
        trial = claim_trial(loaded, 100)
        trial.suggest_float("x", 0.0, 1.0)
        if end == "complete":
            loaded.study.tell(trial, 0.7)
        elif end in ("pruned", "fail"):
            loaded.study.tell(trial, state=TrialState[end.upper()])
        elif end == "requeue":
            requeue(loaded, trial, "worker stopped (test)")
    loaded.study.enqueue_trial({"x": 0.5})
    budget = study_budget_counted(loaded)
    assert budget == study_budget(loaded.study)
    # Trials 3 and 4 were re-queued (4 is 3's retry, claimed next) and do not count; 5,
    # 4's retry, runs; 6 was enqueued.
    assert (budget.finished, budget.running, budget.waiting) == (3, 1, 1)
    loaded.storage.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.db),
                                     pytest.param("mariadb", marks=pytest.mark.db)])  # fmt: skip
def test_the_claim_reads_no_trial_under_the_study_lock(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same statements whether 2 or 30 trials run elsewhere, and no trial read with its
    # params, attrs and values (Optuna's _get_trials): before, the budget and Study.ask's
    # look for waiting trials each re-read every RUNNING trial under the lock.
    monkeypatch.setenv("HPO_GRACE_S", "3600")  # the RUNNING trials here have no worker
    # The long way, which PostgreSQL takes when a trial waits or is stale (the common case
    # there is one message: test_a_claim_at_once_is_one_message_of_five_statements).
    monkeypatch.setattr(hpo.claim, "_new_trial_at_once", lambda *args: None)
    watch = LockWatch(monkeypatch)
    reads_held: list[bool] = []
    real_get_trials = ReconnectingRDBStorage._get_trials

    def get_trials(self, *args: object, **kwargs: object):
        reads_held.append(watch.held)
        return real_get_trials(self, *args, **kwargs)

    monkeypatch.setattr(ReconnectingRDBStorage, "_get_trials", get_trials)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(study_storage(backend, tmp_path, "hpo.db"))
        create_or_load_study(_spec(), url).storage.engine.dispose()
        running = load_study("tiny", url)
        claimer = load_study("tiny", url)
        watch.count_statements(claimer.storage.engine)
        statements = {}
        for others in (2, 30):
            while len(running.study.get_trials(states=(TrialState.RUNNING,))) < others:
                trial = claim_trial(running, 1000)
                trial.suggest_float("x", 0.0, 1.0)
                trial.report(0.5, 1)
            watch.statements_held.clear()
            for _ in range(3):
                _finish(claimer, claim_trial(claimer, 1000))
            statements[others] = watch.statements_held[-1]
        running.storage.engine.dispose()
        claimer.storage.engine.dispose()

    assert reads_held and not any(reads_held), "a claim read whole trials under the lock"
    # PostgreSQL and MariaDB, whose claim is one transaction on the lock's connection: the
    # budget, the study row's lock, the trial count, and the trial, its token and its
    # heartbeat inserted (Core statements, no savepoints; through Optuna's ORM it was 19 on
    # PostgreSQL); on PostgreSQL the last four are one statement. SQLite, whose lock is a
    # file, keeps Optuna's own create: 9.
    bound = {"sqlite": 9, "mariadb": 6, "postgresql": 3}[backend]
    assert statements[2] == statements[30] <= bound, statements


def test_the_sampler_runs_after_the_study_lock_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = LockWatch(monkeypatch)
    calls: list[tuple[str, bool]] = []

    class RecordingSampler(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):
            calls.append(("before_trial", watch.held))
            super().before_trial(study, trial)

        def sample_independent(self, study, trial, name, distribution):
            calls.append(("sample_independent", watch.held))
            return super().sample_independent(study, trial, name, distribution)

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create_or_load_study(_spec(), url).storage.engine.dispose()
    loaded = load_study("tiny", url)
    loaded.study.sampler = RecordingSampler(seed=0)
    for _ in range(3):
        _finish(loaded, claim_trial(loaded, 10))

    assert {name for name, _ in calls} == {"before_trial", "sample_independent"}
    assert not [name for name, held in calls if held], calls


def test_a_grid_trial_takes_its_grid_point_under_the_study_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GridSampler.before_trial picks an unvisited grid point: two workers picking at once
    # could pick the same one, so for the grid that stays under the lock.
    watch = LockWatch(monkeypatch)
    held: list[bool] = []
    real = optuna.samplers.GridSampler.before_trial

    def before_trial(self, study, trial):
        held.append(watch.held)
        real(self, study, trial)

    monkeypatch.setattr(optuna.samplers.GridSampler, "before_trial", before_trial)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create_or_load_study(_spec("grid"), url).storage.engine.dispose()
    loaded = load_study("tiny", url)
    loaded.keep_batch_sizes_within_cap("cpu")  # as a worker does (hpo.caps: grid's after_trial)
    grid_ids = []
    while (trial := claim_trial(loaded, 100)) not in ("done", "wait"):
        grid_ids.append(loaded.study.get_trials()[-1].system_attrs["grid_id"])
        loaded.study.tell(trial, 0.5)

    assert held and all(held)
    assert sorted(grid_ids) == list(range(len(grid_ids))) and len(grid_ids) > 1


def test_each_claimed_trial_samples_from_the_study_as_it_is_now(tmp_path: Path) -> None:
    """The claim stands in for ``Study.ask``, which empties the trial list samplers cache
    per thread (TPE reads it): a trial must see a trial another worker finished since
    this thread last read the study."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    loaded = create_or_load_study(_spec("tpe"), url)
    other = load_study("tiny", url)
    first = claim_trial(loaded, 100)
    first.suggest_float("x", 0.0, 1.0)
    requeue(loaded, first, "signal")
    # Anything that reads through the cache between two claims (a callback, a sampler's
    # hook) fills it: the next claim must not hand that snapshot to its trial's sampler.
    loaded.study._get_trials(deepcopy=False, use_cache=True)
    elsewhere = claim_trial(other, 100)
    other.study.tell(elsewhere, 0.5)
    claim_trial(loaded, 100)
    complete = loaded.study._get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True
    )
    assert [t.number for t in complete] == [elsewhere.number]


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.db),
                                     pytest.param("mariadb", marks=pytest.mark.db)])  # fmt: skip
def test_a_claimed_new_trial_is_stored_as_optuna_stores_one(backend: str) -> None:
    # The claim inserts its new trial with its own statements (storage._create_claimed_trial);
    # Optuna, the dashboard and other workers must read it as one Optuna made. Trials
    # created by Optuna itself in between (Study.ask on a plain RDBStorage, outside hpo's
    # lock) keep the numbers dense and unique. A time zone far from UTC: Optuna keeps naive
    # UTC and shows local time, so a start stored in local time would be off by hours.
    with far_from_utc(), scratch_database(backend) as url:
        create_or_load_study(_spec(), url).storage.engine.dispose()
        loaded = load_study("tiny", url)
        plain = optuna.load_study(study_name="tiny", storage=url)
        before = datetime.datetime.now()
        claimed, asked = [], []
        for _ in range(3):
            claimed.append(claim_trial(loaded, 100))
            asked.append(plain.ask())  # Optuna's own new trial, as Study.ask stores it
        after = datetime.datetime.now()
        reader = load_study("tiny", url)  # as a worker or hpo's report reads (tokens hidden)
        trials = reader.study.get_trials(deepcopy=False)
        reader.storage.engine.dispose()
        time.sleep(1.1)  # DATETIME columns may keep whole seconds (MariaDB)
        loaded.storage.grace_period = 0  # every trial with a heartbeat row is "stale" now
        with_heartbeat = set(loaded.storage._get_stale_trial_ids(loaded.ref.study_id))
        loaded.storage.engine.dispose()
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials))), numbers
    by_number = {t.number: t for t in trials}
    for trial in claimed:
        stored = by_number[trial.number]
        assert stored.state == TrialState.RUNNING
        assert stored.system_attrs == {} and stored.user_attrs == {} and stored.params == {}
        # Local naive time, as Optuna returns it (stored as naive UTC): within the test.
        slack = datetime.timedelta(seconds=1)
        assert before - slack <= stored.datetime_start <= after + slack, stored.datetime_start
        assert trial._cached_frozen_trial.datetime_start == stored.datetime_start
    assert all(by_number[t.number].datetime_start <= after + slack for t in asked)
    assert with_heartbeat == {trial._trial_id for trial in claimed}


def test_the_heartbeat_thread_beats_first_an_interval_after_the_claims_beat() -> None:
    # A claim records the trial's first heartbeat (above). The worker's heartbeat thread
    # beats first an interval later: beating at once too only opened a second database
    # connection, for the moment, while the trial's first suggest held the pooled one.
    beats: list[tuple[int, float]] = []

    class Storage:
        def record_heartbeat_once(self, trial_id: int) -> None:
            beats.append((trial_id, time.monotonic()))

    started = time.monotonic()
    with hpo.worker.Heartbeat(Storage(), 7, 0.3):
        time.sleep(0.1)
        assert beats == []
        deadline = started + 10
        while len(beats) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [trial_id for trial_id, _ in beats[:2]] == [7, 7]
    (_, first), (_, second) = beats[:2]
    assert first - started >= 0.3 and second - first >= 0.3


@pytest.mark.parametrize("queued", [False, True], ids=["new trial", "queued trial"])
def test_a_claim_whose_commit_acknowledgement_is_lost_starts_one_trial(
    storage_url: str, queued: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL the whole claim is one transaction (storage._postgres_lock), so its
    # calls are not retried one by one: the worker repeats the claim. A repeat after a
    # COMMIT that landed would leave the first trial RUNNING with no worker (failed and
    # re-run after the grace period); the claim's token tells the repeat it landed.
    monkeypatch.setattr("hpo.storage.reconnect.random.uniform", lambda low, high: 0.0)  # no backoff
    # The long way (the one-message claim: test_a_claim_at_once_whose_answer_is_lost_...).
    monkeypatch.setattr(hpo.claim, "_new_trial_at_once", lambda *args: None)
    create_or_load_study(_spec(), storage_url).storage.engine.dispose()
    loaded = load_study("tiny", storage_url)
    if queued:
        loaded.study.enqueue_trial({"x": 0.25})
    fault = CommitThenDrop(loaded.storage)
    with fault.once(during="set_trial_state_values" if queued else "_create_new_trial"):
        trial = retry_on_disconnect(lambda: claim_trial(loaded, 10), what="claim", url=storage_url)
    running = loaded.study.get_trials(states=(TrialState.RUNNING,))
    assert [t.number for t in running] == [trial.number]
    assert trial.suggest_float("x", 0.0, 1.0) == (0.25 if queued else trial.params["x"])
    assert not loaded.study.get_trials(states=(TrialState.WAITING,))
    loaded.storage.engine.dispose()


@pytest.mark.db
def test_postgresql_grants_the_study_lock_first_come_first_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Waiters block in PostgreSQL's lock queue instead of polling with backoff, which let a
    # late poller overtake a worker that had waited minutes (measured with polling: claim
    # p99 139 s at 256 workers, with the lock held 15 ms per claim).
    with scratch_database("postgresql") as url:
        create_or_load_study(_spec(), url).storage.engine.dispose()
        holder = load_study("tiny", url)
        waiters = [load_study("tiny", url) for _ in range(4)]
        order: list[int] = []
        threads = []
        with hpo.claim.study_lock(holder.storage, "tiny"):
            for index, waiter in enumerate(waiters):

                def wait_and_record(waiter=waiter, index=index) -> None:
                    with hpo.claim.study_lock(waiter.storage, "tiny"):
                        order.append(index)

                threads.append(threading.Thread(target=wait_and_record, daemon=True))
                threads[-1].start()
                _wait_for_lock_waiters(url, index + 1)
        for thread in threads:
            thread.join(timeout=30)
        for loaded in (holder, *waiters):
            loaded.storage.engine.dispose()
    assert order == [0, 1, 2, 3]


def _wait_for_lock_waiters(url: str, count: int, timeout_s: float = 10) -> None:
    """Until ``count`` sessions of ``url``'s database wait for an advisory lock."""
    engine = sqlalchemy.create_engine(url)
    query = sqlalchemy.text(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = current_database()"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                if connection.execute(query).scalar() >= count:
                    return
            time.sleep(0.01)
        raise AssertionError(f"fewer than {count} waiters for the study lock")
    finally:
        engine.dispose()


def test_stale_trials_are_the_ones_optuna_itself_finds(storage_url: str) -> None:
    # hpo's _get_stale_trial_ids returns only the stale ids from one query; Optuna's loads
    # every RUNNING trial with its heartbeat (the claim's largest cost at 256 RUNNING).
    loaded = create_or_load_study(_spec(), storage_url)
    storage, study_id = loaded.storage, loaded.ref.study_id
    ages = [None, 0, 5, storage.grace_period - 5, storage.grace_period + 5, 10_000]
    models = hpo.compat.rdb_models()
    with hpo.compat.rdb_session(storage) as session:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
    for age in ages:
        trial_id = storage.create_new_trial(study_id)
        if age is not None:  # a trial without a heartbeat is never stale
            with hpo.compat.rdb_session(storage) as session:
                session.add(
                    models.TrialHeartbeatModel(
                        trial_id=trial_id, heartbeat=now - datetime.timedelta(seconds=age)
                    )
                )
    finished = storage.create_new_trial(study_id)
    storage.record_heartbeat(finished)
    storage.set_trial_state_values(finished, TrialState.COMPLETE, [0.5])

    ours = sorted(storage._get_stale_trial_ids(study_id))
    theirs = sorted(optuna.storages.RDBStorage._get_stale_trial_ids(storage, study_id))
    assert ours == theirs and len(ours) == 2
    storage.engine.dispose()


def test_a_claim_that_can_only_wait_takes_no_study_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Near a study's end every worker that finishes a trial claims again; when the budget
    # is handed out and the rest runs elsewhere the answer is "wait", known without the
    # lock. A stale trial (its worker gone) still sends the claim under the lock, where it
    # is failed and re-queued, and this worker runs its retry.
    monkeypatch.setenv("HPO_GRACE_S", "2")
    monkeypatch.setenv("HPO_HEARTBEAT_S", "1")
    watch = LockWatch(monkeypatch)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create_or_load_study(_spec(), url).storage.engine.dispose()
    elsewhere = load_study("tiny", url)
    running = claim_trial(elsewhere, 2)
    _finish(elsewhere, claim_trial(elsewhere, 2))
    loaded = load_study("tiny", url)
    watch.statements_held.clear()

    assert claim_trial(loaded, 2) == "wait"
    assert watch.statements_held == []  # the lock was not taken
    time.sleep(3)  # the other worker's trial goes stale (no heartbeat thread here)
    retry = claim_trial(loaded, 2)
    assert len(watch.statements_held) == 1
    assert not isinstance(retry, str) and retry.number != running.number
    assert loaded.study.get_trials()[running.number].state == TrialState.FAIL
    for study in (elsewhere, loaded):
        study.storage.engine.dispose()


def test_a_requeue_whose_commit_acknowledgement_is_lost_queues_one_retry(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The re-queue (a stop signal) is one transaction on PostgreSQL and MariaDB, repeated
    # as a whole after a lost connection: the repeat must see that the lost attempt's
    # COMMIT landed (trial FAIL, retry queued) and not queue a second retry.
    monkeypatch.setattr("hpo.storage.reconnect.random.uniform", lambda low, high: 0.0)  # no backoff
    create_or_load_study(_spec(), storage_url).storage.engine.dispose()
    loaded = load_study("tiny", storage_url)
    trial = claim_trial(loaded, 10)
    trial.suggest_float("x", 0.0, 1.0)
    trial.report(0.5, 1)
    fault = CommitThenDrop(loaded.storage)
    with fault.once(during="set_trial_state_values"):
        requeue(loaded, trial, "worker stopped (SIGTERM)")
    trials = loaded.study.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    assert trials[trial.number].user_attrs["fail_reason"] == "worker stopped (SIGTERM)"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1
    assert waiting[0].system_attrs["retry_history"][-1] == trial.number
    assert superseded_trials(trials) == {trial.number}
    loaded.storage.engine.dispose()


def _messages_at_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The one-message claims (``hpo.storage.one_message.rows_of``) sent from here on."""
    messages: list[str] = []
    real = hpo.storage.one_message.rows_of

    def recorded(connection, message: str):
        messages.append(message)
        return real(connection, message)

    monkeypatch.setattr(hpo.storage.one_message, "rows_of", recorded)
    return messages


@pytest.mark.db
def test_a_claim_at_once_is_one_message_of_five_statements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 256 workers claiming at once on two cores held the lock ~14 ms per claim with a
    # statement per round trip (each one waiting for its client to be scheduled); in one
    # message PostgreSQL runs the claim without the client. The same five statements
    # whether 2 or 30 trials run; a waiting trial sends the claim the long way, which
    # claims it.
    monkeypatch.setenv("HPO_GRACE_S", "3600")  # the RUNNING trials here have no worker
    watch = LockWatch(monkeypatch)
    messages = _messages_at_once(monkeypatch)
    with scratch_database("postgresql") as url:
        create_or_load_study(_spec(), url).storage.dispose()
        running, claimer = load_study("tiny", url), load_study("tiny", url)
        for others in (2, 30):
            while len(running.study.get_trials(states=(TrialState.RUNNING,))) < others:
                claim_trial(running, 1000).suggest_float("x", 0.0, 1.0)
            messages.clear()
            for _ in range(3):
                _finish(claimer, claim_trial(claimer, 1000))
            assert len(messages) == 3 and not watch.statements_held
            for message in messages:
                statements = [part.strip().split()[0] for part in message.split(";")]
                assert statements == ["BEGIN", "WITH", "SELECT", "WITH", "COMMIT"], message
                assert "pg_advisory_xact_lock" in message and "FOR UPDATE" in message
        claimer.study.enqueue_trial({"x": 0.125})
        trial = claim_trial(claimer, 1000)
        assert trial.suggest_float("x", 0.0, 1.0) == 0.125
        assert len(watch.statements_held) == 1  # the long way, under study_lock
        numbers = sorted(t.number for t in claimer.study.get_trials(deepcopy=False))
        running.storage.dispose()
        claimer.storage.dispose()
    assert numbers == list(range(len(numbers)))


@pytest.fixture
def watched_study(monkeypatch: pytest.MonkeyPatch):
    """A study on a scratch PostgreSQL database, loaded; the study lock watched
    (``LockWatch``) and the one-message claims recorded (``_messages_at_once``)."""
    watch = LockWatch(monkeypatch)
    messages = _messages_at_once(monkeypatch)
    with scratch_database("postgresql") as url:
        create_or_load_study(_spec(), url).storage.dispose()
        loaded = load_study("tiny", url)
        yield loaded, watch, messages
        loaded.storage.dispose()


@pytest.mark.db
def test_a_claim_at_once_builds_its_trial_from_the_answer_without_reading_it_back(
    watched_study,
) -> None:
    # optuna.Trial reads its trial when it is built: six statements that were two thirds
    # of a claim's client CPU. The claim's own answer is that trial, as stored.
    loaded, watch, messages = watched_study
    watch.count_statements(loaded.storage.engine)
    for _ in range(3):
        before, messages_before = watch._count, len(messages)
        trial = claim_trial(loaded, 10)
        assert len(messages) - messages_before == 1  # the claim
        assert watch._count == before  # and no statement besides: nothing read back
        built = trial._cached_frozen_trial
        assert built == loaded.storage.get_trial(trial._trial_id)  # read from storage
        assert built.datetime_start == loaded.storage.get_trial(trial._trial_id).datetime_start
        _finish(loaded, trial)


@pytest.mark.db
@pytest.mark.parametrize("landed", [True, False], ids=["committed", "not sent"])
def test_a_claim_at_once_whose_answer_is_lost_starts_one_trial(
    landed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection drops after the message was sent: its COMMIT may have landed (the
    # claim's token finds the trial) or not (the claim is repeated). Either way one trial.
    monkeypatch.setattr("hpo.storage.reconnect.random.uniform", lambda low, high: 0.0)  # no backoff
    sent: list[str] = []
    real = hpo.storage.one_message.rows_of

    def lossy(connection, message: str):
        sent.append(message)
        if len(sent) == 1:
            if landed:
                real(connection, message)
            connection.invalidate()
            lost = ConnectionError("server closed the connection unexpectedly")
            raise sqlalchemy.exc.OperationalError(message, None, lost)
        return real(connection, message)

    monkeypatch.setattr(hpo.storage.one_message, "rows_of", lossy)
    with scratch_database("postgresql") as url:
        create_or_load_study(_spec(), url).storage.dispose()
        loaded = load_study("tiny", url)
        trial = retry_on_disconnect(lambda: claim_trial(loaded, 10), what="claim", url=url)
        trial.suggest_float("x", 0.0, 1.0)
        running = loaded.study.get_trials(states=(TrialState.RUNNING,))
        everything = loaded.study.get_trials()
        loaded.storage.dispose()
    assert [t.number for t in running] == [trial.number] and len(everything) == 1
    assert len(sent) == (1 if landed else 2)


@pytest.mark.db
def test_a_claim_at_once_answers_wait_and_done_in_the_same_message(watched_study) -> None:
    # Near a study's end most claims answer "wait": one message, not a second, long claim.
    loaded, watch, messages = watched_study
    first, second = claim_trial(loaded, 2), claim_trial(loaded, 2)
    messages.clear()
    waited = claim_trial(loaded, 2)  # both trials still run
    _finish(loaded, first)
    _finish(loaded, second)
    done = claim_trial(loaded, 2)
    assert (waited, done) == ("wait", "done")
    assert len(messages) == 2 and not watch.statements_held


@pytest.mark.db
def test_a_claim_at_once_counts_stale_trials_before_the_lock_and_takes_the_long_way(
    watched_study,
) -> None:
    # The stale count joins every RUNNING trial to its heartbeat: it is taken once, before
    # the lock, and handed to the statement under it (counted again there, it was most of
    # the lock's hold at hundreds of RUNNING trials). A stale trial sends the claim the
    # long way, which fails and re-queues it, and this worker runs the retry.
    loaded, watch, messages = watched_study
    gone = claim_trial(loaded, 100)  # its worker never beats (no heartbeat thread here)
    loaded.storage.grace_period = 1
    time.sleep(1.5)
    messages.clear()
    retry = claim_trial(loaded, 100)
    assert len(messages) == 1 and len(watch.statements_held) == 1
    before_lock, under_lock = messages[0].split(";")[1], messages[0].split(";")[3]
    assert "JOIN trial_heartbeats" in before_lock and "JOIN trial_heartbeats" not in under_lock
    assert not isinstance(retry, str) and retry.number != gone.number
    assert loaded.study.get_trials()[gone.number].state == TrialState.FAIL
    assert loaded.study.get_trials()[retry.number].state == TrialState.RUNNING
    loaded.storage.grace_period = 3600  # none is stale: at once, as before
    messages.clear()
    fresh = claim_trial(loaded, 100)
    assert len(messages) == 1 and len(watch.statements_held) == 1
    assert fresh.number == retry.number + 1
