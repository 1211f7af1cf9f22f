"""Storage URLs and engines: which database a command uses, how its URL is printed (never
with the password), and the connection budget of one process.

The URL comes from ``--storage``, else ``$HPO_STORAGE``, else ``hpo.db`` in the working
directory. Everything user-facing prints it through ``mask_url``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hpo import secrets
from hpo.errors import UserError
from hpo.settings import STORAGE_ENV, PoolSettings, env

DEFAULT_SQLITE_FILE = "hpo.db"


class StorageError(UserError):
    """A storage URL that cannot be used, or a study that is not there."""


class StudyNotFound(StorageError):
    pass


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
        parsed = make_url(chosen)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StorageError(
            f"storage URL {mask_url(chosen)!r} is not a SQLAlchemy URL "
            "(e.g. sqlite:///hpo.db, postgresql+psycopg://user:pass@host/db, "
            "mysql+pymysql://user:pass@host/db)"
        ) from None
    check_backend(parsed.drivername, chosen)
    if is_in_memory(chosen):
        # Every hpo command and every worker process opens its own engine, and each
        # engine's in-memory database starts empty: workers would retry for minutes.
        raise StorageError(
            f"storage URL {mask_url(chosen)!r} is an in-memory SQLite database, which lives "
            "in one connection pool only; hpo's commands and workers each open their own: "
            "use a file (sqlite:///hpo.db) or a server"
        )
    return chosen


SUPPORTED_BACKENDS = ("sqlite", "postgresql", "mysql", "mariadb")


def check_backend(drivername: str, url: str) -> None:
    """StorageError naming the scheme unless it is a supported database whose driver is
    installed here (SQLAlchemy would raise NoSuchModuleError / ImportError deep inside)."""
    backend = drivername.partition("+")[0]
    if backend not in SUPPORTED_BACKENDS:
        raise StorageError(
            f"storage URL {mask_url(url)!r}: unknown scheme {drivername!r}; use sqlite, "
            "postgresql+psycopg or mysql+pymysql (also mariadb+pymysql)"
        )
    try:
        make_url(url).get_dialect()
    except (ArgumentError, ImportError) as error:
        raise StorageError(
            f"storage URL {mask_url(url)!r}: driver {drivername!r} is not available here "
            f"({type(error).__name__}); use postgresql+psycopg or mysql+pymysql"
        ) from None


def is_in_memory(url: str) -> bool:
    """True for a SQLite database that lives in one process's memory only."""
    parsed = make_url(url)
    database = parsed.database or ""
    return parsed.get_backend_name() == "sqlite" and (
        database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    )


def mask_url(url: str) -> str:
    """The URL with every password (userinfo, query, libpq key=value) replaced by ``***``."""
    return secrets.mask_url(url)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, else None."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def safe_detail(error: BaseException, url: str) -> str:
    """First line of an error's message, with the URL's password blanked out."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    detail = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    return f"{type(root).__name__}: {secrets.mask_secrets(detail, known_secrets(url))}"


def known_secrets(url: str) -> tuple[str, ...]:
    """The passwords ``url`` carries (userinfo and query), as written and as decoded."""
    found = {url.partition("://")[2].partition("@")[0].partition(":")[2]}
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return tuple(found)
    found.add(str(parsed.password or ""))
    for key, value in parsed.query.items():
        if secrets.names_a_secret(key):
            found |= {value} if isinstance(value, str) else set(value)
    return tuple(s for s in found if s)


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
