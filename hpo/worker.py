"""Creating/joining a study and running trials in a loop, in one or several processes.

The validated spec is stored on the study (user attr ``hpo_spec``) when ``launch`` creates
it, so a worker anywhere needs only the study name and the storage URL.

How workers share a study without losing or over-running trials:

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
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.checkpoint import TrialCheckpoint, checkpoint_root, remove_finished_checkpoints
from hpo.data import load_splits
from hpo.space import TrialParams, make_pruner, make_sampler
from hpo.spec import StudySpec, spec_differences
from hpo.storage import (
    SPEC_ATTR,
    STORAGE_ENV,
    StorageError,
    StudyNotFound,
    heartbeat_settings,
    open_storage,
    require_study,
    retry_on_disconnect,
    study_lock,
)
from hpo.train import EpochMetrics, run_trial

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
LABEL_ENV = "HPO_WORKER_LABEL"

logger = logging.getLogger(__name__)


class WorkerStopped(BaseException):
    """Raised inside a running trial by SIGTERM/SIGINT. A BaseException, so that no
    ``except Exception`` in the training code swallows it."""


def create_or_load_study(spec: StudySpec, storage_url: str, *, parallel: bool) -> optuna.Study:
    """Create the study from the spec, or load it if it exists (launching twice continues).

    Refuses a spec that differs from the one stored on an existing study: the trials
    already there were drawn from the stored space. Several processes may call this at
    once for the same study (two ``launch``es, workers started by compose): the spec is
    stored under the study lock, so all of them agree on one.
    """
    storage = open_storage(storage_url)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.objective.direction,
        sampler=make_sampler(spec, parallel=parallel),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    with study_lock(storage, spec.name):
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is None:
            study.set_user_attr(SPEC_ATTR, spec.to_json())
        else:
            check_same_spec(StudySpec.from_json(stored), spec)
    return study


def check_same_spec(stored: StudySpec, local: StudySpec) -> None:
    differences = spec_differences(stored, local)
    if differences:
        raise StorageError(
            f"study {stored.name!r} was created from a different spec; differing fields: "
            f"{', '.join(differences)} (use a new study name, or the stored spec)"
        )


def load_study(
    study_name: str,
    storage_url: str,
    *,
    parallel: bool,
    local_spec: StudySpec | None = None,
) -> tuple[optuna.Study, StudySpec]:
    """Join an existing study; its spec comes from the study itself.

    With ``local_spec`` (``hpo worker --spec``) a missing study is created from it, and an
    existing one is refused if its stored spec differs (the message names the fields).
    """
    if local_spec is not None:
        if local_spec.name != study_name:
            raise StorageError(
                f"--spec defines study {local_spec.name!r}, not {study_name!r} (--study)"
            )
        return create_or_load_study(local_spec, storage_url, parallel=parallel), local_spec
    storage = open_storage(storage_url)
    require_study(storage, study_name, storage_url, "create it with 'hpo launch', or pass --spec")
    stored = optuna.load_study(study_name=study_name, storage=storage).user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise StudyNotFound(f"study {study_name!r} has no hpo spec stored; was it made by hpo?")
    spec = StudySpec.from_json(stored)
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec, parallel=parallel),
        pruner=make_pruner(spec),
    )
    return study, spec


def rdb_storage(study: optuna.Study) -> optuna.storages.RDBStorage:
    """The RDBStorage under a study (Optuna wraps it in a private cache layer)."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def superseded_trials(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were re-queued: their retry counts in their place."""
    return {
        int(trial.system_attrs["retry_history"][-1])
        for trial in trials
        if trial.system_attrs.get("retry_history")
    }


@dataclass(frozen=True)
class Budget:
    """Where a study stands against its total (re-queued failures not counted)."""

    finished: int
    running: int
    waiting: int


def study_budget(study: optuna.Study) -> Budget:
    trials = study.get_trials(deepcopy=False)
    replaced = superseded_trials(trials)
    counted = [t for t in trials if t.number not in replaced]
    return Budget(
        finished=sum(t.state in FINISHED_STATES for t in counted),
        running=sum(t.state == TrialState.RUNNING for t in counted),
        waiting=sum(t.state == TrialState.WAITING for t in counted),
    )


def count_finished(study: optuna.Study) -> int:
    """Finished trials toward ``--n-trials`` (a failed trial that was re-queued is not one)."""
    return study_budget(study).finished


def claim_trial(study: optuna.Study, total_trials: int) -> optuna.Trial | str:
    """Start a trial if the study-wide budget allows: a trial, or ``"wait"``/``"done"``.

    Under the study lock: fail trials whose worker vanished (which re-queues them), then
    start a re-queued or enqueued trial if there is one, else a new one, if finished +
    running < total. ``"wait"``: the budget is handed out but trials still run elsewhere.
    """
    storage = rdb_storage(study)
    with study_lock(storage, study.study_name), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        optuna.storages.fail_stale_trials(study)
        budget = study_budget(study)
        if budget.finished + budget.running >= total_trials:
            return "wait" if budget.running else "done"
        trial = study.ask()
        # Optuna never fails a RUNNING trial without a heartbeat: record one now, so a
        # worker that dies before its heartbeat thread starts still gets its trial retried.
        storage.record_heartbeat(trial._trial_id)
        return trial


