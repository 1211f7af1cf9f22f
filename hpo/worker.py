"""The worker: claim → run → tell → repeat, until the study's budget is spent.

- **claim**: ``hpo.claim.claim_trial`` decides, in one call, the trial this worker runs
  next, or ``"wait"`` (trials still run elsewhere and one may come back as a retry), or
  ``"done"``; ``total_trials`` is a study-wide total, so N workers stop at exactly N.
- **run**: the trial trains with a heartbeat thread beating for it (``Heartbeat``); a
  worker that vanishes stops beating, and the next claim anywhere fails the trial and
  re-queues it, to resume from its last epoch checkpoint (``hpo.checkpoint``).
- **tell**: ``run_one`` is the one place that decides a trial's end state. SIGTERM/SIGINT
  interrupt the running trial at once; it is failed with ``fail_reason = "worker stopped
  (SIGTERM)"`` and re-queued (``requeue``), then the worker exits.

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
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from hpo.claim import claim_trial, prepare_to_claim, quiet_optuna_warnings
from hpo.retry import RequeueTrial, RetryWithCleanAttrs, superseded_trials
from hpo.settings import (
    THREADS_SOURCES,
    NodeSettings,
    check_cpu_count,
    heartbeat_settings,
    kill_point,
)
from hpo.spec import StudySpec, check_data_root
from hpo.sqlite_guard import SQLiteFileGuard, SQLiteFileLost
from hpo.storage import ReconnectingRDBStorage, retry_on_disconnect, study_lock
from hpo.study import (
    CLASS_COUNTS_ATTR,
    LoadedStudy,
    Outcome,
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


def requeue(
    loaded: LoadedStudy, trial: optuna.Trial, reason: str, max_retry: int | None = None
) -> None:
    """Fail ``trial`` and queue a retry with its params and intermediate values (the same
    thing the heartbeat check does for a vanished worker). Under the study lock, so no
    other worker sees the trial failed but not yet re-queued and stops early.

    On PostgreSQL and MariaDB all of it is one transaction (``study_lock``), repeated as a
    whole after a lost connection; a repeat first looks at what the lost attempt did (its
    COMMIT may have landed), so the trial gets one retry, never two. ``max_retry``: no
    retry once the trial's lineage holds that many (None: always one)."""
    study = loaded.study
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        with study_lock(loaded.storage, study.study_name), quiet_optuna_warnings():
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
                RetryWithCleanAttrs(max_retry, inherit_intermediate_values=True)(study, frozen)

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
        # hpo.claim), so this thread's first beat comes an interval after it starts.
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
    value, state = None, TrialState.FAIL
    interval, _ = heartbeat_settings()
    try:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        beat = Heartbeat(loaded.storage, loaded.trial_id(trial), interval, guard, stop.abort)
        with beat, stop.interruptible():
            value = objective(trial)
            state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except UpdateFinishedTrialError:
        return _finished_elsewhere(loaded, trial, objective)
    except WorkerStopped as stopped:
        return _requeued(loaded, trial, objective, f"worker stopped ({stopped})", None)
    except RequeueTrial as failed:
        return _requeued(loaded, trial, objective, str(failed)[:500], failed.max_retry)
    except Exception as error:
        logger.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
        if "fail_reason" not in trial.user_attrs:
            with contextlib.suppress(UpdateFinishedTrialError):
                trial.set_user_attr("fail_reason", f"error: {type(error).__name__}: {error}"[:500])
    kill_point("tell")  # tests only: trained, not yet told
    retry_on_disconnect(
        lambda: study.tell(trial, value if state == TrialState.COMPLETE else None, state=state,
                           skip_if_finished=True),
        what="tell", url=loaded.storage.url,
    )  # fmt: skip
    kill_point("told")  # tests only: told, its checkpoints not yet cleaned up
    reason = trial.user_attrs.get("fail_reason") if state != TrialState.COMPLETE else None
    if objective.tracker is not None:
        ended = {
            "value": value,
            "fail_reason": reason,
            "b_simple": trial.user_attrs.get("b_simple"),
        }
        objective.tracker.trial_ended(trial.number, state.name, ended)
    objective.progress.ended(trial.number, state.name, value, reason)
    if objective.checkpoint_root is not None:
        remove_finished_checkpoints(study, objective.checkpoint_root)
    return state, reason if state == TrialState.FAIL else None


def _requeued(
    loaded: LoadedStudy,
    trial: optuna.Trial,
    objective: Objective,
    reason: str,
    max_retry: int | None,
) -> tuple[TrialState, str | None]:
    """Fail ``trial`` with ``reason`` and queue its retry (``requeue``). Returns WAITING
    after a stop signal (``max_retry`` None), else FAIL and the reason."""
    requeue(loaded, trial, reason, max_retry)
    logger.warning("trial %d re-queued: %s", trial.number, reason)
    if max_retry is None:
        objective.progress.ended(trial.number, "WAITING", None, reason)
        return TrialState.WAITING, None
    objective.progress.ended(trial.number, "FAIL", None, reason)
    return TrialState.FAIL, reason


