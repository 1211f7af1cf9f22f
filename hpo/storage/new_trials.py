"""The rows a claim writes: a new RUNNING trial with its client token and first
heartbeat, or a WAITING trial made RUNNING with its token, each in one transaction so
that a worker killed at any moment leaves a trial that goes stale and is retried.

Every function here is a primitive: which trial to claim, and whether the budget allows
it, is decided by ``hpo.claim``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpo import compat
from hpo.retry import clean_retry_attrs
from hpo.storage.counts import trial_with_token
from hpo.storage.heartbeats import first_heartbeat
from hpo.storage.reads import require_study
from hpo.storage.reconnect import (
    CLAIM_TOKEN_ATTR,
    CREATE_TOKEN_ATTR,
    Attempts,
    retry_on_disconnect,
    without_tokens,
)


def create_with_token(
    storage: Any, study_id: int, template_trial: FrozenTrial | None, token: str, in_claim: bool
) -> FrozenTrial:
    """Optuna's ``_create_new_trial`` with a client token written in the same transaction;
    a retry after a lost connection looks for the token first and returns the trial its
    earlier attempt committed (Optuna's own repeats the insert, leaving a second trial).
    ``in_claim``: a RUNNING trial also gets its first heartbeat, in the same transaction."""
    template = copy.deepcopy(template_trial) if template_trial else running_template()
    template.system_attrs = {**template.system_attrs, CREATE_TOKEN_ATTR: token}
    models = compat.rdb_models()
    attempts = Attempts()

    def attempt() -> FrozenTrial:
        retried = attempts.next()
        existing = None
        with compat.rdb_session(storage) as session:
            # Locks the study row: trial numbers are counted, and tokens looked up, in turn.
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            if retried:
                existing = trial_with_token(session, study_id, token, (CREATE_TOKEN_ATTR,))
            if existing is None:
                trial = compat.add_new_trial(storage, session, study_id, template)
                created = from_template(template, trial.trial_id, trial.number)
                if template.state == TrialState.RUNNING and in_claim:
                    first_heartbeat(storage, session, trial.trial_id)
        if existing is not None:  # our earlier attempt committed it
            return optuna.storages.RDBStorage.get_trial(storage, existing)
        return created

    return without_tokens(retry_on_disconnect(attempt, what="create_new_trial", url=storage.url))


def create_claimed(
    storage: Any, connection: sqlalchemy.Connection, study_id: int, token: str
) -> FrozenTrial:
    """A new RUNNING trial with its first heartbeat and the claim's token, inserted on the
    claim's connection (``bound_to``), holding the study lock: what ``create_with_token``
    stores for a claim, in SQLAlchemy Core statements (two on PostgreSQL:
    ``_insert_claimed``; five on MariaDB) instead of some twenty of Optuna's ORM, each in
    a savepoint. The study row is locked first, as Optuna does, because its own trial
    creation (``enqueue_trial`` from a process outside hpo's lock) counts trial numbers
    under that row lock."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    attr = models.TrialSystemAttributeModel.__table__
    beat = models.TrialHeartbeatModel.__table__
    require_study(connection, study_id, lock=True)
    started = datetime.now()
    # Optuna's RDB schema keeps naive UTC (``TrialModel.datetime_start``).
    stored_start = started.astimezone(timezone.utc).replace(tzinfo=None)
    template = running_template()
    template.datetime_start = started
    heartbeat = storage.heartbeat_interval is not None
    if connection.dialect.name == "postgresql":
        trial_id, number = _insert_claimed(connection, study_id, token, stored_start, heartbeat)
        return from_template(template, trial_id, number)
    number = connection.execute(
        sqlalchemy.select(sqlalchemy.func.count())
        .select_from(trial)
        .where(trial.c.study_id == study_id)
    ).scalar_one()
    trial_id = connection.execute(
        sqlalchemy.insert(trial).values(
            number=number, study_id=study_id, state=TrialState.RUNNING, datetime_start=stored_start
        )
    ).inserted_primary_key[0]
    connection.execute(
        sqlalchemy.insert(attr).values(
            trial_id=trial_id, key=CREATE_TOKEN_ATTR, value_json=json.dumps(token)
        )
    )
    if heartbeat:
        connection.execute(sqlalchemy.insert(beat).values(trial_id=trial_id))
    return from_template(template, int(trial_id), int(number))


def _insert_claimed(
    connection: sqlalchemy.Connection, study_id: int, token: str, start: datetime, heartbeat: bool
) -> tuple[int, int]:
    """``create_claimed``'s count and three inserts as one PostgreSQL statement
    (data-modifying CTEs): its id and number. A separate statement from the study row's
    lock, so that its snapshot, taken after the lock was granted, counts a trial that
    whoever held the row (Optuna's own create) committed meanwhile.

    Why one statement: each round trip under the lock is paid by every waiter, and with
    hundreds of clients on a busy node a round trip costs milliseconds of scheduling, not
    of database work: 256 first claims at once through PgBouncer held the lock ~13 ms each
    with the four statements (docs/benchmarks.md)."""
    trial = compat.rdb_models().TrialModel.__table__
    number = (
        sqlalchemy.select(sqlalchemy.func.count().label("trials"))
        .where(trial.c.study_id == study_id)
        .cte("counts")
    )
    created, writes = claimed_trial_inserts(study_id, number, start, token, heartbeat=heartbeat)
    row = connection.execute(
        sqlalchemy.select(created.c.trial_id, created.c.number).add_cte(*writes)
    ).one()
    return int(row[0]), int(row[1])


def claimed_trial_inserts(
    study_id: int,
    counts: Any,
    start: datetime,
    token: str,
    *,
    heartbeat: bool = True,
    where: Any = None,
    also: Sequence[Any] = (),
) -> tuple[Any, list[Any]]:
    """A claimed trial's three inserts as data-modifying CTEs: ``created`` (the RUNNING
    trial, numbered ``counts.c.trials``, inserted only ``where`` holds, returning its id
    and number), and the inserts of its claim token and, with ``heartbeat``, its first
    heartbeat, to attach with ``add_cte``. ``also``: more CTEs ``where`` reads. One
    PostgreSQL statement for what ``create_claimed`` does in three on MariaDB."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    attr = models.TrialSystemAttributeModel.__table__
    beat = models.TrialHeartbeatModel.__table__
    created = (
        sqlalchemy.insert(trial)
        .from_select(
            ["number", "study_id", "state", "datetime_start"],
            sqlalchemy.select(
                counts.c.trials,
                sqlalchemy.literal(study_id),
                sqlalchemy.literal(TrialState.RUNNING, trial.c.state.type),
                sqlalchemy.literal(start, trial.c.datetime_start.type),
            )
            .select_from(counts, *also)
            .where(sqlalchemy.true() if where is None else where),
        )
        .returning(trial.c.trial_id, trial.c.number)
        .cte("created")
    )
    token_row = sqlalchemy.insert(attr).from_select(
        ["trial_id", "key", "value_json"],
        sqlalchemy.select(
            created.c.trial_id,
            sqlalchemy.literal(CREATE_TOKEN_ATTR),
            sqlalchemy.literal(json.dumps(token)),
        ),
    )
    writes = [token_row.cte("token")]
    if heartbeat:
        first_beat = sqlalchemy.insert(beat).from_select(
            ["trial_id", "heartbeat"],
            sqlalchemy.select(created.c.trial_id, sqlalchemy.func.clock_timestamp()),
        )
        writes.append(first_beat.cte("beat"))
    return created, writes


def claim_queued(storage: Any, trial_id: int, token: str, in_claim: bool) -> bool:
    """WAITING -> RUNNING, as ``RDBStorage.set_trial_state_values`` does, plus the claim's
    token: True when this call made the trial RUNNING, False when another worker did. A
    retry after a lost connection that finds the trial RUNNING answers whether the token
    is its own. ``in_claim``: the first heartbeat and a retry's clean user attrs are
    written in the same transaction."""
    models = compat.rdb_models()
    attempts = Attempts()

    def attempt() -> bool:
        retried = attempts.next()
        try:
            with compat.rdb_session(storage) as session:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                if retried and trial.state == TrialState.RUNNING:
                    claim = models.TrialSystemAttributeModel.find_by_trial_and_key(
                        trial, CLAIM_TOKEN_ATTR, session
                    )
                    return claim is not None and json.loads(claim.value_json) == token
                storage.check_trial_is_updatable(trial_id, trial.state)
                if trial.state != TrialState.WAITING:
                    return False
                trial.state = TrialState.RUNNING
                trial.datetime_start = datetime.now()
                compat.set_trial_system_attr_in_session(
                    storage, session, trial_id, CLAIM_TOKEN_ATTR, token
                )
                if in_claim:
                    first_heartbeat(storage, session, trial_id)
                    _clean_claimed_retry(session, trial)
                return True
        except sqlalchemy.exc.IntegrityError:
            return False

    return retry_on_disconnect(attempt, what="set_trial_state_values", url=storage.url)


def _clean_claimed_retry(session: Any, trial: Any) -> None:
    """A retry being claimed keeps only the user attrs a retry may start with
    (``hpo.retry.clean_retry_attrs``), in the claim's transaction: one queued by an older
    hpo still carries its predecessor's ``fail_reason``, metrics and worker, which would
    otherwise end up on a retry that completes (Optuna has no call that deletes an attr)."""
    models = compat.rdb_models()
    lineage = models.TrialSystemAttributeModel.find_by_trial_and_key(
        trial, "retry_history", session
    )
    if lineage is None:
        return
    rows = session.query(models.TrialUserAttributeModel).filter(
        models.TrialUserAttributeModel.trial_id == trial.trial_id
    )
    stored = {row.key: row for row in rows}
    clean = clean_retry_attrs({key: json.loads(row.value_json) for key, row in stored.items()})
    for key, row in stored.items():
        if key not in clean:
            session.delete(row)
    for key, value in clean.items():
        if key in stored:
            stored[key].value_json = json.dumps(value)
        else:
            session.add(
                models.TrialUserAttributeModel(
                    trial_id=trial.trial_id, key=key, value_json=json.dumps(value)
                )
            )


def from_template(template: FrozenTrial, trial_id: int, number: int) -> FrozenTrial:
    """The trial Optuna stored from ``template`` (what ``_create_new_trial`` returns)."""
    return FrozenTrial(
        number=number,
        state=template.state,
        value=None,
        values=template.values,
        datetime_start=template.datetime_start,
        datetime_complete=template.datetime_complete,
        params=template.params,
        distributions=template.distributions,
        user_attrs=template.user_attrs,
        system_attrs=template.system_attrs,
        intermediate_values=template.intermediate_values,
        trial_id=trial_id,
    )


def running_template() -> FrozenTrial:
    """What Optuna inserts for ``create_new_trial(study_id)`` without a template."""
    return FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
