"""The study lock: what makes "is there budget left? then create a trial" one step for
every worker of a study on any node, and so ``--n-trials`` an exact study-wide total.

PostgreSQL: a transaction-scoped advisory lock held by one transaction that makes every
storage call of the block; MariaDB/MySQL: ``GET_LOCK`` on a connection whose one
transaction does the same; SQLite (local workers only): ``flock`` on a file. On PostgreSQL
a claim's common case takes the same advisory lock inside one message instead
(``hpo.storage.one_message``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from hpo.settings import LOCK_DATABASE_ENV
from hpo.storage.urls import StorageError, mask_url, safe_detail

logger = logging.getLogger(__name__)


def lock_name(study_name: str) -> str:
    return hashlib.sha256(f"hpo-study:{study_name}".encode()).hexdigest()[:32]


def postgres_lock_key(study_name: str) -> int:
    """The study lock's advisory lock key on PostgreSQL (a signed 64-bit integer)."""
    return int.from_bytes(bytes.fromhex(lock_name(study_name)[:16]), "big", signed=True)


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
    name = lock_name(study_name)
    if backend == "postgresql":
        with _postgres_lock(storage, postgres_lock_key(study_name)):
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
    every storage call of the block (``hpo.storage.transactions.bound_to``).

    One connection from the wait to the commit is what makes a blocking wait safe behind
    PgBouncer's transaction pooling. Waiters each pin a server connection while they wait;
    were the holder's own calls separate transactions, each would need another server
    connection, and once the waiters had them all the holder could never finish. Here the
    holder already has its connection, so the pool cannot deadlock, and PostgreSQL grants
    the lock in the order it was asked for: first come, first served, and no worker polls.
    A connection lost inside the block loses the transaction and the lock with it.
    """
    # hpo's storage may take its lock on a database alias of its own (``lock_engine``).
    engine = storage.lock_engine() if hasattr(storage, "lock_engine") else storage.engine
    with engine.connect() as connection, connection.begin():
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        with _bound(storage, connection):
            yield


def _bound(
    storage: optuna.storages.RDBStorage, connection: sqlalchemy.Connection
) -> contextlib.AbstractContextManager[None]:
    """hpo's storage makes the block's calls on ``connection`` (``bound_to``); Optuna's
    own makes them as it always does."""
    if hasattr(storage, "bound_to"):
        return storage.bound_to(connection)
    return contextlib.nullcontext()


def open_lock_engine(storage: Any, database: str) -> tuple[str, sqlalchemy.Engine]:
    """The URL and engine of ``database`` on ``storage``'s PostgreSQL server, for the study
    lock (``ReconnectingRDBStorage.use_lock_database``). Raises StorageError when it cannot
    be opened, or is not the storage's own database (another name on the server, or
    another server): the claim would write its trial there."""
    lock_url = make_url(storage.url).set(database=database).render_as_string(hide_password=False)
    engine = sqlalchemy.create_engine(lock_url, **storage.engine_kwargs)
    identity = sqlalchemy.text("SELECT current_database(), pg_postmaster_start_time()")
    try:
        with storage.engine.connect() as ours, engine.connect() as theirs:
            expected = tuple(ours.execute(identity).one())
            reached = tuple(theirs.execute(identity).one())
    except Exception as error:  # driver errors have no common base
        engine.dispose()
        raise StorageError(
            f"cannot open the study lock's database {mask_url(lock_url)} "
            f"(${LOCK_DATABASE_ENV}): {safe_detail(error, lock_url)}"
        ) from None
    if reached != expected:
        engine.dispose()
        raise StorageError(
            f"${LOCK_DATABASE_ENV} = {database!r} reaches database {reached[0]!r} "
            f"(server started {reached[1]}), not the storage's {expected[0]!r} (server "
            f"started {expected[1]}): it must name the storage's own database, e.g. a "
            "PgBouncer alias of it"
        )
    return lock_url, engine
