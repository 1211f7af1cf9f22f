"""A pytest plugin that points Optuna's own storage tests at hpo's storage.

Loaded by ``tests/test_optuna_storage_suite.py`` into a separate pytest process that runs
``tests/storages_tests`` from Optuna's source distribution. Every storage those tests
build on SQLite (``StorageSupplier("sqlite")``, ``"cached_sqlite"``, and the multi-process
tests' ``get_storage()``) becomes ``hpo.storage.open_storage(url)``: hpo's retrying class,
engine settings, SQLite WAL mode and heartbeat defaults. A test that asks for its own
heartbeat arguments gets hpo's class with ``open_storage``'s engine settings and those
arguments, since the arguments are what it tests. Storages that are not SQL (in-memory,
journal, gRPC) are deselected: hpo does not use them.

``HPO_SUITE_BACKEND`` is ``sqlite`` (a new file per storage) or ``postgresql``
(``HPO_SUITE_DB_URL``, emptied for every storage). ``HPO_SUITE_SHARD=INDEX/COUNT`` keeps
every COUNT-th test from the INDEX-th (0-based) of the collected ones and deselects the
rest: COUNT processes with the indices 0 to COUNT-1 run every test once between them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import types
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy

try:
    import fakeredis  # noqa: F401  (optuna.testing.storages imports it; only Redis modes use it)
except ImportError:
    sys.modules["fakeredis"] = types.ModuleType("fakeredis")

from optuna.testing import storages as testing_storages  # noqa: E402

from hpo.storage import ReconnectingRDBStorage, open_storage  # noqa: E402

BACKEND = os.environ.get("HPO_SUITE_BACKEND", "sqlite")
SQL_MODES = ["sqlite", "cached_sqlite"]
# SQLite files in memory where there is a tmpfs: the suite creates hundreds of databases.
_directory = tempfile.mkdtemp(
    prefix="hpo-optuna-suite-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
)


def empty_storage_url() -> str:
    """A URL of an empty storage on the chosen backend."""
    if BACKEND == "sqlite":
        # A copy of one empty database that open_storage made: creating Optuna's tables
        # costs 0.24 s of CPU per storage, copying the file 0.05 s.
        template = Path(_directory) / "empty.db"
        if not template.exists():
            hpo_storage(f"sqlite:///{template}").engine.dispose()
        path = Path(_directory) / f"{uuid.uuid4().hex}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url = os.environ["HPO_SUITE_DB_URL"]
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        tables = (
            connection.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename NOT IN ('alembic_version', 'version_info')"
            )
            .scalars()
            .all()
        )
        # DELETE with foreign-key triggers off: 8 ms, where TRUNCATE takes 300 ms.
        connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for name in tables:
            connection.exec_driver_sql(f'DELETE FROM "{name}"')
    engine.dispose()
    return url


def hpo_storage(url: str, **arguments: Any) -> ReconnectingRDBStorage:
    # hpo's own heartbeat settings are not what these tests check: open it quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(url)
    assert isinstance(storage, ReconnectingRDBStorage)
    if not arguments:
        return storage
    engine_kwargs = storage.engine_kwargs
    storage.engine.dispose()
    return ReconnectingRDBStorage(url, engine_kwargs=engine_kwargs, **arguments)


class HpoStorageSupplier(testing_storages.StorageSupplier):
    def __enter__(self) -> Any:
        if self.storage_specifier not in SQL_MODES:
            return super().__enter__()
        storage = hpo_storage(empty_storage_url(), **self.extra_args)
        cached = "cached" in self.storage_specifier
        self.storage = optuna.storages._CachedStorage(storage) if cached else storage
        return self.storage


@contextmanager
def hpo_get_storage() -> Iterator[ReconnectingRDBStorage]:
    storage = hpo_storage(os.environ["TEST_DB_URL"])
    try:
        yield storage
    finally:
        storage.engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    # Before the test modules import these names (and parametrize with the lists).
    testing_storages.StorageSupplier = HpoStorageSupplier
    testing_storages.STORAGE_MODES[:] = SQL_MODES
    testing_storages.STORAGE_MODES_HEARTBEAT[:] = SQL_MODES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "get_storage"):
            module.get_storage = hpo_get_storage
    shard = os.environ.get("HPO_SUITE_SHARD")
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        kept = [item for number, item in enumerate(items) if number % count == index]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_directory, ignore_errors=True)
