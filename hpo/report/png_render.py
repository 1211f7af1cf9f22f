"""Draw a figure model with matplotlib: the report's PNG files.

Thin on purpose: every number, label and colour comes from the model
(``hpo.report.figures``); this module only maps them onto matplotlib artists, converting
plotly's pixel sizes to points. matplotlib is imported inside the functions (and uses no
GUI backend: figures are made with ``matplotlib.figure.Figure`` directly).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from hpo.report.figures import (
    Axis,
    Band,
    Bars,
    FigureModel,
    HorizontalLine,
    Layer,
    Line,
    Markers,
    Panel,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

# Figure sizes in inches; figures not named here are 7.5 × 5.
SIZES = {
    "lr_scaling": (7.5, 5.8),
    "generalization": (10.0, 4.2),
    "importances": (7.0, 3.2),
    "noise_scale": (11.5, 5.0),
    "cost": (12.0, 5.4),
    "noise_floor": (11.0, 5.0),
}
EMPTY_SIZE = (7.5, 3.0)
LEGEND_COLUMNS = {"learning_curves": 2}
# Figures whose legend goes beside the plot: their points fill every corner of it.
LEGEND_OUTSIDE = {"cost"}
# Pixel sizes of the model → matplotlib points: line widths, and marker diameters (scatter
# sizes are areas in points², hence squared). Chosen to look like the HTML at 110 dpi.
LINE_SCALE = 0.8
MARKER_SCALE = 0.7
SYMBOLS = {"circle": "o", "star": "*", "x": "x"}
# matplotlib's star fills less of its box than plotly's; this area factor evens them out.
SYMBOL_AREA = {"circle": 1.0, "star": 1.4, "x": 1.0}
DASHES = {"solid": "-", "dash": "--", "dot": ":"}


def png_figure(model: FigureModel) -> MplFigure:
    """The matplotlib figure of ``model``: its panels side by side, or its message alone."""
    title = model.title + "".join("\n" + line for line in model.subtitle)
    # Two-line titles (with a subtitle) in a smaller font, so they fit above the plot.
    title_style: dict[str, Any] = {"fontsize": 9} if model.subtitle else {}
    if model.message is not None:
        return _empty(title, model.message, title_style)
    figure = _new_figure(*SIZES.get(model.name, (7.5, 5.0)))
    axes_row = figure.subplots(1, len(model.panels), squeeze=False)[0]
    for axes, panel in zip(axes_row, model.panels, strict=True):
        outside = model.name in LEGEND_OUTSIDE
        _draw_panel(figure, axes, panel, LEGEND_COLUMNS.get(model.name, 1), outside=outside)
    if len(model.panels) == 1:
        axes_row[0].set_title(title, **title_style)
    else:
        figure.suptitle(title, **title_style)
    return figure


def _new_figure(width: float, height: float) -> MplFigure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _empty(title: str, message: str, title_style: dict[str, Any]) -> MplFigure:
    figure = _new_figure(*EMPTY_SIZE)
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title, **title_style)
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=axes.transAxes)
    return figure


def _draw_panel(
    figure: MplFigure, axes: Any, panel: Panel, legend_columns: int, *, outside: bool = False
) -> None:
    for layer in panel.layers:
        _draw_layer(figure, axes, layer)
    _set_axis(axes, "x", panel.x)
    _set_axis(axes, "y", panel.y)
    for which, axis in (("x", panel.x), ("y", panel.y)):
        if axis.ticks:
            # A log axis's minor ticks would crowd the labelled ones. Only on that axis: the
            # other one may span less than a decade, where its minor ticks are its only labels.
            from matplotlib.ticker import NullLocator

            getattr(axes, f"{which}axis").set_minor_locator(NullLocator())
    if panel.title:
        axes.set_title(panel.title)
    if axes.get_legend_handles_labels()[0]:
        where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {}
        axes.legend(fontsize=8, ncols=legend_columns, **where)


def _set_axis(axes: Any, which: str, axis: Axis) -> None:
    if axis.log_base is not None:
        getattr(axes, f"set_{which}scale")("log", base=axis.log_base)
    if axis.ticks:
        labels = axis.labels or [str(tick) for tick in axis.ticks]
        getattr(axes, f"set_{which}ticks")(axis.ticks, labels)
    if axis.title is not None:
        getattr(axes, f"set_{which}label")(axis.title)
    if axis.integer:
        getattr(axes, f"{which}axis").get_major_locator().set_params(integer=True)
    if axis.plain:
        from matplotlib.ticker import FuncFormatter

        getattr(axes, f"{which}axis").set_major_formatter(FuncFormatter(_plain_tick))
        getattr(axes, f"{which}axis").set_minor_formatter(FuncFormatter(_plain_tick))


def _plain_tick(value: float, _position: object = None) -> str:
    """A log axis's tick as a plain number, only at 1, 2, 3 and 5 × a power of ten (every
    minor tick labelled would run into each other)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (1.0, 2.0, 3.0, 5.0) else ""


