"""Figures of the trials themselves: the objective over batch size × learning rate, the
best value and generalization gap per batch size, learning curves, parameter importances.
"""

from __future__ import annotations

from hpo.report.analysis import ReportData
from hpo.report.figures.common import (
    LR_AXIS,
    batch_axis,
    batch_size_colors,
    complete_markers,
    complete_points,
    jittered,
    report_axis,
    report_name,
)
from hpo.report.figures.model import (
    FIGURE_TITLES,
    Axis,
    Bars,
    FigureModel,
    HorizontalLine,
    Line,
    Markers,
    Panel,
    Shading,
)


def objective_plane_figure(data: ReportData) -> FigureModel:
    """Every complete trial coloured by its objective (best bright), pruned trials as x."""
    title = FIGURE_TITLES["objective_plane"]
    if not data.points:
        return FigureModel("objective_plane", title, message="No complete or pruned trials yet.")
    complete = complete_points(data)
    pruned = [p for p in data.points if p.pruned]
    shading = Shading(
        values=tuple(p.value for p in complete),
        colorscale="Viridis",
        reverse=not data.maximize,
        title=data.metric,
    )
    pruned_hover = tuple(
        f"trial {p.number} (pruned at {report_name(data)} {p.last_step})\nB={p.batch_size}"
        + (f"\n{data.metric}={p.value:.4f}" if p.value is not None else "")
        for p in pruned
    )
    layers = (
        complete_markers(complete, data.metric, "complete", shading=shading, size=11, outline=0.5),
        Markers(
            "pruned",
            x=jittered(pruned),
            y=tuple(p.lr for p in pruned),
            color="gray",
            symbol="x",
            size=9,
            hover=pruned_hover,
        ),
    )
    panel = Panel(x=batch_axis(data), y=LR_AXIS, layers=layers)
    return FigureModel("objective_plane", title, panels=(panel,))


def generalization_figure(data: ReportData) -> FigureModel:
    """Two panels: the best objective per batch size, and the train − val gap (each
    complete trial, and the best trial of each B)."""
    title = FIGURE_TITLES["generalization"]
    rows = [r for r in data.summary.by_batch_size if r.best_value is not None]
    if not rows:
        return FigureModel("generalization", title, message="No complete trials yet.")
    best = Line(
        f"best {data.metric}",
        x=tuple(r.batch_size for r in rows),
        y=tuple(r.best_value for r in rows),
        markers=True,
    )
    with_gap = [p for p in data.points if not p.pruned and p.gap is not None]
    best_gaps = [r for r in rows if r.generalization_gap is not None]
    gap_layers = (
        Markers(
            "gap, each complete trial",
            x=jittered(with_gap),
            y=tuple(p.gap for p in with_gap),
            color="lightgray",
        ),
        Line(
            "gap of the best trial",
            x=tuple(r.batch_size for r in best_gaps),
            y=tuple(r.generalization_gap for r in best_gaps),
            color="crimson",
            markers=True,
        ),
        HorizontalLine(0.0),
    )
    panels = (
        Panel(batch_axis(data), Axis(), (best,), title=f"best {data.metric}"),
        Panel(batch_axis(data), Axis(), gap_layers, title="gap: train − val accuracy"),
    )
    return FigureModel("generalization", title, panels=panels)


def learning_curves_figure(data: ReportData) -> FigureModel:
    """The reported value per epoch of every trial, one colour per batch size, pruned
    trials dotted; one legend entry per batch size."""
    title = f"{FIGURE_TITLES['learning_curves']} (dotted: pruned)"
    curves = [p for p in data.points if p.curve]
    if not curves:
        message = "No trial has reported a value yet."
        return FigureModel("learning_curves", FIGURE_TITLES["learning_curves"], message=message)
    colors = batch_size_colors(data.batch_sizes)
    lines = []
    shown: set[int] = set()
    for point in sorted(curves, key=lambda p: (p.batch_size, p.pruned, p.number)):
        lines.append(
            Line(
                f"B = {point.batch_size}",
                x=tuple(step for step, _ in point.curve),
                y=tuple(value for _, value in point.curve),
                color=colors[point.batch_size],
                dash="dot" if point.pruned else "solid",
                markers=True,
                marker_size=4,
                group=str(point.batch_size),
                show_legend=point.batch_size not in shown,
                hover=f"trial {point.number}{' (pruned)' if point.pruned else ''}, lr {point.lr:.2g}",
            )
        )
        shown.add(point.batch_size)
    panel = Panel(x=Axis(report_axis(data), integer=True), y=Axis(data.metric), layers=tuple(lines))
    return FigureModel("learning_curves", title, panels=(panel,))


def importances_figure(data: ReportData) -> FigureModel:
    """Optuna's parameter importances for the objective, largest at the top."""
    title = FIGURE_TITLES["importances"]
    if not data.importances:
        message = f"No importances: {data.importances_reason}."
        return FigureModel("importances", title, message=message)
    names = sorted(data.importances, key=data.importances.get)
    bars = Bars("importance", tuple(names), tuple(data.importances[n] for n in names))
    panel = Panel(x=Axis("importance (sums to 1)"), y=Axis(), layers=(bars,))
    title = f"{title} (Optuna's PED-ANOVA evaluator, for {data.metric})"
    return FigureModel("importances", title, panels=(panel,))
