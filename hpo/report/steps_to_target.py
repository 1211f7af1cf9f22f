"""The critical batch size measured directly: steps to reach a target per batch size, fitted
as S(B) = S_min·(1 + B_crit/B) (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", eq. 2.11), with a bootstrap interval over the study's own trials.

- **The target** is the best value every batch size reaches within ``TARGET_SHARE`` (3/4)
  of its budget: for each batch size the best value any of its trials reported at its
  first 3/4 of the reports, then the worst of those (``common_target``). Every studied
  batch size reaches it, and each crosses it while its curve still rises: at the best
  value of the weakest batch size (the earlier target) the curves are flat, so a tiny
  change of target moved a batch size's steps by half (the benchmark's grid: B = 16 from
  384 to 628 updates between val AUC 0.7337 and 0.7338), and a set of trials whose noise
  peaked higher set a target the others' mean curves never reach.
- **Steps to target** at a batch size is the fewest optimizer updates any of its trials
  (complete or pruned) needed to reach it (``batch_size_steps``): the first report at or
  past the target, the crossing interpolated on log updates from the report before
  (``crossing``). The minimum over trials is the "LR tuned at each B" of the paper: the
  trial with the best LR gets there first. A trial already past the target at its first
  report says only that the steps are *at most* that report's updates: an upper bound,
  not a count (taking it as one would make a small batch size, which makes many updates
  per report under an epoch budget, look slow and push B_crit up).
- **B_crit** is the paper's: S(B) = S_min + E_min/B, B_crit = E_min/S_min, where a run takes
  twice the minimum steps (and twice the minimum examples). Fitted by least squares on
  log S (``fit_steps``: B_crit profiled over a log-spaced grid, S_min in closed form); an
  upper bound counts only where the fit lies above it. B_crit at the grid's top (1,000×
  the largest batch size) means the steps still fall as 1/B over the studied range: above
  it (infinite as a value); at its bottom, 0: they do not fall at all.
- **The interval** is a residual bootstrap (``_bootstrap``): the fit's residuals on log S,
  one per batch size, widened for the two fitted parameters, drawn with replacement onto
  the fitted curve and refitted ``RESAMPLES`` times; percentiles at ``STEPS_CONFIDENCE``.
  An upper percentile at the grid's top leaves the interval without an upper end. The
  residuals hold what moves a batch size's steps off the curve (which LRs its trials
  tried, seed noise, where the reports fall), so a batch size with one trial counts as
  much as one with five; resampling the trials within each batch size instead covered a
  planted B_crit in about 70% of draws, not 90% (the bootstrap of a minimum over 2–3
  trials is nearly degenerate). It needs three or more batch sizes measured between
  reports.

NumPy (every resample's fit at once); reads only finished trials' intermediate values and
user attrs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

STEPS_CONFIDENCE = 0.9
RESAMPLES = 1000
# The target is reached by every batch size within this share of its budget, so each
# crosses it on the rising part of its learning curve, not on the plateau at its end.
TARGET_SHARE = 0.75


@dataclass(frozen=True)
class StepsToTarget:
    """The direct measurement: ``target`` (in the objective's unit), ``steps`` (batch size
    → fewest updates to reach it), ``b_crit`` (inf: above the studied range), its interval
    ``low``/``high`` (high None: no upper end), or ``reason`` why there is none."""

    target: float | None
    steps: tuple[tuple[int, float], ...] = ()
    s_min: float | None = None
    b_crit: float | None = None
    low: float | None = None
    high: float | None = None
    confidence: float = STEPS_CONFIDENCE
    reason: str = ""
    # Batch sizes whose steps are only an upper bound (already past the target at the
    # first report): the report points are too coarse there.
    bounds: tuple[int, ...] = ()

    @property
    def interval(self) -> tuple[float, float] | None:
        """(low, high), high infinite without an upper end; None without an interval."""
        if self.low is None:
            return None
        return self.low, math.inf if self.high is None else self.high


def trial_curve(trial: FrozenTrial) -> list[tuple[float, float]]:
    """(updates, value) at each report: updates from ``updates_at_report`` when the trainer
    stored it, else spread evenly over ``n_updates`` (hpo's loop reports at equal shares
    of the budget in epochs or steps)."""
    values = sorted(trial.intermediate_values.items())
    stored = trial.user_attrs.get("updates_at_report")
    if (
        isinstance(stored, list)
        and len(stored) == len(values)
        and all(isinstance(u, int | float) and u > 0 for u in stored)
    ):
        return [(float(stored[i]), float(v)) for i, (_, v) in enumerate(values)]
    updates, reports = trial.user_attrs.get("n_updates"), len(values)
    if not isinstance(updates, int | float) or updates <= 0 or not reports:
        return []
    return [(updates * (i + 1) / reports, float(v)) for i, (_, v) in enumerate(values)]


def crossing(
    curve: list[tuple[float, float]], target: float, maximize: bool
) -> tuple[float, bool] | None:
    """(updates, exact) where ``curve`` first reaches ``target``; None when it never does.
    Between two reports the crossing is interpolated on log updates (learning curves are
    closer to straight lines there than on linear updates). Reached already at the first
    report, it is known only to be at most that report's updates: ``exact`` False."""
    previous: tuple[float, float] | None = None
    for updates, value in curve:
        if (value >= target) if maximize else (value <= target):
            if previous is None:
                return updates, False
            if previous[1] == value:
                return updates, True
            share = min(1.0, max(0.0, (target - previous[1]) / (value - previous[1])))
            return previous[0] * (updates / previous[0]) ** share, True
        previous = (updates, value)
    return None


