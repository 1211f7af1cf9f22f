"""Storage URLs and Optuna's RDB storage: SQLite by default, PostgreSQL or MariaDB for many nodes.

Passwords in URLs are never printed: everything user-facing goes through ``mask_url``.

What makes a shared database safe for many workers:

- **Heartbeats.** Every worker records a heartbeat for its running trial every
  ``$HPO_HEARTBEAT_S`` seconds (20; see ``hpo.settings``). A trial whose heartbeat is older than ``$HPO_GRACE_S``
  (60) is failed by the next worker that looks, and re-queued with the same parameters and
  its intermediate values (``hpo.retry.RetryWithCleanAttrs``).
- **A connection budget.** At most ``PoolSettings.max_connections`` (2) per process, one
  of them kept between calls (``engine_options``; docs/scale.md).
- **Reconnects.** Every storage call that fails for a lost connection is retried (no
  pre-ping: see ``PoolSettings``) with exponential backoff for up to ``$HPO_DB_RETRY_S``
  seconds (300), so a database restart costs a pause, not a trial.
- **A study lock** (``study_lock``) that serializes "is there budget left? then create a
  trial", which is what makes ``--n-trials`` an exact study-wide total: a PostgreSQL
  advisory lock held by one transaction that does all the work under it, a MariaDB/MySQL
  ``GET_LOCK``, or a lock file for SQLite. On PostgreSQL a claim's common case is one
  message that takes the lock, counts and inserts (``ReconnectingRDBStorage.at_once``),
  optionally through a PgBouncer alias of its own (``use_lock_database``).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import json
import logging
import random
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hpo import compat
from hpo.errors import UserError
from hpo.retry import RetryWithCleanAttrs, clean_retry_attrs
from hpo.settings import (
    LOCK_DATABASE_ENV,
    STORAGE_ENV,
    PoolSettings,
    db_retry_seconds,
    env,
    heartbeat_settings,
    lock_database,
)

DEFAULT_SQLITE_FILE = "hpo.db"
SPEC_ATTR = "hpo_spec"
# A trial whose worker vanished this many times in a row is left failed (e.g. a trial that
# gets its node OOM-killed every time must not cycle forever).
MAX_RETRIES = 3

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Set while this thread's storage calls run inside one transaction (``bound_to``): a lost
# connection there has lost the whole transaction, so no single call may be retried on a
# new connection; the caller repeats the transaction instead.
_one_transaction = threading.local()
# The most trial ids a read lists in one IN (...): below every backend's bound-value limit.
_MAX_IN_LIST = 500
# Stand-ins for a claim's token and start time in its compiled one-message claim
# (``ReconnectingRDBStorage._claim_message``), replaced at each claim.
_TOKEN_MARK = "0" * 32
_START_MARK = datetime(2000, 1, 1, 0, 0, 0, 123456)
# The one-message claim's stale count before the lock, for its statement under the lock.
_STALE_SETTING = "hpo.claim_stale"
# The states a trial ends in (COMPLETE, PRUNED, FAIL).
_FINISHED = [state for state in TrialState if state.is_finished()]
# Compiled one-message claims of this process, by (study id, study name, total, grace).
_CLAIM_MESSAGES: dict[tuple[int, str, int, float], str] = {}


class StorageError(UserError):
    """A storage URL that cannot be used, or a study that is not there."""


class StudyNotFound(StorageError):
    pass


class NoTrialAtOnce(Exception):
    """No trial was made in one round trip (``ReconnectingRDBStorage.at_once``). ``answer``:
    the claim's answer all the same ("wait" or "done"), or None where only the long way
    can answer (a trial is stale or waiting, or the storage is not PostgreSQL)."""

    def __init__(self, answer: str | None) -> None:
        super().__init__(answer)
        self.answer = answer


@dataclass(frozen=True)
class StudyRef:
    """A study as rows in a storage: what code needs that reads or writes the study's own
    attributes without an ``optuna.Study`` at hand (a sampler gets a restricted view)."""

    storage: optuna.storages.BaseStorage
    study_id: int

    @classmethod
    def by_name(cls, storage: optuna.storages.BaseStorage, study_name: str) -> StudyRef:
        return cls(storage, storage.get_study_id_from_name(study_name))

    def user_attrs(self) -> dict[str, Any]:
        return self.storage.get_study_user_attrs(self.study_id)

    def set_user_attr(self, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(self.study_id, key, value)


def require_study(
    storage: optuna.storages.BaseStorage, study_name: str, storage_url: str, hint: str = ""
) -> None:
    """Raise StudyNotFound (naming the studies that are there) unless ``study_name`` exists."""
    names = [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise StudyNotFound(
            f"study {study_name!r} not found in {mask_url(storage_url)} (studies there: {known})"
            + (f"; {hint}" if hint else "")
        )


def default_storage_url(directory: Path | None = None) -> str:
    """SQLite file ``hpo.db`` in the working directory (absolute, so children agree)."""
    path = (directory or Path.cwd()) / DEFAULT_SQLITE_FILE
    return f"sqlite:///{path.resolve()}"


def resolve_storage_url(url: str | None) -> str:
    """``--storage`` if given, else ``$HPO_STORAGE``, else the default SQLite file."""
    chosen = url or env(STORAGE_ENV) or default_storage_url()
    scheme, _, rest = chosen.partition("://")
    if not scheme.startswith("sqlite") and rest.count("@") > 1:
        # SQLAlchemy splits at the first '@' and would show the rest of the password as
        # the host name: refuse, printing nothing of what comes before the last '@'.
        raise StorageError(
            f"storage URL {mask_url(chosen)!r} has more than one '@': write an '@' in the "
            "user name or password as %40"
        )
    try:
        make_url(chosen)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StorageError(
            f"storage URL {mask_url(chosen)!r} is not a SQLAlchemy URL "
            "(e.g. sqlite:///hpo.db, postgresql+psycopg://user:pass@host/db, "
            "mysql+pymysql://user:pass@host/db)"
        ) from None
    return chosen


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log)."""
    scheme, sep, rest = url.partition("://")
    try:
        if not scheme.startswith("sqlite") and rest.count("@") > 1:
            raise ValueError("ambiguous '@'")
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Not parseable: hide anything between '://user:' and the last '@' by hand.
        if sep and "@" in rest:
            credentials, _, host = rest.rpartition("@")
            user = credentials.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url
    # hide_password=True writes a literal ***; setting the password to "***" would be
    # rendered URL-escaped (%2A%2A%2A).
    return parsed.render_as_string(hide_password=parsed.password is not None)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, else None."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def is_connection_error(error: BaseException | None) -> bool:
    """True for errors that a reconnect can fix: a lost or refused connection, a locked
    SQLite file. Optuna wraps some of them in ``StorageInternalError``; look at the causes."""
    while error is not None:
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        error = error.__cause__ or error.__context__
    return False


def retry_on_disconnect(function: Callable[[], T], *, what: str, url: str) -> T:
    """Call ``function``; while it fails for a lost connection, wait and call it again.

    Backoff doubles from 0.5 s to 10 s; gives up after ``$HPO_DB_RETRY_S`` seconds (300)
    and raises the last error. Messages name the storage with its password masked. Inside
    ``bound_to`` (one transaction) ``function`` is called once: its caller repeats the
    whole transaction.
    """
    if getattr(_one_transaction, "active", False):
        return function()  # the transaction is repeated as a whole, by its caller
    deadline = time.monotonic() + db_retry_seconds()
    delay = 0.5
    while True:
        try:
            return function()
        except Exception as error:
            if not is_connection_error(error) or time.monotonic() + delay > deadline:
                raise
            reason = _safe_detail(error, url)
            logger.warning(
                "storage %s unreachable during %s (%s); retrying in %.1fs",
                mask_url(url),
                what,
                reason,
                delay,
            )
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)


