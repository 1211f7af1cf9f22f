"""The learning-rate scaling figure: the best learning rate per batch size with the fit
lr* ∝ B^α, its α interval band (``alpha_band``) and the linear and square-root rules.
"""

from __future__ import annotations

import math
import textwrap

from hpo.report.analysis import ReportData, ScalingFit
from hpo.report.figures.common import (
    LR_AXIS,
    batch_axis,
    complete_markers,
    complete_points,
)
from hpo.report.figures.model import FIGURE_TITLES, Band, FigureModel, Layer, Line, Markers, Panel

# Points on the fitted line, the α band and the reference rules, spread evenly in log B
# between the smallest and the largest fitted batch size: enough for a smooth band edge.
CURVE_POINTS = 21


def _fit_title(fit: ScalingFit) -> tuple[str, tuple[str, ...]]:
    """Title and short subtitle lines (they fit the dashboard's half-width cards)."""
    head = FIGURE_TITLES["lr_scaling"]
    if fit.alpha is None:
        return head, tuple(textwrap.wrap(f"No fit: {fit.reason}.", 80))
    if fit.alpha_low is None or fit.alpha_high is None:
        return f"{head}: α = {fit.alpha:.2f}", (f"no interval: {fit.n_points} points",)
    verdicts = [
        f"α = {alpha:g} ({name}) {'inside' if fit.contains(alpha) else 'outside'}"
        for alpha, name in ((1.0, "linear"), (0.5, "square root"))
    ]
    return (
        f"{head}: α = {fit.alpha:.2f} [{fit.alpha_low:.2f}, {fit.alpha_high:.2f}]",
        (f"{fit.confidence:.0%} interval · {' · '.join(verdicts)} · {fit.n_points} points",),
    )


def fit_center(fit: ScalingFit) -> float:
    """The geometric mean of the fitted points' batch sizes: there the least-squares line
    passes through the mean of log2 lr, so its height does not depend on α."""
    return 2.0 ** (sum(math.log2(b) for b, _ in fit.points) / fit.n_points)


def fit_grid(fit: ScalingFit) -> tuple[float, ...]:
    """Batch sizes at which the fit, band and rules are drawn (evenly spaced in log B)."""
    low, high = min(fit.batch_sizes), max(fit.batch_sizes)
    return tuple(low * (high / low) ** (i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS))


def alpha_band(fit: ScalingFit, xs: tuple[float, ...]) -> Band | None:
    """The α interval drawn as a band: the lines lr_c · (B / B_c)^α for α at both ends of
    the interval, pivoted at the fit's centre (B_c, lr_c) (``fit_center``), where the slope's
    uncertainty alone moves nothing. At each B the band spans the lower and the higher of the
    two lines, so it is right on both sides of the pivot whichever end is steeper. None
    without an interval (fewer than three points)."""
    if fit.alpha_low is None or fit.alpha_high is None:
        return None
    center = fit_center(fit)
    lr_center = fit.lr_at(center)
    low_edge = [lr_center * (x / center) ** fit.alpha_low for x in xs]
    high_edge = [lr_center * (x / center) ** fit.alpha_high for x in xs]
    return Band(
        label=f"{fit.confidence:.0%} interval of α",
        x=xs,
        lower=tuple(min(a, b) for a, b in zip(low_edge, high_edge, strict=True)),
        upper=tuple(max(a, b) for a, b in zip(low_edge, high_edge, strict=True)),
    )


def _fit_layers(fit: ScalingFit) -> list[Layer]:
    """The α band, the fitted line, and the linear and square-root rules through the same
    centre (so they differ from the fit in slope only)."""
    if fit.alpha is None:
        return []
    xs = fit_grid(fit)
    center = fit_center(fit)
    lr_center = fit.lr_at(center)
    band = alpha_band(fit, xs)
    layers: list[Layer] = [] if band is None else [band]
    layers.append(
        Line(
            f"fit α = {fit.alpha:.2f}",
            xs,
            tuple(fit.lr_at(x) for x in xs),
            color="royalblue",
            width=3,
        )
    )
    for alpha, label, dash in (
        (1.0, "linear rule α = 1", "dash"),
        (0.5, "square-root rule α = 0.5", "dot"),
    ):
        rule = tuple(lr_center * (x / center) ** alpha for x in xs)
        layers.append(Line(label, xs, rule, color="black", width=1.5, dash=dash))
    return layers


def fitted_and_best_markers(data: ReportData, size: int) -> list[Layer]:
    """The α fit's point per batch size (the geometric mean LR of its near-best trials)
    and the best trial of each batch size (a star ``size + 4``): what both LR-against-B
    panels show."""
    fit = data.fit
    bests = [r for r in data.summary.by_batch_size if r.best_lr is not None]
    return [
        Markers(
            "best LR per B (fitted: near-best trials)",
            x=tuple(b for b, _ in fit.points),
            y=tuple(lr for _, lr in fit.points),
            color="royalblue",
            size=size,
        ),
        Markers(
            "best per B",
            x=tuple(r.batch_size for r in bests),
            y=tuple(r.best_lr for r in bests),
            color="crimson",
            symbol="star",
            size=size + 4,
            front=True,
        ),
    ]


def lr_scaling_figure(data: ReportData) -> FigureModel:
    """Best learning rate per batch size: all complete trials, the fitted point of each B
    (near-best trials averaged), the best of each B, and the fit with its α band against the linear and square-root rules."""
    fit = data.fit
    title, subtitle = _fit_title(fit)
    complete = complete_points(data)
    if not complete:
        return FigureModel("lr_scaling", title, subtitle, message="No complete trials yet.")
    layers: list[Layer] = [
        complete_markers(complete, data.metric, "complete trials", color="lightgray", size=7),
        *fitted_and_best_markers(data, size=9),
        *_fit_layers(fit),
    ]
    panel = Panel(x=batch_axis(data), y=LR_AXIS, layers=tuple(layers))
    return FigureModel("lr_scaling", title, subtitle, panels=(panel,))
