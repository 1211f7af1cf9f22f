"""Trial reads, per dialect: the rows of the trials a condition chooses, built into
Optuna's ``FrozenTrial`` as ``RDBStorage`` builds them.

On PostgreSQL one statement (``trial_rows_at_once``: each trial's child rows as JSON
arrays, one snapshot); elsewhere six (``trial_rows``: the trials, then their params,
values, user and system attributes and intermediate values). SQLAlchemy Core, not
Optuna's ORM: every worker's pruner reads each trial once it finishes, so a fleet of W
workers reads W x trials, and at 256 simulated workers on two cores the ORM's per-row
objects were two thirds of all client CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Container
from datetime import datetime, timezone
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import postgresql

from hpo import compat

# The most trial ids a read lists in one IN (...): below every backend's bound-value limit.
MAX_IN_LIST = 500

_Children = dict[int, list[Any]]
_TrialRows = tuple[list[Any], _Children, _Children, _Children, _Children, _Children]


def require_study(connection: sqlalchemy.Connection, study_id: int, *, lock: bool = False) -> None:
    """Raise KeyError, as Optuna does, when the study does not exist; with ``lock``, hold
    its row (``FOR UPDATE``) until the transaction ends, as Optuna does to number trials."""
    study = compat.rdb_models().StudyModel.__table__
    select = sqlalchemy.select(study.c.study_id).where(study.c.study_id == study_id)
    if connection.execute(select.with_for_update() if lock else select).first() is None:
        raise KeyError(compat.rdb_not_found_message())


def chosen_trials(
    study_id: int,
    states: Container[TrialState] | None,
    included_trial_ids: set[int],
    trial_id_greater_than: int,
) -> tuple[sqlalchemy.ColumnElement[bool], Callable[[int], bool] | None]:
    """The condition of Optuna's ``RDBStorage._get_trials`` for its arguments, and which of
    the trials read to keep (None: all of them).

    A long IN list exceeds a backend's limit on bound values (SQLite's is 999 in older
    builds); past ``MAX_IN_LIST`` the range from the lowest id is read and the rest
    dropped by the returned filter, as Optuna falls back to when its IN list fails."""
    trial = compat.rdb_models().TrialModel.__table__
    chosen = [trial.c.study_id == study_id]
    if states is not None:
        chosen.append(trial.c.state.in_(list(states)))  # type: ignore[call-overload]
    included = sorted(i for i in included_trial_ids if i <= trial_id_greater_than)
    if included and trial_id_greater_than > -1:
        listed = (
            trial.c.trial_id.in_(included)
            if len(included) <= MAX_IN_LIST
            else trial.c.trial_id >= included[0]
        )
        chosen.append(sqlalchemy.or_(listed, trial.c.trial_id > trial_id_greater_than))
    elif trial_id_greater_than > -1:
        chosen.append(trial.c.trial_id > trial_id_greater_than)
    keep = None
    if len(included) > MAX_IN_LIST:
        listed_ids = set(included)

        def keep(trial_id: int) -> bool:
            return trial_id in listed_ids or trial_id > trial_id_greater_than

    return sqlalchemy.and_(*chosen), keep


def build_trials(found: _TrialRows, keep: Callable[[int], bool] | None = None) -> list[FrozenTrial]:
    """The trials of ``found`` (what ``trial_rows`` or ``trial_rows_at_once`` read), by
    trial id, as Optuna builds them (``RDBStorage._build_frozen_trial_from_trial_model``).
    ``keep``: build only the trials whose id it accepts."""
    models = compat.rdb_models()
    rows, params, values, users, systems, steps = found
    to_value = models.TrialValueModel.stored_repr_to_value
    to_step_value = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
    trials = []
    for trial_id, number, state, started, completed in rows:
        if keep is not None and not keep(trial_id):
            continue
        stored_values = values.get(trial_id)
        objective_values: list[float] | None = None
        if stored_values:
            objective_values = [0.0] * len(stored_values)
            for objective, stored, kind in stored_values:
                objective_values[objective] = to_value(stored, kind)
        shapes = {name: _distribution(shape) for name, _, shape in params.get(trial_id, [])}
        trials.append(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=objective_values,
                datetime_start=stored_time_to_local(started),
                datetime_complete=stored_time_to_local(completed),
                params={
                    name: shapes[name].to_external_repr(internal)
                    for name, internal, _ in params.get(trial_id, [])
                },
                distributions=shapes,
                user_attrs={k: json.loads(v) for k, v in users.get(trial_id, [])},
                system_attrs={k: json.loads(v) for k, v in systems.get(trial_id, [])},
                intermediate_values={
                    n: to_step_value(v, kind) for n, v, kind in steps.get(trial_id, [])
                },
                trial_id=trial_id,
            )
        )
    return trials


def trial_rows(
    connection: sqlalchemy.Connection, chosen: sqlalchemy.ColumnElement[bool]
) -> _TrialRows:
    """The rows ``read_trials`` builds trials from, in six statements: the trials
    ``chosen`` selects (id, number, state, start, end; by id), then, per trial id, its
    rows of each of ``_trial_children``'s tables (params, values, user attributes, system
    attributes, intermediate values), in the table's order. No trial: no other statement."""
    trial = compat.rdb_models().TrialModel.__table__
    ids = sqlalchemy.select(trial.c.trial_id).where(chosen)
    rows = connection.execute(_trials_select(chosen)).all()
    found: list[_Children] = [{}, {}, {}, {}, {}]
    if not rows:
        return rows, *found
    for into, (table, columns) in zip(found, _trial_children(), strict=True):
        for row in connection.execute(
            sqlalchemy.select(table.c.trial_id, *(table.c[name] for name in columns))
            .where(table.c.trial_id.in_(ids))
            .order_by(table.primary_key.columns.values()[0])
        ):
            into.setdefault(row[0], []).append(row[1:])
    return rows, *found


