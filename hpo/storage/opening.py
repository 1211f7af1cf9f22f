"""Opening a storage: Optuna's RDB storage for a URL, as hpo's ``ReconnectingRDBStorage``
with heartbeats, retry of vanished trials and reconnects, its schema checked; and a study
as rows in it (``StudyRef``).
"""

from __future__ import annotations

import logging
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hpo.retry import RetryWithCleanAttrs
from hpo.settings import LOCK_DATABASE_ENV, PoolSettings, heartbeat_settings, lock_database
from hpo.storage.rdb import ReconnectingRDBStorage
from hpo.storage.urls import (
    StorageError,
    StudyNotFound,
    engine_options,
    mask_url,
    safe_detail,
    sqlite_path,
)

SPEC_ATTR = "hpo_spec"
# A trial whose worker vanished this many times in a row is left failed (e.g. a trial that
# gets its node OOM-killed every time must not cycle forever).
MAX_RETRIES = 3


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


logger = logging.getLogger(__name__)

SQLITE_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")


def set_aside_side_files(database: Path, only: set[tuple[int, int]] | None = None) -> list[Path]:
    """Rename ``database``'s ``-wal``/``-shm``/``-journal`` files to ``NAME.lost-PID-NS``
    so that SQLite never replays them into whatever file is (or will be) at ``database``;
    with ``only``, just those whose (device, inode) is in it. Returns the new names.

    SQLite finds side files by name and cannot tell whose they are: the WAL of a deleted
    or replaced file, replayed into a restored one, is "database disk image is malformed".
    """
    moved = []
    for suffix in SQLITE_SIDE_SUFFIXES:
        side = Path(f"{database}{suffix}")
        try:
            stat = os.stat(side)
            if only is not None and (stat.st_dev, stat.st_ino) not in only:
                continue
            target = side.with_name(f"{side.name}.lost-{os.getpid()}-{time.time_ns()}")
            os.rename(side, target)
        except FileNotFoundError:
            continue
        moved.append(target)
    return moved


def _no_orphaned_side_files(url: str) -> None:
    """Side files beside a SQLite file that does not exist belong to no database: set
    them aside before SQLite creates the file and replays them into it."""
    path = sqlite_path(url)
    if path is None or str(path) == ":memory:" or path.exists():
        return
    for moved in set_aside_side_files(path):
        logger.warning(
            "%s had no database file beside it: set aside as %s",
            moved.name.split(".lost-")[0],
            moved,
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
    _no_orphaned_side_files(url)  # SQLite only
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
                f"cannot open storage {mask_url(url)}: {safe_detail(error, url)}"
            ) from None
    raise AssertionError("unreachable")