def steps_to_reach(curve: list[tuple[float, float]], target: float, maximize: bool) -> float | None:
    """Updates until ``curve`` first reaches ``target`` (``crossing``; at the first report
    an upper bound); None when it never does."""
    reached = crossing(curve, target, maximize)
    return None if reached is None else reached[0]


def common_target(
    curves: dict[int, list[list[tuple[float, float]]]], maximize: bool, share: float = TARGET_SHARE
) -> float:
    """The best value every batch size reaches within ``share`` of its budget: per batch
    size the best value any of its trials reported at its first ``share`` of the reports
    (of the most any of its trials made), then the worst of those."""
    best = []
    for group in curves.values():
        reports = max(1, math.floor(share * max(len(curve) for curve in group) + 1e-9))
        best.append((max if maximize else min)(v for curve in group for _, v in curve[:reports]))
    return (min if maximize else max)(best)


def batch_size_steps(
    crossings: Iterable[tuple[float, bool] | None],
) -> tuple[float, bool] | None:
    """One batch size's steps to target from its trials' crossings: the fewest exact ones,
    or, when a trial already past the target at its first report could be fewer, that
    report's updates as an upper bound (exact False). None when no trial reaches it."""
    reached = [c for c in crossings if c is not None]
    if not reached:
        return None
    exact = min((u for u, e in reached if e), default=math.inf)
    bound = min((u for u, e in reached if not e), default=math.inf)
    return (exact, True) if exact <= bound else (bound, False)


# B_crit is profiled over this many log-spaced values per decade, from GRID_REACH below the
# smallest studied batch size to GRID_REACH above the largest; the top end reads as
# "above the studied range" (infinite), the bottom one as 0.
GRID_PER_DECADE = 24
GRID_REACH = 1000.0


