"""A real PgBouncer (transaction pooling) on a free loopback port, in front of the local
PostgreSQL, for the tests that run workers through it.

PgBouncer is the Debian package (``.ci/run`` installs it). It refuses to run as root, so
as root it is started with ``-u postgres`` (it drops to that user after reading its
files); its config directory is made readable for that. Missing: the test skips, or fails
under ``HPO_REQUIRE_DB=1`` like the other database tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from .databases import ADMIN_URLS
from .processes import stop_process

CONFIG = """\
[databases]
* = host={host} port={port}
{aliases}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/userlist.txt
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"pgbouncer not listening on 127.0.0.1:{port} after {timeout_s}s")


@contextlib.contextmanager
def pgbouncer(
    pool_size: int = 20,
    server_url: str | None = None,
    aliases: Mapping[str, tuple[str, int]] | None = None,
) -> Iterator[int]:
    """Start PgBouncer in front of the test PostgreSQL (or ``server_url``'s server); yields
    its port. ``pool_size`` server connections per database and user (``default_pool_size``).
    ``aliases``: name -> (database, pool size), more names for a database, each with a pool
    of its own (as ``$HPO_LOCK_DATABASE`` wants, docs/scale.md)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("HPO_REQUIRE_DB"):
            pytest.fail(f"HPO_REQUIRE_DB is set and {message}")
        pytest.skip(message)
    server = make_url(server_url or ADMIN_URLS["postgresql"])
    directory = Path(tempfile.mkdtemp(prefix="hpo-pgbouncer-"))
    directory.chmod(0o755)
    port = _free_port()
    (directory / "pgbouncer.ini").write_text(
        CONFIG.format(
            host=server.host or "127.0.0.1",
            port=server.port or 5432,
            listen_port=port,
            directory=directory,
            user=server.username or "postgres",
            pool_size=pool_size,
            aliases="".join(
                f"{alias} = host={server.host or '127.0.0.1'} port={server.port or 5432} "
                f"dbname={database} pool_size={size}\n"
                for alias, (database, size) in (aliases or {}).items()
            ),
        )
    )
    (directory / "userlist.txt").write_text(f'"{server.username or "postgres"}" ""\n')
    command = [binary, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
    log = open(directory / "pgbouncer.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            _wait_listening(port, process)
        except RuntimeError as error:
            pytest.fail(f"{error}: {(directory / 'pgbouncer.log').read_text()[-2000:]}")
        yield port
    finally:
        stop_process(process, timeout=10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def through(url: str, port: int) -> str:
    """``url`` (a scratch database on the test PostgreSQL) via PgBouncer on ``port``."""
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def waiting_clients(port: int, database: str) -> int:
    """Clients of PgBouncer on ``port`` queued for a server connection of ``database`` (an
    alias included), from its admin console (``SHOW POOLS``)."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=port, dbname="pgbouncer", user="postgres", autocommit=True
    ) as console:
        cursor = console.execute("SHOW POOLS")
        names = [column.name for column in cursor.description]
        return sum(
            row[names.index("cl_waiting")]
            for row in cursor.fetchall()
            if row[names.index("database")] == database
        )
