"""The critical batch size measured directly (steps to a target, S(B) = S_min·(1 + B_crit/B))
and the words that compare it with the measured B_simple, on planted trials."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo.report.critical_batch import describe_steps_to_target, direct_verdict
from hpo.report.noise_scale import MeasuredNoiseScale
from hpo.report.steps_to_target import (
    StepsToTarget,
    fit_steps,
    measure_steps_to_target,
    steps_to_reach,
)
from hpo.report.summary import trial_batch_size

BATCH_SIZES = (8, 16, 32, 64, 128, 256)


def _trial(batch_size: int, steps_to_target: float, reports: int = 8, number: int = 0):
    """A trial whose value rises linearly and crosses 0.8 at ``steps_to_target`` updates;
    it trains 3× that long."""
    updates = 3 * steps_to_target
    values = {r: 0.8 * (updates * r / reports) / steps_to_target for r in range(1, reports + 1)}
    return create_trial(
        state=TrialState.COMPLETE,
        value=max(values.values()),
        params={"lr": 0.1},
        distributions={"lr": FloatDistribution(1e-3, 1.0, log=True)},
        user_attrs={"batch_size": batch_size, "n_updates": updates},
        intermediate_values=values,
    )


def _planted(b_crit: float, s_min: float = 100.0, scatter: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    trials = []
    for batch_size in BATCH_SIZES:
        for _ in range(3):
            steps = s_min * (1 + b_crit / batch_size) * math.exp(rng.gauss(0, scatter))
            trials.append(_trial(batch_size, steps))
    return trials


def test_steps_to_reach_interpolates_between_reports() -> None:
    curve = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.9)]
    assert steps_to_reach(curve, 0.8, maximize=True) == pytest.approx(25.0)
    assert steps_to_reach(curve, 0.95, maximize=True) is None
    assert steps_to_reach([(10.0, 0.4), (20.0, 0.2)], 0.3, maximize=False) == pytest.approx(15.0)


def test_fit_recovers_a_planted_critical_batch_size() -> None:
    s_min, b_crit = fit_steps([(b, 100 * (1 + 40 / b)) for b in BATCH_SIZES])
    assert s_min == pytest.approx(100.0)
    assert b_crit == pytest.approx(40.0)


def test_steps_that_halve_with_every_doubling_put_b_crit_above_the_range() -> None:
    assert fit_steps([(b, 1e4 / b) for b in BATCH_SIZES])[1] == math.inf


@pytest.mark.parametrize("b_crit", [20.0, 60.0])
def test_study_b_crit_and_its_bootstrap_interval_contain_the_planted_value(b_crit) -> None:
    measured = measure_steps_to_target(
        _planted(b_crit, scatter=0.15), maximize=True, batch_size_of=trial_batch_size
    )
    assert measured.target == pytest.approx(0.8 * 3, rel=0.2)  # the weakest B's best value
    assert measured.low <= b_crit <= measured.high
    assert measured.b_crit == pytest.approx(b_crit, rel=0.5)


def test_one_batch_size_cannot_be_fitted_and_says_why() -> None:
    measured = measure_steps_to_target(
        [_trial(32, 100.0)], maximize=True, batch_size_of=trial_batch_size
    )
    assert measured.b_crit is None and "two or more batch sizes" in measured.reason


def _measured(value: float, low: float, high: float | None) -> MeasuredNoiseScale:
    return MeasuredNoiseScale(value, value, value, 5, value, low, high, 40)


def _direct(b_crit: float, low: float, high: float | None) -> StepsToTarget:
    return StepsToTarget(0.8, ((8, 600.0), (128, 120.0)), 100.0, b_crit, low, high)


def test_overlapping_intervals_agree_and_the_words_say_so() -> None:
    direct, measured = _direct(40, 25, 70), _measured(50, 30, 90)
    assert direct_verdict(direct, measured).word == "agree"
    text = describe_steps_to_target(direct, measured, "val_auc")
    assert "It agrees with the measured B_simple" in text and "about 40" in text
    assert "val_auc 0.8" in text and "B = 8: 600" in text


def test_intervals_apart_disagree_and_the_words_say_so() -> None:
    direct, measured = _direct(40, 25, 70), _measured(900, 400, 2000)
    assert direct_verdict(direct, measured).word == "disagree"
    text = describe_steps_to_target(direct, measured)
    assert "It disagrees" in text and "It agrees" not in text


def test_an_unbounded_interval_cannot_tell_and_says_what_would_settle_it() -> None:
    direct, measured = _direct(40, 25, None), _measured(50, 30, 90)
    said = direct_verdict(direct, measured)
    assert said.word == "cannot tell"
    text = describe_steps_to_target(direct, measured)
    assert "cannot be told" in text and "more trials at each batch size" in text


def test_no_b_simple_interval_cannot_tell() -> None:
    said = direct_verdict(_direct(40, 25, 70), MeasuredNoiseScale(None, None, None, 0))
    assert said.word == "cannot tell" and "B_simple has no interval" in said.reason


def test_export_puts_the_direct_measurement_beside_b_simple() -> None:
    from hpo.export import _steps_to_target

    assert _steps_to_target(_direct(40, 25, 70)) == {"value": 40, "interval": [25, 70]}
    above = StepsToTarget(0.8, (), 0.0, math.inf, 300.0, None)
    assert _steps_to_target(above) == {"lower_bound": 300.0}


def test_the_report_carries_the_direct_measurement() -> None:
    from hpo.report.analysis import collect
    from hpo.report.markdown import summary_markdown

    study = optuna.create_study(direction="maximize")
    study.add_trials(_planted(40.0, scatter=0.1))
    data = collect(study, "val_auc")
    assert data.steps_to_target is not None and data.steps_to_target.b_crit is not None
    assert "Measured directly: the updates needed to reach val_auc" in summary_markdown(data)


def test_the_updates_stored_at_each_report_are_the_clock() -> None:
    from hpo.report.steps_to_target import trial_curve

    trial = _trial(32, 100.0, reports=3)
    assert [u for u, _ in trial_curve(trial)] == pytest.approx([100.0, 200.0, 300.0])
    timed = create_trial(
        state=TrialState.COMPLETE,
        value=0.9,
        user_attrs={"batch_size": 32, "n_updates": 300, "updates_at_report": [50, 120, 300]},
        intermediate_values={1: 0.5, 2: 0.7, 3: 0.9},
    )
    assert [u for u, _ in trial_curve(timed)] == [50.0, 120.0, 300.0]


def test_a_batch_size_with_only_a_lower_bound_is_called_one() -> None:
    from hpo.report.critical_batch import describe_measured
    from hpo.report.noise_scale import BatchSizeNoiseScale

    row = BatchSizeNoiseScale(16, None, 290.0, None, 2, 32)
    measured = MeasuredNoiseScale(50.0, 40.0, 60.0, 3, 50.0, 30.0, 90.0, 40, (row,))
    assert "B = 16: ≥ 290 (only a lower bound" in describe_measured(measured)
