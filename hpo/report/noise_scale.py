"""The critical batch size two ways: the LR ridge ε_opt(B) = ε_max / (1 + B_noise / B)
fitted to the best learning rate per batch size, and the gradient noise scale B_simple
measured in every trial (``hpo.noise``). McCandlish et al. (2018) predict B_noise ≈ B_simple.

Pure: points and trials in, numbers and a sentence out.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.noise_interval import NOISE_SCALE_CONFIDENCE, fieller_interval, pool_sums

# The grid B_noise is searched on, relative to the studied batch sizes (log-spaced).
_GRID_POINTS = 241
_GRID_SPAN = 2.0**8
# B_noise this far below the smallest (above the largest) studied batch size is a bound.
EDGE_FACTOR = 4.0


@dataclass(frozen=True)
class RidgeFit:
    """ε_opt(B) = ε_max / (1 + B_noise / B) by least squares on log lr; ``b_noise_low`` /
    ``b_noise_high`` is the bootstrap interval over the points (None when too few). A fit
    whose B_noise sits on the edge of the searched grid only bounds it from one side."""

    eps_max: float | None
    b_noise: float | None
    b_noise_low: float | None
    b_noise_high: float | None
    n_points: int
    # The smallest and largest fitted batch sizes: B_noise far outside them is a bound.
    smallest_batch: float | None = None
    largest_batch: float | None = None

    def lr_at(self, batch_size: float) -> float:
        if self.eps_max is None or self.b_noise is None:
            raise ValueError("no ridge was fitted")
        return self.eps_max / (1 + self.b_noise / batch_size)

    @property
    def edge(self) -> str | None:
        """Whether B_noise is only a bound. "low": at most a quarter of the smallest
        fitted batch size, where ε_opt is within 20% of ε_max at every studied B
        (1 / (1 + 1/4) = 0.8): the ridge is flat there, every studied batch is above the
        critical one, and the data pin down no more (the fit may even land on the
        searched grid's lower end, min B / 256). "high": at least 4× the largest, where
        ε_opt is within 20% of linear in B throughout. None in between: a value."""
        if self.b_noise is None or self.smallest_batch is None or self.largest_batch is None:
            return None
        if self.b_noise <= self.smallest_batch / EDGE_FACTOR:
            return "low"
        if self.b_noise >= self.largest_batch * EDGE_FACTOR:
            return "high"
        return None


@dataclass(frozen=True)
class BatchSizeNoiseScale:
    """B_simple of one batch size: its complete trials' measurements pooled (their running
    sums added), the ratio of means and Fieller's interval (``high`` None: a lower bound)."""

    batch_size: int
    value: float | None
    low: float | None
    high: float | None
    n_trials: int
    n_measurements: int


@dataclass(frozen=True)
class MeasuredNoiseScale:
    """B_simple over the best complete trials: median and quartiles of their values and,
    when the trials stored their measurements' sums, those pooled (``pooled``, Fieller's
    interval ``interval_low``/``interval_high``; high None: only a lower bound); and the
    same per batch size over all its complete trials (``by_batch_size``).

    Pooling is what makes one number from short trials: each trial measures the same
    tr(Σ)/|G|² of the task at the same point of the same schedule; the ratio of the pooled
    means is then an estimate over all their pairs, and the interval narrows with them."""

    median: float | None
    low: float | None
    high: float | None
    n_trials: int
    pooled: float | None = None
    interval_low: float | None = None
    interval_high: float | None = None
    n_measurements: int = 0
    by_batch_size: tuple[BatchSizeNoiseScale, ...] = ()
    confidence: float = NOISE_SCALE_CONFIDENCE

    @property
    def value(self) -> float | None:
        """The pooled estimate, else (trials without sums) the median."""
        return self.pooled if self.pooled is not None else self.median


def _sse(points: list[tuple[float, float]], b_noise: float) -> tuple[float, float]:
    """Residual sum of squares in log lr and the best log ε_max, for a given B_noise."""
    offsets = [math.log(lr) + math.log1p(b_noise / b) for b, lr in points]
    log_eps = sum(offsets) / len(offsets)
    return sum((o - log_eps) ** 2 for o in offsets), log_eps


