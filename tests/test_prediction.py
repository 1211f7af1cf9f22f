"""Predictions for batch sizes never trained: planted scaling laws (power law, McCandlish's
ridge, Li et al.'s surge) are recovered, and the 80% intervals cover the planted truth at
least at their nominal rate, inside and outside the studied range."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from hpo.cli import app
from hpo.report.lr_models import fit_model, models_for
from hpo.report.prediction import (
    SPEC_ATTR,
    predict_configuration,
    stored_optimizer,
    unavailable_reason,
)
from hpo.spec import load_spec
from hpo.study import create_or_load_study

STUDIED = [8, 16, 32, 64, 128]


def power_law(batch_size: float) -> float:
    return 0.002 * batch_size**0.5  # the square-root rule


def ridge(batch_size: float) -> float:
    return 0.2 / (1 + 40 / batch_size)  # B_noise = 40


def surge(batch_size: float) -> float:
    return 2 * 0.01 / (math.sqrt(48 / batch_size) + math.sqrt(batch_size / 48))  # peak at 48


def noisy(curve: Callable[[float], float], sd: float, rng: random.Random) -> list:
    return [(b, curve(b) * 2 ** rng.gauss(0.0, sd)) for b in STUDIED]


@pytest.mark.parametrize(
    ("curve", "optimizer", "model"),
    [(power_law, "sgd", "power law"), (ridge, "sgd", "ridge"), (surge, "adamw", "surge")],
)
def test_a_planted_law_is_the_model_chosen_and_predicts_far_outside(curve, optimizer, model):
    points = noisy(curve, 0.03, random.Random(0))
    for batch_size in (256, 512, 48):
        prediction = predict_configuration(points, batch_size, optimizer=optimizer)
        assert prediction is not None and prediction.model_of_scaling == model
        assert prediction.lr == pytest.approx(curve(batch_size), rel=0.15)
        low, high = prediction.lr_interval
        assert low <= curve(batch_size) <= high
        assert prediction.extrapolated is (batch_size > max(STUDIED))


def test_the_fitted_ridge_and_surge_recover_their_b_noise() -> None:
    assert fit_model("ridge", [(b, ridge(b)) for b in STUDIED]).b_noise == pytest.approx(
        40, rel=1e-3
    )
    assert fit_model("surge", [(b, surge(b)) for b in STUDIED]).b_noise == pytest.approx(
        48, rel=1e-3
    )


def test_the_surge_predicts_the_lr_falling_past_its_peak() -> None:
    points = [(b, surge(b)) for b in STUDIED]
    at_peak = predict_configuration(points, 48, optimizer="adamw")
    beyond = predict_configuration(points, 512, optimizer="adamw")
    assert at_peak is not None and beyond is not None
    assert beyond.lr == pytest.approx(surge(512), rel=1e-3) and beyond.lr < 0.6 * at_peak.lr


def test_the_surge_is_a_candidate_for_adam_style_optimizers_only() -> None:
    assert "surge" not in models_for("sgd") and "surge" in models_for("adamw")
    points = [(b, surge(b)) for b in STUDIED]
    prediction = predict_configuration(points, 512, optimizer="sgd")
    assert prediction is not None and "surge" not in prediction.leave_one_out_error


def test_the_interval_widens_with_distance_from_the_studied_range() -> None:
    points = noisy(power_law, 0.2, random.Random(3))
    widths = []
    for batch_size in (64, 256, 1024, 8192):
        prediction = predict_configuration(points, batch_size, optimizer="sgd")
        assert prediction is not None
        widths.append(math.log2(prediction.lr_interval[1] / prediction.lr_interval[0]))
    assert widths == sorted(widths) and widths[-1] > 1.5 * widths[0]


def test_a_point_sd_floor_widens_an_interval_of_points_on_one_line() -> None:
    exact = [(b, power_law(b)) for b in STUDIED]
    bare = predict_configuration(exact, 512, optimizer="sgd")
    floored = predict_configuration(exact, 512, optimizer="sgd", point_sd=0.5)
    assert bare is not None and floored is not None
    bare_width = bare.lr_interval[1] / bare.lr_interval[0]
    assert floored.lr_interval[1] / floored.lr_interval[0] > 2 * bare_width


@pytest.mark.parametrize(
    ("curve", "optimizer"), [(power_law, "sgd"), (ridge, "sgd"), (surge, "adamw")]
)
def test_intervals_cover_the_planted_truth_at_the_nominal_rate(curve, optimizer) -> None:
    """Noisy best LRs (σ = 0.3 in log2, a factor 1.23), each batch size predicted from the
    others and 2x, 4x the largest from all: the truth inside the 80% interval in at least
    80% of cases, and the prediction within a factor 2 of it in most."""
    rng = random.Random(7)
    covered = within_2 = cases = 0
    for _ in range(40):
        points = noisy(curve, 0.3, rng)
        targets = [(b, [p for p in points if p[0] != b]) for b in STUDIED[1:-1]]
        targets += [(b, points) for b in (256, 512)]
        for batch_size, known in targets:
            prediction = predict_configuration(known, batch_size, optimizer=optimizer)
            assert prediction is not None
            truth = curve(batch_size)
            covered += prediction.lr_interval[0] <= truth <= prediction.lr_interval[1]
            within_2 += max(prediction.lr, truth) / min(prediction.lr, truth) <= 2
            cases += 1
    assert covered / cases >= 0.8
    assert within_2 / cases >= 0.8


def test_too_few_batch_sizes_give_the_reason_in_words() -> None:
    assert "no batch size has" in unavailable_reason([])
    assert "only batch size 32 has" in unavailable_reason([(32, 0.01), (32, 0.02)])
    assert "only batch sizes 16 and 32 have" in unavailable_reason([(16, 0.01), (32, 0.02)])
    assert unavailable_reason([(16, 0.01), (32, 0.02), (64, 0.03)]) is None
    assert predict_configuration([(16, 0.01), (32, 0.02)], 64) is None


def test_the_optimizer_is_read_from_the_stored_study_file() -> None:
    from hpo.storage import SPEC_ATTR as STORED

    assert SPEC_ATTR == STORED
    stored = json.dumps({"search": {"optimizer": "adamw"}})
    assert stored_optimizer({SPEC_ATTR: stored}) == "adamw"
    assert stored_optimizer({}) is None and stored_optimizer({SPEC_ATTR: "{not json"}) is None


def _planted_study(curve: Callable[[float], float], sizes: list[int]) -> optuna.Study:
    """The tiny study (B 16..64) with three LRs a factor 2 apart around ``curve`` at each of
    ``sizes``, the middle one best, weight decays varied."""
    study = create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db").study
    distributions = {
        "log2_batch_size": IntDistribution(2, 10),
        "lr": FloatDistribution(1e-5, 1.0, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    }
    for batch_size in sizes:
        for step, decay in ((-1, 1e-5), (0, 1e-4), (1, 1e-3)):
            study.add_trial(
                create_trial(
                    value=0.9 - 0.05 * step * step,
                    params={
                        "log2_batch_size": batch_size.bit_length() - 1,
                        "lr": curve(batch_size) * 2**step,
                        "weight_decay": decay,
                    },
                    distributions=distributions,
                    user_attrs={"batch_size": batch_size},
                )
            )
    return study


KEYS = {"lr", "lr_interval", "weight_decay", "weight_decay_interval", "extrapolated"}


def test_export_at_an_untrained_batch_size_writes_the_keys_to_stdout_and_file(
    tiny_study: Path,
) -> None:
    _planted_study(power_law, [16, 32, 64])
    out = CliRunner().invoke(app, ["export", "--study", "tiny", "--batch-size", "512"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.stdout)
    assert KEYS | {"model_of_scaling"} <= set(printed) and printed["extrapolated"] is True
    low, high = printed["lr_interval"]
    assert low <= power_law(512) <= high
    # every batch size's best weight decay is 1e-4: a constant λ, the simplest model that
    # fits it exactly (the timescale line does too: τ ∝ B/η), predicts it at 512
    assert printed["weight_decay"] == pytest.approx(1e-4, rel=0.05)
    assert printed["model_of_weight_decay"] == "constant weight decay"
    errors = printed["weight_decay_leave_one_batch_size_out_error_log2"]
    assert set(errors) == {"constant weight decay", "constant timescale", "timescale line"}
    assert errors["constant weight decay"] == pytest.approx(0.0, abs=1e-9)
    assert errors["constant timescale"] > 0.5  # λ fixed while η ∝ B: τ is not constant
    low, high = printed["weight_decay_interval"]
    assert low < 1e-4 < high
    written = CliRunner().invoke(
        app, ["export", "--study", "tiny", "--batch-size", "512", "--out", "p.json"]
    )
    assert written.exit_code == 0, written.output
    assert json.loads(Path("p.json").read_text()) == printed


def test_export_with_one_batch_size_or_all_pruned_exits_2_with_the_reason(
    tiny_study: Path,
) -> None:
    study = _planted_study(power_law, [32])
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--batch-size", "256"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--batch-size 256" in result.stderr and "three or more" in result.stderr
    for trial in study.get_trials():
        assert trial.state == TrialState.COMPLETE
    bad = CliRunner().invoke(app, ["export", "--study", "tiny", "--batch-size", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_export_of_an_all_pruned_study_exits_2(tiny_study: Path) -> None:
    study = create_or_load_study(load_spec("tiny"), "sqlite:///hpo.db").study
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"log2_batch_size": 5, "lr": 0.01},
            distributions={
                "log2_batch_size": IntDistribution(4, 6),
                "lr": FloatDistribution(1e-4, 1.0, log=True),
            },
            user_attrs={"batch_size": 32},
        )
    )
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--batch-size", "256"])
    assert result.exit_code == 2 and "no complete trial" in result.stderr


def test_summary_gives_the_reason_when_it_cannot_predict() -> None:
    from hpo.report.analysis import collect
    from hpo.report.markdown import summary_markdown

    study = optuna.create_study(direction="maximize")
    distributions = {
        "log2_batch_size": IntDistribution(4, 6),
        "lr": FloatDistribution(1e-4, 1.0, log=True),
    }
    for batch_size, lr, value in ((16, 0.01, 0.8), (32, 0.02, 0.85), (32, 0.05, 0.8)):
        study.add_trial(
            create_trial(
                value=value,
                params={"log2_batch_size": batch_size.bit_length() - 1, "lr": lr},
                distributions=distributions,
                user_attrs={"batch_size": batch_size},
            )
        )
    text = summary_markdown(collect(study, "val_auc"), figure_links=False)
    assert "No prediction: only batch sizes 16 and 32 have complete trials" in text


def test_the_python_export_predicts_as_the_cli_does(tiny_study: Path) -> None:
    import hpo

    _planted_study(ridge, [16, 32, 64, 128])
    exported = hpo.load("tiny", storage="sqlite:///hpo.db").export(batch_size=1024)
    assert KEYS | {"model_of_scaling"} <= set(exported) and exported["extrapolated"] is True
    assert exported["source"] == "prediction" and exported["batch_size"] == 1024


@pytest.mark.parametrize(("curve", "optimizer"), [(power_law, "sgd"), (surge, "adamw")])
def test_three_batch_sizes_cover_the_truth_beyond_them(curve, optimizer) -> None:
    """The fewest batch sizes a prediction is made from: each leave-one-out fit is exact
    through two points, so the choice of model is weak and the interval spans them all."""
    rng = random.Random(11)
    covered = cases = 0
    for _ in range(40):
        points = [(b, curve(b) * 2 ** rng.gauss(0.0, 0.3)) for b in (16, 32, 64)]
        for batch_size in (128, 256):
            prediction = predict_configuration(points, batch_size, optimizer=optimizer)
            assert prediction is not None and prediction.extrapolated
            low, high = prediction.lr_interval
            covered += low <= curve(batch_size) <= high
            cases += 1
    assert covered / cases >= 0.8


def test_a_study_without_weight_decay_predicts_none_and_says_so() -> None:
    from hpo.report.weight_decay import WeightDecayRow, WeightDecayView

    rows = tuple(WeightDecayRow(b, power_law(b), 0.0, 1, None, None, None) for b in STUDIED)
    view = WeightDecayView(rows, None, None, None, None)
    prediction = predict_configuration([(r.batch_size, r.lr) for r in rows], 512, view, "sgd")
    assert prediction is not None and prediction.weight_decay == 0.0
    assert prediction.weight_decay_interval is None
    assert prediction.weight_decay_note == "every complete trial trained without weight decay"


def test_a_known_point_sd_takes_the_normal_quantile_not_students_t() -> None:
    """Points exactly on a line (no residual, no leave-one-out error) with a point_sd floor:
    σ is known, not estimated, so the half-width is z(0.9)·σ·√(1 + leverage), not t with
    n − 2 = 3 degrees of freedom (1.64 against 1.28)."""
    from scipy import stats

    exact = [(b, power_law(b)) for b in STUDIED]
    prediction = predict_configuration(exact, 512, optimizer="sgd", point_sd=0.5)
    assert prediction is not None and prediction.model_of_scaling == "power law"
    leverage = fit_model("power law", exact).leverage(math.log2(512))
    half = math.log2(prediction.lr_interval[1] / prediction.lr_interval[0]) / 2
    assert half == pytest.approx(stats.norm.ppf(0.9) * 0.5 * math.sqrt(1 + leverage), rel=1e-3)


@pytest.mark.parametrize(
    ("curve", "optimizer"), [(power_law, "sgd"), (ridge, "sgd"), (surge, "adamw")]
)
def test_best_lrs_located_only_to_the_lrs_tried_are_covered_with_a_point_sd_floor(
    curve, optimizer
) -> None:
    """Each best LR known only as the nearest of LRs tried two octaves apart (an error
    uniform over ±1 octave, σ = 2/√12, passed as point_sd): the intervals with the normal
    quantile still cover the planted truth at least at their nominal rate."""
    rng = random.Random(5)
    covered = cases = 0
    for _ in range(20):
        offset = rng.uniform(0.0, 2.0)
        points = [
            (b, 2.0 ** (2 * round((math.log2(curve(b)) - offset) / 2) + offset)) for b in STUDIED
        ]
        targets = [(b, [p for p in points if p[0] != b]) for b in STUDIED[1:-1]]
        targets += [(b, points) for b in (256, 512)]
        for batch_size, known in targets:
            prediction = predict_configuration(
                known, batch_size, optimizer=optimizer, point_sd=2 / math.sqrt(12)
            )
            assert prediction is not None
            low, high = prediction.lr_interval
            covered += low <= curve(batch_size) <= high
            cases += 1
    assert covered / cases >= 0.8


def _view(weight_decay: float, epochs: float | None):
    """A view over STUDIED with the best λ ∝ B at LR power_law (a constant-τ study) and its
    τ_epoch on N = 2048 examples; ``epochs``: the epochs each trial trained."""
    from hpo.report.weight_decay import WeightDecayRow, WeightDecayView

    rows = []
    for b in STUDIED:
        decay = weight_decay * b / 8
        tau = b / (power_law(b) * decay * 2048)
        rows.append(WeightDecayRow(b, power_law(b), decay, 3, tau, tau / 2, tau * 2, 1.0, 1.0))
    return WeightDecayView(tuple(rows), 2048, None, None, None, epochs_trained=epochs)


def test_a_weight_decay_the_trials_could_not_tell_apart_is_said_so_with_the_prediction() -> None:
    """τ_epoch over 10× the epochs trained at every batch size the model of λ is fitted
    through: λ is still predicted from it (here the timescale line, τ ∝ B^-½), and the note says the trials there barely
    felt weight decay; none where weight decay acted or the epochs are unknown."""
    points = [(b, power_law(b)) for b in STUDIED]
    # λ = 1e-3·B/8 at lr 0.002·√B: τ_epoch = 8/(2048 · 0.002 · 1e-3 · √B) ≈ 690 epochs at B = 8
    slow = predict_configuration(points, 512, _view(1e-3, 2.0), "adamw")
    assert slow is not None and slow.weight_decay == pytest.approx(1e-3 * 512 / 8, rel=1e-6)
    assert slow.model_of_weight_decay == "timescale line"
    assert slow.weight_decay_interval is not None
    assert slow.weight_decay_note is not None
    assert "barely acted at every batch size of the 5" in slow.weight_decay_note
    assert "over 10× the 2 epochs" in slow.weight_decay_note
    # λ = 1 · B/8: τ ≈ 0.7 epochs, well within the 2 trained
    assert predict_configuration(points, 512, _view(1.0, 2.0), "adamw").weight_decay_note is None
    assert predict_configuration(points, 512, _view(1e-3, None), "adamw").weight_decay_note is None


def test_the_summary_names_the_weight_decay_model_and_the_errors_that_chose_it() -> None:
    from hpo.report.markdown import _decay_note

    points = [(b, power_law(b)) for b in STUDIED]
    slow = predict_configuration(points, 512, _view(1e-3, 2.0), "adamw")
    text = _decay_note(slow)
    assert text.startswith(" Weight decay from the timescale line model")
    assert "leave-one-batch-size-out error in log2 λ: constant weight decay" in text
    assert "; weight decay barely acted at every batch size" in text
    acted = predict_configuration(points, 512, _view(1.0, 2.0), "adamw")
    assert _decay_note(acted).endswith("the smallest chosen).")


def test_a_prediction_where_the_lowest_weight_decay_won_everywhere_says_so() -> None:
    import dataclasses

    points = [(b, power_law(b)) for b in STUDIED]
    view = _view(1.0, 2.0)
    lowest = dataclasses.replace(
        view, rows=tuple(dataclasses.replace(r, weight_decay_end="lowest") for r in view.rows)
    )
    note = predict_configuration(points, 512, lowest, "adamw").weight_decay_note
    assert note is not None and note.startswith("the lowest weight decay tried won")
    one = dataclasses.replace(
        lowest, rows=(dataclasses.replace(lowest.rows[0], weight_decay_end=None), *lowest.rows[1:])
    )
    assert predict_configuration(points, 512, one, "adamw").weight_decay_note is None
