"""What several figures share: the batch-size and learning-rate axes, complete trials as
jittered markers on the batch size × learning-rate plane, one colour per batch size, and what
a reported step is called.
"""

from __future__ import annotations

from typing import Any

from hpo.report.analysis import ReportData, TrialPoint
from hpo.report.figures.model import Axis, Markers


def _jitter(number: int) -> float:
    """A deterministic factor near 1 that spreads trials of one batch size apart on a log
    axis, so points at the same B do not hide each other."""
    return 2.0 ** ((((number * 0.6180339887) % 1.0) - 0.5) * 0.35)


def jittered(points: list[TrialPoint]) -> tuple[float, ...]:
    return tuple(p.batch_size * _jitter(p.number) for p in points)


def batch_axis(data: ReportData) -> Axis:
    return Axis("batch size B", log_base=2, ticks=tuple(data.batch_sizes))


LR_AXIS = Axis("learning rate", log_base=10)


def complete_points(data: ReportData) -> list[TrialPoint]:
    return [p for p in data.points if not p.pruned and p.value is not None]


def complete_markers(points: list[TrialPoint], metric: str, label: str, **style: Any) -> Markers:
    """Complete trials on the batch size × learning-rate plane, jittered along B, with a
    hover label naming the trial, its batch size and its objective."""
    return Markers(
        label=label,
        x=jittered(points),
        y=tuple(p.lr for p in points),
        hover=tuple(f"trial {p.number}\nB={p.batch_size}\n{metric}={p.value:.4f}" for p in points),
        **style,
    )


def report_name(data: ReportData) -> str:
    """What a reported step is: "epoch" when a study reports once per epoch (or records no
    budget: studies from before reports were counted did), else "report"."""
    return "epoch" if _reports_per_epoch(data) else "report"


def report_axis(data: ReportData) -> str:
    """The reported-step axis's title: "epoch", or "report (every 0.5 epochs)" from the
    budget between two reports in the study's unit ("report (budget in steps)" when only
    the unit is recorded)."""
    if _reports_per_epoch(data):
        return "epoch"
    unit, every = data.summary.budget_unit, data.summary.budget_per_report
    if every is None:
        return f"report (budget in {unit})"
    amount = f"{every:.3g} s" if unit == "seconds" else f"{every:.3g} {unit}"
    return f"report (every {amount})"


def _reports_per_epoch(data: ReportData) -> bool:
    unit, every = data.summary.budget_unit, data.summary.budget_per_report
    return unit is None or (unit == "epochs" and every is not None and every == 1.0)


def batch_size_colors(batch_sizes: list[int]) -> dict[int, str]:
    """One Viridis colour per batch size, small B dark, large B bright (plotly 'rgb(…)')."""
    from plotly.colors import sample_colorscale

    if len(batch_sizes) == 1:
        return {batch_sizes[0]: sample_colorscale("Viridis", [0.4])[0]}
    samples = sample_colorscale(
        "Viridis", [i / (len(batch_sizes) - 1) * 0.9 for i in range(len(batch_sizes))]
    )
    return dict(zip(batch_sizes, samples, strict=True))
