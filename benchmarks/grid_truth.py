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
(pooled over batch sizes). Where some configs have more seeds than others (a grid extended
at the cells that decide the peaks, ``grid_cells.py``), each config's mean has its own
standard error, the pooled seed-to-seed deviation / √(its seeds): the quadratic weighs each
point by 1 / its standard error², and each redraw draws each mean with its own. The window
stays in the metric's units (it separates the flat top from the cliff, not noise from
signal). Pure: numbers in, numbers out (numpy).
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


@dataclass(frozen=True)
class Cell:
    """One grid config: its mean over ``count`` seeds and the seeds' values known one by one
    (a cache from before seeds were kept, or a cell's base seeds averaged, gives none)."""

    mean: float
    count: int
    known: tuple[float, ...] = ()


def peak(
    log2_lrs: np.ndarray,
    values: np.ndarray,
    window: float,
    three_at_edge: bool = False,
    errors: np.ndarray | None = None,
) -> Peak:
    """The quadratic's vertex over the points near the top (``values`` larger is better,
    ``log2_lrs`` ascending), each point weighed by 1 / its standard error² where ``errors``
    differ among the points fitted. With ``three_at_edge`` an argmax at the grid's end takes
    the next two points (a parabola through three, its vertex kept inside them) where the
    window holds fewer: on an axis with no divergence cliff and few points (a weight-decay
    axis) a best value at the end is then still placed between grid points."""
    top = int(np.argmax(values))
    low = high = top
    while low > 0 and values[low - 1] >= values[top] - window:
        low -= 1
    while high < len(values) - 1 and values[high + 1] >= values[top] - window:
        high += 1
    if high - low < 2:  # the argmax and its neighbours, as a parabola through three points
        low, high = max(0, min(low, top - 1)), min(len(values) - 1, max(high, top + 1))
    if three_at_edge and high - low < 2 and len(values) >= 3:
        low, high = (0, 2) if top == 0 else (len(values) - 3, len(values) - 1)
    if high - low < 2:  # two grid points: no curvature to fit
        return Peak(2.0 ** float(log2_lrs[top]), float(values[top]), high - low + 1, ())
    xs, ys = log2_lrs[low : high + 1], values[low : high + 1]
    weights = None
    if errors is not None and np.ptp(errors[low : high + 1]) > 0:
        weights = 1.0 / errors[low : high + 1]  # polyfit squares them
    coefficients = np.polyfit(xs, ys, 2, w=weights)
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


def _lr_rows(mean: dict[tuple, float], maximize: bool) -> list[tuple]:
    """(log2 LRs, values) of each batch size's LR row, one per weight decay where the keys
    carry one (batch size, lr, weight decay)."""
    groups: dict[tuple, dict[tuple[int, float], float]] = {}
    for key, v in mean.items():
        groups.setdefault(tuple(key[2:]), {})[(key[0], key[1])] = v
    return [row for group in groups.values() for row in rows_of(group, maximize).values()]


def grid_standard_error(
    mean: dict[tuple, float],
    per_seed: dict[tuple, list[float]] | None,
    maximize: bool,
    window: float = DEFAULT_WINDOW,
) -> tuple[float, str]:
    """σ of one config's mean and where it comes from: the seeds' spread (configs within
    ``window`` of their batch size's best) when each seed's value is known and there are two
    or more; else the points' scatter about the fitted quadratics."""
    sign = 1.0 if maximize else -1.0
    if per_seed and min(len(v) for v in per_seed.values()) >= 2:
        best: dict[int, float] = {}
        for key, v in mean.items():  # key: (batch size, lr) or (batch size, lr, weight decay)
            best[key[0]] = max(best.get(key[0], -math.inf), sign * v)
        near = [v for key, v in per_seed.items() if sign * mean[key] >= best[key[0]] - window]
        variance = statistics.mean(statistics.variance(v) for v in near)
        seeds = statistics.mean(len(v) for v in near)
        return math.sqrt(variance / seeds), f"seed-to-seed spread of {len(near)} near-best configs"
    squares, dof = 0.0, 0
    for log2_lrs, values in _lr_rows(mean, maximize):
        found = peak(log2_lrs, values, window)
        squares += sum(r * r for r in found.residuals)
        dof += max(0, len(found.residuals) - 3)
    if dof == 0:
        return float("nan"), "unknown (no fit has a residual degree of freedom)"
    return math.sqrt(squares / dof), f"scatter about the fitted quadratics ({dof} dof)"


