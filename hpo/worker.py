"""The worker: claim a trial under the study lock, train it with a heartbeat, tell the study.

How workers on any number of nodes share a study without losing or over-running trials:

- ``total_trials`` is a study-wide total of finished trials (COMPLETE + PRUNED + FAIL). A
  worker starts a trial only under the study lock (``hpo.storage.study_lock``) and only if
  finished + running < total, so N workers stop at exactly N. When the budget is all handed
  out but trials still run elsewhere, a worker waits instead of exiting: one of those might
  die and come back as a retry.
- A trial whose worker vanished (no heartbeat for the grace period) is failed by the next
  worker that claims, and re-queued with the same parameters and intermediate values. The
  failed trial no longer counts: its retry takes its place, and resumes from the last
  epoch checkpoint (``hpo.checkpoint``).
- SIGTERM/SIGINT interrupt the running trial at once; it is failed with
  ``fail_reason = "worker stopped (SIGTERM)"`` and re-queued the same way, then the
  worker exits.

``run_worker`` is the worker's main: it resolves the device once (a study that asks for a
GPU this node lacks stops here, before any trial), applies the process-wide device
settings, loads the data once, and loops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from hpo import compat
from hpo.caps import BatchSizeCapSampler
from hpo.retry import RetryWithCleanAttrs, superseded_trials
from hpo.settings import (
    THREADS_SOURCES,
    NodeSettings,
    check_cpu_count,
    heartbeat_settings,
    kill_point,
)
from hpo.space import coverage_may_need
from hpo.spec import StudySpec, check_data_root
from hpo.sqlite_guard import SQLiteFileGuard, SQLiteFileLost
from hpo.storage import (
    NoTrialAtOnce,
    ReconnectingRDBStorage,
    is_connection_error,
    retry_on_disconnect,
    study_lock,
)
from hpo.study import (
    CLASS_COUNTS_ATTR,
    FINISHED_STATES,
    LoadedStudy,
    Outcome,
    keep_batch_sizes_covered,
    load_study,
    original_trial_number,
    study_budget,
)

if TYPE_CHECKING:
    from hpo.data import PatchSet
    from hpo.device import DeviceSetup
    from hpo.objective import Objective, TrialProgress

logger = logging.getLogger(__name__)


class WorkerStopped(BaseException):
    """Raised inside a running trial by SIGTERM/SIGINT. A BaseException, so that no
    ``except Exception`` in the training code swallows it."""


@contextlib.contextmanager
def _quiet_optuna_warnings() -> Iterator[None]:
    """Optuna warns that heartbeats are experimental on every stale-trial check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def claim_trial(loaded: LoadedStudy, total_trials: int) -> optuna.Trial | str:
    """Start a trial if the study-wide budget allows: a trial, or ``"wait"``/``"done"``.

    Under the study lock, only what must be serial: fail trials whose worker vanished
    (which re-queues them), count the budget (``LoadedStudy.budget``: two aggregate
    queries), queue another trial for a batch size left uncovered
    (``keep_batch_sizes_covered``), then make a trial RUNNING: a re-queued or enqueued
    one if there is one, else a new one, if finished + running < total and, for a grid
    study, grid points are left. ``"wait"``: the budget is handed out but trials still
    run elsewhere. On PostgreSQL all of it is one transaction (``hpo.storage.study_lock``).

    First, on PostgreSQL, the common case in one round trip (``_new_trial_at_once``): a
    new trial when nothing is stale or waiting and the budget has room. Only when that
    says no does the claim take the long way above.

    The ``optuna.Trial`` is built after the lock is released: its trial already holds
    its slot of the budget, and sampling happens later anyway, at ``suggest_*`` (Optuna
    samples lazily, relative parameters included). A grid trial is built under the lock:
    ``GridSampler.before_trial`` picks its grid point there, and two workers must not
    pick the same one.

    A commit that fails for a lost connection may still have landed: the claim's token,
    written with its trial, tells (``ReconnectingRDBStorage.trial_claimed_with``), so a
    repeated claim never leaves the first one's trial RUNNING without a worker.
    """
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
        with study_lock(loaded.storage, study.study_name), _quiet_optuna_warnings():
            if stale:  # else a trial gone stale since is failed by the next claim
                optuna.storages.fail_stale_trials(study)
            budget = loaded.budget()
            if budget.finished + budget.running >= total_trials:
                return "wait" if budget.running else "done"
            if budget.waiting == 0 and grid_exhausted(study):
                return "wait" if budget.running else "done"
            room = total_trials - budget.finished - budget.running - budget.waiting
            queued = keep_batch_sizes_covered(loaded, room)
            for batch_size in queued:
                logger.info("batch size %d has no complete trial: queued another", batch_size)
            with loaded.storage.claiming(token):
                # RUNNING with its first heartbeat (and a retry with clean attrs) in one
                # transaction: a worker killed from here on still gets its trial retried.
                trial_id = None
                if budget.waiting or queued:
                    trial_id = loaded.storage.claim_waiting_trial(loaded.ref.study_id)
                was_queued = trial_id is not None
                if trial_id is None:
                    trial_id = compat.study_storage(study).create_new_trial(loaded.ref.study_id)
            if grid:
                trial = _build_trial(study, trial_id, was_queued)
    except Exception as error:
        if not is_connection_error(error):
            raise
        trial_id, was_queued, grid = _landed(loaded, token, error), True, False  # point stored
    kill_point("claimed")  # tests only: RUNNING in storage, nothing else done yet
    return trial if grid else _build_trial(study, trial_id, was_queued)


