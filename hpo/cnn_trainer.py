"""hpo's built-in trainer: its CNN loop (``hpo.train.fit``) as a trainer function of a
``TrialContext``, the default when a study file names no ``[trainer] function``.

Built once per worker (the device resolved and the splits loaded at start); called once per
trial. It reads top to bottom: the data prepared on the device, a seeded run, resume from
the checkpoint of the trial it retries, ``fit`` with a report (and a pruning decision)
through ``ctx.report`` after every report point, the per-trial user attrs however it ends.

A checkpoint that cannot be written is a warning, never a trial's end; one that cannot be
read makes the retry start from epoch 0 (user attr ``checkpoint_unreadable``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpo.checkpoint import (
    FILE_NAME,
    CheckpointSaveFailed,
    CheckpointUnreadable,
    CheckpointWriter,
    TrialCheckpoint,
)
from hpo.context import TrialContext
from hpo.data import PatchSet
from hpo.device import DeviceSetup
from hpo.noise_interval import noise_scale_attrs
from hpo.resource import TrainingBudget
from hpo.settings import kill_point
from hpo.train import EpochMetrics, Tally, TrainingRun, build_run, fit, prepare_data

logger = logging.getLogger(__name__)


class SilentProgress:
    """What a trial tells the terminal when nobody watches (``hpo.objective.TrialProgress``
    is the interface; ``hpo.cli.progress`` implements it)."""

    def start(self, trial_number: int, params: Any, budget: TrainingBudget) -> None:
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
class CnnTrainer:
    """hpo's CNN loop for one worker. ``failed_saves`` counts checkpoint saves that failed
    over every trial it ran (the worker's summary)."""

    setup: DeviceSetup
    splits: tuple[PatchSet, PatchSet]
    progress: Any = field(default_factory=SilentProgress)
    failed_saves: int = 0
    # Writes the epoch checkpoints in the background (``training.checkpoint_async``).
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)
    # The per-trial user attrs are its own (``record_tally``), not the objective's summary.
    records_own_attrs = True

    def __call__(self, ctx: TrialContext) -> float:
        spec, params = ctx.spec, ctx.trial_params
        started = time.perf_counter()
        data = prepare_data(self.splits, self.setup, spec.training)
        run, checkpoint = self._resume(ctx)
        run.data_parallel = ctx.group  # None but in a data-parallel trial (hpo.distributed)
        resumed = (run.tally.train_seconds, run.tally.eval_seconds)
        budget = TrainingBudget.for_trial(spec.budget, len(data.train), params.batch_size)
        self.progress.start(ctx.trial_number, params, budget)
        try:
            fit(
                run, data, self.setup, spec, params,
                on_step=lambda report, loss: self._on_step(report, loss, run.tally),
                on_epoch=lambda metrics: self._after_epoch(ctx, run, metrics, checkpoint),
            )  # fmt: skip
            return run.tally.history[-1].objective(spec.objective.metric)
        finally:
            if checkpoint is not None and checkpoint.writer is not None:
                self._saved(ctx, checkpoint.writer.wait)  # the last epoch's file is there
            record_tally(ctx.set_user_attrs, run.tally, started, budget=budget,
                         also=_updates_at_report(ctx))  # fmt: skip
            _record_busy_time(ctx, run.tally, resumed)
            self.progress.finish()

    def _on_step(self, report: int, loss: float, tally: Tally) -> None:
        kill_point("step")  # tests only: a kill -9 mid-epoch ($HPO_TEST_KILL_AT)
        self.progress.step(report, loss, tally)

    def _resume(self, ctx: TrialContext) -> tuple[TrainingRun, TrialCheckpoint | None]:
        """A seeded run and the trial's checkpoint file; a retry first loads what its
        predecessor saved (user attrs ``retry_of`` and ``resumed_from_epoch``, 0 when there
        was none). An unreadable checkpoint is moved aside and the retry starts from epoch
        0 on a fresh run (user attr ``checkpoint_unreadable`` says why and where it went)."""
        spec, params = ctx.spec, ctx.trial_params
        run = build_run(spec, params, self.setup, seed=ctx.seed)
        if ctx.checkpoint_dir is None:
            return run, None
        writer = self.writer if spec.training.checkpoint_async else None
        checkpoint = TrialCheckpoint(ctx.checkpoint_dir / FILE_NAME, writer)
        if ctx.retry_of is None:
            return run, checkpoint
        ctx.set_user_attr("retry_of", ctx.retry_of)
        try:
            resumed_from = checkpoint.load_into(run)
        except CheckpointUnreadable as unreadable:
            logger.warning("trial %d starts from epoch 0: %s", ctx.trial_number, unreadable)
            ctx.set_user_attr("checkpoint_unreadable", str(unreadable)[:500])
            run = build_run(spec, params, self.setup, seed=ctx.seed)
            resumed_from = 0
        ctx.set_user_attr("resumed_from_epoch", resumed_from)
        # The reports already made count on the study's budget axis: the next is one more.
        ctx.reported = [m.objective(spec.objective.metric) for m in run.tally.history]
        return run, checkpoint

    def _after_epoch(
        self,
        ctx: TrialContext,
        run: TrainingRun,
        metrics: EpochMetrics,
        checkpoint: TrialCheckpoint | None,
    ) -> None:
        """Show, report (which may prune), checkpoint: what happens between two epochs."""
        metric = ctx.spec.objective.metric
        self.progress.report_end(metrics, metric, run.tally)
        ctx.report(
            metrics.objective(metric), samples=run.tally.train_samples, updates=run.tally.updates
        )
        if checkpoint is not None and ctx.rank == 0:  # one writer per trial
            self._saved(ctx, lambda: checkpoint.save(run))

    def _saved(self, ctx: TrialContext, save: Callable[[], None]) -> None:
        """Checkpoint the epoch (or wait for the write in the background); a failed save
        (disk full, I/O error) is a warning, counted on the trial (``checkpoint_save_failures``)
        and on the worker (``failed_saves``): the trial goes on, and only a resume after a
        crash would start from an older epoch."""
        try:
            save()
        except CheckpointSaveFailed as failed:
            self.failed_saves += 1
            ctx.save_failures += 1
            logger.warning("trial %d: %s; training goes on", ctx.trial_number, failed)
            ctx.set_user_attr("checkpoint_save_failures", ctx.save_failures)
            ctx.set_user_attr("checkpoint_save_error", str(failed)[:500])


