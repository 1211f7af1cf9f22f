"""`hpo export`: the best configuration out as JSON (stdout or file) or TOML, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from hpo.cli import app
from hpo.export import _for_toml
from hpo.spec import load_spec
from hpo.study import create_or_load_study

DISTRIBUTIONS = {
    "log2_batch_size": IntDistribution(4, 6),
    "lr": FloatDistribution(1e-3, 0.3, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
}


def _trial(
    batch_size: int, lr: float, value: float | None, state: TrialState = TrialState.COMPLETE
):
    return create_trial(
        state=state,
        value=value,
        params={"log2_batch_size": batch_size.bit_length() - 1, "lr": lr, "weight_decay": 1e-4},
        distributions=DISTRIBUTIONS,
        user_attrs={"batch_size": batch_size, "precision": "bf16", "epochs_completed": 2},
    )


@pytest.fixture
def finished_study(tiny_study: Path) -> optuna.Study:
    """The tiny study with three hand-made trials: best overall at B=32, one at B=16, a
    pruned one at B=64 (no complete trial there)."""
    loaded = create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db")
    loaded.study.add_trial(_trial(16, 0.01, 0.81))
    loaded.study.add_trial(_trial(32, 0.02, 0.93))
    loaded.study.add_trial(_trial(64, 0.05, None, TrialState.PRUNED))
    return loaded.study


def test_export_prints_the_best_configuration_as_json_on_stdout(finished_study) -> None:
    result = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["trial"] == 1
    assert exported["batch_size"] == 32 and exported["lr"] == pytest.approx(0.02)
    assert exported["metric"] == "val_auc" and exported["value"] == pytest.approx(0.93)
    assert exported["optimizer"] == "sgd" and exported["momentum"] == 0.9
    assert exported["epochs"] == 2 and exported["precision"] == "bf16"
    assert exported["model"] == {"name": "small-cnn", "pretrained": False}
    rows = {row["batch_size"]: row for row in exported["by_batch_size"]}
    assert rows[16]["trial"] == 0 and rows[32]["trial"] == 1
    assert rows[64] == {"batch_size": 64, "n_complete": 0, "n_pruned": 1}


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_export_file_round_trips_in_the_format_of_its_extension(finished_study, suffix) -> None:
    out = Path(f"best{suffix}")
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    loaded = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    stdout = json.loads(CliRunner().invoke(app, ["export", "--study", "tiny"]).stdout)
    # TOML's spelling of null: a table's null entry left out, an array's (an interval's
    # missing upper end) inf
    assert loaded == (stdout if suffix == ".json" else _for_toml(stdout))


def test_export_at_a_batch_size_gives_the_best_trial_there(finished_study) -> None:
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert (exported["trial"], exported["batch_size"]) == (0, 16)
    assert exported["value"] == pytest.approx(0.81)


def test_export_at_a_batch_size_without_a_complete_trial_exits_2(finished_study) -> None:
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--batch-size", "64"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 64" in lines[0] and "16, 32" in lines[0]


def test_export_of_a_study_without_a_complete_trial_exits_2(tiny_study) -> None:
    create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db")
    result = CliRunner().invoke(app, ["export", "--study", "tiny"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == "error: study 'tiny' has no complete trial yet: nothing to export"
    )


def test_export_to_an_unknown_extension_exits_2_naming_the_file(finished_study) -> None:
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--out", "best.yaml"])
    assert result.exit_code == 2
    assert "--out best.yaml" in result.stderr and "Traceback" not in result.output
    assert not Path("best.yaml").exists()


def test_trials_csv_has_every_trial_with_batch_size_state_and_fail_reason(finished_study) -> None:
    import csv

    finished_study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"log2_batch_size": 4, "lr": 0.2, "weight_decay": 1e-4},
            distributions=DISTRIBUTIONS,
            user_attrs={"batch_size": 16, "fail_reason": "oom"},
        )
    )
    result = CliRunner().invoke(
        app, ["export", "--study", "tiny", "--trials-csv", "trials.csv", "--out", "best.json"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(Path("trials.csv").read_text().splitlines()))
    assert [row["number"] for row in rows] == ["0", "1", "2", "3"]
    assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    assert [row["user_attrs_batch_size"] for row in rows] == ["16", "32", "64", "16"]
    assert rows[3]["user_attrs_fail_reason"] == "oom" and rows[1]["params_lr"] == "0.02"
    assert json.loads(Path("best.json").read_text())["trial"] == 1


def _planted_scaling_study() -> optuna.Study:
    """B = 16, 32, 64, five LRs each around lr*(B) = 0.01·√(B/16) (the square-root rule),
    the value falling off quadratically in log2(lr/lr*), weight decays varied."""
    study = optuna.create_study(direction="maximize")
    distributions = {
        "log2_batch_size": IntDistribution(4, 6),
        "lr": FloatDistribution(1e-4, 1.0, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    }
    for batch_size in (16, 32, 64):
        best = 0.01 * math.sqrt(batch_size / 16)
        for step, weight_decay in zip(
            (-1.0, -0.5, 0.0, 0.5, 1.0), (1e-5, 1e-4, 1e-4, 1e-3, 1e-4), strict=True
        ):
            study.add_trial(
                create_trial(
                    value=0.9 - 0.05 * step * step,
                    params={
                        "log2_batch_size": batch_size.bit_length() - 1,
                        "lr": best * 2**step,
                        "weight_decay": weight_decay,
                    },
                    distributions=distributions,
                    user_attrs={"batch_size": batch_size},
                )
            )
    return study


def test_export_predicts_outside_the_studied_range_with_an_interval(tiny_study) -> None:
    from hpo.export import best_configuration

    exported = best_configuration(_planted_scaling_study(), load_spec("tiny"), batch_size=256)
    assert exported["source"] == "prediction" and exported["extrapolated"] is True
    low, high = exported["lr_interval"]
    assert low <= 0.04 <= high and exported["lr"] == pytest.approx(0.04, rel=0.2)
    assert exported["model_of_scaling"] in ("power law", "ridge")
    assert exported["weight_decay"] > 0
    assert set(exported["critical_batch_size"]) >= {"verdict"}
    assert "trial" not in exported and "value" not in exported


def test_export_inside_the_range_is_not_flagged_extrapolated(tiny_study) -> None:
    from hpo.export import best_configuration

    study = _planted_scaling_study()
    between = best_configuration(study, load_spec("tiny"), batch_size=48)
    assert between["extrapolated"] is False
    trained = best_configuration(study, load_spec("tiny"), batch_size=32)
    assert trained["source"] == "trial" and trained["extrapolated"] is False
    assert trained["lr_interval"][0] <= trained["lr"] <= trained["lr_interval"][1]
