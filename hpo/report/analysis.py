"""Pure analysis of a study's finished trials: counts, the best trial per batch size, the fit
of lr* ∝ B^α, the trials as points, and parameter importances. Draws nothing.

Everything the figures and the summary show is computed here, once, into ``ReportData``;
``hpo.report.figures`` turns that into figure models, and the renderers only draw those.
Only COMPLETE and PRUNED trials enter; RUNNING, WAITING and FAIL trials are ignored, so a
report of a running study is a snapshot.

The per-batch-size table is ``hpo.report.summary`` and the α fit ``hpo.report.scaling``;
their public names are re-exported here. This module holds the trials as points, the
importances, and ``collect``, which computes everything into ``ReportData``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.replicates import why_no_replicates, without_replicates
from hpo.report.cost import DEFAULT_COST_TOLERANCE, CostView, cost_view
from hpo.report.noise_floor import NoiseFloor, noise_floor
from hpo.report.noise_scale import (
    MeasuredNoiseScale,
    NoiseScaleCurve,
    RidgeFit,
    b_simple_curves,
    fit_lr_ridge,
    measured_b_simple,
)
from hpo.report.prediction import stored_optimizer
from hpo.report.scaling import (
    DEFAULT_CONFIDENCE,
    DEFAULT_NEAR_BEST,
    DEFAULT_TOP_K,
    ScalingFit,
    fit_lr_scaling,
    near_best_trials,
    top_trials_by_batch_size,
)
from hpo.report.steps_to_target import StepsToTarget, measure_steps_to_target
from hpo.report.summary import (
    SPENT_ATTRS,
    BatchSizeRow,
    StudySummary,
    complete_trials,
    is_maximize,
    summarize,
    trial_batch_size,
    trial_gap,
)
from hpo.report.weight_decay import WeightDecayView, weight_decay_view

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_NEAR_BEST",
    "DEFAULT_TOP_K",
    "SPENT_ATTRS",
    "BatchSizeRow",
    "ReportData",
    "ScalingFit",
    "StudySummary",
    "TrialPoint",
    "collect",
    "fit_lr_scaling",
    "importances",
    "near_best_trials",
    "summarize",
    "top_trials_by_batch_size",
    "trial_batch_size",
    "trial_points",
]


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
                gap=trial_gap(trial),
                curve=curve,
            )
        )
    return points


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Optuna's own importance evaluator (PED-ANOVA by default) and, if it cannot run, why.

    A parameter whose distribution is single-valued in every trial was never drawn (hpo's
    ``batch_size``, the display copy of ``log2_batch_size``, ``hpo.space``): it is left
    out, where PED-ANOVA would list it at 0 and warn about each of its one-trial regimes.
    So is a searchable parameter that every complete trial ran at one value (``variation``:
    not varied, so nothing can be said of its importance)."""
    complete = complete_trials(study.get_trials(deepcopy=False))
    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s); importances need at least 2"
    params = sorted(name for name, moved in variation(complete).items() if moved)
    if not params:
        return {}, "no parameter varies across the complete trials"
    try:
        values = optuna.importance.get_param_importances(study, evaluator=None, params=params)
    except (ValueError, RuntimeError) as error:
        return {}, f"Optuna could not evaluate importances: {error}"
    if not values:
        return {}, "no parameter varies across the complete trials"
    return {name: float(v) for name, v in values.items()}, None


def variation(complete: list[FrozenTrial]) -> dict[str, int]:
    """For each parameter with a range (a distribution that is not single-valued) among
    ``complete``, how many of those trials ran it at another value than its most common
    one: 0 means it was not varied at all."""
    values: dict[str, list[object]] = {}
    for trial in complete:
        for name, distribution in trial.distributions.items():
            if not distribution.single() and name in trial.params:
                values.setdefault(name, []).append(trial.params[name])
    return {name: len(vs) - Counter(vs).most_common(1)[0][1] for name, vs in values.items()}


