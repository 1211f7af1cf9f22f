"""A trial's attributes, many in one transaction (``set_attrs``): every one lands, or none
does.

Why: a trial of hpo's own loop records what it trained as some twenty user attrs at its
end (``hpo.cnn_trainer.record_tally``). One write each was a transaction each (one
statement in autocommit on PostgreSQL, BEGIN ... COMMIT on SQLite and MariaDB), and a
failure among them left part of the record.

- PostgreSQL: one statement in autocommit (``attrs_upsert``): the trial's state and a
  multi-row upsert of every attribute, only if the trial is not finished; the attributes
  travel as two arrays, so one statement serves any number of them.
- SQLite, MariaDB (and any other SQL dialect): one session: the trial read and checked as
  Optuna checks it, one multi-row upsert (row by row through Optuna's own upsert on a
  dialect without one), one commit.

Errors are Optuna's: KeyError for a missing trial, UpdateFinishedTrialError for a finished
one, raised before anything is written. Retried like a single attribute
(``hpo.storage.reconnect``): an upsert keyed by (trial, key) with the same values, so a
repeat after a lost acknowledgement stores the same rows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy
from sqlalchemy.dialects import mysql, postgresql, sqlite

from hpo import compat
from hpo.storage.counts import FINISHED
from hpo.storage.transactions import in_one_statement
from hpo.storage.writes import attrs_upsert_from, updatable, write

USER_ATTRS = "TrialUserAttributeModel"
SYSTEM_ATTRS = "TrialSystemAttributeModel"


def set_attrs(storage: Any, model: str, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """Every one of ``attrs`` on the trial ``trial_id`` (in ``model``'s table: its user or
    system attributes) in one transaction. Nothing is written for an empty ``attrs``."""
    if not attrs:
        return
    values = {key: json.dumps(value) for key, value in attrs.items()}  # all, before any SQL
    model_cls = getattr(compat.rdb_models(), model)
    if in_one_statement(storage.engine):
        given = {"trial_id": trial_id, "keys": list(values), "values": list(values.values())}
        write(storage, attrs_upsert(model_cls.__tablename__), trial_id, given)
        return
    rows = [{"trial_id": trial_id, "key": k, "value_json": v} for k, v in values.items()]
    with compat.rdb_session(storage) as session:
        trial = compat.rdb_models().TrialModel.find_or_raise_by_id(trial_id, session)
        storage.check_trial_is_updatable(trial_id, trial.state)
        statement = _upsert(storage.engine.dialect.name, model_cls, rows)
        if statement is None:  # a dialect without an upsert: Optuna's own, row by row
            for key, value in attrs.items():
                compat.set_trial_attr_in_session(storage, session, model_cls, trial_id, key, value)
        else:
            session.execute(statement)


def _upsert(dialect: str, model_cls: Any, rows: list[dict[str, Any]]) -> Any:
    """One INSERT of every row that replaces the value of a key the trial already has (as
    Optuna's single-attribute upsert on that dialect), or None without one."""
    if dialect in ("mysql", "mariadb"):
        insert = mysql.insert(model_cls).values(rows)
        return insert.on_duplicate_key_update(value_json=insert.inserted.value_json)
    if dialect in ("sqlite", "postgresql"):
        module = sqlite if dialect == "sqlite" else postgresql
        insert = module.insert(model_cls).values(rows)
        return insert.on_conflict_do_update(
            index_elements=[model_cls.trial_id, model_cls.key],
            set_={"value_json": insert.excluded.value_json},
        )
    return None


@functools.cache
def attrs_upsert(table_name: str) -> sqlalchemy.Select:
    """``set_attrs``' statement on PostgreSQL: the attributes ``:keys`` of the trial
    ``:trial_id`` (in ``table_name``) set to ``:values`` (JSON, the same order), if the
    trial is not finished; answers the trial's state. A repeated key would be an error
    (one statement cannot update a row twice): the keys come from a mapping."""
    table = compat.rdb_models().TrialModel.metadata.tables[table_name]
    target = updatable()
    pairs = (
        sqlalchemy.func.unnest(
            sqlalchemy.bindparam("keys", type_=postgresql.ARRAY(table.c.key.type)),
            sqlalchemy.bindparam("values", type_=postgresql.ARRAY(table.c.value_json.type)),
        )
        .table_valued("key", "value_json")
        .render_derived(name="pairs")
    )
    rows = (
        sqlalchemy.select(
            sqlalchemy.bindparam("trial_id", type_=table.c.trial_id.type),
            pairs.c.key,
            pairs.c.value_json,
        )
        .select_from(pairs.join(target, sqlalchemy.true()))  # every pair, the one trial
        .where(target.c.state.not_in(FINISHED))
    )
    return attrs_upsert_from(table, target, rows)
