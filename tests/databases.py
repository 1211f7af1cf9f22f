"""Scratch PostgreSQL / MariaDB databases and worker processes for the multi-worker tests.

Locally a database test skips (with the reason) when its server is unreachable; with
``HPO_REQUIRE_DB=1`` (set by ``.ci/run``) it fails instead, so CI cannot go green without
running them. The admin URLs can be overridden with ``HPO_TEST_POSTGRES_URL`` and
``HPO_TEST_MARIADB_URL``, and the scratch databases' name prefix with ``HPO_TEST_DB_PREFIX``
(so engineers sharing one server can tell theirs apart).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "HPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get("HPO_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
# Short heartbeats so a vanished worker's trial is retried within seconds in tests.
FAST_HEARTBEAT = {"HPO_HEARTBEAT_S": "1", "HPO_GRACE_S": "5", "HPO_DB_RETRY_S": "120"}
# A server that is restarting (the restart test, or another suite running it at the same
# time) gets this long to come back; one that stays down is remembered and skipped at once.
SERVER_WAIT_S = 20
_down: dict[str, Exception] = {}


def unreachable(backend: str, error: Exception) -> None:
    message = f"{backend} not reachable at {make_url(ADMIN_URLS[backend])!r}: {error}"
    if os.environ.get("HPO_REQUIRE_DB"):
        pytest.fail(f"HPO_REQUIRE_DB is set and {message}")
    pytest.skip(message)


@contextlib.contextmanager
def scratch_database(backend: str, prefix: str = "hpo_test_") -> Iterator[str]:
    """A new empty database on the local server; dropped afterwards. Yields its URL."""
    admin_url = make_url(ADMIN_URLS[backend])
    name = f"{os.environ.get('HPO_TEST_DB_PREFIX', prefix)}{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    deadline = time.monotonic() + (0 if backend in _down else SERVER_WAIT_S)
    while True:
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {name}")
            break
        except sqlalchemy.exc.OperationalError as error:
            if time.monotonic() >= deadline:
                engine.dispose()
                _down[backend] = error
                unreachable(backend, error)
            time.sleep(1)
    _down.pop(backend, None)
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        for _ in range(30):  # the server may still be coming back from a restart test
            try:
                with engine.connect() as connection:
                    connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
                break
            except sqlalchemy.exc.OperationalError:
                time.sleep(1)
        engine.dispose()


@contextlib.contextmanager
def study_storage(
    backend: str, tmp_path: Path, file_name: str = "hpo.db", prefix: str = "hpo_test_"
) -> Iterator[str]:
    """A storage URL for ``backend``: a SQLite file ``file_name`` in ``tmp_path``, or a
    scratch database on the local server (``scratch_database``), dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / file_name}"
    else:
        with scratch_database(backend, prefix=prefix) as url:
            yield url


def worker_env(storage_url: str, checkpoint_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FAST_HEARTBEAT)
    env.update(
        HPO_STORAGE=storage_url,
        HPO_CHECKPOINT_DIR=str(checkpoint_dir),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_worker(
    study: str, total_trials: int, env: dict[str, str], cwd: Path, *args: str
) -> subprocess.Popen:
    """``hpo worker`` as its own process (output to a log file in ``cwd``)."""
    log = open(cwd / f"worker-{uuid.uuid4().hex[:6]}.log", "w")  # noqa: SIM115 (closed with the process)
    command = [sys.executable, "-m", "hpo", "worker", "--study", study]
    command += ["--n-trials", str(total_trials), *args]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def wait_all(processes: list[subprocess.Popen], timeout_s: float = 400) -> list[int]:
    """Exit codes of all processes; kills them all (and fails) past the timeout."""
    deadline = time.monotonic() + timeout_s
    try:
        return [process.wait(timeout=max(1, deadline - time.monotonic())) for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers still running after {timeout_s}s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()


def logs(directory: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(directory.glob("worker-*.log")))
