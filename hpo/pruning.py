"""Pruning that cannot condemn a batch size wholesale.

Optuna's Median/Percentile pruner compares a trial's intermediate value with the other
trials' values at the same step. Across batch sizes that comparison is unfair: at equal
epochs B = 512 has taken 32x fewer optimizer updates than B = 16 and looks worse early, so
every large-batch trial can be pruned before one has finished (issue 9: the demo pruned
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
starts slow and ends best is pruned (issue 9's pruning regret: the grid's B = 128 at
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
(issue 9: the grid's B = 16 at LR 0.032 was at 0.61 after half an epoch, below 5 of the 7
trials of its batch size, some at LRs 2 decades off, and ended at 0.730, a top result).
So it prunes a trial only when, even with the largest gain from that report to the end
that any complete trial of the study made, it would stay below the best complete value
(of its batch size, stratified): the study's own curves say how far a curve can come
back, and that margin is wide early and narrows as the budget is spent.

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
    """Prune a trial only when it cannot catch up with the best complete trial.

    At report ``k`` the trial's value plus the catch-up margin, the largest gain from
    report ``k`` to the end that any COMPLETE trial of the study made (at least 0), is
    compared with the best COMPLETE value: of the trial's own batch size when ``param`` is
    given (a trial need only be able to become its batch size's best), of the study
    otherwise. Below it, the trial is pruned; an optimistic forecast, so a trial that may
    still win goes on. The margin is taken over every complete trial, not only its batch
    size's: with 2-3 complete trials per batch size (the demo) one batch size's curves
    bound the catch-up too tightly (measured in issue 9: it would have pruned a B = 32
    trial at half an epoch that ended at 0.730, a top result of its run).

    No pruning before report ``n_warmup_steps``, nor while the study has fewer than
    ``n_startup_trials`` complete trials that reached the report (the margin's evidence)
    or, with ``param``, the trial's batch size has no complete trial. A NaN value is
    pruned, as Optuna's median pruner does.
    """

    def __init__(
        self, param: str | None = None, *, n_warmup_steps: int = 1, n_startup_trials: int = 1
    ) -> None:
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials = {n_startup_trials} must be at least 1")
        self.param = param
        self.n_warmup_steps = n_warmup_steps
        self.n_startup_trials = n_startup_trials

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
        gains = [
            sign * (t.value - t.intermediate_values[step])
            for t in complete
            if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])
        ]
        if len(gains) < self.n_startup_trials:
            return False
        targets = [
            t
            for t in complete
            if self.param is None or _same_param(t, self.param, trial.params[self.param])
        ]
        if not targets:
            return False
        best = max(sign * t.value for t in targets)
        return sign * value + max(0.0, max(gains)) < best
