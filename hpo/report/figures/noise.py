"""The gradient noise scale figure: B_simple over training against the studied batch sizes,
and the LR ridge with both fits (the power law and ε_max / (1 + B_noise / B)).
"""

from __future__ import annotations

import math

from hpo.report.analysis import ReportData
from hpo.report.figures.common import LR_AXIS, batch_axis, batch_size_colors
from hpo.report.figures.lr_scaling import fit_grid, fitted_and_best_markers
from hpo.report.figures.model import FIGURE_TITLES, Axis, Band, FigureModel, Layer, Line, Panel
from hpo.report.noise_scale import NoiseScaleCurve, examples

# The studied batch-size range behind the B_simple curves, and the ridge ε_max/(1+B_noise/B).
RANGE_COLOR = "#808080"
RIDGE_COLOR = "darkorange"


def power_of_two_ticks(values: list[float], most: int = 10) -> tuple[int, ...]:
    """Powers of two from just below the smallest to just above the largest of ``values``
    (positive), every other one when there would be more than ``most``: the B_simple axis
    is read in batch sizes."""
    low = math.floor(math.log2(min(values)))
    high = math.ceil(math.log2(max(values)))
    exponents = list(range(low, high + 1))
    while len(exponents) > most:
        exponents = exponents[::2]
    return tuple(2**e for e in exponents)


def consecutive_runs(
    values: tuple[tuple[int, float], ...],
) -> list[tuple[tuple[int, float], ...]]:
    """(epoch, value) pairs split where an epoch is missing, so a line is not drawn across
    an unmeasured epoch as if it had been measured."""
    runs: list[list[tuple[int, float]]] = []
    for epoch, value in values:
        if runs and runs[-1][-1][0] == epoch - 1:
            runs[-1].append((epoch, value))
        else:
            runs.append([(epoch, value)])
    return [tuple(run) for run in runs]


def _noise_subtitle(data: ReportData) -> tuple[str, ...]:
    """The two numbers side by side: measured B_simple (median of the best trials) and the
    ridge's B_noise, each with its spread."""
    parts = []
    measured = data.noise_scale
    if measured is not None and measured.pooled is not None:
        high = measured.interval_high
        interval = (
            f"{examples(measured.interval_low or 0.0)}–{examples(high)}"
            if high is not None
            else f"≥ {examples(measured.interval_low or 0.0)}"
        )
        parts.append(
            f"B_simple {examples(measured.pooled)} ({measured.confidence:.0%} interval "
            f"{interval}, {measured.n_trials} best trials pooled)"
        )
    elif measured is not None and measured.median is not None:
        parts.append(
            f"B_simple {examples(measured.median)} (quartiles {examples(measured.low)}–"
            f"{examples(measured.high)}, {measured.n_trials} best trials, last report)"
        )
    ridge = data.ridge
    if ridge is not None and ridge.b_noise is not None:
        interval = (
            f" [{examples(ridge.b_noise_low)}, {examples(ridge.b_noise_high)}]"
            if ridge.b_noise_low is not None and ridge.b_noise_high is not None
            else ""
        )
        where = {"low": "flat ridge, ", "high": "ridge still rising, "}.get(ridge.edge or "", "")
        parts.append(f"{where}ridge B_noise {examples(ridge.b_noise)}{interval}")
    lines = [" · ".join(parts) if parts else "no B_simple measured and no ridge fitted yet"]
    measured_at = {curve.batch_size for curve in data.noise_curves}
    missing = [b for b in data.fit.batch_sizes if b not in measured_at]
    if data.noise_curves and missing:
        # Measured every NOISE_SCALE_EVERY-th update: a short trial at a large batch
        # may have too few updates (or only non-positive estimates) to show one.
        lines.append(f"no B_simple among the top trials at B = {', '.join(map(str, missing))}")
    return tuple(lines)


