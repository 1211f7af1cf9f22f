"""A SQLite study file stays the file the run opened, or the run stops.

Deleting ``hpo.db`` under a running worker used to go unnoticed: open connections kept
writing to the unlinked file, and the next new connection silently created an empty
database at the same path (Optuna creates its tables), so results vanished and the run
ended in a ``KeyError``. Two checks, one identity (device and inode of the file at open):

- every *new* connection of the storage's engine first checks the file is still the one
  opened (a SQLAlchemy ``do_connect`` listener), so nothing recreates an empty database;
- the worker checks it before each claim and at every heartbeat (``hpo.worker``), so a
  deletion is found within one heartbeat interval even while pooled connections live on.

Either raises ``SQLiteFileLost`` (a ``RunAborted``: one line, exit 1). Before that, the
``-wal``/``-shm`` files this process shared with the lost file are renamed aside
(``storage.set_aside_side_files``): SQLite finds side files by name only, and would replay
them into a file restored or copied to the same path ("database disk image is
malformed"). Only side files whose identity this guard last saw with the healthy file are
moved; those of a new file at the path are left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy

from hpo.errors import RunAborted
from hpo.storage import StudyNotFound, mask_url, set_aside_side_files, sqlite_path
from hpo.storage.opening import SQLITE_SIDE_SUFFIXES


class SQLiteFileLost(RunAborted):
    """The SQLite file was deleted or replaced while this process used it."""


def require_sqlite_file(storage_url: str, study_name: str) -> None:
    """Raise StudyNotFound (exit 2) when ``storage_url`` is a SQLite file that does not
    exist: a command that reads a study must not create an empty database."""
    path = sqlite_path(storage_url)
    if path is not None and str(path) != ":memory:" and not path.is_file():
        raise StudyNotFound(
            f"study {study_name!r} not found: {mask_url(storage_url)}: SQLite file "
            f"{str(path)!r} does not exist"
        )


def _side_identities(path: Path) -> set[tuple[int, int]]:
    found = set()
    for suffix in SQLITE_SIDE_SUFFIXES:
        try:
            stat = os.stat(f"{path}{suffix}")
        except OSError:
            continue
        found.add((stat.st_dev, stat.st_ino))
    return found


@dataclass(frozen=True)
class SQLiteFileGuard:
    path: Path
    identity: tuple[int, int]
    # The side files seen beside the healthy file (SQLite may delete and recreate them).
    sides: set[tuple[int, int]] = field(default_factory=set)

    @classmethod
    def attach(cls, storage: optuna.storages.RDBStorage) -> SQLiteFileGuard | None:
        """Guard ``storage``'s file (None for a server database or an in-memory one)."""
        path = sqlite_path(str(storage.url))
        if path is None or str(path) == ":memory:":
            return None
        stat = os.stat(path)
        guard = cls(path.resolve(), (stat.st_dev, stat.st_ino), _side_identities(path))
        sqlalchemy.event.listen(storage.engine, "do_connect", guard._before_connect)
        return guard

    def problem(self) -> str | None:
        """Why the file is no longer the one opened (its side files then set aside), or
        None."""
        problem = self._problem()
        if problem is None:
            self.sides.update(_side_identities(self.path))
            return None
        gone = not self.path.exists()
        set_aside_side_files(self.path, only=None if gone else self.sides)
        return problem

    def _problem(self) -> str | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return f"SQLite file {self.path} was deleted while this worker ran; stopping"
        except OSError as error:
            return f"SQLite file {self.path} cannot be read ({error.strerror}); stopping"
        if (stat.st_dev, stat.st_ino) != self.identity:
            return f"SQLite file {self.path} was replaced while this worker ran; stopping"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise SQLiteFileLost(problem)

    def _before_connect(self, dialect: object, record: object, args: object, kw: object) -> None:
        self.check()
