"""Checkpoints: a trial cut off after an epoch resumes there and ends where it would have."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import tomllib
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hpo.checkpoint import CheckpointWriter, TrialCheckpoint, checkpoint_root
from hpo.data import load_splits
from hpo.device import select_device
from hpo.settings import KILL_AT_ENV, NodeSettings
from hpo.spec import TrialParams, parse_spec
from hpo.train import EpochMetrics, TrainingRun, build_run
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


def _run(spec, seed: int = 0) -> TrainingRun:
    setup = select_device(spec.training)
    return build_run(spec, TrialParams(batch_size=32, lr=0.05, weight_decay=1e-4), setup, seed=seed)


def _end_epoch(run: TrainingRun) -> None:
    epoch = run.epochs_done + 1
    run.tally.history.append(EpochMetrics(epoch, 0.5, None, 0.5, 0.5, 0.5))


def _weights(run: TrainingRun) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]


def test_an_async_save_writes_the_state_as_it_was_when_saved(
    spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training changes the weights while the background write is held back: the file
    still holds the weights at the save (a host copy, not the live tensors)."""
    changed = threading.Event()
    write = TrialCheckpoint.write

    def write_after_training_went_on(self, state, ready=None) -> None:
        assert changed.wait(30)
        write(self, state, ready)

    monkeypatch.setattr(TrialCheckpoint, "write", write_after_training_went_on)
    run = _run(spec)
    _end_epoch(run)
    saved = _weights(run)
    writer = CheckpointWriter()
    checkpoint = TrialCheckpoint(tmp_path / "trial-0" / "checkpoint.pt", writer)
    checkpoint.save(run)  # returns before the file is written
    assert not checkpoint.path.exists()
    with torch.no_grad():
        for parameter in run.model.parameters():
            parameter.add_(1.0)
    changed.set()
    writer.wait()
    fresh = _run(spec, seed=1)
    assert checkpoint.load_into(fresh) == 1
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), saved, strict=True))


# Saves epoch 1 in the background and waits for it, then epoch 2, whose write kills the
# process with half the file written ($HPO_TEST_KILL_AT=checkpoint-partial:2) while the
# training thread goes on.
KILLED_DURING_AN_ASYNC_WRITE = """
import sys, time, tomllib
from pathlib import Path
import torch
from hpo.checkpoint import CheckpointWriter, TrialCheckpoint
from hpo.spec import parse_spec
from tests.conftest import tiny_study_text
from tests.test_checkpoint import _end_epoch, _run

spec = parse_spec(tomllib.loads(tiny_study_text()), source="test", default_name="tiny")
run = _run(spec)
writer = CheckpointWriter()
checkpoint = TrialCheckpoint(Path(sys.argv[1]), writer)
_end_epoch(run)
checkpoint.save(run)
writer.wait()
print("epoch 1 renamed", flush=True)
_end_epoch(run)
with torch.no_grad():
    for parameter in run.model.parameters():
        parameter.add_(1.0)
checkpoint.save(run)
time.sleep(60)  # training would go on here; the writer's kill comes first
"""


def test_a_kill_during_an_async_write_leaves_the_previous_checkpoint_whole(
    spec, tmp_path: Path
) -> None:
    path = tmp_path / "trial-0" / "checkpoint.pt"
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV}
    env[KILL_AT_ENV] = "checkpoint-partial:2"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_DURING_AN_ASYNC_WRITE, str(path)],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "epoch 1 renamed" in killed.stdout
    (partial,) = path.parent.glob(".checkpoint.pt.*.tmp")  # the write the kill cut short
    assert 0 < partial.stat().st_size < path.stat().st_size
    resumed = _run(spec, seed=1)
    assert TrialCheckpoint(path).load_into(resumed) == 1  # whole, and epoch 1's
    initial = _weights(_run(spec))
    assert all(torch.equal(a, b) for a, b in zip(_weights(resumed), initial, strict=True))
    TrialCheckpoint(path).save(resumed)  # the retry's next save clears the debris
    assert not partial.exists()
