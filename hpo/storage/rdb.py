"""``ReconnectingRDBStorage``: Optuna's RDBStorage whose calls survive a database restart
and whose writes happen exactly once (``hpo.storage.reconnect``), with hpo's faster reads
and writes on PostgreSQL (``reads``, ``writes``, ``heartbeats``) and the claim's two modes
(``claiming``, ``at_once``).

This is the one subclass of an Optuna storage, and so the one place outside
``hpo.compat`` that overrides Optuna's private methods (``_create_new_trial``,
``_set_trial_param``, ``_get_trials``, ``_get_stale_trial_ids``; each pinned by
``tests/test_compat.py``). Each method is a thin dispatch: the work is in the modules named.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import uuid
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

import hpo.storage.attrs as attributes
import hpo.storage.counts as counts
import hpo.storage.heartbeats as heartbeats
import hpo.storage.locks as locks
import hpo.storage.new_trials as new_trials
import hpo.storage.one_message as one_message
import hpo.storage.reads as reads
import hpo.storage.transactions as transactions
import hpo.storage.writes as writes
from hpo import compat
from hpo.storage.reconnect import TOKEN_ATTRS, Attempts, retry_every_call, retry_on_disconnect


@retry_every_call
class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose calls survive a database restart, and whose writes happen
    exactly once even when a commit's acknowledgement is lost (``hpo.storage.reconnect``)."""

    # Per thread (a class attribute: RDBStorage pickles its instance state, a local cannot
    # be pickled). Set by ``claiming`` and ``at_once``.
    _claim_state = threading.local()
    # The study lock's own URL (``use_lock_database``); None: the storage's engine.
    lock_url: str | None = None

    def use_lock_database(self, database: str) -> None:
        """Take the study lock, with the whole claim done under it, on ``database`` of the
        same PostgreSQL server: ``$HPO_LOCK_DATABASE``, a PgBouncer alias of the study's
        database whose pool is a few server connections (docs/scale.md). A worker waiting
        for the lock waits inside a transaction, which under transaction pooling holds a
        server connection; on its own alias at most that pool's few connections wait, and
        the other waiters queue in PgBouncer holding none.

        Raises StorageError when ``database`` is not the storage's database (another name
        on the server, or another server): the claim would write its trial there."""
        self.lock_url, self._lock_engine = locks.open_lock_engine(self, database)

    def lock_engine(self) -> sqlalchemy.Engine:
        """The engine the study lock's transaction runs on (``use_lock_database``)."""
        return self.engine if self.lock_url is None else self._lock_engine

    def dispose(self) -> None:
        """Close every pooled connection (the storage's and the study lock's)."""
        self.engine.dispose()
        if self.lock_url is not None:
            self._lock_engine.dispose()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_lock_engine", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        if self.lock_url is not None:
            self._lock_engine = sqlalchemy.create_engine(self.lock_url, **self.engine_kwargs)

    # ------------------------------------------------------------ checked before repeating

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        name = study_name
        if name is None:  # named before the first attempt (hpo.storage.reconnect)
            name = f"{compat.default_study_name_prefix()}{uuid.uuid4()}"
        attempts = Attempts()

        def attempt() -> int:
            retried = attempts.next()
            try:
                return optuna.storages.RDBStorage.create_new_study(self, directions, name)
            except optuna.exceptions.DuplicatedStudyError:
                if not retried:
                    raise
                study_id = optuna.storages.RDBStorage.get_study_id_from_name(self, name)
                stored = optuna.storages.RDBStorage.get_study_directions(self, study_id)
                if stored != list(directions):
                    raise
                return study_id  # our first attempt committed it

        return retry_on_disconnect(attempt, what="create_new_study", url=self.url)

    def delete_study(self, study_id: int) -> None:
        attempts = Attempts()

        def attempt() -> None:
            retried = attempts.next()
            try:
                optuna.storages.RDBStorage.delete_study(self, study_id)
            except KeyError:
                if not retried:
                    raise  # our first attempt deleted it otherwise

        retry_on_disconnect(attempt, what="delete_study", url=self.url)

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        token = self._claim_token() or uuid.uuid4().hex
        connection = transactions.bound_connection(self)
        at_once = getattr(self._claim_state, "at_once", None) if self._in_claim() else None
        if template_trial is None and at_once is not None:
            trial_id, created = one_message.create_at_once(self, study_id, *at_once, token)
            # For ``get_trial`` inside ``at_once``'s block (cleared when it ends).
            self._claim_state.created = (self, trial_id, copy.deepcopy(created))
            return created
        if template_trial is None and self._in_claim() and connection is not None:
            return new_trials.create_claimed(self, connection, study_id, token)
        return new_trials.create_with_token(
            self, study_id, template_trial, token, in_claim=self._in_claim()
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state == TrialState.RUNNING and values is None:
            token = self._claim_token() or uuid.uuid4().hex
            return new_trials.claim_queued(self, trial_id, token, in_claim=self._in_claim())
        attempts = Attempts()

        def attempt() -> bool:
            if attempts.next():
                stored = optuna.storages.RDBStorage.get_trial(self, trial_id)
                if stored.state == state and (values is None or stored.values == list(values)):
                    return True  # our earlier attempt committed it
            if state.is_finished() and self._in_one_statement:
                return writes.finish(self, trial_id, state, values)
            return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return retry_on_disconnect(attempt, what="set_trial_state_values", url=self.url)

    # ------------------------------------------- one statement each on PostgreSQL (writes)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
        previous_distribution: optuna.distributions.BaseDistribution | None,
    ) -> None:
        args = (trial_id, param_name, param_value_internal, distribution, previous_distribution)
        if not self._in_one_statement or not writes.set_param(self, *args):
            super()._set_trial_param(*args)  # its errors in its order: finished, then shape

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        if self._in_one_statement:
            writes.set_intermediate_value(self, trial_id, step, intermediate_value)
        else:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._set_attr_at_once("TrialUserAttributeModel", trial_id, key, value):
            super().set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._set_attr_at_once("TrialSystemAttributeModel", trial_id, key, value):
            super().set_trial_system_attr(trial_id, key, value)

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Every one of ``attrs`` on the trial in one transaction: all land or none does
        (``hpo.storage.attrs``). Retried as a single attribute is (``hpo.storage.reconnect``)."""
        attributes.set_attrs(self, attributes.USER_ATTRS, trial_id, attrs)

    def _set_attr_at_once(self, model: str, trial_id: int, key: str, value: Any) -> bool:
        """A trial's attribute in ``model``'s table, in one statement on PostgreSQL; False
        elsewhere (Optuna's own runs)."""
        if not self._in_one_statement:
            return False
        table = getattr(compat.rdb_models(), model).__tablename__
        writes.set_attr(self, table, trial_id, key, value)
        return True

    def record_heartbeat(self, trial_id: int) -> None:
        self.record_heartbeat_once(trial_id)

    def record_heartbeat_once(self, trial_id: int) -> None:
        """Optuna's ``record_heartbeat``, tried once (the retried one is
        ``record_heartbeat``; hpo's heartbeat thread tries again at its next beat)."""
        if not heartbeats.record_once(self, trial_id):
            optuna.storages.RDBStorage.record_heartbeat(self, trial_id)

    # ---------------------------------------------------------------------------- reads

    def get_trial(self, trial_id: int) -> FrozenTrial:
        owner, created_id, created = getattr(self._claim_state, "created", None) or (None,) * 3
        if owner is self and created_id == trial_id:  # made in ``at_once``'s block
            return copy.deepcopy(created)
        trial = compat.rdb_models().TrialModel.__table__
        found = self._read_trials(trial.c.trial_id == trial_id)
        if not found:
            raise KeyError(compat.rdb_not_found_message())
        return found[0]

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """Optuna's, the read behind every ``get_trials``: the same arguments, the same
        trials (Optuna's storage tests run against this class)."""
        chosen, keep = reads.chosen_trials(
            study_id, states, included_trial_ids, trial_id_greater_than
        )
        return self._read_trials(chosen, study_id=study_id, keep=keep)

    def _read_trials(
        self, chosen: Any, study_id: int | None = None, keep: Any = None
    ) -> list[FrozenTrial]:
        """The trials ``chosen`` selects (``hpo.storage.reads``); with ``study_id``, raise
        KeyError, as Optuna does, if that study does not exist."""
        read = reads.trial_rows_at_once if self._in_one_statement else reads.trial_rows
        with transactions.reading(self) as connection:
            if study_id is not None:
                reads.require_study(connection, study_id)
            found = read(connection, chosen)
        return reads.build_trials(found, keep)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return heartbeats.stale_trial_ids(self, study_id)

    def count_trials(self, study_id: int) -> counts.TrialCounts:
        return counts.count_trials(self, study_id)

    def trial_states_since(
        self, study_id: int, among: set[int], greater_than: int
    ) -> list[tuple[int, bool]]:
        return counts.trial_states_since(self, study_id, among, greater_than)

    def waiting_trial_ids(self, study_id: int) -> list[int]:
        return counts.waiting_trial_ids(self, study_id)

    def has_stale_trials(self, study_id: int) -> bool:
        """Whether a RUNNING trial of the study missed its heartbeats for the grace period."""
        return self.heartbeat_interval is not None and bool(self._get_stale_trial_ids(study_id))

    def trial_claimed_with(self, study_id: int, token: str) -> int | None:
        """The id of the study's trial that a claim with ``token`` made RUNNING, or None:
        what a claim whose commit failed for a lost connection asks."""
        with compat.rdb_session(self) as session:
            return counts.trial_with_token(session, study_id, token, TOKEN_ATTRS)

    # ------------------------------------------------------------- transactions, claims

    @property
    def _in_one_statement(self) -> bool:
        return transactions.in_one_statement(self.engine)

    def bound_to(self, connection: sqlalchemy.Connection) -> contextlib.AbstractContextManager:
        """Every call this thread makes inside the block in ``connection``'s transaction
        (``hpo.storage.transactions.bound_to``)."""
        return transactions.bound_to(self, connection)

    @contextlib.contextmanager
    def claiming(self, token: str | None = None) -> Iterator[None]:
        """hpo's claim: inside the block, a trial made RUNNING (a new one, or a queued one
        claimed) gets, in the same transaction, its first heartbeat, ``token`` (so that a
        caller whose commit failed can find out whether it landed:
        ``trial_claimed_with``) and, when it is a retry, clean user attrs.

        Optuna never fails a RUNNING trial that has no heartbeat row, so a worker killed
        between the claim and a separate first heartbeat would leave its trial RUNNING for
        ever. Only inside the block, so that outside hpo's worker this storage behaves as
        Optuna's own tests (which it passes) expect."""
        self._claim_state.active, self._claim_state.token = True, token
        try:
            yield
        finally:
            self._claim_state.active, self._claim_state.token = False, None

    @contextlib.contextmanager
    def at_once(self, study_name: str, total_trials: int) -> Iterator[None]:
        """Inside ``claiming``: a new trial is made in one message, taking the study lock
        itself (``hpo.storage.one_message``), or not at all (NoTrialAtOnce).

        Inside the block, ``get_trial`` of the trial it made answers from the claim's own
        answer instead of reading six tables back: ``optuna.Trial`` reads its trial when it
        is built, and no one else writes a trial in the milliseconds after its claim. That
        read was two thirds of a claim's client CPU (8 of 12 ms)."""
        self._claim_state.at_once = (study_name, total_trials)
        try:
            yield
        finally:
            self._claim_state.at_once = None
            self._claim_state.created = None

    def claims_at_once(self) -> bool:
        return one_message.claims_at_once(self)

    def prepare_claims(self, study_id: int, study_name: str, total_trials: int) -> str:
        return one_message.prepare(self, study_id, study_name, total_trials)

    def _in_claim(self) -> bool:
        return bool(getattr(self._claim_state, "active", False))

    def _claim_token(self) -> str | None:
        return getattr(self._claim_state, "token", None) if self._in_claim() else None
