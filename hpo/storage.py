"""Storage URLs and Optuna's RDB storage: SQLite by default, PostgreSQL or MariaDB for many nodes.

Passwords in URLs are never printed: everything user-facing goes through ``mask_url``.

What makes a shared database safe for many workers:

- **Heartbeats.** Every worker records a heartbeat for its running trial every
  ``$HPO_HEARTBEAT_S`` seconds (20; see ``hpo.settings``). A trial whose heartbeat is older than ``$HPO_GRACE_S``
  (60) is failed by the next worker that looks, and re-queued with the same parameters and
  its intermediate values (``hpo.retry.RetryWithCleanAttrs``).
- **Reconnects.** Connections are pre-pinged at checkout, and every storage call that fails
  for a lost connection is retried with exponential backoff for up to ``$HPO_DB_RETRY_S``
  seconds (300), so a database restart costs a pause, not a trial.
- **A study lock** (``study_lock``) that serializes "is there budget left? then create a
  trial", which is what makes ``--n-trials`` an exact study-wide total: a PostgreSQL
  advisory lock, a MariaDB/MySQL ``GET_LOCK``, or a lock file for SQLite.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hpo.compat import RDB_STORAGE_PRIVATE_METHODS
from hpo.errors import UserError
from hpo.retry import RetryWithCleanAttrs
from hpo.settings import STORAGE_ENV, db_retry_seconds, env, heartbeat_settings

DEFAULT_SQLITE_FILE = "hpo.db"
SPEC_ATTR = "hpo_spec"
# A trial whose worker vanished this many times in a row is left failed (e.g. a trial that
# gets its node OOM-killed every time must not cycle forever).
MAX_RETRIES = 3

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(UserError):
    """A storage URL that cannot be used, or a study that is not there."""


class StudyNotFound(StorageError):
    pass


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
    and raises the last error. Messages name the storage with its password masked.
    """
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


# Every storage call a worker makes, including the private ones Optuna's cache layer calls
# on its backend (hpo.compat); each is retried across a lost connection.
_RETRIED_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
    "get_trial", "get_all_trials", "get_best_trial", "record_heartbeat",
    *RDB_STORAGE_PRIVATE_METHODS,
)  # fmt: skip


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose calls survive a database restart (see ``retry_on_disconnect``).

    ``create_new_trial`` is retried too: it only fails before its commit in practice, and a
    rare duplicate would surface as an extra trial, not a lost one.
    """


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry_on_disconnect(
            lambda: method(self, *args, **kwargs), what=name.lstrip("_"), url=self.url
        )

    return wrapper


for _name in _RETRIED_METHODS:
    setattr(ReconnectingRDBStorage, _name, _retrying(_name))


def open_storage(url: str, *, attempts: int = 3) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for ``url``, with heartbeats, retry of vanished trials and
    reconnects (see the module docstring).

    SQLite gets WAL journaling and a 60 s busy timeout, so several local worker processes
    can share one file. Opening is tried ``attempts`` times: two processes creating the
    tables of a fresh database at once can collide, and the second try then finds them.
    """
    backend = make_url(url).get_backend_name()
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # A host that is down must not hang a heartbeat or a retry for minutes of TCP timeout.
        engine_kwargs.update(pool_recycle=300, connect_args={"connect_timeout": 10})
    interval, grace = heartbeat_settings()
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = ReconnectingRDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=interval,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=RetryWithCleanAttrs(
                        max_retry=MAX_RETRIES, inherit_intermediate_values=True
                    ),
                )
            if backend == "sqlite" and sqlite_path(url) is not None:
                with storage.engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            return storage
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


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Hold a lock that every worker of ``study_name`` on any node respects.

    PostgreSQL: a transaction-scoped advisory lock (released at commit, or when the
    connection dies with its worker). MariaDB/MySQL: ``GET_LOCK`` on a dedicated
    connection. SQLite (local workers only): ``flock`` on a file in the temp directory.
    """
    backend = storage.engine.dialect.name
    name = _lock_name(study_name)
    if backend == "postgresql":
        key = int.from_bytes(bytes.fromhex(name[:16]), "big", signed=True)
        with storage.engine.begin() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
    elif backend in ("mysql", "mariadb"):
        with storage.engine.connect() as connection:
            while not connection.execute(
                sqlalchemy.text("SELECT GET_LOCK(:name, 60)"), {"name": name}
            ).scalar():
                logger.warning("waiting for the lock of study %r", study_name)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
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