def _fit(points: list[tuple[float, float]], grid: list[float]) -> tuple[float, float]:
    best = min(grid, key=lambda b_noise: _sse(points, b_noise)[0])
    return best, math.exp(_sse(points, best)[1])


def fit_lr_ridge(
    points: list[tuple[int, float]],
    *,
    bootstrap: int = 200,
    confidence: float = 0.9,
    seed: int = 0,
) -> RidgeFit:
    """Fit the ridge to (batch size, best lr) points; B_noise is searched on a log grid
    from min(B)/256 to max(B)·256 (ε_max then has a closed form). The interval resamples
    the points with replacement ``bootstrap`` times."""
    batch_sizes = sorted({b for b, _ in points})
    if len(batch_sizes) < 2:
        return RidgeFit(None, None, None, None, len(points))
    low, high = batch_sizes[0] / _GRID_SPAN, batch_sizes[-1] * _GRID_SPAN
    step = math.log(high / low) / (_GRID_POINTS - 1)
    grid = [low * math.exp(i * step) for i in range(_GRID_POINTS)]
    floats = [(float(b), float(lr)) for b, lr in points]
    b_noise, eps_max = _fit(floats, grid)
    ends = {"smallest_batch": float(batch_sizes[0]), "largest_batch": float(batch_sizes[-1])}
    if len(points) < 3 or bootstrap < 1:  # bootstrap 0: the fit alone, no interval
        return RidgeFit(eps_max, b_noise, None, None, len(points), **ends)
    rng = random.Random(seed)
    draws = []
    for _ in range(bootstrap):
        sample = [rng.choice(floats) for _ in floats]
        if len({b for b, _ in sample}) >= 2:
            draws.append(_fit(sample, grid)[0])
    draws.sort()
    tail = (1 - confidence) / 2
    pick = lambda q: draws[min(len(draws) - 1, int(q * len(draws)))]  # noqa: E731
    return RidgeFit(eps_max, b_noise, pick(tail), pick(1 - tail), len(points), **ends)


# A noise scale beyond this many examples is no measurement: no data set is that large,
# and such values (a near-zero |G|² estimate) broke the report's log axes.
MAX_NOISE_SCALE = 1e12


def positive_b_simple(value: object) -> float | None:
    """A stored B_simple as a float, or None unless it is a positive finite number up to
    ``MAX_NOISE_SCALE``: a non-positive ratio (two noisy averages, one ≤ 0) is no noise
    scale, and neither is an astronomical one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        return None
    if not math.isfinite(number) or not 0 < number <= MAX_NOISE_SCALE:
        return None
    return number


def _stored_batch_size(trial: FrozenTrial) -> int | None:
    value = trial.user_attrs.get("batch_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def measured_b_simple(
    study: optuna.Study,
    *,
    top_k: int = 5,
    batch_size_of: Callable[[FrozenTrial], int | None] | None = None,
) -> MeasuredNoiseScale:
    """B_simple of the ``top_k`` best complete trials that recorded a positive one, and
    per batch size (``batch_size_of`` reads a trial's; default: its stored user attr)."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if positive_b_simple(t.user_attrs.get("b_simple")) is not None
    ]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked: list[FrozenTrial] = sorted(complete, key=lambda t: t.value, reverse=maximize)
    values = sorted(float(t.user_attrs["b_simple"]) for t in ranked[:top_k])
    by_batch_size = _by_batch_size(study, batch_size_of or _stored_batch_size)
    if not values:
        return MeasuredNoiseScale(None, None, None, 0, by_batch_size=by_batch_size)
    if len(values) < 2:
        median, low, high = values[0], values[0], values[0]
    else:
        quartiles = statistics.quantiles(values, n=4, method="inclusive")
        median, low, high = statistics.median(values), quartiles[0], quartiles[2]
    stored = [s for t in ranked[:top_k] if isinstance(s := t.user_attrs.get("b_simple_sums"), dict)]
    sums = pool_sums(stored)
    pooled, interval_low, interval_high = fieller_interval(sums) if stored else (None, None, None)
    return MeasuredNoiseScale(
        median, low, high, len(values), pooled, interval_low, interval_high,
        int(sums["n"]) if stored else 0, by_batch_size,
    )  # fmt: skip


