"""A running trial's writes in one statement each, on PostgreSQL: a parameter, an
intermediate value, an attribute, the tell. Each writes only if the trial is not finished
and answers the trial's state (and what the caller must check), so Optuna's errors come
out as Optuna raises them (``write``).

Why: Optuna's ORM versions are transactions of four or five round trips (BEGIN, the trial,
the write, COMMIT), and under PgBouncer's transaction pooling a transaction holds a server
connection across all of them; a ``suggest_*`` cost ~8 ms of client CPU that way, a
``report`` ~5 ms (docs/benchmarks.md). Every statement is built once per process: building
one cost more client CPU than running it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.dialects import postgresql

from hpo import compat
from hpo.storage.counts import FINISHED
from hpo.storage.transactions import reading


def write(
    storage: Any, statement: sqlalchemy.Select, trial_id: int, values: dict[str, Any]
) -> sqlalchemy.Row:
    """Run one statement that writes to a trial only if it is not finished, and whose first
    column is the trial's state: its row, or Optuna's error for a trial that is missing
    (KeyError) or finished (UpdateFinishedTrialError)."""
    with reading(storage) as connection:
        row = connection.execute(statement, values).one_or_none()
    if row is None:
        raise KeyError(compat.rdb_not_found_message())
    storage.check_trial_is_updatable(trial_id, row[0])
    return row


def set_param(
    storage: Any,
    trial_id: int,
    param_name: str,
    param_value_internal: float,
    distribution: optuna.distributions.BaseDistribution,
    previous_distribution: optuna.distributions.BaseDistribution | None,
) -> bool:
    """Optuna's ``_set_trial_param`` in one statement (``param_insert``): the trial's
    state, the study's earlier distribution of the parameter (unless the caller knows it)
    and the insert. False where Optuna's own must run instead: a compatible but different
    earlier distribution (Optuna decides, and raises its errors in its order).

    The insert happens only where Optuna's would: the trial is not finished and the
    earlier distribution, if any, is this one (a repeated name is ignored, as Optuna
    ignores its unique-key error)."""
    if previous_distribution is not None and not compatible(previous_distribution, distribution):
        return False
    shape = optuna.distributions.distribution_to_json(distribution)
    values = {
        "trial_id": trial_id,
        "name": param_name,
        "value": param_value_internal,
        "shape": shape,
    }
    _, stored_shape = write(
        storage, param_insert(look_back=previous_distribution is None), trial_id, values
    )
    return stored_shape is None or stored_shape == shape


def set_intermediate_value(storage: Any, trial_id: int, step: int, value: float) -> None:
    """Optuna's ``set_trial_intermediate_value`` in one statement (``step_upsert``): an
    insert, or an update of the step's earlier value, where the trial is not finished."""
    model = compat.rdb_models().TrialIntermediateValueModel
    stored, kind = model.intermediate_value_to_stored_repr(value)
    values = {"trial_id": trial_id, "step": step, "value": stored, "kind": kind}
    write(storage, step_upsert(), trial_id, values)


def set_attr(storage: Any, table_name: str, trial_id: int, key: str, value: Any) -> None:
    """A trial's user or system attribute (``table_name``) set in one statement
    (``attr_upsert``)."""
    values = {"trial_id": trial_id, "key": key, "value": json.dumps(value)}
    write(storage, attr_upsert(table_name), trial_id, values)


