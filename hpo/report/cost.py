"""The cost view: what each batch size's best result cost to train, and the trade-off.

A user choosing a batch size weighs the objective against what training costs: a large
batch often gets close to the best value at a multiple of the throughput. This module
reads that from the trials' own records (``hpo.objective.record_tally``: ``train_seconds``,
``samples_per_s``, ``n_updates``, ``train_epochs``, ``budget_unit``), finds the Pareto
front of value against time to train over the complete trials, and names the fastest
trial on the front within a tolerance of the best, in one sentence. Seconds on different
device kinds are not comparable as they stand, so the view compares the trials of one
device kind (user attr ``device``): the kind with the most complete trials, the reference.
A kind ``hpo probe`` measured as well as the reference (``hpo.report.device_rates``) joins
with its seconds normalised to the reference's by the probe's samples/s; the others are
counted and left out. The sentence says which. Pure: draws nothing.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.report.device_rates import SpeedFactor, describe_factors, probe_rates, speed_factors

# How close to the best value ("within 1% of the best") a faster trial must come to be
# named in the summary's sentence: relative to the best value, so the same for AUC and loss.
DEFAULT_COST_TOLERANCE = 0.01
# The values ``budget.unit`` can take (hpo.spec.BudgetSpec).
BUDGET_UNITS = ("epochs", "steps", "seconds")


@dataclass(frozen=True)
class CostPoint:
    """One COMPLETE trial with its recorded cost. ``train_seconds`` is training time only
    (evaluation not counted); ``samples_per_s`` is training samples over that time."""

    number: int
    batch_size: int
    value: float
    train_seconds: float
    samples_per_s: float | None
    n_updates: int | None
    train_epochs: float | None
    on_front: bool = False


@dataclass(frozen=True)
class BatchSizeCost:
    """The best complete trial of one batch size and what it cost. ``samples_per_s`` is
    the median throughput of every COMPLETE or PRUNED trial of that batch size (throughput
    belongs to the batch size and the machine, and pruned trials measure it too)."""

    batch_size: int
    best_value: float
    best_trial: int
    train_seconds: float
    samples_per_s: float | None
    n_updates: int | None
    train_epochs: float | None
    on_front: bool
    # The best value's shortfall from the study's best, relative to it (0 at the best).
    shortfall: float


@dataclass(frozen=True)
class CostView:
    """Complete trials as (time to train, value), the Pareto front and the chosen trade."""

    metric: str
    maximize: bool
    tolerance: float
    budget_unit: str | None
    points: tuple[CostPoint, ...]
    by_batch_size: tuple[BatchSizeCost, ...]
    # The device kind the points ran on (None: the trials record none), and how many
    # complete trials of other kinds were left out of the comparison.
    device: str | None = None
    other_devices: int = 0
    # The other device kinds whose trials joined, their seconds normalised to ``device``'s
    # by the probe's speed factor (seconds × factor, samples/s ÷ factor).
    normalised: dict[str, SpeedFactor] = dataclasses.field(default_factory=dict)

    @property
    def front(self) -> tuple[CostPoint, ...]:
        """The trials no other complete trial beats in both time and value, fastest
        first (so the last is the best trial)."""
        return tuple(sorted((p for p in self.points if p.on_front), key=lambda p: p.train_seconds))

    @property
    def best(self) -> CostPoint | None:
        return self.front[-1] if self.points else None

    def shortfall(self, point: CostPoint) -> float:
        """How far ``point`` falls short of the best value, relative to the best."""
        best = self.best
        assert best is not None
        return relative_shortfall(point.value, best.value, maximize=self.maximize)

    @property
    def fastest_within(self) -> CostPoint | None:
        """The fastest trial on the front whose value is within ``tolerance`` of the best
        (the best itself when no faster trial comes that close)."""
        within = [p for p in self.front if self.shortfall(p) <= self.tolerance]
        return within[0] if within else None

    def describe(self) -> str:
        """The trade-off in one or two sentences, computed from the trials."""
        if not self.points:
            return (
                "No cost view: no complete trial records its training time (train_seconds, "
                "written by hpo's workers)."
            )
        best, chosen = self.best, self.fastest_within
        assert best is not None and chosen is not None
        tolerance = percent(self.tolerance)
        text = describe_factors(self.device, self.normalised) if self.device else ""
        if self.other_devices:
            text += (
                f"Compared on {self.device}{' and the kinds above' if self.normalised else ''}"
                f" only: {self.other_devices} complete trials on other device kinds are left "
                "out (their seconds are not comparable; `hpo probe` on each kind would "
                "normalise them). "
            )
        if self.budget_unit == "seconds":
            text += (
                "Every trial trained for the same time (budget.unit = seconds), so time to "
                "train hardly separates them; throughput does. "
            )
        if chosen.number == best.number:
            return text + (
                f"The best trial ({best.number}, B = {best.batch_size}, {self.metric} "
                f"{best.value:.4f}, {_seconds(best.train_seconds)} of training) is also the "
                f"fastest within {tolerance} of the best: no faster complete trial comes "
                "that close."
            )
        speed = best.train_seconds / chosen.train_seconds
        text += (
            f"B = {chosen.batch_size} gets within {self.shortfall(chosen):.2%} of the best "
            f"{self.metric} ({chosen.value:.4f} vs {best.value:.4f} at B = {best.batch_size}) "
        )
        if chosen.samples_per_s and best.samples_per_s:
            ratio = chosen.samples_per_s / best.samples_per_s
            text += (
                f"at {ratio:.1f}× the throughput ({chosen.samples_per_s:,.0f} vs "
                f"{best.samples_per_s:,.0f} samples/s) and "
            )
        text += (
            f"{speed:.1f}× faster ({_seconds(chosen.train_seconds)} vs "
            f"{_seconds(best.train_seconds)} of training per trial; trials {chosen.number} "
            f"and {best.number}): the fastest trial on the front within "
            f"{tolerance} of the best."
        )
        return text


def relative_shortfall(value: float, best: float, *, maximize: bool) -> float:
    """How far ``value`` falls short of ``best``, as a share of ``best`` (absolute when
    the best is 0); 0 at the best, positive below it."""
    gap = (best - value) if maximize else (value - best)
    return gap / abs(best) if best else gap


def percent(share: float) -> str:
    """A share as a short percentage: 0.01 → "1%", 0.003 → "0.3%"."""
    return f"{share * 100:.3g}%"


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 100 else f"{value:,.0f} s"


def device_kind(trial: FrozenTrial) -> str | None:
    """The device kind a trial ran on (user attr ``device``: ``cpu`` or the GPU's name,
    shared by all GPUs of one kind); None when it records none (another tool's trial)."""
    kind = trial.user_attrs.get("device")
    return kind if isinstance(kind, str) and kind else None


def finite_number(attrs: dict, key: str) -> float | None:
    """``attrs[key]`` as a float when it is a finite number (not a bool); else None: user
    attrs may have been written by another tool."""
    value = attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def pareto_front(points: list[CostPoint], *, maximize: bool) -> set[int]:
    """Trial numbers of the points that no other point beats in both time (lower) and
    value (higher when maximizing): sweep in order of time, keep each point better than
    every faster one. Of points with equal time only the best can be on the front."""
    sign = 1.0 if maximize else -1.0
    ordered = sorted(points, key=lambda p: (p.train_seconds, -sign * p.value, p.number))
    front, best_so_far = set(), -math.inf
    for point in ordered:
        if sign * point.value > best_so_far:
            front.add(point.number)
            best_so_far = sign * point.value
    return front


def cost_view(
    study: optuna.Study,
    metric: str = "objective",
    *,
    batch_size_of: Callable[[FrozenTrial], int | None],
    tolerance: float = DEFAULT_COST_TOLERANCE,
) -> CostView:
    """Read the cost of every complete trial and the throughput of every finished one.

    ``batch_size_of`` is the report's own reading of a trial's batch size
    (``hpo.report.summary.trial_batch_size``). Trials without a finite value or without
    a positive ``train_seconds`` (a study written by another tool) are left out.
    Raises ValueError for a negative ``tolerance``.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance = {tolerance} must be 0 or more")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    kinds = _complete_kinds(trials, batch_size_of)
    kind = min(kinds, key=lambda k: (-kinds[k], k or "")) if kinds else None
    factors = {}
    if kind is not None:
        rates = probe_rates(study.user_attrs)
        factors = speed_factors(rates, kind, {k for k in kinds if k is not None})
    scale = {k: f.factor for k, f in factors.items()} | {kind: 1.0}
    other_devices = sum(n for k, n in kinds.items() if k not in scale)
    throughput: dict[int, list[float]] = {}
    raw: list[CostPoint] = []
    for trial in trials:
        batch_size = batch_size_of(trial)
        factor = scale.get(device_kind(trial))
        if batch_size is None or factor is None:
            continue
        samples_per_s = finite_number(trial.user_attrs, "samples_per_s")
        if samples_per_s:
            samples_per_s /= factor
            throughput.setdefault(batch_size, []).append(samples_per_s)
        point = _point(trial, batch_size, samples_per_s)
        if point is not None:
            raw.append(dataclasses.replace(point, train_seconds=point.train_seconds * factor))
    on_front = pareto_front(raw, maximize=maximize)
    points = tuple(
        dataclasses.replace(p, on_front=p.number in on_front)
        for p in sorted(raw, key=lambda p: p.number)
    )
    rows = _by_batch_size(points, throughput, maximize=maximize)
    unit = recorded_budget_unit(trials)
    normalised = {k: f for k, f in factors.items() if k != kind}
    return CostView(
        metric, maximize, tolerance, unit, points, rows, kind, other_devices, normalised
    )


def _complete_kinds(
    trials: list[FrozenTrial], batch_size_of: Callable[[FrozenTrial], int | None]
) -> Counter[str | None]:
    """Complete trials with a recorded cost per device kind (None: no kind recorded). The
    kind with the most (of equal counts, the first by name) is the view's reference."""
    return Counter(
        device_kind(t)
        for t in trials
        if batch_size_of(t) is not None and _point(t, 1, None) is not None
    )


def _point(trial: FrozenTrial, batch_size: int, samples_per_s: float | None) -> CostPoint | None:
    seconds = finite_number(trial.user_attrs, "train_seconds")
    value = trial.value
    if trial.state != TrialState.COMPLETE or value is None or not math.isfinite(value):
        return None
    if not seconds or seconds <= 0:
        return None
    updates = finite_number(trial.user_attrs, "n_updates")
    return CostPoint(
        number=trial.number,
        batch_size=batch_size,
        value=float(value),
        train_seconds=seconds,
        samples_per_s=samples_per_s,
        n_updates=None if updates is None else int(updates),
        train_epochs=finite_number(trial.user_attrs, "train_epochs"),
    )


def recorded_budget_unit(trials: list[FrozenTrial]) -> str | None:
    """The budget unit the trials were trained in (user attr ``budget_unit``; the most
    common, for a study whose trials disagree, which hpo never writes); None when none
    records one (a study from before budget units, or from another tool; a value that is
    not a unit is ignored)."""
    units = Counter(
        unit for t in trials if (unit := t.user_attrs.get("budget_unit")) in BUDGET_UNITS
    )
    return units.most_common(1)[0][0] if units else None


def _by_batch_size(
    points: tuple[CostPoint, ...], throughput: dict[int, list[float]], *, maximize: bool
) -> tuple[BatchSizeCost, ...]:
    """The best trial of each batch size (of equal values, the faster) and its cost."""
    if not points:
        return ()
    best = (max if maximize else min)(p.value for p in points)
    sign = 1.0 if maximize else -1.0
    rows = []
    for batch_size in sorted({p.batch_size for p in points}):
        mine = [p for p in points if p.batch_size == batch_size]
        top = max(mine, key=lambda p: (sign * p.value, -p.train_seconds))
        rates = throughput.get(batch_size)
        rows.append(
            BatchSizeCost(
                batch_size=batch_size,
                best_value=top.value,
                best_trial=top.number,
                train_seconds=top.train_seconds,
                samples_per_s=statistics.median(rates) if rates else None,
                n_updates=top.n_updates,
                train_epochs=top.train_epochs,
                on_front=top.on_front,
                shortfall=relative_shortfall(top.value, best, maximize=maximize),
            )
        )
    return tuple(rows)
