"""Figure models: for each of the report's figures, exactly what is drawn.

A model is plain data with every number already computed from ``ReportData``; the plotly
and matplotlib renderers only draw it (``model``). One module per topic builds the figures:

- ``model``: the model's types (axes, layers, panels, ``FigureModel``), the figures' names
  and titles.
- ``common``: what several figures share (the B and LR axes, jittered trial markers, one
  colour per batch size, what a reported step is called).
- ``lr_scaling``: the best LR per batch size with the α fit and its band.
- ``trials``: objective plane, generalization, learning curves, importances.
- ``noise``: B_simple over training and the LR ridge.
- ``cost``: value vs time to train with the Pareto front, and throughput.
- ``noise_floor``: each replicated configuration's runs with the seed-to-seed spread, and
  the winner's margin with its interval.

``figure_models`` builds all of them; every public name is re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

from hpo.report.analysis import ReportData
from hpo.report.figures.common import LR_AXIS
from hpo.report.figures.cost import cost_figure
from hpo.report.figures.lr_scaling import (
    CURVE_POINTS,
    alpha_band,
    fit_center,
    fit_grid,
    lr_scaling_figure,
)
from hpo.report.figures.model import (
    BAND_COLOR,
    FIGURE_NAMES,
    FIGURE_TITLES,
    Axis,
    Band,
    Bars,
    FigureModel,
    HorizontalLine,
    Layer,
    Line,
    Markers,
    Panel,
    Shading,
)
from hpo.report.figures.noise import (
    RANGE_COLOR,
    RIDGE_COLOR,
    consecutive_runs,
    noise_scale_figure,
    power_of_two_ticks,
)
from hpo.report.figures.noise_floor import noise_floor_figure
from hpo.report.figures.trials import (
    generalization_figure,
    importances_figure,
    learning_curves_figure,
    objective_plane_figure,
)

FIGURE_BUILDERS: dict[str, Callable[[ReportData], FigureModel]] = {
    "lr_scaling": lr_scaling_figure,
    "objective_plane": objective_plane_figure,
    "generalization": generalization_figure,
    "learning_curves": learning_curves_figure,
    "importances": importances_figure,
    "noise_scale": noise_scale_figure,
    "cost": cost_figure,
    "noise_floor": noise_floor_figure,
}


def figure_models(data: ReportData) -> dict[str, FigureModel]:
    """Every figure model, in ``FIGURE_NAMES`` order."""
    return {name: FIGURE_BUILDERS[name](data) for name in FIGURE_NAMES}


__all__ = [
    "BAND_COLOR",
    "CURVE_POINTS",
    "FIGURE_BUILDERS",
    "FIGURE_NAMES",
    "FIGURE_TITLES",
    "LR_AXIS",
    "RANGE_COLOR",
    "RIDGE_COLOR",
    "Axis",
    "Band",
    "Bars",
    "FigureModel",
    "HorizontalLine",
    "Layer",
    "Line",
    "Markers",
    "Panel",
    "Shading",
    "alpha_band",
    "consecutive_runs",
    "cost_figure",
    "figure_models",
    "fit_center",
    "fit_grid",
    "generalization_figure",
    "importances_figure",
    "learning_curves_figure",
    "lr_scaling_figure",
    "noise_floor_figure",
    "noise_scale_figure",
    "objective_plane_figure",
    "power_of_two_ticks",
]
