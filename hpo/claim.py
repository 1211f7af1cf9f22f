"""The claim: what a worker does next, a trial to run, ``"wait"`` or ``"done"``, decided
in one place (``claim_trial``).

How workers on any number of nodes share a study without losing or over-running trials:

- ``total_trials`` is a study-wide total of finished trials (COMPLETE + PRUNED + FAIL). A
  worker starts a trial only under the study lock (``hpo.storage.study_lock``) and only if
  finished + running < total, so N workers stop at exactly N. When the budget is all handed
  out but trials still run elsewhere, the answer is ``"wait"``: one of those might die and
  come back as a retry. ``"done"``: the budget is spent and nothing runs.
- A trial whose worker vanished (no heartbeat for the grace period) is failed by the next
  claim, and re-queued with the same parameters and intermediate values; the failed trial
  no longer counts, its retry takes its place.
- A re-queued or enqueued (WAITING) trial is claimed before a new one is made; a study
  that keeps every batch size covered queues another trial for a batch size left without
  a complete result; a grid study is done once every grid point has a trial.
- Once no more room is left in the budget than the replicates need (``hpo.replicates``),
  the claim queues them, once per study, under the lock: the best configuration of the
  top two batch sizes again with other seeds. The one-message claim makes search trials
  only up to that point, so the decision is always taken here.
- The common case on PostgreSQL is one message (``hpo.storage.one_message``): a new trial
  when nothing is stale or waiting and the budget has room. Only when that says no does
  the claim take the long way, under ``study_lock``.
- A commit whose acknowledgement was lost may still have landed: the claim's token,
  written with its trial, tells, so a repeated claim never leaves the first one's trial
  RUNNING without a worker.

The ``optuna.Trial`` is built after the lock is released: its trial already holds its slot
of the budget, and sampling happens later anyway, at ``suggest_*`` (Optuna samples lazily,
relative parameters included). A grid trial is built under the lock:
``GridSampler.before_trial`` picks its grid point there, and two workers must not pick the
same one.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
import warnings
from collections.abc import Iterator
from typing import Literal

import optuna
from optuna.trial import TrialState

from hpo import compat
from hpo.caps import BatchSizeCapSampler
from hpo.replicates import (
    REPLICATE_OF_ATTR,
    REPLICATES_ATTR,
    plan_replicates,
    replicate_trials,
)
from hpo.settings import kill_point
from hpo.space import (
    COVER_ATTEMPT_ATTR,
    COVER_ATTR,
    COVER_VALUE,
    coverage_may_need,
    coverage_retries,
)
from hpo.storage import (
    AtOnceCounts,
    NoTrialAtOnce,
    is_connection_error,
    retry_on_disconnect,
    study_lock,
)
from hpo.study import FINISHED_STATES, Budget, LoadedStudy

logger = logging.getLogger(__name__)

Answer = Literal["wait", "done"]


def claim_trial(loaded: LoadedStudy, total_trials: int) -> optuna.Trial | Answer:
    """A trial this worker now runs (RUNNING in the study, with its first heartbeat), or
    ``"wait"`` (the budget is handed out, trials still run elsewhere: ask again later), or
    ``"done"``. Repeated across a lost connection (``retry_on_disconnect``)."""
    return retry_on_disconnect(
        lambda: _claim_once(loaded, total_trials), what="claim", url=loaded.storage.url
    )


def _claim_once(loaded: LoadedStudy, total_trials: int) -> optuna.Trial | Answer:
    """One claim: the one-message way where it can answer, else the long way. A lost
    connection is raised, after the claim's token says its commit did not land."""
    study = loaded.study
    grid = _grid_sampler(study) is not None
    token = uuid.uuid4().hex
    try:
        at_once = None if grid else _new_trial_at_once(loaded, total_trials, token)
        if at_once is not None:
            return at_once
    except Exception as error:
        if not is_connection_error(error):
            raise
        found = _landed(loaded, token, error)
        kill_point("claimed")
        return _build_trial(study, found, was_queued=True)
    stale = loaded.storage.has_stale_trials(loaded.ref.study_id)
    if not stale and _budget_is_handed_out(loaded, total_trials):
        return "wait"
    try:
        claimed = _claim_the_long_way(loaded, total_trials, token, stale, grid)
    except Exception as error:
        if not is_connection_error(error):
            raise
        claimed = (_landed(loaded, token, error), True)  # a grid trial's point is stored
    if isinstance(claimed, str):
        return claimed
    kill_point("claimed")  # tests only: RUNNING in storage, nothing else done yet
    return _build_trial(study, *claimed) if isinstance(claimed, tuple) else claimed


