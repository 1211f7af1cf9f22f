"""The cost figure: each complete trial's value against its time to train with the Pareto
front, the best and the fastest near-best trial, and the throughput of each batch size.
"""

from __future__ import annotations

import textwrap

from hpo.report.analysis import ReportData
from hpo.report.cost import CostPoint, CostView, percent
from hpo.report.figures.common import batch_axis, batch_size_colors
from hpo.report.figures.model import FIGURE_TITLES, Axis, FigureModel, Layer, Line, Markers, Panel


def cost_figure(data: ReportData) -> FigureModel:
    """Two panels: every complete trial's value against its time to train (one colour per
    batch size) with the Pareto front, the best trial and the fastest trial on the front
    within the tolerance of it; and the throughput of each batch size. The subtitle is the
    summary's sentence, so the picture and the words say the same."""
    title = FIGURE_TITLES["cost"]
    view = data.cost
    if view is None or not view.points:
        reason = view.describe() if view is not None else "No cost view computed."
        return FigureModel("cost", title, message=reason)
    subtitle = tuple(textwrap.wrap(view.describe(), 110))
    layers = _value_vs_time_layers(view, data.metric)
    rates = [r for r in view.by_batch_size if r.samples_per_s is not None]
    throughput = Line(
        "samples/s",
        x=tuple(r.batch_size for r in rates),
        y=tuple(r.samples_per_s for r in rates),
        color="royalblue",
        markers=True,
        show_legend=False,  # the axis says what it is
    )
    panels = (
        Panel(
            Axis("training time per trial (s)", log_base=10, plain=True),
            Axis(data.metric),
            tuple(layers),
            title=f"{data.metric} vs time to train (complete trials{_on(view)})",
        ),
        Panel(
            batch_axis(data),
            Axis("samples/s"),
            (throughput,),
            title="throughput per batch size (median)",
        ),
    )
    return FigureModel("cost", title, subtitle, panels=panels)


def _on(view: CostView) -> str:
    """`` on cpu`` when the trials record their device kind: the view compares one kind,
    or several in its seconds (`` in cpu seconds``: normalised by the probe's rates)."""
    if not view.device:
        return ""
    return f" in {view.device} seconds" if view.normalised else f" on {view.device}"


def _value_vs_time_layers(view: CostView, metric: str) -> list[Layer]:
    """Each batch size's complete trials (one colour per batch size), the Pareto front,
    and the stars of the best trial and of the fastest trial within the tolerance of it."""
    colors = batch_size_colors(sorted({p.batch_size for p in view.points}))
    layers: list[Layer] = []
    for batch_size in sorted(colors):
        mine = [p for p in view.points if p.batch_size == batch_size]
        layers.append(
            Markers(
                f"B = {batch_size}",
                x=tuple(p.train_seconds for p in mine),
                y=tuple(p.value for p in mine),
                color=colors[batch_size],
                size=9,
                outline=0.5,
                hover=tuple(_cost_hover(p, metric) for p in mine),
            )
        )
    front = view.front
    layers.append(
        Line(
            "Pareto front",
            x=tuple(p.train_seconds for p in front),
            y=tuple(p.value for p in front),
            color="black",
            width=1.5,
            dash="dash",
        )
    )
    return layers + _best_and_fastest_stars(view)


def _best_and_fastest_stars(view: CostView) -> list[Layer]:
    """The fastest trial on the front within the tolerance of the best (when it is not the
    best itself) and the best trial, as stars drawn above the other markers."""
    best, chosen = view.best, view.fastest_within
    assert best is not None and chosen is not None
    layers: list[Layer] = []
    if chosen.number != best.number:
        name = f"fastest within {percent(view.tolerance)} of the best (B = {chosen.batch_size})"
        layers.append(_star(name, chosen, "darkorange"))
    layers.append(_star(f"best (B = {best.batch_size})", best, "crimson"))
    return layers


def _star(name: str, point: CostPoint, color: str) -> Markers:
    """One trial as a star drawn above the other markers."""
    return Markers(
        name,
        x=(point.train_seconds,),
        y=(point.value,),
        color=color,
        symbol="star",
        size=16,
        outline=0.5,
        front=True,
    )


def _cost_hover(point: CostPoint, metric: str) -> str:
    lines = [f"trial {point.number}", f"B={point.batch_size}", f"{metric}={point.value:.4f}"]
    lines.append(f"{point.train_seconds:.3g} s of training")
    if point.samples_per_s:
        lines.append(f"{point.samples_per_s:,.0f} samples/s")
    if point.n_updates is not None:
        lines.append(f"{point.n_updates} updates")
    if point.train_epochs is not None:
        lines.append(f"{point.train_epochs:.3g} epochs")
    return "\n".join(lines)
