"""Models of the best weight decay λ against batch size, for a λ where no trial ran
(``predict_decay`` → ``DecayPrediction``).

Each batch size whose weight decay was searched gives one point, its best trial's (η, λ),
with x = log2 B and the timescale's log, t = log2(B/(η·λ)) = log2(τ_epoch·N) (Wang &
Aitchison 2024: AdamW's weights average the last τ_iter = 1/(η·λ) updates, τ_epoch = τ_iter·B/N
epochs; N, the training set size, cancels and need not be known). The candidates:

- ``constant weight decay``: λ the same at every batch size (the usual practice of keeping
  λ when B changes): log2 λ = a, one parameter;
- ``constant timescale``: τ_epoch the same at every batch size (Wang & Aitchison's finding
  across model and data size): t = a, one parameter, so λ = B/(η·τ·N) moves with B and with
  the predicted LR η;
- ``timescale line``: t = a + s·x, two parameters (s = 0 is the constant timescale).

The one with the smallest leave-one-batch-size-out error (log2 λ, each batch size's best λ
predicted at its own best η from the others; root mean square) is used and named; a tie
goes to the simpler model. Why a choice rather than the line alone: each point's λ is one
of the few values the search tried there (the first round tries two per batch size, a
decade apart on the demo), so its scatter is large, and a line through four or five such
points, extrapolated to an end batch size, carries it: on a grid where weight decay acts
it predicted λ = 10 at B = 8 where the grid's best is 0.3 (docs/benchmarks.md).

The 80% interval (log2 λ): a quantile times the point's scatter σ (the larger of the
residual standard deviation and a floor, how finely the tried values locate each point)
times √(1 + 1/n) (+ (x − x̄)²/Sxx for the line), never narrower than the quantile times the
model's leave-one-out error; for the timescale models the LR's own half-width added in
quadrature (λ follows η there). Unlike the LR's, it does not also span the rival models'
intervals: against grids with a weight-decay axis that made it cover the grid's best λ in
every case at a median width of 2,400×, where the chosen model's alone covers 80% of them
at 35–84× (docs/benchmarks.md).

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpo.report.scaling import student_t_quantile

DECAY_MODELS = ("constant weight decay", "constant timescale", "timescale line")


@dataclass(frozen=True)
class DecayPoint:
    """One batch size's best trial: log2 B, log2 η and log2 λ."""

    x: float
    log2_lr: float
    log2_decay: float

    @property
    def timescale(self) -> float:
        """log2(B/(η·λ)) = log2(τ_epoch·N)."""
        return self.x - self.log2_lr - self.log2_decay


@dataclass(frozen=True)
class DecayPrediction:
    """log2 λ at a batch size, its interval's ends, the model used and each candidate's
    leave-one-batch-size-out error (log2)."""

    log2_decay: float
    low: float
    high: float
    model: str
    leave_one_out_error: dict[str, float]


def _fit(model: str, points: list[DecayPoint]) -> tuple[float, float]:
    """(a, s): the model's intercept and slope (s = 0 but for the timescale line)."""
    if model == "constant weight decay":
        return sum(p.log2_decay for p in points) / len(points), 0.0
    if model == "constant timescale":
        return sum(p.timescale for p in points) / len(points), 0.0
    mean_x = sum(p.x for p in points) / len(points)
    mean_t = sum(p.timescale for p in points) / len(points)
    sxx = sum((p.x - mean_x) ** 2 for p in points)
    slope = sum((p.x - mean_x) * (p.timescale - mean_t) for p in points) / sxx
    return mean_t - slope * mean_x, slope


def _log2_decay(model: str, fit: tuple[float, float], x: float, log2_lr: float) -> float:
    intercept, slope = fit
    if model == "constant weight decay":
        return intercept
    return x - log2_lr - (intercept + slope * x)


def _parameters(model: str) -> int:
    return 2 if model == "timescale line" else 1


def leave_one_out_errors(points: list[DecayPoint]) -> dict[str, float]:
    """Each model's root mean squared error (log2 λ) predicting each point's λ at its own
    LR from the other points (with three points, the line is fitted through two each time)."""
    errors = {}
    for model in DECAY_MODELS:
        if len(points) <= _parameters(model):
            continue
        squares = []
        for index, held in enumerate(points):
            rest = points[:index] + points[index + 1 :]
            predicted = _log2_decay(model, _fit(model, rest), held.x, held.log2_lr)
            squares.append((predicted - held.log2_decay) ** 2)
        errors[model] = math.sqrt(sum(squares) / len(squares))
    return errors


def _half_width(
    model: str,
    points: list[DecayPoint],
    x: float,
    error: float,
    floors: tuple[float, float],
    lr_half: float,
    confidence: float,
) -> float:
    """The model's log2 half-width at x (see the module's docstring); ``floors``: a point's
    scatter known from the weight decays tried, and from the LRs and weight decays tried
    (the timescale's)."""
    fit = _fit(model, points)
    n, k = len(points), _parameters(model)
    residuals = [_log2_decay(model, fit, p.x, p.log2_lr) - p.log2_decay for p in points]
    floor = floors[0] if model == "constant weight decay" else floors[1]
    sd = max(math.sqrt(sum(r * r for r in residuals) / (n - k)), floor)
    leverage = 1 + 1 / n
    if model == "timescale line":
        mean_x = sum(p.x for p in points) / n
        leverage += (x - mean_x) ** 2 / sum((p.x - mean_x) ** 2 for p in points)
    quantile = student_t_quantile(0.5 + confidence / 2, n - k)
    half = quantile * max(sd * math.sqrt(leverage), error)
    return half if model == "constant weight decay" else math.hypot(half, lr_half)


def predict_decay(
    points: list[DecayPoint],
    x: float,
    log2_lr: float,
    *,
    floors: tuple[float, float],
    lr_half: float,
    confidence: float,
) -> DecayPrediction:
    """log2 λ at x = log2 B trained at log2 η = ``log2_lr`` (the predicted LR, located to
    ± ``lr_half``), from three or more points; ``floors`` (log2): a point's scatter known
    from the weight decays tried, and from the LRs and weight decays tried."""
    errors = leave_one_out_errors(points)
    model = min(errors, key=lambda name: errors[name])  # DECAY_MODELS order: simpler first
    centre = _log2_decay(model, _fit(model, points), x, log2_lr)
    half = _half_width(model, points, x, errors[model], floors, lr_half, confidence)
    return DecayPrediction(centre, centre - half, centre + half, model, errors)
