"""Figure models: for each of the report's figures, exactly what is drawn.

A model is plain data (titles, axes, and layers of markers, lines, the α band and bars) with
every number already computed from ``ReportData``. The plotly renderer (HTML, dashboard) and
the matplotlib renderer (PNG) only draw a model, so the two files of one figure cannot
disagree: in particular the α interval band is computed once, in ``alpha_band``.

Sizes and widths are in screen pixels (plotly's unit); the PNG renderer converts them.
Hover texts separate lines with "\\n"; only the HTML shows them.

This module holds the model's types and the figures' names and titles; the figures are built
in the sibling modules, one topic each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FIGURE_NAMES = (
    "lr_scaling",
    "objective_plane",
    "generalization",
    "learning_curves",
    "importances",
    "noise_scale",
    "cost",
    "noise_floor",
)
FIGURE_TITLES = {
    "lr_scaling": "Best learning rate per batch size (lr* ∝ B^α)",
    "objective_plane": "Objective over batch size × learning rate",
    "generalization": "Best value and generalization gap per batch size",
    "learning_curves": "Learning curves by batch size",
    "importances": "Parameter importances",
    "noise_scale": "Gradient noise scale and the critical batch size",
    "cost": "Value vs time to train, with the Pareto front",
    "noise_floor": "Seed-to-seed spread and the winner's margin",
}
# Royal blue, as hex so that both renderers can give the band its opacity.
BAND_COLOR = "#4169e1"


@dataclass(frozen=True)
class Axis:
    """One axis. ``log_base`` None is linear; the batch-size axis uses 2, learning rate 10.
    ``ticks`` puts a tick, labelled with its value, at each batch size (None: automatic);
    ``labels`` (one per tick) labels them with words instead."""

    title: str | None = None
    log_base: int | None = None
    ticks: tuple[int, ...] | None = None
    labels: tuple[str, ...] | None = None
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
    show_legend: bool = True


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