def cell_standard_errors(
    mean: dict[tuple, float],
    known: dict[tuple, list[float]],
    counts: dict[tuple, int],
    maximize: bool,
    window: float = DEFAULT_WINDOW,
) -> tuple[dict[tuple, float], str]:
    """Each config's standard error where configs have different numbers of seeds
    (``counts``): the seed-to-seed standard deviation pooled (by degrees of freedom) over the
    configs within ``window`` of their batch size's best whose seeds' values are ``known``
    one by one (two or more), over √(the config's seeds). NaN everywhere when none has two."""
    sign = 1.0 if maximize else -1.0
    best: dict[int, float] = {}
    for key, v in mean.items():  # key: (batch size, lr) or (batch size, lr, weight decay)
        best[key[0]] = max(best.get(key[0], -math.inf), sign * v)
    near = [
        v for key, v in known.items() if len(v) >= 2 and sign * mean[key] >= best[key[0]] - window
    ]
    dof = sum(len(v) - 1 for v in near)
    if dof == 0:
        return {key: math.nan for key in mean}, "unknown (no config has two known seeds)"
    deviation = math.sqrt(sum(statistics.variance(v) * (len(v) - 1) for v in near) / dof)
    errors = {key: deviation / math.sqrt(counts[key]) for key in mean}
    return errors, f"seed-to-seed spread of {len(near)} near-best configs ({dof} dof) / √seeds"


def _errors_row(sigma: float | dict, batch_size: int, size: int) -> np.ndarray:
    """The standard errors of one batch size's means in ``rows_of``'s order (ascending LR)."""
    if not isinstance(sigma, dict):
        return np.full(size, sigma)
    return np.array([e for (b, _), e in sorted(sigma.items()) if b == batch_size])


def grid_truth(
    mean: dict[tuple[int, float], float],
    maximize: bool,
    sigma: float | dict[tuple[int, float], float],
    window: float = DEFAULT_WINDOW,
    seed: int = 0,
) -> dict[int, Truth]:
    """Each batch size's peak LR, its ``CONFIDENCE`` interval (the grid redrawn ``DRAWS``
    times, each mean with noise ``sigma``: one standard error for all, or each config's
    own) and the peak value (in the metric's own sign)."""
    sign = 1.0 if maximize else -1.0
    rng = np.random.default_rng(seed)
    truths = {}
    for batch_size, (log2_lrs, values) in rows_of(mean, maximize).items():
        errors = _errors_row(sigma, batch_size, len(values))
        found = peak(log2_lrs, values, window, errors=errors)
        redrawn = [found]
        if isinstance(sigma, dict) and np.all(np.isfinite(errors)) and np.all(errors > 0):
            noise = rng.normal(0.0, 1.0, (DRAWS, len(values))) * errors
            redrawn = [peak(log2_lrs, values + n, window, errors=errors) for n in noise]
        elif not isinstance(sigma, dict) and sigma > 0 and math.isfinite(sigma):
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


# ---------------------------------------------------------------- a weight-decay axis


@dataclass(frozen=True)
class PairTruth:
    """One batch size's reference on a grid with a weight-decay axis: the best weight
    decay λ (the vertex of a quadratic in log2 λ through each weight decay's LR-peak value,
    ``peak`` again, with three points at least: no cliff on this axis), the LR of that pair (each weight decay's
    peak LR interpolated in log2 λ at the best λ), both with their ``CONFIDENCE``
    intervals from the redrawn grids, the pair's value and its standard error. ``draws``
    holds each redrawn grid's (log2 LR, log2 λ): the grid's timescale per batch size and
    its trend come from them (``tau_trend``)."""

    lr: float
    lr_interval: tuple[float, float]
    weight_decay: float
    weight_decay_interval: tuple[float, float]
    value: float
    value_se: float
    n_points: int
    draws: tuple[tuple[float, float], ...] = ()


