"""The report's words on the critical batch size, generated from the intervals: the LR
ridge's B_noise (bootstrap) against the measured B_simple (Fieller, pooled over the best
trials). "agree" only when the two intervals overlap and neither is too wide to mean
anything; "disagree" when they do not overlap; otherwise "cannot tell", with what more
trials would settle it (``verdict``, ``describe_critical_batch_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpo.report.noise_scale import (
    BatchSizeNoiseScale,
    MeasuredNoiseScale,
    RidgeFit,
    describe_ridge,
    examples,
)
from hpo.report.steps_to_target import StepsToTarget

# An interval whose ends are further apart than this factor pins nothing down: two
# estimates that overlap only through it do not "agree".
TOO_WIDE = 100.0

SETTLE_RIDGE = (
    "complete trials at more batch sizes, and at LRs between those tried at each, would "
    "narrow the ridge's interval"
)
SETTLE_MEASURED = (
    "more measurements of B_simple (more complete trials, or longer ones) would narrow its interval"
)


@dataclass(frozen=True)
class Verdict:
    """``word``: "agree", "disagree" or "cannot tell"; ``reason`` and ``settle`` in words."""

    word: str
    reason: str
    settle: str = ""


def ridge_interval(ridge: RidgeFit) -> tuple[float, float] | None:
    """The ridge's B_noise interval; at an edge, open on the side it only bounds."""
    if ridge.b_noise_low is None or ridge.b_noise_high is None:
        return None
    if ridge.edge == "low":
        return 0.0, ridge.b_noise_high
    if ridge.edge == "high":
        return ridge.b_noise_low, math.inf
    return ridge.b_noise_low, ridge.b_noise_high


def measured_interval(measured: MeasuredNoiseScale) -> tuple[float, float] | None:
    """The pooled B_simple's interval (no upper end: infinity); None without one."""
    if measured.pooled is None or measured.interval_low is None:
        return None
    high = measured.interval_high if measured.interval_high is not None else math.inf
    return measured.interval_low, high


def _too_wide(interval: tuple[float, float]) -> bool:
    low, high = interval
    return low <= 0 or not math.isfinite(high) or high / low > TOO_WIDE


@dataclass(frozen=True)
class Estimate:
    """One side of a comparison: its name in the sentence ("the ridge's"), its interval,
    why it has none, and what would narrow it."""

    name: str
    interval: tuple[float, float] | None
    missing: str
    settle: str


def compare(first: Estimate, second: Estimate, disagree_settle: str) -> Verdict:
    """Whether two estimates of one quantity agree, from their intervals alone: "cannot
    tell" when either has none, "disagree" when they do not overlap, "cannot tell" when
    they overlap but one is too wide (``TOO_WIDE``, or no upper end), else "agree"."""
    both = (first, second)
    if first.interval is None or second.interval is None:
        lacking = [e for e in both if e.interval is None]
        return Verdict(
            "cannot tell",
            " and ".join(e.missing for e in lacking),
            "; ".join(e.settle for e in lacking),
        )
    (low_a, high_a), (low_b, high_b) = first.interval, second.interval
    if low_a > high_b or low_b > high_a:
        return Verdict("disagree", "their intervals do not overlap", disagree_settle)
    wide = [e for e in both if _too_wide(e.interval)]  # type: ignore[arg-type]
    if wide:
        spans = "interval spans" if len(wide) == 1 else "intervals span"
        return Verdict(
            "cannot tell",
            f"the intervals overlap, but {' and '.join(e.name for e in wide)} {spans} more "
            f"than a factor {TOO_WIDE:.0f} or {'has' if len(wide) == 1 else 'have'} no upper end",
            "; ".join(e.settle for e in wide),
        )
    return Verdict("agree", "their intervals overlap")


def _measured_estimate(measured: MeasuredNoiseScale) -> Estimate:
    return Estimate(
        "B_simple's",
        measured_interval(measured),
        "B_simple has no interval (no trial stored its measurements)",
        SETTLE_MEASURED,
    )


def verdict(ridge: RidgeFit, measured: MeasuredNoiseScale) -> Verdict:
    """Whether the ridge and the measured noise scale agree, from their intervals alone."""
    fitted = Estimate(
        "the ridge's",
        ridge_interval(ridge),
        "the ridge has no interval (it needs three or more batch sizes)",
        SETTLE_RIDGE,
    )
    return compare(
        fitted,
        _measured_estimate(measured),
        "steps to a target at several batch sizes would measure the critical batch size "
        "directly and say which is right",
    )


