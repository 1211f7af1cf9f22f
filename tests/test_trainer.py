"""A user's trainer function (``[trainer] function``) under hpo: examples/own-training runs
with ``hpo launch`` (pruning, every batch size, the noise scale), a kill -9 mid-trial
resumes from what the trainer saved through ``ctx``, a misbehaving trainer gets the same
fail reasons as hpo's own loop, and a trainer module a node lacks stops it with exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.settings import KILL_AT_ENV, TRUSTED_MODULES_ENV, NodeSettings
from hpo.spec import StudySpec, load_spec, parse_spec
from hpo.study import create_or_load_study, superseded_trials
from hpo.worker import run_worker
from tests.conftest import EXAMPLE_STUDY
from tests.databases import scratch_database

# A queued trial's params, the example's extra (its warmup fraction) included: a worker of
# ``hpo worker`` reseeds its sampler, so a drawn value would differ from the reference run's.
FIRST = {"log2_batch_size": 5, "lr": 0.01, "weight_decay": 1e-3, "warmup_fraction": 0.1}


@pytest.fixture(autouse=True)
def _trust_the_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers here read the spec from the storage: this node trusts the trainers it names."""
    monkeypatch.setenv(TRUSTED_MODULES_ENV, "own_training,tests.trainer_functions")


def _example_spec(**changes: object) -> StudySpec:
    data = tomllib.loads(EXAMPLE_STUDY.read_text())
    for dotted, value in changes.items():
        table, _, key = dotted.partition("__")
        data.setdefault(table, {})[key] = value
    return parse_spec(data, source="test", default_name="own-training")


def _trials(url: str, name: str = "own-training") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def _create_with_a_queued_trial(spec: StudySpec, url: str) -> None:
    loaded = create_or_load_study(spec, url)
    loaded.study.enqueue_trial(FIRST)
    loaded.storage.engine.dispose()


