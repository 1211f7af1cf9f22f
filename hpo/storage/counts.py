"""What a claim reads: a study's trials counted per state, its re-queued trials, its
waiting trials, the trials started or finished since a mark, and the trial a client
token made. Each is one aggregate or narrow query on the trials table, the same cost with
10 trials or 10,000 (a claim makes them, some under the study lock).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.dialects import postgresql

from hpo import compat
from hpo.storage.transactions import in_one_statement, read

# The states a trial ends in (COMPLETE, PRUNED, FAIL).
FINISHED = [state for state in TrialState if state.is_finished()]


@dataclass(frozen=True)
class TrialCounts:
    """A study's trials counted by the database: per state, and how many FAIL trials were
    re-queued (each has a retry, which counts in its place)."""

    by_state: dict[TrialState, int]
    requeued: int

    def __getitem__(self, state: TrialState) -> int:
        return self.by_state.get(state, 0)


def requeued(study_id: int) -> sqlalchemy.Select:
    """The number of the study's re-queued trials (column ``n``): the distinct retry
    histories its retries carry. A retry's history is its predecessor's plus the
    predecessor, so distinct histories are distinct predecessors
    (``hpo.retry.superseded_trials`` counts the same set)."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    attr = models.TrialSystemAttributeModel.__table__
    return (
        sqlalchemy.select(sqlalchemy.func.count(sqlalchemy.distinct(attr.c.value_json)).label("n"))
        .select_from(attr.join(trial, trial.c.trial_id == attr.c.trial_id))
        .where(trial.c.study_id == study_id, attr.c.key == "retry_history")
    )


def count_trials(storage: Any, study_id: int) -> TrialCounts:
    """The study's trials per state, and its re-queued FAIL trials, in one query with an
    aggregate subquery: the same cost with 10 trials or 10,000, and with 1 or 500 RUNNING.

    Reading the trials themselves (Optuna's cached ``get_all_trials``) re-reads every
    unfinished trial with all its rows on every call: at 256 RUNNING trials that made one
    claim ~0.4 s of client CPU."""
    trial = compat.rdb_models().TrialModel.__table__
    lineages = requeued(study_id).scalar_subquery()
    rows = read(
        storage,
        sqlalchemy.select(trial.c.state, sqlalchemy.func.count(), lineages)
        .where(trial.c.study_id == study_id)
        .group_by(trial.c.state),
    )
    n_requeued = rows[0][2] if rows else 0
    return TrialCounts({TrialState(state): int(n) for state, n, _ in rows}, int(n_requeued or 0))


def trial_states_since(
    storage: Any, study_id: int, among: set[int], greater_than: int
) -> list[tuple[int, bool]]:
    """(id, finished) of the study's trials above ``greater_than`` and of the finished ones
    in ``among``, in one query on the trials table: how Optuna's cache layer learns which
    trials finished since it last looked, and which newer ones have not
    (``hpo.compat.finished_trials_cache``). With the cache's ``last_finished_trial_id``
    and ``unfinished_trial_ids``, a few rows per call (the trials started or finished
    since), not every finished trial of the study."""
    trial = compat.rdb_models().TrialModel.__table__
    if in_one_statement(storage.engine):
        # One array parameter, not one per id: ``among`` holds every RUNNING trial of the
        # fleet the cache has seen (hundreds), at every report of every worker.
        ids = sqlalchemy.bindparam(
            "among", sorted(among), type_=postgresql.ARRAY(sqlalchemy.Integer)
        )
        listed = trial.c.trial_id == sqlalchemy.any_(ids)
    else:
        listed = trial.c.trial_id.in_(sorted(among))
    seen = sqlalchemy.or_(
        trial.c.trial_id > greater_than,
        sqlalchemy.and_(listed, trial.c.state.in_(FINISHED)),
    )
    rows = read(
        storage,
        sqlalchemy.select(trial.c.trial_id, trial.c.state)
        .where(trial.c.study_id == study_id, seen)
        .order_by(trial.c.trial_id),
    )
    return [(int(trial_id), state.is_finished()) for trial_id, state in rows]


def waiting_trial_ids(storage: Any, study_id: int) -> list[int]:
    """Ids of the study's WAITING (enqueued or re-queued) trials, lowest number first (the
    order ``Study.ask`` pops them in), in one query."""
    trial = compat.rdb_models().TrialModel.__table__
    rows = read(
        storage,
        sqlalchemy.select(trial.c.trial_id)
        .where(trial.c.study_id == study_id, trial.c.state == TrialState.WAITING)
        .order_by(trial.c.number),
    )
    return [int(row[0]) for row in rows]


def trial_with_token(session: Any, study_id: int, token: str, keys: Sequence[str]) -> int | None:
    """The id of the study's trial that holds ``token`` under one of ``keys`` (hpo's
    client tokens), or None."""
    models = compat.rdb_models()
    trial, attr = models.TrialModel, models.TrialSystemAttributeModel
    found = (
        session.query(attr.trial_id)
        .join(trial, trial.trial_id == attr.trial_id)
        .filter(
            trial.study_id == study_id,
            attr.key.in_(keys),
            attr.value_json == json.dumps(token),
        )
        .scalar()
    )
    return None if found is None else int(found)
