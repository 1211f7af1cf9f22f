"""Storage URLs and Optuna's RDB storage: SQLite by default, PostgreSQL or MariaDB for many nodes.

Passwords in URLs are never printed: everything user-facing goes through ``mask_url``.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hpo.errors import UserError

DEFAULT_SQLITE_FILE = "hpo.db"
STORAGE_ENV = "HPO_STORAGE"
SPEC_ATTR = "hpo_spec"


class StorageError(UserError):
    """A storage URL that cannot be used, or a study that is not there."""


def default_storage_url(directory: Path | None = None) -> str:
    """SQLite file ``hpo.db`` in the working directory (absolute, so children agree)."""
    path = (directory or Path.cwd()) / DEFAULT_SQLITE_FILE
    return f"sqlite:///{path.resolve()}"


def resolve_storage_url(url: str | None) -> str:
    """``--storage`` if given, else ``$HPO_STORAGE``, else the default SQLite file."""
    chosen = url or os.environ.get(STORAGE_ENV) or default_storage_url()
    try:
        make_url(chosen)
    except ArgumentError:
        raise StorageError(
            f"storage URL {mask_url(chosen)!r} is not a SQLAlchemy URL "
            "(e.g. sqlite:///hpo.db, postgresql+psycopg://user:pass@host/db, "
            "mysql+pymysql://user:pass@host/db)"
        ) from None
    return chosen


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not parseable: hide anything between '://user:' and '@' by hand.
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:
            credentials, _, host = rest.rpartition("@")
            user = credentials.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url
    if parsed.password is None:
        return parsed.render_as_string(hide_password=False)
    return parsed.set(password="***").render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, else None."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for ``url``.

    Connections are checked before use (``pool_pre_ping``), so a database restart costs a
    reconnect instead of a failed trial.
    """
    engine_kwargs: dict = {}
    if make_url(url).get_backend_name() != "sqlite":
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 300}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as error:  # driver errors have no common base; the message is what counts
        detail = str(error).splitlines()[0] if str(error) else ""
        password = make_url(url).password
        if password:
            detail = detail.replace(str(password), "***")
        raise StorageError(
            f"cannot open storage {mask_url(url)}: {type(error).__name__}: {detail}"
        ) from None
