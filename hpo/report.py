"""Tables and figures from a finished or running study. Trains nothing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState


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


def summarize(study: optuna.Study, metric: str) -> StudySummary:
    """Counts by state, the best trial and the best complete trial per batch size."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(trial.state.name for trial in trials)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
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
                generalization_gap=top.user_attrs.get("generalization_gap") if top else None,
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
