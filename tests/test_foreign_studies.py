"""Stored data hpo did not write (names with markup or HTML, batch sizes that are not
integers): status and report render it as plain text, or skip the trial with a warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution, IntDistribution
from typer.testing import CliRunner

from hpo.cli import app
from hpo.report import trial_batch_size
from hpo.report.markdown import _plain

odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@settings(derandomize=True)
@given(value=odd_values)
def test_any_stored_batch_size_is_a_batch_size_or_skipped(value) -> None:
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"batch_size": value})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch_size = trial_batch_size(trial)
    assert batch_size is None or (isinstance(batch_size, int) and batch_size >= 1)


@settings(derandomize=True)
@given(name=st.text(max_size=80))
def test_a_name_in_markdown_is_plain_text(name: str) -> None:
    shown = _plain(name)
    assert "<" not in shown and ">" not in shown and "\n" not in shown
    for ch in "`*_[]#|!":
        assert shown.count(ch) == shown.count("\\" + ch)


def test_report_of_a_foreign_study_renders_it_as_text(tmp_path: Path) -> None:
    name = "<script>alert(1)</script> [bold red]x[/] *_"
    url = f"sqlite:///{tmp_path / 'foreign.db'}"
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    distributions = {
        "lr": FloatDistribution(1e-4, 1, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        "log2_batch_size": IntDistribution(4, 6),
    }
    for number, batch in enumerate(["sixty-four", 32.0, 64, True, 16, None, 2.5, 64, 32, 16]):
        params = {"lr": 10 ** (-3 + number / 5), "weight_decay": 1e-4, "log2_batch_size": 5}
        study.add_trial(
            optuna.trial.create_trial(
                value=0.5 + number / 100, params=params, distributions=distributions,
                user_attrs={"batch_size": batch},
            )
        )  # fmt: skip
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["report", "--study", name, "--storage", url, "--out", str(out), "--no-attach"]
    )
    assert result.exit_code == 0, result.output
    summary = (out / "summary.md").read_text()
    assert "<script>" not in summary and "&lt;script&gt;" in summary
