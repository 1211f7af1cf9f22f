"""The critical batch size measured directly: steps to reach a target per batch size, fitted
as S(B) = S_min·(1 + B_crit/B) (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", eq. 2.11), with a bootstrap interval over the study's own trials.

- **The target** is the best value the weakest batch size reaches: for each batch size the
  best value any of its trials reported, then the worst of those (``common_target``). Every
  studied batch size reaches it, so each gets a step count.
- **Steps to target** at a batch size is the fewest optimizer updates any of its trials
  (complete or pruned) needed to reach it: the first report at or past the target, the
  crossing placed by linear interpolation from the report before (``steps_to_reach``).
  The minimum over trials is the "LR tuned at each B" of the paper: the trial with the
  best LR gets there first.
- **B_crit** is the paper's: S(B) = S_min + E_min/B, B_crit = E_min/S_min, where a run takes
  twice the minimum steps (and twice the minimum examples). Fitted by least squares on the
  relative error of S (``fit_steps``). A fit without a positive S_min means the steps still
  fall as 1/B over the studied range: B_crit is above it (infinite as a value).
- **The interval** resamples the trials within each batch size (with replacement) and
  refits, ``RESAMPLES`` times, at ``STEPS_CONFIDENCE``: percentiles of B_crit; an upper
  percentile at infinity leaves the interval without an upper end.

Plain Python; reads only finished trials' intermediate values and user attrs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

STEPS_CONFIDENCE = 0.9
RESAMPLES = 1000


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


def steps_to_reach(curve: list[tuple[float, float]], target: float, maximize: bool) -> float | None:
    """Updates until ``curve`` first reaches ``target``, interpolated between reports;
    None when it never does."""
    previous: tuple[float, float] | None = None
    for updates, value in curve:
        if (value >= target) if maximize else (value <= target):
            if previous is None or previous[1] == value:
                return updates
            share = (target - previous[1]) / (value - previous[1])
            return previous[0] + min(1.0, max(0.0, share)) * (updates - previous[0])
        previous = (updates, value)
    return None


def common_target(curves: dict[int, list[list[tuple[float, float]]]], maximize: bool) -> float:
    """The best value the weakest batch size reaches (every batch size reaches it)."""
    best = [
        (max if maximize else min)(v for curve in group for _, v in curve)
        for group in curves.values()
    ]
    return (min if maximize else max)(best)


def fit_steps(points: Iterable[tuple[int, float]]) -> tuple[float, float] | None:
    """(S_min, B_crit) of S(B) = S_min + E_min/B by least squares on S's relative error
    (weights 1/S²); B_crit inf when S_min ≤ 0 (steps ∝ 1/B throughout), 0 when E_min ≤ 0.
    None with fewer than two batch sizes."""
    rows = [(1.0 / b, s, 1.0 / (s * s)) for b, s in points]
    if len({x for x, _, _ in rows}) < 2:
        return None
    sw = sum(w for _, _, w in rows)
    sx = sum(w * x for x, _, w in rows)
    sxx = sum(w * x * x for x, _, w in rows)
    sy = sum(w * s for _, s, w in rows)
    sxy = sum(w * x * s for x, s, w in rows)
    det = sw * sxx - sx * sx
    s_min = (sxx * sy - sx * sxy) / det
    e_min = (sw * sxy - sx * sy) / det
    if s_min <= 0:
        return 0.0, math.inf
    return s_min, max(e_min, 0.0) / s_min


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
    reached = {
        b: [steps_to_reach(curve, target, maximize) for curve in group]
        for b, group in sorted(curves.items())
    }
    reached = {b: group for b, group in reached.items() if any(s is not None for s in group)}
    steps = tuple((b, min(s for s in group if s is not None)) for b, group in reached.items())
    fitted = fit_steps(steps)
    if fitted is None:
        return StepsToTarget(target, steps, reason="fewer than two batch sizes reach the target")
    low, high = _bootstrap(reached, confidence, resamples, seed)
    return StepsToTarget(target, steps, fitted[0], fitted[1], low, high, confidence)


def _bootstrap(
    reached: dict[int, list[float | None]], confidence: float, resamples: int, seed: int
) -> tuple[float | None, float | None]:
    """Percentile interval of B_crit over resamples of the trials within each batch size
    (a batch size whose resample has no trial reaching the target sits that one out)."""
    rng = random.Random(seed)
    estimates = []
    for _ in range(resamples):
        points = []
        for batch_size, group in reached.items():
            drawn = [s for s in rng.choices(group, k=len(group)) if s is not None]
            if drawn:
                points.append((batch_size, min(drawn)))
        fitted = fit_steps(points)
        if fitted is not None:
            estimates.append(fitted[1])
    if len(estimates) < resamples / 2:
        return None, None
    estimates.sort()
    tail = (1 - confidence) / 2
    low = estimates[int(tail * (len(estimates) - 1))]
    high = estimates[math.ceil((1 - tail) * (len(estimates) - 1))]
    return low, (high if math.isfinite(high) else None)
