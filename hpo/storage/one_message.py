"""A claim in one message, on PostgreSQL through psycopg: BEGIN, the study lock, the
study row's lock, one statement that counts the budget and inserts the new RUNNING trial
with its token and first heartbeat, and COMMIT, sent as one message that the server runs
without waiting for the client.

Why: the lock is held from the moment it is granted to the COMMIT, and the other way
every statement in between waits for this client to be scheduled. With 256 workers
claiming at once on two cores each hold took ~14 ms, and the last first claim came 7 s
after the start (docs/benchmarks.md); in one message the hold is the database's own work.
The lock is not taken when the counts before it already say the budget is handed out
while trials run (what most claims see near a study's end).

The statement that counts and inserts runs after the study row's lock, so its snapshot
counts a trial that Optuna's own create (which numbers under that row lock) committed
meanwhile. Values are rendered into the SQL by SQLAlchemy (a message of several
statements cannot carry parameters): integers, a hex token and a timestamp. What the
counts mean for the claim ("wait", "done", the long way) is ``hpo.claim``'s to decide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpo import compat
from hpo.storage.counts import FINISHED, requeued
from hpo.storage.heartbeats import grace_s, stale_count
from hpo.storage.locks import postgres_lock_key
from hpo.storage.new_trials import claimed_trial_inserts, from_template, running_template

# Stand-ins for a claim's token and start time in its compiled message, replaced at each claim.
TOKEN_MARK = "0" * 32
START_MARK = datetime(2000, 1, 1, 0, 0, 0, 123456)
# The stale count taken before the lock, for the statement under the lock.
STALE_SETTING = "hpo.claim_stale"
# Compiled messages of this process, by (study id, study name, total, grace).
_CLAIM_MESSAGES: dict[tuple[int, str, int, float], str] = {}


@dataclass(frozen=True)
class AtOnceCounts:
    """What a one-message claim that made no trial counted: whether it took the study lock,
    the study's finished trials (re-queued ones not counted), its RUNNING trials, and its
    stale ones (None when the lock was not taken)."""

    locked: bool
    finished: int
    running: int
    stale: int | None


class NoTrialAtOnce(Exception):
    """No trial was made in one round trip (``ReconnectingRDBStorage.at_once``).
    ``counts``: what the message counted instead, or None where it was not sent (not
    PostgreSQL through psycopg, no heartbeats, or not hpo's claim token)."""

    def __init__(self, counts: AtOnceCounts | None) -> None:
        super().__init__(counts)
        self.counts = counts


def claims_at_once(storage: Any) -> bool:
    """Whether a claim can be one message here: PostgreSQL through psycopg (the simple
    query protocol, several results), with heartbeats (the message inserts the first one)."""
    return (
        storage.heartbeat_interval is not None and storage.lock_engine().dialect.driver == "psycopg"
    )


def prepare(storage: Any, study_id: int, study_name: str, total_trials: int) -> str:
    """The message for this study and budget, compiled once per process (compiling costs
    ~4 ms of client CPU, 5 ms the first time in a process; filling in the token and the
    time, 0.04 ms). A worker calls it before its first claim, so that a fleet starting
    together does not compile while it claims."""
    key = (study_id, study_name, total_trials, grace_s(storage))
    compiled = _CLAIM_MESSAGES.get(key)
    if compiled is None:
        compiled = _CLAIM_MESSAGES[key] = _message(storage, *key)
    return compiled


def create_at_once(
    storage: Any, study_id: int, study_name: str, total_trials: int, token: str
) -> tuple[int, FrozenTrial]:
    """A new RUNNING trial (its id, and the trial) with its token and first heartbeat, as
    ``hpo.storage.new_trials.create_claimed`` stores it, when no trial is stale, none
    waits and the budget has room: all in one message. Raises NoTrialAtOnce with what
    the message counted when it made none, or without counts where no message can be
    sent (``claims_at_once``; a token that is not hpo's, ``uuid4().hex``)."""
    if not claims_at_once(storage) or not re.fullmatch(r"[0-9a-f]{32}", token):
        raise NoTrialAtOnce(None)
    compiled = prepare(storage, study_id, study_name, total_trials)
    started = datetime.now()
    stored_start = started.astimezone(timezone.utc).replace(tzinfo=None)
    message = compiled.replace(TOKEN_MARK, token).replace(
        str(START_MARK), stored_start.isoformat(sep=" ", timespec="microseconds")
    )
    with storage.lock_engine().connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        locked, _, ((trial_id, number, finished, running, stale_n),) = rows_of(connection, message)
    if trial_id is None:
        raise NoTrialAtOnce(AtOnceCounts(bool(locked), finished, running, stale_n))
    template = running_template()
    template.datetime_start = started
    return int(trial_id), from_template(template, int(trial_id), int(number))


def _message(storage: Any, study_id: int, study_name: str, total_trials: int, grace: float) -> str:
    """``create_at_once``'s message, with ``TOKEN_MARK`` and ``START_MARK`` in
    place of the claim's token and start time."""
    study = compat.rdb_models().StudyModel.__table__
    lock = _lock_unless_surely_waiting(study_id, study_name, total_trials, grace)
    row_lock = (
        sqlalchemy.select(study.c.study_id).where(study.c.study_id == study_id).with_for_update()
    )
    counts, requeued = claim_counts(study_id)  # after both locks
    # Not set when the lock was not taken ("wait"): '' on a connection that had it in
    # an earlier transaction, NULL on one that never had it.
    stale_before = sqlalchemy.cast(
        sqlalchemy.func.nullif(sqlalchemy.func.current_setting(STALE_SETTING, True), ""),
        sqlalchemy.Integer,
    )
    room = sqlalchemy.and_(
        counts.c.waiting == 0,
        stale_before == 0,
        counts.c.finished - requeued.c.n + counts.c.running < total_trials,
    )
    created, writes = claimed_trial_inserts(
        study_id, counts, START_MARK, TOKEN_MARK, where=room, also=(requeued,)
    )
    true = sqlalchemy.true()
    claim = (
        sqlalchemy.select(
            created.c.trial_id,
            created.c.number,
            (counts.c.finished - requeued.c.n).label("finished"),
            counts.c.running,
            stale_before.label("stale"),
        )
        .select_from(counts.join(requeued, true).outerjoin(created, true))
        .add_cte(*writes)
    )
    dialect = storage.lock_engine().dialect

    def sql(statement: sqlalchemy.Executable) -> str:
        compiled = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        return str(compiled)

    message = "; ".join(["BEGIN", sql(lock), sql(row_lock), sql(claim), "COMMIT"])
    assert message.count(TOKEN_MARK) == 1 and message.count(str(START_MARK)) == 1
    return message


def _lock_unless_surely_waiting(
    study_id: int, study_name: str, total_trials: int, grace: float
) -> sqlalchemy.Select:
    """The message's first statement: the study's advisory lock, taken unless the counts
    before it say the claim can only wait (the budget handed out, trials running, none
    stale), and the stale count handed to the statement under the lock in a setting local
    to the transaction. Counted again under the lock, the stale count was most of the
    lock's hold at hundreds of RUNNING trials (1.3 of 1.8 ms at 600). A trial that goes
    stale while this claim waits is failed and re-queued by the next claim that finds it,
    as is one that goes stale just after the claim."""
    counts, requeued = claim_counts(study_id)
    stale = stale_count(study_id, grace)
    handed_out = counts.c.finished - requeued.c.n + counts.c.running >= total_trials
    surely_wait = sqlalchemy.and_(handed_out, counts.c.running > 0, stale.c.n == 0)
    return (
        sqlalchemy.select(
            sqlalchemy.func.pg_advisory_xact_lock(postgres_lock_key(study_name)),
            sqlalchemy.func.set_config(
                STALE_SETTING, sqlalchemy.cast(stale.c.n, sqlalchemy.Text), True
            ),
        )
        .select_from(counts, requeued, stale)
        .where(sqlalchemy.not_(surely_wait))
    )


def claim_counts(study_id: int) -> tuple[Any, Any]:
    """The CTEs a claim in one message counts with: the study's trials per state
    (``counts``: finished, running, waiting, all) and its re-queued trials (``requeued``:
    distinct retry histories, as ``hpo.storage.counts.count_trials``)."""
    trial = compat.rdb_models().TrialModel.__table__
    count = sqlalchemy.func.count
    counts = (
        sqlalchemy.select(
            count().filter(trial.c.state.in_(FINISHED)).label("finished"),
            count().filter(trial.c.state == TrialState.RUNNING).label("running"),
            count().filter(trial.c.state == TrialState.WAITING).label("waiting"),
            count().label("trials"),
        )
        .where(trial.c.study_id == study_id)
        .cte("counts")
    )
    return counts, requeued(study_id).cte("requeued")


def rows_of(connection: sqlalchemy.Connection, message: str) -> list[list[tuple[Any, ...]]]:
    """Send ``message`` (several statements, no parameters: PostgreSQL's simple query
    protocol, one round trip) on ``connection`` in autocommit: the rows of each of its
    statements that return rows, in order. An error rolls back the transaction the
    message opened; a lost connection is raised as SQLAlchemy's OperationalError, which
    ``is_connection_error`` recognises."""
    raw = connection.connection.driver_connection
    dbapi = connection.dialect.loaded_dbapi
    results = []
    try:
        with raw.cursor() as cursor:
            cursor.execute(message)
            while True:
                if cursor.description is not None:
                    results.append(cursor.fetchall())
                if not cursor.nextset():
                    break
    except dbapi.Error as error:
        try:
            raw.execute("ROLLBACK")
        except dbapi.Error:
            connection.invalidate()
        if isinstance(error, dbapi.OperationalError) or raw.closed:
            connection.invalidate()
            raise sqlalchemy.exc.OperationalError(message, None, error) from error
        raise sqlalchemy.exc.DBAPIError(message, None, error) from error
    return results
