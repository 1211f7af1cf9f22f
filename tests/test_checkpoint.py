"""Checkpoints: a trial cut off after an epoch resumes there and ends where it would have."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hpo.checkpoint import TrialCheckpoint, checkpoint_root
from hpo.data import load_splits
from hpo.settings import NodeSettings
from hpo.spec import parse_spec
from hpo.worker import remove_finished_checkpoints

from .conftest import tiny_study_text, train_trial

pytestmark = pytest.mark.filterwarnings(
    f"ignore::{ExperimentalWarning.__module__}.ExperimentalWarning"
)

PARAMS = {"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-4}


class Killed(Exception):
    """Stands in for kill -9 right after a checkpoint was written."""


@pytest.fixture
def die_after_first_save(monkeypatch: pytest.MonkeyPatch) -> None:
    save = TrialCheckpoint.save

    def save_then_die(self: TrialCheckpoint, run) -> None:
        save(self, run)
        raise Killed(f"worker died after epoch {run.epochs_done}")

    monkeypatch.setattr(TrialCheckpoint, "save", save_then_die)


@pytest.fixture(scope="module")
def spec():
    text = tiny_study_text(epochs=2, pruner="none", sampler="random")
    return parse_spec(tomllib.loads(text), source="test", default_name="tiny")


@pytest.fixture(scope="module")
def splits(spec):
    return load_splits(spec.dataset)


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    return study


def test_resumed_trial_matches_an_uninterrupted_one(
    spec, splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _study()
    reference_trial = reference.ask()
    expected = train_trial(reference_trial, spec, splits=splits)
    expected_curve = reference.trials[0].intermediate_values

    study = _study()
    first = study.ask()
    with monkeypatch.context() as patch:
        save = TrialCheckpoint.save

        def save_then_die(self: TrialCheckpoint, run) -> None:
            save(self, run)
            raise Killed(f"worker died after epoch {run.epochs_done}")

        patch.setattr(TrialCheckpoint, "save", save_then_die)
        with pytest.raises(Killed):
            train_trial(first, spec, splits=splits, checkpoint_root=tmp_path)
    study.tell(first, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, study.trials[0])

    retry = study.ask()
    assert retry.number == 1 and retry.params == first.params
    value = train_trial(retry, spec, splits=splits, checkpoint_root=tmp_path)
    study.tell(retry, value)

    finished = study.trials[1]
    assert finished.user_attrs["resumed_from_epoch"] == 1
    assert finished.user_attrs["retry_of"] == 0
    assert finished.user_attrs["epochs_completed"] == 2
    assert [p.name for p in tmp_path.joinpath("trial-0").iterdir()] == ["checkpoint.pt"]
    assert finished.intermediate_values == pytest.approx(expected_curve, abs=1e-6)
    assert value == pytest.approx(expected, abs=1e-6)
    # The noise-scale averages travel in the checkpoint: the resumed series is the same.
    reference_series = reference.trials[0].user_attrs["b_simple_per_epoch"]
    assert len(reference_series) == 2
    resumed_series = finished.user_attrs["b_simple_per_epoch"]
    assert [v is None for v in resumed_series] == [v is None for v in reference_series]
    assert [v for v in resumed_series if v is not None] == pytest.approx(
        [v for v in reference_series if v is not None], rel=1e-6
    )


def test_retry_without_a_checkpoint_starts_from_epoch_zero(
    spec, splits, tmp_path: Path, die_after_first_save: None
) -> None:
    study = _study()
    first = study.ask()
    study.tell(first, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, study.trials[0])
    retry = study.ask()
    with pytest.raises(Killed):
        train_trial(retry, spec, splits=splits, checkpoint_root=tmp_path)
    assert retry.user_attrs["resumed_from_epoch"] == 0
    assert retry.user_attrs["retry_of"] == 0


def test_finished_checkpoints_are_removed_except_the_best(spec, tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.7, 0.9, 0.8):
        study.add_trial(optuna.create_trial(value=value))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED))
    running = study.ask()
    here = spec.on_node(NodeSettings(checkpoint_dir=tmp_path))
    root = checkpoint_root(here)
    for number in range(running.number + 1):
        (root / f"trial-{number}").mkdir(parents=True)
        (root / f"trial-{number}" / "checkpoint.pt").write_bytes(b"x")

    remove_finished_checkpoints(study, root)

    assert sorted(p.name for p in root.iterdir()) == ["trial-1", "trial-4"]


def test_checkpoint_directory_env_overrides_the_spec(spec, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HPO_CHECKPOINT_DIR", str(tmp_path))
    assert checkpoint_root(spec.on_node(NodeSettings.from_env())) == tmp_path.resolve() / "tiny"
