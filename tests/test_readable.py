"""What a person reads: the objective named on the study (the dashboard shows it), and
progress as whole lines with a timestamp and worker label when stdout is not a terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from typer.testing import CliRunner

from hpo.cli import app
from hpo.cli.progress import BarProgress, LineProgress
from hpo.resource import TrainingBudget
from hpo.spec import TrialParams, load_spec
from hpo.study import create_or_load_study
from hpo.train import EpochMetrics, Tally

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_a_new_study_names_its_objective(tiny_study: Path) -> None:
    loaded = create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db")
    assert loaded.study.metric_names == ["val_auc"]
    assert optuna.load_study(study_name="tiny", storage="sqlite:///hpo.db").metric_names == [
        "val_auc"
    ]


def test_progress_lines_off_a_terminal_are_whole_timestamped_and_labelled() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, highlight=False, soft_wrap=True)
    progress = LineProgress("[node-7 gpu 3] ", console)
    budget = TrainingBudget("epochs", 4, 4, 1024)
    progress.start(12, TrialParams(batch_size=256, lr=0.0123, weight_decay=3.4e-5), budget)
    tally = Tally(updates=1024, train_samples=1024 * 256, train_seconds=12.5)
    progress.report_end(EpochMetrics(1, 0.6931, 0.5, 0.7, 0.51, 0.8765, 12345.6), "val_auc", tally)
    progress.finish()
    progress.ended(12, "COMPLETE", 0.8765, None)
    progress.ended(13, "PRUNED", None, "diverged")
    progress.ended(14, "FAIL", None, "oom")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert re.fullmatch(
        STAMP + r"\[node-7 gpu 3\] trial  12 started B=256 lr=1\.23e-02 wd=3\.4e-05 "
        r"\(budget 4 epochs, 4 reports \(1024 updates per epoch\)\)",
        lines[0],
    )
    assert re.fullmatch(
        STAMP + r"\[node-7 gpu 3\] trial  12 report 1/4 \(1/4 epochs, 1024 updates, 12\.5 s\) "
        r"loss 0\.693 val_auc 0\.8765 12,346 samples/s",
        lines[1],
    )
    assert re.fullmatch(STAMP + r"\[node-7 gpu 3\] trial  12 complete 0\.8765", lines[2])
    assert re.fullmatch(STAMP + r"\[node-7 gpu 3\] trial  13 pruned \(diverged\)", lines[3])
    assert re.fullmatch(STAMP + r"\[node-7 gpu 3\] trial  14 fail \(oom\)", lines[4])
    assert len(lines[0]) > 80 and "…" not in out.getvalue()


def test_launch_off_a_terminal_prints_lines_not_a_bar(tiny_study: Path) -> None:
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 0, result.output
    assert re.search(STAMP + r"trial   0 started B=\d+", result.output)
    epochs = re.findall(
        STAMP + r"trial   0 report (\d)/2 \(\d/2 epochs, \d+ updates, [\d.]+ s\) loss [\d.]+ "
        r"val_auc [\d.]+ ([\d,.]+) samples/s$",
        result.output,
        re.M,
    )
    assert [epoch for epoch, _ in epochs] == ["1", "2"]
    rates = [float(rate.replace(",", "")) for _, rate in epochs]
    # A small CNN on 32 px patches on a shared CPU trains hundreds to thousands of samples
    # per second; 0 or millions would be a wrong clock.
    assert all(5 < rate < 1e6 for rate in rates)
    # Each line is its own epoch's rate: the whole run's (the trial's samples_per_s, all
    # samples over all training time) is their weighted harmonic mean, so it lies between.
    trial = optuna.load_study(study_name="tiny", storage="sqlite:///hpo.db").trials[0]
    overall = trial.user_attrs["samples_per_s"]
    assert min(rates) * 0.99 - 1 <= overall <= max(rates) * 1.01 + 1
    assert re.search(
        STAMP + r"trial   0 (complete [\d.]+|pruned( \(diverged\))?)$", result.output, re.M
    )
    assert "trials ━" not in result.output and "trials  " not in result.output


@pytest.mark.parametrize(
    ("unit", "amount", "status", "total"),
    [
        ("epochs", 4, "report 2/4 · 1.5/4 epochs · loss 0.500 val_auc 0.8000", 64),
        ("steps", 100, "report 2/4 · 24/100 steps · loss 0.500 val_auc 0.8000", 100),
        ("seconds", 60, "report 2/4 · 3.5/60 s · loss 0.500 val_auc 0.8000", 60),
    ],
)
def test_the_bar_counts_reports_and_the_budget_in_its_unit(
    unit: str, amount: float, status: str, total: float
) -> None:
    console = Console(file=io.StringIO(), width=200)
    bar = BarProgress(3, console)
    budget = TrainingBudget(unit, amount, 4, 16)
    bar.start(7, TrialParams(batch_size=64, lr=0.01, weight_decay=1e-4), budget)
    tally = Tally(updates=24, train_samples=24 * 64, train_seconds=3.5)
    bar.step(2, 0.7, tally)
    bar.report_end(EpochMetrics(2, 0.5, None, 0.6, 0.7, 0.8), "val_auc", tally)
    (task,) = [t for t in bar.progress.tasks if t.id == bar.trial_task]
    assert task.fields["status"] == status
    assert task.total == total
    assert task.completed == (3.5 if unit == "seconds" else 24)
    bar.finish()
    (study,) = [t for t in bar.progress.tasks if t.id == bar.study_task]
    assert study.fields["status"] == "1/3"  # trials, counted apart from the budget


@pytest.mark.parametrize(
    ("unit", "amount", "started", "report"),
    [
        (
            "steps",
            100,
            "budget 100 steps, 4 reports",
            "report 1/4 (24/100 steps, 1.5 epochs, 3.5 s)",
        ),
        ("seconds", 60, "budget 60 s, 4 reports", "report 1/4 (3.5/60 s, 24 updates, 1.5 epochs)"),
    ],
)
def test_log_lines_name_what_they_count_in_the_studys_unit(
    unit: str, amount: float, started: str, report: str
) -> None:
    out = io.StringIO()
    progress = LineProgress("", Console(file=out, width=80, highlight=False, soft_wrap=True))
    budget = TrainingBudget(unit, amount, 4, 16)
    progress.start(3, TrialParams(batch_size=64, lr=0.01, weight_decay=1e-4), budget)
    tally = Tally(updates=24, train_samples=24 * 64, train_seconds=3.5)
    progress.report_end(EpochMetrics(1, 0.5, None, 0.6, 0.7, 0.8), "val_auc", tally)
    first, second = out.getvalue().splitlines()
    assert f"({started} (16 updates per epoch))" in first
    assert f"trial   3 {report} loss 0.500 val_auc 0.8000" in second
    assert " epoch " not in second


def test_status_off_a_terminal_prints_the_table_whole(tiny_study: Path) -> None:
    """A log has no width: the per-batch-size table must not be cut to 80 columns."""
    runner = CliRunner()
    assert runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"]).exit_code == 0
    result = runner.invoke(app, ["status", "--study", "tiny"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert "complete" in result.output and "weight decay" in result.output