def _claim_the_long_way(
    loaded: LoadedStudy, total_trials: int, token: str, stale: bool, grid: bool
) -> optuna.Trial | tuple[int, bool] | Answer:
    """Under the study lock, only what must be serial: fail trials whose worker vanished
    (which re-queues them), count the budget, queue another trial for a batch size left
    uncovered and, once the search is nearly spent, the replicates, then make a trial
    RUNNING: a re-queued or enqueued one if there is one, else a new one. On PostgreSQL
    and MariaDB all of it is one transaction. Returns the answer, the grid trial (built
    under the lock), or the trial id and whether it was queued."""
    study = loaded.study
    with study_lock(loaded.storage, study.study_name), quiet_optuna_warnings():
        if stale:  # else a trial gone stale since is failed by the next claim
            optuna.storages.fail_stale_trials(study)
        budget = study_budget_counted(loaded)
        if budget.finished + budget.running >= total_trials:
            return "wait" if budget.running else "done"
        if budget.waiting == 0 and grid_exhausted(study):
            return "wait" if budget.running else "done"
        room = total_trials - budget.finished - budget.running - budget.waiting
        queued = keep_batch_sizes_covered(loaded, room)
        for batch_size in queued:
            logger.info("batch size %d has no complete trial: queued another", batch_size)
        replicates = queue_replicates(loaded, total_trials, room - len(queued), budget)
        if replicates == "wait":
            return "wait"
        with loaded.storage.claiming(token):
            # RUNNING with its first heartbeat (and a retry with clean attrs) in one
            # transaction: a worker killed from here on still gets its trial retried.
            trial_id = None
            if budget.waiting or queued or replicates:
                trial_id = _claim_waiting_trial(loaded)
            was_queued = trial_id is not None
            if trial_id is None:
                trial_id = compat.study_storage(study).create_new_trial(loaded.ref.study_id)
        if grid:
            return _build_trial(study, trial_id, was_queued)
    return trial_id, was_queued


def _new_trial_at_once(
    loaded: LoadedStudy, total_trials: int, token: str
) -> optuna.Trial | Answer | None:
    """A new RUNNING trial made in one round trip, or the claim's answer ("wait", "done")
    from the same round trip, or None where the claim must take the long way. In a study
    that keeps its batch sizes covered, only while its finished trials say no batch size
    can need another coverage trial (read before the claim: a need that arises meanwhile is
    queued, under the lock, by the next claim). Created through the study's cache layer,
    as ``Study.ask`` creates, so the cache knows the trial, and built inside ``at_once``,
    which hands ``optuna.Trial`` the claim's answer instead of a read of the trial."""
    if not loaded.storage.claims_at_once():
        return None
    if loaded.spec.sampler.cover_batch_sizes and coverage_may_need(
        loaded.spec, loaded.study.get_trials(deepcopy=False, states=FINISHED_STATES)
    ):
        return None  # keep_batch_sizes_covered decides, under the lock, in the long way
    storage = loaded.storage
    # The one message makes search trials only: the replicates' share of the budget is
    # decided (and queued) in the long way, under the lock.
    limit = total_trials - replicate_trials(loaded.spec, total_trials)
    try:
        with storage.claiming(token), storage.at_once(loaded.study.study_name, limit):
            trial_id = compat.study_storage(loaded.study).create_new_trial(loaded.ref.study_id)
            kill_point("claimed")  # tests only: RUNNING in storage, nothing else done yet
            return _build_trial(loaded.study, trial_id, was_queued=False)
    except NoTrialAtOnce as no_trial:
        return _answer_at_once(no_trial.counts, total_trials)