def describe_variation(importances: dict[str, float], moved: dict[str, int], n: int) -> str:
    """The importances' caveats: parameters left out for not being varied, and those varied
    in only a minority of the ``n`` complete trials (their importance rests on few trials)."""
    fixed = sorted(name for name, count in moved.items() if count == 0)
    few = [f"{name} in {moved[name]} of {n}" for name in importances if 0 < 2 * moved[name] < n]
    text = ""
    if fixed:
        text += f"Not varied (one value in every complete trial), so left out: {', '.join(fixed)}."
    if few:
        text += (
            " Varied in only a minority of the complete trials (the rest at one value): "
            + "; ".join(few)
            + ": their importance rests on those few trials."
        )
    return text.strip()


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
    # The critical batch size two ways (hpo.report.noise_scale); None when not computed.
    ridge: RidgeFit | None = None
    noise_scale: MeasuredNoiseScale | None = None
    # B_simple per epoch of the fit's trials (the top_k of each batch size), for the figure.
    noise_curves: list[NoiseScaleCurve] = field(default_factory=list)
    # Value against time to train (hpo.report.cost); None when not computed.
    cost: CostView | None = None
    # The best weight decay per batch size and its timescale τ (hpo.report.weight_decay).
    weight_decay: WeightDecayView | None = None
    # The study file's optimizer (the surge model is a candidate for Adam-style ones).
    optimizer: str | None = None
    # Seed-to-seed spread and the winner's margin (hpo.report.noise_floor).
    noise_floor: NoiseFloor | None = None
    # Per searchable parameter, the complete search trials off its most common value
    # (``variation``), and how many complete search trials there are.
    variation: dict[str, int] = field(default_factory=dict)
    n_complete: int = 0
    # The critical batch size from steps to a target (hpo.report.steps_to_target).
    steps_to_target: StepsToTarget | None = None

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes of the drawn (COMPLETE or PRUNED) trials: the ticks of every B axis."""
        return sorted({p.batch_size for p in self.points})


def collect(
    study: optuna.Study,
    metric: str = "objective",
    *,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
    cost_tolerance: float = DEFAULT_COST_TOLERANCE,
) -> ReportData:
    """Read the study once and compute all the analysis the report needs. ``metric`` only
    names the objective in labels; the values are the study's own. ``cost_tolerance`` is
    how close to the best (relative) a faster trial must be for the cost sentence.

    Replicate trials (``hpo.replicates``) enter the trial counts and the noise floor only:
    everything else is the search's, read from the study without them."""
    everything, study = study, without_replicates(study)
    values, reason = importances(study)
    fit = fit_lr_scaling(study, top_k=top_k, confidence=confidence)
    summary = summarize(everything, metric)
    trials = study.get_trials(deepcopy=False)
    floor = noise_floor(
        everything.get_trials(deepcopy=False),
        summary.by_batch_size,
        is_maximize(study),
        confidence=confidence,
        why_none=why_no_replicates(everything),
    )
    return ReportData(
        study_name=study.study_name,
        metric=metric,
        maximize=is_maximize(study),
        summary=summary,
        fit=fit,
        points=trial_points(study),
        importances=values,
        importances_reason=reason,
        ridge=fit_lr_ridge(list(fit.points), confidence=confidence),
        noise_scale=measured_b_simple(study, top_k=top_k, batch_size_of=trial_batch_size),
        noise_curves=b_simple_curves(top_trials_by_batch_size(study, top_k)),
        cost=_cost_view_quietly(study, metric, cost_tolerance),
        weight_decay=weight_decay_view(
            trials, is_maximize(study), summary.class_counts, confidence=confidence
        ),
        optimizer=stored_optimizer(study.user_attrs),
        noise_floor=floor,
        variation=variation(complete_trials(trials)),
        n_complete=len(complete_trials(trials)),
        steps_to_target=measure_steps_to_target(trials, is_maximize(study), trial_batch_size),
    )


def _cost_view_quietly(study: optuna.Study, metric: str, tolerance: float) -> CostView:
    """The cost view, without warning a second time about a trial whose batch size is not
    one (``summarize`` has already named it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cost_view(study, metric, batch_size_of=trial_batch_size, tolerance=tolerance)
