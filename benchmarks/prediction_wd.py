"""The weight-decay half of ``prediction_quality.py``: hpo's predicted weight decay λ per
batch size and its timescale τ_epoch = B/(η·λ·N) judged against a grid with a weight-decay
axis (``grid_truth.pair_truth``, ``grid_truth.tau_trend``).

- ``wd_factor``: the predicted λ against the grid's best λ, max/min; within tolerance when at
  most ``decay_tolerance`` (half the grid's weight-decay step on a log scale: the grid's
  λ values tell nothing finer than the step, and its quadratic places the best λ between
  them; a decade apart gives √10 ≈ 3.2);
- ``wd_covered``: whether hpo's 80% λ interval holds the grid's best λ;
- the value at the predicted (LR, λ) read off the grid (``mean_at_decay``: the grid's LR
  rows interpolated in log λ at the predicted λ, then in log LR as for one weight decay).

The searches' timescale (``hpo.report.weight_decay``: τ per batch size from the best
trial's (η, λ), the slope of log τ on log B and whether its interval contains 0) is set
beside the grid's. Sibling of ``prediction_quality.py`` (not a package).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from typing import TYPE_CHECKING

from hpo.report.weight_decay import WeightDecayRow, WeightDecayView

if TYPE_CHECKING:
    from grid_truth import PairTruth, TauTrend


def decay_tolerance(decays: list[float]) -> float:
    """Half the grid's widest weight-decay step, as a factor: √(λ_{i+1}/λ_i)."""
    ordered = sorted(decays)
    steps = [high / low for low, high in zip(ordered, ordered[1:], strict=False)]
    return math.sqrt(max(steps)) if steps else math.inf


def mean_at_decay(
    mean: dict[tuple[int, float, float], float], batch_size: int, decay: float
) -> dict[tuple[int, float], float]:
    """The batch size's grid means at ``decay``, keyed (batch size, lr): each LR's values
    interpolated linearly in log λ between the neighbouring grid weight decays (the end
    value beyond them)."""
    decays = sorted({wd for b, _, wd in mean if b == batch_size})
    lrs = sorted({lr for b, lr, _ in mean if b == batch_size})
    low = max([d for d in decays if d <= decay], default=decays[0])
    high = min([d for d in decays if d >= decay], default=decays[-1])
    share = 0.0 if high == low else math.log(decay / low) / math.log(high / low)
    return {
        (batch_size, lr): (1 - share) * mean[(batch_size, lr, low)]
        + share * mean[(batch_size, lr, high)]
        for lr in lrs
    }


def judge_decay(case: dict, truth: PairTruth, tolerance: float) -> dict:
    """The case's λ against the grid's best λ (None fields where hpo gave no λ)."""
    decay = case.get("weight_decay")
    low, high = truth.weight_decay_interval
    if not decay:
        return {"grid_best_weight_decay": truth.weight_decay, "wd_factor": None}
    nearest = min(max(decay, low), high)
    interval = case.get("weight_decay_interval")
    return {
        "grid_best_weight_decay": truth.weight_decay,
        "grid_best_weight_decay_interval": [low, high],
        "wd_factor": max(decay, truth.weight_decay) / min(decay, truth.weight_decay),
        "wd_factor_to_interval": max(decay, nearest) / min(decay, nearest),
        "wd_within_tolerance": max(decay, truth.weight_decay) / min(decay, truth.weight_decay)
        <= tolerance,
        "wd_covered": None if not interval else interval[0] <= truth.weight_decay <= interval[1],
    }


def decay_goals(judged: list[dict], tolerance: float) -> dict:
    """Counts over the cases: λ within the tolerance of the grid's best (and of its
    interval), the 80% interval's coverage, the models chosen."""
    with_decay = [c for c in judged if c.get("wd_factor") is not None]
    covered = [c["wd_covered"] for c in with_decay if c.get("wd_covered") is not None]
    return {
        "tolerance": tolerance,
        "cases": len(with_decay),
        "within_tolerance": sum(c["wd_within_tolerance"] for c in with_decay),
        "within_tolerance_of_truth_interval": sum(
            c["wd_factor_to_interval"] <= tolerance for c in with_decay
        ),
        "max_factor": max((c["wd_factor"] for c in with_decay), default=None),
        "median_factor": statistics.median([c["wd_factor"] for c in with_decay] or [math.nan]),
        "with_interval": len(covered),
        "noted_barely_acted": sum(
            "barely acted" in (c.get("weight_decay_note") or "") for c in judged
        ),
        "coverage_80": sum(covered) / len(covered) if covered else None,
        "interval_width_median": statistics.median(
            [
                c["weight_decay_interval"][1] / c["weight_decay_interval"][0]
                for c in with_decay
                if c.get("weight_decay_interval")
            ]
            or [math.nan]
        ),
        "models": dict(Counter(c.get("model_of_weight_decay") or "none" for c in with_decay)),
        "by_kind": {
            kind: {
                "cases": sum(c["kind"] == kind for c in with_decay),
                "within_tolerance": sum(
                    c["wd_within_tolerance"] for c in with_decay if c["kind"] == kind
                ),
                "covered": sum(bool(c.get("wd_covered")) for c in with_decay if c["kind"] == kind),
            }
            for kind in ("left out", "extrapolated")
        },
    }


def model_counts(judged: list[dict]) -> dict[str, int]:
    return dict(Counter(c.get("model_of_scaling") or "none" for c in judged))


def stored_view(view: WeightDecayView) -> dict:
    """The view as JSON: what a later ``--cases-from`` predicts the weight decay from."""
    return {
        "rows": [dataclasses.asdict(row) for row in view.rows],
        "train_size": view.train_size,
        "slope": view.slope,
        "slope_low": view.slope_low,
        "slope_high": view.slope_high,
        "constant": view.constant,
        "epochs_trained": view.epochs_trained,
    }


def view_from(stored: dict | None) -> WeightDecayView | None:
    if not stored:
        return None
    rows = tuple(WeightDecayRow(**row) for row in stored["rows"])
    slope = (stored["slope"], stored["slope_low"], stored["slope_high"])
    epochs = stored.get("epochs_trained")
    return WeightDecayView(rows, stored["train_size"], *slope, epochs_trained=epochs)


def without(view: WeightDecayView | None, batch_size: int) -> WeightDecayView | None:
    """The view without one batch size's row: a left-out batch size's λ is predicted from
    the other batch sizes' timescale, as its LR is from their best LRs."""
    if view is None:
        return None
    return dataclasses.replace(view, rows=tuple(r for r in view.rows if r.batch_size != batch_size))


def tau_table(trend: TauTrend, views: list[tuple[int, dict]]) -> dict:
    """The grid's τ per batch size and trend beside each search's (``stored_view``)."""
    grid = {
        "tau_epoch": trend.tau,
        "tau_interval": {b: list(i) for b, i in trend.tau_interval.items()},
        "slope": trend.slope,
        "slope_interval": list(trend.slope_interval),
        "constant": trend.constant,
    }
    searches = [
        {
            "seed": seed,
            "tau_epoch": {r["batch_size"]: r["tau_epoch"] for r in view["rows"]},
            "n_weight_decays": {r["batch_size"]: r["n_weight_decays"] for r in view["rows"]},
            "slope": view["slope"],
            "slope_interval": [view["slope_low"], view["slope_high"]],
            "constant": view["constant"],
        }
        for seed, view in views
    ]
    return {"grid": grid, "searches": searches}