def _interval_text(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "no interval"
    low, high = interval
    return f"{examples(low)} to {examples(high)}" if math.isfinite(high) else f"≥ {examples(low)}"


def describe_measured(measured: MeasuredNoiseScale) -> str | None:
    """The sentence on the measured B_simple: pooled with its interval, else the median
    of the trials' values (a study whose trials stored no sums), and per batch size."""
    if measured.pooled is not None:
        text = (
            f"The measured gradient noise scale B_simple is {examples(measured.pooled)} "
            f"({measured.confidence:.0%} interval {_interval_text(measured_interval(measured))}; "
            f"{measured.n_measurements} measurements of {measured.n_trials} best trials pooled, "
            "over the whole of their training)."
        )
    elif measured.median is not None:
        text = (
            f"The measured gradient noise scale B_simple is {examples(measured.median)} "
            f"(quartiles {examples(measured.low)} to {examples(measured.high)} over "
            f"{measured.n_trials} best trials; no interval: the trials stored no measurements)."
        )
    else:
        return None
    if measured.by_batch_size:
        text += " Per batch size: " + "; ".join(map(_batch_size_text, measured.by_batch_size)) + "."
    return text


def _batch_size_text(row: BatchSizeNoiseScale) -> str:
    """One batch size's pooled B_simple in words: value and interval, a lower bound, or why
    there is none."""
    counted = f"{row.n_measurements} measurements of {row.n_trials} trial(s)"
    if row.value is None and row.low is not None and row.low > 0:
        return (
            f"B = {row.batch_size}: ≥ {examples(row.low)} (only a lower bound: the mean |G|² "
            f"estimate is not positive, the gradient lost in its noise; {counted})"
        )
    if row.value is None or row.low is None:
        return (
            f"B = {row.batch_size}: no estimate ({counted}; the mean |G|² or tr(Σ) estimate "
            "is not positive or there are fewer than 3)"
        )
    if row.high is None and row.low <= 0:
        return f"B = {row.batch_size}: {examples(row.value)}, unbounded either way ({counted})"
    interval = _interval_text((row.low, row.high if row.high is not None else math.inf))
    return f"B = {row.batch_size}: {examples(row.value)} ({interval}, {counted})"


def describe_critical_batch_size(ridge: RidgeFit, measured: MeasuredNoiseScale) -> str:
    """One paragraph for the summary; always contains "critical batch size"."""
    parts = []
    if ridge.b_noise is not None:
        parts.append(describe_ridge(ridge, ridge.b_noise))
    measured_text = describe_measured(measured)
    if measured_text is not None:
        parts.append(measured_text)
    if ridge.b_noise is None and measured_text is None:
        return (
            "The critical batch size cannot be estimated yet: it needs complete trials at "
            "two or more batch sizes or a measured B_simple."
        )
    if measured_text is None and ridge.edge in ("low", "high"):
        where = "below the smallest" if ridge.edge == "low" else "above the largest"
        parts.append(
            f"From the ridge alone, the critical batch size lies {where} studied batch size."
        )
        return " ".join(parts)
    if ridge.b_noise is None or measured.value is None:
        only = "the ridge" if measured.value is None else "the measured B_simple"
        parts.append(
            f"With {only} alone, the critical batch size is about "
            f"{examples(ridge.b_noise if measured.value is None else measured.value)}; a second "
            "estimate to check it against is missing."
        )
        return " ".join(parts)
    said = verdict(ridge, measured)
    if said.word == "agree":
        parts.append(
            f"The ridge and the noise scale agree ({said.reason}): the critical batch size is "
            f"about {examples(measured.value)}; batches above it buy throughput, not fewer steps."
        )
    elif said.word == "disagree":
        parts.append(
            f"The ridge and the noise scale disagree ({said.reason}), so these trials do not "
            f"pin down the critical batch size; {said.settle}."
        )
    else:
        parts.append(
            f"Whether the ridge and the noise scale agree cannot be told: {said.reason}. "
            f"The critical batch size is not pinned down by these trials; {said.settle}."
        )
    return " ".join(parts)


SETTLE_DIRECT = (
    "more trials at each batch size (and trials at more batch sizes) that reach the target "
    "would narrow the steps-to-target interval"
)


def direct_verdict(direct: StepsToTarget, measured: MeasuredNoiseScale) -> Verdict:
    """Whether B_crit from steps to target and the measured B_simple agree, from their
    intervals alone: "agree" only when they overlap and neither is too wide."""
    steps = Estimate(
        "the steps-to-target",
        direct.interval,
        f"B_crit from steps to target has no interval ({direct.reason or 'no fit'})",
        SETTLE_DIRECT,
    )
    return compare(
        steps,
        _measured_estimate(measured),
        "B_simple is only a proxy for the critical batch size (McCandlish et al. assume "
        "a well-conditioned Hessian); the steps to target are the direct measurement",
    )


def describe_steps_to_target(
    direct: StepsToTarget, measured: MeasuredNoiseScale, metric: str = "the objective"
) -> str:
    """The paragraph on the direct measurement and its comparison with B_simple."""
    if direct.b_crit is None or direct.target is None:
        return (
            f"The critical batch size from steps to a target cannot be measured: {direct.reason}."
        )
    counts = ", ".join(
        f"B = {b}: {'≤ ' if b in direct.bounds else ''}{s:,.0f}" for b, s in direct.steps
    )
    if math.isfinite(direct.b_crit):
        value = f"B_crit is about {examples(direct.b_crit)}"
    else:
        value = "the steps still fall as 1/B at every studied batch size: B_crit is above them"
    text = (
        f"Measured directly: the updates needed to reach {metric} {direct.target:.4g} (the best "
        f"value every batch size reaches within 3/4 of its budget) are {counts}. Fitting "
        f"S(B) = S_min·(1 + B_crit/B) "
        f"(McCandlish et al. 2018; B_crit: where a run takes twice the fewest steps), {value} "
        + (
            f"({direct.confidence:.0%} bootstrap interval over the fit's residuals: "
            f"{_interval_text(direct.interval)})."
            if direct.interval is not None
            else f"(no interval: {direct.reason or 'the bootstrap found none'})."
        )
    )
    if direct.bounds:
        text += (
            " Steps marked ≤ are upper bounds: those batch sizes were already past the target "
            "at their first report; more reports per trial would count them."
        )
    said = direct_verdict(direct, measured)
    seen = _interval_text(measured_interval(measured))
    if said.word == "agree":
        return text + (
            f" It agrees with the measured B_simple ({seen}; {said.reason}): the critical "
            f"batch size is about {examples(direct.b_crit)}."
        )
    if said.word == "disagree":
        return text + (
            f" It disagrees with the measured B_simple ({seen}; {said.reason}); {said.settle}."
        )
    return text + (
        f" Whether it agrees with the measured B_simple ({seen}) cannot be told: {said.reason}; "
        f"{said.settle}."
    )