@pytest.mark.slow
def test_the_own_training_example_prunes_covers_every_batch_size_and_measures_noise(
    example_on_path: Path,
) -> None:
    url = f"sqlite:///{example_on_path / 'own.db'}"
    result = CliRunner().invoke(
        app, ["launch", "--study", str(EXAMPLE_STUDY), "--storage", url], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    trials = _trials(url)
    assert len(trials) == 10 and all(t.state.is_finished() for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs["fail_reason"] == "pruned" for t in pruned)
    assert {t.params["batch_size"] for t in complete} == {16, 32, 64, 128}
    for trial in complete:
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.value == trial.intermediate_values[3]
        assert trial.user_attrs["epochs_completed"] == 3
        assert trial.user_attrs["train_epochs"] == 3
        assert trial.user_attrs["n_updates"] == 3 * (2048 // trial.params["batch_size"])
    # The example measures it through ctx.noise (an estimate may still be None while the
    # averaged |G|² is not positive: few measurements at a large batch).
    measured = [t for t in complete if (t.user_attrs.get("b_simple") or 0) > 0]
    assert len(measured) >= len(complete) // 2
    assert all(len(t.user_attrs["b_simple_per_epoch"]) == 3 for t in measured)
    assert max(t.value for t in complete) > 0.7  # it learns: chance is 0.5
    report = CliRunner().invoke(app, ["report", "--study", "own-training", "--storage", url])
    assert report.exit_code == 0, report.output
    summary = (example_on_path / "reports" / "own-training" / "summary.md").read_text()
    assert "Fitted lr* ∝ B^α with α = " in summary
    assert "The measured gradient noise scale B_simple is " in summary


@pytest.mark.db
@pytest.mark.slow
def test_two_workers_on_postgresql_finish_the_exact_total(example_on_path: Path) -> None:
    with scratch_database("postgresql", prefix="tr_") as url:
        result = CliRunner().invoke(
            app,
            ["launch", "--study", str(EXAMPLE_STUDY), "--storage", url, "--workers", "2",
             "--n-trials", "6"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        trials = _trials(url)
        states = [t.state for t in trials]
        assert len(trials) >= 6 and TrialState.RUNNING not in states
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == 6, states
        workers = {t.user_attrs["worker"] for t in trials}
        assert len(workers) == 2  # both processes trained
        optuna.delete_study(study_name="own-training", storage=url)


def test_a_trainer_killed_mid_trial_is_retried_and_resumes_where_it_saved(
    example_on_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _example_spec(pruner__kind="none", sampler__cover_batch_sizes=False)
    reference_url = f"sqlite:///{example_on_path / 'reference.db'}"
    _create_with_a_queued_trial(spec, reference_url)
    node = NodeSettings(checkpoint_dir=example_on_path / "reference-ckpt")
    assert run_worker(spec.name, reference_url, total_trials=1, node=node).exit_code == 0
    (reference,) = _trials(reference_url)

    url = f"sqlite:///{example_on_path / 'killed.db'}"
    _create_with_a_queued_trial(spec, url)
    env = os.environ | {
        "HPO_STORAGE": url, "HPO_HEARTBEAT_S": "1", "HPO_GRACE_S": "3",
        "HPO_CHECKPOINT_DIR": str(example_on_path / "ckpt"), KILL_AT_ENV: "report:2",
    }  # fmt: skip
    command = [sys.executable, "-m", "hpo", "worker", "--study", spec.name, "--n-trials", "1"]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    monkeypatch.setenv("HPO_HEARTBEAT_S", "1")
    monkeypatch.setenv("HPO_GRACE_S", "3")
    node = NodeSettings(checkpoint_dir=example_on_path / "ckpt")
    assert run_worker(spec.name, url, total_trials=1, node=node).exit_code == 0
    trials = _trials(url)
    states = [(t.number, t.state.name, t.user_attrs.get("retry_of")) for t in trials]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1, states
    (retry,) = retries
    assert trials[0].state == TrialState.FAIL and retry.number not in superseded_trials(trials)
    assert retry.user_attrs["resumed_from_report"] == 1  # killed before its second report
    assert retry.params == reference.params == trials[0].params == {**FIRST, "batch_size": 32}
    assert sorted(retry.intermediate_values) == [1, 2, 3]
    # Resumed from the saved model, optimizer, schedule and loader state: the same run.
    assert retry.value == pytest.approx(reference.value, abs=1e-12)
    assert retry.intermediate_values == pytest.approx(reference.intermediate_values, abs=1e-12)


@pytest.mark.parametrize(
    ("function", "state", "reason"),
    [
        ("raises", TrialState.FAIL, "error: ValueError: the team's data loader broke"),
        ("returns_nan", TrialState.PRUNED, "diverged"),
        ("reports_nan", TrialState.PRUNED, "diverged"),
        ("never_reports", TrialState.FAIL, "no report: the trainer returned without calling"),
    ],
)
def test_a_misbehaving_trainer_gets_the_fail_reason_hpos_own_loop_gets(
    example_on_path: Path, function: str, state: TrialState, reason: str
) -> None:
    spec = _example_spec(trainer__function=f"tests.trainer_functions:{function}")
    url = f"sqlite:///{example_on_path / 'study.db'}"
    create_or_load_study(spec, url).storage.engine.dispose()
    run_worker(spec.name, url, total_trials=1, node=NodeSettings())
    trial = _trials(url)[0]
    assert trial.state == state
    assert trial.user_attrs["fail_reason"].startswith(reason)


def test_a_trainer_that_returns_none_completes_with_its_last_report(
    example_on_path: Path,
) -> None:
    spec = _example_spec(trainer__function="tests.trainer_functions:returns_none")
    url = f"sqlite:///{example_on_path / 'study.db'}"
    create_or_load_study(spec, url).storage.engine.dispose()
    assert run_worker(spec.name, url, total_trials=1, node=NodeSettings()).exit_code == 0
    trial = _trials(url)[0]
    assert trial.state == TrialState.COMPLETE and trial.value == 0.75
    assert trial.intermediate_values == {1: 0.25, 2: 0.5, 3: 0.75}
    assert trial.user_attrs["n_updates"] == 30 and trial.user_attrs["train_samples"] == 300


def test_launch_refuses_a_trainer_module_it_cannot_import_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = EXAMPLE_STUDY.read_text().replace("own_training:train", "no_such_trainer:train")
    (tmp_path / "study.toml").write_text(text)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = CliRunner().invoke(app, ["launch", "--study", "study.toml", "--storage", url])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "trainer.function" in lines[0], result.output
    assert "no_such_trainer" in lines[0] and "PYTHONPATH" in lines[0]
    assert not (tmp_path / "study.db").exists() or not optuna.get_all_study_names(url)


def test_a_worker_whose_node_lacks_the_trainer_module_exits_2_before_it_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _example_spec(trainer__function="no_such_trainer:train")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_or_load_study(spec, url).storage.engine.dispose()
    queued = len(_trials(url))  # the first round, queued when the study was created
    result = CliRunner().invoke(app, ["worker", "--study", spec.name, "--storage", url])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "trainer.function" in line and "no_such_trainer" in line
    assert [t.state for t in _trials(url)] == [TrialState.WAITING] * queued  # none claimed


def test_a_study_without_a_trainer_still_needs_a_dataset_and_a_model(tmp_path: Path) -> None:
    text = EXAMPLE_STUDY.read_text().replace('function = "own_training:train"', "")
    (tmp_path / "study.toml").write_text(text)
    with pytest.raises(Exception, match=r"\[dataset\] is missing: hpo's built-in trainer"):
        load_spec(tmp_path / "study.toml")