def _by_batch_size(
    study: optuna.Study, batch_size_of: Callable[[FrozenTrial], int | None]
) -> tuple[BatchSizeNoiseScale, ...]:
    """Per batch size, its complete trials' stored sums pooled (those that stored any)."""
    grouped: dict[int, list[dict[str, float]]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        sums, batch_size = trial.user_attrs.get("b_simple_sums"), batch_size_of(trial)
        if isinstance(sums, dict) and batch_size is not None:
            grouped.setdefault(batch_size, []).append(sums)
    rows = []
    for batch_size in sorted(grouped):
        pooled = pool_sums(grouped[batch_size])
        value, low, high = fieller_interval(pooled)
        rows.append(
            BatchSizeNoiseScale(
                batch_size, value, low, high, len(grouped[batch_size]), int(pooled["n"])
            )
        )
    return tuple(rows)


@dataclass(frozen=True)
class NoiseScaleCurve:
    """One trial's B_simple at each report (epoch) it had one: (report, value) pairs."""

    number: int
    batch_size: int
    lr: float | None
    values: tuple[tuple[int, float], ...]


def b_simple_curves(top_trials: dict[int, list[FrozenTrial]]) -> list[NoiseScaleCurve]:
    """B_simple over training (user attr ``b_simple_per_epoch``) of the given trials: the
    best complete trials of each batch size, ranked (``scaling.top_trials_by_batch_size``,
    the same trials the α fit and the ridge use). Ordered by batch size, then rank.

    Only positive finite values are kept (they are drawn on a log axis): an epoch before
    the first measurement, or while the |G|² average is not positive, stores ``null``,
    and such epochs are gaps. A trial with none left is not a curve.
    """
    curves = []
    for batch_size in sorted(top_trials):
        for trial in top_trials[batch_size]:
            series = trial.user_attrs.get("b_simple_per_epoch")
            if not isinstance(series, list):
                continue
            values = tuple(
                (report, positive)
                for report, value in enumerate(series, start=1)
                if (positive := positive_b_simple(value)) is not None
            )
            if values:
                lr = trial.params.get("lr")
                curves.append(NoiseScaleCurve(trial.number, batch_size, lr, values))
    return curves


def examples(value: float) -> str:
    """A noise scale or batch size in examples: whole numbers from 10 up, two significant
    digits below (a ridge flat over the studied batches puts B_noise below 1)."""
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2g}"


def describe_ridge(ridge: RidgeFit, b_noise: float) -> str:
    """The sentence on the fitted ridge: its B_noise (``b_noise``, with its interval) and
    ε_max, or, at an edge of the studied batch sizes, which bound B_noise is."""
    interval = (
        f" (interval {examples(ridge.b_noise_low)} to {examples(ridge.b_noise_high)})"
        if ridge.b_noise_low is not None and ridge.b_noise_high is not None
        else ""
    )
    fitted = f"fits B_noise ≈ {examples(b_noise)}{interval}"
    if ridge.edge == "low":
        fitted = (
            f"is flat over the studied batch sizes: its B_noise ≈ {examples(b_noise)}"
            f"{interval} is below a quarter of the smallest, so only an upper bound"
        )
    elif ridge.edge == "high":
        fitted = (
            "still rises about linearly at the largest batch size: its B_noise ≈ "
            f"{examples(b_noise)}{interval} is over 4× the largest, so only a "
            "lower bound"
        )
    return (
        f"The LR ridge ε_opt(B) = ε_max / (1 + B_noise / B) {fitted}, ε_max = {ridge.eps_max:.3g}."
    )
