"""Replicates: the best configuration of the top two batch sizes trained again with other
seeds, so the report can say how far apart two runs of one configuration land (the noise
floor) and whether the winner's margin over the runner-up is larger than that.

When and how often: ``search.replicates`` more trials for each of the two batch sizes, kept
out of the search's budget share (``replicate_trials``). The claim (``hpo.claim``) queues
them once, under the study lock, at the first claim that finds no more room in the budget
than the replicates need: the search is nearly spent and its top two batch sizes are known.
Each queued trial is an ordinary ``study.enqueue_trial`` with the original's parameters and
user attrs ``queued_by = "replicate"``, ``replicate_of`` (the original trial's number) and
``replicate_seed`` (its training seed); the study's user attr ``REPLICATES_ATTR`` records
what was queued, or why nothing was, so no second claim queues them again.

How a replicate counts: not in the search's outputs. The best trial, the best per batch
size, the LR scaling fit, the weight-decay view, importances and the predictions read the
study without its replicates (``without_replicates``), so a study with replicates answers
as the same search would without them, and a lucky seed cannot make a replicate "the best
trial". The replicates are read only by the noise floor (``hpo.report.noise_floor``), which
compares each configuration's runs, original and replicates, by their mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.space import BATCH_PARAM, BATCH_SIZE_PARAM
from hpo.space import COVER_ATTR as QUEUED_BY_ATTR  # why a trial was queued
from hpo.spec import StudySpec
from hpo.storage import SPEC_ATTR

REPLICATE_VALUE = "replicate"
REPLICATE_OF_ATTR = "replicate_of"
SEED_ATTR = "replicate_seed"
# Study user attr, written by the claim that decided: {"queued": [the originals' numbers]},
# or {"queued": [], "reason": why none}.
REPLICATES_ATTR = "hpo_replicates"
# How many batch sizes are replicated: the winner and the runner-up.
REPLICATED_BATCH_SIZES = 2
# The largest share of a study's trials the replicates may take; a smaller budget gets none
# (the report says why): a floor bought with most of the search is not worth it.
MAX_SHARE = 1 / 3
# A replicate's seed is its original's plus k times this (k = 1, 2, ...): never the seed of
# another trial of the study (``spec.seed + number``) short of a million trials.
SEED_STRIDE = 1_000_003


def is_replicate(trial: FrozenTrial) -> bool:
    return replicate_attrs(trial.user_attrs)


def replicate_attrs(user_attrs: dict[str, Any]) -> bool:
    """Whether a trial with these user attrs is a replicate."""
    return user_attrs.get(QUEUED_BY_ATTR) == REPLICATE_VALUE


def replicate_trials(spec: StudySpec, total_trials: int) -> int:
    """The trials of ``total_trials`` kept for replicates: ``2 × search.replicates``, or 0
    for a grid study (its trials are the grid) and when that is more than a third of the
    budget."""
    wanted = REPLICATED_BATCH_SIZES * spec.search.replicates
    if spec.sampler.kind == "grid" or wanted > math.floor(total_trials * MAX_SHARE):
        return 0
    return wanted


def replicate_seed(spec: StudySpec, original_number: int, k: int) -> int:
    """The training seed of ``original_number``'s k-th replicate (k ≥ 1); the original's own
    seed is ``spec.seed + original_number`` (``hpo.objective``)."""
    return spec.seed + original_number + k * SEED_STRIDE


def training_seed(spec: StudySpec, user_attrs: dict[str, Any], original_number: int) -> int:
    """A trial's training seed: a replicate's recorded seed, else ``spec.seed`` + the number
    of the first trial of its retry chain (a retry replays its original's seed)."""
    seed = user_attrs.get(SEED_ATTR)
    if isinstance(seed, int) and replicate_attrs(user_attrs):
        return seed
    return spec.seed + original_number


def plan_replicates(
    spec: StudySpec, trials: list[FrozenTrial], maximize: bool, room: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(params, user attrs) of each replicate trial to queue, at most ``room``: the best
    complete search trial of each of the top two batch sizes (by that best value), each
    ``search.replicates`` times, alternating winner and runner-up so a short room still
    gives both a pair. Empty when fewer than two batch sizes have a complete search trial.
    Pure: the claim queues them under the study lock."""
    best: dict[int, FrozenTrial] = {}
    for trial in trials:
        if not _complete(trial) or is_replicate(trial) or BATCH_PARAM not in trial.params:
            continue
        log2 = int(trial.params[BATCH_PARAM])
        mine = best.get(log2)
        if mine is None or (trial.value > mine.value) == maximize:  # type: ignore[operator]
            best[log2] = trial
    ranked = sorted(best.values(), key=lambda t: cast(float, t.value), reverse=maximize)
    top = ranked[:REPLICATED_BATCH_SIZES]
    if len(top) < REPLICATED_BATCH_SIZES:
        return []
    plan = []
    for k in range(1, spec.search.replicates + 1):
        for original in top:
            params = {n: v for n, v in original.params.items() if n != BATCH_SIZE_PARAM}
            attrs = {
                QUEUED_BY_ATTR: REPLICATE_VALUE,
                REPLICATE_OF_ATTR: original.number,
                SEED_ATTR: replicate_seed(spec, original.number, k),
            }
            plan.append((params, attrs))
    return plan[: max(0, room)]


def _complete(trial: FrozenTrial) -> bool:
    return (
        trial.state == TrialState.COMPLETE
        and trial.value is not None
        and math.isfinite(trial.value)
    )


class _SearchOnly:
    """A study seen without its replicate trials: ``get_trials`` (and ``trials``) leave them
    out, everything else is the study's own. What every reader of the search's answer
    (``hpo.report``, ``hpo.export``) is given."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if not is_replicate(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def without_replicates(study: optuna.Study) -> optuna.Study:
    """``study`` without its replicate trials (the same object when it is already such a view)."""
    if isinstance(study, _SearchOnly):
        return cast(optuna.Study, study)
    return cast(optuna.Study, _SearchOnly(study))


def replicates_note(study: optuna.Study) -> dict[str, Any]:
    """What the claim recorded about the replicates (``REPLICATES_ATTR``): ``{}`` before it
    decided."""
    note = study.user_attrs.get(REPLICATES_ATTR)
    return note if isinstance(note, dict) else {}


def why_no_replicates(study: optuna.Study) -> str:
    """Why the study has no complete replicate trial, as a clause for the report, ``hpo
    status`` and ``hpo export``: what the claim recorded (``REPLICATES_ATTR``), else what
    the spec stored on the study (``hpo_spec``) decides (``replicate_trials``), else that
    they are not queued yet. Meant for a study without a noise floor."""
    note = replicates_note(study)
    trials = study.get_trials(deepcopy=False)
    if note.get("reason"):
        return f"no replicate trial was queued: {note['reason']}"
    if note.get("queued"):
        return _queued_not_complete(note["queued"], [t for t in trials if is_replicate(t)])
    stored = _stored_spec(study.user_attrs)
    if stored is None:
        return "the study has no hpo spec stored on it (made by other means than hpo launch)"
    replicates = _get(stored, "search", "replicates", 1)
    n_trials = _get(stored, "budget", "n_trials", 20)
    if not isinstance(replicates, int) or replicates <= 0:
        return "search.replicates = 0 in the study's spec: no replicate trial is queued"
    if _get(stored, "sampler", "kind", "") == "grid":
        return "a grid study (its trials are the grid): no replicate trial is queued"
    # The workers' budget is the spec's n_trials, or more where the study already holds more.
    finished = sum(1 for t in trials if t.state.is_finished() and not is_replicate(t))
    total = max(n_trials, finished) if isinstance(n_trials, int) else finished
    wanted = REPLICATED_BATCH_SIZES * replicates
    if wanted > math.floor(total * MAX_SHARE):
        return (
            f"the replicates ({REPLICATED_BATCH_SIZES} × search.replicates = {wanted} trials) "
            f"would take more than a third of the budget (n_trials = {total}): none is queued"
        )
    return (
        f"not queued yet: the {wanted} replicate trials are queued once no more room is "
        f"left in the budget (n_trials = {total}) than they need"
    )


def _queued_not_complete(originals: list[Any], replicates: list[FrozenTrial]) -> str:
    """The clause for queued replicates none of which has completed: their states."""
    of = " and ".join(str(n) for n in sorted(set(originals)))
    states: dict[str, int] = {}
    for trial in replicates:
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none stored"
    return (
        f"{len(originals)} replicate trial(s) of trial(s) {of} queued but not yet complete "
        f"({counts})"
    )


def _stored_spec(user_attrs: dict[str, Any]) -> dict[str, Any] | None:
    stored = user_attrs.get(SPEC_ATTR)
    if not isinstance(stored, str):
        return None
    try:
        data = json.loads(stored)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _get(data: dict[str, Any], table: str, key: str, default: Any) -> Any:
    section = data.get(table)
    return section.get(key, default) if isinstance(section, dict) else default
