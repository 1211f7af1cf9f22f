"""The noise floor's figure: each replicated configuration's runs (original and
replicates) with the pooled seed-to-seed spread around their mean, and the winner's margin
over the runner-up with its interval against 0 (``hpo.report.noise_floor``).

Every number and word comes from the report's ``NoiseFloor``: the spread, its interval,
the margin's interval and the verdict are the ones ``summary.md`` states.
"""

from __future__ import annotations

from hpo.report.analysis import ReportData
from hpo.report.figures.model import (
    FIGURE_TITLES,
    Axis,
    Band,
    FigureModel,
    HorizontalLine,
    Line,
    Markers,
    Panel,
)
from hpo.report.noise_floor import NoiseFloor, Runs

# Half the width of a configuration's column, in positions (one per configuration).
HALF_WIDTH = 0.25
RUN_COLOR = "black"
REPLICATE_COLOR = "#d62728"
MARGIN_COLOR = "#2ca02c"


def noise_floor_figure(data: ReportData) -> FigureModel:
    """Two panels. Left: each replicated configuration (one column each) with its runs, the
    original as a circle and the replicates as x, and its mean ± the pooled spread s
    (shaded). Right: the winner's margin over the runner-up with its interval, against 0
    and 0 ± s. Without a spread only a message saying why there is none."""
    title = FIGURE_TITLES["noise_floor"]
    floor = data.noise_floor
    if floor is None or floor.spread is None:
        why = (floor.why_none if floor is not None else None) or "no replicate trial completed"
        return FigureModel("noise_floor", title, message=f"No noise floor: {why}.")
    subtitle = [_spread_line(floor)]
    panels = [_runs_panel(data, floor)]
    if floor.margin is not None and floor.winner and floor.runner_up:
        subtitle.append(_margin_line(floor))
        panels.append(_margin_panel(data, floor))
    else:
        subtitle.append("one batch size: no runner-up to compare with")
    return FigureModel("noise_floor", title, tuple(subtitle), panels=tuple(panels))


def _spread_line(floor: NoiseFloor) -> str:
    percent = f"{floor.confidence:.0%}"
    return (
        f"pooled seed-to-seed spread s = {floor.spread:.4f} ({percent} interval "
        f"{floor.spread_low:.4f} to {floor.spread_high:.4f}, {floor.dof} degree(s) of freedom)"
    )


def _margin_line(floor: NoiseFloor) -> str:
    percent = f"{floor.confidence:.0%}"
    return (
        f"winner's margin {floor.margin:.4f} ({percent} interval {floor.margin_low:.4f} to "
        f"{floor.margin_high:.4f}): {floor.verdict()}"
    )


def _column_label(runs: Runs, floor: NoiseFloor) -> str:
    role = ""
    if floor.winner is not None and runs.trial == floor.winner.trial:
        role = " (winner)"
    elif floor.runner_up is not None and runs.trial == floor.runner_up.trial:
        role = " (runner-up)"
    return f"B = {runs.batch_size}{role}, trial {runs.trial}"


def _runs_panel(data: ReportData, floor: NoiseFloor) -> Panel:
    groups = floor.groups
    spread = floor.spread or 0.0
    layers: list[Band | Line | Markers] = []
    for i, runs in enumerate(groups):
        layers.append(
            Band(
                f"mean ± pooled spread s = {spread:.4f}",
                x=(i - HALF_WIDTH, i + HALF_WIDTH),
                lower=(runs.mean - spread,) * 2,
                upper=(runs.mean + spread,) * 2,
                show_legend=i == 0,
            )
        )
        layers.append(
            Line(
                "mean of the runs",
                x=(i - HALF_WIDTH, i + HALF_WIDTH),
                y=(runs.mean,) * 2,
                color=RUN_COLOR,
                width=2.0,
                group="mean",
                show_legend=i == 0,
            )
        )
    layers.append(
        Markers(
            "original trial",
            x=tuple(float(i) for i in range(len(groups))),
            y=tuple(runs.values[0] for runs in groups),
            color=RUN_COLOR,
            size=10,
            hover=tuple(f"trial {r.trial}\nB={r.batch_size}" for r in groups),
            front=True,
        )
    )
    xs, ys = [], []
    for i, runs in enumerate(groups):
        for k, value in enumerate(runs.values[1:], start=1):
            xs.append(i + _offset(k, len(runs.values) - 1))
            ys.append(value)
    layers.append(
        Markers("replicates (other seeds)", tuple(xs), tuple(ys), REPLICATE_COLOR, symbol="x",
                size=10, front=True)
    )  # fmt: skip
    x = Axis(
        "replicated configuration",
        ticks=tuple(range(len(groups))),
        labels=tuple(_column_label(r, floor) for r in groups),
    )
    return Panel(x, Axis(data.metric), tuple(layers), title="Each configuration's runs")


def _offset(k: int, n: int) -> float:
    """Replicate k of n beside its original: spread evenly over the column's inner half."""
    return (k / (n + 1) - 0.5) * HALF_WIDTH


def _margin_panel(data: ReportData, floor: NoiseFloor) -> Panel:
    assert floor.winner is not None and floor.runner_up is not None
    spread = floor.spread or 0.0
    percent = f"{floor.confidence:.0%}"
    layers = (
        Band(
            f"0 ± s = {spread:.4f}",
            x=(-HALF_WIDTH, HALF_WIDTH),
            lower=(-spread,) * 2,
            upper=(spread,) * 2,
            color="#808080",
            opacity=0.25,
        ),
        HorizontalLine(0.0),
        Line(
            f"{percent} interval {floor.margin_low:.4f} to {floor.margin_high:.4f}",
            x=(0.0, 0.0),
            y=(floor.margin_low or 0.0, floor.margin_high or 0.0),
            color=MARGIN_COLOR,
            width=4.0,
        ),
        Markers(
            f"margin {floor.margin:.4f}",
            x=(0.0,),
            y=(floor.margin or 0.0,),
            color=MARGIN_COLOR,
            size=12,
            front=True,
        ),
    )
    better = "higher" if data.maximize else "lower"
    x = Axis(
        None,
        ticks=(0,),
        labels=(f"B = {floor.winner.batch_size} vs B = {floor.runner_up.batch_size}",),
    )
    y = Axis(f"winner's margin ({data.metric}, > 0: winner {better})")
    return Panel(x, y, layers, title="Winner's margin over the runner-up")