def _solve(y: np.ndarray, point: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares level (log S_min) over the last axis of ``y`` (log S minus the
    curve's shape) and its sum of squares: ``point`` entries count, ``bound`` ones (upper
    bounds) only where the level lies above them."""
    y0 = np.where(point | bound, y, 0.0)
    used = point.copy()
    level = np.zeros(y.shape[:-1])
    for _ in range(2 + int(bound.sum(axis=-1).max(initial=0))):  # the active set settles
        count = used.sum(axis=-1)
        level = np.where(count > 0, (y0 * used).sum(axis=-1) / np.maximum(count, 1), 0.0)
        active = point | (bound & (level[..., None] > y0))
        if np.array_equal(active, used):
            break
        used = active
    residual = np.where(used, y0 - level[..., None], 0.0)
    return level, (residual**2).sum(axis=-1)


def _at(
    b_crit: np.ndarray, batch_sizes: np.ndarray, logs: np.ndarray, exact: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Level and sum of squares of each row of ``logs`` (rows × batch sizes; NaN: left
    out) at the B_crit values ``b_crit`` (rows × candidates)."""
    shape = np.log1p(b_crit[..., None] / batch_sizes)  # rows × candidates × batch sizes
    y = logs[:, None, :] - shape
    present = ~np.isnan(y)
    return _solve(y, present & exact, present & ~exact)


def _fit_rows(
    batch_sizes: np.ndarray, logs: np.ndarray, exact: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(S_min, B_crit) per row of ``logs`` by least squares of log S = log S_min +
    log(1 + B_crit/B): B_crit profiled over a log-spaced grid, then refined by parabolas
    on log B_crit around the best point. The grid's top end reads as infinite, its
    bottom as 0."""
    low = batch_sizes.min() / GRID_REACH
    decades = math.log10(batch_sizes.max() * GRID_REACH / low)
    log_grid = np.log(low) + np.log(10) * np.linspace(
        0, decades, int(decades * GRID_PER_DECADE) + 1
    )
    rows = np.arange(len(logs))
    level, sse = _at(np.broadcast_to(np.exp(log_grid), (len(logs), len(log_grid))),
                     batch_sizes, logs, exact)  # fmt: skip
    best = sse.argmin(axis=1)
    centre = log_grid[np.clip(best, 1, len(log_grid) - 2)]
    spacing = log_grid[1] - log_grid[0]
    for _ in range(4):
        candidates = centre[:, None] + spacing * np.array([-1.0, 0.0, 1.0])
        _, around = _at(np.exp(candidates), batch_sizes, logs, exact)
        left, mid, right = around[:, 0], around[:, 1], around[:, 2]
        curvature = left - 2 * mid + right
        safe = np.where(curvature > 0, curvature, 1.0)
        step = np.where(curvature > 0, np.clip(0.5 * (left - right) / safe, -1, 1), 0.0)
        centre, spacing = centre + step * spacing, spacing / 3
    inner = (best > 0) & (best < len(log_grid) - 1)
    refined_level, _ = _at(np.exp(centre)[:, None], batch_sizes, logs, exact)
    b_crit = np.where(inner, np.exp(centre), np.where(best == 0, 0.0, np.inf))
    s_min = np.where(inner, np.exp(refined_level[:, 0]), np.exp(level[rows, best]))
    return s_min, b_crit


def fit_steps(
    points: Iterable[tuple[int, float]], bounds: Iterable[tuple[int, float]] = ()
) -> tuple[float, float] | None:
    """(S_min, B_crit) of S(B) = S_min·(1 + B_crit/B) by least squares on log S; ``bounds``
    are batch sizes whose steps are known only from above (they count where the fit lies
    above them). B_crit inf: the steps fall as 1/B (or faster) over the whole range, B_crit
    is above it; 0: they do not fall. None with fewer than two exact batch sizes."""
    points, bounds = list(points), list(bounds)
    if len({b for b, _ in points}) < 2:
        return None
    rows = points + bounds
    batch_sizes = np.array([float(b) for b, _ in rows])
    logs = np.log(np.array([[s for _, s in rows]]))
    exact = np.array([True] * len(points) + [False] * len(bounds))
    s_min, b_crit = _fit_rows(batch_sizes, logs, exact)
    return float(s_min[0]), float(b_crit[0])


def measure_steps_to_target(
    trials: Iterable[FrozenTrial],
    maximize: bool,
    batch_size_of: Callable[[FrozenTrial], int | None],
    *,
    confidence: float = STEPS_CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
    target: float | None = None,
) -> StepsToTarget:
    """B_crit from the study's complete and pruned trials (see the module's docstring), at
    ``target`` when given (to compare two sets of trials at one target), else at
    ``common_target``; a batch size none of whose trials reaches it is left out."""
    curves: dict[int, list[list[tuple[float, float]]]] = {}
    for trial in trials:
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        batch_size, curve = batch_size_of(trial), trial_curve(trial)
        if batch_size and curve:
            curves.setdefault(batch_size, []).append(curve)
    if len(curves) < 2:
        return StepsToTarget(None, reason="it needs trials with reports at two or more batch sizes")
    target = common_target(curves, maximize) if target is None else target
    measured = {
        b: batch_size_steps(crossing(curve, target, maximize) for curve in group)
        for b, group in sorted(curves.items())
    }
    points = {b: m for b, m in measured.items() if m is not None}
    exact = [(b, s) for b, (s, e) in points.items() if e]
    bounds = [(b, s) for b, (s, e) in points.items() if not e]
    steps = tuple((b, s) for b, (s, _) in points.items())
    fitted = fit_steps(exact, bounds)
    if fitted is None:
        return StepsToTarget(
            target, steps, bounds=tuple(b for b, _ in bounds),
            reason="fewer than two batch sizes reach the target between two reports",
        )  # fmt: skip
    low, high, reason = _bootstrap(exact, bounds, confidence, resamples, seed)
    return StepsToTarget(
        target, steps, fitted[0], fitted[1], low, high, confidence,
        reason=reason, bounds=tuple(b for b, _ in bounds),
    )  # fmt: skip


def _bootstrap(
    exact: list[tuple[int, float]],
    bounds: list[tuple[int, float]],
    confidence: float,
    resamples: int,
    seed: int,
) -> tuple[float | None, float | None, str]:
    """Percentile interval of B_crit by a residual bootstrap: the fit's residuals on log S
    (one per batch size measured between reports), widened for the two fitted parameters
    (× sqrt(n/(n−2)) and by Student's t over the normal quantile, n − 2 degrees of freedom),
    drawn with replacement onto the fitted curve and refitted ``resamples`` times; the
    upper bounds stay as they are. (low, high or None: no upper end, reason if none.)"""
    n = len(exact)
    if n < 3:
        return None, None, "an interval needs three or more batch sizes that reach the target"
    s_min, b_crit = fit_steps(exact, bounds)
    sizes = np.array([float(b) for b, _ in exact])
    fitted = math.log(s_min) + np.log1p(b_crit / sizes) if math.isfinite(b_crit) else None
    if fitted is None:  # steps ∝ 1/B: the fit's limit, log S = log(S_min·B_crit) − log B
        logs = np.log([s for _, s in exact])
        fitted = (logs + np.log(sizes)).mean() - np.log(sizes)
    residual = np.log([s for _, s in exact]) - fitted
    tail = (1 - confidence) / 2
    widen = math.sqrt(n / (n - 2)) * stats.t.ppf(1 - tail, n - 2) / stats.norm.ppf(1 - tail)
    rng = np.random.default_rng(seed)
    drawn = fitted[None, :] + widen * rng.choice(residual - residual.mean(), (resamples, n))
    logs = (
        np.concatenate([drawn, np.log([[s for _, s in bounds]] * resamples)], axis=1)
        if bounds
        else drawn
    )
    batch_sizes = np.array([float(b) for b, _ in exact + bounds])
    marks = np.array([True] * n + [False] * len(bounds))
    _, estimates = _fit_rows(batch_sizes, logs, marks)
    low, high = np.quantile(estimates, [tail, 1 - tail], method="inverted_cdf")
    return float(low), (float(high) if math.isfinite(high) else None), ""
