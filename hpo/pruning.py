"""Pruning that cannot condemn a batch size wholesale.

Optuna's Median/Percentile pruner compares a trial's intermediate value with the other
trials' values at the same step. Across batch sizes that comparison is unfair: at equal
epochs B = 512 has taken 32x fewer optimizer updates than B = 16 and looks worse early, so
every large-batch trial can be pruned before one has finished (measured: the demo pruned
every B = 256 and B = 512 trial at epoch 2). Two wrappers, both around Optuna's own
pruners and both keyed on the trial's ``log2_batch_size`` parameter:

- ``SameBatchSizePruner``: the inner pruner sees only the trials of the trial's own batch
  size, so a large-batch trial is compared with large-batch trials only. Its
  ``n_startup_trials`` then counts complete trials *of that batch size*.
- ``BatchSizeFloorPruner``: a trial is never pruned while its batch size has fewer than
  ``min_complete`` complete trials, so every batch size gets that many full-budget answers
  before any of its trials can be stopped early.

``SameBatchSizePruner(..., include_pruned=True)`` also hands the inner pruner the PRUNED
trials. Optuna's Percentile/Median pruner compares with COMPLETE trials only; with two or
three complete trials per batch size those are survivors, kept because they were good at
the first pruning report, so their median there is biased upward and a config whose curve
starts slow and ends best is pruned (measured on the demo's grid: B = 128 at
LR 0.032, 0.674 at report 2 against the complete trials' 0.689 and 0.693; the pruned
trials that reached report 2 put the median at 0.645). A pruned trial's intermediate
values are real measurements at the reports it reached, and Optuna reads a trial only at
the report being judged, so a trial pruned earlier is simply absent from later medians.

Successive halving (Optuna's ``SuccessiveHalvingPruner``) works inside the same wrapper:
it reads the study through ``get_trials`` and records each trial's value at each rung it
reaches as a system attr, and a rung's competitors are the trials holding that record, so
stratified, a batch size's rungs hold only its own trials (``make_pruner``). Its records
are what later trials compete with, so the floor asks it even for a protected trial
(``BatchSizeFloorPruner(..., consult_when_protected=True)``): otherwise the floor's
full-budget trials, the best-informed ones, would never stand at any rung.

``CatchUpPruner`` asks a different question from a median: could this trial still become
its batch size's best? A median ranks trials at a report where, under a cosine schedule
that decays to zero at the end of the budget, the ranking among good LRs is not yet
informative: a higher LR is noisier early and gains most in the last part of the budget
(measured on the demo's grid: B = 16 at LR 0.032 was at 0.61 after half an epoch, below 5
of the 7 trials of its batch size, some at LRs more than a decade off, and ended at 0.730, a
top result). So it forecasts the trial's final value from its value now, by a line through the
study's complete trials (value at this report, final value), and prunes only when the
upper end of that forecast's prediction interval stays below (1% below, as shipped) the
best complete value of its batch size: the study's own curves say how far a curve can
come back, and the interval is wide early and narrows as the budget is spent.

This module knows the parameter only by the name it is given (``hpo.space`` passes
``BATCH_PARAM``), so it imports no other hpo module.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def _same_param(trial: FrozenTrial, param: str, value: Any) -> bool:
    return param in trial.params and trial.params[param] == value


class _TrialsWithParam:
    """A read-only view of a study that lists only the trials whose ``param`` equals
    ``value`` and, with ``include_pruned``, answers a request for COMPLETE trials with the
    COMPLETE and PRUNED ones. Optuna's Percentile/Median pruner reads a study through
    ``get_trials`` and ``direction`` only (optuna/pruners/_percentile.py); everything else
    is delegated."""

    def __init__(
        self, study: optuna.Study, param: str, value: Any, include_pruned: bool = False
    ) -> None:
        self._study = study
        self._param = param
        self._value = value
        self._include_pruned = include_pruned

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if self._include_pruned and states is not None and TrialState.COMPLETE in states:
            states = (*states, TrialState.PRUNED)
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if _same_param(t, self._param, self._value)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class SameBatchSizePruner(optuna.pruners.BasePruner):
    """``base`` (a Median or Percentile pruner) applied to the trials of one batch size.

    With ``include_pruned`` the comparison at a report counts every trial of that batch
    size that reached it, PRUNED as well as COMPLETE (see the module docstring); the inner
    pruner's ``n_startup_trials`` then counts both too. A trial without the parameter yet
    (it has not sampled it) is never pruned.
    """

    def __init__(
        self, base: optuna.pruners.BasePruner, param: str, include_pruned: bool = False
    ) -> None:
        self.base = base
        self.param = param
        self.include_pruned = include_pruned

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if self.param not in trial.params:
            return False
        view = _TrialsWithParam(
            study, self.param, trial.params[self.param], include_pruned=self.include_pruned
        )
        return self.base.prune(view, trial)  # type: ignore[arg-type]


def complete_trials_like(study: optuna.Study, trial: FrozenTrial, param: str) -> int:
    """Complete trials with ``trial``'s value of ``param`` (``trial`` itself excluded)."""
    complete: Sequence[FrozenTrial] = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)
    )
    value = trial.params[param]
    return sum(_same_param(t, param, value) for t in complete if t.number != trial.number)