def trial_rows_at_once(
    connection: sqlalchemy.Connection, chosen: sqlalchemy.ColumnElement[bool]
) -> _TrialRows:
    """``trial_rows`` in one PostgreSQL statement, one snapshot: each trial's row carries
    its rows of each child table as one JSON array (``json_agg`` of ``json_build_array``,
    in the table's order). A float in JSON is the server's text of the double, as it is in
    a column (exact, unless ``extra_float_digits`` is lowered), but a whole one has no
    decimal point (``0``, read as an int): each is made a float again here, and an enum,
    given as its label, Optuna's type.

    Why: a trial read is six or seven round trips the other way, and each worker makes
    two at every tell (Optuna's ``Study.tell`` reads the trial before and after) and one
    per batch of newly finished trials its pruner reads."""
    models = compat.rdb_models()
    value_type = models.TrialValueModel.TrialValueType
    step_type = models.TrialIntermediateValueModel.TrialIntermediateValueType
    rows = connection.execute(_trials_select(chosen).add_columns(*_children_as_json())).all()
    found: list[_Children] = [{}, {}, {}, {}, {}]
    for row in rows:
        params, values, users, systems, steps = row[5:]
        found[0][row[0]] = [(name, float(v), shape) for name, v, shape in params or ()]
        found[1][row[0]] = [(o, _float(v), value_type[kind]) for o, v, kind in values or ()]
        found[2][row[0]] = users or []
        found[3][row[0]] = systems or []
        found[4][row[0]] = [(n, _float(v), step_type[kind]) for n, v, kind in steps or ()]
    return [row[:5] for row in rows], *found


@functools.cache
def _children_as_json() -> list[sqlalchemy.ScalarSelect]:
    """For ``trial_rows_at_once``, per table of ``_trial_children``: the trial's rows as
    one JSON array, a subquery correlated to the trials table. Built once per process:
    every trial read sends them, whatever trials it chooses."""
    trial = compat.rdb_models().TrialModel.__table__
    arrays = []
    for table, columns in _trial_children():
        row = sqlalchemy.func.json_build_array(*(table.c[name] for name in columns))
        first = table.primary_key.columns.values()[0]
        arrays.append(
            sqlalchemy.select(sqlalchemy.func.json_agg(postgresql.aggregate_order_by(row, first)))
            .where(table.c.trial_id == trial.c.trial_id)
            .scalar_subquery()
        )
    return arrays


def _trials_select(chosen: sqlalchemy.ColumnElement[bool]) -> sqlalchemy.Select:
    """The trials ``chosen`` selects, by id: id, number, state, start and end."""
    trial = compat.rdb_models().TrialModel.__table__
    columns = ("trial_id", "number", "state", "datetime_start", "datetime_complete")
    return (
        sqlalchemy.select(*(trial.c[name] for name in columns))
        .where(chosen)
        .order_by(trial.c.trial_id)
    )


def _trial_children() -> list[tuple[sqlalchemy.Table, tuple[str, ...]]]:
    """The tables of a trial's rows and the columns read from each, in the order
    ``trial_rows`` returns them: params, values, user and system attributes,
    intermediate values."""
    models = compat.rdb_models()
    return [
        (models.TrialParamModel.__table__, ("param_name", "param_value", "distribution_json")),
        (models.TrialValueModel.__table__, ("objective", "value", "value_type")),
        (models.TrialUserAttributeModel.__table__, ("key", "value_json")),
        (models.TrialSystemAttributeModel.__table__, ("key", "value_json")),
        (
            models.TrialIntermediateValueModel.__table__,
            ("step", "intermediate_value", "intermediate_value_type"),
        ),
    ]


def _float(value: float | str | None) -> float | None:
    """A double read from JSON: a number, None, or the server's text for a value JSON
    has no number for ("NaN", "Infinity")."""
    return None if value is None else float(value)


@functools.lru_cache(maxsize=1024)
def _distribution(shape: str) -> optuna.distributions.BaseDistribution:
    """A parameter's distribution from its stored JSON; a study's trials share a few."""
    return optuna.distributions.json_to_distribution(shape)


def stored_time_to_local(stored: datetime | None) -> datetime | None:
    """Optuna's RDB schema keeps naive UTC and hands out naive local time
    (``TrialModel.datetime_start``)."""
    if stored is None:
        return None
    return stored.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