def _new_trial_at_once(
    loaded: LoadedStudy, total_trials: int, token: str
) -> optuna.Trial | str | None:
    """A new RUNNING trial made in one round trip, or the claim's answer
    ("wait", "done") from the same round trip, or None where the claim must take the
    long way (``ReconnectingRDBStorage.at_once``; ``claims_at_once`` says where it is
    not tried). In a study that keeps its batch sizes covered, only while its finished
    trials say no batch size can need another coverage trial (``coverage_may_need``,
    read before the claim: a need that arises meanwhile is queued, under the lock, by
    the next claim). Created through the study's cache layer, as ``Study.ask`` creates,
    so the cache knows the trial, and built inside ``at_once``, which hands
    ``optuna.Trial`` the claim's answer instead of a read of the trial."""
    if not loaded.storage.claims_at_once():
        return None
    if loaded.spec.sampler.cover_batch_sizes and coverage_may_need(
        loaded.spec, loaded.study.get_trials(deepcopy=False, states=FINISHED_STATES)
    ):
        return None  # keep_batch_sizes_covered decides, under the lock, in the long way
    storage = loaded.storage
    try:
        with storage.claiming(token), storage.at_once(loaded.study.study_name, total_trials):
            trial_id = compat.study_storage(loaded.study).create_new_trial(loaded.ref.study_id)
            kill_point("claimed")  # tests only: RUNNING in storage, nothing else done yet
            return _build_trial(loaded.study, trial_id, was_queued=False)
    except NoTrialAtOnce as no_trial:
        return no_trial.answer


def prepare_claims(loaded: LoadedStudy, total_trials: int) -> None:
    """Compile the one-message claim before the first claim, where one will be tried."""
    if loaded.storage.claims_at_once() and _grid_sampler(loaded.study) is None:
        loaded.storage.prepare_claims(loaded.ref.study_id, loaded.study.study_name, total_trials)


def _landed(loaded: LoadedStudy, token: str, error: Exception) -> int:
    """After a claim whose connection was lost (``error``): the id of the trial its
    commit made RUNNING, found by its token; ``error`` raised again when nothing landed
    (the caller claims again)."""
    found = retry_on_disconnect(
        lambda: loaded.storage.trial_claimed_with(loaded.ref.study_id, token),
        what="claim",
        url=loaded.storage.url,
    )
    if found is None:
        raise error
    logger.warning("the claim's commit landed though its connection was lost: trial kept")
    return found


def _budget_is_handed_out(loaded: LoadedStudy, total_trials: int) -> bool:
    """True when a claim could only answer ``"wait"``, known without the study lock: the
    budget is handed out and trials still run elsewhere (the caller has checked that none
    of them is stale: a stale one would be failed and re-queued under the lock). Near the
    end of a study every worker that finishes a trial asks, and waiting for the lock only
    to learn this kept the lock, and behind PgBouncer its server connections, busy.
    ``"done"`` is always decided under the lock: a trial being re-queued at that moment
    must not be missed."""
    budget = loaded.budget()
    return budget.finished + budget.running >= total_trials and budget.running > 0