def _safe_detail(error: BaseException, url: str) -> str:
    """First line of an error's message, with the URL's password blanked out."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    detail = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    password = make_url(url).password
    if password:
        detail = detail.replace(str(password), "***")
    return f"{type(root).__name__}: {detail}"


# What a retry may do. A lost connection during a write is *ambiguous*: the server may
# have committed and only its acknowledgement been lost. So every retried call follows one
# rule: a retry either repeats a call proven idempotent, or first checks what the earlier
# attempt did. Proven idempotent (a repeat stores the same rows):
# - every read (``get_*``, ``_get_trials``, ``_get_best_trial_id``, ``_get_stale_trial_ids``);
# - ``set_study_user_attr``, ``set_study_system_attr``, ``set_trial_user_attr``,
#   ``set_trial_system_attr``, ``set_trial_intermediate_value``, ``record_heartbeat``:
#   upserts keyed by (study or trial, key or step), same value;
# - ``set_trial_param`` / ``_set_trial_param``: the repeated insert hits the unique
#   (trial, param) key, and Optuna ignores that IntegrityError for this call.
# Checked before repeating (methods of ``ReconnectingRDBStorage`` below):
# - ``create_new_study``: the name is chosen before the first attempt (Optuna would pick a
#   fresh random one per attempt); a retry that finds the study under that name with the
#   same directions returns it instead of raising DuplicatedStudyError;
# - ``delete_study``: a retry that finds the study gone has succeeded;
# - ``create_new_trial`` / ``_create_new_trial``: a client token is written with the new
#   trial in the same transaction; a retry that finds the token returns that trial;
# - ``set_trial_state_values``: to a finished (or any non-RUNNING) state, a retry that finds
#   the trial already in that state with the same values returns True; a claim
#   (WAITING -> RUNNING) writes a client token with the state change, and a retry that
#   finds the trial RUNNING returns whether the token is its own.
_IDEMPOTENT_METHODS = (
    "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_best_trial", "record_heartbeat",
    "_get_stale_trial_ids", "_set_trial_param", "_get_best_trial_id", "count_trials",
    "waiting_trial_ids", "trial_states_since",
)  # fmt: skip
# Calls that return trials: retried like the above, and the tokens are taken out.
_TRIAL_READS = ("get_trial", "_get_trials", "get_trial_system_attrs")
_CHECKED_METHODS = (
    "create_new_study",
    "delete_study",
    "_create_new_trial",
    "set_trial_state_values",
)
# Every storage call a worker makes, including the private ones Optuna's cache layer calls
# on its backend (hpo.compat); each is retried across a lost connection. (``create_new_trial``
# calls ``_create_new_trial``; wrapping both would make a new token per outer attempt.)
_RETRIED_METHODS = (*_IDEMPOTENT_METHODS, *_TRIAL_READS, *_CHECKED_METHODS)
# System attributes hpo writes with a trial to recognise its own writes on a retry; hidden
# from every read, so Optuna and users see the trial as they made it.
CREATE_TOKEN_ATTR = "hpo:create_token"
CLAIM_TOKEN_ATTR = "hpo:claim_token"
_TOKEN_ATTRS = (CREATE_TOKEN_ATTR, CLAIM_TOKEN_ATTR)


@dataclass(frozen=True)
class TrialCounts:
    """A study's trials counted by the database: per state, and how many FAIL trials were
    re-queued (each has a retry, which counts in its place)."""

    by_state: dict[TrialState, int]
    requeued: int

    def __getitem__(self, state: TrialState) -> int:
        return self.by_state.get(state, 0)


def _without_tokens(trial: FrozenTrial) -> FrozenTrial:
    if any(key in trial.system_attrs for key in _TOKEN_ATTRS):
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in _TOKEN_ATTRS}
    return trial


class _Attempts:
    """Counts the calls of one retried operation: ``retried`` is True from the second."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> bool:
        self.count += 1
        return self.count > 1


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose calls survive a database restart (``retry_on_disconnect``),
    and whose writes happen exactly once even when a commit's acknowledgement is lost (the
    rule is written above ``_IDEMPOTENT_METHODS``)."""

    # Per thread (a class attribute: RDBStorage pickles its instance state, a local cannot
    # be pickled). Set by ``claiming``.
    _claim_state = threading.local()
    # The study lock's own URL (``use_lock_database``); None: the storage's engine.
    lock_url: str | None = None

    def use_lock_database(self, database: str) -> None:
        """Take the study lock (``study_lock``), with the whole claim done under it, on
        ``database`` of the same PostgreSQL server instead of the storage URL's database:
        ``$HPO_LOCK_DATABASE``, a PgBouncer alias of the study's database whose pool is
        a few server connections (docs/scale.md).

        Why: a worker waiting for the lock waits inside a transaction, which under
        transaction pooling holds a server connection. When hundreds of workers claim at
        once, the waiters held all but one of the pool's connections, and every other
        call of every worker (a report, a tell, the checks before a claim) queued for the
        last one. With the lock on its own alias, at most its pool's few connections
        wait in PostgreSQL; the other waiters queue in PgBouncer, first come first
        served, holding no server connection.

        Raises StorageError when ``database`` is not the storage's database (another
        name on the server, or another server): the claim would write its trial there.
        """
        lock_url = make_url(self.url).set(database=database).render_as_string(hide_password=False)
        engine = sqlalchemy.create_engine(lock_url, **self.engine_kwargs)
        identity = sqlalchemy.text("SELECT current_database(), pg_postmaster_start_time()")
        try:
            with self.engine.connect() as ours, engine.connect() as theirs:
                expected = tuple(ours.execute(identity).one())
                reached = tuple(theirs.execute(identity).one())
        except Exception as error:  # driver errors have no common base
            engine.dispose()
            raise StorageError(
                f"cannot open the study lock's database {mask_url(lock_url)} "
                f"(${LOCK_DATABASE_ENV}): {_safe_detail(error, lock_url)}"
            ) from None
        if reached != expected:
            engine.dispose()
            raise StorageError(
                f"${LOCK_DATABASE_ENV} = {database!r} reaches database {reached[0]!r} "
                f"(server started {reached[1]}), not the storage's {expected[0]!r} (server "
                f"started {expected[1]}): it must name the storage's own database, e.g. a "
                "PgBouncer alias of it"
            )
        self.lock_url, self._lock_engine = lock_url, engine

    def lock_engine(self) -> sqlalchemy.Engine:
        """The engine the study lock's transaction runs on (``use_lock_database``)."""
        if self.lock_url is None:
            return self.engine
        return self._lock_engine

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

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        if study_name is None:
            study_name = f"{compat.default_study_name_prefix()}{uuid.uuid4()}"
        name = study_name
        attempts = _Attempts()

        def attempt() -> int:
            retried = attempts.next()
            try:
                return optuna.storages.RDBStorage.create_new_study(self, directions, name)
            except optuna.exceptions.DuplicatedStudyError:
                if not retried:
                    raise
                study_id = optuna.storages.RDBStorage.get_study_id_from_name(self, name)
                if optuna.storages.RDBStorage.get_study_directions(self, study_id) != list(
                    directions
                ):
                    raise
                return study_id  # our first attempt committed it

        return retry_on_disconnect(attempt, what="create_new_study", url=self.url)

    def delete_study(self, study_id: int) -> None:
        attempts = _Attempts()

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
        # Optuna's own version repeats the whole insert when the commit raises, which after
        # an ambiguous failure leaves a second trial; this one looks for its token first.
        token = self._claim_token() or uuid.uuid4().hex
        connection = self._bound_connection()
        at_once = getattr(self._claim_state, "at_once", None) if self._in_claim() else None
        if template_trial is None and at_once is not None:
            created = self._create_trial_at_once(study_id, *at_once, token)
            if not isinstance(created, FrozenTrial):
                raise NoTrialAtOnce(created)
            return created
        if template_trial is None and self._in_claim() and connection is not None:
            return self._create_claimed_trial(connection, study_id, token)
        template = copy.deepcopy(template_trial) if template_trial else _running_template()
        template.system_attrs = {**template.system_attrs, CREATE_TOKEN_ATTR: token}
        models = compat.rdb_models()
        attempts = _Attempts()

        def attempt() -> FrozenTrial:
            retried = attempts.next()
            existing = None
            with compat.rdb_session(self) as session:
                # Locks the study row: trial numbers are counted, and tokens looked up, in turn.
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                if retried:
                    existing = _trial_with_token(session, study_id, token, (CREATE_TOKEN_ATTR,))
                if existing is None:
                    trial = compat.add_new_trial(self, session, study_id, template)
                    created = _from_template(template, trial.trial_id, trial.number)
                    if template.state == TrialState.RUNNING and self._in_claim():
                        self._first_heartbeat(session, trial.trial_id)
            if existing is not None:  # our earlier attempt committed it
                return optuna.storages.RDBStorage.get_trial(self, existing)
            return created

        return _without_tokens(retry_on_disconnect(attempt, what="create_new_trial", url=self.url))

    def _create_claimed_trial(
        self, connection: sqlalchemy.Connection, study_id: int, token: str
    ) -> FrozenTrial:
        """A new RUNNING trial with its first heartbeat and the claim's token, inserted on
        the claim's connection (``bound_to``), holding the study lock: what
        ``_create_new_trial`` stores for a claim, in SQLAlchemy Core statements (two on
        PostgreSQL: ``_insert_claimed_trial``; five on MariaDB) instead of some twenty of
        Optuna's ORM, each in a savepoint. The study row is
        locked first, as Optuna does, because its own trial creation (``enqueue_trial``
        from a process outside hpo's lock) counts trial numbers under that row lock."""
        models = compat.rdb_models()
        trial = models.TrialModel.__table__
        attr = models.TrialSystemAttributeModel.__table__
        beat = models.TrialHeartbeatModel.__table__
        _require_study(connection, study_id, lock=True)
        started = datetime.now()
        # Optuna's RDB schema keeps naive UTC (``TrialModel.datetime_start``).
        stored_start = started.astimezone(timezone.utc).replace(tzinfo=None)
        template = _running_template()
        template.datetime_start = started
        if connection.dialect.name == "postgresql":
            trial_id, number = self._insert_claimed_trial(connection, study_id, token, stored_start)
            return _from_template(template, trial_id, number)
        number = connection.execute(
            sqlalchemy.select(sqlalchemy.func.count())
            .select_from(trial)
            .where(trial.c.study_id == study_id)
        ).scalar_one()
        trial_id = connection.execute(
            sqlalchemy.insert(trial).values(
                number=number,
                study_id=study_id,
                state=TrialState.RUNNING,
                datetime_start=stored_start,
            )
        ).inserted_primary_key[0]
        connection.execute(
            sqlalchemy.insert(attr).values(
                trial_id=trial_id, key=CREATE_TOKEN_ATTR, value_json=json.dumps(token)
            )
        )
        if self.heartbeat_interval is not None:
            connection.execute(sqlalchemy.insert(beat).values(trial_id=trial_id))
        return _from_template(template, int(trial_id), int(number))

    @contextlib.contextmanager
    def at_once(self, study_name: str, total_trials: int) -> Iterator[None]:
        """Inside ``claiming``: a new trial is made in one round trip, taking the study
        lock itself (``_create_trial_at_once``), or not at all: ``create_new_trial``
        raises NoTrialAtOnce, and the caller claims the long way, under ``study_lock``.

        Inside the block, ``get_trial`` of the trial it made answers from the claim's own
        answer instead of reading six tables back: ``optuna.Trial`` reads its trial when
        it is built, and no one else writes a trial in the milliseconds after its claim
        (a stale trial is failed only after the heartbeat's grace period). That read
        was two thirds of a claim's client CPU (8 of 12 ms, docs/benchmarks.md, stop 23)."""
        self._claim_state.at_once = (study_name, total_trials)
        try:
            yield
        finally:
            self._claim_state.at_once = None
            self._claim_state.created = None

    def _create_trial_at_once(
        self, study_id: int, study_name: str, total_trials: int, token: str
    ) -> FrozenTrial | str | None:
        """A claim in one round trip (``at_once``): a new RUNNING trial with its token and
        first heartbeat, as ``_create_claimed_trial`` stores it, when no trial is stale,
        none waits and the budget has room; else the answer ``hpo.worker.claim_trial``
        gives for these counts ("wait": the budget is handed out and trials run
        elsewhere; "done": none runs either), or None where only the long way can
        answer (a trial is stale or waiting), as on anything but PostgreSQL via psycopg.

        Why: the lock is held from the moment it is granted to the COMMIT, and in the
        long way every statement in between waits for this client to be scheduled. With
        256 workers claiming at once on two cores each hold took ~14 ms, and the last
        first claim came 7 s after the start (docs/benchmarks.md, stop 22). Here BEGIN,
        the lock, the study row's lock, one statement that counts and inserts, and
        COMMIT go to the server as one message, which runs them without waiting for the
        client: the hold is the database's own work. The lock is not taken when the
        counts before it already say "wait" (what most claims say near a study's end).

        The statement that counts and inserts runs after the study row's lock, so its
        snapshot counts a trial that Optuna's own create (which numbers under that row
        lock) committed meanwhile; the budget is counted as ``LoadedStudy.budget``
        counts it. Values are rendered into the SQL by SQLAlchemy (a message of several
        statements cannot carry parameters): integers, a hex token and a timestamp."""
        if not self.claims_at_once():
            return None
        if not re.fullmatch(r"[0-9a-f]{32}", token):
            return None  # not hpo's claim token (uuid4().hex): the long way
        compiled = self.prepare_claims(study_id, study_name, total_trials)
        started = datetime.now()
        stored_start = started.astimezone(timezone.utc).replace(tzinfo=None)
        message = compiled.replace(_TOKEN_MARK, token).replace(
            str(_START_MARK), stored_start.isoformat(sep=" ", timespec="microseconds")
        )
        with self.lock_engine().connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            locked, _, ((trial_id, number, finished, running, stale_n),) = _rows_of(
                connection, message
            )
        if trial_id is not None:
            template = _running_template()
            template.datetime_start = started
            created = _from_template(template, int(trial_id), int(number))
            # For ``get_trial`` inside ``at_once``'s block (cleared when it ends).
            self._claim_state.created = (self, int(trial_id), copy.deepcopy(created))
            return created
        if stale_n or finished + running < total_trials:
            return None  # a stale or waiting trial: the long way
        if running:
            return "wait"
        return "done" if locked else None

    def claims_at_once(self) -> bool:
        """Whether a claim can be one message here (``_create_trial_at_once``): PostgreSQL
        through psycopg (the simple query protocol, several results), with heartbeats
        (the message inserts the first one)."""
        return (
            self.heartbeat_interval is not None and self.lock_engine().dialect.driver == "psycopg"
        )

    def prepare_claims(self, study_id: int, study_name: str, total_trials: int) -> str:
        """The one-message claim (``_create_trial_at_once``) for this study and budget,
        compiled once per process (compiling costs ~4 ms of client CPU, 5 ms the first
        time in a process; filling in the token and the time, 0.04 ms). A worker calls it
        before its first claim, so that a fleet starting together does not compile while
        it claims."""
        key = (study_id, study_name, total_trials, self._grace_s())
        compiled = _CLAIM_MESSAGES.get(key)
        if compiled is None:
            compiled = _CLAIM_MESSAGES[key] = self._claim_message(*key)
        return compiled

    def _claim_message(
        self, study_id: int, study_name: str, total_trials: int, grace: float
    ) -> str:
        """``_create_trial_at_once``'s message, with ``_TOKEN_MARK`` and ``_START_MARK`` in
        place of the claim's token and start time."""
        study = compat.rdb_models().StudyModel.__table__
        counts, requeued = _claim_counts(study_id)
        stale = _stale_count(study_id, grace)
        handed_out = counts.c.finished - requeued.c.n + counts.c.running >= total_trials
        surely_wait = sqlalchemy.and_(handed_out, counts.c.running > 0, stale.c.n == 0)
        # The stale count is taken here, before the lock, and handed to the statement
        # under the lock in a setting local to the transaction. Counted again under the
        # lock, it was most of the lock's hold at hundreds of RUNNING trials (1.3 of
        # 1.8 ms at 600, stop 23). A trial that goes stale while this claim waits is
        # failed and re-queued by the next claim that finds it, as is one that goes
        # stale just after the claim.
        lock = (
            sqlalchemy.select(
                sqlalchemy.func.pg_advisory_xact_lock(_postgres_lock_key(study_name)),
                sqlalchemy.func.set_config(
                    _STALE_SETTING, sqlalchemy.cast(stale.c.n, sqlalchemy.Text), True
                ),
            )
            .select_from(counts, requeued, stale)
            .where(sqlalchemy.not_(surely_wait))
        )
        row_lock = (
            sqlalchemy.select(study.c.study_id)
            .where(study.c.study_id == study_id)
            .with_for_update()
        )
        counts, requeued = _claim_counts(study_id)  # after both locks
        # Not set when the lock was not taken ("wait"): '' on a connection that had it in
        # an earlier transaction, NULL on one that never had it.
        stale_before = sqlalchemy.cast(
            sqlalchemy.func.nullif(sqlalchemy.func.current_setting(_STALE_SETTING, True), ""),
            sqlalchemy.Integer,
        )
        room = sqlalchemy.and_(
            counts.c.waiting == 0,
            stale_before == 0,
            counts.c.finished - requeued.c.n + counts.c.running < total_trials,
        )
        created, writes = _claimed_trial_inserts(
            study_id, counts, _START_MARK, _TOKEN_MARK, where=room, also=(requeued,)
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
        dialect = self.lock_engine().dialect

        def sql(statement: sqlalchemy.Executable) -> str:
            compiled = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            return str(compiled)

        message = "; ".join(["BEGIN", sql(lock), sql(row_lock), sql(claim), "COMMIT"])
        assert message.count(_TOKEN_MARK) == 1 and message.count(str(_START_MARK)) == 1
        return message

    def _insert_claimed_trial(
        self, connection: sqlalchemy.Connection, study_id: int, token: str, start: datetime
    ) -> tuple[int, int]:
        """``_create_claimed_trial``'s count and three inserts as one PostgreSQL statement
        (data-modifying CTEs): its id and number. A separate statement from the study
        row's lock, so that its snapshot, taken after the lock was granted, counts a trial
        that whoever held the row (Optuna's own create) committed meanwhile.

        Why one statement: each round trip under the lock is paid by every waiter, and
        with hundreds of clients on a busy node a round trip costs milliseconds of
        scheduling, not of database work: 256 first claims at once through PgBouncer held
        the lock ~13 ms each with the four statements (docs/benchmarks.md, stop 22)."""
        trial = compat.rdb_models().TrialModel.__table__
        number = (
            sqlalchemy.select(sqlalchemy.func.count().label("trials"))
            .where(trial.c.study_id == study_id)
            .cte("counts")
        )
        created, writes = _claimed_trial_inserts(
            study_id, number, start, token, heartbeat=self.heartbeat_interval is not None
        )
        row = connection.execute(
            sqlalchemy.select(created.c.trial_id, created.c.number).add_cte(*writes)
        ).one()
        return int(row[0]), int(row[1])

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state == TrialState.RUNNING and values is None:
            return self._claim_trial(trial_id)
        attempts = _Attempts()

        def attempt() -> bool:
            if attempts.next():
                stored = optuna.storages.RDBStorage.get_trial(self, trial_id)
                if stored.state == state and (values is None or stored.values == list(values)):
                    return True  # our earlier attempt committed it
            if state.is_finished() and self._in_one_statement:
                return self._finish_trial(trial_id, state, values)
            return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return retry_on_disconnect(attempt, what="set_trial_state_values", url=self.url)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
        previous_distribution: optuna.distributions.BaseDistribution | None,
    ) -> None:
        """Optuna's, on PostgreSQL in one statement (``_param_insert``): the trial's state,
        the study's earlier distribution of the parameter (unless the caller knows it)
        and the insert.

        Why: every ``suggest_*`` writes through here, and Optuna's ORM version is five
        round trips (BEGIN, the trial, the earlier distribution, the insert, COMMIT) and
        ~8 ms of client CPU; 256 workers starting at once spend that while others claim
        (docs/benchmarks.md, stop 23). The insert happens only where Optuna's would: the
        trial is not finished and the earlier distribution, if any, is this one (a
        repeated name is ignored, as Optuna ignores its unique-key error). A compatible
        but different earlier distribution takes Optuna's own path."""
        dist = optuna.distributions
        args = (trial_id, param_name, param_value_internal, distribution, previous_distribution)
        if not self._in_one_statement or (
            previous_distribution is not None
            and not _compatible(previous_distribution, distribution)
        ):
            super()._set_trial_param(*args)  # its errors in its order: finished, then shape
            return
        shape = dist.distribution_to_json(distribution)
        _, stored_shape = self._write(
            _param_insert(look_back=previous_distribution is None),
            trial_id,
            {
                "trial_id": trial_id,
                "name": param_name,
                "value": param_value_internal,
                "shape": shape,
            },
        )
        if stored_shape is not None and stored_shape != shape:
            super()._set_trial_param(*args)  # compatible or not, as Optuna decides

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        """Optuna's, on PostgreSQL in one statement (``_step_upsert``): an insert, or an
        update of the step's earlier value, where the trial is not finished. Every
        ``report`` writes through here; Optuna's ORM version is five round trips and
        ~5 ms of client CPU."""
        if not self._in_one_statement:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            return
        model = compat.rdb_models().TrialIntermediateValueModel
        stored, kind = model.intermediate_value_to_stored_repr(intermediate_value)
        values = {"trial_id": trial_id, "step": step, "value": stored, "kind": kind}
        self._write(_step_upsert(), trial_id, values)

    def _finish_trial(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None
    ) -> bool:
        """Optuna's ``set_trial_state_values`` to a finished state, in one statement
        (``_finish_statement``): the state, the time it ended and the values, where the
        trial is not finished. Every tell writes through here; Optuna's is a transaction of
        five round trips (BEGIN, the trial for update, the values, the update, COMMIT),
        which under PgBouncer holds a server connection across all of them."""
        model = compat.rdb_models().TrialValueModel
        given: dict[str, Any] = {"finished_id": trial_id, "new_state": state}
        given["complete"] = datetime.now()  # Optuna's time: the client's
        for objective, value in enumerate(values or ()):
            given[f"value_{objective}"], given[f"type_{objective}"] = model.value_to_stored_repr(
                value
            )
        statement = _finish_statement(len(values or ()))
        _, finished = self._write(statement, trial_id, given)
        if not finished:  # finished by another worker since the snapshot: as Optuna, raise
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"Trial with id {trial_id} has already finished and can not be updated."
            )
        return True

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        model = compat.rdb_models().TrialUserAttributeModel
        if not self._set_trial_attr_at_once(model, trial_id, key, value):
            super().set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        model = compat.rdb_models().TrialSystemAttributeModel
        if not self._set_trial_attr_at_once(model, trial_id, key, value):
            super().set_trial_system_attr(trial_id, key, value)

    def _set_trial_attr_at_once(self, model: Any, trial_id: int, key: str, value: Any) -> bool:
        """A trial's user or system attribute (``model``'s table) set in one statement
        (``_attr_upsert``; Optuna's is four round trips in a transaction: BEGIN, the
        trial, the upsert, COMMIT). False where not on PostgreSQL: Optuna's own runs."""
        if not self._in_one_statement:
            return False
        values = {"trial_id": trial_id, "key": key, "value": json.dumps(value)}
        self._write(_attr_upsert(model.__tablename__), trial_id, values)
        return True

    def record_heartbeat(self, trial_id: int) -> None:
        self.record_heartbeat_once(trial_id)

    def record_heartbeat_once(self, trial_id: int) -> None:
        """Optuna's ``record_heartbeat``, tried once (the retried one is ``record_heartbeat``;
        hpo's heartbeat thread tries again at its next beat). On PostgreSQL one statement
        in autocommit: the trial's heartbeat row inserted or set to the server's time.

        Why: Optuna's is six round trips (BEGIN, the row, the row again for update, the
        server's time, the update, COMMIT), and under PgBouncer's transaction pooling its
        transaction holds a server connection across all of them. With 256 workers on two
        cores, such transactions waiting for their clients held 11 of the pool's 20
        connections on average (pg_stat_activity, docs/benchmarks.md, stop 23). A trial
        that no longer exists is ignored, as Optuna ignores its foreign-key error."""
        if not self._in_one_statement:
            optuna.storages.RDBStorage.record_heartbeat(self, trial_id)
            return
        with contextlib.suppress(sqlalchemy.exc.IntegrityError), self._reading() as connection:
            connection.execute(_heartbeat_upsert(), {"trial_id": trial_id})

    def _write(
        self, statement: sqlalchemy.Select, trial_id: int, values: dict[str, Any]
    ) -> sqlalchemy.Row:
        """Run one statement that writes to a trial only if it is not finished, and whose
        first column is the trial's state: its row, or Optuna's error for a trial that is
        missing (KeyError) or finished (UpdateFinishedTrialError)."""
        with self._reading() as connection:
            row = connection.execute(statement, values).one_or_none()
        if row is None:
            raise KeyError(compat.rdb_not_found_message())
        self.check_trial_is_updatable(trial_id, row[0])
        return row

    def _claim_trial(self, trial_id: int) -> bool:
        """WAITING -> RUNNING, as ``RDBStorage.set_trial_state_values`` does, plus a token:
        True when this call made the trial RUNNING, False when another worker did."""
        token = self._claim_token() or uuid.uuid4().hex
        models = compat.rdb_models()
        attempts = _Attempts()

        def attempt() -> bool:
            retried = attempts.next()
            try:
                with compat.rdb_session(self) as session:
                    trial = models.TrialModel.find_or_raise_by_id(
                        trial_id, session, for_update=True
                    )
                    if retried and trial.state == TrialState.RUNNING:
                        claim = models.TrialSystemAttributeModel.find_by_trial_and_key(
                            trial, CLAIM_TOKEN_ATTR, session
                        )
                        return claim is not None and json.loads(claim.value_json) == token
                    self.check_trial_is_updatable(trial_id, trial.state)
                    if trial.state != TrialState.WAITING:
                        return False
                    trial.state = TrialState.RUNNING
                    trial.datetime_start = datetime.now()
                    compat.set_trial_system_attr_in_session(
                        self, session, trial_id, CLAIM_TOKEN_ATTR, token
                    )
                    if self._in_claim():
                        self._first_heartbeat(session, trial_id)
                        _clean_claimed_retry(session, trial)
                    return True
            except sqlalchemy.exc.IntegrityError:
                return False

        return retry_on_disconnect(attempt, what="set_trial_state_values", url=self.url)

    def count_trials(self, study_id: int) -> TrialCounts:
        """The study's trials per state, and its re-queued FAIL trials, in two aggregate
        queries: the same cost with 10 trials or 10,000, and with 1 or 500 RUNNING.

        What a claim reads under the study lock. Reading the trials themselves (Optuna's
        cached ``get_all_trials``) re-reads every unfinished trial with all its rows on
        every call: at 256 RUNNING trials that made one claim ~0.4 s of client CPU.
        A re-queued trial is one that another trial's ``retry_history`` ends with; a
        retry's history is its predecessor's plus the predecessor, so distinct histories
        are distinct predecessors (``hpo.retry.superseded_trials`` counts the same set).
        """
        trial = compat.rdb_models().TrialModel.__table__
        lineages = _requeued(study_id).scalar_subquery()
        rows = self._read(
            sqlalchemy.select(trial.c.state, sqlalchemy.func.count(), lineages)
            .where(trial.c.study_id == study_id)
            .group_by(trial.c.state)
        )
        requeued = rows[0][2] if rows else 0
        return TrialCounts({TrialState(state): int(n) for state, n, _ in rows}, int(requeued or 0))

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
        """Optuna's ``RDBStorage._get_trials``, the read behind every ``get_trials``: the
        same arguments, the same trials (Optuna's storage tests run against this class),
        read by ``_read_trials``."""
        trial = compat.rdb_models().TrialModel.__table__
        chosen = [trial.c.study_id == study_id]
        if states is not None:
            chosen.append(trial.c.state.in_(list(states)))  # type: ignore[call-overload]
        included = sorted(i for i in included_trial_ids if i <= trial_id_greater_than)
        if included and trial_id_greater_than > -1:
            # A long IN list exceeds a backend's limit on bound values (SQLite's is 999 in
            # older builds); past _MAX_IN_LIST the range from the lowest id is read and
            # the rest dropped here, as Optuna falls back to when its IN list fails.
            listed = (
                trial.c.trial_id.in_(included)
                if len(included) <= _MAX_IN_LIST
                else trial.c.trial_id >= included[0]
            )
            chosen.append(sqlalchemy.or_(listed, trial.c.trial_id > trial_id_greater_than))
        elif trial_id_greater_than > -1:
            chosen.append(trial.c.trial_id > trial_id_greater_than)
        keep = None
        if len(included) > _MAX_IN_LIST:
            listed_ids = set(included)

            def keep(trial_id: int) -> bool:
                return trial_id in listed_ids or trial_id > trial_id_greater_than

        return self._read_trials(sqlalchemy.and_(*chosen), study_id=study_id, keep=keep)

    def _read_trials(
        self,
        chosen: sqlalchemy.ColumnElement[bool],
        study_id: int | None = None,
        keep: Callable[[int], bool] | None = None,
    ) -> list[FrozenTrial]:
        """The trials ``chosen`` selects, by trial id, as Optuna builds them
        (``RDBStorage._build_frozen_trial_from_trial_model``), read with SQLAlchemy Core:
        on PostgreSQL in one statement (``_trial_rows_at_once``), elsewhere in six
        (``_trial_rows``: the trials, then their params, values, user and system attrs
        and intermediate values).

        Optuna reads the same rows through its ORM, building an ORM object per row before
        the FrozenTrial. Every worker's pruner reads each trial once it finishes, so a
        fleet of W workers reads W x trials; at 256 simulated workers on two cores that
        ORM work was two thirds of all client CPU (py-spy, storage_scale, stop 21).
        ``study_id``: raise KeyError, as Optuna does, if that study does not exist.
        ``keep``: of the trials read, build only those whose id it accepts."""
        models = compat.rdb_models()
        read = _trial_rows_at_once if self._in_one_statement else _trial_rows
        with self._reading() as connection:
            if study_id is not None:
                _require_study(connection, study_id)
            rows, params, values, users, systems, steps = read(connection, chosen)
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
                    datetime_start=_stored_time_to_local(started),
                    datetime_complete=_stored_time_to_local(completed),
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

    @property
    def _in_one_statement(self) -> bool:
        """Whether hpo's one-statement versions of Optuna's calls run here, each in
        autocommit (``_reading``): a running trial's writes (param, intermediate value,
        attribute, heartbeat, tell) and trial reads, where Optuna's are transactions of
        four to seven round trips. On PostgreSQL; elsewhere Optuna's own writes and
        ``_trial_rows`` run (on MariaDB pymysql switches autocommit with a statement each
        way; SQLite has no round trips to save).

        Why: under PgBouncer's transaction pooling, a transaction holds a server
        connection across all of its client's round trips, and with hundreds of clients
        on a busy node each round trip waits for its client to be scheduled
        (docs/benchmarks.md, stops 23 and 24)."""
        return self.engine.dialect.name == "postgresql"

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlalchemy.Connection]:
        """A connection for work whose statements each stand alone: reads (under READ
        COMMITTED each statement has its own snapshot, in a transaction or not) and
        writes of one statement. Inside ``bound_to``, the block's own, in its
        transaction; elsewhere, on PostgreSQL, one in autocommit, where each statement is
        its own transaction with no BEGIN and COMMIT round trips around it (psycopg sends
        BEGIN as a round trip of its own).

        Why: under PgBouncer's transaction pooling a transaction holds a server
        connection from its BEGIN to its COMMIT, across the client's round trips. With
        256 workers claiming at once on two cores, one client round trip took tens of ms,
        and the claim's checks before the lock (BEGIN, a read, COMMIT) held the pool's
        connections for ~0.14 s each: the last of 512 such transactions on 20 connections
        ended 3.5 s after the start (docs/benchmarks.md, stop 22)."""
        connection = self._bound_connection()
        if connection is not None:
            yield connection
            return
        if not self._in_one_statement:
            # pymysql switches autocommit with a statement each way (a round trip more
            # than the COMMIT it saves); SQLite has no round trips.
            with self.engine.begin() as own:
                yield own
            return
        with self.engine.connect() as own:
            yield own.execution_options(isolation_level="AUTOCOMMIT")

    def _read(self, statement: sqlalchemy.Executable) -> list[sqlalchemy.Row]:
        """The rows of one SQLAlchemy Core read, on ``_reading``. Core, not the ORM: a
        claim makes these calls holding the study lock, and every millisecond of client
        CPU there is a millisecond every waiter waits."""
        with self._reading() as connection:
            return list(connection.execute(statement))

    def _bound_connection(self) -> sqlalchemy.Connection | None:
        if getattr(_one_transaction, "storage", None) is not self:
            return None
        return _one_transaction.connection

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """The study's RUNNING trials whose last heartbeat is older than the grace period,
        as Optuna's own method decides, in one query that returns only those.

        Optuna's loads every RUNNING trial with its heartbeat and compares in Python; it
        runs at every claim, under the study lock, so at 256 RUNNING trials that was the
        claim's largest cost. Trials without a heartbeat are never stale, as in Optuna."""
        models = compat.rdb_models()
        trial = models.TrialModel.__table__
        beat = models.TrialHeartbeatModel.__table__
        with self._reading() as connection:
            now = connection.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
            oldest = now.replace(tzinfo=None) - timedelta(seconds=self._grace_s())
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

    def _grace_s(self) -> float:
        """Seconds without a heartbeat after which a RUNNING trial is stale, as Optuna
        decides (its grace period, else two heartbeat intervals)."""
        assert self.heartbeat_interval is not None
        if self.grace_period is not None:
            return self.grace_period
        return 2 * self.heartbeat_interval

    def has_stale_trials(self, study_id: int) -> bool:
        """Whether a RUNNING trial of the study missed its heartbeats for the grace period."""
        return self.heartbeat_interval is not None and bool(self._get_stale_trial_ids(study_id))

    def trial_states_since(
        self, study_id: int, among: set[int], greater_than: int
    ) -> list[tuple[int, bool]]:
        """(id, finished) of the study's trials above ``greater_than`` and of the finished
        ones in ``among``, in one query on the trials table: how Optuna's cache layer
        learns which trials finished since it last looked, and which newer ones have not
        (``hpo.compat.finished_trials_cache``). With the cache's ``last_finished_trial_id``
        and ``unfinished_trial_ids``, a few rows per call (the trials started or finished
        since), not every finished trial of the study."""
        trial = compat.rdb_models().TrialModel.__table__
        if self._in_one_statement:
            # One array parameter, not one per id: ``among`` holds every RUNNING trial of
            # the fleet the cache has seen (hundreds), at every report of every worker.
            ids = sqlalchemy.bindparam(
                "among", sorted(among), type_=postgresql.ARRAY(sqlalchemy.Integer)
            )
            listed = trial.c.trial_id == sqlalchemy.any_(ids)
        else:
            listed = trial.c.trial_id.in_(sorted(among))
        seen = sqlalchemy.or_(
            trial.c.trial_id > greater_than,
            sqlalchemy.and_(listed, trial.c.state.in_(_FINISHED)),
        )
        rows = self._read(
            sqlalchemy.select(trial.c.trial_id, trial.c.state)
            .where(trial.c.study_id == study_id, seen)
            .order_by(trial.c.trial_id)
        )
        return [(int(trial_id), state.is_finished()) for trial_id, state in rows]

    def waiting_trial_ids(self, study_id: int) -> list[int]:
        """Ids of the study's WAITING (enqueued or re-queued) trials, lowest number first
        (the order ``Study.ask`` pops them in), in one query."""
        trial = compat.rdb_models().TrialModel.__table__
        rows = self._read(
            sqlalchemy.select(trial.c.trial_id)
            .where(trial.c.study_id == study_id, trial.c.state == TrialState.WAITING)
            .order_by(trial.c.number)
        )
        return [int(row[0]) for row in rows]

    def claim_waiting_trial(self, study_id: int) -> int | None:
        """Make the first WAITING (enqueued or re-queued) trial that no other worker
        claimed first RUNNING: its id, or None. ``Study.ask``'s first half, which finds the
        waiting trials through Optuna's cache layer, i.e. after re-reading every
        unfinished trial of the study; here that is one query."""
        for trial_id in self.waiting_trial_ids(study_id):
            try:
                if self.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # finished by another process meanwhile, as in Study.ask
        return None

    def trial_claimed_with(self, study_id: int, token: str) -> int | None:
        """The id of the study's trial that a claim with ``token`` made RUNNING (created, or
        claimed from the queue: ``claiming``), or None: what a claim whose commit failed
        for a lost connection asks, to learn whether the commit landed."""
        with compat.rdb_session(self) as session:
            return _trial_with_token(session, study_id, token, _TOKEN_ATTRS)

    @contextlib.contextmanager
    def bound_to(self, connection: sqlalchemy.Connection) -> Iterator[None]:
        """Run every storage call this thread makes inside the block on ``connection``, in
        the transaction open on it: each call in a savepoint (so an IntegrityError that
        Optuna ignores undoes that call only), all committed or lost together. No call is
        retried inside (``retry_on_disconnect``): after a lost connection the caller
        repeats the transaction. Other threads (the heartbeat) keep their own sessions."""
        session = sqlalchemy.orm.Session(bind=connection, join_transaction_mode="create_savepoint")
        registry = self.scoped_session.registry
        previous = registry() if registry.has() else None
        registry.set(session)
        _one_transaction.active = True
        _one_transaction.storage, _one_transaction.connection = self, connection
        try:
            yield
        finally:
            _one_transaction.active = False
            _one_transaction.storage = _one_transaction.connection = None
            session.close()
            if previous is None:
                registry.clear()
            else:
                registry.set(previous)

    @contextlib.contextmanager
    def claiming(self, token: str | None = None) -> Iterator[None]:
        """hpo's claim: inside the block, a trial made RUNNING (a new one, or a queued one
        claimed: ``hpo.worker.claim_trial``) gets, in the same transaction, its first heartbeat and,
        when it is a retry, clean user attrs (``_clean_claimed_retry``).

        Optuna never fails a RUNNING trial that has no heartbeat row (its stale check skips
        it), so a worker killed between the claim and a separate first heartbeat would
        leave its trial RUNNING for ever: no retry, and every other worker waiting on it.
        In one transaction there is no such moment (``tests/test_kill_phases.py``). Only
        inside the block, so that outside hpo's worker this storage behaves as Optuna's
        own tests (which it passes) expect: a trial asked without a heartbeat never goes
        stale, and a retry keeps what Optuna's callback copied.

        ``token``: the client token written with the claimed or created trial, so that a
        caller whose commit failed can find out whether it landed (``trial_claimed_with``).
        """
        self._claim_state.active = True
        self._claim_state.token = token
        try:
            yield
        finally:
            self._claim_state.active = False
            self._claim_state.token = None

    def _in_claim(self) -> bool:
        return bool(getattr(self._claim_state, "active", False))

    def _claim_token(self) -> str | None:
        return getattr(self._claim_state, "token", None) if self._in_claim() else None

    def _first_heartbeat(self, session: Any, trial_id: int) -> None:
        if self.heartbeat_interval is None:
            return
        models = compat.rdb_models()
        heartbeat = models.TrialHeartbeatModel.where_trial_id(trial_id, session, True)
        if heartbeat is None:
            session.add(models.TrialHeartbeatModel(trial_id=trial_id))
        else:
            heartbeat.heartbeat = session.execute(sqlalchemy.func.now()).scalar()


