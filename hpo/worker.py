"""Creating/joining a study and running trials in a loop, in one or several processes.

The validated spec is stored on the study (user attr ``hpo_spec``) when ``launch`` creates
it, so a worker anywhere needs only the study name and the storage URL.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.data import PatchSet, load_splits
from hpo.space import TrialParams, make_pruner, make_sampler
from hpo.spec import StudySpec, spec_differences
from hpo.storage import SPEC_ATTR, StorageError, mask_url, open_storage
from hpo.train import EpochMetrics, TrialOutOfMemory, run_trial

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Trial errors after which the worker goes on: the trial is FAIL, the next one starts.
SURVIVABLE = (TrialOutOfMemory,)


class StudyNotFound(StorageError):
    pass


def create_or_load_study(spec: StudySpec, storage_url: str, *, parallel: bool) -> optuna.Study:
    """Create the study from the spec, or load it if it exists (launching twice continues).

    Refuses a spec whose search differs from the one stored on an existing study: the
    trials already there were drawn from the stored space.
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


def load_study(study_name: str, storage_url: str, *, parallel: bool) -> tuple[optuna.Study, StudySpec]:
    """Join an existing study; its spec comes from the study itself."""
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise StudyNotFound(
            f"study {study_name!r} not found in {mask_url(storage_url)} (studies there: {known}); "
            "create it with 'hpo launch'"
        )
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


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


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
            f"{objective_name} {metrics.objective(objective_name):.4f}"
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
        description = (
            f"trial {trial_number} B={params.batch_size} lr={params.lr:.1e} wd={params.weight_decay:.0e}"
        )
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


@dataclass
class Objective:
    """The function Optuna calls per trial; loads the data once per process."""

    spec: StudySpec
    progress: object | None = None
    _splits: tuple[PatchSet, PatchSet] | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        if self._splits is None:
            self._splits = load_splits(self.spec.dataset)
        return run_trial(trial, self.spec, splits=self._splits, progress=self.progress)


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None = None,
    progress: str = "bar",
    label: str = "",
    parallel: bool = False,
) -> None:
    """Run trials until the study holds ``total_trials`` finished trials or time runs out.

    ``total_trials`` is study-wide (COMPLETE + PRUNED + FAIL, as Optuna's
    ``MaxTrialsCallback`` counts), so several workers together stop at that total.
    """
    study, spec = load_study(study_name, storage_url, parallel=parallel)
    remaining = total_trials - count_finished(study)
    if remaining <= 0:
        return
    callbacks = [optuna.study.MaxTrialsCallback(total_trials, states=FINISHED_STATES)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if progress == "bar":
        with BarProgress(remaining) as bar:
            study.optimize(
                Objective(spec, bar), timeout=timeout_s, callbacks=callbacks, catch=SURVIVABLE
            )
    else:
        line = LineProgress(label) if progress == "lines" else None
        study.optimize(
            Objective(spec, line), timeout=timeout_s, callbacks=callbacks, catch=SURVIVABLE
        )


def _child(study_name: str, storage_url: str, total: int, timeout_s: float | None, index: int,
           threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    run_worker(study_name, storage_url, total_trials=total, timeout_s=timeout_s,
               progress="lines", label=f"[w{index}] ", parallel=True)


def run_local_workers(
    study_name: str,
    storage_url: str,
    *,
    total_trials: int,
    timeout_s: float | None,
    workers: int,
    progress: str = "bar",
) -> None:
    """``workers`` processes on this machine sharing the study; 1 runs in this process."""
    if workers <= 1:
        run_worker(study_name, storage_url, total_trials=total_trials, timeout_s=timeout_s,
                   progress=progress)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_child,
            args=(study_name, storage_url, total_trials, timeout_s, index, threads),
        )
        for index in range(workers)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join()
