"""One trial's training loop on tiny synthetic data: it learns, reports, prunes, detects divergence."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.data import load_splits
from hpo.device import select_device
from hpo.space import make_pruner
from hpo.spec import StudySpec, load_spec
from tests.conftest import train_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)

PER_TRIAL_ATTRS = {
    "batch_size",
    "val_auc",
    "val_acc",
    "val_loss",
    "best_val_auc",
    "best_val_acc",
    "best_val_loss",
    "train_acc",
    "generalization_gap",
    "n_updates",
    "samples_per_s",
    "wall_time_s",
    "epochs_completed",
    "reports_completed",
    "b_simple_measurements",
    "b_simple_per_epoch",
    "updates_at_report",
}


def has_noise_scale_or_why(attrs: dict) -> bool:
    """A complete trial's B_simple with its interval, or the reason it has none."""
    return ("b_simple" in attrs and "b_simple_interval" in attrs) or "b_simple_missing" in attrs


def _spec(tiny_study: Path, **changes: dict) -> StudySpec:
    data = load_spec("tiny").model_dump()
    for table, values in changes.items():
        data[table].update(values)
    return StudySpec.model_validate(data)


def _run(spec: StudySpec, params: list[dict], pruner=None) -> optuna.Study:
    study = optuna.create_study(
        direction=spec.objective.direction, pruner=pruner or optuna.pruners.NopPruner()
    )
    splits = load_splits(spec.dataset)
    for p in params:
        study.enqueue_trial(p)
    study.optimize(lambda trial: train_trial(trial, spec, splits=splits), n_trials=len(params))
    return study


def test_short_run_learns_above_chance(tiny_study: Path) -> None:
    spec = _spec(tiny_study, dataset={"train_size": 512, "val_size": 256}, budget={"epochs": 3})
    study = _run(spec, [{"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-5}])
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    # The synthetic task is hard (crowding carries the label): above chance, not high.
    assert trial.user_attrs["val_acc"] > 0.58
    assert trial.value == pytest.approx(trial.user_attrs["val_auc"]) and trial.value > 0.6
    assert trial.user_attrs.keys() >= PER_TRIAL_ATTRS
    assert has_noise_scale_or_why(trial.user_attrs)
    assert trial.user_attrs["batch_size"] == 32
    assert trial.user_attrs["n_updates"] == 3 * (512 // 32)
    assert trial.user_attrs["epochs_completed"] == 3
    # 48 updates, a noise-scale measurement on every 6th (noise_every_for: 8 in the trial).
    assert trial.user_attrs["b_simple_measurements"] == 8
    assert len(trial.user_attrs["b_simple_per_epoch"]) == 3
    assert trial.user_attrs["updates_at_report"] == [16, 32, 48]
    assert trial.user_attrs["generalization_gap"] == pytest.approx(
        trial.user_attrs["train_acc"] - trial.user_attrs["val_acc"]
    )
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    assert trial.intermediate_values[3] == pytest.approx(trial.value)


def test_training_is_reproducible_on_cpu(tiny_study: Path) -> None:
    spec = _spec(tiny_study, budget={"epochs": 1})
    params = {"log2_batch_size": 4, "lr": 0.02, "weight_decay": 1e-4}
    first = _run(spec, [params]).trials[0]
    second = _run(spec, [params]).trials[0]
    assert first.value == second.value
    assert first.user_attrs["val_loss"] == second.user_attrs["val_loss"]


def test_huge_learning_rate_is_reported_as_diverged(tiny_study: Path) -> None:
    spec = _spec(tiny_study, search={"lr_high": 1e8}, budget={"epochs": 2})
    trial = _run(spec, [{"log2_batch_size": 4, "lr": 1e8, "weight_decay": 1e-5}]).trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["fail_reason"] == "diverged"
    assert trial.user_attrs["epochs_completed"] == 0  # ended at once, inside the first epoch


def test_bad_trial_is_pruned_after_the_warm_up(tiny_study: Path) -> None:
    spec = _spec(
        tiny_study,
        budget={"epochs": 3},
        pruner={"kind": "median", "min_epochs": 1, "n_startup_trials": 2},
    )
    good = {"log2_batch_size": 4, "lr": 0.05, "weight_decay": 1e-5}
    hopeless = {"log2_batch_size": 6, "lr": 1e-3, "weight_decay": 1e-6}  # 4 tiny updates/epoch
    study = _run(spec, [good, good, hopeless], pruner=make_pruner(spec))
    last = study.trials[-1]
    assert [t.state for t in study.trials[:2]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert last.state == TrialState.PRUNED
    assert last.user_attrs["fail_reason"] == "pruned"
    assert last.user_attrs["epochs_completed"] == 1
    assert list(last.intermediate_values) == [1]


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_a_trial_is_never_pruned_at_its_last_report(tiny_study: Path) -> None:
    """Its budget is spent: pruning there would save nothing and lose a full-budget result."""
    spec = _spec(tiny_study, budget={"epochs": 2})
    params = {"log2_batch_size": 4, "lr": 0.05, "weight_decay": 1e-5}
    trial = _run(spec, [params], pruner=_AlwaysPrune()).trials[0]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    last_only = _spec(tiny_study, budget={"epochs": 1})
    assert _run(last_only, [params], pruner=_AlwaysPrune()).trials[0].state == TrialState.COMPLETE


def test_cpu_uses_bf16_and_channels_last_unless_switched_off(tiny_study: Path) -> None:
    import torch

    from hpo.compat import cpu_supports_bf16

    spec = load_spec("tiny")
    setup = select_device(spec.training)
    assert setup.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert setup.channels_last
    if setup.device.type == "cpu":
        assert setup.amp_dtype == (torch.bfloat16 if cpu_supports_bf16() else None)
    off = _spec(tiny_study, training={"mixed_precision": False, "channels_last": False})
    setup = select_device(off.training)
    assert setup.amp_dtype is None and not setup.channels_last
