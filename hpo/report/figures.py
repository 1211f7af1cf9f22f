"""Figure models: for each of the report's figures, exactly what is drawn.

A model is plain data (titles, axes, and layers of markers, lines, the α band and bars) with
every number already computed from ``ReportData``. The plotly renderer (HTML, dashboard) and
the matplotlib renderer (PNG) only draw a model, so the two files of one figure cannot
disagree: in particular the α interval band is computed once, in ``alpha_band``.

Sizes and widths are in screen pixels (plotly's unit); the PNG renderer converts them.
Hover texts separate lines with "\\n"; only the HTML shows them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from hpo.report.analysis import ReportData, ScalingFit, TrialPoint
from hpo.report.cost import CostPoint, percent
from hpo.report.noise_scale import NoiseScaleCurve, examples

FIGURE_NAMES = (
    "lr_scaling",
    "objective_plane",
    "generalization",
    "learning_curves",
    "importances",
    "noise_scale",
    "cost",
)
FIGURE_TITLES = {
    "lr_scaling": "Best learning rate per batch size (lr* ∝ B^α)",
    "objective_plane": "Objective over batch size × learning rate",
    "generalization": "Best value and generalization gap per batch size",
    "learning_curves": "Learning curves by batch size",
    "importances": "Parameter importances",
    "noise_scale": "Gradient noise scale and the critical batch size",
    "cost": "Value vs time to train, with the Pareto front",
}
# Points on the fitted line, the α band and the reference rules, spread evenly in log B
# between the smallest and the largest fitted batch size: enough for a smooth band edge.
CURVE_POINTS = 21
# Royal blue, as hex so that both renderers can give the band its opacity.
BAND_COLOR = "#4169e1"
# The studied batch-size range behind the B_simple curves, and the ridge ε_max/(1+B_noise/B).
RANGE_COLOR = "#808080"
RIDGE_COLOR = "darkorange"


@dataclass(frozen=True)
class Axis:
    """One axis. ``log_base`` None is linear; the batch-size axis uses 2, learning rate 10.
    ``ticks`` puts a tick, labelled with its value, at each batch size (None: automatic)."""

    title: str | None = None
    log_base: int | None = None
    ticks: tuple[int, ...] | None = None
    integer: bool = False
    # Label a log axis's ticks as plain numbers (5, 10, 20), not powers of ten: for an axis
    # spanning less than a few decades, such as seconds of training.
    plain: bool = False


@dataclass(frozen=True)
class Shading:
    """Colour each marker by a value (the objective) instead of one colour."""

    values: tuple[float, ...]
    colorscale: str
    reverse: bool
    title: str


@dataclass(frozen=True)
class Markers:
    """A scatter of points. ``front`` puts them above lines and bands in the PNG (plotly
    draws in layer order)."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    color: str | None = None
    shading: Shading | None = None
    symbol: Literal["circle", "star", "x"] = "circle"
    size: float | None = None
    outline: float = 0.0
    hover: tuple[str, ...] | None = None
    front: bool = False


