"""The critical batch size in the report: the LR ridge fit and the measured B_simple."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.trial import FrozenTrial, create_trial

from hpo.report import batch_size_table, summarize
from hpo.report.noise_scale import (
    MeasuredNoiseScale,
    describe_critical_batch_size,
    fit_lr_ridge,
    measured_b_simple,
)
from tests.test_report import DISTRIBUTIONS

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _planted(b_noise: float, eps_max: float, scatter: float, seed: int = 0):
    rng = random.Random(seed)
    return [
        (b, eps_max / (1 + b_noise / b) * math.exp(rng.gauss(0, scatter)))
        for b in (16, 32, 64, 128, 256, 512, 1024)
        for _ in range(3)
    ]


@pytest.mark.parametrize("b_noise", [60.0, 200.0])
def test_ridge_recovers_a_planted_b_noise_within_its_interval(b_noise: float) -> None:
    fit = fit_lr_ridge(_planted(b_noise, eps_max=0.5, scatter=0.15))
    assert fit.b_noise_low <= b_noise <= fit.b_noise_high
    assert fit.b_noise == pytest.approx(b_noise, rel=0.5)
    assert fit.eps_max == pytest.approx(0.5, rel=0.3)
    assert fit.lr_at(1e9) == pytest.approx(fit.eps_max, rel=1e-6)


def test_ridge_needs_two_batch_sizes() -> None:
    assert fit_lr_ridge([(32, 0.1), (32, 0.2)]).b_noise is None
    assert fit_lr_ridge([(32, 0.1), (64, 0.2)]).b_noise_low is None  # no interval from 2


def test_measured_b_simple_takes_the_best_complete_trials() -> None:
    study = optuna.create_study(direction="maximize")
    for value, b_simple in [(0.9, 100.0), (0.8, 120.0), (0.7, 140.0), (0.1, 9999.0)]:
        trial = study.ask()
        trial.set_user_attr("b_simple", b_simple)
        study.tell(trial, value)
    study.tell(study.ask(), 0.95)  # no b_simple recorded: ignored
    measured = measured_b_simple(study, top_k=3)
    assert (measured.median, measured.low, measured.high, measured.n_trials) == (
        120.0,
        110.0,
        130.0,
        3,
    )


def test_summary_names_the_critical_batch_size_and_whether_they_agree() -> None:
    fit = fit_lr_ridge(_planted(200.0, eps_max=0.5, scatter=0.1))
    agree = describe_critical_batch_size(fit, MeasuredNoiseScale(180.0, 150.0, 230.0, 5))
    assert "critical batch size is about 180" in agree and "agree." in agree
    apart = describe_critical_batch_size(fit, MeasuredNoiseScale(5.0, 4.0, 6.0, 5))
    assert "disagree" in apart
    nothing = describe_critical_batch_size(
        fit_lr_ridge([]), MeasuredNoiseScale(None, None, None, 0)
    )
    assert "critical batch size" in nothing


def test_summary_markdown_names_the_critical_batch_size() -> None:
    from hpo.report import collect, summary_markdown
    from tests.test_report import scaling_study

    text = summary_markdown(collect(scaling_study(1.0), "val_auc"))
    assert "critical batch size is about" in text and "B_noise" in text


def _trial(batch_size: int, value: float, b_simple: float | None, curve=None) -> FrozenTrial:
    """A complete trial as ``hpo`` stores it, with its B_simple (last and per epoch)."""
    attrs: dict[str, object] = {"batch_size": batch_size}
    if b_simple is not None:
        attrs["b_simple"] = b_simple
        attrs["b_simple_per_epoch"] = list(curve or [b_simple])
    return create_trial(
        value=value,
        params={"log2_batch_size": int(math.log2(batch_size)), "lr": 0.01, "weight_decay": 1e-4},
        distributions=DISTRIBUTIONS,
        user_attrs=attrs,
        intermediate_values={1: value},
    )


def _study_with_b_simple() -> optuna.Study:
    """B = 32: the best trial measured 150.2, a worse one 900; B = 64: one trial, 1,234.4;
    B = 128: a complete trial that recorded no B_simple."""
    study = optuna.create_study(direction="maximize", study_name="noise")
    for batch_size, value, b_simple in [
        (32, 0.9, 150.2),
        (32, 0.7, 900.0),
        (64, 0.8, 1234.4),
        (128, 0.6, None),
    ]:
        study.add_trial(_trial(batch_size, value, b_simple))
    return study


def test_batch_size_table_b_simple_is_the_best_trials_last_value() -> None:
    headers, rows = batch_size_table(summarize(_study_with_b_simple(), "val_auc"))
    column = headers.index("b_simple")
    assert [(row[0], row[column], row[headers.index("trial")]) for row in rows] == [
        ("32", "150", "0"),
        ("64", "1,234", "2"),
        ("128", "-", "3"),
    ]


def test_status_prints_the_b_simple_column(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo.cli.app import console
    from hpo.cli.render import print_summary

    monkeypatch.setattr(console, "width", 160)  # wide enough that no header wraps
    with console.capture() as captured:
        print_summary(_study_with_b_simple(), "val_auc")
    table = captured.get()
    assert "b_simple" in table
    assert "1,234" in table and "150" in table
