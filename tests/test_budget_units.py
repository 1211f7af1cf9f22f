"""budget.unit: equal epochs, equal updates or equal seconds; reports at fixed fractions of
the budget; the cosine schedule spans it; the resource recorded in all three units."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.data import load_splits
from hpo.device import select_device
from hpo.resource import TrainingBudget, cosine_factor
from hpo.space import sample_params
from hpo.spec import BudgetSpec, SpecError, StudySpec, load_spec, parse_spec
from hpo.train import build_run, fit, prepare_data
from tests.conftest import train_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = {"log2_batch_size": 4, "lr": 0.05, "weight_decay": 1e-5}  # B = 16: 8 updates/epoch
LARGE = {"log2_batch_size": 6, "lr": 0.05, "weight_decay": 1e-5}  # B = 64: 2 updates/epoch


def _spec(tiny_study: Path, **budget: object) -> StudySpec:
    data = load_spec("tiny").model_dump()
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"] = {"n_trials": 2, **budget}
    data["pruner"]["min_epochs"] = 1
    return StudySpec.model_validate(data)


def _run(spec: StudySpec, params: list[dict]) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    splits = load_splits(spec.dataset)
    for p in params:
        study.enqueue_trial(p)
    study.optimize(lambda trial: train_trial(trial, spec, splits=splits), n_trials=len(params))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * len(params)
    return study.trials


# --------------------------------------------------------------------------- the arithmetic


def test_one_report_per_epoch_falls_exactly_on_epoch_ends() -> None:
    budget = TrainingBudget.for_trial(BudgetSpec(epochs=3), train_size=100, batch_size=16)
    assert budget.reports == 3 and budget.steps_per_epoch == 6
    assert [budget.updates_at(r) for r in (1, 2, 3)] == [6, 12, 18]


def test_reports_fall_at_fixed_fractions_of_a_budget_in_steps() -> None:
    budget = TrainingBudget.for_trial(
        BudgetSpec(unit="steps", steps=10, reports=4), train_size=128, batch_size=64
    )
    assert [budget.updates_at(r) for r in (1, 2, 3, 4)] == [3, 5, 8, 10]
    assert budget.fraction(5, 0.0) == 0.5 and budget.epochs(10) == 5.0


def test_a_budget_in_seconds_reports_by_the_clock() -> None:
    budget = TrainingBudget.for_trial(
        BudgetSpec(unit="seconds", seconds=2.0, reports=2), train_size=128, batch_size=16
    )
    assert budget.total_updates is None
    assert not budget.reached(1, updates=1000, seconds=0.9)
    assert budget.reached(1, updates=1, seconds=1.0) and not budget.reached(2, 1, 1.9)
    assert budget.fraction(0, 3.0) == 1.0


def test_cosine_factor_runs_from_one_to_zero() -> None:
    assert cosine_factor(0.0) == 1.0
    assert cosine_factor(0.5) == pytest.approx(0.5)
    assert cosine_factor(1.0) == pytest.approx(0.0)


# --------------------------------------------------------------------------- the spec


def test_a_study_file_without_a_unit_trains_in_epochs_and_reports_each_epoch(
    tiny_study: Path,
) -> None:
    budget = load_spec("tiny").budget
    assert budget.unit == "epochs" and budget.report_count == budget.epochs == 2


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"unit": "steps", "epochs": 2}, "budget: unit 'steps' needs 'steps'"),
        ({"unit": "steps", "steps": 5, "epochs": 2}, "'epochs' is set but unit is 'steps'"),
        ({"unit": "seconds", "seconds": -1.0}, "budget.seconds"),
        ({"unit": "hours", "epochs": 2}, "budget.unit"),
        (
            {"unit": "steps", "steps": 9, "reports": 1},
            "pruner.min_epochs = 2 exceeds budget.reports",
        ),
    ],
)
def test_a_bad_budget_names_the_field(tiny_study: Path, budget: dict, message: str) -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data["budget"] = {"n_trials": 2, **budget}
    data["pruner"]["min_epochs"] = 2
    with pytest.raises(SpecError, match=message) as error:
        parse_spec(data, source="tiny.toml", default_name="tiny")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- a tiny study per unit


def test_equal_epochs_give_large_batches_fewer_updates(tiny_study: Path) -> None:
    spec = _spec(tiny_study, unit="epochs", epochs=2, reports=4)
    small, large = _run(spec, [SMALL, LARGE])
    for trial in (small, large):
        assert sorted(trial.intermediate_values) == [1, 2, 3, 4]  # every half epoch
        assert trial.user_attrs["train_epochs"] == 2.0
        assert trial.user_attrs["budget_unit"] == "epochs"
        assert trial.user_attrs["budget_per_report"] == 0.5  # what the report's axis says
        assert trial.user_attrs["train_seconds"] > 0
    assert (small.user_attrs["n_updates"], large.user_attrs["n_updates"]) == (16, 4)


def test_equal_steps_give_every_batch_size_the_same_updates(tiny_study: Path) -> None:
    spec = _spec(tiny_study, unit="steps", steps=6, reports=3)
    small, large = _run(spec, [SMALL, LARGE])
    for trial in (small, large):
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.user_attrs["n_updates"] == 6
        assert trial.user_attrs["reports_completed"] == 3
    assert small.user_attrs["train_epochs"] == 6 / 8  # B = 16 sees less data
    assert large.user_attrs["train_epochs"] == 3.0  # B = 64 passes 3 times


def test_equal_seconds_stop_each_trial_at_its_time_budget(tiny_study: Path) -> None:
    spec = _spec(tiny_study, unit="seconds", seconds=0.4, reports=2)
    (trial,) = _run(spec, [SMALL])
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs["train_seconds"] >= 0.4
    assert trial.user_attrs["n_updates"] >= 2  # at least one update per report
    assert trial.user_attrs["train_epochs"] == trial.user_attrs["n_updates"] / 8


def test_the_cosine_schedule_spans_a_budget_in_steps(tiny_study: Path) -> None:
    """The LR of the last of 12 updates is the cosine at 11/12 of the budget, although 12
    updates of B = 64 are 6 epochs (an epoch-wise schedule would be elsewhere)."""
    spec = _spec(tiny_study, unit="steps", steps=12, reports=2)
    setup = select_device(spec.training)
    data = prepare_data(load_splits(spec.dataset), setup, spec.training)
    trial_params = sample_params(optuna.trial.FixedTrial(LARGE), spec)
    run = build_run(spec, trial_params, setup, seed=0)
    tally = fit(run, data, setup, spec, trial_params)
    assert tally.updates == 12 and len(tally.history) == 2
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * cosine_factor(11 / 12))


def test_epochs_completed_counts_epochs_not_reports(tiny_study: Path) -> None:
    spec = _spec(tiny_study, unit="epochs", epochs=2, reports=4)
    (trial,) = _run(spec, [SMALL])
    assert trial.user_attrs["reports_completed"] == 4
    assert trial.user_attrs["epochs_completed"] == 2