def _answer_at_once(counts: AtOnceCounts | None, total_trials: int) -> Answer | None:
    """The claim's answer from what a one-message claim that made no trial counted, or
    None where only the long way can answer: a trial is stale or waiting (it must be
    failed or claimed under the lock), or no message was sent."""
    if counts is None or counts.stale or counts.finished + counts.running < total_trials:
        return None
    if counts.running:
        return "wait"
    return "done" if counts.locked else None


def prepare_to_claim(loaded: LoadedStudy, total_trials: int) -> None:
    """Compile the one-message claim before the first claim, where one will be tried."""
    if loaded.storage.claims_at_once() and _grid_sampler(loaded.study) is None:
        limit = total_trials - replicate_trials(loaded.spec, total_trials)
        loaded.storage.prepare_claims(loaded.ref.study_id, loaded.study.study_name, limit)


def _landed(loaded: LoadedStudy, token: str, error: Exception) -> int:
    """After a claim whose connection was lost (``error``): the id of the trial its commit
    made RUNNING, found by its token; ``error`` raised again when nothing landed (the
    caller claims again)."""
    found = retry_on_disconnect(
        lambda: loaded.storage.trial_claimed_with(loaded.ref.study_id, token),
        what="claim",
        url=loaded.storage.url,
    )
    if found is None:
        raise error
    logger.warning("the claim's commit landed though its connection was lost: trial kept")
    return found


def study_budget_counted(loaded: LoadedStudy) -> Budget:
    """``hpo.study.study_budget`` counted by the database (two aggregate queries, whatever
    the number of trials), for the claim under the study lock. Assumes what hpo and
    Optuna's retry callbacks guarantee: only FAIL trials are re-queued."""
    counts = loaded.storage.count_trials(loaded.ref.study_id)
    return Budget(
        finished=sum(counts[state] for state in FINISHED_STATES) - counts.requeued,
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
    )


def _budget_is_handed_out(loaded: LoadedStudy, total_trials: int) -> bool:
    """True when a claim could only answer ``"wait"``, known without the study lock: the
    budget is handed out and trials still run elsewhere (the caller has checked that none
    of them is stale). Near the end of a study every worker that finishes a trial asks,
    and waiting for the lock only to learn this kept the lock, and behind PgBouncer its
    server connections, busy. ``"done"`` is always decided under the lock: a trial being
    re-queued at that moment must not be missed."""
    budget = study_budget_counted(loaded)
    return budget.finished + budget.running >= total_trials and budget.running > 0


def _claim_waiting_trial(loaded: LoadedStudy) -> int | None:
    """Make the first WAITING (enqueued or re-queued) trial that no other worker claimed
    first RUNNING: its id, or None. ``Study.ask``'s first half, which finds the waiting
    trials through Optuna's cache layer, i.e. after re-reading every unfinished trial of
    the study; here that is one query."""
    storage = loaded.storage
    for trial_id in storage.waiting_trial_ids(loaded.ref.study_id):
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished by another process meanwhile, as in Study.ask
    return None


def keep_batch_sizes_covered(loaded: LoadedStudy, room: int) -> list[int]:
    """With ``sampler.cover_batch_sizes``, queue another trial at each batch size whose
    coverage trials all ended without a complete result (``hpo.space.coverage_retries``:
    a lower LR, at most ``COVER_RETRIES`` per batch size, at most ``room`` in all).
    Returns the batch sizes queued for.

    The caller must hold the study lock: the decision reads the trials and queues in one
    step, so of several workers claiming at once exactly one queues for a need, and the
    others see its WAITING trial.
    """
    spec = loaded.spec
    if not spec.sampler.cover_batch_sizes or spec.sampler.kind == "grid":
        return []
    finished = loaded.study.get_trials(deepcopy=False, states=FINISHED_STATES)
    if not coverage_may_need(spec, finished):  # read without the RUNNING trials
        return []
    trials = loaded.study.get_trials(deepcopy=False)
    queued = []
    for params, attempt in coverage_retries(spec, trials, room):
        loaded.study.enqueue_trial(
            params, user_attrs={COVER_ATTR: COVER_VALUE, COVER_ATTEMPT_ATTR: attempt}
        )
        queued.append(2 ** int(params["log2_batch_size"]))
    return queued