def cube_of(
    mean: dict[tuple[int, float, float], float], maximize: bool
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch size, (log2 weight decays ascending, log2 LRs ascending, values with
    larger better, one row per weight decay). Every (LR, weight decay) must be there."""
    sign = 1.0 if maximize else -1.0
    cubes = {}
    for batch_size in sorted({b for b, _, _ in mean}):
        lrs = sorted({lr for b, lr, _ in mean if b == batch_size})
        wds = sorted({wd for b, _, wd in mean if b == batch_size})
        values = np.array([[sign * mean[(batch_size, lr, wd)] for lr in lrs] for wd in wds])
        cubes[batch_size] = (np.log2(wds), np.log2(lrs), values)
    return cubes


def pair_peak(
    log2_wds: np.ndarray, log2_lrs: np.ndarray, values: np.ndarray, window: float
) -> tuple[float, float, float, int]:
    """(log2 LR, log2 λ, value, points fitted) of the best pair: the LR peak of each weight
    decay's row, then ``peak`` over those peaks' values in log2 λ."""
    rows = [peak(log2_lrs, row, window) for row in values]
    best = peak(log2_wds, np.array([p.value for p in rows]), window, three_at_edge=True)
    log2_wd = math.log2(best.lr)
    log2_lr = float(np.interp(log2_wd, log2_wds, [math.log2(p.lr) for p in rows]))
    return log2_lr, log2_wd, best.value, best.n_points


def pair_truth(
    mean: dict[tuple[int, float, float], float],
    maximize: bool,
    sigma: float,
    window: float = DEFAULT_WINDOW,
    seed: int = 0,
) -> dict[int, PairTruth]:
    """Each batch size's best (LR, λ) with intervals from the grid redrawn ``DRAWS`` times
    with noise ``sigma`` on every config's mean, and the pair's value (the metric's sign)."""
    sign = 1.0 if maximize else -1.0
    rng = np.random.default_rng(seed)
    tail = (1 - CONFIDENCE) / 2
    truths = {}
    for batch_size, (log2_wds, log2_lrs, values) in cube_of(mean, maximize).items():
        found = pair_peak(log2_wds, log2_lrs, values, window)
        redrawn = [found]
        if sigma > 0 and math.isfinite(sigma):
            noise = rng.normal(0.0, sigma, (DRAWS, *values.shape))
            redrawn = [pair_peak(log2_wds, log2_lrs, values + n, window) for n in noise]
        lr_low, lr_high = np.quantile([d[0] for d in redrawn], [tail, 1 - tail])
        wd_low, wd_high = np.quantile([d[1] for d in redrawn], [tail, 1 - tail])
        truths[batch_size] = PairTruth(
            lr=2.0 ** found[0],
            lr_interval=(2.0 ** float(lr_low), 2.0 ** float(lr_high)),
            weight_decay=2.0 ** found[1],
            weight_decay_interval=(2.0 ** float(wd_low), 2.0 ** float(wd_high)),
            value=sign * found[2],
            value_se=float(np.std([d[2] for d in redrawn])),
            n_points=found[3],
            draws=tuple((d[0], d[1]) for d in redrawn),
        )
    return truths


@dataclass(frozen=True)
class TauTrend:
    """The grid's AdamW timescale τ_epoch = B/(η·λ·N) at each batch size's best pair, its
    ``CONFIDENCE`` interval per batch size, and the slope of log2 τ on log2 B with its
    interval over the redrawn grids; ``constant`` when that interval contains 0."""

    tau: dict[int, float]
    tau_interval: dict[int, tuple[float, float]]
    slope: float
    slope_interval: tuple[float, float]

    @property
    def constant(self) -> bool:
        return self.slope_interval[0] <= 0.0 <= self.slope_interval[1]


def tau_trend(truths: dict[int, PairTruth], train_size: int) -> TauTrend:
    """τ per batch size and its trend from ``pair_truth``'s best pairs and draws (draw i of
    every batch size taken together: the batch sizes' noise is independent)."""
    sizes = sorted(truths)
    x = np.log2(sizes)

    def log2_tau(batch_size: int, log2_lr: float, log2_wd: float) -> float:
        return math.log2(batch_size / train_size) - log2_lr - log2_wd

    point = [log2_tau(b, math.log2(truths[b].lr), math.log2(truths[b].weight_decay)) for b in sizes]
    n_draws = min(len(truths[b].draws) for b in sizes)
    draws = np.array([[log2_tau(b, *truths[b].draws[i]) for b in sizes] for i in range(n_draws)])
    tail = (1 - CONFIDENCE) / 2
    slopes = [float(np.polyfit(x, row, 1)[0]) for row in draws] if len(sizes) >= 2 else [0.0]
    low, high = np.quantile(slopes, [tail, 1 - tail])
    intervals = {
        b: (
            2.0 ** float(np.quantile(draws[:, i], tail)),
            2.0 ** float(np.quantile(draws[:, i], 1 - tail)),
        )
        for i, b in enumerate(sizes)
    }
    slope = float(np.polyfit(x, point, 1)[0]) if len(sizes) >= 2 else 0.0
    return TauTrend(
        {b: 2.0**p for b, p in zip(sizes, point, strict=True)},
        intervals,
        slope,
        (float(low), float(high)),
    )