_Children = dict[int, list[Any]]
_TrialRows = tuple[list[Any], _Children, _Children, _Children, _Children, _Children]


def _trial_rows(
    connection: sqlalchemy.Connection, chosen: sqlalchemy.ColumnElement[bool]
) -> _TrialRows:
    """The rows ``ReconnectingRDBStorage._read_trials`` builds trials from, in six
    statements: the trials ``chosen`` selects (id, number, state, start, end; by id),
    then, per trial id, its rows of each of ``_trial_children``'s tables (params, values,
    user attributes, system attributes, intermediate values), in the table's order. No
    trial: no other statement."""
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


def _trial_rows_at_once(
    connection: sqlalchemy.Connection, chosen: sqlalchemy.ColumnElement[bool]
) -> _TrialRows:
    """``_trial_rows`` in one PostgreSQL statement, one snapshot: each trial's row
    carries its rows of each child table as one JSON array (``json_agg`` of
    ``json_build_array``, in the table's order). A float in JSON is the server's text of
    the double, as it is in a column (exact, unless ``extra_float_digits`` is lowered),
    but a whole one has no decimal point (``0``, read as an int): each is made a float
    again here, and an enum, given as its label, Optuna's type.

    Why: a trial read is six or seven round trips the other way, and each worker makes
    two at every tell (Optuna's ``Study.tell`` reads the trial before and after) and one
    per batch of newly finished trials its pruner reads (docs/benchmarks.md, stop 24)."""
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
    """For ``_trial_rows_at_once``, per table of ``_trial_children``: the trial's rows as
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
    ``_trial_rows`` returns them: params, values, user and system attributes,
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


def _requeued(study_id: int) -> sqlalchemy.Select:
    """The number of the study's re-queued trials (column ``n``): the distinct retry
    histories its retries carry (``ReconnectingRDBStorage.count_trials``)."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    attr = models.TrialSystemAttributeModel.__table__
    return (
        sqlalchemy.select(sqlalchemy.func.count(sqlalchemy.distinct(attr.c.value_json)).label("n"))
        .select_from(attr.join(trial, trial.c.trial_id == attr.c.trial_id))
        .where(trial.c.study_id == study_id, attr.c.key == "retry_history")
    )


