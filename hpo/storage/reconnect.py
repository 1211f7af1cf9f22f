"""The retry rule: every storage call survives a database restart, and every write
happens exactly once even when a commit's acknowledgement is lost.

A lost connection during a write is *ambiguous*: the server may have committed and only
its acknowledgement been lost. So every retried call follows one rule: a retry either
repeats a call proven idempotent, or first checks what the earlier attempt did. Proven
idempotent (a repeat stores the same rows):

- every read (``get_*``, ``_get_trials``, ``_get_best_trial_id``, ``_get_stale_trial_ids``);
- ``set_study_user_attr``, ``set_study_system_attr``, ``set_trial_user_attr``,
  ``set_trial_system_attr``, ``set_trial_intermediate_value``, ``record_heartbeat``:
  upserts keyed by (study or trial, key or step), same value;
- ``set_trial_user_attrs`` (many attributes in one transaction, ``hpo.storage.attrs``):
  the same upserts in one commit, so a repeat stores the same rows, and an attempt whose
  commit failed stored none of them;
- ``set_trial_param`` / ``_set_trial_param``: the repeated insert hits the unique
  (trial, param) key, and Optuna ignores that IntegrityError for this call.

Checked before repeating (``hpo.storage.rdb.ReconnectingRDBStorage``):

- ``create_new_study``: the name is chosen before the first attempt (Optuna would pick a
  fresh random one per attempt); a retry that finds the study under that name with the
  same directions returns it instead of raising DuplicatedStudyError;
- ``delete_study``: a retry that finds the study gone has succeeded;
- ``create_new_trial`` / ``_create_new_trial``: a client token is written with the new
  trial in the same transaction; a retry that finds the token returns that trial;
- ``set_trial_state_values``: to a finished (or any non-RUNNING) state, a retry that finds
  the trial already in that state with the same values returns True; a claim
  (WAITING -> RUNNING) writes a client token with the state change, and a retry that
  finds the trial RUNNING returns whether the token is its own.

The tokens are system attributes hidden from every read (``without_tokens``), so Optuna
and users see each trial as they made it.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy
from optuna.trial import FrozenTrial

from hpo.settings import db_retry_seconds
from hpo.storage.transactions import in_one_transaction
from hpo.storage.urls import mask_url, safe_detail

logger = logging.getLogger(__name__)
T = TypeVar("T")

IDEMPOTENT_METHODS = (
    "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_best_trial", "record_heartbeat",
    "_get_stale_trial_ids", "_set_trial_param", "_get_best_trial_id", "count_trials",
    "waiting_trial_ids", "trial_states_since", "set_trial_user_attrs",
)  # fmt: skip
# Calls that return trials: retried like the above, and the tokens are taken out.
TRIAL_READS = ("get_trial", "_get_trials", "get_trial_system_attrs")
# Checked before repeating: each does its own retry (``ReconnectingRDBStorage``).
CHECKED_METHODS = (
    "create_new_study",
    "delete_study",
    "_create_new_trial",
    "set_trial_state_values",
)
# Every storage call a worker makes, including the private ones Optuna's cache layer calls
# on its backend (hpo.compat); each is retried across a lost connection. (``create_new_trial``
# calls ``_create_new_trial``; wrapping both would make a new token per outer attempt.)
RETRIED_METHODS = (*IDEMPOTENT_METHODS, *TRIAL_READS, *CHECKED_METHODS)
# System attributes hpo writes with a trial to recognise its own writes on a retry.
CREATE_TOKEN_ATTR = "hpo:create_token"
CLAIM_TOKEN_ATTR = "hpo:claim_token"
TOKEN_ATTRS = (CREATE_TOKEN_ATTR, CLAIM_TOKEN_ATTR)


def is_connection_error(error: BaseException | None) -> bool:
    """True for errors that a reconnect can fix: a lost or refused connection, a locked
    SQLite file. Optuna wraps some of them in ``StorageInternalError``; look at the causes."""
    while error is not None:
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        error = error.__cause__ or error.__context__
    return False


def retry_on_disconnect(function: Callable[[], T], *, what: str, url: str) -> T:
    """Call ``function``; while it fails for a lost connection, wait and call it again.

    Backoff doubles from 0.5 s to 10 s; gives up after ``$HPO_DB_RETRY_S`` seconds (300)
    and raises the last error. Messages name the storage with its password masked. Inside
    ``bound_to`` (one transaction) ``function`` is called once: its caller repeats the
    whole transaction.
    """
    if in_one_transaction():
        return function()  # the transaction is repeated as a whole, by its caller
    deadline = time.monotonic() + db_retry_seconds()
    delay = 0.5
    while True:
        try:
            return function()
        except Exception as error:
            if not is_connection_error(error) or time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "storage %s unreachable during %s (%s); retrying in %.1fs",
                mask_url(url),
                what,
                safe_detail(error, url),
                delay,
            )
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)


class Attempts:
    """Counts the calls of one retried operation: ``next`` is True from the second."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> bool:
        self.count += 1
        return self.count > 1


def without_tokens(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` without hpo's client tokens among its system attributes."""
    if any(key in trial.system_attrs for key in TOKEN_ATTRS):
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in TOKEN_ATTRS}
    return trial


def _retrying(cls: type, name: str) -> Callable[..., Any]:
    method = getattr(cls, name)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return retry_on_disconnect(
            lambda: method(self, *args, **kwargs), what=name.lstrip("_"), url=self.url
        )

    return wrapper


def _retrying_trial_read(cls: type, name: str) -> Callable[..., Any]:
    retrying = _retrying(cls, name)

    @functools.wraps(retrying)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = retrying(self, *args, **kwargs)
        if isinstance(result, FrozenTrial):
            return without_tokens(result)
        if isinstance(result, dict):  # get_trial_system_attrs
            return {k: v for k, v in result.items() if k not in TOKEN_ATTRS}
        return [without_tokens(trial) for trial in result]

    return wrapper


def retry_every_call(cls: type) -> type:
    """Class decorator: ``cls``'s idempotent calls and trial reads retried across a lost
    connection (``retry_on_disconnect``), trial reads without the tokens."""
    for name in IDEMPOTENT_METHODS:
        setattr(cls, name, _retrying(cls, name))
    for name in TRIAL_READS:
        setattr(cls, name, _retrying_trial_read(cls, name))
    return cls