def finish(storage: Any, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
    """Optuna's ``set_trial_state_values`` to a finished state, in one statement
    (``finish_statement``): the state, the time it ended and the values, where the trial
    is not finished. Every tell writes through here."""
    model = compat.rdb_models().TrialValueModel
    given: dict[str, Any] = {"finished_id": trial_id, "new_state": state}
    given["complete"] = datetime.now()  # Optuna's time: the client's
    for objective, value in enumerate(values or ()):
        given[f"value_{objective}"], given[f"type_{objective}"] = model.value_to_stored_repr(value)
    _, finished = write(storage, finish_statement(len(values or ())), trial_id, given)
    if not finished:  # finished by another worker since the snapshot: as Optuna, raise
        raise optuna.exceptions.UpdateFinishedTrialError(
            f"Trial with id {trial_id} has already finished and can not be updated."
        )
    return True


def compatible(
    earlier: optuna.distributions.BaseDistribution, later: optuna.distributions.BaseDistribution
) -> bool:
    try:
        optuna.distributions.check_distribution_compatibility(earlier, later)
    except ValueError:
        return False
    return True


def updatable(bound: str = "trial_id") -> sqlalchemy.CTE:
    """The study and state of the trial whose id is bound as ``bound``, for a statement
    that writes to it only if it is not finished (``write``)."""
    trial = compat.rdb_models().TrialModel.__table__
    return (
        sqlalchemy.select(trial.c.study_id, trial.c.state)
        .where(trial.c.trial_id == sqlalchemy.bindparam(bound))
        .cte("target")
    )


@functools.cache
def param_insert(look_back: bool) -> sqlalchemy.Select:
    """``set_param``'s statement: inserts the parameter ``:name`` = ``:value`` with
    its distribution ``:shape`` into the trial ``:trial_id`` if it is not finished and,
    with ``look_back``, if the study's earlier distribution of that name, if any, is the
    same; answers the trial's state and that earlier distribution."""
    models = compat.rdb_models()
    param = models.TrialParamModel.__table__
    trial = models.TrialModel.__table__
    target = updatable()
    shape = sqlalchemy.bindparam("shape", type_=param.c.distribution_json.type)
    allowed = [target.c.state.not_in(FINISHED)]
    earlier: sqlalchemy.ColumnElement[Any] = sqlalchemy.null()
    if look_back:
        earlier = (
            sqlalchemy.select(param.c.distribution_json)
            .join(trial, trial.c.trial_id == param.c.trial_id)
            .where(
                trial.c.study_id == target.c.study_id,
                param.c.param_name == sqlalchemy.bindparam("name"),
            )
            .limit(1)
            .scalar_subquery()
        )
        allowed.append(sqlalchemy.or_(earlier.is_(None), earlier == shape))
    row = sqlalchemy.select(
        sqlalchemy.bindparam("trial_id", type_=param.c.trial_id.type),
        sqlalchemy.bindparam("name", type_=param.c.param_name.type),
        sqlalchemy.bindparam("value", type_=param.c.param_value.type),
        shape,
    ).where(*allowed)
    written = (
        postgresql.insert(param)
        .from_select(["trial_id", "param_name", "param_value", "distribution_json"], row)
        .on_conflict_do_nothing()
        .returning(param.c.param_id)
        .cte("written")
    )
    return sqlalchemy.select(target.c.state, earlier).add_cte(written)


def attrs_upsert_from(
    table: sqlalchemy.Table, target: sqlalchemy.CTE, rows: sqlalchemy.Select
) -> sqlalchemy.Select:
    """Insert ``rows`` (trial_id, key, value_json) into the attribute ``table``, replacing
    a key the trial already has; the statement answers ``target``'s trial state (no row:
    the trial is missing), written only where ``rows`` found it unfinished."""
    upsert = postgresql.insert(table).from_select(["trial_id", "key", "value_json"], rows)
    written = (
        upsert.on_conflict_do_update(
            index_elements=["trial_id", "key"], set_={"value_json": upsert.excluded.value_json}
        )
        .returning(table.c.trial_id)
        .cte("written")
    )
    return sqlalchemy.select(target.c.state).add_cte(written)


@functools.cache
def attr_upsert(table_name: str) -> sqlalchemy.Select:
    """``set_attr``'s statement: the attribute ``:key`` of the trial ``:trial_id``
    (in ``table_name``: its user or system attributes) set to ``:value`` (JSON), if the
    trial is not finished; answers the trial's state."""
    table = compat.rdb_models().TrialModel.metadata.tables[table_name]
    target = updatable()
    row = sqlalchemy.select(
        sqlalchemy.bindparam("trial_id", type_=table.c.trial_id.type),
        sqlalchemy.bindparam("key", type_=table.c.key.type),
        sqlalchemy.bindparam("value", type_=table.c.value_json.type),
    ).where(target.c.state.not_in(FINISHED))
    return attrs_upsert_from(table, target, row)


@functools.cache
def finish_statement(objectives: int) -> sqlalchemy.Select:
    """``finish``'s statement for ``objectives`` values: the trial ``:finished_id``
    set to ``:new_state`` at ``:complete`` with ``:value_N`` of ``:type_N`` for each
    objective N, if it is not finished; answers the trial's state before and whether it
    was set. The update checks the state of the row it updates (a concurrent finish is
    seen)."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    table = models.TrialValueModel.__table__
    target = updatable("finished_id")
    updated = (
        sqlalchemy.update(trial)
        .where(
            # Not "trial_id": a parameter named as a column of an UPDATE sets that column.
            trial.c.trial_id == sqlalchemy.bindparam("finished_id"),
            trial.c.state.not_in(FINISHED),
        )
        .values(
            state=sqlalchemy.bindparam("new_state", type_=trial.c.state.type),
            datetime_complete=sqlalchemy.bindparam(
                "complete", type_=trial.c.datetime_complete.type
            ),
        )
        .returning(trial.c.trial_id)
        .cte("updated")
    )
    ctes = [updated]
    if objectives:
        rows: Any = [
            sqlalchemy.select(
                updated.c.trial_id,
                sqlalchemy.literal(n, table.c.objective.type),
                # Cast: in a UNION, PostgreSQL takes an untyped parameter for text.
                sqlalchemy.cast(sqlalchemy.bindparam(f"value_{n}"), table.c.value.type),
                sqlalchemy.cast(sqlalchemy.bindparam(f"type_{n}"), table.c.value_type.type),
            )
            for n in range(objectives)
        ]
        rows = rows[0] if objectives == 1 else sqlalchemy.union_all(*rows)
        upsert = postgresql.insert(table).from_select(
            ["trial_id", "objective", "value", "value_type"], rows
        )
        ctes.append(
            upsert.on_conflict_do_update(
                index_elements=["trial_id", "objective"],
                set_={"value": upsert.excluded.value, "value_type": upsert.excluded.value_type},
            )
            .returning(table.c.trial_id)
            .cte("written")
        )
    done = sqlalchemy.select(sqlalchemy.func.count()).select_from(updated).scalar_subquery()
    return sqlalchemy.select(target.c.state, done > 0).add_cte(*ctes)


@functools.cache
def step_upsert() -> sqlalchemy.Select:
    """``set_intermediate_value``'s statement: the value ``:value`` of type ``:kind``
    at ``:step`` of the trial ``:trial_id``, inserted or replaced if the trial is not
    finished; answers the trial's state."""
    table = compat.rdb_models().TrialIntermediateValueModel.__table__
    target = updatable()
    row = sqlalchemy.select(
        sqlalchemy.bindparam("trial_id", type_=table.c.trial_id.type),
        sqlalchemy.bindparam("step", type_=table.c.step.type),
        sqlalchemy.bindparam("value", type_=table.c.intermediate_value.type),
        sqlalchemy.bindparam("kind", type_=table.c.intermediate_value_type.type),
    ).where(target.c.state.not_in(FINISHED))
    upsert = postgresql.insert(table).from_select(
        ["trial_id", "step", "intermediate_value", "intermediate_value_type"], row
    )
    written = (
        upsert.on_conflict_do_update(
            index_elements=["trial_id", "step"],
            set_={
                "intermediate_value": upsert.excluded.intermediate_value,
                "intermediate_value_type": upsert.excluded.intermediate_value_type,
            },
        )
        .returning(table.c.trial_intermediate_value_id)
        .cte("written")
    )
    return sqlalchemy.select(target.c.state).add_cte(written)