def _claim_counts(study_id: int) -> tuple[Any, Any]:
    """The CTEs a claim in one message counts with: the study's trials per state
    (``counts``: finished, running, waiting, all) and its re-queued trials (``requeued``:
    distinct retry histories, as ``count_trials``)."""
    trial = compat.rdb_models().TrialModel.__table__
    count = sqlalchemy.func.count
    counts = (
        sqlalchemy.select(
            count().filter(trial.c.state.in_(_FINISHED)).label("finished"),
            count().filter(trial.c.state == TrialState.RUNNING).label("running"),
            count().filter(trial.c.state == TrialState.WAITING).label("waiting"),
            count().label("trials"),
        )
        .where(trial.c.study_id == study_id)
        .cte("counts")
    )
    return counts, _requeued(study_id).cte("requeued")


def _stale_count(study_id: int, grace: float) -> Any:
    """The CTE of the study's stale RUNNING trials (column ``n``): a heartbeat older than
    ``grace`` seconds by the server's clock, as ``_get_stale_trial_ids``. Its cost grows
    with the RUNNING trials (an index probe of the heartbeats per trial: 1.3 of a claim
    message's 1.8 ms at 600 RUNNING, stop 23)."""
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


def _claimed_trial_inserts(
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
    PostgreSQL statement for what ``_create_claimed_trial`` does in three on MariaDB."""
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


def _compatible(
    earlier: optuna.distributions.BaseDistribution, later: optuna.distributions.BaseDistribution
) -> bool:
    try:
        optuna.distributions.check_distribution_compatibility(earlier, later)
    except ValueError:
        return False
    return True


def _updatable(bound: str = "trial_id") -> sqlalchemy.CTE:
    """The study and state of the trial whose id is bound as ``bound``, for a statement
    that writes to it only if it is not finished (``ReconnectingRDBStorage._write``)."""
    trial = compat.rdb_models().TrialModel.__table__
    return (
        sqlalchemy.select(trial.c.study_id, trial.c.state)
        .where(trial.c.trial_id == sqlalchemy.bindparam(bound))
        .cte("target")
    )


# Built once per process: building a statement cost more client CPU than running it.
@functools.cache
def _param_insert(look_back: bool) -> sqlalchemy.Select:
    """``_set_trial_param``'s statement: inserts the parameter ``:name`` = ``:value`` with
    its distribution ``:shape`` into the trial ``:trial_id`` if it is not finished and,
    with ``look_back``, if the study's earlier distribution of that name, if any, is the
    same; answers the trial's state and that earlier distribution."""
    models = compat.rdb_models()
    param = models.TrialParamModel.__table__
    trial = models.TrialModel.__table__
    target = _updatable()
    shape = sqlalchemy.bindparam("shape", type_=param.c.distribution_json.type)
    allowed = [target.c.state.not_in(_FINISHED)]
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


@functools.cache
def _heartbeat_upsert() -> sqlalchemy.Insert:
    """``record_heartbeat_once``'s statement: the heartbeat of the trial ``:trial_id`` set
    to the server's time (``now()``, as Optuna sets it), its row made if it has none."""
    beat = compat.rdb_models().TrialHeartbeatModel.__table__
    upsert = postgresql.insert(beat).values(
        trial_id=sqlalchemy.bindparam("trial_id"), heartbeat=sqlalchemy.func.now()
    )
    return upsert.on_conflict_do_update(
        index_elements=["trial_id"], set_={"heartbeat": sqlalchemy.func.now()}
    )


@functools.cache
def _attr_upsert(table_name: str) -> sqlalchemy.Select:
    """``_set_trial_attr_at_once``'s statement: the attribute ``:key`` of the trial ``:trial_id``
    (in ``table_name``: its user or system attributes) set to ``:value`` (JSON), if the
    trial is not finished; answers the trial's state."""
    table = compat.rdb_models().TrialModel.metadata.tables[table_name]
    target = _updatable()
    row = sqlalchemy.select(
        sqlalchemy.bindparam("trial_id", type_=table.c.trial_id.type),
        sqlalchemy.bindparam("key", type_=table.c.key.type),
        sqlalchemy.bindparam("value", type_=table.c.value_json.type),
    ).where(target.c.state.not_in(_FINISHED))
    upsert = postgresql.insert(table).from_select(["trial_id", "key", "value_json"], row)
    written = (
        upsert.on_conflict_do_update(
            index_elements=["trial_id", "key"], set_={"value_json": upsert.excluded.value_json}
        )
        .returning(table.c.trial_id)
        .cte("written")
    )
    return sqlalchemy.select(target.c.state).add_cte(written)


@functools.cache
def _finish_statement(objectives: int) -> sqlalchemy.Select:
    """``_finish_trial``'s statement for ``objectives`` values: the trial ``:finished_id``
    set to ``:new_state`` at ``:complete`` with ``:value_N`` of ``:type_N`` for each
    objective N, if it is not finished; answers the trial's state before and whether it
    was set. The update checks the state of the row it updates (a concurrent finish is
    seen)."""
    models = compat.rdb_models()
    trial = models.TrialModel.__table__
    table = models.TrialValueModel.__table__
    target = _updatable("finished_id")
    updated = (
        sqlalchemy.update(trial)
        .where(
            # Not "trial_id": a parameter named as a column of an UPDATE sets that column.
            trial.c.trial_id == sqlalchemy.bindparam("finished_id"),
            trial.c.state.not_in(_FINISHED),
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
def _step_upsert() -> sqlalchemy.Select:
    """``set_trial_intermediate_value``'s statement: the value ``:value`` of type ``:kind``
    at ``:step`` of the trial ``:trial_id``, inserted or replaced if the trial is not
    finished; answers the trial's state."""
    table = compat.rdb_models().TrialIntermediateValueModel.__table__
    target = _updatable()
    row = sqlalchemy.select(
        sqlalchemy.bindparam("trial_id", type_=table.c.trial_id.type),
        sqlalchemy.bindparam("step", type_=table.c.step.type),
        sqlalchemy.bindparam("value", type_=table.c.intermediate_value.type),
        sqlalchemy.bindparam("kind", type_=table.c.intermediate_value_type.type),
    ).where(target.c.state.not_in(_FINISHED))
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


def _rows_of(connection: sqlalchemy.Connection, message: str) -> list[list[tuple[Any, ...]]]:
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


def _require_study(connection: sqlalchemy.Connection, study_id: int, *, lock: bool = False) -> None:
    """Raise KeyError, as Optuna does, when the study does not exist; with ``lock``, hold
    its row (``FOR UPDATE``) until the transaction ends, as Optuna does to number trials."""
    study = compat.rdb_models().StudyModel.__table__
    select = sqlalchemy.select(study.c.study_id).where(study.c.study_id == study_id)
    if connection.execute(select.with_for_update() if lock else select).first() is None:
        raise KeyError(compat.rdb_not_found_message())


def _trial_with_token(session: Any, study_id: int, token: str, keys: Sequence[str]) -> int | None:
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


@functools.lru_cache(maxsize=1024)
def _distribution(shape: str) -> optuna.distributions.BaseDistribution:
    """A parameter's distribution from its stored JSON; a study's trials share a few."""
    return optuna.distributions.json_to_distribution(shape)


def _stored_time_to_local(stored: datetime | None) -> datetime | None:
    """Optuna's RDB schema keeps naive UTC and hands out naive local time
    (``TrialModel.datetime_start``)."""
    if stored is None:
        return None
    return stored.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)


def _from_template(template: FrozenTrial, trial_id: int, number: int) -> FrozenTrial:
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


def _running_template() -> FrozenTrial:
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


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(ReconnectingRDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry_on_disconnect(
            lambda: method(self, *args, **kwargs), what=name.lstrip("_"), url=self.url
        )

    return wrapper


def _retrying_trial_read(name: str) -> Callable[..., Any]:
    retrying = _retrying(name)

    @functools.wraps(retrying)
    def wrapper(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        result = retrying(self, *args, **kwargs)
        if isinstance(result, FrozenTrial):
            return _without_tokens(result)
        if isinstance(result, dict):  # get_trial_system_attrs
            return {k: v for k, v in result.items() if k not in _TOKEN_ATTRS}
        return [_without_tokens(trial) for trial in result]

    return wrapper


for _name in _IDEMPOTENT_METHODS:
    setattr(ReconnectingRDBStorage, _name, _retrying(_name))
for _name in _TRIAL_READS:
    setattr(ReconnectingRDBStorage, _name, _retrying_trial_read(_name))


def engine_options(url: str, pool: PoolSettings) -> dict[str, Any]:
    """SQLAlchemy engine arguments for ``url``: the connection budget of one process.

    PostgreSQL and MariaDB get a pool of ``pool.size`` kept connections plus
    ``pool.max_overflow`` opened only while needed (see ``PoolSettings``), so N workers hold
    at most N x ``pool.max_connections`` server connections. psycopg never prepares
    statements (``prepare_threshold=None``): a named prepared statement lives on one server
    connection, and PgBouncer's transaction pooling hands the next transaction another one
    ("prepared statement ... does not exist"). SQLite: a 60 s busy timeout.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}}
    # A host that is down must not hang a heartbeat or a retry for minutes of TCP timeout.
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if parsed.get_driver_name() == "psycopg":
        connect_args["prepare_threshold"] = None
    return {
        "pool_size": pool.size,
        "max_overflow": pool.max_overflow,
        "pool_pre_ping": pool.pre_ping,
        "pool_recycle": 300,
        "connect_args": connect_args,
    }


class SchemaVersionError(StorageError):
    """The storage's tables were made by an Optuna with another schema than this one."""


def check_schema_version(storage: optuna.storages.RDBStorage) -> None:
    """Raise SchemaVersionError unless the tables' schema is the installed Optuna's.

    Optuna's own check (``RDBStorage(skip_compatibility_check=False)``) holds a session,
    i.e. one connection inside an open transaction, while ``get_current_version`` opens a
    second. Behind PgBouncer's transaction pooling the open transaction pins a server
    connection, so more workers starting at once than PgBouncer has server connections
    each pin one and wait for a second: all stall until PgBouncer's ``query_wait_timeout``
    (120 s) drops some (docs/scale.md). This check reads the stored revision on one
    connection (``get_current_version``; the head and the known revisions come from the
    migration scripts installed with Optuna, not from the database), with the same
    verdicts: equal passes, an older known revision needs ``optuna storage upgrade``, an
    unknown one was written by a newer Optuna.
    """
    current = storage.get_current_version()
    head = storage.get_head_version()
    if current == head:
        return
    where = mask_url(storage.url)
    if current in storage.get_all_versions():
        raise SchemaVersionError(
            f"storage {where} has Optuna schema {current!r}, older than {head!r} of the "
            f"installed Optuna {optuna.__version__}: upgrade it once, with no worker running "
            "('optuna storage upgrade --storage URL')"
        )
    raise SchemaVersionError(
        f"storage {where} has Optuna schema {current!r}, unknown to the installed Optuna "
        f"{optuna.__version__} (schema {head!r}): it was written by a newer Optuna; install "
        "that version here"
    )


def open_storage(url: str, *, attempts: int = 3) -> ReconnectingRDBStorage:
    """Optuna's RDB storage for ``url``, with heartbeats, retry of vanished trials and
    reconnects (see the module docstring).

    SQLite gets WAL journaling and a 60 s busy timeout, so several local worker processes
    can share one file. Opening is tried ``attempts`` times: two processes creating the
    tables of a fresh database at once can collide, and the second try then finds them.
    The schema version is checked with ``check_schema_version`` (one connection at a time,
    so any number of workers can start at once through PgBouncer); a schema of another
    Optuna raises SchemaVersionError at once, without retries.
    """
    backend = make_url(url).get_backend_name()
    engine_kwargs = engine_options(url, PoolSettings.from_env())
    interval, grace = heartbeat_settings()
    lock_on = lock_database()
    if lock_on is not None and backend != "postgresql":
        raise StorageError(
            f"${LOCK_DATABASE_ENV} is for PostgreSQL storages (through PgBouncer); "
            f"{mask_url(url)} is {backend}: unset it"
        )
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = ReconnectingRDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    skip_compatibility_check=True,  # check_schema_version below instead
                    heartbeat_interval=interval,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=RetryWithCleanAttrs(
                        max_retry=MAX_RETRIES, inherit_intermediate_values=True
                    ),
                )
            try:
                check_schema_version(storage)
            except SchemaVersionError:
                storage.engine.dispose()
                raise
            if backend == "sqlite" and sqlite_path(url) is not None:
                with storage.engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            if lock_on is not None:
                try:
                    storage.use_lock_database(lock_on)
                except StorageError:
                    storage.engine.dispose()
                    raise
            return storage
        except StorageError:  # a wrong schema or lock database: trying again changes nothing
            raise
        except Exception as error:  # driver errors have no common base; the message is what counts
            if attempt < attempts and not isinstance(error, (ImportError, ArgumentError)):
                time.sleep(0.5 * attempt * random.uniform(0.5, 1.5))
                continue
            raise StorageError(
                f"cannot open storage {mask_url(url)}: {_safe_detail(error, url)}"
            ) from None
    raise AssertionError("unreachable")


def _lock_name(study_name: str) -> str:
    return hashlib.sha256(f"hpo-study:{study_name}".encode()).hexdigest()[:32]


def _postgres_lock_key(study_name: str) -> int:
    """The study lock's advisory lock key on PostgreSQL (a signed 64-bit integer)."""
    return int.from_bytes(bytes.fromhex(_lock_name(study_name)[:16]), "big", signed=True)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Hold a lock that every worker of ``study_name`` on any node respects.

    PostgreSQL: a transaction-scoped advisory lock (released at commit, or when the
    connection dies with its worker), waited for in PostgreSQL's queue, first come first
    served, by a transaction that then makes every storage call of the block
    (``_postgres_lock``). MariaDB/MySQL: ``GET_LOCK`` on a connection whose one
    transaction, as on PostgreSQL, makes every storage call of the block. SQLite (local
    workers only): ``flock`` on a file in the temp directory.
    """
    backend = storage.engine.dialect.name
    name = _lock_name(study_name)
    if backend == "postgresql":
        with _postgres_lock(storage, _postgres_lock_key(study_name)):
            yield
    elif backend in ("mysql", "mariadb"):
        with storage.engine.connect() as connection:
            while not connection.execute(
                sqlalchemy.text("SELECT GET_LOCK(:name, 60)"), {"name": name}
            ).scalar():
                logger.warning("waiting for the lock of study %r", study_name)
            connection.commit()  # the lock is the session's; the block gets its own transaction
            try:
                # As on PostgreSQL: the block's calls in one transaction on the lock's
                # connection, committed before the lock is released.
                with connection.begin(), _bound(storage, connection):
                    yield
            finally:
                connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
                connection.commit()
    elif backend == "sqlite":
        database = make_url(str(storage.url)).database or ":memory:"
        digest = hashlib.sha256(f"{Path(database).resolve()}:{study_name}".encode()).hexdigest()
        path = Path(tempfile.gettempdir()) / f"hpo-lock-{digest[:24]}"
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        raise StorageError(
            f"storage backend {backend!r} is not supported for shared studies "
            "(use SQLite, PostgreSQL or MariaDB/MySQL)"
        )


@contextlib.contextmanager
def _postgres_lock(storage: optuna.storages.RDBStorage, key: int) -> Iterator[None]:
    """Hold transaction-scoped advisory lock ``key`` in one transaction that also makes
    every storage call of the block (``ReconnectingRDBStorage.bound_to``).

    One connection from the wait to the commit is what makes a blocking wait safe behind
    PgBouncer's transaction pooling. Waiters each pin a server connection while they wait;
    were the holder's own calls separate transactions, each would need another server
    connection, and once the waiters had them all the holder could never finish. Here the
    holder already has its connection, so the pool cannot deadlock, and PostgreSQL grants
    the lock in the order it was asked for: first come, first served, and no worker polls.
    A connection lost inside the block loses the transaction and the lock with it.
    """
    engine = (
        storage.lock_engine() if isinstance(storage, ReconnectingRDBStorage) else storage.engine
    )
    with engine.connect() as connection, connection.begin():
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        with _bound(storage, connection):
            yield


def _bound(
    storage: optuna.storages.RDBStorage, connection: sqlalchemy.Connection
) -> contextlib.AbstractContextManager[None]:
    if isinstance(storage, ReconnectingRDBStorage):
        return storage.bound_to(connection)
    return contextlib.nullcontext()
