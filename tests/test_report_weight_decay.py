"""The weight-decay section of the report: the best λ per batch size, whether it was searched
there, and the timescale τ_epoch = B/(η·λ·N) with the slope of log τ on log B."""

from __future__ import annotations

import math

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from hpo.report import collect, summary_markdown
from hpo.report.weight_decay import weight_decay_view
from tests.test_report import DISTRIBUTIONS as REPORT_DISTRIBUTIONS

optuna.logging.set_verbosity(optuna.logging.WARNING)
TRAIN_SIZE = 4096
DISTRIBUTIONS = {**REPORT_DISTRIBUTIONS, "weight_decay": FloatDistribution(1e-8, 1.0, log=True)}


def _trial(batch_size: int, lr: float, weight_decay: float, value: float):
    return create_trial(
        value=value,
        params={
            "log2_batch_size": int(math.log2(batch_size)),
            "lr": lr,
            "weight_decay": weight_decay,
        },
        distributions=DISTRIBUTIONS,
        user_attrs={"batch_size": batch_size},
    )


def _planted_study(tau_slope: float) -> optuna.Study:
    """At every batch size, a 3 × 3 grid of (lr, λ) around the best (lr 0.01·√(B/16),
    λ chosen so that τ_epoch = 50·(B/16)^tau_slope), the value falling off away from it."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("class_counts", {"train": {"0": TRAIN_SIZE // 2, "1": TRAIN_SIZE // 2}})
    for batch_size in (16, 32, 64, 128, 256):
        lr = 0.01 * math.sqrt(batch_size / 16)
        tau = 50 * (batch_size / 16) ** tau_slope
        weight_decay = batch_size / (lr * tau * TRAIN_SIZE)
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                value = 0.9 - 0.02 * (i * i + j * j)
                study.add_trial(_trial(batch_size, lr * 2.0**i, weight_decay * 2.0**j, value))
    return study


def test_a_constant_timescale_is_called_constant() -> None:
    study = _planted_study(0.0)
    view = weight_decay_view(study.trials, True, {"train": {"0": TRAIN_SIZE}})
    assert view.train_size == TRAIN_SIZE
    for row in view.rows:
        assert row.searched and row.n_weight_decays == 3
        assert math.isclose(row.tau_epoch, 50, rel_tol=1e-9)
        assert row.tau_low < 50 < row.tau_high
    assert view.constant is True
    assert "consistent with constant" in view.describe()


def test_a_timescale_that_grows_with_batch_size_is_not_called_constant() -> None:
    study = _planted_study(1.0)
    view = weight_decay_view(study.trials, True, {"train": {"0": TRAIN_SIZE}})
    assert math.isclose(view.slope, 1.0, rel_tol=1e-6)
    assert view.constant is False
    assert "grows with batch size: not constant" in view.describe()


def test_weight_decay_not_varied_is_said_in_the_summary() -> None:
    study = optuna.create_study(direction="maximize")
    for batch_size in (16, 32, 64):
        for lr, value in ((0.01, 0.8), (0.03, 0.85)):
            study.add_trial(_trial(batch_size, lr, 1e-4, value))
    view = weight_decay_view(study.trials, True, {})
    assert all(not row.searched for row in view.rows)
    text = summary_markdown(collect(study, "val_auc"), figure_links=False)
    assert "Weight decay was not varied" in text
    assert "| 0.0001 (fixed) | 1 |" in text


def test_a_batch_size_at_one_weight_decay_is_named() -> None:
    study = _planted_study(0.0)
    study.add_trial(_trial(512, 0.05, 1e-4, 0.85))
    study.add_trial(_trial(512, 0.1, 1e-4, 0.86))
    view = weight_decay_view(study.trials, True, {"train": {"0": TRAIN_SIZE}})
    assert "not varied at B = 512" in view.describe()
    assert view.rows[-1].searched is False


def test_a_best_weight_decay_at_the_end_of_those_tried_is_cautioned() -> None:
    """The planted optimum inside the λ tried: no caution. The best λ the lowest tried at
    every batch size (weight decay only costs): each batch size named, and the summary says
    weight decay did not help within the range; the highest at one batch size: named so."""
    inside = weight_decay_view(_planted_study(0.0).trials, True, {"train": {"0": TRAIN_SIZE}})
    assert all(row.weight_decay_end is None for row in inside.rows)
    assert "extreme weight decay" not in inside.describe()
    study = optuna.create_study(direction="maximize")
    for batch_size in (16, 32, 64):
        for weight_decay, value in ((1e-4, 0.85), (1e-3, 0.84), (1e-2, 0.80)):
            study.add_trial(_trial(batch_size, 0.01, weight_decay, value))
    view = weight_decay_view(study.trials, True, {"train": {"0": TRAIN_SIZE}})
    text = view.describe()
    assert "at B = 16 (lowest), B = 32 (lowest), B = 64 (lowest) the best trial used" in text
    assert "weight decay did not help" in text
    study.add_trial(_trial(64, 0.01, 0.1, 0.9))
    text = weight_decay_view(study.trials, True, {"train": {"0": TRAIN_SIZE}}).describe()
    assert "B = 64 (highest)" in text and "weight decay did not help" not in text
