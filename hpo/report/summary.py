"""The study in a table: counts of trials by state, the best trial, and the best complete
trial of each batch size (``summarize`` → ``StudySummary``: what ``hpo status``, ``hpo export``
and the report's table show). Also the readers of a trial every analysis shares: its batch
size, whether it is complete, its generalization gap.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.replicates import is_replicate
from hpo.report.cost import finite_number, recorded_budget_unit
from hpo.report.device_hours import DeviceHours, device_hours
from hpo.report.noise_scale import positive_b_simple
from hpo.spec import describe_metric
from hpo.study import stored_class_counts


def trial_batch_size(trial: FrozenTrial) -> int | None:
    """The batch size a trial trained with: the stored user attr (the batch size actually
    used, after any cap), else 2 ** the sampled ``log2_batch_size``; None if it has neither
    or if what is stored is not a batch size (a study written by another tool): such a
    trial is left out of every table and figure, with a warning."""
    if "batch_size" in trial.user_attrs:
        value = trial.user_attrs["batch_size"]
    elif "log2_batch_size" in trial.params:
        exponent = trial.params["log2_batch_size"]
        value = 2 ** int(exponent) if _is_whole(exponent) and 0 <= exponent <= 30 else exponent
    else:
        return None
    if _is_whole(value) and 1 <= value <= 2**30:
        return int(value)
    warnings.warn(
        f"trial {trial.number}: batch size {str(value)[:40]!r} is not a positive integer; "
        "left out of the report",
        stacklevel=2,
    )
    return None


def _is_whole(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value).is_integer()
    )


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
    # The best trial's gradient noise scale over its training (user attr ``b_simple``): the
    # same trial as the other best_* fields, so a row reads as one trial.
    best_b_simple: float | None = None
    # Without a value, the lower end of its interval when it has one (``b_simple_interval``
    # [low, null]: the mean |G|² estimate was not positive, B_simple is at least that).
    best_b_simple_at_least: float | None = None
    # The training resource the batch size's COMPLETE and PRUNED trials spent together, in
    # the study's budget unit (``StudySummary.budget_unit``): where the budget went.
    spent: float | None = None


@dataclass(frozen=True)
class StudySummary:
    """What ``hpo status`` and the report's summary table show: counts of trials by state
    name, the best complete trial, and one row per batch size that any trial used."""

    study_name: str
    direction: str
    metric: str
    state_counts: dict[str, int]
    best: FrozenTrial | None
    by_batch_size: list[BatchSizeRow]
    # Patches per class of each split, as the workers stored them ({} when unknown).
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # What "the same amount of training" meant: epochs, steps or seconds (the trials'
    # ``budget_unit``); None for a study whose trials do not record it.
    budget_unit: str | None = None
    # How much of the budget (in ``budget_unit``) lies between two reports (the trials'
    # ``budget_per_report``); None for a study whose trials do not record it.
    budget_per_report: float | None = None
    # The device-hours the trials recorded: in all, per device kind, per batch size.
    device: DeviceHours = field(default_factory=DeviceHours)

    @property
    def n_classes(self) -> int:
        """The dataset's classes (0 while no worker has stored the counts)."""
        return len(self.class_counts.get("train", {}))

    @property
    def metric_description(self) -> str:
        """``val_auc``, or past two classes ``val_auc: macro one-vs-rest AUC over 3
        classes`` (``hpo.spec.describe_metric``)."""
        return describe_metric(self.metric, self.n_classes)


def is_maximize(study: optuna.Study) -> bool:
    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def complete_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]


def summarize(study: optuna.Study, metric: str) -> StudySummary:
    """Counts by state (every trial), the best trial and the best complete trial per batch
    size (of the search: replicate trials left out, ``hpo.replicates``)."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(trial.state.name for trial in trials)
    maximize = is_maximize(study)
    # A replicate (hpo.replicates) counts for the noise floor only, not as the search's best.
    complete = [t for t in complete_trials(trials) if not is_replicate(t)]
    best = (max if maximize else min)(complete, key=lambda t: t.value) if complete else None

    rows = []
    unit = recorded_budget_unit(trials)
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
                generalization_gap=trial_gap(top) if top else None,
                best_b_simple=_b_simple(top) if top else None,
                best_b_simple_at_least=_b_simple_at_least(top) if top else None,
                spent=_spent(mine, unit),
            )
        )
    return StudySummary(
        study_name=study.study_name,
        direction="maximize" if maximize else "minimize",
        metric=metric,
        state_counts=dict(counts),
        best=best,
        by_batch_size=rows,
        class_counts=stored_class_counts(study),
        budget_unit=unit,
        budget_per_report=_recorded_per_report(trials),
        device=device_hours(trials, trial_batch_size),
    )


def _recorded_per_report(trials: list[FrozenTrial]) -> float | None:
    """The budget between two reports the trials recorded (the most common positive value;
    a study's trials share one budget)."""
    recorded = Counter(
        float(value)
        for t in trials
        if (value := finite_number(t.user_attrs, "budget_per_report")) is not None and value > 0
    )
    return recorded.most_common(1)[0][0] if recorded else None


def _b_simple(trial: FrozenTrial) -> float | None:
    """The trial's last measured B_simple; None when it recorded none (too few updates, or
    a study from before hpo measured it) or stored something that is not a positive number (a
    negative ratio of two noisy averages, stored before ``b_simple()`` refused those)."""
    return positive_b_simple(trial.user_attrs.get("b_simple"))


def _b_simple_at_least(trial: FrozenTrial) -> float | None:
    """The lower end of the trial's B_simple interval when it has no value and no upper end."""
    if _b_simple(trial) is not None:
        return None
    interval = trial.user_attrs.get("b_simple_interval")
    if not isinstance(interval, list) or len(interval) != 2 or interval[1] is not None:
        return None
    return positive_b_simple(interval[0])


# The user attr that holds a trial's resource in each budget unit (hpo.objective.record_tally).
SPENT_ATTRS = {"epochs": "train_epochs", "steps": "n_updates", "seconds": "train_seconds"}


def _spent(trials: list[FrozenTrial], unit: str | None) -> float | None:
    """The resource the COMPLETE and PRUNED ``trials`` spent together in ``unit``; None
    without a unit or when none of them records it."""
    if unit not in SPENT_ATTRS:
        return None
    spent = [
        finite_number(t.user_attrs, SPENT_ATTRS[unit])
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    values = [value for value in spent if value is not None]
    return sum(values) if values else None


def trial_gap(trial: FrozenTrial) -> float | None:
    """Train − val accuracy at the last epoch (user attr, else computed from the two)."""
    attrs = trial.user_attrs
    if "generalization_gap" in attrs:
        return float(attrs["generalization_gap"])
    if "train_acc" in attrs and "val_acc" in attrs:
        return float(attrs["train_acc"]) - float(attrs["val_acc"])
    return None
