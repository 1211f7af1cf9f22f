"""Replicates: the best configuration of the top two batch sizes trained again with another
seed, queued exactly once when the search's budget is nearly spent (hpo.replicates,
hpo.claim.queue_replicates)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hpo.claim import claim_trial
from hpo.replicates import (
    REPLICATE_OF_ATTR,
    REPLICATES_ATTR,
    SEED_ATTR,
    is_replicate,
    plan_replicates,
    replicate_trials,
    training_seed,
    without_replicates,
)
from hpo.report.summary import summarize
from hpo.space import BATCH_PARAM
from hpo.spec import StudySpec, load_spec
from hpo.study import create_or_load_study
from tests.conftest import train_trial
from tests.databases import study_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    BATCH_PARAM: IntDistribution(4, 6),
    "lr": FloatDistribution(1e-3, 0.3, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}


def _spec(tiny_study: Path, **search: object) -> StudySpec:
    data = load_spec("tiny").model_dump()
    data["search"].update(search)
    return StudySpec.model_validate(data)


def _finished(log2: int, lr: float, value: float, **attrs: object) -> optuna.trial.FrozenTrial:
    params = {BATCH_PARAM: log2, "lr": lr, "weight_decay": 1e-4}
    return create_trial(params=params, distributions=DISTRIBUTIONS, value=value, user_attrs=attrs)


# The search: B = 32 wins (0.80), B = 16 is the runner-up (0.75), B = 64 last (0.70).
SEARCH = [(4, 0.01, 0.75), (5, 0.02, 0.80), (6, 0.04, 0.70), (5, 0.2, 0.60)]


def test_the_plan_is_the_top_two_batch_sizes_best_configurations(tiny_study: Path) -> None:
    spec = _spec(tiny_study, replicates=2)
    trials = [_finished(*t) for t in SEARCH]
    for trial, number in zip(trials, range(4), strict=True):
        trial.number = number
    plan = plan_replicates(spec, trials, maximize=True, room=10)
    assert [(p[BATCH_PARAM], p["lr"], a[REPLICATE_OF_ATTR]) for p, a in plan] == [
        (5, 0.02, 1), (4, 0.01, 0), (5, 0.02, 1), (4, 0.01, 0),
    ]  # fmt: skip
    seeds = [a[SEED_ATTR] for _, a in plan]
    assert len(set(seeds)) == 4 and spec.seed + 1 not in seeds and spec.seed not in seeds
    assert len(plan_replicates(spec, trials, maximize=True, room=3)) == 3
    assert [a[REPLICATE_OF_ATTR] for _, a in plan_replicates(spec, trials, False, 2)] == [3, 2]
    assert plan_replicates(spec, trials[:1], maximize=True, room=10) == []  # one batch size


def test_replicates_take_at_most_a_third_of_the_budget_and_none_of_a_grid(
    tiny_study: Path,
) -> None:
    spec = _spec(tiny_study)
    assert spec.search.replicates == 1
    assert (replicate_trials(spec, 5), replicate_trials(spec, 6)) == (0, 2)
    assert replicate_trials(_spec(tiny_study, replicates=0), 60) == 0
    grid = spec.model_dump()
    grid["sampler"]["kind"] = "grid"
    grid["pruner"]["kind"] = "none"
    assert replicate_trials(StudySpec.model_validate(grid), 60) == 0


def test_a_replicate_trains_with_its_own_seed_and_a_retry_with_its_originals(
    tiny_study: Path,
) -> None:
    spec = _spec(tiny_study)
    attrs = {"queued_by": "replicate", REPLICATE_OF_ATTR: 3, SEED_ATTR: 1_000_006}
    assert training_seed(spec, attrs, original_number=7) == 1_000_006
    assert training_seed(spec, {}, original_number=7) == spec.seed + 7
    assert training_seed(spec, {SEED_ATTR: 5}, original_number=7) == spec.seed + 7


def _planted(url: str, spec: StudySpec) -> object:
    loaded = create_or_load_study(spec, url)
    for log2, lr, value in SEARCH:
        loaded.study.add_trial(_finished(log2, lr, value))
    return loaded


def _claim_and_complete(loaded, value: float) -> optuna.trial.FrozenTrial:
    trial = claim_trial(loaded, total_trials=6)
    assert not isinstance(trial, str), trial
    trial.suggest_int(BATCH_PARAM, 4, 6)
    trial.suggest_float("lr", 1e-3, 0.3, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    return loaded.study.tell(trial, value)


def test_the_claim_queues_the_replicates_once_the_search_is_nearly_spent(
    tiny_study: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_study)
    loaded = _planted(f"sqlite:///{tmp_path / 'r.db'}", spec)
    first = _claim_and_complete(loaded, 0.78)  # 4 finished, room 2: the replicates' turn
    second = _claim_and_complete(loaded, 0.74)
    assert claim_trial(loaded, total_trials=6) == "done"
    assert is_replicate(first) and is_replicate(second)
    assert (first.params[BATCH_PARAM], first.params["lr"]) == (5, 0.02)
    assert (second.params[BATCH_PARAM], second.params["lr"]) == (4, 0.01)
    assert first.user_attrs[REPLICATE_OF_ATTR] == 1 and second.user_attrs[REPLICATE_OF_ATTR] == 0
    assert loaded.study.user_attrs[REPLICATES_ATTR] == {"queued": [1, 0]}
    # the search's answer is the one without the replicates
    summary = summarize(loaded.study, "val_auc")
    assert summary.best is not None and summary.best.number == 1
    assert len(without_replicates(loaded.study).get_trials()) == 4
    assert sum(summary.state_counts.values()) == 6


def test_a_study_with_one_batch_size_completed_records_why_it_has_no_replicates(
    tiny_study: Path, tmp_path: Path
) -> None:
    loaded = create_or_load_study(_spec(tiny_study), f"sqlite:///{tmp_path / 'one.db'}")
    for value in (0.7, 0.71, 0.72, 0.73):
        loaded.study.add_trial(_finished(4, 0.01, value))
    trial = _claim_and_complete(loaded, 0.7)
    assert not is_replicate(trial)
    assert "fewer than two batch sizes" in loaded.study.user_attrs[REPLICATES_ATTR]["reason"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_two_workers_claiming_at_once_queue_the_replicates_exactly_once(
    backend: str, tiny_study: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_study)
    with study_storage(backend, tmp_path, "c.db", prefix="floor_") as url:
        loaded = _planted(url, spec)
        workers = [create_or_load_study(spec, url) for _ in range(2)]  # each its own storage
        for _ in range(2):  # both claims, and then both again: nothing more is queued
            with ThreadPoolExecutor(len(workers)) as pool:
                claimed = list(pool.map(lambda w: claim_trial(w, total_trials=6), workers))
            if all(isinstance(c, str) for c in claimed):
                break
            for worker, trial in zip(workers, claimed, strict=True):
                assert not isinstance(trial, str)
                worker.study.tell(trial, 0.7)
        trials = loaded.study.get_trials()
        for opened in (loaded, *workers):
            opened.storage.dispose()
    replicates = [t for t in trials if is_replicate(t)]
    assert len(trials) == 6
    assert sorted(t.user_attrs[REPLICATE_OF_ATTR] for t in replicates) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in replicates)


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_a_replicate_is_never_pruned_where_its_original_would_be(tiny_study: Path) -> None:
    data = load_spec("tiny").model_dump()
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"].update(epochs=1, reports=2)
    spec = StudySpec.model_validate(data)
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    params = {BATCH_PARAM: 5, "lr": 0.01, "weight_decay": 1e-4}
    study.enqueue_trial(params)
    study.enqueue_trial(
        params, user_attrs={"queued_by": "replicate", REPLICATE_OF_ATTR: 0, SEED_ATTR: 7}
    )
    study.optimize(lambda trial: train_trial(trial, spec), n_trials=2)
    original, replicate = study.get_trials()
    assert original.state == TrialState.PRUNED and original.user_attrs["fail_reason"] == "pruned"
    assert replicate.state == TrialState.COMPLETE and replicate.user_attrs["reports_completed"] == 2


def test_a_negative_replicates_is_refused_naming_the_field(tiny_study: Path) -> None:
    from hpo.spec import SpecError

    text = tiny_study.read_text().replace("[search]", "[search]\nreplicates = -1", 1)
    tiny_study.write_text(text)
    with pytest.raises(SpecError, match="replicates"):
        load_spec("tiny")