def _updates_at_report(ctx: TrialContext) -> dict[str, Any]:
    """``updates_at_report``: the updates at each report, when this attempt made them all (a
    retry resumed from a checkpoint knows only its own; the report then spreads
    ``n_updates`` evenly over the reports); else nothing."""
    if ctx.updates_at_report and len(ctx.updates_at_report) == len(ctx.reported):
        return {"updates_at_report": list(ctx.updates_at_report)}
    return {}


def _record_busy_time(ctx: TrialContext, tally: Tally, resumed: tuple[float, float]) -> None:
    """The seconds this attempt trained and evaluated (a resumed run's tally starts at its
    predecessor's, ``resumed``), wall time on this rank, for the objective to store with the
    rest of the trial's device time in one write (``device_seconds``)."""
    ctx.busy_seconds = {
        "train": tally.train_seconds - resumed[0],
        "eval": tally.eval_seconds - resumed[1],
    }


def record_tally(
    set_attrs: Callable[[dict[str, Any]], None],
    tally: Tally,
    started: float,
    *,
    budget: TrainingBudget | None = None,
    also: dict[str, Any] | None = None,
) -> None:
    """Store the per-trial metrics as user attributes (also on pruned and failed trials),
    with the attrs ``also``, in one write (``set_attrs``: one transaction where the storage
    allows, so the record lands whole or not at all).

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
    attrs.update(noise_scale_attrs(tally.b_simple, tally.noise))
    set_attrs(attrs | (also or {}))
