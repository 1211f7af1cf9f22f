"""The only code that turns an Optuna trial into a training run.

``Objective(trial)`` reads top to bottom: parameters from the trial (clamped to this
device's batch-size cap), a seeded run, resume from the checkpoint of the trial it
retries, ``hpo.train.fit`` with a report and a pruning decision after every epoch, the
per-trial user attrs. How a trial ends, as the worker and Optuna see it:

- completes: the objective at the last epoch is returned;
- pruned (``fail_reason = "pruned"``) or diverged (``"diverged"``): ``optuna.TrialPruned``;
- out of memory (``"oom"``): the device's cap is lowered to half the batch size, memory
  is freed and ``TrialOutOfMemory`` is raised (the worker fails the trial and goes on).

A checkpoint that cannot be written is a warning, never a trial's end; one that cannot be
read makes the retry start from epoch 0 (user attr ``checkpoint_unreadable``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna

from hpo.caps import CLAMPED_ATTR, clamp_batch_size, lower_batch_cap, read_batch_cap
from hpo.checkpoint import CheckpointSaveFailed, CheckpointUnreadable, TrialCheckpoint
from hpo.data import PatchSet, study_splits
from hpo.device import DeviceSetup, is_out_of_memory, release_device_memory, select_device
from hpo.noise_interval import fieller_interval
from hpo.resource import TrainingBudget
from hpo.settings import kill_point
from hpo.space import sample_params
from hpo.spec import StudySpec, TrialParams
from hpo.storage import StudyRef
from hpo.study import original_trial_number, retried_from
from hpo.train import Diverged, EpochMetrics, Tally, TrainingRun, build_run, fit, prepare_data

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


class SilentProgress:
    def start(self, trial_number: int, params: TrialParams, budget: TrainingBudget) -> None:
        pass

    def step(self, report: int, loss: float, tally: Tally) -> None:
        pass

    def report_end(self, metrics: EpochMetrics, objective_name: str, tally: Tally) -> None:
        pass

    def finish(self) -> None:
        pass

    def ended(self, trial_number: int, state: str, value: float | None, reason: str | None) -> None:
        pass


@dataclass
class Objective:
    """Trains one Optuna trial per call. Built once per worker: the spec as this node
    runs it, the device resolved at start, the splits loaded once.

    ``study`` (the stored study, for the batch-size cap) and ``checkpoint_root`` are
    optional so a bare in-memory Optuna study can run it too.
    """

    spec: StudySpec
    setup: DeviceSetup
    splits: tuple[PatchSet, PatchSet]
    study: StudyRef | None = None
    checkpoint_root: Path | None = None
    progress: TrialProgress = field(default_factory=SilentProgress)
    failed_saves: int = 0  # checkpoint saves that failed, over every trial this worker ran

    def __call__(self, trial: optuna.Trial) -> float:
        params = self._params(trial)
        trial.set_user_attr("device", self.setup.name)
        trial.set_user_attr("precision", self.setup.precision)
        try:
            return self._train(trial, params)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            trial.set_user_attr("fail_reason", "oom")
        # Outside the handler: the traceback, which held the run and its activations, is
        # gone, so freeing memory really frees it.
        raise self._out_of_memory(trial, params)

    def _on_step(self, report: int, loss: float, tally: Tally) -> None:
        kill_point("step")  # tests only: a kill -9 mid-epoch ($HPO_TEST_KILL_AT)
        self.progress.step(report, loss, tally)

    def _train(self, trial: optuna.Trial, params: TrialParams) -> float:
        """Fit with a report and a pruning decision after every epoch; the objective at the
        last epoch. Per-trial user attrs are written however it ends."""
        started = time.perf_counter()
        data = prepare_data(self.splits, self.setup, self.spec.training)
        seed = self.spec.seed + original_trial_number(trial)  # a retry replays its original
        run, checkpoint = self._resume(trial, params, seed)
        budget = TrainingBudget.for_trial(self.spec.budget, len(data.train), params.batch_size)
        trial.set_user_attr("budget_unit", budget.unit)
        trial.set_user_attr("budget_per_report", budget.amount / budget.reports)
        self.progress.start(trial.number, params, budget)
        try:
            fit(
                run, data, self.setup, self.spec, params,
                on_step=lambda report, loss: self._on_step(report, loss, run.tally),
                on_epoch=lambda metrics: self._after_epoch(trial, run, metrics, checkpoint),
            )  # fmt: skip
            return run.tally.history[-1].objective(self.spec.objective.metric)
        except Diverged as diverged:
            trial.set_user_attr("fail_reason", "diverged")
            raise optuna.TrialPruned(str(diverged)) from None
        finally:
            record_tally(trial, run.tally, started, budget=budget)
            self.progress.finish()

    def _params(self, trial: optuna.Trial) -> TrialParams:
        """Sampled parameters, the batch size clamped to the cap read now: an enqueued
        trial skips the sampler, and the cap may have fallen since the sampler drew. With
        ``training.above_cap = "accumulate"`` the batch size stays and the cap becomes the
        micro-batch size (user attrs ``micro_batch_size``, ``accumulation_steps``)."""
        params = sample_params(trial, self.spec)
        cap = None if self.study is None else read_batch_cap(self.study, self.setup.name)
        clamped = clamp_batch_size(params.batch_size, cap)
        if self.spec.training.above_cap == "accumulate":
            if clamped != params.batch_size:
                params = dataclasses.replace(params, micro_batch_size=clamped)
            trial.set_user_attr("micro_batch_size", clamped)
            trial.set_user_attr("accumulation_steps", params.accumulation_steps)
        elif clamped != params.batch_size:
            trial.set_user_attr(CLAMPED_ATTR, params.batch_size)
            trial.set_user_attr("batch_size", clamped)
            params = dataclasses.replace(params, batch_size=clamped)
        return params

    def _resume(
        self, trial: optuna.Trial, params: TrialParams, seed: int
    ) -> tuple[TrainingRun, TrialCheckpoint | None]:
        """A seeded run and the trial's checkpoint file; a retry first loads what its
        predecessor saved (user attrs ``retry_of`` and ``resumed_from_epoch``, 0 when there
        was none). An unreadable checkpoint is moved aside and the retry starts from epoch
        0 on a fresh run (user attr ``checkpoint_unreadable`` says why and where it went)."""
        run = build_run(self.spec, params, self.setup, seed=seed)
        if self.checkpoint_root is None:
            return run, None
        checkpoint = TrialCheckpoint.in_root(self.checkpoint_root, original_trial_number(trial))
        retry_of = retried_from(trial)
        if retry_of is None:
            return run, checkpoint
        trial.set_user_attr("retry_of", retry_of)
        try:
            resumed_from = checkpoint.load_into(run)
        except CheckpointUnreadable as unreadable:
            logger.warning("trial %d starts from epoch 0: %s", trial.number, unreadable)
            trial.set_user_attr("checkpoint_unreadable", str(unreadable)[:500])
            run = build_run(self.spec, params, self.setup, seed=seed)
            resumed_from = 0
        trial.set_user_attr("resumed_from_epoch", resumed_from)
        return run, checkpoint

    def _after_epoch(
        self,
        trial: optuna.Trial,
        run: TrainingRun,
        metrics: EpochMetrics,
        checkpoint: TrialCheckpoint | None,
    ) -> None:
        """Show, report, prune, checkpoint: what happens between two epochs."""
        metric = self.spec.objective.metric
        self.progress.report_end(metrics, metric, run.tally)
        value = metrics.objective(metric)
        if not math.isfinite(value):
            raise Diverged(f"{metric} is {value} at report {metrics.epoch}")
        trial.report(value, metrics.epoch)
        # Never at the last report: the budget is spent, so pruning would save nothing and
        # throw away a full-budget result (without this check, 1-2 trials per demo-sized
        # run were).
        if metrics.epoch < self.spec.budget.report_count and trial.should_prune():
            trial.set_user_attr("fail_reason", "pruned")
            raise optuna.TrialPruned(f"pruned at report {metrics.epoch}: {metric} = {value:.4f}")
        if checkpoint is not None:
            self._save(trial, run, checkpoint)

    def _save(self, trial: optuna.Trial, run: TrainingRun, checkpoint: TrialCheckpoint) -> None:
        """Checkpoint the epoch; a failed save (disk full, I/O error) is a warning, counted
        on the trial (``checkpoint_save_failures``) and on the worker (``failed_saves``):
        the trial goes on, and only a resume after a crash would start from an older epoch."""
        try:
            checkpoint.save(run)
        except CheckpointSaveFailed as failed:
            self.failed_saves += 1
            failures = int(trial.user_attrs.get("checkpoint_save_failures", 0)) + 1
            logger.warning("trial %d: %s; training goes on", trial.number, failed)
            trial.set_user_attr("checkpoint_save_failures", failures)
            trial.set_user_attr("checkpoint_save_error", str(failed)[:500])

    def _out_of_memory(self, trial: optuna.Trial, params: TrialParams) -> TrialOutOfMemory:
        release_device_memory(self.setup.device.type)
        new_cap = None
        if self.study is not None:
            failed = params.micro_batch_size or params.batch_size  # what did not fit
            new_cap = lower_batch_cap(self.study, self.setup.name, failed)
        trial.set_user_attr("batch_size_cap_after_oom", new_cap)
        return TrialOutOfMemory(
            f"trial {trial.number}: out of memory on {self.setup.name} at batch size "
            f"{params.batch_size}; cap for this device is now {new_cap}"
        )


def record_tally(
    trial: optuna.Trial, tally: Tally, started: float, *, budget: TrainingBudget | None = None
) -> None:
    """Store the per-trial metrics as user attributes (also on pruned and failed trials).

    The resource spent is recorded in all three budget units, whichever the study uses:
    ``train_epochs`` (passes over the training set, fractional), ``n_updates`` (optimizer
    updates) and ``train_seconds`` (training time, evaluation not counted).
    ``reports_completed`` is the number of reports made; ``epochs_completed`` the whole
    passes over the training set (with several reports per epoch, fewer than the reports).
    """
    seconds = tally.train_seconds
    attrs: dict[str, Any] = {
        "reports_completed": len(tally.history),
        "n_updates": tally.updates,
        "train_seconds": seconds,
        "samples_per_s": tally.train_samples / seconds if seconds else 0.0,
        "wall_time_s": time.perf_counter() - started,
    }
    if budget is not None:
        attrs["train_epochs"] = budget.epochs(tally.updates)
        attrs["epochs_completed"] = tally.updates // budget.steps_per_epoch
    if tally.history:
        last = tally.history[-1]
        attrs.update(
            val_auc=last.val_auc,
            val_acc=last.val_acc,
            val_loss=last.val_loss,
            train_loss=last.train_loss,
            best_val_auc=max(m.val_auc for m in tally.history),
            best_val_acc=max(m.val_acc for m in tally.history),
            best_val_loss=min(m.val_loss for m in tally.history),
        )
        if last.train_acc is not None:  # measured after the last epoch only (train.fit)
            attrs.update(train_acc=last.train_acc, generalization_gap=last.train_acc - last.val_acc)
    attrs.update(noise_scale_attrs(tally))
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def noise_scale_attrs(tally: Tally) -> dict[str, Any]:
    """The gradient noise scale (hpo.noise) as user attrs: ``b_simple`` (the ratio of the
    means of the trial's measurements), ``b_simple_interval`` [low, high] (Fieller's, at
    ``NOISE_SCALE_CONFIDENCE``; high null: only a lower bound), ``b_simple_measurements``
    and the running sums ``b_simple_sums`` (a batch size's trials are pooled from them),
    the per-report EMA ``b_simple_per_epoch``; or, with no estimate, ``b_simple_missing``:
    why. Trials from before the sums were kept fall back to the EMA's last value."""
    attrs: dict[str, Any] = {}
    if tally.b_simple:
        attrs.update(b_simple=tally.b_simple[-1], b_simple_per_epoch=list(tally.b_simple))
    sums = tally.noise.float_sums()
    count = int(sums.get("n", 0))
    attrs["b_simple_measurements"] = count
    if count:
        attrs["b_simple_sums"] = sums
    ratio, low, high = fieller_interval(sums)
    if ratio is not None:
        attrs.update(b_simple=ratio, b_simple_interval=[low, high])
        return attrs
    attrs.pop("b_simple", None)
    if count < 3:
        attrs["b_simple_missing"] = (
            f"{count} measurement(s) of the gradient noise scale; an estimate needs 3"
        )
    else:
        attrs["b_simple_missing"] = (
            "the mean |G|² or tr(Σ) estimate over the trial's measurements is not positive: "
            "the gradient is too small against its noise to measure at this batch size"
        )
    return attrs


def train_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    *,
    splits: tuple[PatchSet, PatchSet] | None = None,
    study: StudyRef | None = None,
    checkpoint_root: Path | None = None,
) -> float:
    """One trial outside a worker (tests, benchmarks, a notebook): the device selected from
    the spec and the splits loaded unless given. A worker builds its ``Objective`` once."""
    objective = Objective(
        spec,
        select_device(spec.training),
        splits if splits is not None else study_splits(spec),
        study=study,
        checkpoint_root=checkpoint_root,
    )
    return objective(trial)
