"""A grid's best LR at each batch size as a smooth fit with its own uncertainty.

A grid's best LR read as its argmax (or the vertex of a parabola through the argmax and its
two neighbours) is an argmax over a noisy curve: where the value is flat within the grid's
noise over several LRs, which grid point comes out on top is decided by seed noise and moves
by an octave from one set of seeds to another. So the reference here is

- the **peak**: the vertex of a least-squares quadratic in log2 LR through the contiguous
  run of grid points around the argmax whose mean value is within ``window`` of it (at
  least the argmax and its two neighbours; the vertex kept inside the points fitted). The
  points further down are left out: past the optimum the value falls off a cliff where
  training diverges, which no parabola follows.
- its **80% interval**: the same procedure on the grid's means redrawn with their own noise
  (a parametric bootstrap: each mean + N(0, σ²), σ the standard error of one config's mean,
  the argmax and the window chosen anew each draw);
- the **peak value**: the quadratic at its vertex (the largest of many noisy means reads
  high by about one standard error; the fit pools the points near the top), and its
  standard error over the same redraws.

σ is the seed-to-seed standard deviation / √seeds pooled over the configs near the top when
the grid kept each seed's value, else the points' scatter about the fitted quadratics
(pooled over batch sizes). Pure: numbers in, numbers out (numpy).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

# Grid points within this much of the best mean enter the quadratic: three times the value
# goal, about four standard errors of the demo grid's two-seed means; far enough to hold the
# flat top, near enough to leave the divergence cliff out. (prediction_quality.py widens it
# to four standard errors where a grid's seeds say its metric is noisier.)
DEFAULT_WINDOW = 0.03
DRAWS = 400
CONFIDENCE = 0.8


@dataclass(frozen=True)
class Peak:
    lr: float
    value: float
    n_points: int
    residuals: tuple[float, ...]


@dataclass(frozen=True)
class Truth:
    """One batch size's reference: the peak LR, its interval, the peak value."""

    lr: float
    lr_interval: tuple[float, float]
    value: float
    n_points: int
    value_se: float = 0.0


def peak(log2_lrs: np.ndarray, values: np.ndarray, window: float) -> Peak:
    """The quadratic's vertex over the points near the top (``values`` larger is better,
    ``log2_lrs`` ascending)."""
    top = int(np.argmax(values))
    low = high = top
    while low > 0 and values[low - 1] >= values[top] - window:
        low -= 1
    while high < len(values) - 1 and values[high + 1] >= values[top] - window:
        high += 1
    if high - low < 2:  # the argmax and its neighbours, as a parabola through three points
        low, high = max(0, min(low, top - 1)), min(len(values) - 1, max(high, top + 1))
    if high - low < 2:  # two grid points: no curvature to fit
        return Peak(2.0 ** float(log2_lrs[top]), float(values[top]), high - low + 1, ())
    xs, ys = log2_lrs[low : high + 1], values[low : high + 1]
    coefficients = np.polyfit(xs, ys, 2)
    if coefficients[0] < 0:
        vertex = float(np.clip(-coefficients[1] / (2 * coefficients[0]), xs[0], xs[-1]))
    else:  # no maximum inside: the best grid point
        vertex = float(log2_lrs[top])
    residuals = ys - np.polyval(coefficients, xs)
    value = float(np.polyval(coefficients, vertex))
    return Peak(2.0**vertex, value, len(xs), tuple(float(r) for r in residuals))


def rows_of(mean: dict[tuple[int, float], float], maximize: bool) -> dict[int, tuple]:
    """Per batch size, (log2 LRs ascending, values with larger better)."""
    sign = 1.0 if maximize else -1.0
    rows = {}
    for batch_size in sorted({b for b, _ in mean}):
        row = sorted((lr, sign * v) for (b, lr), v in mean.items() if b == batch_size)
        rows[batch_size] = (np.log2([lr for lr, _ in row]), np.array([v for _, v in row]))
    return rows


def grid_standard_error(
    mean: dict[tuple[int, float], float],
    per_seed: dict[tuple[int, float], list[float]] | None,
    maximize: bool,
    window: float = DEFAULT_WINDOW,
) -> tuple[float, str]:
    """σ of one config's mean and where it comes from: the seeds' spread (configs within
    ``window`` of their batch size's best) when each seed's value is known and there are two
    or more; else the points' scatter about the fitted quadratics."""
    sign = 1.0 if maximize else -1.0
    if per_seed and min(len(v) for v in per_seed.values()) >= 2:
        best = {b: max(sign * v for (bb, _), v in mean.items() if bb == b) for b, _ in mean}
        near = [v for (b, lr), v in per_seed.items() if sign * mean[(b, lr)] >= best[b] - window]
        variance = statistics.mean(statistics.variance(v) for v in near)
        seeds = statistics.mean(len(v) for v in near)
        return math.sqrt(variance / seeds), f"seed-to-seed spread of {len(near)} near-best configs"
    squares, dof = 0.0, 0
    for log2_lrs, values in rows_of(mean, maximize).values():
        found = peak(log2_lrs, values, window)
        squares += sum(r * r for r in found.residuals)
        dof += max(0, len(found.residuals) - 3)
    if dof == 0:
        return float("nan"), "unknown (no fit has a residual degree of freedom)"
    return math.sqrt(squares / dof), f"scatter about the fitted quadratics ({dof} dof)"


def grid_truth(
    mean: dict[tuple[int, float], float],
    maximize: bool,
    sigma: float,
    window: float = DEFAULT_WINDOW,
    seed: int = 0,
) -> dict[int, Truth]:
    """Each batch size's peak LR, its ``CONFIDENCE`` interval (the grid redrawn ``DRAWS``
    times with noise ``sigma``) and the peak value (in the metric's own sign)."""
    sign = 1.0 if maximize else -1.0
    rng = np.random.default_rng(seed)
    truths = {}
    for batch_size, (log2_lrs, values) in rows_of(mean, maximize).items():
        found = peak(log2_lrs, values, window)
        redrawn = [found]
        if sigma > 0 and math.isfinite(sigma):
            noise = rng.normal(0.0, sigma, (DRAWS, len(values)))
            redrawn = [peak(log2_lrs, values + n, window) for n in noise]
        draws = [p.lr for p in redrawn]
        tail = (1 - CONFIDENCE) / 2
        low, high = np.quantile(np.log2(draws), [tail, 1 - tail])
        truths[batch_size] = Truth(
            lr=found.lr,
            lr_interval=(2.0 ** float(low), 2.0 ** float(high)),
            value=sign * found.value,
            n_points=found.n_points,
            value_se=float(np.std([p.value for p in redrawn])),
        )
    return truths
