"""One trial's training budget in its unit: when it reports and how far along it is.

``budget.unit`` (``hpo.spec.BudgetSpec``) says what "the same amount of training" means
across batch sizes: equal epochs, equal optimizer updates or equal training seconds. A
trial reports at ``reports`` evenly spaced points of its budget in that unit, so every
report compares trials at the same resource, and the cosine LR schedule is a function of
the fraction of the budget spent. Pure arithmetic, no torch: ``hpo.train`` asks it when to
stop and evaluate, ``hpo.objective`` uses it to describe the trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hpo.spec import BudgetSpec, SpecError


@dataclass(frozen=True)
class TrainingBudget:
    """A trial's budget: ``amount`` in ``unit``, ``reports`` report points, and the number
    of optimizer updates in one epoch at this batch size (the last partial batch dropped)."""

    unit: Literal["epochs", "steps", "seconds"]
    amount: float
    reports: int
    steps_per_epoch: int

    @classmethod
    def for_trial(cls, budget: BudgetSpec, train_size: int, batch_size: int) -> TrainingBudget:
        """Raises ValueError when the training set holds less than one batch."""
        steps_per_epoch = train_size // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"batch size {batch_size} exceeds the training set ({train_size})")
        return cls(budget.unit, budget.amount, budget.report_count, steps_per_epoch)

    @property
    def total_updates(self) -> int | None:
        """Optimizer updates in the whole budget (None for a budget in seconds)."""
        if self.unit == "epochs":
            return int(self.amount) * self.steps_per_epoch
        if self.unit == "steps":
            return int(self.amount)
        return None

    def updates_at(self, report: int) -> int | None:
        """Updates done at report ``report`` (1-based): the smallest whole number of updates
        reaching ``report / reports`` of the budget. With one report per epoch, exactly
        ``report`` epochs."""
        total = self.total_updates
        return None if total is None else -(-total * report // self.reports)

    def reached(self, report: int, updates: int, seconds: float) -> bool:
        """Whether training has spent the budget up to report ``report``."""
        target = self.updates_at(report)
        if target is not None:
            return updates >= target
        return seconds >= self.amount * report / self.reports

    def fraction(self, updates: int, seconds: float) -> float:
        """The share of the budget spent, in [0, 1] (what the cosine schedule follows)."""
        total = self.total_updates
        spent = seconds / self.amount if total is None else updates / total
        return min(1.0, max(0.0, spent))

    def epochs(self, updates: int) -> float:
        """Updates expressed in epochs (passes over the training set)."""
        return updates / self.steps_per_epoch

    # What a progress display counts: the budget in its own unit, so a bar fills at the
    # pace the pruner compares trials at (updates for epochs and steps, seconds otherwise).

    @property
    def progress_total(self) -> float:
        """The bar's total: updates in the whole budget, or its seconds."""
        total = self.total_updates
        return float(self.amount if total is None else total)

    def progress_done(self, updates: int, seconds: float) -> float:
        """How much of ``progress_total`` is done (never past it)."""
        done = seconds if self.total_updates is None else float(updates)
        return min(done, self.progress_total)

    def describe(self) -> str:
        """The budget in words: "8 epochs, 4 reports (16 updates per epoch)"."""
        amount = f"{self.amount:g} s" if self.unit == "seconds" else f"{self.amount:g} {self.unit}"
        reports = f"{self.reports} report{'s' if self.reports != 1 else ''}"
        return f"{amount}, {reports} ({self.steps_per_epoch} updates per epoch)"

    def describe_spent(self, updates: int, seconds: float) -> str:
        """What a trial has spent, in the budget's unit against its total first, then in
        the other two units: "1.5/8 epochs, 24 updates, 3.1 s" (steps: "24/512 steps,
        1.5 epochs, 3.1 s"; seconds: "3.1/60 s, 24 updates, 1.5 epochs")."""
        epochs = f"{self.epochs(updates):.3g}"
        if self.unit == "epochs":
            return f"{epochs}/{self.amount:g} epochs, {updates} updates, {seconds:.3g} s"
        if self.unit == "steps":
            return f"{updates}/{self.amount:g} steps, {epochs} epochs, {seconds:.3g} s"
        return f"{seconds:.3g}/{self.amount:g} s, {updates} updates, {epochs} epochs"


def cosine_factor(fraction: float) -> float:
    """The cosine schedule's multiplier of the base LR after ``fraction`` of the budget:
    1 at the start, 0 at the end (``CosineAnnealingLR`` with ``eta_min = 0``)."""
    return 0.5 * (1.0 + math.cos(math.pi * fraction))


def check_reports_fit(budget: BudgetSpec, train_size: int, batch_size: int) -> None:
    """SpecError unless a trial at ``batch_size`` makes at least one optimizer update per
    report (a report between two updates would evaluate the same weights again)."""
    updates = TrainingBudget.for_trial(budget, train_size, batch_size).total_updates
    if updates is not None and budget.report_count > updates:
        raise SpecError(
            f"budget.reports = {budget.report_count} is more than the {updates} optimizer "
            f"updates a trial at batch size {batch_size} makes on {train_size} training "
            "patches; lower budget.reports or raise the budget"
        )
