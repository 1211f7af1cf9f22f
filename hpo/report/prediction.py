"""LR and weight decay predicted for any batch size, from the study's fitted scaling models
(``predict_configuration`` → ``Prediction``).

Two models of the best LR per batch size compete: the power law lr* = c·B^α and the
McCandlish ridge ε_opt(B) = ε_max / (1 + B_noise / B). The one with the smaller
leave-one-batch-size-out error (each batch size's best LR predicted from the others, mean
squared error in log2) is used and named. Its 80% prediction interval in log2 is Student's
t (one degree of freedom per batch size beyond one) times that out-of-sample error, widened
with the distance from the studied batch sizes as a line's prediction interval is
(√(1 + 1/n + (x − x̄)²/Sxx)); outside the studied range the prediction is flagged
extrapolated. The weight decay follows from the timescale τ_epoch = B/(η·λ·N) (Wang &
Aitchison 2024): log τ fitted linear in log B over the batch sizes whose weight decay was
searched, then λ = B/(η·τ·N), its interval the LR's and τ's combined in quadrature.

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpo.report.noise_scale import fit_lr_ridge
from hpo.report.scaling import least_squares, student_t_quantile
from hpo.report.weight_decay import WeightDecayView

PREDICTION_CONFIDENCE = 0.8


@dataclass(frozen=True)
class Prediction:
    """The predicted LR and weight decay at ``batch_size`` with their intervals (None
    where the study cannot give one), the model used and whether it extrapolates."""

    batch_size: int
    lr: float
    lr_interval: tuple[float, float] | None
    weight_decay: float | None
    weight_decay_interval: tuple[float, float] | None
    extrapolated: bool
    model_of_scaling: str
    leave_one_out_error: dict[str, float]
    weight_decay_note: str | None = None


def _log2_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Slope and intercept of log2 y on log2 x."""
    slope, intercept, _ = least_squares(points)  # type: ignore[arg-type]
    return slope, intercept


def _predict_log2(model: str, points: list[tuple[float, float]], batch_size: float) -> float:
    if model == "power law":
        slope, intercept = _log2_line(points)
        return intercept + slope * math.log2(batch_size)
    ridge = fit_lr_ridge([(b, lr) for b, lr in points], bootstrap=0)
    return math.log2(ridge.lr_at(batch_size))


def leave_one_out_errors(points: list[tuple[float, float]]) -> dict[str, float]:
    """Root mean squared error (log2 LR) of each model predicting each batch size's best
    LR from the other batch sizes' (needs three or more batch sizes)."""
    errors: dict[str, float] = {}
    for model in ("power law", "ridge"):
        squares = []
        for index, (batch_size, lr) in enumerate(points):
            rest = points[:index] + points[index + 1 :]
            squares.append((_predict_log2(model, rest, batch_size) - math.log2(lr)) ** 2)
        errors[model] = math.sqrt(sum(squares) / len(squares))
    return errors


def predict_configuration(
    points: list[tuple[int, float]],
    batch_size: int,
    weight_decay: WeightDecayView | None = None,
    *,
    confidence: float = PREDICTION_CONFIDENCE,
) -> Prediction | None:
    """The prediction at ``batch_size`` from ``points`` (each batch size's best LR, the α
    fit's points) and the weight-decay view; None with fewer than three batch sizes."""
    floats = [(float(b), float(lr)) for b, lr in points]
    if len({b for b, _ in floats}) < 3:
        return None
    errors = leave_one_out_errors(floats)
    model = min(errors, key=lambda name: errors[name])
    log2_lr = _predict_log2(model, floats, batch_size)
    half = _half_width(floats, batch_size, errors[model], confidence)
    studied = [b for b, _ in floats]
    lr = 2.0**log2_lr
    wd, wd_interval, note = _weight_decay(weight_decay, batch_size, log2_lr, half, confidence)
    return Prediction(
        batch_size=batch_size,
        lr=lr,
        lr_interval=(2.0 ** (log2_lr - half), 2.0 ** (log2_lr + half)),
        weight_decay=wd,
        weight_decay_interval=wd_interval,
        extrapolated=not min(studied) <= batch_size <= max(studied),
        model_of_scaling=model,
        leave_one_out_error=errors,
        weight_decay_note=note,
    )


def _half_width(
    points: list[tuple[float, float]], batch_size: float, error: float, confidence: float
) -> float:
    """The log2 half-width of the prediction interval at ``batch_size``."""
    xs = [math.log2(b) for b, _ in points]
    mean_x = sum(xs) / len(xs)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    leverage = 1 + 1 / len(xs) + (math.log2(batch_size) - mean_x) ** 2 / sxx
    quantile = student_t_quantile(0.5 + confidence / 2, len(xs) - 1)
    return quantile * error * math.sqrt(leverage)


def _weight_decay(
    view: WeightDecayView | None,
    batch_size: int,
    log2_lr: float,
    lr_half: float,
    confidence: float,
) -> tuple[float | None, tuple[float, float] | None, str | None]:
    """λ = B/(η·τ·N) with τ from the line of log2 τ on log2 B; or the one weight decay
    tried when it was never varied (no interval)."""
    if view is None or not view.rows:
        return None, None, "no complete trial records a weight decay"
    searched = [row for row in view.rows if row.searched and row.tau_epoch]
    if len(searched) < 3 or view.train_size is None:
        decays = {row.weight_decay for row in view.rows}
        value = math.exp(sum(math.log(d) for d in decays) / len(decays))
        return (
            value,
            None,
            (
                "weight decay was not searched at three or more batch sizes: the value is the "
                "geometric mean of the best ones found, without an interval"
            ),
        )
    points = [(float(row.batch_size), float(row.tau_epoch)) for row in searched]
    slope, intercept, _ = least_squares(points)  # type: ignore[arg-type]
    residuals = [math.log2(tau) - (intercept + slope * math.log2(b)) for b, tau in points]
    spread = math.sqrt(sum(r * r for r in residuals) / max(1, len(points) - 2))
    tau_half = _half_width(points, batch_size, spread, confidence)
    log2_tau = intercept + slope * math.log2(batch_size)
    log2_wd = math.log2(batch_size / view.train_size) - log2_lr - log2_tau
    half = math.hypot(lr_half, tau_half)
    return 2.0**log2_wd, (2.0 ** (log2_wd - half), 2.0 ** (log2_wd + half)), None