def _finished_elsewhere(
    loaded: LoadedStudy, trial: optuna.Trial, objective: Objective
) -> tuple[TrialState, str | None]:
    """The trial was finished behind this worker's back (told from the dashboard, or by
    an operator's script): its stored end stands; log it and move on to the next claim."""
    stored = loaded.storage.get_trial(loaded.trial_id(trial))
    logger.warning(
        "trial %d was finished outside this worker (%s, value %s); moving on",
        trial.number, stored.state.name, stored.value,
    )  # fmt: skip
    objective.progress.ended(trial.number, stored.state.name, stored.value, None)
    return stored.state, None


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
    from hpo.distributed import check_devices_per_trial

    loaded = load_study(study_name, storage_url, parallel=parallel, local_spec=local_spec)
    spec = loaded.spec.on_node(node or NodeSettings())
    guard = SQLiteFileGuard.attach(loaded.storage)
    setup = start_on_this_node(spec.training)
    check_devices_per_trial(spec.training, setup)
    loaded.keep_batch_sizes_within_cap(setup.name)
    if parallel:
        # Same seed in every worker would make them all propose the same first points.
        loaded.study.sampler.reseed_rng()
    result = WorkerRun()
    budget = study_budget(loaded.study)
    if budget.finished >= total_trials and not budget.running:
        return result
    objective = _objective_on_this_node(loaded, spec, setup, progress, splits)
    prepare_to_claim(loaded, total_trials)
    try:
        _claim_run_tell(loaded, objective, total_trials, timeout_s, guard, result)
    finally:
        if objective.tracker is not None:
            objective.tracker.close()
    _log_failed_saves(result, objective.failed_saves)
    return result


def _claim_run_tell(
    loaded: LoadedStudy,
    objective: Objective,
    total_trials: int,
    timeout_s: float | None,
    guard: SQLiteFileGuard | None,
    result: WorkerRun,
) -> None:
    """The worker's loop: claim → run → tell → repeat, until the claim says "done", time
    runs out (no trial is started after ``timeout_s``) or a signal stops the worker."""
    stop = StopSignal()
    stop.install()
    started = idle_since = time.monotonic()
    while not stop.requested:
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            break
        if guard is not None:
            guard.check()
        claimed = claim_trial(loaded, total_trials)
        if claimed == "done":
            break
        if claimed == "wait":
            stop.sleep(wait_before_claiming_again())
            continue
        # The device waited from the last trial's end to this claim: this trial's idle time.
        objective.idle_seconds = time.monotonic() - idle_since
        state, reason = run_one(loaded, claimed, objective, stop, guard)
        idle_since = time.monotonic()
        result.states[state.name] += 1
        if reason is not None:
            result.fail_reasons[reason] += 1
    if stop.requested:
        logger.warning("worker stopped by %s", stop.requested)
        result.stopped_by = stop.requested


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
    a missing data root, an unusable checkpoint directory, too many threads, a trainer
    module this node cannot import, a model or factory this node cannot build, data that
    cannot be trained on: ``hpo.datacheck``), with the data loaded once."""
    from hpo.checkpoint import check_checkpoint_dir, checkpoint_root
    from hpo.context import load_trainer
    from hpo.objective import Objective, SilentProgress
    from hpo.tracking import make_tracker

    check_data_root(spec, source=f"study {loaded.name!r} on this node")
    check_checkpoint_dir(checkpoint_root(spec))
    check_cpu_count(spec.training.num_threads, THREADS_SOURCES)
    progress = progress or SilentProgress()
    root = checkpoint_root(spec)
    tracker = make_tracker(spec.tracking.mlflow, spec.name)
    if spec.trainer.function is not None:  # the user's trainer loads its own data
        trainer = load_trainer(spec.trainer.function)
        return Objective(spec, setup, None, loaded.ref, root, progress, trainer, tracker)
    from hpo.data import class_counts, num_classes, study_splits
    from hpo.models import check_model

    assert spec.dataset is not None and spec.model is not None  # the spec's own check
    splits = study_splits(spec) if splits is None else splits
    counts = class_counts(spec.dataset, splits)
    loaded.ref.set_user_attr(CLASS_COUNTS_ATTR, counts)  # the same from every node
    check_model(
        spec.model, image_size=spec.dataset.image_size, num_classes=num_classes(spec.dataset)
    )
    return Objective(spec, setup, splits, loaded.ref, root, progress, tracker=tracker)


def _log_failed_saves(result: WorkerRun, failed_saves: int) -> None:
    result.failed_saves = failed_saves
    if failed_saves:
        logger.warning(
            "worker summary: %d checkpoint save(s) failed (see the warnings above); those "
            "trials kept training and their results, but would have resumed from an older "
            "epoch after a crash", failed_saves,
        )  # fmt: skip