def _noise_curve_layers(
    data: ReportData, curves: list[NoiseScaleCurve], colors: dict[int, str]
) -> tuple[list[Layer], list[float]]:
    """The studied batch-size range as a band across the epochs, one line per trial
    coloured by its batch size (one legend entry per B), and the measured median and the
    ridge's B_noise as horizontal references. Also every y drawn, for the ticks."""
    epochs = [epoch for curve in curves for epoch, _ in curve.values] or [1]
    first, last = min(epochs), max(epochs)
    if first == last:
        first, last = first - 0.5, last + 0.5
    low_b, high_b = min(data.batch_sizes), max(data.batch_sizes)
    layers: list[Layer] = [
        Band(
            f"studied batch sizes {low_b}–{high_b}",
            x=(first, last),
            lower=(low_b, low_b),
            upper=(high_b, high_b),
            color=RANGE_COLOR,
            opacity=0.18,
        )
    ]
    ys = [float(low_b), float(high_b)]
    shown: set[int] = set()
    for curve in curves:
        lr = "" if curve.lr is None else f", lr {curve.lr:.2g}"
        for run in consecutive_runs(curve.values):
            layers.append(
                Line(
                    f"B = {curve.batch_size}",
                    x=tuple(epoch for epoch, _ in run),
                    y=tuple(value for _, value in run),
                    color=colors[curve.batch_size],
                    markers=True,
                    marker_size=5,
                    group=str(curve.batch_size),
                    show_legend=curve.batch_size not in shown,
                    hover=f"trial {curve.number}, B = {curve.batch_size}{lr}",
                )
            )
            shown.add(curve.batch_size)
        ys += [value for _, value in curve.values]
    references = []
    measured = data.noise_scale
    if measured is not None and measured.value is not None:
        name = "pooled" if measured.pooled is not None else "median"
        references.append((f"measured B_simple ({name})", measured.value, "black"))
    # A B_noise far outside the studied batch sizes is only a bound (RidgeFit.edge): not drawn.
    if data.ridge is not None and data.ridge.b_noise is not None and data.ridge.edge is None:
        references.append(("ridge B_noise", data.ridge.b_noise, RIDGE_COLOR))
    for label, value, color in references:
        layers.append(Line(label, (first, last), (value, value), color=color, width=2, dash="dash"))
        ys.append(value)
    return layers, ys


def _ridge_layers(data: ReportData) -> list[Layer]:
    """The fitted points and the best per B, the power law lr* ∝ B^α and the ridge
    ε_opt(B) = ε_max / (1 + B_noise / B), both drawn over the same batch sizes."""
    fit = data.fit
    layers: list[Layer] = fitted_and_best_markers(data, size=8)
    if fit.alpha is None:
        return layers
    xs = fit_grid(fit)
    layers.append(
        Line(
            f"power law lr* ∝ B^α, α = {fit.alpha:.2f}",
            xs,
            tuple(fit.lr_at(x) for x in xs),
            color="royalblue",
            width=2.5,
        )
    )
    ridge = data.ridge
    if ridge is not None and ridge.b_noise is not None:
        layers.append(
            Line(
                f"ε_max / (1 + B_noise / B), B_noise = {examples(ridge.b_noise)}",
                xs,
                tuple(ridge.lr_at(x) for x in xs),
                color=RIDGE_COLOR,
                width=2.5,
                dash="dash",
            )
        )
    return layers


def noise_scale_figure(data: ReportData) -> FigureModel:
    """Two panels. Left: B_simple over training (per epoch) of the top trials of each
    batch size, coloured by B, over the studied batch-size range (shaded): where the curves
    run above the band, every studied batch is below the critical batch size. Right: the
    LR ridge (best lr per B) with both fits, the power law and ε_max/(1 + B_noise/B)."""
    title = FIGURE_TITLES["noise_scale"]
    curves = data.noise_curves
    if not curves and not data.fit.points:
        message = "No complete trial yet: nothing to compare (B_simple is measured in training)."
        return FigureModel("noise_scale", title, message=message)
    subtitle = _noise_subtitle(data)
    curve_layers, ys = _noise_curve_layers(data, curves, batch_size_colors(data.batch_sizes))
    curve_title = (
        f"B_simple at each report, top {data.fit.top_k} trials per B"
        if curves
        else "B_simple: no trial has measured one yet"
    )
    panels = (
        Panel(
            Axis("report", integer=True),
            Axis("B_simple (examples)", log_base=2, ticks=power_of_two_ticks(ys)),
            tuple(curve_layers),
            title=curve_title,
        ),
        Panel(batch_axis(data), LR_AXIS, tuple(_ridge_layers(data)), title="LR ridge, both fits"),
    )
    return FigureModel("noise_scale", title, subtitle, panels=panels)
