"""optuna-dashboard for every study in a storage, with an artifact store for report figures.

Served through optuna-dashboard's Python API (``optuna_dashboard.wsgi``) on the standard
library's threaded WSGI server, the same server ``optuna-dashboard`` itself uses by default.
Binding happens before anything is served, so a taken port is one clear error.

The dashboard has no authentication: anyone who reaches the port can read, edit and delete
studies. It binds to 127.0.0.1 by default; reach it from elsewhere through an SSH tunnel
(``ssh -L 8080:127.0.0.1:8080 node``) rather than binding 0.0.0.0.
"""

from __future__ import annotations

import errno
import ipaddress
import shlex
import signal
import socket
import socketserver
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from hpo.errors import UserError
from hpo.settings import ARTIFACTS_ENV, env
from hpo.storage import mask_url, open_storage, sqlite_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
ARTIFACTS_DIR_NAME = "hpo-artifacts"


class DashboardError(UserError):
    """The dashboard cannot start (port taken, no such database); the CLI exits 2."""


def default_artifact_dir(storage_url: str) -> Path:
    """Where report PNGs are stored for the dashboard: ``$HPO_ARTIFACTS``, else
    ``hpo-artifacts/`` beside the SQLite file, else ``./hpo-artifacts``.

    ``hpo report`` and ``hpo dashboard`` both use this, so with the same storage they agree
    without options. With a shared database and several machines, point ``--artifacts`` (or
    ``$HPO_ARTIFACTS``) at a shared directory.
    """
    if env(ARTIFACTS_ENV):
        return Path(str(env(ARTIFACTS_ENV)))
    database = sqlite_path(storage_url)
    if database is not None:
        return database.parent / ARTIFACTS_DIR_NAME
    return Path(ARTIFACTS_DIR_NAME)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ThreadedServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadedServerV6(_ThreadedServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No line per request on stderr (the dashboard polls every few seconds)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


def make_server(
    storage_url: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    artifact_dir: Path | None = None,
) -> WSGIServer:
    """Bind ``host:port`` and return the server, not yet serving.

    Raises DashboardError when the port is taken or cannot be bound, or when a SQLite
    storage points at a file that does not exist (the dashboard would create an empty one).
    """
    from optuna_dashboard import wsgi

    from hpo.atomic import artifact_store
    from hpo.dashboard_guard import guard_requests

    database = sqlite_path(storage_url)
    if database is not None and str(database) != ":memory:" and not database.is_file():
        raise DashboardError(
            f"no SQLite database at {database}; run 'hpo launch' there first or pass --storage"
        )
    artifact_dir = artifact_dir or default_artifact_dir(storage_url)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    server_class = _ThreadedServerV6 if ":" in host else _ThreadedServer
    try:
        server = server_class((host, port), _QuietHandler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise DashboardError(
                f"port {port} on {host} is already in use; choose another with --port"
            ) from None
        raise DashboardError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    storage = open_storage(storage_url)
    application = wsgi(storage, artifact_store=artifact_store(artifact_dir))
    server.set_app(guard_requests(application, storage, host))  # hpo.dashboard_guard
    return server


def dashboard_command(storage_url: str) -> str:
    """The exact ``hpo dashboard`` command for this storage, password masked, shell-quoted."""
    return f"hpo dashboard --storage {shlex.quote(mask_url(storage_url))}"


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard"


def serve(server: WSGIServer) -> None:
    """Serve until Ctrl-C or SIGTERM; then close the socket and return normally."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def describe(storage_url: str, host: str, port: int, artifact_dir: Path) -> str:
    return (
        f"dashboard: {url_of(host, port)}  (storage {mask_url(storage_url)}, "
        f"artifacts {artifact_dir}); Ctrl-C to stop"
    )
