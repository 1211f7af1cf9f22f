"""Re-queueing a failed trial: a retry starts with a clean slate of outcome attributes.

Optuna's ``RetryHeartbeatStaleTrialCallback`` copies *every* user attribute of the failed
trial to its retry. A retry would then inherit ``fail_reason`` ("worker stopped
(SIGINT)"), the predecessor's metrics and its worker name: a retry that completes would
still read as failed, and one that fails for a new reason would hide it (``run_one``
records a reason only when the objective set none). ``RetryWithCleanAttrs`` is that
callback with only the attributes that describe the trial's *parameters* copied; the
predecessor's reason is kept under ``retried_because``, a name no outcome is read from.

Used by both places a trial is re-queued: the heartbeat check (``hpo.storage.opening``) and a
stop signal (``hpo.worker.requeue``).
"""

from __future__ import annotations

import copy

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

# User attrs that describe the parameters, not how a run went: the batch size the
# parameters mean and the value the cap clamped it from (hpo.space, hpo.caps), and why the
# trial was queued: a coverage trial's retry is that coverage trial, at the same attempt
# (hpo.space.COVER_ATTR, COVER_ATTEMPT_ATTR), so a stop signal uses up no attempt; a
# replicate's retry is that replicate, with its seed (hpo.replicates).
PARAMETER_ATTRS = frozenset(
    {"batch_size", "batch_size_clamped_from", "queued_by", "cover_attempt"}
    | {"replicate_of", "replicate_seed"}
)
RETRY_REASON_ATTR = "retried_because"


class RequeueTrial(RuntimeError):
    """A trial failure that is not the trial's fault (a rank of its data-parallel group
    died: ``hpo.distributed.RankFailed``): the worker fails it with this message as its
    reason and re-queues it to resume from its checkpoint, at most ``max_retry`` times
    along its retry lineage (a fault that comes back every time ends as FAIL)."""

    max_retry = 3


def retry_user_attrs(failed: FrozenTrial) -> dict[str, object]:
    """The user attrs a retry of ``failed`` starts with (its reason is ``failed``'s own
    ``fail_reason``, not an older one ``failed`` was retried for)."""
    attrs = {key: value for key, value in failed.user_attrs.items() if key != RETRY_REASON_ATTR}
    return clean_retry_attrs(attrs)


def clean_retry_attrs(attrs: dict[str, object]) -> dict[str, object]:
    """Of a retry's user attrs, the ones it may start with: the parameter attrs, and
    ``retried_because``: an inherited ``fail_reason`` (its predecessor's, the latest
    reason) when there is one, else the ``retried_because`` it has.

    Applied when a retry is queued (from its predecessor's attrs) and again when it is
    claimed (``hpo.storage.new_trials``, from its own), because a retry queued by an older hpo, or by
    Optuna's own callback, already holds everything its predecessor had.
    """
    clean = {key: value for key, value in attrs.items() if key in PARAMETER_ATTRS}
    reason = attrs.get("fail_reason")
    if reason is None:
        reason = attrs.get(RETRY_REASON_ATTR)
    if reason is not None:
        clean[RETRY_REASON_ATTR] = reason
    return clean


class RetryWithCleanAttrs(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback (same ``max_retry``, same intermediate values and retry
    lineage in system attrs), without the failed trial's outcome attributes."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        cleaned = copy.copy(trial)
        cleaned.user_attrs = retry_user_attrs(trial)
        super().__call__(study, cleaned)


def superseded_trials(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were re-queued: their retry counts in their place
    (a retry's ``retry_history`` ends with the trial it replaces)."""
    return {
        int(trial.system_attrs["retry_history"][-1])
        for trial in trials
        if trial.system_attrs.get("retry_history")
    }
