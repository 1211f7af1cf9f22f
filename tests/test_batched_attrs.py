"""Many trial user attrs in one transaction (``ReconnectingRDBStorage.set_trial_user_attrs``,
hpo.storage.attrs): every attr lands or none does, on SQLite, PostgreSQL (also through
PgBouncer) and MariaDB; a lost connection retries it exactly once; a storage without it
gets one write per attr (hpo.compat.set_trial_user_attrs)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import TrialState

import hpo.storage.attrs as attributes
import hpo.storage.reconnect as reconnect
from hpo import compat
from hpo.storage import ReconnectingRDBStorage, open_storage

from .databases import study_storage
from .pgbouncer import pgbouncer, through

optuna.logging.set_verbosity(optuna.logging.WARNING)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.db),
            pytest.param("mariadb", marks=pytest.mark.db)]  # fmt: skip
# A trial's record as ``record_tally`` writes it: numbers, lists, a dict, text; the
# "fault" key sits in the middle (where the fault-injection trigger fails the write).
RECORD: dict[str, Any] = {f"metric_{i:02d}": i / 7 for i in range(10)}
RECORD |= {"fault": 1, "per_epoch": [1.5, None, 2.5], "interval": {"low": 0.1, "high": 0.9}}
RECORD |= {f"count_{i:02d}": i for i in range(8)} | {"note": "ünïcode ✓", "nan": math.nan}

# A trigger that fails the insert of the user attr "fault": the write fails mid-way, after
# the rows before it are in.
TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER fault BEFORE INSERT ON trial_user_attributes "
        "WHEN NEW.key = 'fault' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION fault() RETURNS trigger AS $$ BEGIN "
        "IF NEW.key = 'fault' THEN RAISE EXCEPTION 'injected fault'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fault BEFORE INSERT ON trial_user_attributes "
        "FOR EACH ROW EXECUTE FUNCTION fault()",
    ],
    "mariadb": [
        "CREATE TRIGGER fault BEFORE INSERT ON trial_user_attributes FOR EACH ROW "
        "BEGIN IF NEW.key = 'fault' THEN "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected fault'; END IF; END"
    ],
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def storage(backend: str, tmp_path: Path) -> Iterator[ReconnectingRDBStorage]:
    with study_storage(backend, tmp_path, "attrs.db", prefix="small") as url:
        storage = open_storage(url)
        yield storage
        storage.engine.dispose()


def _trial(storage: ReconnectingRDBStorage) -> int:
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    return storage.create_new_trial(study_id)


def _same(stored: dict[str, Any], expected: dict[str, Any]) -> bool:
    assert set(stored) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(stored[key]), key
        else:
            assert stored[key] == value, key
    return True


def _rows(storage: ReconnectingRDBStorage, trial_id: int) -> int:
    with storage.engine.connect() as connection:
        return connection.execute(
            sqlalchemy.text("SELECT COUNT(*) FROM trial_user_attributes WHERE trial_id = :t"),
            {"t": trial_id},
        ).scalar_one()


def test_every_attr_lands_in_one_transaction(storage: ReconnectingRDBStorage) -> None:
    trial_id = _trial(storage)
    storage.set_trial_user_attr(trial_id, "metric_00", "earlier")  # replaced by the batch
    storage.set_trial_user_attr(trial_id, "kept", 7)  # not in the batch: left as it is
    commits: list[object] = []
    sent: list[str] = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda *args: commits.append(args))
    sqlalchemy.event.listen(
        storage.engine, "before_cursor_execute", lambda *args: sent.append(args[2])
    )
    storage.set_trial_user_attrs(trial_id, RECORD)
    storage.set_trial_user_attrs(trial_id, {})  # nothing to write: no statement
    if storage.engine.dialect.name == "postgresql":
        assert len(sent) == 1  # one statement, in autocommit
    else:
        assert len(commits) == 1 and len(sent) == 2  # the trial's state, one upsert
    assert _same(storage.get_trial(trial_id).user_attrs, RECORD | {"kept": 7})
    assert _rows(storage, trial_id) == len(RECORD) + 1


def test_a_failure_mid_way_leaves_none_of_the_attrs(
    storage: ReconnectingRDBStorage, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_DB_RETRY_S", "0.01")  # an error MariaDB calls operational: no wait
    trial_id = _trial(storage)
    storage.set_trial_user_attr(trial_id, "kept", 7)
    with storage.engine.begin() as connection:
        for statement in TRIGGERS[backend]:
            connection.exec_driver_sql(statement)
    with pytest.raises(Exception) as raised:  # noqa: PT011 (the database's own error)
        storage.set_trial_user_attrs(trial_id, RECORD)
    assert "injected fault" in _causes(raised.value)
    assert storage.get_trial(trial_id).user_attrs == {"kept": 7}
    # One write per attr, against the same fault, keeps every other: the trigger fails
    # the one write (Optuna's own ignores it on SQLite, as an IntegrityError).
    for key, value in RECORD.items():
        try:
            storage.set_trial_user_attr(trial_id, key, value)
        except Exception as error:
            assert key == "fault" and "injected fault" in _causes(error)
    assert set(storage.get_trial(trial_id).user_attrs) == set(RECORD) - {"fault"} | {"kept"}


def _causes(error: BaseException | None) -> str:
    """Every message of ``error``'s chain (Optuna wraps the database's)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(messages)