def _protected(study: optuna.Study, trial: FrozenTrial, param: str, min_complete: int) -> bool:
    return param not in trial.params or complete_trials_like(study, trial, param) < min_complete


class BatchSizeFloorPruner(optuna.pruners.BasePruner):
    """``base``, except that no trial is pruned while its batch size has fewer than
    ``min_complete`` COMPLETE trials.

    Counting complete trials (rather than "the first N trials by number") is what
    guarantees N full-budget answers per batch size in a sequential study: a protected
    trial that diverges does not use up the protection. With parallel workers, trials of
    one batch size running at the same time are all protected until N have completed; that
    costs some budget, never coverage. (For Hyperband use ``FlooredHyperbandPruner``.)

    ``consult_when_protected``: ask ``base`` for a protected trial too and ignore its
    answer, for a pruner that records something at each decision (successive halving
    stores the trial's value at each rung it reaches, the values later trials compete
    with). Off, a protected trial costs ``base`` nothing: the median pruner re-reads the
    study's trials at every call.
    """

    def __init__(
        self,
        base: optuna.pruners.BasePruner,
        param: str,
        min_complete: int,
        *,
        consult_when_protected: bool = False,
    ) -> None:
        self.base = base
        self.param = param
        self.min_complete = min_complete
        self.consult_when_protected = consult_when_protected

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if self.consult_when_protected:
            decision = self.base.prune(study, trial)
            return decision and not _protected(study, trial, self.param, self.min_complete)
        if _protected(study, trial, self.param, self.min_complete):
            return False
        return self.base.prune(study, trial)


