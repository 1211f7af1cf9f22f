"""What the dashboard refuses before optuna-dashboard sees a request (a WSGI middleware).

- **Host names it does not serve.** A page on another site can point its own domain name
  at 127.0.0.1 (DNS rebinding) and then talk to a dashboard bound there as if it were the
  same site. Such a request carries that domain in its ``Host:`` header, so only these
  are answered: an IP address literal (a browser never sends one for a domain), the name
  ``localhost``, this machine's host names, the host the dashboard was bound to, and any
  name listed in ``$HPO_DASHBOARD_HOSTS`` (comma-separated, e.g. a proxy's name). The
  port is not checked (an SSH tunnel may change it). Others get 403.
- **Writes that would corrupt a running trial.** "Tell" or user attributes on a RUNNING
  trial (a worker is training it and would have its result overwritten) or a WAITING one
  (a queued retry a worker is about to claim), and deleting or
  renaming a study while any of its trials runs (the workers find it by name). Such
  requests get 409 with the reason; the same writes on finished trials pass through.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo.settings import DASHBOARD_HOSTS_ENV, env

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_TRIAL_WRITE = re.compile(r"/api/trials/(\d+)/(?:tell|user-attrs)")
_STUDY_WRITE = re.compile(r"/api/studies/(\d+)(?:/rename)?")


def served_host_names(bound_host: str) -> set[str]:
    """The non-IP host names the dashboard answers to (lower case)."""
    names = {"localhost", bound_host.lower(), socket.gethostname().lower()}
    names.add(socket.getfqdn().lower())
    names |= {n.strip().lower() for n in (env(DASHBOARD_HOSTS_ENV) or "").split(",")}
    return names - {""}


def host_is_served(header: str, names: set[str]) -> bool:
    """True when the ``Host:`` header names this dashboard (see the module docstring)."""
    host = header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host.rstrip(".") in names


def _running_write_refusal(
    storage: optuna.storages.BaseStorage, method: str, path: str
) -> str | None:
    """Why a write would corrupt a running trial, or None."""
    if method == "POST" and (match := _TRIAL_WRITE.fullmatch(path)):
        try:
            trial = storage.get_trial(int(match[1]))
        except KeyError:
            return None  # optuna-dashboard answers 404 itself
        if trial.state in (TrialState.RUNNING, TrialState.WAITING):
            return (
                f"trial {trial.number} is {trial.state.name}: a worker is training it (or "
                "will, as a queued retry) and owns its result; wait until it finishes"
            )
    is_study_write = (method == "DELETE" and not path.endswith("/rename")) or (
        method == "POST" and path.endswith("/rename")
    )
    if is_study_write and (match := _STUDY_WRITE.fullmatch(path)):
        try:
            running = storage.get_all_trials(
                int(match[1]), deepcopy=False, states=(TrialState.RUNNING,)
            )
        except KeyError:
            return None
        if running:
            return (
                f"study has {len(running)} RUNNING trial(s): stop its workers before "
                "deleting or renaming it"
            )
    return None


def guard_requests(
    application: WSGIApp, storage: optuna.storages.BaseStorage, bound_host: str
) -> WSGIApp:
    """``application`` behind the two refusals of the module docstring."""
    names = served_host_names(bound_host)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not host_is_served(environ.get("HTTP_HOST", ""), names):
            return _answer(start_response, "403 Forbidden", "unknown Host header")
        method = environ.get("REQUEST_METHOD", "GET").upper()
        reason = _running_write_refusal(storage, method, environ.get("PATH_INFO", ""))
        if reason is not None:
            return _answer(start_response, "409 Conflict", reason)
        return application(environ, start_response)

    return guarded


def _answer(start_response: Callable[..., Any], status: str, reason: str) -> list[bytes]:
    body = json.dumps({"reason": reason}).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