@dataclass(frozen=True)
class Line:
    """A polyline. ``color`` None takes the renderer's first default colour; ``group`` and
    ``show_legend`` give several lines (one batch size) a single legend entry."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    color: str | None = None
    width: float | None = None
    dash: Literal["solid", "dash", "dot"] = "solid"
    markers: bool = False
    marker_size: float | None = None
    group: str | None = None
    show_legend: bool = True
    hover: str | None = None


@dataclass(frozen=True)
class Band:
    """A filled region between ``lower`` and ``upper`` at each ``x``."""

    label: str
    x: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    color: str = BAND_COLOR
    opacity: float = 0.15


@dataclass(frozen=True)
class Bars:
    """Horizontal bars, one per name, bottom to top."""

    label: str
    names: tuple[str, ...]
    values: tuple[float, ...]
    color: str = "royalblue"


@dataclass(frozen=True)
class HorizontalLine:
    """A thin reference line across the panel at ``y``."""

    y: float
    color: str = "black"
    width: float = 0.8


Layer = Markers | Line | Band | Bars | HorizontalLine


@dataclass(frozen=True)
class Panel:
    """One set of axes and what is drawn on them, bottom layer first."""

    x: Axis
    y: Axis
    layers: tuple[Layer, ...]
    title: str | None = None


@dataclass(frozen=True)
class FigureModel:
    """One figure. With ``message`` set there is nothing to plot yet and the figure shows
    only its title and the message (why it is empty)."""

    name: str
    title: str
    subtitle: tuple[str, ...] = ()
    panels: tuple[Panel, ...] = ()
    message: str | None = None

    def layers(self) -> list[Layer]:
        """Every layer of every panel, for tests and for finding one by type."""
        return [layer for panel in self.panels for layer in panel.layers]


def figure_models(data: ReportData) -> dict[str, FigureModel]:
    """The six figure models, in ``FIGURE_NAMES`` order."""
    return {name: FIGURE_BUILDERS[name](data) for name in FIGURE_NAMES}


# --------------------------------------------------------------------------- helpers


def _jitter(number: int) -> float:
    """A deterministic factor near 1 that spreads trials of one batch size apart on a log
    axis, so points at the same B do not hide each other."""
    return 2.0 ** ((((number * 0.6180339887) % 1.0) - 0.5) * 0.35)


def _jittered(points: list[TrialPoint]) -> tuple[float, ...]:
    return tuple(p.batch_size * _jitter(p.number) for p in points)


def _batch_axis(data: ReportData) -> Axis:
    return Axis("batch size B", log_base=2, ticks=tuple(data.batch_sizes))


LR_AXIS = Axis("learning rate", log_base=10)


def _complete_points(data: ReportData) -> list[TrialPoint]:
    return [p for p in data.points if not p.pruned and p.value is not None]


def _complete_markers(points: list[TrialPoint], metric: str, label: str, **style: Any) -> Markers:
    """Complete trials on the batch size × learning-rate plane, jittered along B, with a
    hover label naming the trial, its batch size and its objective."""
    return Markers(
        label=label,
        x=_jittered(points),
        y=tuple(p.lr for p in points),
        hover=tuple(f"trial {p.number}\nB={p.batch_size}\n{metric}={p.value:.4f}" for p in points),
        **style,
    )


def _report_name(data: ReportData) -> str:
    """What a reported step is: "epoch" when a study reports once per epoch (or records no
    budget: studies from before reports were counted did), else "report"."""
    return "epoch" if _reports_per_epoch(data) else "report"


def _report_axis(data: ReportData) -> str:
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


def _colors(batch_sizes: list[int]) -> dict[int, str]:
    """One Viridis colour per batch size, small B dark, large B bright (plotly 'rgb(…)')."""
    from plotly.colors import sample_colorscale

    if len(batch_sizes) == 1:
        return {batch_sizes[0]: sample_colorscale("Viridis", [0.4])[0]}
    samples = sample_colorscale(
        "Viridis", [i / (len(batch_sizes) - 1) * 0.9 for i in range(len(batch_sizes))]
    )
    return dict(zip(batch_sizes, samples, strict=True))


# --------------------------------------------------------------------------- lr scaling


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


def _fitted_and_best_markers(data: ReportData, size: int) -> list[Layer]:
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
    complete = _complete_points(data)
    if not complete:
        return FigureModel("lr_scaling", title, subtitle, message="No complete trials yet.")
    layers: list[Layer] = [
        _complete_markers(complete, data.metric, "complete trials", color="lightgray", size=7),
        *_fitted_and_best_markers(data, size=9),
        *_fit_layers(fit),
    ]
    panel = Panel(x=_batch_axis(data), y=LR_AXIS, layers=tuple(layers))
    return FigureModel("lr_scaling", title, subtitle, panels=(panel,))


# --------------------------------------------------------------------------- the others


def objective_plane_figure(data: ReportData) -> FigureModel:
    """Every complete trial coloured by its objective (best bright), pruned trials as x."""
    title = FIGURE_TITLES["objective_plane"]
    if not data.points:
        return FigureModel("objective_plane", title, message="No complete or pruned trials yet.")
    complete = _complete_points(data)
    pruned = [p for p in data.points if p.pruned]
    shading = Shading(
        values=tuple(p.value for p in complete),
        colorscale="Viridis",
        reverse=not data.maximize,
        title=data.metric,
    )
    pruned_hover = tuple(
        f"trial {p.number} (pruned at {_report_name(data)} {p.last_step})\nB={p.batch_size}"
        + (f"\n{data.metric}={p.value:.4f}" if p.value is not None else "")
        for p in pruned
    )
    layers = (
        _complete_markers(complete, data.metric, "complete", shading=shading, size=11, outline=0.5),
        Markers(
            "pruned",
            x=_jittered(pruned),
            y=tuple(p.lr for p in pruned),
            color="gray",
            symbol="x",
            size=9,
            hover=pruned_hover,
        ),
    )
    panel = Panel(x=_batch_axis(data), y=LR_AXIS, layers=layers)
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
            x=_jittered(with_gap),
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
        Panel(_batch_axis(data), Axis(), (best,), title=f"best {data.metric}"),
        Panel(_batch_axis(data), Axis(), gap_layers, title="gap: train − val accuracy"),
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
    colors = _colors(data.batch_sizes)
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
    panel = Panel(
        x=Axis(_report_axis(data), integer=True), y=Axis(data.metric), layers=tuple(lines)
    )
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


# --------------------------------------------------------------------------- noise scale


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
    if measured is not None and measured.median is not None:
        parts.append(
            f"B_simple {examples(measured.median)} (quartiles {examples(measured.low)}–"
            f"{examples(measured.high)}, {measured.n_trials} best trials, last epoch)"
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
    if data.noise_scale is not None and data.noise_scale.median is not None:
        references.append(("measured B_simple (median)", data.noise_scale.median, "black"))
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
    layers: list[Layer] = _fitted_and_best_markers(data, size=8)
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
    curve_layers, ys = _noise_curve_layers(data, curves, _colors(data.batch_sizes))
    curve_title = (
        f"B_simple per epoch, top {data.fit.top_k} trials per B"
        if curves
        else "B_simple: no trial has measured one yet"
    )
    panels = (
        Panel(
            Axis("epoch", integer=True),
            Axis("B_simple (examples)", log_base=2, ticks=power_of_two_ticks(ys)),
            tuple(curve_layers),
            title=curve_title,
        ),
        Panel(_batch_axis(data), LR_AXIS, tuple(_ridge_layers(data)), title="LR ridge, both fits"),
    )
    return FigureModel("noise_scale", title, subtitle, panels=panels)


# --------------------------------------------------------------------------- cost


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
    colors = _colors(sorted({p.batch_size for p in view.points}))
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
                hover=tuple(_cost_hover(p, data.metric) for p in mine),
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
    best, chosen = view.best, view.fastest_within
    assert best is not None and chosen is not None
    if chosen.number != best.number:
        layers.append(
            Markers(
                f"fastest within {percent(view.tolerance)} of the best (B = {chosen.batch_size})",
                x=(chosen.train_seconds,),
                y=(chosen.value,),
                color="darkorange",
                symbol="star",
                size=16,
                outline=0.5,
                front=True,
            )
        )
    layers.append(
        Markers(
            f"best (B = {best.batch_size})",
            x=(best.train_seconds,),
            y=(best.value,),
            color="crimson",
            symbol="star",
            size=16,
            outline=0.5,
            front=True,
        )
    )
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
            title=f"{data.metric} vs time to train (complete trials)",
        ),
        Panel(
            _batch_axis(data),
            Axis("samples/s"),
            (throughput,),
            title="throughput per batch size (median)",
        ),
    )
    return FigureModel("cost", title, subtitle, panels=panels)


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


FIGURE_BUILDERS: dict[str, Callable[[ReportData], FigureModel]] = {
    "lr_scaling": lr_scaling_figure,
    "objective_plane": objective_plane_figure,
    "generalization": generalization_figure,
    "learning_curves": learning_curves_figure,
    "importances": importances_figure,
    "noise_scale": noise_scale_figure,
    "cost": cost_figure,
}
