"""The only code that turns an Optuna trial into a training run.

``Objective(trial)`` reads top to bottom: parameters from the trial (clamped to this
device's batch-size cap), a ``TrialContext`` for them (``hpo.context``: seed, budget,
checkpoint directory, report and pruning), the study's trainer called with it (hpo's own
CNN loop, ``hpo.cnn_trainer``, or the user's ``[trainer] function``), and the trial's end.
How a trial ends, as the worker and Optuna see it, whoever's trainer ran:

- completes: the value the trainer returned (the last reported one when it returned None);
- pruned (``fail_reason = "pruned"``) or diverged (``"diverged"``: a reported or returned
  value that is not finite, or a training loss that became one): ``optuna.TrialPruned``;
- out of memory (``"oom"``): the device's cap is lowered to half the batch size, memory
  is freed and ``TrialOutOfMemory`` is raised (the worker fails the trial and goes on);
- a trainer that returned without ever calling ``ctx.report`` fails (``"no report"``), and
  one that raised fails with the error as its reason (``hpo.worker.run_one``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import optuna
import torch

from hpo.caps import CLAMPED_ATTR, clamp_batch_size, lower_batch_cap, read_batch_cap
from hpo.checkpoint import TrialCheckpoint
from hpo.cnn_trainer import CnnTrainer, SilentProgress, record_tally
from hpo.compat import set_trial_user_attrs
from hpo.context import Budget, Diverged, Trainer, TrialContext, load_trainer
from hpo.data import PatchSet, study_splits
from hpo.device import DeviceSetup, is_out_of_memory, release_device_memory, select_device
from hpo.distributed import data_parallel_group
from hpo.noise_interval import noise_scale_attrs
from hpo.replicates import replicate_attrs, training_seed
from hpo.resource import TrainingBudget
from hpo.space import sample_params
from hpo.spec import StudySpec, TrialParams
from hpo.storage import StudyRef
from hpo.study import original_trial_number, retried_from
from hpo.train import EpochMetrics, Tally

if TYPE_CHECKING:
    from hpo.tracking import Tracker

__all__ = ["Objective", "SilentProgress", "TrialOutOfMemory", "TrialProgress", "record_tally"]

NO_REPORT = "no report: the trainer returned without calling ctx.report(value, ...)"

logger = logging.getLogger(__name__)


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of device memory. The trial is FAIL with ``fail_reason = "oom"``,
    the device's batch-size cap is already lowered and memory freed: the worker goes on
    with the next trial."""


class TrialProgress(Protocol):
    """What a trial tells the terminal (implemented in ``hpo.cli.progress``). Progress is
    counted in the study's budget unit: ``report`` is the report number (1-based; an
    epoch only with ``budget.unit = "epochs"`` and one report per epoch), and ``tally``
    says what the run has spent so far (updates, training seconds)."""

    def start(self, trial_number: int, params: TrialParams, budget: TrainingBudget) -> None: ...

    def step(self, report: int, loss: float, tally: Tally) -> None: ...

    def report_end(self, metrics: EpochMetrics, objective_name: str, tally: Tally) -> None: ...

    def finish(self) -> None: ...

    def ended(self, trial_number: int, state: str, value: float | None, reason: str | None) -> None:
        """The trial's end state as told to the study (COMPLETE, PRUNED, FAIL, WAITING)."""


