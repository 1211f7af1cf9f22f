"""LR and weight decay predicted for any batch size, from the study's fitted scaling models
(``predict_configuration`` → ``Prediction``).

The candidate models of the best LR per batch size (``hpo.report.lr_models``): the power
law lr* = c·B^α, McCandlish's ridge ε_opt(B) = ε_max / (1 + B_noise / B) and, for
Adam-style optimizers only, Li et al.'s surge, which peaks at B_noise and falls past it.
The one with the smallest leave-one-batch-size-out error (each batch size's best LR
predicted from the others; root mean square in log2) is used and named.

The 80% prediction interval (log2) is a quantile q times √(σ²·(1 + gᵀ(JᵀJ)⁺g)): the
fit's parameter covariance propagated to B (so the interval widens with distance from the
studied batch sizes, the slope's uncertainty included) plus one point's own scatter σ, the
larger of the residual standard deviation and ``point_sd`` (how finely the study located
each batch size's best LR). q is Student's t with n − 2 degrees of freedom where σ is the
residual standard deviation, an estimate from n − 2 residuals; the normal quantile where σ
is ``point_sd``, which is known from the LRs tried and not estimated (t with two degrees of
freedom, 1.89 against 1.28, made the demo's intervals 10× wide where the best LRs' error
against a grid needs about 5×). It is never narrower than q times the model's
leave-one-out error, the error measured on batch sizes the fit did not see. Where another model's leave-one-out error is within a factor 2 of the
chosen one's, the data cannot tell them apart and the interval spans both models' intervals
(their predictions part far outside the studied range); with three batch sizes, every
candidate's. Outside the studied range the prediction is flagged extrapolated.

The weight decay comes from a model of the best λ across the batch sizes whose weight
decay was searched (``hpo.report.decay_models``: λ constant, the timescale τ_epoch =
B/(η·λ·N) constant (Wang & Aitchison 2024), or log τ linear in log B), chosen the same way
by leave-one-batch-size-out error and named; where τ sets it, λ = B/(η·τ·N) at the
predicted LR, its interval the LR's and τ's combined in quadrature. Where weight decay
barely acted at batch sizes the model is fitted through (τ_epoch over 10× the epochs
trained), ``weight_decay_note`` says so.

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hpo.report.decay_models import DecayPoint, DecayPrediction, predict_decay
from hpo.report.lr_models import fit_model, leave_one_out_error, models_for
from hpo.report.scaling import ScalingFit, student_t_quantile
from hpo.report.weight_decay import BARELY_ACTS, WeightDecayView, lowest_won_everywhere

PREDICTION_CONFIDENCE = 0.8
# Batch sizes a prediction needs: a two-parameter model and one degree of freedom left.
MIN_BATCH_SIZES = 3
# A model whose leave-one-batch-size-out error is within this factor of the chosen one's is
# not ruled out by the data (with five batch sizes the error itself is uncertain by about
# that much): the interval covers its prediction interval too, so a prediction far outside
# the studied range does not rest on one model the data could not single out.
RIVAL_FACTOR = 2.0
# The study attribute ``hpo launch`` stores the study file under (hpo.storage.SPEC_ATTR; not
# imported, to keep this module free of the storage layer).
SPEC_ATTR = "hpo_spec"


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
    # The model of λ across batch sizes (hpo.report.decay_models) and each candidate's
    # leave-one-batch-size-out error (log2 λ); None without one.
    model_of_weight_decay: str | None = None
    weight_decay_leave_one_out_error: dict[str, float] | None = None


def unavailable_reason(points: list[tuple[int, float]]) -> str | None:
    """Why no prediction can be made from ``points`` (each batch size's best LR), in
    words; None when one can."""
    batch_sizes = sorted({b for b, _ in points})
    if len(batch_sizes) >= MIN_BATCH_SIZES:
        return None
    found = (
        "no batch size has a complete trial"
        if not batch_sizes
        else "only batch size"
        + ("s " if len(batch_sizes) > 1 else " ")
        + " and ".join(str(b) for b in batch_sizes)
        + (" have" if len(batch_sizes) > 1 else " has")
        + " complete trials"
    )
    return (
        f"{found}; a prediction needs complete trials at {MIN_BATCH_SIZES} or more batch "
        "sizes (a two-parameter model of the best LR and one batch size to check it)"
    )


def stored_optimizer(study_user_attrs: dict[str, Any]) -> str | None:
    """The optimizer of the study file ``hpo launch`` stored on the study (``hpo_spec``);
    None for a study made by other means."""
    stored = study_user_attrs.get(SPEC_ATTR)
    if not isinstance(stored, str):
        return None
    try:
        optimizer = json.loads(stored).get("search", {}).get("optimizer")
    except (ValueError, AttributeError):
        return None
    return optimizer if isinstance(optimizer, str) else None


def predict_from_fit(
    fit: ScalingFit,
    batch_size: int,
    weight_decay: WeightDecayView | None = None,
    optimizer: str | None = None,
) -> Prediction | None:
    """``predict_configuration`` on the α fit's points, with how finely the study's tried
    LRs locate them (``ScalingFit.point_sd``) as the floor under a point's scatter."""
    return predict_configuration(
        list(fit.points), batch_size, weight_decay, optimizer, point_sd=fit.point_sd or 0.0
    )


def leave_one_out_errors(
    points: list[tuple[float, float]], optimizer: str | None = None
) -> dict[str, float]:
    """Root mean squared error (log2 LR) of each candidate model predicting each batch
    size's best LR from the other batch sizes' (needs three or more batch sizes)."""
    return {model: leave_one_out_error(model, points) for model in models_for(optimizer)}


def predict_configuration(
    points: list[tuple[int, float]],
    batch_size: int,
    weight_decay: WeightDecayView | None = None,
    optimizer: str | None = None,
    *,
    point_sd: float = 0.0,
    confidence: float = PREDICTION_CONFIDENCE,
) -> Prediction | None:
    """The prediction at ``batch_size`` from ``points`` (each batch size's best LR, the α
    fit's points), the weight-decay view and the study's optimizer (the surge is a
    candidate for Adam-style ones); None with fewer than three batch sizes
    (``unavailable_reason`` says why). ``point_sd`` (log2) is a floor under one point's
    scatter: how finely the study located each best LR."""
    floats = [(float(b), float(lr)) for b, lr in points]
    if unavailable_reason(points) is not None:
        return None
    errors = leave_one_out_errors(floats, optimizer)
    model = min(errors, key=lambda name: errors[name])
    x = math.log2(batch_size)
    log2_lr = fit_model(model, floats).log2_lr(x)
    # The interval spans every model the data cannot tell from the chosen one: all of them
    # at three batch sizes, where each leave-one-out fit is an exact curve through two.
    few = len({b for b, _ in floats}) <= MIN_BATCH_SIZES
    rivals = [n for n in errors if few or errors[n] <= RIVAL_FACTOR * errors[model]]
    ends = [_log2_interval(name, floats, x, errors[name], point_sd, confidence) for name in rivals]
    low, high = min(e[0] for e in ends), max(e[1] for e in ends)
    half = max(log2_lr - low, high - log2_lr)
    studied = [b for b, _ in floats]
    wd, wd_interval, note, decay = _weight_decay(
        weight_decay, batch_size, log2_lr, half, confidence
    )
    return Prediction(
        batch_size=batch_size,
        lr=_exp2(log2_lr),
        lr_interval=(_exp2(low), _exp2(high)),
        weight_decay=wd,
        weight_decay_interval=wd_interval,
        extrapolated=not min(studied) <= batch_size <= max(studied),
        model_of_scaling=model,
        leave_one_out_error=errors,
        weight_decay_note=note,
        model_of_weight_decay=decay.model if decay else None,
        weight_decay_leave_one_out_error=decay.leave_one_out_error if decay else None,
    )


def _exp2(value: float) -> float:
    """2^value, held inside the floats (a wild extrapolation stays a number, not an
    OverflowError)."""
    return 2.0 ** max(-1000.0, min(1000.0, value))


def _log2_interval(
    model: str,
    points: list[tuple[float, float]],
    x: float,
    error: float,
    point_sd: float,
    confidence: float,
) -> tuple[float, float]:
    """``model``'s prediction interval at x = log2 B (log2 LR): q·√(σ²(1 + gᵀ(JᵀJ)⁺g)),
    never narrower than q × its leave-one-out ``error``. q is Student's t with n − 2 degrees
    of freedom where σ is the residual standard deviation (estimated from the fit), the
    normal quantile where it is ``point_sd`` (known from the LRs tried, not estimated)."""
    fitted = fit_model(model, points)
    residual_sd = fitted.residual_sd or 0.0
    sd = max(residual_sd, point_sd)
    probability = 0.5 + confidence / 2
    if point_sd > 0 and point_sd >= residual_sd:
        from scipy import stats

        quantile = float(stats.norm.ppf(probability))
    else:
        quantile = student_t_quantile(probability, fitted.dof)
    half = quantile * max(sd * math.sqrt(1 + fitted.leverage(x)), error)
    centre = fitted.log2_lr(x)
    return centre - half, centre + half


def _weight_decay(
    view: WeightDecayView | None,
    batch_size: int,
    log2_lr: float,
    lr_half: float,
    confidence: float,
) -> tuple[float | None, tuple[float, float] | None, str | None, DecayPrediction | None]:
    """(λ, its interval, a note, the model's prediction): λ from the model of the best weight
    decays across the batch sizes where weight decay was searched
    (``hpo.report.decay_models``), chosen by leave-one-batch-size-out error; or, with fewer
    than three such batch sizes, the geometric mean of the best weight decays found, without
    an interval or a model, and the note says why."""
    if view is None or not view.rows:
        return None, None, "no complete trial records a weight decay", None
    searched = [row for row in view.rows if row.searched and row.weight_decay > 0]
    if len(searched) < 3:
        decays = {row.weight_decay for row in view.rows if row.weight_decay > 0}
        if not decays:
            return 0.0, None, "every complete trial trained without weight decay", None
        value = math.exp(sum(math.log(d) for d in decays) / len(decays))
        note = (
            f"weight decay was searched (two or more values among complete trials) at "
            f"{len(searched)} batch size{'' if len(searched) == 1 else 's'}, and a model "
            "of it across batch sizes needs three: the value is the geometric mean of the best "
            "ones found, without an interval"
        )
        return value, None, note, None
    points = [
        DecayPoint(math.log2(r.batch_size), math.log2(r.lr), math.log2(r.weight_decay))
        for r in searched
    ]
    # Floors: how finely the tried weight decays (and, for the timescale, LRs) locate each
    # point (uniform over its bracket, σ = width/√12), as the τ slope's interval does
    # (hpo.report.weight_decay).
    decay_widths = [(row.weight_decay_width or 0.0) ** 2 for row in searched]
    lr_widths = [(row.lr_width or 0.0) ** 2 for row in searched]
    decay_floor = math.sqrt(sum(decay_widths) / len(searched) / 12)
    decay = predict_decay(
        points,
        math.log2(batch_size),
        log2_lr,
        floors=(decay_floor, math.sqrt((sum(decay_widths) + sum(lr_widths)) / len(searched) / 12)),
        lr_half=lr_half,
        confidence=confidence,
    )
    interval = (_exp2(decay.low), _exp2(decay.high))
    notes = [note for note in (_barely(view, searched), _lowest_won(searched)) if note]
    return _exp2(decay.log2_decay), interval, "; ".join(notes) or None, decay


def _lowest_won(searched: list) -> str | None:
    """The note where the lowest weight decay tried won at every batch size the model is
    fitted through (``hpo.report.weight_decay.lowest_won_everywhere``)."""
    if not lowest_won_everywhere(searched):
        return None
    return (
        "the lowest weight decay tried won at every batch size its model is fitted through: "
        "within the range searched weight decay did not help, so this λ is no located best, "
        "and a lower one may do as well or better"
    )


def _barely(view: WeightDecayView, searched: list) -> str | None:
    """The note where weight decay barely acted at some of the batch sizes the model of λ
    is fitted through (``WeightDecayView.barely_acted``): their best λ is the one the
    trials happened to favour, not one they told apart from the others."""
    fitted = {row.batch_size for row in searched}
    slow = [row.batch_size for row in view.barely_acted() if row.batch_size in fitted]
    if not slow:
        return None
    where = "every batch size" if len(slow) == len(fitted) else "B = " + ", ".join(map(str, slow))
    return (
        f"weight decay barely acted at {where} of the {len(fitted)} its model is fitted "
        f"through (τ_epoch over {BARELY_ACTS:g}× the {view.epochs_trained:g} epochs "
        "trained): the trials there could hardly tell one λ from another, so this λ and its "
        "interval follow the model, not a measured best"
    )