def _build_trial(study: optuna.Study, trial_id: int, was_queued: bool) -> optuna.Trial:
    """``optuna.Trial`` for a trial this worker made RUNNING (the rest of ``Study.ask``).
    A queued trial was created by another process: the study's cache layer, which
    ``suggest_*`` writes through, learns of it by reading the study's trials first (a
    new trial was created through the cache, which knows it)."""
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
    """True for a grid study whose every grid point has a trial (a running one counts): the
    study is done even if ``total_trials`` is larger."""
    sampler = _grid_sampler(study)
    return sampler is not None and sampler.is_exhausted(study)


def requeue(loaded: LoadedStudy, trial: optuna.Trial, reason: str) -> None:
    """Fail ``trial`` and queue a retry with its params and intermediate values (the same
    thing the heartbeat check does for a vanished worker). Under the study lock, so no
    other worker sees the trial failed but not yet re-queued and stops early.

    On PostgreSQL and MariaDB all of it is one transaction (``study_lock``), repeated as a
    whole after a lost connection; a repeat first looks at what the lost attempt did (its
    COMMIT may have landed), so the trial gets one retry, never two."""
    study = loaded.study
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        with study_lock(loaded.storage, study.study_name), _quiet_optuna_warnings():
            stored = loaded.storage.get_trial(loaded.trial_id(trial)) if attempts > 1 else None
            if stored is not None and stored.state.is_finished():
                frozen = stored  # an earlier attempt told it
                trials = study.get_trials(deepcopy=False)
                if frozen.state != TrialState.FAIL or frozen.number in superseded_trials(trials):
                    return  # ... and re-queued it, or it ended otherwise
            else:
                trial.set_user_attr("fail_reason", reason)
                frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if frozen.state == TrialState.FAIL:
                RetryWithCleanAttrs(inherit_intermediate_values=True)(study, frozen)

    retry_on_disconnect(attempt, what="re-queue", url=loaded.storage.url)