@dataclass
class Objective:
    """Trains one Optuna trial per call. Built once per worker: the spec as this node
    runs it, the device resolved at start, the trainer imported (or hpo's own built on the
    splits loaded once; ``splits`` is None for a user's trainer, which loads its own data).

    ``study`` (the stored study, for the batch-size cap) and ``checkpoint_root`` are
    optional so a bare in-memory Optuna study can run it too.
    """

    spec: StudySpec
    setup: DeviceSetup
    splits: tuple[PatchSet, PatchSet] | None
    study: StudyRef | None = None
    checkpoint_root: Path | None = None
    progress: TrialProgress = field(default_factory=SilentProgress)
    trainer: Trainer | None = None
    tracker: Tracker | None = None  # MLflow runs ([tracking] mlflow), fed without waiting
    failed_saves: int = 0  # checkpoint saves that failed, over every trial this worker ran
    # Seconds the worker waited for the claim that gave it the next trial (set by the
    # worker before each trial): recorded as that trial's idle device-seconds.
    idle_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.trainer is not None:
            return
        if self.spec.trainer.function is not None:
            self.trainer = load_trainer(self.spec.trainer.function)
        else:
            if self.splits is None:
                raise ValueError("hpo's built-in trainer needs the study's splits")
            self.trainer = CnnTrainer(self.setup, self.splits, self.progress)

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        params = self._params(trial)
        ctx = self._context(trial, params)
        set_trial_user_attrs(trial, {
            "device": self.setup.name,  # the device kind
            "precision": self.setup.precision,
            "ranks": self.spec.training.gpus_per_trial,
            "budget_unit": ctx.budget.unit,
            "budget_per_report": ctx.budget.per_report,
        })  # fmt: skip
        if self.tracker is not None:
            worker = trial.user_attrs.get("worker")
            self.tracker.trial_started(trial.number, ctx.params, {"worker": worker})
        try:
            with data_parallel_group(ctx, self.setup):  # N ranks with gpus_per_trial = N
                return self._train(trial, ctx)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            trial.set_user_attr("fail_reason", "oom")
        finally:
            self.failed_saves += ctx.save_failures
            record_device_time(trial.set_user_attr, ctx, started, self.idle_seconds)
        # Outside the handler: the traceback, which held the run and its activations, is
        # gone, so freeing memory really frees it.
        raise self._out_of_memory(trial, params)

    def _context(self, trial: optuna.Trial, params: TrialParams) -> TrialContext:
        """The trial as its trainer sees it: a retry replays its original's seed and
        checkpoint directory (``ROOT/STUDY/trial-N``, N the original trial's number); a
        replicate trains with its own seed (``hpo.replicates``) and is never pruned."""
        original = original_trial_number(trial)
        directory = None
        if self.checkpoint_root is not None:
            directory = TrialCheckpoint.in_root(self.checkpoint_root, original).path.parent
        budget = self.spec.budget
        attrs = trial.user_attrs
        return TrialContext(
            params={
                "batch_size": params.batch_size, "lr": params.lr,
                "weight_decay": params.weight_decay, **params.extra,
            },
            trial_params=params, device=self.setup.device,
            budget=Budget(budget.unit, budget.amount, budget.report_count),
            seed=training_seed(self.spec, attrs, original), trial_number=trial.number,
            spec=self.spec, checkpoint_dir=directory, retry_of=retried_from(trial),
            # a replicate runs to the end: the noise floor needs its final value
            on_report=partial(self._on_report, trial, prune=not replicate_attrs(attrs)),
            set_attr=trial.set_user_attr, set_attrs=partial(set_trial_user_attrs, trial),
        )  # fmt: skip

    def _train(self, trial: optuna.Trial, ctx: TrialContext) -> float:
        """The trainer's run and the trial's value; a user's trainer gets the torch seed, its
        saved state on a retry, and a summary of its reports as user attrs however it ends
        (hpo's own loop records its own: ``record_tally``)."""
        started = time.perf_counter()
        own_attrs = getattr(self.trainer, "records_own_attrs", False)
        if not own_attrs:
            torch.manual_seed(ctx.seed)
            if ctx.retry_of is not None:
                trial.set_user_attr("retry_of", ctx.retry_of)
                trial.set_user_attr("resumed_from_report", ctx.load_saved_state())
        assert self.trainer is not None
        try:
            value = self.trainer(ctx)
        except Diverged as diverged:
            trial.set_user_attr("fail_reason", "diverged")
            raise optuna.TrialPruned(str(diverged)) from None
        finally:
            if not own_attrs:
                record_reports(partial(set_trial_user_attrs, trial), ctx, started)
                self.progress.finish()  # the study's bar counts the trial (hpo's loop does)
        return self._final_value(trial, ctx, value)

    def _final_value(self, trial: optuna.Trial, ctx: TrialContext, value: Any) -> float:
        if not ctx.reported:
            trial.set_user_attr("fail_reason", NO_REPORT)
            raise RuntimeError(NO_REPORT)
        final = ctx.reported[-1] if value is None else float(value)
        if not math.isfinite(final):
            trial.set_user_attr("fail_reason", "diverged")
            raise optuna.TrialPruned(f"the trainer returned {final}")
        return final

    def _on_report(
        self,
        trial: optuna.Trial,
        value: float,
        number: int,
        last: bool,
        samples: int,
        *,
        prune: bool = True,
    ) -> None:
        """Report ``value`` at report ``number`` and ask the pruner. Never at the last
        report: the budget is spent, so pruning would save nothing and throw away a
        full-budget result (without this check, 1-2 trials per demo-sized run were)."""
        trial.report(value, number)
        if self.tracker is not None:
            self.tracker.reported(trial.number, value, samples)
        if prune and not last and trial.should_prune():
            trial.set_user_attr("fail_reason", "pruned")
            metric = self.spec.objective.metric
            raise optuna.TrialPruned(f"pruned at report {number}: {metric} = {value:.4f}")

    def _params(self, trial: optuna.Trial) -> TrialParams:
        """Sampled parameters, the batch size clamped to the cap read now: an enqueued
        trial skips the sampler, and the cap may have fallen since the sampler drew. With
        ``training.above_cap = "accumulate"`` the batch size stays and the cap becomes the
        micro-batch size (user attrs ``micro_batch_size``, ``accumulation_steps``)."""
        params = sample_params(trial, self.spec)
        cap = None if self.study is None else read_batch_cap(self.study, self.setup.name)
        # The cap is one device's; a data-parallel trial's global batch spreads over N.
        ranks = self.spec.training.gpus_per_trial
        clamped = clamp_batch_size(params.batch_size, None if cap is None else cap * ranks)
        if self.spec.training.above_cap == "accumulate":
            if clamped != params.batch_size:  # micro-batches of one rank's share
                params = dataclasses.replace(params, micro_batch_size=clamped // ranks)
            share = params.batch_size // ranks
            trial.set_user_attr("micro_batch_size", clamped // ranks)
            trial.set_user_attr("accumulation_steps", share // (params.micro_batch_size or share))
        elif clamped != params.batch_size:
            trial.set_user_attr(CLAMPED_ATTR, params.batch_size)
            trial.set_user_attr("batch_size", clamped)
            params = dataclasses.replace(params, batch_size=clamped)
        return params

    def _out_of_memory(self, trial: optuna.Trial, params: TrialParams) -> TrialOutOfMemory:
        release_device_memory(self.setup.device.type)
        new_cap = None
        if self.study is not None:
            # What did not fit on one device: a rank's share of a data-parallel batch.
            ranks = self.spec.training.gpus_per_trial
            failed = params.micro_batch_size or params.batch_size // ranks
            new_cap = lower_batch_cap(self.study, self.setup.name, failed)
        trial.set_user_attr("batch_size_cap_after_oom", new_cap)
        return TrialOutOfMemory(
            f"trial {trial.number}: out of memory on {self.setup.name} at batch size "
            f"{params.batch_size}; cap for this device is now {new_cap}"
        )


def record_device_time(
    set_attr: Any, ctx: TrialContext, started: float, idle_seconds: float
) -> None:
    """The device-seconds this attempt held the device, in one attr write
    (``hpo.report.device_hours.DEVICE_SECONDS_ATTR``): ``{"held": s, "idle": s, "train": s,
    "eval": s}``, ``held`` all of it from the claim's wait to now (data preparation, resume
    and checkpoints included), ``idle`` the worker's wait for the claim, ``train`` and
    ``eval`` what hpo's own loop measured (``hpo.cnn_trainer``; absent for a user's
    trainer). A data-parallel trial held ``training.gpus_per_trial`` devices all that time
    (and trained on ``ctx.world_size``): that many times the seconds."""
    held = time.perf_counter() - started
    devices = ctx.spec.training.gpus_per_trial
    busy = ctx.busy_seconds
    parts = {
        "held": (idle_seconds + max(held, sum(busy.values()))) * devices,
        "idle": idle_seconds * devices,
    }
    set_attr("device_seconds", parts | {k: v * ctx.world_size for k, v in busy.items()})


def record_reports(set_attrs: Any, ctx: TrialContext, started: float) -> None:
    """A user's trainer's run as user attrs, in one write (``set_attrs``), named as hpo's
    own loop names them:
    ``reports_completed`` (reports made), ``epochs_completed`` (whole epochs, with a budget
    in epochs), ``n_updates`` and ``train_samples`` (as last told
    to ``ctx.report``), ``train_epochs`` (reports times the epochs each stands for, with a
    budget in epochs), ``train_seconds`` and ``wall_time_s`` (the trainer's whole call),
    ``samples_per_s``, and the gradient noise scale (``b_simple``, ``b_simple_per_epoch``)
    when the trainer measured it."""
    seconds = time.perf_counter() - started
    attrs: dict[str, Any] = {"reports_completed": len(ctx.reported)}
    if ctx.budget.unit == "epochs":  # the budget axis: each report is a share of the epochs
        epochs = len(ctx.reported) * ctx.budget.per_report
        attrs["train_epochs"] = epochs
        attrs["epochs_completed"] = int(epochs + 1e-9)  # whole passes, not reports
    attrs["wall_time_s"] = seconds
    attrs["train_seconds"] = seconds
    if ctx.updates:
        attrs["n_updates"] = ctx.updates
        if len(ctx.updates_at_report) == len(ctx.reported):
            attrs["updates_at_report"] = list(ctx.updates_at_report)
    if ctx.samples:
        attrs["train_samples"] = ctx.samples
        attrs["samples_per_s"] = ctx.samples / seconds if seconds else 0.0
    # The noise scale, or why there is no estimate (the trainer never measured).
    attrs.update(noise_scale_attrs(ctx.b_simple, ctx.noise.estimate))
    set_attrs(attrs)


def train_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    *,
    splits: tuple[PatchSet, PatchSet] | None = None,
    study: StudyRef | None = None,
    checkpoint_root: Path | None = None,
) -> float:
    """One trial outside a worker (tests, benchmarks, a notebook): the device selected from
    the spec and, for hpo's own trainer, the splits loaded unless given. A worker builds
    its ``Objective`` once."""
    if splits is None and spec.builtin_trainer:
        splits = study_splits(spec)
    objective = Objective(
        spec,
        select_device(spec.training),
        splits,
        study=study,
        checkpoint_root=checkpoint_root,
    )
    return objective(trial)