def queue_replicates(
    loaded: LoadedStudy, total_trials: int, room: int, budget: Budget
) -> int | Answer:
    """Once the budget has no more ``room`` than the replicates need
    (``hpo.replicates.replicate_trials``), queue them, once per study: the number queued
    (0 when it is not time, or already done), or ``"wait"`` while the top two batch sizes
    are not known yet and trials that may tell still run. The caller holds the study lock;
    the decision (what was queued, or why nothing) is stored on the study with the queued
    trials, so exactly one claim of any number of workers queues them."""
    reserve = replicate_trials(loaded.spec, total_trials)
    if reserve == 0 or room > reserve:
        return 0
    if REPLICATES_ATTR in loaded.ref.user_attrs():
        return 0
    complete = loaded.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximize = loaded.study.direction == optuna.study.StudyDirection.MAXIMIZE
    plan = plan_replicates(loaded.spec, complete, maximize, room)
    if not plan and room > 0 and budget.running and not budget.waiting:
        return "wait"  # a running trial may complete a second batch size
    for params, attrs in plan:
        loaded.study.enqueue_trial(params, user_attrs=attrs)
    note: dict[str, object] = {"queued": [attrs[REPLICATE_OF_ATTR] for _, attrs in plan]}
    if not plan:
        note["reason"] = (
            "fewer than two batch sizes had a complete trial when the search was nearly spent"
            if room > 0
            else "no room was left in the budget"
        )
    loaded.ref.set_user_attr(REPLICATES_ATTR, note)
    if plan:
        logger.info("queued %d replicate trials of trials %s", len(plan), note["queued"])
    return len(plan)


def _build_trial(study: optuna.Study, trial_id: int, was_queued: bool) -> optuna.Trial:
    """``optuna.Trial`` for a trial this worker made RUNNING (the rest of ``Study.ask``).
    A queued trial was created by another process: the study's cache layer, which
    ``suggest_*`` writes through, learns of it by reading the study's trials first (a new
    trial was created through the cache, which knows it)."""
    compat.forget_cached_trials(study)  # as Study.ask: sample from the study as it is now
    if was_queued:
        study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return optuna.Trial(study, trial_id)


def _grid_sampler(study: optuna.Study) -> optuna.samplers.GridSampler | None:
    sampler = study.sampler
    if isinstance(sampler, BatchSizeCapSampler):
        sampler = sampler.base
    return sampler if isinstance(sampler, optuna.samplers.GridSampler) else None


def grid_exhausted(study: optuna.Study) -> bool:
    """True for a grid study whose every grid point has a trial, finished or RUNNING: no
    new trial is made then, even if ``total_trials`` is larger (the claim waits while one
    runs; a failed one's retry is queued and claimed as such).

    Not ``GridSampler.is_exhausted``: when every point left is RUNNING it counts them as
    free again, so a second worker would train a point the first is training."""
    sampler = _grid_sampler(study)
    if sampler is None:
        return False
    states = (*[s for s in TrialState if s.is_finished()], TrialState.RUNNING)
    taken = {t.system_attrs.get("grid_id") for t in study.get_trials(deepcopy=False, states=states)}
    return taken >= set(range(compat.grid_point_count(sampler)))


@contextlib.contextmanager
def quiet_optuna_warnings() -> Iterator[None]:
    """Optuna warns that heartbeats are experimental on every stale-trial check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield
