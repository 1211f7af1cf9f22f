"""Tables and figures from a finished or running study. Trains nothing.

What a batch-size study is for is a handful of pictures a generic HPO dashboard does not
draw: the objective over the batch size × learning-rate plane, how the best learning rate
scales with batch size (lr* ∝ B^α, against the linear rule α = 1 and the square-root rule
α = 0.5), the generalization gap per batch size, learning curves coloured by batch size,
and parameter importances. ``write_report`` writes them as PNG (matplotlib) and interactive
HTML (plotly) with a markdown summary; ``attach_report`` puts the same figures, the PNGs
and the summary on the study so optuna-dashboard shows them.

Only COMPLETE and PRUNED trials are drawn; RUNNING, WAITING and FAIL trials are ignored, so a
report of a running study is a snapshot.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from matplotlib.figure import Figure as MplFigure

# How many of the best complete trials of each batch size enter the α fit. One (the best
# alone) is at the mercy of the sampler's luck; the top three average that out while staying
# in the good region of the LR axis.
DEFAULT_TOP_K = 3
DEFAULT_CONFIDENCE = 0.95
# Prefix of the dashboard's graph-object ids and of the artifact files this module attaches,
# so re-running the report replaces its own figures and leaves others alone.
ATTACHED_PREFIX = "hpo-"
FIGURE_NAMES = ("lr_scaling", "objective_plane", "generalization", "learning_curves", "importances")
FIGURE_TITLES = {
    "lr_scaling": "Best learning rate per batch size (lr* ∝ B^α)",
    "objective_plane": "Objective over batch size × learning rate",
    "generalization": "Best value and generalization gap per batch size",
    "learning_curves": "Learning curves by batch size",
    "importances": "Parameter importances",
}


def trial_batch_size(trial: FrozenTrial) -> int | None:
    if "batch_size" in trial.user_attrs:
        return int(trial.user_attrs["batch_size"])
    if "log2_batch_size" in trial.params:
        return 2 ** int(trial.params["log2_batch_size"])
    return None


@dataclass(frozen=True)
class BatchSizeRow:
    """The best finished trial of one batch size, and how that batch size fared."""

    batch_size: int
    n_complete: int
    n_pruned: int
    best_value: float | None
    best_lr: float | None
    best_weight_decay: float | None
    best_trial: int | None
    generalization_gap: float | None


@dataclass(frozen=True)
class StudySummary:
    study_name: str
    direction: str
    metric: str
    state_counts: dict[str, int]
    best: FrozenTrial | None
    by_batch_size: list[BatchSizeRow]


def _is_maximize(study: optuna.Study) -> bool:
    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def _complete(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]


def summarize(study: optuna.Study, metric: str) -> StudySummary:
    """Counts by state, the best trial and the best complete trial per batch size."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(trial.state.name for trial in trials)
    maximize = _is_maximize(study)
    complete = _complete(trials)
    best = (max if maximize else min)(complete, key=lambda t: t.value) if complete else None

    rows = []
    batch_sizes = sorted({b for t in trials if (b := trial_batch_size(t)) is not None})
    for batch_size in batch_sizes:
        mine = [t for t in trials if trial_batch_size(t) == batch_size]
        done = [t for t in mine if t in complete]
        top = (max if maximize else min)(done, key=lambda t: t.value) if done else None
        rows.append(
            BatchSizeRow(
                batch_size=batch_size,
                n_complete=len(done),
                n_pruned=sum(t.state == TrialState.PRUNED for t in mine),
                best_value=top.value if top else None,
                best_lr=top.params.get("lr") if top else None,
                best_weight_decay=top.params.get("weight_decay") if top else None,
                best_trial=top.number if top else None,
                generalization_gap=_gap(top) if top else None,
            )
        )
    return StudySummary(
        study_name=study.study_name,
        direction="maximize" if maximize else "minimize",
        metric=metric,
        state_counts=dict(counts),
        best=best,
        by_batch_size=rows,
    )


def _gap(trial: FrozenTrial) -> float | None:
    """Train − val accuracy at the last epoch (user attr, else computed from the two)."""
    attrs = trial.user_attrs
    if "generalization_gap" in attrs:
        return float(attrs["generalization_gap"])
    if "train_acc" in attrs and "val_acc" in attrs:
        return float(attrs["train_acc"]) - float(attrs["val_acc"])
    return None


# --------------------------------------------------------------------------- the α fit


@dataclass(frozen=True)
class ScalingFit:
    """The fit of log2 lr = intercept + α · log2 B over the top trials of each batch size.

    ``alpha`` is None when there are fewer than two batch sizes with complete trials;
    ``alpha_low``/``alpha_high`` (the two-sided ``confidence`` interval from Student's t on
    the slope's standard error) are None with fewer than three points. ``reason`` says in
    words why either is missing. The points of one batch size are not independent draws
    (they are the best of what the sampler tried), so read the interval as a guide to how
    well the data pin α down, not as an exact coverage probability.
    """

    alpha: float | None
    alpha_low: float | None
    alpha_high: float | None
    intercept: float | None
    points: tuple[tuple[int, float], ...]
    top_k: int
    confidence: float
    reason: str | None = None
    batch_sizes: tuple[int, ...] = field(default=())

    @property
    def n_points(self) -> int:
        return len(self.points)

    def lr_at(self, batch_size: float) -> float:
        """The fitted best learning rate at ``batch_size``."""
        if self.alpha is None or self.intercept is None:
            raise ValueError("no fit: " + (self.reason or "too few trials"))
        return 2.0 ** (self.intercept + self.alpha * math.log2(batch_size))

    def contains(self, alpha: float) -> bool | None:
        """Whether ``alpha`` lies inside the interval (None without an interval)."""
        if self.alpha_low is None or self.alpha_high is None:
            return None
        return self.alpha_low <= alpha <= self.alpha_high

    def describe(self) -> str:
        """One or two sentences for a person: α, its interval, and which rule it supports."""
        if self.alpha is None:
            return f"No scaling fit: {self.reason}."
        where = (
            f"over the top {self.top_k} complete trials of each of {len(self.batch_sizes)} "
            f"batch sizes ({self.n_points} points, least squares in log-log)"
        )
        if self.alpha_low is None:
            return f"Fitted lr* ∝ B^α with α = {self.alpha:.2f} {where}; {self.reason}."
        percent = f"{self.confidence:.0%}"
        text = (
            f"Fitted lr* ∝ B^α with α = {self.alpha:.2f} ({percent} interval "
            f"{self.alpha_low:.2f} to {self.alpha_high:.2f}) {where}."
        )
        linear, square_root, flat = self.contains(1.0), self.contains(0.5), self.contains(0.0)
        if linear and square_root:
            text += " The interval is too wide to tell the linear rule (α = 1) from the "
            text += "square-root rule (α = 0.5)"
            text += " or from no dependence on batch size (α = 0)" if flat else ""
            text += "; more complete trials per batch size would narrow it."
            return text
        if linear or square_root:
            inside, outside = ("linear rule (α = 1)", "square-root rule (α = 0.5)")[
                :: 1 if linear else -1
            ]
            text += f" Consistent with the {inside}; not with the {outside}."
        else:
            text += " Neither the linear rule (α = 1) nor the square-root rule (α = 0.5) lies "
            text += "inside the interval."
        if flat:
            text += " α = 0 (no dependence on batch size) is not ruled out."
        return text


def _fit_title(fit: ScalingFit) -> str:
    """Two short lines for a figure title (fits the dashboard's half-width cards)."""
    import textwrap

    head = FIGURE_TITLES["lr_scaling"]
    if fit.alpha is None:
        return f"{head}<br><sup>{'<br>'.join(textwrap.wrap(f'No fit: {fit.reason}.', 80))}</sup>"
    if fit.alpha_low is None or fit.alpha_high is None:
        return f"{head}: α = {fit.alpha:.2f}<br><sup>no interval: {fit.n_points} points</sup>"
    verdicts = []
    for alpha, name in ((1.0, "linear"), (0.5, "square root")):
        verdicts.append(f"α = {alpha:g} ({name}) {'inside' if fit.contains(alpha) else 'outside'}")
    return (
        f"{head}: α = {fit.alpha:.2f} [{fit.alpha_low:.2f}, {fit.alpha_high:.2f}]<br>"
        f"<sup>{fit.confidence:.0%} interval · {' · '.join(verdicts)} · {fit.n_points} points</sup>"
    )