def requeue(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail ``trial`` and queue a retry with its params and intermediate values (the same
    thing the heartbeat check does for a vanished worker). Under the study lock, so no
    other worker sees the trial failed but not yet re-queued and stops early."""
    with study_lock(rdb_storage(study), study.study_name), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        trial.set_user_attr("fail_reason", reason)
        frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if frozen.state == TrialState.FAIL:
            RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, frozen)


class Heartbeat:
    """Records the running trial's heartbeat every interval in a daemon thread.

    Optuna's own heartbeat thread dies at the first database error; this one keeps trying,
    so a database restart shorter than the grace period does not fail the trial.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="hpo-heartbeat")

    def _beat(self) -> None:
        while True:
            try:
                # The unwrapped call: one try per interval, never a long blocking retry.
                optuna.storages.RDBStorage.record_heartbeat(self.storage, self.trial_id)
            except Exception as error:
                logger.warning("heartbeat for trial id %s not recorded: %s", self.trial_id,
                               type(error).__name__)  # fmt: skip
            if self.stopped.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class StopSignal:
    """SIGTERM/SIGINT: stop starting trials, and interrupt the running one right away."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._interruptible = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                signal.signal(number, self._handle)

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
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.25, deadline - time.monotonic()))


class LineProgress:
    """One line per epoch: for several processes sharing a terminal (and for logs)."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        self.label = label
        self.console = console or Console(highlight=False)
        self.prefix = ""
        self.epochs = 0

    def start(self, trial_number: int, params: TrialParams, epochs: int, steps: int) -> None:
        self.epochs = epochs
        self.prefix = (
            f"{self.label}trial {trial_number:>3} B={params.batch_size:<4} "
            f"lr={params.lr:.2e} wd={params.weight_decay:.1e}"
        )

    def step(self, epoch: int, loss: float) -> None:
        pass

    def epoch_end(self, metrics: EpochMetrics, objective_name: str) -> None:
        self.console.print(
            f"{self.prefix} epoch {metrics.epoch}/{self.epochs} loss {metrics.train_loss:.3f} "
            f"{objective_name} {metrics.objective(objective_name):.4f}",
            markup=False,
        )

    def finish(self) -> None:
        pass


