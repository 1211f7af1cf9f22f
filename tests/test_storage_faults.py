"""Every write hpo's storage retries happens exactly once after an *ambiguous* failure: the
server commits, then the connection drops before the client sees the acknowledgement.

The fault is injected at the SQLAlchemy dialect's ``do_commit``: the real COMMIT runs, then
the DBAPI connection is closed and the driver's own "connection lost" error raised, so
SQLAlchemy invalidates the connection exactly as for a real drop. Each write runs on SQLite
and (``db`` marker) on the local PostgreSQL and MariaDB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpo.settings import DB_RETRY_ENV
from hpo.storage import ReconnectingRDBStorage, open_storage

from .databases import study_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed"),
]

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.db),
    pytest.param("mariadb", marks=pytest.mark.db),
]
DISTRIBUTION = FloatDistribution(0.0, 1.0)


def _lost_connection_error(dialect_name: str, driver_connection) -> Exception:
    """The error each driver raises when its connection is gone after the COMMIT."""
    driver_connection.close()
    if dialect_name == "sqlite":
        import sqlite3

        return sqlite3.ProgrammingError("Cannot operate on a closed database.")
    if dialect_name == "postgresql":
        import psycopg

        return psycopg.OperationalError("server closed the connection unexpectedly")
    import pymysql

    return pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")


class CommitThenDrop:
    """Arms a storage so that its next COMMIT lands and the acknowledgement is lost: a
    COMMIT, or a statement in autocommit (its own transaction, as hpo writes a trial's
    parameter or intermediate value in one statement on PostgreSQL)."""

    def __init__(self, storage: ReconnectingRDBStorage) -> None:
        self.storage = storage
        self.armed = False
        self.fired = 0
        dialect = storage.engine.dialect
        commit = dialect.do_commit

        execute = dialect.do_execute

        def do_commit(dbapi_connection) -> None:
            commit(dbapi_connection)
            # the driver's connection under the pool's proxy
            self._drop_if_armed(dialect.name, dbapi_connection.dbapi_connection)

        def do_execute(cursor, statement, parameters, context=None) -> None:
            execute(cursor, statement, parameters, context)
            if getattr(cursor.connection, "autocommit", None) is True:  # psycopg's flag
                self._drop_if_armed(dialect.name, cursor.connection)

        dialect.do_commit = do_commit
        dialect.do_execute = do_execute

    def _drop_if_armed(self, dialect_name: str, driver_connection) -> None:
        if self.armed:
            self.armed = False
            self.fired += 1
            raise _lost_connection_error(dialect_name, driver_connection)

    @contextlib.contextmanager
    def once(self, during: str | None = None) -> Iterator[None]:
        """Drop after the next COMMIT, or after the first COMMIT inside the storage method
        ``during`` (for calls that read before they write, e.g. ``Study.ask``)."""
        if during is None:
            self.armed = True
            yield
        else:
            method = getattr(self.storage, during)

            def arming(*args, **kwargs):
                if not self.fired:
                    self.armed = True
                return method(*args, **kwargs)

            setattr(self.storage, during, arming)
            try:
                yield
            finally:
                delattr(self.storage, during)
        assert self.fired == 1, "the fault was never injected"
        self.fired = 0


@pytest.fixture(params=BACKENDS)
def faulty(
    request, tmp_path: Path, monkeypatch
) -> Iterator[tuple[ReconnectingRDBStorage, CommitThenDrop]]:
    monkeypatch.setenv(DB_RETRY_ENV, "30")
    monkeypatch.setattr(
        "hpo.storage.reconnect.random.uniform", lambda low, high: 0.0
    )  # no backoff wait
    with study_storage(request.param, tmp_path, "faults.db") as url:
        storage = open_storage(url)
        assert isinstance(storage, ReconnectingRDBStorage)
        yield storage, CommitThenDrop(storage)
        storage.engine.dispose()


def _study(storage) -> int:
    return storage.create_new_study([StudyDirection.MAXIMIZE], "s")


def _running_trial(storage) -> tuple[int, int]:
    study_id = _study(storage)
    return study_id, storage.create_new_trial(study_id)


def test_create_new_study_with_a_name_creates_one_study_and_returns_it(faulty) -> None:
    storage, fault = faulty
    with fault.once():
        study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "named")
    assert [(s.study_name, s._study_id) for s in storage.get_all_studies()] == [("named", study_id)]


def test_create_new_study_without_a_name_creates_one_study(faulty) -> None:
    storage, fault = faulty
    with fault.once():
        study_id = storage.create_new_study([StudyDirection.MINIMIZE])
    studies = storage.get_all_studies()
    assert len(studies) == 1 and studies[0]._study_id == study_id
    assert studies[0].study_name.startswith("no-name-")


def test_create_new_study_that_exists_already_still_raises_duplicated(faulty) -> None:
    storage, _ = faulty
    _study(storage)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        _study(storage)


def test_delete_study_deletes_without_error(faulty) -> None:
    storage, fault = faulty
    study_id = _study(storage)
    with fault.once():
        storage.delete_study(study_id)
    assert storage.get_all_studies() == []


def test_create_new_trial_creates_one_trial(faulty) -> None:
    storage, fault = faulty
    study_id = _study(storage)
    with fault.once():
        trial_id = storage.create_new_trial(study_id)
    trials = storage.get_all_trials(study_id)
    assert [(t._trial_id, t.number, t.state) for t in trials] == [(trial_id, 0, TrialState.RUNNING)]
    assert trials[0].system_attrs == {}  # hpo's token stays hidden


def test_create_new_trial_from_a_template_creates_one_trial(faulty) -> None:
    storage, fault = faulty
    study_id = _study(storage)
    template = optuna.trial.create_trial(
        value=0.5, params={"x": 0.25}, distributions={"x": DISTRIBUTION}, system_attrs={"a": 1}
    )
    with fault.once():
        trial_id = storage.create_new_trial(study_id, template)
    trials = storage.get_all_trials(study_id)
    assert len(trials) == 1 and trials[0]._trial_id == trial_id
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == 0.5
    assert trials[0].params == {"x": 0.25} and trials[0].system_attrs == {"a": 1}


def test_ask_through_optunas_cache_layer_creates_one_trial(faulty) -> None:
    storage, fault = faulty
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    with fault.once(during="_create_new_trial"):
        trial = study.ask()
    assert [t.number for t in study.get_trials()] == [trial.number] == [0]


def test_complete_with_values_succeeds_once_stored(faulty) -> None:
    storage, fault = faulty
    _, trial_id = _running_trial(storage)
    with fault.once():
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.75])
    stored = storage.get_trial(trial_id)
    assert stored.state == TrialState.COMPLETE and stored.values == [0.75]


def test_fail_succeeds_once_stored(faulty) -> None:
    storage, fault = faulty
    _, trial_id = _running_trial(storage)
    with fault.once():
        assert storage.set_trial_state_values(trial_id, TrialState.FAIL)
    assert storage.get_trial(trial_id).state == TrialState.FAIL


def test_finishing_a_trial_finished_with_other_values_still_raises(faulty) -> None:
    storage, _ = faulty
    _, trial_id = _running_trial(storage)
    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.75])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])


def test_claiming_a_waiting_trial_reports_the_claim_as_ours(faulty) -> None:
    storage, fault = faulty
    study_id = _study(storage)
    waiting = optuna.trial.create_trial(state=TrialState.WAITING)
    trial_id = storage.create_new_trial(study_id, waiting)
    with fault.once():
        assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is True
    assert storage.get_trial(trial_id).state == TrialState.RUNNING
    assert storage.get_trial_system_attrs(trial_id) == {}
    # Another worker's claim of the now RUNNING trial is refused, as in Optuna.
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is False


def test_enqueued_trial_is_run_once_through_the_cache_layer(faulty) -> None:
    storage, fault = faulty
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.enqueue_trial({"x": 0.5})
    with fault.once(during="set_trial_state_values"):
        trial = study.ask()
    assert trial.number == 0 and trial.suggest_float("x", 0, 1) == 0.5
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


IDEMPOTENT_WRITES: dict[str, Callable] = {
    "set_study_user_attr": lambda s, study, trial: s.set_study_user_attr(study, "k", [1]),
    "set_study_system_attr": lambda s, study, trial: s.set_study_system_attr(study, "k", 2),
    "set_trial_param": lambda s, study, trial: s.set_trial_param(trial, "x", 0.5, DISTRIBUTION),
    "set_trial_intermediate_value": lambda s, study, trial: s.set_trial_intermediate_value(
        trial, 3, 0.25
    ),
    "set_trial_user_attr": lambda s, study, trial: s.set_trial_user_attr(trial, "k", "v"),
    "set_trial_system_attr": lambda s, study, trial: s.set_trial_system_attr(trial, "k", "v"),
    "set_trial_user_attrs": lambda s, study, trial: s.set_trial_user_attrs(trial, {"k": "v"}),
    "record_heartbeat": lambda s, study, trial: s.record_heartbeat(trial),
}


@pytest.mark.parametrize("write", IDEMPOTENT_WRITES)
def test_idempotent_write_is_stored_once_without_error(faulty, write: str) -> None:
    storage, fault = faulty
    study_id, trial_id = _running_trial(storage)
    with fault.once():
        IDEMPOTENT_WRITES[write](storage, study_id, trial_id)
    trial = storage.get_trial(trial_id)
    assert storage.get_study_user_attrs(study_id) == ({"k": [1]} if "study_user" in write else {})
    assert storage.get_study_system_attrs(study_id) == ({"k": 2} if "study_system" in write else {})
    assert trial.params == ({"x": 0.5} if "param" in write else {})
    assert trial.intermediate_values == ({3: 0.25} if "intermediate" in write else {})
    assert trial.user_attrs == ({"k": "v"} if "trial_user" in write else {})
    assert trial.system_attrs == ({"k": "v"} if "trial_system" in write else {})
    assert len(storage.get_all_trials(study_id)) == 1


def test_without_the_checks_the_ambiguous_failure_duplicates_a_trial(tmp_path, monkeypatch) -> None:
    """The fault is real: Optuna's own RDBStorage, given the same fault, creates two trials."""
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # Optuna's retry waits up to 2 s
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}")
    fault = CommitThenDrop(storage)  # type: ignore[arg-type]
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    with fault.once():
        storage.create_new_trial(study_id)
    assert len(storage.get_all_trials(study_id)) == 2
    storage.engine.dispose()
