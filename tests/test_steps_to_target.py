"""The critical batch size measured directly (steps to a target, S(B) = S_min·(1 + B_crit/B))
and the words that compare it with the measured B_simple, on planted trials."""

from __future__ import annotations

import json
import math
import random
import statistics

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo.report.critical_batch import describe_steps_to_target, direct_verdict
from hpo.report.noise_scale import MeasuredNoiseScale
from hpo.report.steps_to_target import (
    StepsToTarget,
    batch_size_steps,
    common_target,
    crossing,
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


def test_steps_to_reach_interpolates_between_reports_on_log_updates() -> None:
    curve = [(10.0, 0.5), (20.0, 0.7), (40.0, 0.9)]
    assert steps_to_reach(curve, 0.8, maximize=True) == pytest.approx(20 * 2**0.5)
    assert steps_to_reach(curve, 0.95, maximize=True) is None
    assert steps_to_reach([(10.0, 0.4), (40.0, 0.2)], 0.3, maximize=False) == pytest.approx(20.0)


def test_a_target_passed_by_the_first_report_is_only_an_upper_bound() -> None:
    curve = [(100.0, 0.8), (200.0, 0.9)]
    assert crossing(curve, 0.7, maximize=True) == (100.0, False)
    assert crossing(curve, 0.85, maximize=True) == (pytest.approx(100 * 2**0.5), True)
    # a batch size's steps: the fewest exact crossings, unless a bound could be fewer
    assert batch_size_steps([(150.0, True), (200.0, False), None]) == (150.0, True)
    assert batch_size_steps([(150.0, True), (100.0, False)]) == (100.0, False)
    assert batch_size_steps([None, None]) is None


def test_an_upper_bound_pulls_the_fit_only_where_the_fit_lies_above_it() -> None:
    points = [(b, 100 * (1 + 40 / b)) for b in (32, 64, 128, 256)]
    assert fit_steps(points, [(8, 1000.0)])[1] == pytest.approx(40.0, rel=1e-3)  # 600 < 1000
    assert fit_steps(points, [(8, 300.0)])[1] < 35  # 600 > 300: the bound pulls B_crit down


def test_fit_recovers_a_planted_critical_batch_size() -> None:
    s_min, b_crit = fit_steps([(b, 100 * (1 + 40 / b)) for b in BATCH_SIZES])
    assert s_min == pytest.approx(100.0, rel=1e-4)
    assert b_crit == pytest.approx(40.0, rel=1e-4)
    assert fit_steps([(b, 100.0) for b in BATCH_SIZES])[1] == 0.0  # flat: no B_crit in range


def test_steps_that_halve_with_every_doubling_put_b_crit_above_the_range() -> None:
    assert fit_steps([(b, 1e4 / b) for b in BATCH_SIZES])[1] == math.inf


@pytest.mark.parametrize("b_crit", [20.0, 60.0])
def test_study_b_crit_and_its_bootstrap_interval_contain_the_planted_value(b_crit) -> None:
    measured = measure_steps_to_target(
        _planted(b_crit, scatter=0.15), maximize=True, batch_size_of=trial_batch_size
    )
    # the best value every batch size reaches by 3/4 of its budget (6 of 8 reports)
    assert measured.target == pytest.approx(0.8 * 3 * 0.75, rel=0.2)
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
    assert _steps_to_target(above) == {
        "value": None,
        "interval": [300.0, None],
        "lower_bound": 300.0,
    }


def test_every_estimate_of_the_export_has_a_value_and_an_interval_in_json_and_toml() -> None:
    # The export's keys are the same whatever the intervals: a one-sided interval keeps its
    # missing end as null in JSON and inf in TOML (which has no null), not another key.
    import tomllib

    from hpo.export import _steps_to_target, _value_interval, dumps_configuration

    above = StepsToTarget(0.8, (), 0.0, math.inf, 300.0, None)
    exported = {
        "critical_batch_size": {
            "steps_to_target": _steps_to_target(above),
            "b_simple": _value_interval(120.0, (45.0, math.inf)),
            "ridge_b_noise": _value_interval(60.0, (20.0, 180.0)),
            "verdict": "cannot tell",
        }
    }
    found = json.loads(dumps_configuration(exported, "json"))["critical_batch_size"]
    toml = tomllib.loads(dumps_configuration(exported, "toml"))["critical_batch_size"]
    for name in ("steps_to_target", "b_simple", "ridge_b_noise"):
        assert {"value", "interval"} <= set(found[name]), name
    assert found["steps_to_target"]["value"] is None
    assert found["b_simple"] == {"value": 120.0, "interval": [45.0, None], "lower_bound": 45.0}
    assert found["ridge_b_noise"] == {"value": 60.0, "interval": [20.0, 180.0]}
    assert toml["b_simple"]["interval"] == [45.0, math.inf]
    assert toml["steps_to_target"] == {"interval": [300.0, math.inf], "lower_bound": 300.0}


def test_the_report_carries_the_direct_measurement() -> None:
    from hpo.report.analysis import collect
    from hpo.report.markdown import summary_markdown

    study = optuna.create_study(direction="maximize")
    study.add_trials(_planted(40.0, scatter=0.1))
    data = collect(study, "val_auc")
    assert data.steps_to_target is not None and data.steps_to_target.b_crit is not None
    assert "Measured directly: the updates needed to reach val_auc" in summary_markdown(data)


def test_the_target_is_what_every_batch_size_reaches_by_three_quarters_of_its_budget():
    rising = [(100.0 * r, 0.5 + 0.05 * r) for r in range(1, 9)]  # 0.55 … 0.9
    plateau = [(10.0 * r, v) for r, v in enumerate([0.6, 0.7, 0.75, 0.78, 0.8, 0.8, 0.8, 0.8], 1)]
    # rising reaches 0.8 at its 6th report; plateau reaches 0.8 only at its 5th and stays
    assert common_target({16: [rising], 256: [plateau]}, maximize=True) == pytest.approx(0.8)
    late = [(10.0 * r, v) for r, v in enumerate([0.6, 0.7, 0.72, 0.74, 0.75, 0.76, 0.8, 0.85], 1)]
    # a best value reached only in the last quarter does not set the target
    assert common_target({16: [rising], 256: [late]}, maximize=True) == pytest.approx(0.76)


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


def _learning_curves(rng: random.Random, b_crit: float, batch_sizes, per_batch_size: int = 2):
    """A planted study trained in epochs: the trial at B makes ``examples / B`` updates and
    reports 8 times; its val metric 0.5 + 0.45·(1 − exp(−u/τ)) plus noise, with τ =
    S(B) = 50·(1 + b_crit/B) stretched by a random LR miss (≥ 1) and seed (so the steps to
    any value are ∝ S(B): B_crit is ``b_crit`` at every target)."""
    examples, reports, trials = 150.0 * (max(batch_sizes) + b_crit), 8, []
    for batch_size in batch_sizes:
        updates = examples / batch_size
        at = [updates * (r + 1) / reports for r in range(reports)]
        for _ in range(per_batch_size):
            miss = math.exp(abs(rng.gauss(0, 0.3)) + rng.gauss(0, 0.1))
            tau = 50 * (1 + b_crit / batch_size) * miss
            values = {
                r + 1: 0.5 + 0.45 * (1 - math.exp(-u / tau)) + rng.gauss(0, 0.003)
                for r, u in enumerate(at)
            }
            trials.append(
                create_trial(
                    state=TrialState.COMPLETE,
                    value=values[reports],
                    user_attrs={
                        "batch_size": batch_size,
                        "n_updates": updates,
                        "updates_at_report": at,
                    },
                    intermediate_values=values,
                )  # fmt: skip
            )
    return trials


def _draws(b_crit: float, batch_sizes, draws: int, per_batch_size: int = 2):
    rng = random.Random(7)
    for draw in range(draws):
        trials = _learning_curves(rng, b_crit, batch_sizes, per_batch_size)
        yield measure_steps_to_target(trials, True, trial_batch_size, resamples=200, seed=draw)


@pytest.mark.parametrize(("b_crit", "per_batch_size"), [(24.0, 2), (80.0, 1)])
def test_the_interval_covers_a_critical_batch_size_inside_the_range(b_crit, per_batch_size):
    """Repeated planted studies (8…256, B_crit inside): the 90% interval is two-sided and
    covers the planted B_crit in about 90% of them, though the smallest batch sizes pass
    the target before their first report (an upper bound only) and a batch size may have
    one trial."""
    measured = list(_draws(b_crit, [8, 16, 32, 64, 128, 256], 60, per_batch_size))
    two_sided = [m for m in measured if m.low is not None and m.high is not None]
    covered = sum(m.low <= b_crit <= m.high for m in two_sided)
    assert len(two_sided) >= 0.9 * len(measured)
    assert covered >= 0.8 * len(measured)
    assert statistics.median(m.b_crit for m in measured) == pytest.approx(b_crit, rel=0.25)


def test_far_above_the_range_the_interval_is_one_sided_and_still_covers() -> None:
    measured = list(_draws(1e5, [8, 16, 32, 64, 128, 256], 40))
    assert sum(m.high is None for m in measured) >= 0.85 * len(measured)
    assert sum(m.low <= 1e5 <= (m.high or math.inf) for m in measured) >= 0.85 * len(measured)


def test_a_batch_size_known_only_from_above_reads_as_a_bound() -> None:
    direct = StepsToTarget(0.8, ((16, 128.0), (64, 60.0), (256, 40.0)), 35.0, 50.0, 30.0, 90.0,
                           bounds=(16,))  # fmt: skip
    text = describe_steps_to_target(direct, _measured(50, 30, 90))
    assert "B = 16: ≤ 128" in text and "B = 64: 60" in text and "upper bounds" in text


def test_two_batch_sizes_give_a_value_but_say_why_there_is_no_interval() -> None:
    measured = measure_steps_to_target(
        [_trial(16, 300.0), _trial(64, 120.0)], maximize=True, batch_size_of=trial_batch_size
    )
    assert measured.b_crit is not None and measured.interval is None
    text = describe_steps_to_target(measured, _measured(50, 30, 90))
    assert "(no interval: an interval needs three or more batch sizes" in text