class FlooredHyperbandPruner(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband with the same floor as ``BatchSizeFloorPruner``.

    A subclass rather than a wrapper: Optuna hands samplers only the trials of the
    current trial's Hyperband bracket when ``isinstance(study.pruner, HyperbandPruner)``
    (optuna.pruners._filter_study), and a wrapper would silently turn that off.
    """

    def __init__(self, *, param: str, min_complete: int, **hyperband: Any) -> None:
        super().__init__(**hyperband)
        self.param = param
        self.min_complete = min_complete

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if _protected(study, trial, self.param, self.min_complete):
            return False
        return super().prune(study, trial)


class CatchUpPruner(optuna.pruners.BasePruner):
    """Prune a trial only when a forecast of its final value cannot reach the best.

    At report ``k`` the study's COMPLETE trials give pairs (value at ``k``, final value);
    a least-squares line through them forecasts the trial's final value from its value at
    ``k``, and the one-sided ``confidence`` upper bound of the prediction interval (Student
    t, n - 2 degrees of freedom: the line's own uncertainty and the curves' scatter about
    it) is the most it can plausibly reach, never less than its value now. The trial is
    pruned when that bound stays below the best COMPLETE value less ``near_best`` (a share
    of its magnitude): of its own batch size with ``param`` (a trial need only be able to
    become its batch size's best), of the study otherwise. ``near_best`` is there because
    the answer is not the best trial alone: ``hpo.report`` takes every complete trial
    within 1% of a batch size's best as an estimate of its best LR (about the demo's
    seed-to-seed spread), so a trial that may end that close is kept.

    A line, not a fixed margin: a curve that starts low gains more (measured: B = 8 at LR
    0.0024 was at 0.595 after half an epoch and ended at 0.729, a gain of 0.134 that no
    complete trial of its study had made; the line through those trials bounded it at
    0.723, above its batch size's best, 0.721). The pairs come from every complete trial,
    not only the batch size's: with 2-3 per batch size one batch size's curves bound the
    forecast far too tightly.

    No pruning before report ``n_warmup_steps``, nor while fewer than ``n_startup_trials``
    (at least 3: a line and its scatter) complete trials reached the report, nor when the
    trial's batch size (with ``param``) has no complete trial. A NaN value is pruned, as
    Optuna's median pruner does.
    """

    def __init__(
        self,
        param: str | None = None,
        *,
        n_warmup_steps: int = 1,
        n_startup_trials: int = 3,
        confidence: float = 0.975,
        near_best: float = 0.0,
    ) -> None:
        if n_startup_trials < 3:
            raise ValueError(f"n_startup_trials = {n_startup_trials} must be at least 3")
        if not 0.5 <= confidence < 1.0:
            raise ValueError(f"confidence = {confidence} must be in [0.5, 1)")
        if not near_best >= 0.0:
            raise ValueError(f"near_best = {near_best} must be 0 or more (a share of the best)")
        self.param = param
        self.n_warmup_steps = n_warmup_steps
        self.n_startup_trials = n_startup_trials
        self.confidence = confidence
        self.near_best = near_best

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        if self.param is not None and self.param not in trial.params:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        complete = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value) and t.number != trial.number
        ]
        pairs = [
            (sign * t.intermediate_values[step], sign * t.value)
            for t in complete
            if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])
        ]
        targets = [
            sign * t.value
            for t in complete
            if self.param is None or _same_param(t, self.param, trial.params[self.param])
        ]
        if len(pairs) < self.n_startup_trials or not targets:
            return False
        best = max(targets)
        bound = forecast_upper_bound(pairs, sign * value, self.confidence)
        return bound is not None and max(sign * value, bound) < best - self.near_best * abs(best)


def forecast_upper_bound(
    pairs: Sequence[tuple[float, float]], x: float, confidence: float
) -> float | None:
    """The one-sided ``confidence`` upper prediction bound at ``x`` of the least-squares
    line through ``pairs`` (x, y): a + b x + t(confidence, n - 2) s √(1 + 1/n + (x - x̄)²
    / Sxx). None when the x values do not spread (no line) or there are fewer than 3."""
    from scipy import stats  # only when a decision needs it

    n = len(pairs)
    if n < 3:
        return None
    mean_x = sum(p[0] for p in pairs) / n
    mean_y = sum(p[1] for p in pairs) / n
    sxx = sum((p[0] - mean_x) ** 2 for p in pairs)
    if sxx <= 0.0:
        return None
    slope = sum((p[0] - mean_x) * (p[1] - mean_y) for p in pairs) / sxx
    intercept = mean_y - slope * mean_x
    scatter = math.sqrt(sum((y - intercept - slope * x0) ** 2 for x0, y in pairs) / (n - 2))
    spread = scatter * math.sqrt(1.0 + 1.0 / n + (x - mean_x) ** 2 / sxx)
    return intercept + slope * x + float(stats.t.ppf(confidence, n - 2)) * spread
