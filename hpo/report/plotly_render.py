"""Draw a figure model with plotly: the interactive HTML files and the dashboard's figures.

Thin on purpose: every number, label and colour comes from the model
(``hpo.report.figures``); this module only maps them onto plotly traces. plotly is imported
inside the functions, so importing the report package stays cheap.
"""

from __future__ import annotations

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
    import plotly.graph_objects as go

# Horizontal legends below the plot, so the dashboard's half-width cards keep the plot wide.
LEGEND_Y = {
    "lr_scaling": -0.22,
    "objective_plane": -0.15,
    "generalization": -0.2,
    "noise_scale": -0.25,
    "cost": -0.2,
    "noise_floor": -0.2,
}
SYMBOLS = {"circle": None, "star": "star", "x": "x"}


def plotly_figure(model: FigureModel) -> go.Figure:
    """The plotly figure of ``model``: its panels side by side, or its message alone."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    title = _title(model)
    if model.message is not None:
        return _empty(title, model.message)
    if len(model.panels) == 1:
        figure = go.Figure()
        _draw_panel(figure, model.panels[0], None)
    else:
        figure = make_subplots(
            rows=1,
            cols=len(model.panels),
            subplot_titles=tuple(panel.title or "" for panel in model.panels),
        )
        for col, panel in enumerate(model.panels, start=1):
            _draw_panel(figure, panel, col)
    layout: dict[str, Any] = {"title": {"text": title}}
    if len(model.subtitle) > 1:
        # Room for every subtitle line above the plots (and the subplot titles): plotly's
        # default top margin (100 px) holds the title and one line.
        layout["margin"] = {"t": 80 + 20 * len(model.subtitle)}
        layout["title"].update(y=0.98, yanchor="top")  # hang the lines from the top
    if model.name in LEGEND_Y:
        layout["legend"] = {"orientation": "h", "y": LEGEND_Y[model.name]}
    figure.update_layout(**layout)
    return figure


def _title(model: FigureModel) -> str:
    if not model.subtitle:
        return model.title
    return f"{model.title}<br><sup>{'<br>'.join(model.subtitle)}</sup>"


def _empty(title: str, message: str) -> go.Figure:
    import plotly.graph_objects as go

    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return figure


def _draw_panel(figure: go.Figure, panel: Panel, col: int | None) -> None:
    """Add the panel's layers to ``figure`` (to subplot column ``col`` if there are several)."""
    where = {} if col is None else {"row": 1, "col": col}
    for layer in panel.layers:
        if isinstance(layer, HorizontalLine):
            line = {"color": layer.color, "width": layer.width}
            figure.add_hline(y=layer.y, line=line, **where)
        else:
            figure.add_trace(_trace(layer), **where)
    figure.update_xaxes(_axis(panel.x), **where)
    figure.update_yaxes(_axis(panel.y), **where)


def _axis(axis: Axis) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if axis.log_base is not None:
        spec["type"] = "log"
    if axis.title is not None:
        spec["title"] = axis.title
    if axis.ticks is not None:
        spec["tickvals"] = list(axis.ticks)
        spec["ticktext"] = list(axis.labels or (str(tick) for tick in axis.ticks))
    if axis.integer:
        spec["dtick"] = 1
    if axis.plain:
        spec["tickformat"] = "~g"
    return spec


def _trace(layer: Layer) -> Any:
    if isinstance(layer, Markers):
        return _markers(layer)
    if isinstance(layer, Line):
        return _line(layer)
    if isinstance(layer, Band):
        return _band(layer)
    if isinstance(layer, Bars):
        return _bars(layer)
    raise TypeError(f"no plotly drawing for {type(layer).__name__}")


def _markers(layer: Markers) -> go.Scatter:
    import plotly.graph_objects as go

    marker: dict[str, Any] = {}
    if layer.shading is not None:
        marker.update(
            color=list(layer.shading.values),
            colorscale=layer.shading.colorscale,
            reversescale=layer.shading.reverse,
            colorbar={"title": layer.shading.title},
        )
    elif layer.color is not None:
        marker["color"] = layer.color
    if SYMBOLS[layer.symbol] is not None:
        marker["symbol"] = SYMBOLS[layer.symbol]
    if layer.size is not None:
        marker["size"] = layer.size
    if layer.outline:
        marker["line"] = {"width": layer.outline, "color": "black"}
    hover: dict[str, Any] = {}
    if layer.hover is not None:
        hover = {"text": [t.replace("\n", "<br>") for t in layer.hover], "hoverinfo": "text+y"}
    return go.Scatter(
        x=list(layer.x), y=list(layer.y), mode="markers", name=layer.label, marker=marker, **hover
    )


def _line(layer: Line) -> go.Scatter:
    import plotly.graph_objects as go

    line: dict[str, Any] = {}
    if layer.color is not None:
        line["color"] = layer.color
    if layer.dash != "solid":
        line["dash"] = layer.dash
    if layer.width is not None:
        line["width"] = layer.width
    extra: dict[str, Any] = {}
    if layer.marker_size is not None:
        extra["marker"] = {"size": layer.marker_size}
    if layer.group is not None or not layer.show_legend:
        extra.update(legendgroup=layer.group, showlegend=layer.show_legend)
    if layer.hover is not None:
        extra.update(text=layer.hover, hoverinfo="text+x+y")
    return go.Scatter(
        x=list(layer.x),
        y=list(layer.y),
        mode="lines+markers" if layer.markers else "lines",
        name=layer.label,
        line=line,
        **extra,
    )


def _band(layer: Band) -> go.Scatter:
    """The band as one closed polygon: along ``upper``, then back along ``lower``."""
    import plotly.graph_objects as go

    red, green, blue = (int(layer.color[i : i + 2], 16) for i in (1, 3, 5))
    return go.Scatter(
        x=list(layer.x) + list(layer.x[::-1]),
        y=list(layer.upper) + list(layer.lower[::-1]),
        fill="toself",
        mode="none",
        fillcolor=f"rgba({red},{green},{blue},{layer.opacity})",
        name=layer.label,
        hoverinfo="skip",
        showlegend=layer.show_legend,
    )


def _bars(layer: Bars) -> go.Bar:
    import plotly.graph_objects as go

    return go.Bar(
        x=list(layer.values),
        y=list(layer.names),
        orientation="h",
        name=layer.label,
        marker={"color": layer.color},
    )
