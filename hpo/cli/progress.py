"""What a running trial shows in the terminal (``hpo.objective.TrialProgress``)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.spec import TrialParams
from hpo.train import EpochMetrics


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
        self.epochs = 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _print(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.console.print(f"{stamp} {self.label}{text}", markup=False, soft_wrap=True)

    def start(self, trial_number: int, params: TrialParams, epochs: int, steps: int) -> None:
        self.epochs = epochs
        self.prefix = f"trial {trial_number:>3}"
        self._print(
            f"{self.prefix} started B={params.batch_size} lr={params.lr:.2e} "
            f"wd={params.weight_decay:.1e} ({epochs} epochs of {steps} steps)"
        )

    def step(self, epoch: int, loss: float) -> None:
        pass

    def epoch_end(self, metrics: EpochMetrics, objective_name: str) -> None:
        self._print(
            f"{self.prefix} epoch {metrics.epoch}/{self.epochs} loss {metrics.train_loss:.3f} "
            f"{objective_name} {metrics.objective(objective_name):.4f}{throughput(metrics)}"
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
        self.last_metric = (
            f"{objective_name} {metrics.objective(objective_name):.4f}{throughput(metrics)}"
        )
        self.progress.update(
            self.trial_task,
            completed=metrics.epoch * self.steps,
            status=f"epoch {metrics.epoch}/{self.epochs} loss {metrics.train_loss:.3f} {self.last_metric}",
        )

    def finish(self) -> None:
        self.progress.advance(self.study_task)

    def ended(self, trial_number: int, state: str, value: float | None, reason: str | None) -> None:
        pass  # the bars show the running trial; the summary table shows the ended ones