def test_a_finished_or_missing_trial_refuses_the_batch_before_writing(
    storage: ReconnectingRDBStorage,
) -> None:
    trial_id = _trial(storage)
    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_user_attrs(trial_id, RECORD)
    assert _rows(storage, trial_id) == 0
    with pytest.raises(KeyError):
        storage.set_trial_user_attrs(trial_id + 100, RECORD)


@pytest.mark.parametrize("landed", [True, False], ids=["ack-lost", "commit-lost"])
def test_a_lost_connection_retries_the_batch_exactly_once(
    storage: ReconnectingRDBStorage, landed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt's connection is lost after its commit landed (the acknowledgement
    lost) or before it: the call is retried once and the attrs are stored once."""
    trial_id = _trial(storage)
    real = attributes.set_attrs
    attempts: list[int] = []

    def lose_the_first(*args: Any) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            if landed:
                real(*args)
            raise sqlalchemy.exc.OperationalError("commit", {}, ConnectionError("lost"))
        real(*args)

    monkeypatch.setattr(attributes, "set_attrs", lose_the_first)
    monkeypatch.setattr(reconnect.time, "sleep", lambda seconds: None)
    storage.set_trial_user_attrs(trial_id, RECORD)
    assert len(attempts) == 2
    assert _same(storage.get_trial(trial_id).user_attrs, RECORD)
    assert _rows(storage, trial_id) == len(RECORD)


@pytest.mark.db
def test_the_batch_through_pgbouncer(tmp_path: Path) -> None:
    with study_storage("postgresql", tmp_path, prefix="small") as url, pgbouncer() as port:
        storage = open_storage(through(url, port))
        try:
            trial_id = _trial(storage)
            for _ in range(2):  # the statement again, on whatever server connection
                storage.set_trial_user_attrs(trial_id, RECORD)
            assert _same(storage.get_trial(trial_id).user_attrs, RECORD)
        finally:
            storage.engine.dispose()


@pytest.mark.parametrize("kind", ["inmemory", "journal"])
def test_a_storage_without_the_batch_gets_one_write_per_attr(kind: str, tmp_path: Path) -> None:
    if kind == "inmemory":
        storage: Any = optuna.storages.InMemoryStorage()
    else:
        path = str(tmp_path / "journal.log")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    compat.set_trial_user_attrs(trial, {"a": 1, "b": [2, 3]})
    assert trial.user_attrs == {"a": 1, "b": [2, 3]}
    assert study.trials[0].user_attrs == {"a": 1, "b": [2, 3]}


def test_a_trial_on_hpos_storage_writes_the_batch_once(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'one.db'}")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    calls: list[dict[str, Any]] = []
    real = storage.set_trial_user_attrs
    storage.set_trial_user_attrs = lambda trial_id, attrs: (
        calls.append(attrs),
        real(trial_id, attrs),
    )  # type: ignore[method-assign]
    compat.set_trial_user_attrs(trial, RECORD)
    assert calls == [RECORD]
    assert _same(trial.user_attrs, RECORD)  # the trial's cached copy, as set_user_attr keeps it
    assert _same(study.trials[0].user_attrs, RECORD)