class Heartbeat:
    """Records the running trial's heartbeat every interval in a daemon thread.

    Optuna's own heartbeat thread dies at the first database error; this one keeps trying,
    so a database restart shorter than the grace period does not fail the trial. With a
    ``guard`` (a SQLite study file) it first checks the file is still the one the worker
    opened; if not, ``on_lost`` stops the worker (``StopSignal.abort``) and it beats no more.
    """

    def __init__(
        self,
        storage: ReconnectingRDBStorage,
        trial_id: int,
        interval: float,
        guard: SQLiteFileGuard | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.guard, self.on_lost = guard, on_lost
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="hpo-heartbeat")

    def _beat(self) -> None:
        # The claim recorded the trial's first heartbeat with the trial (every claim path,
        # hpo.storage), so this thread's first beat comes an interval after it starts.
        # Beating at once as well only took a second database connection, opened for the
        # moment and closed again (the pool keeps one), while the trial's first
        # ``suggest_*`` held the other: at every trial start.
        beat = False
        while True:
            problem = self.guard.problem() if self.guard is not None else None
            if problem is not None:
                if self.on_lost is not None:
                    self.on_lost(problem)
                return
            if beat:
                try:
                    # One try per interval, never a long blocking retry.
                    self.storage.record_heartbeat_once(self.trial_id)
                except Exception as error:
                    logger.warning("heartbeat for trial id %s not recorded: %s", self.trial_id,
                                   type(error).__name__)  # fmt: skip
            beat = True
            if self.stopped.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class StopSignal:
    """SIGTERM/SIGINT: stop starting trials, and interrupt the running one right away.

    ``abort(reason)`` (from another thread: the heartbeat) stops the worker at once with
    ``SQLiteFileLost``: the main thread gets SIGUSR1, whose handler raises it.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.aborted: str | None = None
        self._interruptible = False
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                signal.signal(number, self._handle)
            signal.signal(signal.SIGUSR1, self._handle_abort)
            self._installed = True

    def abort(self, reason: str) -> None:
        self.aborted = reason
        logger.error("%s", reason)
        if self._installed:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    def _handle_abort(self, number: int, frame: FrameType | None) -> None:
        if self.aborted is not None:
            raise SQLiteFileLost(self.aborted)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(number).name
        if self._interruptible:
            self._interruptible = False
            raise WorkerStopped(self.requested)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.requested:
            raise WorkerStopped(self.requested)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.requested and not self.aborted and time.monotonic() < deadline:
            time.sleep(min(0.25, deadline - time.monotonic()))


@dataclass
class WorkerRun:
    """What one worker did: how its trials ended, and whether a signal stopped it."""

    states: Counter[str] = field(default_factory=Counter)
    fail_reasons: Counter[str] = field(default_factory=Counter)
    stopped_by: str | None = None
    failed_saves: int = 0  # epoch checkpoints that could not be written (trials went on)

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.states, self.fail_reasons)

    @property
    def exit_code(self) -> int:
        """128 + the signal after SIGTERM/SIGINT; 1 when trials ran and none finished
        COMPLETE or PRUNED; else 0."""
        if self.stopped_by:
            return 128 + signal.Signals[self.stopped_by].value
        return 0 if self.outcome.achieved_anything else 1


def remove_finished_checkpoints(study: optuna.Study, root: Path) -> list[Path]:
    """Delete the checkpoints of finished trials, except the best trial's. A checkpoint is
    kept while any trial of its retry chain is RUNNING or WAITING (a vanished trial is
    still RUNNING until its grace period ends). Returns what went."""
    from hpo.checkpoint import list_trial_dirs, remove_checkpoints_except

    listed = list_trial_dirs(root)  # before the trials are read: a new trial is kept
    if not listed:
        return []
    trials = study.get_trials(deepcopy=False)
    unfinished = (TrialState.RUNNING, TrialState.WAITING)
    keep = {original_trial_number(t) for t in trials if t.state in unfinished}
    if any(t.state == TrialState.COMPLETE for t in trials):
        keep.add(original_trial_number(study.best_trial))
    return remove_checkpoints_except(listed, keep)


def run_one(
    loaded: LoadedStudy,
    trial: optuna.Trial,
    objective: Objective,
    stop: StopSignal,
    guard: SQLiteFileGuard | None = None,
) -> tuple[TrialState, str | None]:
    """Train ``trial`` with a heartbeat, and tell the study how it ended: the one place that
    decides a trial's end state. Returns it (WAITING: re-queued after a stop signal) and
    its fail reason."""
    study = loaded.study
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    value, state = None, TrialState.FAIL
    interval, _ = heartbeat_settings()
    try:
        beat = Heartbeat(loaded.storage, loaded.trial_id(trial), interval, guard, stop.abort)
        with beat, stop.interruptible():
            value = objective(trial)
            state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except WorkerStopped as stopped:
        requeue(loaded, trial, f"worker stopped ({stopped})")
        logger.warning("trial %d re-queued: worker stopped (%s)", trial.number, stopped)
        objective.progress.ended(trial.number, "WAITING", None, f"worker stopped ({stopped})")
        return TrialState.WAITING, None
    except Exception as error:
        logger.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
        if "fail_reason" not in trial.user_attrs:
            trial.set_user_attr("fail_reason", f"error: {type(error).__name__}: {error}"[:500])
    kill_point("tell")  # tests only: trained, not yet told
    retry_on_disconnect(
        lambda: study.tell(trial, value if state == TrialState.COMPLETE else None, state=state,
                           skip_if_finished=True),
        what="tell", url=loaded.storage.url,
    )  # fmt: skip
    kill_point("told")  # tests only: told, its checkpoints not yet cleaned up
    reason = trial.user_attrs.get("fail_reason") if state != TrialState.COMPLETE else None
    objective.progress.ended(trial.number, state.name, value, reason)
    if objective.checkpoint_root is not None:
        remove_finished_checkpoints(study, objective.checkpoint_root)
    return state, reason if state == TrialState.FAIL else None


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None = None,
    progress: TrialProgress | None = None,
    parallel: bool = False,
    local_spec: StudySpec | None = None,
    node: NodeSettings | None = None,
    splits: tuple[PatchSet, PatchSet] | None = None,
) -> WorkerRun:
    """Run trials until the study holds ``total_trials`` finished trials or time runs out.

    ``total_trials`` is study-wide (see the module docstring), so several workers on any
    number of nodes together finish exactly that many. ``timeout_s`` stops starting new
    trials after that many seconds. Raises DeviceUnavailable / DataError before any trial
    when this node cannot run the study, and CheckpointDirError when the checkpoint
    directory is a file, read-only or cannot be created. ``splits``: the data already
    loaded and checked by the caller (``hpo launch`` checks it before creating the study,
    and its in-process worker trains on the same tensors instead of reading them twice).
    """
    # Imported here: the claim / heartbeat / tell loop above needs no torch, so a simulated
    # worker (benchmarks/storage_scale.py) stays a small process.
    from hpo.device import start_on_this_node

    loaded = load_study(study_name, storage_url, parallel=parallel, local_spec=local_spec)
    spec = loaded.spec.on_node(node or NodeSettings())
    guard = SQLiteFileGuard.attach(loaded.storage)
    setup = start_on_this_node(spec.training)
    loaded.keep_batch_sizes_within_cap(setup.name)
    if parallel:
        # Same seed in every worker would make them all propose the same first points.
        loaded.study.sampler.reseed_rng()
    result = WorkerRun()
    budget = study_budget(loaded.study)
    if budget.finished >= total_trials and not budget.running:
        return result
    objective = _objective_on_this_node(loaded, spec, setup, progress, splits)
    prepare_claims(loaded, total_trials)
    stop = StopSignal()
    stop.install()
    started = time.monotonic()
    while not stop.requested:
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            break
        if guard is not None:
            guard.check()
        claimed = retry_on_disconnect(
            lambda: claim_trial(loaded, total_trials), what="claim", url=storage_url
        )
        if claimed == "done":
            break
        if claimed == "wait":
            stop.sleep(wait_before_claiming_again())
            continue
        state, reason = run_one(loaded, claimed, objective, stop, guard)
        result.states[state.name] += 1
        if reason is not None:
            result.fail_reasons[reason] += 1
    if stop.requested:
        logger.warning("worker stopped by %s", stop.requested)
        result.stopped_by = stop.requested
    _log_failed_saves(result, objective.failed_saves)
    return result


def wait_before_claiming_again() -> float:
    """Seconds a worker told "wait" sleeps before it claims again: a heartbeat interval
    (a trial re-queued is found no sooner), at most 5 s, spread over half of that to all
    of it, so that a fleet whose trials ended together does not ask again in step."""
    return min(5.0, heartbeat_settings()[0]) * random.uniform(0.5, 1.0)


def _objective_on_this_node(
    loaded: LoadedStudy,
    spec: StudySpec,
    setup: DeviceSetup,
    progress: TrialProgress | None,
    splits: tuple[PatchSet, PatchSet] | None = None,
) -> Objective:
    """Everything a trial needs from this node, checked before the first claim (exit 2 for
    a missing data root, an unusable checkpoint directory, too many threads, a model or
    factory this node cannot build, data that cannot be trained on: ``hpo.datacheck``),
    with the data loaded once."""
    from hpo.checkpoint import check_checkpoint_dir, checkpoint_root
    from hpo.data import class_counts, num_classes, study_splits
    from hpo.models import check_model
    from hpo.objective import Objective, SilentProgress

    check_data_root(spec, source=f"study {loaded.name!r} on this node")
    check_checkpoint_dir(checkpoint_root(spec))
    check_cpu_count(spec.training.num_threads, THREADS_SOURCES)
    splits = study_splits(spec) if splits is None else splits
    counts = class_counts(spec.dataset, splits)
    loaded.ref.set_user_attr(CLASS_COUNTS_ATTR, counts)  # the same from every node
    check_model(
        spec.model, image_size=spec.dataset.image_size, num_classes=num_classes(spec.dataset)
    )
    return Objective(
        spec, setup, splits, loaded.ref, checkpoint_root(spec), progress or SilentProgress()
    )


def _log_failed_saves(result: WorkerRun, failed_saves: int) -> None:
    result.failed_saves = failed_saves
    if failed_saves:
        logger.warning(
            "worker summary: %d checkpoint save(s) failed (see the warnings above); those "
            "trials kept training and their results, but would have resumed from an older "
            "epoch after a crash", failed_saves,
        )  # fmt: skip
