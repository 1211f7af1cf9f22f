"""``hpo report`` on extreme or foreign data: one line or a whole report, never a traceback."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from typer.testing import CliRunner

from hpo.cli import app
from hpo.report.noise_scale import positive_b_simple
from tests.test_report import add_trial


@pytest.mark.parametrize("value", [1e20, 1e300, 10**400, float("inf"), -1.0, 0, True, "5", None])
def test_an_astronomical_or_junk_noise_scale_is_no_measurement(value: object) -> None:
    assert positive_b_simple(value) is None
    assert positive_b_simple(512.0) == 512.0


def test_a_report_with_extreme_noise_scales_is_written_whole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(study_name="n", storage=url, direction="maximize")
    for index, batch_size in enumerate((16, 32, 64) * 3):
        extreme = {"b_simple": 1e25, "b_simple_per_epoch": [1e20, 1e300, 7.0]}
        add_trial(study, batch_size, 0.01 * (1 + index % 3), 0.8 + 0.01 * index, user_attrs=extreme)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["report", "--study", "n", "--storage", url, "--out", str(out), "--no-attach"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "summary.md").exists() and "Traceback" not in result.output


def test_a_multi_objective_study_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(study_name="m", storage=url, directions=["minimize", "maximize"])
    for x in range(3):
        study.add_trial(
            create_trial(
                values=[x, -x], params={"x": float(x)}, distributions={"x": FloatDistribution(0, 9)}
            )
        )
    result = CliRunner().invoke(
        app, ["report", "--study", "m", "--storage", url, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    assert "has 2 objectives" in result.output and len(result.output.strip().splitlines()) == 1
