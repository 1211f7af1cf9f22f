"""Heartbeats: a running trial's sign of life, and which trials lost theirs.

Every worker records a heartbeat for its running trial every ``$HPO_HEARTBEAT_S`` seconds
(20; ``hpo.settings``); a trial whose heartbeat is older than ``$HPO_GRACE_S`` (60) is
*stale*: failed by the next worker that claims, and re-queued with the same parameters
and its intermediate values (``hpo.retry.RetryWithCleanAttrs``). A trial gets its first
heartbeat in the transaction that makes it RUNNING (``first_heartbeat``), so no moment
exists in which a killed worker leaves a RUNNING trial that can never go stale.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import timedelta
from typing import Any

import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.dialects import postgresql

from hpo import compat
from hpo.storage.transactions import in_one_statement, reading


def grace_s(storage: Any) -> float:
    """Seconds without a heartbeat after which a RUNNING trial is stale, as Optuna decides
    (its grace period, else two heartbeat intervals)."""
    assert storage.heartbeat_interval is not None
    if storage.grace_period is not None:
        return storage.grace_period
    return 2 * storage.heartbeat_interval


def record_once(storage: Any, trial_id: int) -> bool:
    """The trial's heartbeat row inserted or set to the server's time, in one statement in
    autocommit (PostgreSQL); False where not on PostgreSQL (Optuna's own runs).

    Why: Optuna's is six round trips (BEGIN, the row, the row again for update, the
    server's time, the update, COMMIT), and under PgBouncer's transaction pooling its
    transaction holds a server connection across all of them: with 256 workers on two
    cores such transactions held 11 of the pool's 20 connections on average
    (docs/benchmarks.md). A trial that no longer exists is ignored, as Optuna ignores its
    foreign-key error."""
    if not in_one_statement(storage.engine):
        return False
    with contextlib.suppress(sqlalchemy.exc.IntegrityError), reading(storage) as connection:
        connection.execute(_heartbeat_upsert(), {"trial_id": trial_id})
    return True


@functools.cache
def _heartbeat_upsert() -> sqlalchemy.Insert:
    """``record_once``'s statement: the heartbeat of the trial ``:trial_id`` set to the
    server's time (``now()``, as Optuna sets it), its row made if it has none."""
    beat = compat.rdb_models().TrialHeartbeatModel.__table__
    upsert = postgresql.insert(beat).values(
        trial_id=sqlalchemy.bindparam("trial_id"), heartbeat=sqlalchemy.func.now()
    )
    return upsert.on_conflict_do_update(
        index_elements=["trial_id"], set_={"heartbeat": sqlalchemy.func.now()}
    )


def stale_trial_ids(storage: Any, study_id: int) -> list[int]:
    """The study's RUNNING trials whose last heartbeat is older than the grace period, as
    Optuna's own ``_get_stale_trial_ids`` decides, in one query that returns only those.

    Optuna's loads every RUNNING trial with its heartbeat and compares in Python; it runs
    at every claim, under the study lock, so at 256 RUNNING trials that was the claim's
    largest cost. Trials without a heartbeat are never stale, as in Optuna."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    beat = models.TrialHeartbeatModel.__table__
    with reading(storage) as connection:
        now = connection.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
        oldest = now.replace(tzinfo=None) - timedelta(seconds=grace_s(storage))
        rows = connection.execute(
            sqlalchemy.select(trial.c.trial_id)
            .join(beat, beat.c.trial_id == trial.c.trial_id)
            .where(
                trial.c.study_id == study_id,
                trial.c.state == TrialState.RUNNING,
                beat.c.heartbeat < oldest,
            )
        )
        return [int(row[0]) for row in rows]


def stale_count(study_id: int, grace: float) -> Any:
    """The CTE of the study's stale RUNNING trials (column ``n``): a heartbeat older than
    ``grace`` seconds by the server's clock, as ``stale_trial_ids``. Its cost grows with
    the RUNNING trials (an index probe of the heartbeats per trial: 1.3 of a claim
    message's 1.8 ms at 600 RUNNING)."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    beat = models.TrialHeartbeatModel.__table__
    oldest = sqlalchemy.func.clock_timestamp() - sqlalchemy.literal(
        timedelta(seconds=grace), sqlalchemy.Interval()
    )
    return (
        sqlalchemy.select(sqlalchemy.func.count().label("n"))
        .select_from(trial.join(beat, beat.c.trial_id == trial.c.trial_id))
        .where(
            trial.c.study_id == study_id,
            trial.c.state == TrialState.RUNNING,
            beat.c.heartbeat < oldest,
        )
        .cte("stale")
    )


def first_heartbeat(storage: Any, session: Any, trial_id: int) -> None:
    """The trial's first heartbeat, in ``session`` (Optuna's ORM; the claim's transaction)."""
    if storage.heartbeat_interval is None:
        return
    models = compat.rdb_models()
    heartbeat = models.TrialHeartbeatModel.where_trial_id(trial_id, session, True)
    if heartbeat is None:
        session.add(models.TrialHeartbeatModel(trial_id=trial_id))
    else:
        heartbeat.heartbeat = session.execute(sqlalchemy.func.now()).scalar()
