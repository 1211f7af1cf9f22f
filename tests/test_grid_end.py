"""A grid study ends normally (exit 0) when every grid point has run, whatever n_trials."""

from __future__ import annotations

from pathlib import Path

import optuna
from typer.testing import CliRunner

from hpo.cli import app

from .conftest import tiny_study_text


def test_a_grid_study_stops_when_its_grid_is_exhausted(studies_dir: Path) -> None:
    text = tiny_study_text(train_size=64, val_size=32, epochs=1, pruner="none", sampler="grid")
    text = text.replace("batch_size_max = 64", "batch_size_max = 32")
    text = text.replace("n_startup_trials = 2\n", "n_startup_trials = 2\ngrid_lr = [0.01, 0.1]\ngrid_weight_decay = [1e-4]\n")  # fmt: skip
    (studies_dir / "grid.toml").write_text(text)
    result = CliRunner().invoke(app, ["launch", "--study", "grid", "--n-trials", "6"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="grid", storage="sqlite:///hpo.db")
    assert len(study.trials) == 4  # 2 batch sizes x 2 learning rates x 1 weight decay
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    points = {(t.params["log2_batch_size"], t.params["lr"]) for t in study.trials}
    assert len(points) == 4


def test_no_second_worker_gets_a_grid_point_that_is_running() -> None:
    from optuna.trial import TrialState

    from hpo.claim import grid_exhausted

    storage = optuna.storages.InMemoryStorage()
    sampler = optuna.samplers.GridSampler({"x": [0.0, 1.0, 2.0]}, seed=0)
    study = optuna.create_study(sampler=sampler, storage=storage)
    first = study.ask()
    storage.set_trial_state_values(first._trial_id, TrialState.COMPLETE, [1.0])  # noqa: SLF001
    assert not grid_exhausted(study)
    running = [study.ask() for _ in range(2)]  # the other two points, on two workers
    assert {t.system_attrs["grid_id"] for t in study.trials} == {0, 1, 2}
    assert grid_exhausted(study)  # a third claim waits instead of taking a running point
    storage.set_trial_state_values(running[0]._trial_id, TrialState.FAIL)  # noqa: SLF001
    assert grid_exhausted(study)
