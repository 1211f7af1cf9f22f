"""hpo.report.decay_models: the model of the best weight decay across batch sizes, chosen by
leave-one-batch-size-out error, and its interval, on planted laws."""

from __future__ import annotations

import math
import random

import pytest

from hpo.report.decay_models import DECAY_MODELS, DecayPoint, leave_one_out_errors, predict_decay

BATCH_SIZES = [8, 16, 32, 64, 128, 256]


def _points(law: str, noise: float, draw: random.Random) -> list[DecayPoint]:
    """Best (η, λ) per batch size under a planted law, log2 λ scattered by ``noise``."""
    points = []
    for b in BATCH_SIZES:
        x = math.log2(b)
        log2_lr = -10 + 0.5 * (x - 3) + draw.gauss(0, 0.3)
        if law == "constant weight decay":
            log2_decay = -3.0
        elif law == "constant timescale":  # log2 B/(ηλ) = 14
            log2_decay = x - log2_lr - 14
        else:  # the timescale grows as B^1.5
            log2_decay = x - log2_lr - (10 + 1.5 * x)
        points.append(DecayPoint(x, log2_lr, log2_decay + draw.gauss(0, noise)))
    return points


@pytest.mark.parametrize("law", DECAY_MODELS)
def test_a_planted_law_is_the_model_chosen(law: str) -> None:
    draw = random.Random(3)
    chosen = []
    for _ in range(20):
        errors = leave_one_out_errors(_points(law, 0.3, draw))
        chosen.append(min(errors, key=lambda name: errors[name]))
    assert chosen.count(law) >= 14, chosen


def test_a_line_through_values_a_decade_apart_is_not_carried_past_them() -> None:
    """Each batch size's best λ is one of the two values its search tried, a decade apart,
    alternating with B, the LR near constant: the line through them would extrapolate a
    decade past both; the model chosen stays between the values found."""
    decays = [1.0, 10.0, 1.0, 10.0, 1.0]
    points = [
        DecayPoint(math.log2(b), math.log2(1e-3), math.log2(d))
        for b, d in zip([16, 32, 64, 128, 256], decays, strict=True)
    ]
    for batch_size in (4, 8, 1024):
        x = math.log2(batch_size)
        prediction = predict_decay(
            points, x, math.log2(1e-3), floors=(0.5, 0.8), lr_half=0.5, confidence=0.8
        )
        assert prediction.model != "timescale line"
        assert 0.0 <= prediction.log2_decay <= math.log2(10.0)
        assert prediction.low < prediction.log2_decay < prediction.high


@pytest.mark.parametrize("law", DECAY_MODELS)
def test_intervals_cover_the_planted_weight_decay_at_about_the_nominal_rate(law: str) -> None:
    """80% intervals, each batch size left out and predicted at its own LR from the rest,
    over many draws of the noise: coverage near 80%, not far below (too narrow) nor 100%
    from a needlessly wide interval."""
    draw = random.Random(11)
    covered = total = 0
    for _ in range(150):
        points = _points(law, 0.5, draw)
        truth = _points(law, 0.0, random.Random(0))  # same law, no noise on λ
        for index, held in enumerate(points):
            rest = points[:index] + points[index + 1 :]
            exact = truth[index].log2_decay + (
                0.0 if law == "constant weight decay" else truth[index].log2_lr - held.log2_lr
            )
            prediction = predict_decay(
                rest, held.x, held.log2_lr, floors=(0.0, 0.0), lr_half=0.0, confidence=0.8
            )
            covered += prediction.low <= exact <= prediction.high
            total += 1
    assert 0.75 <= covered / total <= 0.99, covered / total


def test_a_tie_goes_to_the_simpler_model() -> None:
    """λ and η the same at every batch size: a constant λ and the timescale line (τ ∝ B)
    both predict each point exactly; the one named is the simpler."""
    points = [DecayPoint(x, -10.0, -3.0) for x in (3.0, 4.0, 5.0)]
    prediction = predict_decay(points, 6.0, -10.0, floors=(0.0, 0.0), lr_half=0.0, confidence=0.8)
    assert prediction.model == "constant weight decay"
    assert prediction.log2_decay == pytest.approx(-3.0)
