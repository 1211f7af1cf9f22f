"""End to end in a temp dir: `hpo launch` a shrunken demo study, then `hpo status`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import optuna
from typer.testing import CliRunner

from hpo.cli import app
from hpo.spec import StudySpec, load_spec
from hpo.storage import SPEC_ATTR
from tests.conftest import tiny_study_text
from tests.test_train import PER_TRIAL_ATTRS, has_noise_scale_or_why

REPO = Path(__file__).resolve().parents[1]


def _shrunken_demo(studies_dir: Path) -> None:
    """studies/demo.toml with the dataset and budget shrunk to seconds."""
    text = (REPO / "studies/demo.toml").read_text()
    for old, new in [
        ("train_size = 4096", "train_size = 256"),
        ("val_size = 1024", "val_size = 128"),
        ('cache_dir = ".hpo-cache"', ""),
        ("batch_size_min = 8", "batch_size_min = 16"),
        ("batch_size_max = 128", "batch_size_max = 64"),
        ("epochs = 2", "epochs = 1"),
        ("reports = 4", "reports = 2"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    (studies_dir / "demo.toml").write_text(text)


def test_launch_then_status_end_to_end(studies_dir: Path) -> None:
    _shrunken_demo(studies_dir)
    runner = CliRunner()
    # 6: the demo's first round (two LRs at each of the 3 batch sizes left)
    result = runner.invoke(app, ["launch", "--study", "demo", "--n-trials", "6"])
    assert result.exit_code == 0, result.output
    db = studies_dir.parent / "hpo.db"
    assert db.is_file()
    assert "best trial" in result.output and "best per batch size" in result.output
    assert f"SQLite file {db}" in result.output
    hint = [line for line in result.output.splitlines() if "hpo dashboard --storage" in line]
    assert hint and f"sqlite:///{db}" in hint[0]

    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert len(trials) == 6
    assert {t.state for t in trials} <= {
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    }
    for trial in trials:
        assert trial.user_attrs["batch_size"] == 2 ** trial.params["log2_batch_size"]
        assert trial.user_attrs["batch_size"] in (16, 32, 64)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.user_attrs.keys() >= PER_TRIAL_ATTRS
            assert has_noise_scale_or_why(trial.user_attrs)
        else:
            assert trial.user_attrs["fail_reason"] in ("pruned", "diverged")
    # The spec is stored on the study: the study is self-describing.
    stored = StudySpec.from_json(study.user_attrs[SPEC_ATTR])
    assert stored == load_spec("demo")

    # The storage really is the SQLite file, with the user attrs in its tables.
    with sqlite3.connect(db) as connection:
        keys = {
            row[0] for row in connection.execute("SELECT DISTINCT key FROM trial_user_attributes")
        }
    assert {"batch_size", "generalization_gap", "samples_per_s"} <= keys

    status = runner.invoke(app, ["status", "--study", "demo"])
    assert status.exit_code == 0, status.output
    best = study.best_trial
    assert f"best trial {best.number}: val_auc = {best.value:.4f}" in status.output
    for batch_size in {t.user_attrs["batch_size"] for t in trials}:
        assert f"│ {batch_size:>10} │" in status.output or f" {batch_size} " in status.output


def test_launching_twice_continues_the_same_study(studies_dir: Path) -> None:
    (studies_dir / "tiny.toml").write_text(tiny_study_text(epochs=1, pruner="none"))
    runner = CliRunner()
    assert runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "2"]).exit_code == 0
    again = runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert again.exit_code == 0, again.output
    assert "2 finished trials; running 1 more" in again.output
    study = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{studies_dir.parent / 'hpo.db'}"
    )
    assert [t.number for t in study.trials] == [0, 1, 2]


def test_launch_refuses_a_changed_spec_for_an_existing_study(studies_dir: Path) -> None:
    path = studies_dir / "tiny.toml"
    path.write_text(tiny_study_text(epochs=1, pruner="none"))
    runner = CliRunner()
    assert runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"]).exit_code == 0
    path.write_text(tiny_study_text(epochs=2, pruner="none"))
    result = runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 2
    assert "budget.epochs" in result.output


def test_hpo_storage_env_var_is_used(studies_dir: Path, monkeypatch) -> None:
    (studies_dir / "tiny.toml").write_text(tiny_study_text(epochs=1, pruner="none"))
    other = studies_dir.parent / "elsewhere.db"
    monkeypatch.setenv("HPO_STORAGE", f"sqlite:///{other}")
    assert CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"]).exit_code == 0
    assert other.is_file() and not (studies_dir.parent / "hpo.db").exists()


def test_status_of_unknown_study_exits_2(studies_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["status", "--study", "nothing", "--storage", "sqlite:///x.db"]
    )
    assert result.exit_code == 2
    assert "study 'nothing' not found" in result.output


def test_help_explains_every_command() -> None:
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for command in ("launch", "worker", "status"):
        assert command in top.output
        help_text = runner.invoke(app, [command, "--help"]).output
        assert "--study" in help_text and "--storage" in help_text


def test_spec_json_has_no_secrets_or_paths_that_differ_between_nodes(studies_dir: Path) -> None:
    _shrunken_demo(studies_dir)
    stored = json.loads(load_spec("demo").to_json())
    assert stored["dataset"]["kind"] == "synthetic" and stored["name"] == "demo"


def test_help_lists_each_command_as_one_flowing_paragraph() -> None:
    """Docstrings are wrapped at 100 columns in the source; the help must reflow them to
    the terminal (markdown mode), not keep the source's line breaks mid-sentence."""
    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert top.exit_code == 0
    report_line = next(line for line in top.output.splitlines() if " report " in line)
    assert "the objective over batch size × learning rate, generalization gap" in report_line


def test_create_makes_the_study_without_trials_then_checks_it_matches(studies_dir: Path) -> None:
    path = studies_dir / "tiny.toml"
    path.write_text(tiny_study_text(epochs=1, pruner="none"))
    runner = CliRunner()
    for _ in range(2):  # creates, then finds it and checks it
        result = runner.invoke(app, ["create", "--study", "tiny"])
        assert result.exit_code == 0, result.output
        assert "study tiny in sqlite:///" in result.output and "ready, 0 of" in result.output
    storage = f"sqlite:///{studies_dir.parent / 'hpo.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert study.trials == [] and SPEC_ATTR in study.user_attrs
    path.write_text(tiny_study_text(epochs=2, pruner="none"))
    result = runner.invoke(app, ["create", "--study", "tiny"])
    assert result.exit_code == 2 and "budget.epochs" in result.output
