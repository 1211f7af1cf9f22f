"""What a running trial shows in the terminal (``hpo.objective.TrialProgress``).

Both displays count in the study's budget unit (``budget.unit``): "report k/N", the
points at which the pruner compares trials, and the resource spent in that unit against
the trial's budget (then in the other two units), so a steps or seconds study does not
read as if it counted epochs.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from hpo.resource import TrainingBudget
from hpo.spec import TrialParams
from hpo.train import EpochMetrics, Tally


def throughput(metrics: EpochMetrics) -> str:
    """The report interval's training throughput (``hpo.train.fit``) as ``" 1,234
    samples/s"``, or nothing when it was not measured (a report that trained no step)."""
    rate = metrics.train_samples_per_s
    if rate is None:
        return ""
    return f" {rate:,.0f} samples/s" if rate >= 100 else f" {rate:.3g} samples/s"


class LineProgress:
    """One line per event, each with a timestamp and the worker's label: for several
    processes sharing a terminal, and for logs (CI, Slurm, nohup), where a live bar would
    be cut at the console width. Lines are never wrapped or cut, whatever the width."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        self.label = label
        # soft_wrap: a line longer than the console (80 columns off a terminal) stays whole.
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.prefix = ""
        self.budget: TrainingBudget | None = None

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _print(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.console.print(f"{stamp} {self.label}{text}", markup=False, soft_wrap=True)

    def start(self, trial_number: int, params: TrialParams, budget: TrainingBudget) -> None:
        self.budget = budget
        self.prefix = f"trial {trial_number:>3}"
        self._print(
            f"{self.prefix} started B={params.batch_size} lr={params.lr:.2e} "
            f"wd={params.weight_decay:.1e} (budget {budget.describe()})"
        )

    def step(self, report: int, loss: float, tally: Tally) -> None:
        pass

    def report_end(self, metrics: EpochMetrics, objective_name: str, tally: Tally) -> None:
        assert self.budget is not None
        spent = self.budget.describe_spent(tally.updates, tally.train_seconds)
        self._print(
            f"{self.prefix} report {metrics.epoch}/{self.budget.reports} ({spent}) "
            f"loss {metrics.train_loss:.3f} {objective_name} "
            f"{metrics.objective(objective_name):.4f}{throughput(metrics)}"
        )

    def finish(self) -> None:
        pass

    def ended(self, trial_number: int, state: str, value: float | None, reason: str | None) -> None:
        outcome = state.lower() if state != "WAITING" else "re-queued"
        if value is not None:
            outcome += f" {value:.4f}"
        if reason is not None and reason != state.lower():  # "pruned (pruned)" says nothing
            outcome += f" ({reason})"
        self._print(f"trial {trial_number:>3} {outcome}")


class BarProgress:
    """A live bar for the running trial and one for the study. The trial's bar fills in
    the budget's unit (updates for epochs and steps, seconds for seconds) and its status
    reads "report k/N · spent/total unit · loss · metric"."""

    def __init__(self, total_trials: int, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.total_trials = total_trials
        self.study_task = self.progress.add_task(
            "trials", total=total_trials, status=f"0/{total_trials}"
        )
        self.trial_task: TaskID | None = None
        self.budget: TrainingBudget | None = None
        self.last_metric = ""

    def __enter__(self) -> BarProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, trial_number: int, params: TrialParams, budget: TrainingBudget) -> None:
        self.budget, self.last_metric = budget, ""
        description = f"trial {trial_number} B={params.batch_size} lr={params.lr:.1e} wd={params.weight_decay:.0e}"
        if self.trial_task is not None:
            self.progress.remove_task(self.trial_task)
        self.trial_task = self.progress.add_task(
            description, total=budget.progress_total, status=f"report 0/{budget.reports}"
        )

    def _show(self, report: int, tally: Tally, loss: float) -> None:
        assert self.budget is not None and self.trial_task is not None
        spent = self.budget.describe_spent(tally.updates, tally.train_seconds).split(", ")[0]
        self.progress.update(
            self.trial_task,
            completed=self.budget.progress_done(tally.updates, tally.train_seconds),
            status=f"report {report}/{self.budget.reports} · {spent} · loss {loss:.3f} "
            f"{self.last_metric}".rstrip(),
        )

    def step(self, report: int, loss: float, tally: Tally) -> None:
        self._show(report, tally, loss)

    def report_end(self, metrics: EpochMetrics, objective_name: str, tally: Tally) -> None:
        self.last_metric = (
            f"{objective_name} {metrics.objective(objective_name):.4f}{throughput(metrics)}"
        )
        self._show(metrics.epoch, tally, metrics.train_loss)

    def finish(self) -> None:
        self.progress.advance(self.study_task)
        (task,) = [t for t in self.progress.tasks if t.id == self.study_task]
        self.progress.update(self.study_task, status=f"{task.completed:g}/{self.total_trials}")

    def ended(self, trial_number: int, state: str, value: float | None, reason: str | None) -> None:
        pass  # the bars show the running trial; the summary table shows the ended ones
