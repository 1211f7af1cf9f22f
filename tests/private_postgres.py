"""A private PostgreSQL server in a temporary directory, on a free loopback port: for the
tests and benchmarks that restart a server or need more connections than the shared one
allows (they must never restart or reconfigure the shared server at 127.0.0.1:5432).

Uses the installed PostgreSQL binaries (``/usr/lib/postgresql/<version>/bin``, the Debian
layout, or ``initdb`` on the PATH). PostgreSQL refuses to run as root, so as root (CI) the
server runs as the ``postgres`` user (``runuser``), in a directory it owns. Trust
authentication on 127.0.0.1 only; the socket lives in the data directory's parent. Missing
binaries: the test skips, or fails under ``HPO_REQUIRE_DB=1`` like the other database tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the private server did not start."""


def _binaries() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not versions:
        raise PostgresUnavailable("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    return Path(versions[-1]).parent


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivatePostgres:
    """One throwaway server: ``start``, ``stop``, ``restart``; ``url(database)``."""

    def __init__(self, max_connections: int = 100, *, fast: bool = False) -> None:
        self.bin = _binaries()
        self.root = Path(tempfile.mkdtemp(prefix="hpo-private-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.max_connections = max_connections
        # fsync off: for tests that restart a server, not for benchmarks (it makes every
        # commit cheaper than on a real database).
        self.fast = fast
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *command: str, timeout_s: float = 60) -> None:
        full = [str(self.bin / command[0]), *command[1:]]
        if self._as_postgres:
            full = ["runuser", "-u", "postgres", "--", *full]
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{command[0]} failed: {(done.stderr or done.stdout)[-800:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
            f" -c max_connections={self.max_connections}" + (" -c fsync=off" if self.fast else "")
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect every client and shut down cleanly; ``immediate``: like a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (every client's connection dies), stay down ``down_s``, start again on the
        same port."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            engine.dispose()
        return self.url(name)

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text()[-3000:] if path.exists() else ""

    def remove(self) -> None:
        with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(
    max_connections: int = 100, *, fast: bool = False
) -> Iterator[PrivatePostgres]:
    """A started private server; stopped and deleted afterwards, whatever happened."""
    server = PrivatePostgres(max_connections, fast=fast)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()