class BarProgress:
    """A live bar for the running trial (epoch, step, loss, val metric) and one for the study."""

    def __init__(self, total_trials: int, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.study_task = self.progress.add_task("trials", total=total_trials, status="")
        self.trial_task = None
        self.epochs = 0
        self.steps = 0
        self.last_metric = ""

    def __enter__(self) -> BarProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, trial_number: int, params: TrialParams, epochs: int, steps: int) -> None:
        self.epochs, self.steps, self.last_metric = epochs, steps, ""
        description = f"trial {trial_number} B={params.batch_size} lr={params.lr:.1e} wd={params.weight_decay:.0e}"
        if self.trial_task is not None:
            self.progress.remove_task(self.trial_task)
        self.trial_task = self.progress.add_task(description, total=epochs * steps, status="")

    def step(self, epoch: int, loss: float) -> None:
        self.progress.update(
            self.trial_task,
            advance=1,
            status=f"epoch {epoch}/{self.epochs} loss {loss:.3f} {self.last_metric}",
        )

    def epoch_end(self, metrics: EpochMetrics, objective_name: str) -> None:
        self.last_metric = f"{objective_name} {metrics.objective(objective_name):.4f}"
        self.progress.update(
            self.trial_task,
            completed=metrics.epoch * self.steps,
            status=f"epoch {metrics.epoch}/{self.epochs} loss {metrics.train_loss:.3f} {self.last_metric}",
        )

    def finish(self) -> None:
        self.progress.advance(self.study_task)


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: StudySpec,
    splits: object,
    progress: object | None,
    stop: StopSignal,
) -> TrialState:
    """Train ``trial`` with heartbeats and checkpoints, and tell the study how it ended."""
    root = checkpoint_root(spec)
    checkpoint = TrialCheckpoint.for_trial(root, trial)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    value, state = None, TrialState.FAIL
    interval, _ = heartbeat_settings()
    try:
        with Heartbeat(rdb_storage(study), trial._trial_id, interval), stop.interruptible():
            value = run_trial(trial, spec, splits=splits, progress=progress, checkpoint=checkpoint)
            state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except WorkerStopped as stopped:
        requeue(study, trial, f"worker stopped ({stopped})")
        logger.warning("trial %d re-queued: worker stopped (%s)", trial.number, stopped)
        return TrialState.WAITING
    except Exception as error:
        logger.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
        if "fail_reason" not in trial.user_attrs:
            trial.set_user_attr("fail_reason", f"error: {type(error).__name__}: {error}"[:500])
    retry_on_disconnect(
        lambda: study.tell(trial, value if state == TrialState.COMPLETE else None, state=state,
                           skip_if_finished=True),
        what="tell", url=rdb_storage(study).url,
    )  # fmt: skip
    remove_finished_checkpoints(root, study)
    return state


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None = None,
    progress: str = "bar",
    label: str = "",
    parallel: bool = False,
    local_spec: StudySpec | None = None,
) -> int:
    """Run trials until the study holds ``total_trials`` finished trials or time runs out.

    ``total_trials`` is study-wide (see the module docstring), so several workers on any
    number of nodes together finish exactly that many. ``timeout_s`` stops starting new
    trials after that many seconds. After SIGTERM/SIGINT it returns 128 + the signal's
    number, with the running trial re-queued; else 0.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, spec = load_study(study_name, storage_url, parallel=parallel, local_spec=local_spec)
    if parallel:
        # Same seed in every worker would make them all propose the same first points.
        study.sampler.reseed_rng()
    budget = study_budget(study)
    if budget.finished >= total_trials and not budget.running:
        return 0
    stop = StopSignal()
    stop.install()
    splits = load_splits(spec.dataset)
    poll_s = min(5.0, heartbeat_settings()[0])
    started = time.monotonic()

    def loop(reporter: object | None) -> None:
        while not stop.requested:
            if timeout_s is not None and time.monotonic() - started >= timeout_s:
                return
            claimed = retry_on_disconnect(
                lambda: claim_trial(study, total_trials), what="claim", url=storage_url
            )
            if claimed == "done":
                return
            if claimed == "wait":
                stop.sleep(poll_s)
                continue
            _run_one(study, claimed, spec, splits, reporter, stop)

    if progress == "bar":
        with BarProgress(max(total_trials - budget.finished, 0)) as bar:
            loop(bar)
    else:
        loop(LineProgress(label) if progress == "lines" else None)
    if stop.requested:
        logger.warning("%sworker stopped by %s", label, stop.requested)
        return 128 + signal.Signals[stop.requested].value
    return 0


def resolve_gpus(gpus: str) -> list[str]:
    """``all`` or a comma-separated list of indices → CUDA_VISIBLE_DEVICES values, one per
    worker. Indices count the GPUs this process sees (within an existing
    ``CUDA_VISIBLE_DEVICES``). ``all`` on a node without GPUs gives an empty list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        available = [device.strip() for device in visible.split(",") if device.strip()]
    else:
        import torch

        available = [str(index) for index in range(torch.cuda.device_count())]
    if gpus.strip() == "all":
        return available
    chosen = []
    for part in gpus.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) >= len(available):
            raise StorageError(
                f"--gpus {gpus!r}: {part!r} is not a GPU index here (this node sees "
                f"{len(available)} GPU(s): indices 0..{len(available) - 1}; or use 'all')"
            )
        chosen.append(available[int(part)])
    if len(set(chosen)) != len(chosen):
        raise StorageError(f"--gpus {gpus!r} names a GPU twice")
    return chosen


def worker_command(study_name: str, total_trials: int, timeout_s: float | None) -> list[str]:
    """The ``hpo worker`` command line of one child (the storage URL goes in the
    environment, so a password never shows in ``ps``)."""
    command = [sys.executable, "-m", "hpo", "worker", "--study", study_name]
    command += ["--n-trials", str(total_trials)]
    if timeout_s is not None:
        command += ["--timeout", str(timeout_s)]
    return command


def run_worker_processes(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None,
    devices: list[str | None],
) -> int:
    """One ``hpo worker`` child per entry of ``devices``: a GPU (``CUDA_VISIBLE_DEVICES``
    set to it) or None (a CPU worker; the cores are split between the CPU workers).
    SIGTERM/SIGINT are passed on to the children, which re-queue their trials. Returns the
    worst exit code of the children."""
    cpu_workers = sum(device is None for device in devices)
    threads = max(1, (os.cpu_count() or 1) // max(cpu_workers, 1))
    children = []
    for index, device in enumerate(devices):
        env = dict(os.environ)
        env[STORAGE_ENV] = storage_url
        if device is None:
            env[LABEL_ENV] = f"[w{index}] "
            env.setdefault("OMP_NUM_THREADS", str(threads))
        else:
            env[LABEL_ENV] = f"[gpu{device}] "
            env["CUDA_VISIBLE_DEVICES"] = device
        children.append(
            subprocess.Popen(worker_command(study_name, total_trials, timeout_s), env=env)
        )

    def forward(number: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(number)

    previous = {
        number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        codes = [child.wait() for child in children]
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return max(codes, key=abs)


def run_local_workers(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None,
    workers: int,
    progress: str = "bar",
) -> int:
    """``workers`` processes on this machine sharing the study; 1 runs in this process.

    Several workers get a GPU each when this machine has at least that many (round-robin
    otherwise), else split the CPU cores.
    """
    if workers <= 1:
        return run_worker(study_name, storage_url, total_trials=total_trials,
                          timeout_s=timeout_s, progress=progress)  # fmt: skip
    gpus = resolve_gpus("all")
    devices: list[str | None] = [gpus[i % len(gpus)] if gpus else None for i in range(workers)]
    return run_worker_processes(
        study_name, storage_url, total_trials=total_trials, timeout_s=timeout_s, devices=devices
    )
