"""optuna-dashboard for every study in a storage, with an artifact store for report figures.

Served through optuna-dashboard's Python API (``optuna_dashboard.wsgi``) on the standard
library's threaded WSGI server, the same server ``optuna-dashboard`` itself uses by default.
Binding happens before anything is served, so a taken port is one clear error.

optuna-dashboard itself has no authentication: anyone who reaches the port can read, edit
and delete studies. So two WSGI middlewares wrap it here, each a function of its own:
``require_basic_auth`` (HTTP basic auth; required on any address but loopback, and on
loopback too once credentials are given) and ``refuse_writes`` (``--read-only``: every
POST, PUT, PATCH and DELETE, i.e. notes, deletes, user attributes, uploads, answers 403).
Basic auth sends the password with every request, readable by anyone on the path unless a
TLS proxy or an SSH tunnel (``ssh -L 8080:127.0.0.1:8080 node``) carries it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import ipaddress
import shlex
import signal
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from hpo.errors import UserError
from hpo.settings import (
    ARTIFACTS_ENV,
    DASHBOARD_PASSWORD_ENV,
    DASHBOARD_USER_ENV,
    dashboard_credentials,
    env,
)
from hpo.storage import mask_url, open_storage, sqlite_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
ARTIFACTS_DIR_NAME = "hpo-artifacts"


Credentials = tuple[str, str]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REALM = "hpo dashboard"


class DashboardError(UserError):
    """The dashboard cannot start (port taken, no such database, no credentials); the CLI
    exits 2."""


def read_auth_file(path: Path) -> Credentials:
    """``USER:PASSWORD`` from the first line of ``path`` (the password may contain ':').
    Raises DashboardError naming the file, never its content."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not readable as UTF-8 text"
        raise DashboardError(f"--auth-file {path}: {reason}") from None
    user, colon, password = (lines[0] if lines else "").partition(":")
    if not (user and colon and password):
        raise DashboardError(f"--auth-file {path}: its first line must be USER:PASSWORD")
    return user, password


def choose_credentials(
    host: str, auth_file: Path | None, no_auth: bool
) -> tuple[Credentials | None, str | None]:
    """The credentials to require (``--auth-file``, else ``$HPO_DASHBOARD_USER`` and
    ``$HPO_DASHBOARD_PASSWORD``) and a warning to print, if any.

    Raises DashboardError when ``host`` is not loopback and there are none, unless
    ``no_auth``: then the warning says that everyone who reaches the port may write."""
    if no_auth and auth_file is not None:
        raise DashboardError("--no-auth and --auth-file contradict each other; give one")
    if no_auth:
        if is_loopback(host):
            return None, None
        return None, (
            f"warning: listening on {host} with --no-auth: anyone who can reach this port "
            "can read, change and delete studies"
        )
    credentials = read_auth_file(auth_file) if auth_file else dashboard_credentials()
    if credentials is None and not is_loopback(host):
        raise DashboardError(
            f"listening on {host} needs credentials: set ${DASHBOARD_USER_ENV} and "
            f"${DASHBOARD_PASSWORD_ENV}, or pass --auth-file FILE (USER:PASSWORD), "
            "or --no-auth to serve everyone who reaches the port"
        )
    return credentials, None


def _plain(start_response: Callable[..., Any], status: str, text: str, *extra: tuple[str, str]):
    body = text.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, [*headers, *extra])
    return [body]


def require_basic_auth(application: WsgiApp, credentials: Credentials) -> WsgiApp:
    """WSGI middleware: pass a request on only with HTTP basic auth of ``credentials``;
    anything else gets 401 with a ``WWW-Authenticate`` challenge. Compares in constant
    time."""
    user, password = (part.encode() for part in credentials)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, encoded = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        given_user, _, given_password = given.partition(b":")
        user_ok = hmac.compare_digest(given_user, user)
        password_ok = hmac.compare_digest(given_password, password)
        if scheme.lower() == "basic" and user_ok and password_ok:
            return application(environ, start_response)
        challenge = ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
        return _plain(start_response, "401 Unauthorized", "credentials required\n", challenge)

    return guarded


def refuse_writes(application: WsgiApp) -> WsgiApp:
    """WSGI middleware of ``--read-only``: GET, HEAD and OPTIONS pass; every other method
    (optuna-dashboard's notes, deletes, user attributes, uploads) gets 403."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if str(environ.get("REQUEST_METHOD", "GET")).upper() in READ_METHODS:
            return application(environ, start_response)
        return _plain(start_response, "403 Forbidden", "read-only dashboard: writes refused\n")

    return guarded


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
    credentials: Credentials | None = None,
    read_only: bool = False,
) -> WSGIServer:
    """Bind ``host:port`` and return the server, not yet serving; with ``credentials`` every
    request needs them, with ``read_only`` every write is refused.

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
    application: WsgiApp = wsgi(storage, artifact_store=artifact_store(artifact_dir))
    application = guard_requests(application, storage, host)  # hpo.dashboard_guard
    if read_only:
        application = refuse_writes(application)
    if credentials is not None:
        application = require_basic_auth(application, credentials)
    server.set_app(application)
    return server


def dashboard_command(storage_url: str, artifact_dir: Path | None = None) -> str:
    """The exact ``hpo dashboard`` command for this storage and the artifact directory the
    report's figures are in (default: ``default_artifact_dir``), password masked,
    shell-quoted."""
    artifacts = artifact_dir or default_artifact_dir(storage_url)
    return (
        f"hpo dashboard --storage {shlex.quote(mask_url(storage_url))} "
        f"--artifacts {shlex.quote(str(artifacts))}"
    )


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


def describe(
    storage_url: str,
    host: str,
    port: int,
    artifact_dir: Path,
    *,
    auth: bool = False,
    read_only: bool = False,
) -> str:
    modes = ("basic auth, " if auth else "") + ("read-only, " if read_only else "")
    return (
        f"dashboard: {url_of(host, port)}  ({modes}storage {mask_url(storage_url)}, "
        f"artifacts {artifact_dir}); Ctrl-C to stop"
    )