def _draw_layer(figure: MplFigure, axes: Any, layer: Layer) -> None:
    if isinstance(layer, Markers):
        _markers(figure, axes, layer)
    elif isinstance(layer, Line):
        _line(axes, layer)
    elif isinstance(layer, Band):
        axes.fill_between(
            layer.x,
            layer.lower,
            layer.upper,
            color=layer.color,
            alpha=layer.opacity,
            label=layer.label if layer.show_legend else None,
        )
    elif isinstance(layer, Bars):
        axes.barh(layer.names, layer.values, color=layer.color)
    elif isinstance(layer, HorizontalLine):
        axes.axhline(layer.y, color=layer.color, lw=layer.width * LINE_SCALE)
    else:
        raise TypeError(f"no matplotlib drawing for {type(layer).__name__}")


def _markers(figure: MplFigure, axes: Any, layer: Markers) -> None:
    """A scatter; empty ones are skipped (no legend entry, no colour bar for nothing)."""
    if not layer.x:
        return
    style: dict[str, Any] = {"marker": SYMBOLS[layer.symbol], "label": layer.label}
    if layer.shading is not None:
        cmap = layer.shading.colorscale.lower() + ("_r" if layer.shading.reverse else "")
        style.update(c=list(layer.shading.values), cmap=cmap)
    elif layer.color is not None:
        style["color"] = _color(layer.color)
    if layer.size is not None:
        style["s"] = (layer.size * MARKER_SCALE) ** 2 * SYMBOL_AREA[layer.symbol]
    if layer.outline:
        style.update(edgecolors="black", linewidths=layer.outline)
    if layer.front:
        style["zorder"] = 3
    scatter = axes.scatter(layer.x, layer.y, **style)
    if layer.shading is not None:
        figure.colorbar(scatter, ax=axes, label=layer.shading.title)


def _line(axes: Any, layer: Line) -> None:
    style: dict[str, Any] = {"ls": DASHES[layer.dash]}
    style["label"] = layer.label if layer.show_legend else None
    if layer.color is not None:
        style["color"] = _color(layer.color)
    if layer.width is not None:
        style["lw"] = layer.width * LINE_SCALE
    if layer.markers:
        style["marker"] = "o"
    if layer.marker_size is not None:
        style["markersize"] = layer.marker_size * MARKER_SCALE
    axes.plot(layer.x, layer.y, **style)


def _color(color: str) -> Any:
    """Names and hex pass through; plotly's 'rgb(r, g, b)' becomes (r, g, b) in [0, 1]."""
    if not color.startswith("rgb("):
        return color
    parts = color[color.index("(") + 1 : color.index(")")].split(",")
    red, green, blue = (float(p) / 255 for p in parts[:3])
    return (red, green, blue)