def _student_t_quantile(probability: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def fit_lr_scaling(
    study: optuna.Study,
    *,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ScalingFit:
    """Fit lr* ∝ B^α by least squares on (log2 B, log2 lr) of the ``top_k`` best complete
    trials of each batch size.

    Raises ValueError for ``top_k < 1`` or ``confidence`` outside (0, 1). Too few trials is
    not an error: the returned fit says so in ``reason``.
    """
    if top_k < 1:
        raise ValueError(f"top_k = {top_k} must be at least 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence} must be between 0 and 1")
    maximize = _is_maximize(study)
    complete = [t for t in _complete(study.get_trials(deepcopy=False)) if "lr" in t.params]
    by_batch: dict[int, list[FrozenTrial]] = {}
    for trial in complete:
        batch_size = trial_batch_size(trial)
        if batch_size is not None:
            by_batch.setdefault(batch_size, []).append(trial)
    points: list[tuple[int, float]] = []
    for batch_size in sorted(by_batch):
        ranked = sorted(by_batch[batch_size], key=lambda t: t.value, reverse=maximize)
        points.extend((batch_size, float(t.params["lr"])) for t in ranked[:top_k])
    batch_sizes = tuple(sorted(by_batch))
    common = {"points": tuple(points), "top_k": top_k, "confidence": confidence}
    if len(batch_sizes) < 2:
        found = "no batch size has" if not batch_sizes else f"only batch size {batch_sizes[0]} has"
        return ScalingFit(
            alpha=None,
            alpha_low=None,
            alpha_high=None,
            intercept=None,
            reason=(
                f"{found} complete trials; the fit needs complete trials at two or more batch sizes"
            ),
            batch_sizes=batch_sizes,
            **common,
        )
    xs = [math.log2(b) for b, _ in points]
    ys = [math.log2(lr) for _, lr in points]
    n = len(points)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    alpha = sxy / sxx
    intercept = mean_y - alpha * mean_x
    if n < 3:
        return ScalingFit(
            alpha=alpha,
            alpha_low=None,
            alpha_high=None,
            intercept=intercept,
            reason="two points give a line but no interval (it needs three or more trials)",
            batch_sizes=batch_sizes,
            **common,
        )
    residual = sum((y - (intercept + alpha * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    standard_error = math.sqrt(residual / (n - 2) / sxx)
    half_width = _student_t_quantile(0.5 + confidence / 2, n - 2) * standard_error
    return ScalingFit(
        alpha=alpha,
        alpha_low=alpha - half_width,
        alpha_high=alpha + half_width,
        intercept=intercept,
        batch_sizes=batch_sizes,
        **common,
    )


# --------------------------------------------------------------------------- figure data


@dataclass(frozen=True)
class TrialPoint:
    """One COMPLETE or PRUNED trial, as the figures need it."""

    number: int
    pruned: bool
    batch_size: int
    lr: float
    weight_decay: float | None
    value: float | None  # COMPLETE: the objective; PRUNED: the last reported value
    last_step: int | None
    gap: float | None
    curve: tuple[tuple[int, float], ...]


def trial_points(study: optuna.Study) -> list[TrialPoint]:
    """COMPLETE and PRUNED trials that have a batch size and a learning rate."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        batch_size = trial_batch_size(trial)
        if batch_size is None or "lr" not in trial.params:
            continue
        curve = tuple(
            (int(step), float(value))
            for step, value in sorted(trial.intermediate_values.items())
            if math.isfinite(value)
        )
        pruned = trial.state == TrialState.PRUNED
        if pruned:
            value = curve[-1][1] if curve else None
        else:
            value = trial.value if trial.value is not None and math.isfinite(trial.value) else None
        points.append(
            TrialPoint(
                number=trial.number,
                pruned=pruned,
                batch_size=batch_size,
                lr=float(trial.params["lr"]),
                weight_decay=trial.params.get("weight_decay"),
                value=value,
                last_step=curve[-1][0] if curve else None,
                gap=_gap(trial),
                curve=curve,
            )
        )
    return points


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Optuna's own importance evaluator (PED-ANOVA by default) and, if it cannot run, why."""
    complete = _complete(study.get_trials(deepcopy=False))
    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s); importances need at least 2"
    try:
        values = optuna.importance.get_param_importances(study, evaluator=None)
    except (ValueError, RuntimeError) as error:
        return {}, f"Optuna could not evaluate importances: {error}"
    if not values:
        return {}, "no parameter varies across the complete trials"
    return {name: float(v) for name, v in values.items()}, None


def _jitter(number: int) -> float:
    """A deterministic factor near 1 that spreads trials of one batch size apart on a log
    axis, so points at the same B do not hide each other."""
    return 2.0 ** ((((number * 0.6180339887) % 1.0) - 0.5) * 0.35)


def _complete_trial_markers(points: list, metric: str, name: str, marker: dict):
    """Complete trials on the batch size × learning-rate plane, jittered along B, with a
    hover label naming the trial, its batch size and its objective."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=[p.batch_size * _jitter(p.number) for p in points],
        y=[p.lr for p in points],
        mode="markers",
        name=name,
        marker=marker,
        text=[f"trial {p.number}<br>B={p.batch_size}<br>{metric}={p.value:.4f}" for p in points],
        hoverinfo="text+y",
    )


def _colors(batch_sizes: list[int]) -> dict[int, str]:
    """One Viridis colour per batch size, small B dark, large B bright."""
    from plotly.colors import sample_colorscale

    if len(batch_sizes) == 1:
        return {batch_sizes[0]: sample_colorscale("Viridis", [0.4])[0]}
    samples = sample_colorscale(
        "Viridis", [i / (len(batch_sizes) - 1) * 0.9 for i in range(len(batch_sizes))]
    )
    return dict(zip(batch_sizes, samples, strict=True))


def _rgb(color: str) -> tuple[float, float, float]:
    """plotly 'rgb(r, g, b)' → matplotlib (r, g, b) in [0, 1]."""
    parts = color[color.index("(") + 1 : color.index(")")].split(",")
    r, g, b = (float(p) / 255 for p in parts[:3])
    return (r, g, b)


@dataclass
class ReportData:
    """Everything the figures and the summary are drawn from (computed once)."""

    study_name: str
    metric: str
    maximize: bool
    summary: StudySummary
    fit: ScalingFit
    points: list[TrialPoint]
    importances: dict[str, float]
    importances_reason: str | None

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({p.batch_size for p in self.points})


def collect(
    study: optuna.Study,
    metric: str = "objective",
    *,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ReportData:
    values, reason = importances(study)
    return ReportData(
        study_name=study.study_name,
        metric=metric,
        maximize=_is_maximize(study),
        summary=summarize(study, metric),
        fit=fit_lr_scaling(study, top_k=top_k, confidence=confidence),
        points=trial_points(study),
        importances=values,
        importances_reason=reason,
    )


# --------------------------------------------------------------------------- plotly (HTML)


def _log2_axis(batch_sizes: list[int]) -> dict[str, Any]:
    return {
        "type": "log",
        "title": "batch size B",
        "tickvals": batch_sizes,
        "ticktext": [str(b) for b in batch_sizes],
    }


def _empty_plotly(title: str, message: str) -> go.Figure:
    import plotly.graph_objects as go

    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return figure


def plotly_lr_scaling(data: ReportData) -> go.Figure:
    import plotly.graph_objects as go

    fit = data.fit
    complete = [p for p in data.points if not p.pruned and p.value is not None]
    if not complete:
        return _empty_plotly(_fit_title(fit), "No complete trials yet.")
    figure = go.Figure()
    figure.add_trace(
        _complete_trial_markers(
            complete, data.metric, "complete trials", {"color": "lightgray", "size": 7}
        )
    )
    figure.add_trace(
        go.Scatter(
            x=[b for b, _ in fit.points],
            y=[lr for _, lr in fit.points],
            mode="markers",
            name=f"top {fit.top_k} per B (fitted)",
            marker={"color": "royalblue", "size": 9},
        )
    )
    bests = [r for r in data.summary.by_batch_size if r.best_lr is not None]
    figure.add_trace(
        go.Scatter(
            x=[r.batch_size for r in bests],
            y=[r.best_lr for r in bests],
            mode="markers",
            name="best per B",
            marker={"symbol": "star", "color": "crimson", "size": 13},
        )
    )
    if fit.alpha is not None:
        low, high = min(fit.batch_sizes), max(fit.batch_sizes)
        xs = [low * (high / low) ** (i / 20) for i in range(21)]
        center = 2.0 ** (sum(math.log2(b) for b, _ in fit.points) / fit.n_points)
        lr_center = fit.lr_at(center)
        if fit.alpha_low is not None and fit.alpha_high is not None:
            upper = [
                lr_center * (x / center) ** (fit.alpha_high if x > center else fit.alpha_low)
                for x in xs
            ]
            lower = [
                lr_center * (x / center) ** (fit.alpha_low if x > center else fit.alpha_high)
                for x in xs
            ]
            figure.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=upper + lower[::-1],
                    fill="toself",
                    mode="none",
                    fillcolor="rgba(65,105,225,0.15)",
                    name=f"{fit.confidence:.0%} interval of α",
                    hoverinfo="skip",
                )
            )
        figure.add_trace(
            go.Scatter(
                x=xs,
                y=[fit.lr_at(x) for x in xs],
                mode="lines",
                name=f"fit α = {fit.alpha:.2f}",
                line={"color": "royalblue", "width": 3},
            )
        )
        for alpha, name, dash in (
            (1.0, "linear rule α = 1", "dash"),
            (0.5, "square-root rule α = 0.5", "dot"),
        ):
            figure.add_trace(
                go.Scatter(
                    x=xs,
                    y=[lr_center * (x / center) ** alpha for x in xs],
                    mode="lines",
                    name=name,
                    line={"color": "black", "dash": dash, "width": 1.5},
                )
            )
    figure.update_layout(
        title={"text": _fit_title(fit)},
        xaxis=_log2_axis(data.batch_sizes),
        yaxis={"type": "log", "title": "learning rate"},
        legend={"orientation": "h", "y": -0.22},
    )
    return figure


def plotly_objective_plane(data: ReportData) -> go.Figure:
    import plotly.graph_objects as go

    title = FIGURE_TITLES["objective_plane"]
    if not data.points:
        return _empty_plotly(title, "No complete or pruned trials yet.")
    complete = [p for p in data.points if not p.pruned and p.value is not None]
    pruned = [p for p in data.points if p.pruned]
    figure = go.Figure()
    figure.add_trace(
        _complete_trial_markers(
            complete,
            data.metric,
            "complete",
            {
                "color": [p.value for p in complete],
                "colorscale": "Viridis",
                "reversescale": not data.maximize,
                "size": 11,
                "colorbar": {"title": data.metric},
                "line": {"width": 0.5, "color": "black"},
            },
        )
    )
    figure.add_trace(
        go.Scatter(
            x=[p.batch_size * _jitter(p.number) for p in pruned],
            y=[p.lr for p in pruned],
            mode="markers",
            name="pruned",
            marker={"symbol": "x", "color": "gray", "size": 9},
            text=[
                f"trial {p.number} (pruned at epoch {p.last_step})<br>B={p.batch_size}"
                + (f"<br>{data.metric}={p.value:.4f}" if p.value is not None else "")
                for p in pruned
            ],
            hoverinfo="text+y",
        )
    )
    figure.update_layout(
        title=title,
        xaxis=_log2_axis(data.batch_sizes),
        yaxis={"type": "log", "title": "learning rate"},
        legend={"orientation": "h", "y": -0.15},
    )
    return figure


def plotly_generalization(data: ReportData) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [r for r in data.summary.by_batch_size if r.best_value is not None]
    if not rows:
        return _empty_plotly(FIGURE_TITLES["generalization"], "No complete trials yet.")
    figure = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(f"best {data.metric}", "gap: train − val accuracy"),
    )
    figure.add_trace(
        go.Scatter(
            x=[r.batch_size for r in rows],
            y=[r.best_value for r in rows],
            mode="lines+markers",
            name=f"best {data.metric}",
        ),
        row=1,
        col=1,
    )
    complete = [p for p in data.points if not p.pruned and p.gap is not None]
    figure.add_trace(
        go.Scatter(
            x=[p.batch_size * _jitter(p.number) for p in complete],
            y=[p.gap for p in complete],
            mode="markers",
            name="gap, each complete trial",
            marker={"color": "lightgray"},
        ),
        row=1,
        col=2,
    )
    gaps = [r for r in rows if r.generalization_gap is not None]
    figure.add_trace(
        go.Scatter(
            x=[r.batch_size for r in gaps],
            y=[r.generalization_gap for r in gaps],
            mode="lines+markers",
            name="gap of the best trial",
            marker={"color": "crimson"},
        ),
        row=1,
        col=2,
    )
    for col in (1, 2):
        figure.update_xaxes(_log2_axis(data.batch_sizes), row=1, col=col)
    figure.update_layout(
        title=FIGURE_TITLES["generalization"],
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def plotly_learning_curves(data: ReportData) -> go.Figure:
    import plotly.graph_objects as go

    curves = [p for p in data.points if p.curve]
    if not curves:
        return _empty_plotly(FIGURE_TITLES["learning_curves"], "No trial has reported a value yet.")
    colors = _colors(data.batch_sizes)
    figure = go.Figure()
    shown: set[int] = set()
    for point in sorted(curves, key=lambda p: (p.batch_size, p.pruned, p.number)):
        figure.add_trace(
            go.Scatter(
                x=[step for step, _ in point.curve],
                y=[value for _, value in point.curve],
                mode="lines+markers",
                name=f"B = {point.batch_size}",
                legendgroup=str(point.batch_size),
                showlegend=point.batch_size not in shown,
                line={
                    "color": colors[point.batch_size],
                    "dash": "dot" if point.pruned else "solid",
                },
                marker={"size": 4},
                text=f"trial {point.number}{' (pruned)' if point.pruned else ''}, lr {point.lr:.2g}",
                hoverinfo="text+x+y",
            )
        )
        shown.add(point.batch_size)
    figure.update_layout(
        title=f"{FIGURE_TITLES['learning_curves']} (dotted: pruned)",
        xaxis={"title": "epoch", "dtick": 1},
        yaxis={"title": data.metric},
    )
    return figure


def plotly_importances(data: ReportData) -> go.Figure:
    import plotly.graph_objects as go

    title = FIGURE_TITLES["importances"]
    if not data.importances:
        return _empty_plotly(title, f"No importances: {data.importances_reason}.")
    names = sorted(data.importances, key=data.importances.get)
    figure = go.Figure(
        go.Bar(
            x=[data.importances[n] for n in names],
            y=names,
            orientation="h",
            marker={"color": "royalblue"},
        )
    )
    figure.update_layout(
        title=f"{title} (Optuna's PED-ANOVA evaluator, for {data.metric})",
        xaxis={"title": "importance (sums to 1)"},
    )
    return figure


PLOTLY_BUILDERS = {
    "lr_scaling": plotly_lr_scaling,
    "objective_plane": plotly_objective_plane,
    "generalization": plotly_generalization,
    "learning_curves": plotly_learning_curves,
    "importances": plotly_importances,
}


# --------------------------------------------------------------------------- matplotlib (PNG)


def _new_figure(width: float = 7.5, height: float = 5.0) -> MplFigure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _log2_xaxis(axes: Any, batch_sizes: list[int]) -> None:
    axes.set_xscale("log", base=2)
    if batch_sizes:
        axes.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        axes.minorticks_off()
    axes.set_xlabel("batch size B")


def _empty_png(title: str, message: str) -> MplFigure:
    figure = _new_figure(7.5, 3.0)
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title)
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=axes.transAxes)
    return figure


def png_lr_scaling(data: ReportData) -> MplFigure:
    import textwrap

    fit = data.fit
    title = FIGURE_TITLES["lr_scaling"]
    complete = [p for p in data.points if not p.pruned and p.value is not None]
    if not complete:
        return _empty_png(title, f"No scaling fit: {fit.reason}.")
    figure = _new_figure(7.5, 5.8)
    axes = figure.add_subplot()
    axes.scatter(
        [p.batch_size * _jitter(p.number) for p in complete],
        [p.lr for p in complete],
        color="lightgray",
        s=22,
        label="complete trials",
    )
    axes.scatter(
        [b for b, _ in fit.points],
        [lr for _, lr in fit.points],
        color="royalblue",
        s=30,
        label=f"top {fit.top_k} per batch size (fitted)",
    )
    bests = [r for r in data.summary.by_batch_size if r.best_lr is not None]
    axes.scatter(
        [r.batch_size for r in bests],
        [r.best_lr for r in bests],
        marker="*",
        color="crimson",
        s=120,
        label="best trial per batch size",
        zorder=3,
    )
    if fit.alpha is not None:
        low, high = min(fit.batch_sizes), max(fit.batch_sizes)
        xs = [low * (high / low) ** (i / 20) for i in range(21)]
        center = 2.0 ** (sum(math.log2(b) for b, _ in fit.points) / fit.n_points)
        lr_center = fit.lr_at(center)
        if fit.alpha_low is not None and fit.alpha_high is not None:
            a = [lr_center * (x / center) ** fit.alpha_low for x in xs]
            b = [lr_center * (x / center) ** fit.alpha_high for x in xs]
            axes.fill_between(
                xs,
                [min(u, v) for u, v in zip(a, b, strict=True)],
                [max(u, v) for u, v in zip(a, b, strict=True)],
                color="royalblue",
                alpha=0.15,
                label=f"{fit.confidence:.0%} interval of α",
            )
        axes.plot(
            xs,
            [fit.lr_at(x) for x in xs],
            color="royalblue",
            lw=2.5,
            label=f"fit α = {fit.alpha:.2f}",
        )
        axes.plot(
            xs, [lr_center * (x / center) for x in xs], "k--", lw=1.2, label="linear rule α = 1"
        )
        axes.plot(
            xs,
            [lr_center * (x / center) ** 0.5 for x in xs],
            "k:",
            lw=1.2,
            label="square-root rule α = 0.5",
        )
    axes.set_yscale("log")
    axes.set_ylabel("learning rate")
    _log2_xaxis(axes, data.batch_sizes)
    axes.legend(fontsize=8, loc="best")
    axes.set_title(title + "\n" + textwrap.fill(fit.describe(), 95), fontsize=9)
    return figure


def png_objective_plane(data: ReportData) -> MplFigure:
    title = FIGURE_TITLES["objective_plane"]
    if not data.points:
        return _empty_png(title, "No complete or pruned trials yet.")
    complete = [p for p in data.points if not p.pruned and p.value is not None]
    pruned = [p for p in data.points if p.pruned]
    figure = _new_figure()
    axes = figure.add_subplot()
    if complete:
        cmap = "viridis" if data.maximize else "viridis_r"
        scatter = axes.scatter(
            [p.batch_size * _jitter(p.number) for p in complete],
            [p.lr for p in complete],
            c=[p.value for p in complete],
            cmap=cmap,
            s=60,
            edgecolors="black",
            linewidths=0.5,
            label="complete",
        )
        figure.colorbar(scatter, ax=axes, label=data.metric)
    if pruned:
        axes.scatter(
            [p.batch_size * _jitter(p.number) for p in pruned],
            [p.lr for p in pruned],
            marker="x",
            color="gray",
            s=45,
            label="pruned",
        )
    axes.set_yscale("log")
    axes.set_ylabel("learning rate")
    _log2_xaxis(axes, data.batch_sizes)
    axes.legend(fontsize=8)
    axes.set_title(title)
    return figure


def png_generalization(data: ReportData) -> MplFigure:
    rows = [r for r in data.summary.by_batch_size if r.best_value is not None]
    if not rows:
        return _empty_png(FIGURE_TITLES["generalization"], "No complete trials yet.")
    figure = _new_figure(10, 4.2)
    left, right = figure.subplots(1, 2)
    left.plot([r.batch_size for r in rows], [r.best_value for r in rows], "o-")
    left.set_ylabel(f"best {data.metric}")
    left.set_title(f"best {data.metric} per batch size")
    complete = [p for p in data.points if not p.pruned and p.gap is not None]
    right.scatter(
        [p.batch_size * _jitter(p.number) for p in complete],
        [p.gap for p in complete],
        color="lightgray",
        label="each complete trial",
    )
    gaps = [r for r in rows if r.generalization_gap is not None]
    right.plot(
        [r.batch_size for r in gaps],
        [r.generalization_gap for r in gaps],
        "o-",
        color="crimson",
        label="best trial",
    )
    right.axhline(0.0, color="black", lw=0.6)
    right.set_ylabel("train − val accuracy")
    right.set_title("generalization gap")
    right.legend(fontsize=8)
    for axes in (left, right):
        _log2_xaxis(axes, data.batch_sizes)
    return figure


def png_learning_curves(data: ReportData) -> MplFigure:
    curves = [p for p in data.points if p.curve]
    if not curves:
        return _empty_png(FIGURE_TITLES["learning_curves"], "No trial has reported a value yet.")
    colors = _colors(data.batch_sizes)
    figure = _new_figure()
    axes = figure.add_subplot()
    shown: set[int] = set()
    for point in sorted(curves, key=lambda p: (p.batch_size, p.pruned, p.number)):
        axes.plot(
            [s for s, _ in point.curve],
            [v for _, v in point.curve],
            marker=".",
            color=_rgb(colors[point.batch_size]),
            ls=":" if point.pruned else "-",
            lw=1.3,
            label=None if point.batch_size in shown else f"B = {point.batch_size}",
        )
        shown.add(point.batch_size)
    axes.set_xlabel("epoch")
    axes.set_ylabel(data.metric)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8, ncols=2)
    axes.set_title(f"{FIGURE_TITLES['learning_curves']} (dotted: pruned)")
    return figure


def png_importances(data: ReportData) -> MplFigure:
    title = FIGURE_TITLES["importances"]
    if not data.importances:
        return _empty_png(title, f"No importances: {data.importances_reason}.")
    names = sorted(data.importances, key=data.importances.get)
    figure = _new_figure(7.0, 3.2)
    axes = figure.add_subplot()
    axes.barh(names, [data.importances[n] for n in names], color="royalblue")
    axes.set_xlabel("importance (sums to 1)")
    axes.set_title(f"{title} (PED-ANOVA, for {data.metric})")
    return figure


PNG_BUILDERS = {
    "lr_scaling": png_lr_scaling,
    "objective_plane": png_objective_plane,
    "generalization": png_generalization,
    "learning_curves": png_learning_curves,
    "importances": png_importances,
}


# --------------------------------------------------------------------------- summary, files


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_markdown(data: ReportData, *, figure_links: bool = True) -> str:
    """The short markdown summary: counts, best trial, α in words, best per batch size."""
    summary = data.summary
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary.state_counts.items()))
    total = sum(summary.state_counts.values())
    lines = [
        f"# {data.study_name}: batch size × learning rate",
        "",
        f"{total} trials ({counts or 'none'}); objective: {summary.direction} {data.metric}.",
    ]
    if summary.best is not None:
        best = summary.best
        lines.append(
            f"Best trial {best.number}: {data.metric} = {best.value:.4f} with batch size "
            f"{trial_batch_size(best)}, lr {_fmt(best.params.get('lr'), '.3g')}, "
            f"weight decay {_fmt(best.params.get('weight_decay'), '.2g')}."
        )
    lines += [
        "",
        "## How the best learning rate scales with batch size",
        "",
        data.fit.describe(),
        "",
    ]
    if summary.by_batch_size:
        lines += [
            f"| batch size | complete | pruned | best {data.metric} | lr | weight decay | gap | trial |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in summary.by_batch_size:
            lines.append(
                f"| {row.batch_size} | {row.n_complete} | {row.n_pruned} | {_fmt(row.best_value, '.4f')} "
                f"| {_fmt(row.best_lr, '.3g')} | {_fmt(row.best_weight_decay, '.2g')} "
                f"| {_fmt(row.generalization_gap, '+.3f')} "
                f"| {'-' if row.best_trial is None else row.best_trial} |"
            )
        lines.append("")
        lines.append("gap: train − val accuracy of the best trial at its last epoch.")
    if data.importances:
        ranked = sorted(data.importances.items(), key=lambda item: -item[1])
        lines += [
            "",
            "Importances (PED-ANOVA): " + ", ".join(f"{n} {v:.2f}" for n, v in ranked) + ".",
        ]
    if figure_links:
        lines += ["", "## Figures", ""]
        for name in FIGURE_NAMES:
            lines.append(
                f"- {FIGURE_TITLES[name]}: [{name}.png]({name}.png), [{name}.html]({name}.html)"
            )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Report:
    """What ``write_report`` produced."""

    data: ReportData
    out_dir: Path
    files: list[Path]
    figures: dict[str, go.Figure]

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.md"

    def png(self, name: str) -> Path:
        return self.out_dir / f"{name}.png"


def write_report(
    study: optuna.Study,
    out_dir: Path,
    metric: str = "objective",
    *,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Report:
    """Write the five figures (``NAME.png`` and ``NAME.html``) and ``summary.md`` to ``out_dir``.

    The HTML files share one ``plotly.min.js`` written beside them, so they work offline.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(study, metric, top_k=top_k, confidence=confidence)
    files: list[Path] = []
    figures: dict[str, go.Figure] = {}
    for name in FIGURE_NAMES:
        figure = PLOTLY_BUILDERS[name](data)
        figures[name] = figure
        html = out_dir / f"{name}.html"
        figure.write_html(html, include_plotlyjs="directory", full_html=True)
        png = out_dir / f"{name}.png"
        mpl_figure = PNG_BUILDERS[name](data)
        mpl_figure.savefig(png)
        files += [png, html]
    summary_path = out_dir / "summary.md"
    summary_path.write_text(summary_markdown(data), encoding="utf-8")
    files.append(summary_path)
    return Report(data=data, out_dir=out_dir, files=files, figures=figures)


def attach_report(study: optuna.Study, report: Report, artifact_dir: Path) -> list[str]:
    """Put the report on the study so optuna-dashboard shows it: the plotly figures (as
    dashboard graph objects, stored in the study itself; the dashboard chooses their order),
    the PNGs (as study artifacts in the file-system store at ``artifact_dir``) and the
    summary (as the study's note, with the scaling PNG inline). Replaces what an earlier
    report attached. Returns the graph-object ids.
    """
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import save_note, save_plotly_graph_object

    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(artifact_dir)

    graph_ids = []
    for name in FIGURE_NAMES:
        graph_id = f"{ATTACHED_PREFIX}{name}"
        save_plotly_graph_object(study, report.figures[name], graph_object_id=graph_id)
        graph_ids.append(graph_id)

    artifact_ids = {
        name: _upload_or_replace(study, store, report.png(name), f"{ATTACHED_PREFIX}{name}.png")
        for name in FIGURE_NAMES
    }

    note = summary_markdown(report.data, figure_links=False)
    study_id = study._study_id
    note += (
        "\n![best learning rate per batch size]"
        f"(/artifacts/{study_id}/{artifact_ids['lr_scaling']})\n\n"
        "The interactive figures are on the study's main page, the PNGs under Study "
        "Artifacts there. Regenerate all of this with `hpo report`.\n"
    )
    save_note(study, note)
    return graph_ids


def load_study_for_report(study_name: str, storage_url: str) -> tuple[optuna.Study, str]:
    """The study and the name of its objective (from the spec ``hpo launch`` stored on it;
    "objective" for a study made by other means). Raises StudyNotFound if it is not there."""
    from hpo.storage import SPEC_ATTR, open_storage, require_study

    storage = open_storage(storage_url)
    require_study(storage, study_name, storage_url)
    study = optuna.load_study(study_name=study_name, storage=storage)
    metric = "objective"
    stored = study.user_attrs.get(SPEC_ATTR)
    if isinstance(stored, str):
        with contextlib.suppress(ValueError, AttributeError):
            metric = json.loads(stored).get("objective", {}).get("metric", metric)
    return study, metric


def run_report(
    study_name: str,
    storage_url: str,
    out_dir: Path,
    *,
    artifact_dir: Path | None,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Report:
    """What ``hpo report`` does: load the study, write the files, and attach them to the
    study unless ``artifact_dir`` is None."""
    study, metric = load_study_for_report(study_name, storage_url)
    report = write_report(study, out_dir, metric, top_k=top_k, confidence=confidence)
    if artifact_dir is not None:
        attach_report(study, report, artifact_dir)
    return report


def _upload_or_replace(study: optuna.Study, store: Any, path: Path, filename: str) -> str:
    """Upload ``path`` as the study artifact ``filename``; if an earlier report attached one
    under that name, overwrite its content in place (same id, so links to it stay valid).

    Deleting the old one instead is not an option: optuna-dashboard deletes by setting the
    meta attribute to null, which ``optuna.artifacts.get_all_artifact_meta`` cannot read.
    """
    from optuna.artifacts import upload_artifact

    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        if not key.startswith("artifacts:") or not isinstance(value, str):
            continue
        meta = json.loads(value)
        if meta and meta.get("filename") == filename:
            with path.open("rb") as content:
                store.write(meta["artifact_id"], content)
            return str(meta["artifact_id"])
    named = path.with_name(filename)
    named.write_bytes(path.read_bytes())
    try:
        return upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)
    finally:
        named.unlink()
