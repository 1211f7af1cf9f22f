"""Connections and transactions: where each storage call runs.

- ``bound_to``: every call a thread makes inside the block runs in one transaction on one
  connection (the study lock's), each in a savepoint; none is retried on its own, the
  caller repeats the whole transaction (``hpo.storage.reconnect``).
- ``reading``: a connection for work whose statements each stand alone, in autocommit on
  PostgreSQL (``in_one_statement``), where Optuna's writes are transactions of four to
  seven round trips.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy
import sqlalchemy.orm

# Set while this thread's storage calls run inside one transaction (``bound_to``): a lost
# connection there has lost the whole transaction, so no single call may be retried on a
# new connection; the caller repeats the transaction instead.
one_transaction = threading.local()


def in_one_transaction() -> bool:
    """Whether this thread's storage calls run inside ``bound_to``'s transaction."""
    return getattr(one_transaction, "active", False)


@contextlib.contextmanager
def bound_to(storage: Any, connection: sqlalchemy.Connection) -> Iterator[None]:
    """Run every call this thread makes on ``storage`` inside the block on ``connection``,
    in the transaction open on it: each call in a savepoint (so an IntegrityError that
    Optuna ignores undoes that call only), all committed or lost together. No call is
    retried inside (``retry_on_disconnect``): after a lost connection the caller repeats
    the transaction. Other threads (the heartbeat) keep their own sessions."""
    session = sqlalchemy.orm.Session(bind=connection, join_transaction_mode="create_savepoint")
    registry = storage.scoped_session.registry
    previous = registry() if registry.has() else None
    registry.set(session)
    one_transaction.active = True
    one_transaction.storage, one_transaction.connection = storage, connection
    try:
        yield
    finally:
        one_transaction.active = False
        one_transaction.storage = one_transaction.connection = None
        session.close()
        if previous is None:
            registry.clear()
        else:
            registry.set(previous)


def bound_connection(storage: Any) -> sqlalchemy.Connection | None:
    """The connection of ``bound_to``'s block when this thread is inside it for ``storage``."""
    if getattr(one_transaction, "storage", None) is not storage:
        return None
    return one_transaction.connection


def in_one_statement(engine: sqlalchemy.Engine) -> bool:
    """Whether hpo's one-statement versions of Optuna's calls run on ``engine``, each in
    autocommit (``reading``): a running trial's writes (param, intermediate value,
    attribute, heartbeat, tell) and trial reads, where Optuna's are transactions of four
    to seven round trips. On PostgreSQL; elsewhere Optuna's own writes and six-statement
    reads run (on MariaDB pymysql switches autocommit with a statement each way; SQLite
    has no round trips to save).

    Why: under PgBouncer's transaction pooling, a transaction holds a server connection
    across all of its client's round trips, and with hundreds of clients on a busy node
    each round trip waits for its client to be scheduled (docs/storage.md)."""
    return engine.dialect.name == "postgresql"


@contextlib.contextmanager
def reading(storage: Any) -> Iterator[sqlalchemy.Connection]:
    """A connection for work whose statements each stand alone: reads (under READ
    COMMITTED each statement has its own snapshot, in a transaction or not) and writes of
    one statement. Inside ``bound_to``, the block's own, in its transaction; elsewhere, on
    PostgreSQL, one in autocommit, where each statement is its own transaction with no
    BEGIN and COMMIT round trips around it (psycopg sends BEGIN as a round trip of its
    own).

    Why: under PgBouncer's transaction pooling a transaction holds a server connection
    from its BEGIN to its COMMIT, across the client's round trips. With 256 workers
    claiming at once on two cores, one client round trip took tens of ms, and the claim's
    checks before the lock (BEGIN, a read, COMMIT) held the pool's connections for
    ~0.14 s each (docs/storage.md)."""
    connection = bound_connection(storage)
    if connection is not None:
        yield connection
        return
    if not in_one_statement(storage.engine):
        # pymysql switches autocommit with a statement each way (a round trip more than
        # the COMMIT it saves); SQLite has no round trips.
        with storage.engine.begin() as own:
            yield own
        return
    with storage.engine.connect() as own:
        yield own.execution_options(isolation_level="AUTOCOMMIT")


def read(storage: Any, statement: sqlalchemy.Executable) -> list[sqlalchemy.Row]:
    """The rows of one SQLAlchemy Core read, on ``reading``. Core, not the ORM: a claim
    makes these calls holding the study lock, and every millisecond of client CPU there is
    a millisecond every waiter waits."""
    with reading(storage) as connection:
        return list(connection.execute(statement))
