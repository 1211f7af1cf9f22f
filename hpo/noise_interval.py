"""The interval of a gradient noise scale B_simple = tr(Σ)/|G|² from the running sums of its
per-measurement estimates (``hpo.noise.NoiseScaleEstimate.sums``): one trial's, or several
trials' pooled by adding their sums (``pool_sums``). Plain Python and scipy: the report reads
it without torch.

Fieller's interval for a ratio of two means (Fieller 1954): the set of R for which
T̄ − R·Ḡ is within t·its standard error of 0. When Ḡ itself is not distinguishable from 0 at
that confidence, the set has no upper end, and the interval says so (``high`` None): a
noise scale too large to measure with these many pairs, only a lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# The two-sided confidence of a trial's B_simple interval (Fieller's, ``fieller_interval``).
NOISE_SCALE_CONFIDENCE = 0.9


SUM_KEYS = ("n", "g", "t", "gg", "tt", "gt", "probes")


def pool_sums(many: Iterable[dict[str, float]]) -> dict[str, float]:
    """The sums of several trials' measurements added up (the measurements pooled)."""
    pooled = dict.fromkeys(SUM_KEYS, 0.0)
    for sums in many:
        for key in SUM_KEYS:
            value = sums.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                pooled[key] += float(value)
    return pooled


def fieller_interval(
    sums: dict[str, float], confidence: float = NOISE_SCALE_CONFIDENCE
) -> tuple[float | None, float | None, float | None]:
    """(ratio, low, high) of tr(Σ)/|G|² from the running sums of the per-measurement
    estimates (``NoiseScaleEstimate.sums``): the ratio of their means and Fieller's
    interval for a ratio of two means (Student's t with n − 1 degrees of freedom, the
    sample covariance of the pairs). ``high`` is None when the |G|² mean is not distinguishable from 0 at that
    confidence (the interval then has no upper end: only a lower bound), and everything is
    None with fewer than 3 measurements or a mean tr(Σ) ≤ 0. A mean |G|² ≤ 0 that is not
    distinguishable from 0 gives no ratio but still a lower bound: (None, low, None)."""
    from scipy import stats

    n = sums.get("n", 0.0)
    if n < 3:
        return None, None, None
    mean_g, mean_t = sums["g"] / n, sums["t"] / n
    if mean_t <= 0:
        return None, None, None
    ratio = mean_t / mean_g if mean_g > 0 else None

    def covariance(xy: str, x: str, y: str) -> float:
        return (sums[xy] - sums[x] * sums[y] / n) / (n - 1) / n  # of the means

    v_gg, v_tt, v_gt = (
        covariance("gg", "g", "g"),
        covariance("tt", "t", "t"),
        covariance("gt", "g", "t"),
    )
    # A probe's K pseudo-values carry K − 1 degrees of freedom, a single measurement 1.
    dof = n - max(1.0, sums.get("probes", 0.0))
    if dof < 1:
        return None, None, None
    z2 = float(stats.t.ppf(0.5 + confidence / 2, dof)) ** 2
    a = mean_g**2 - z2 * v_gg
    b = -2 * (mean_t * mean_g - z2 * v_gt)
    c = mean_t**2 - z2 * v_tt
    discriminant = max(0.0, b * b - 4 * a * c)  # ≥ 0 whenever a > 0: the ratio is inside
    root = math.sqrt(discriminant)
    if a <= 0:
        # |G|² not told from 0: the set is unbounded above; its lower end is the larger
        # root when the ratio lies above it (the set is the outside of the roots), else 0.
        if a == 0 or discriminant == 0:
            return ratio, 0.0, None
        smaller, larger = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
        # The set is R ≤ smaller or R ≥ larger; its positive part starts at 0 when
        # smaller > 0, else at the larger root.
        return ratio, max(0.0, larger) if smaller <= 0 else 0.0, None
    if ratio is None:  # |G|² significantly negative: no positive ratio fits
        return None, None, None
    low, high = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
    return ratio, max(low, 0.0), high


def noise_scale_attrs(per_report: list[float | None], estimate: Any) -> dict[str, Any]:
    """A trial's gradient noise scale (``hpo.noise``) as user attrs: ``b_simple`` (the ratio
    of the means of the trial's measurements, ``estimate``: a ``NoiseScaleEstimate``),
    ``b_simple_interval`` [low, high] (Fieller's, at ``NOISE_SCALE_CONFIDENCE``; high null:
    only a lower bound), ``b_simple_measurements`` and the running sums ``b_simple_sums`` (a
    batch size's trials are pooled from them), the per-report EMA ``b_simple_per_epoch``
    (``per_report``); ``b_simple_missing`` says why when there is no value or no upper
    end. Trials from before
    the sums were kept fall back to the EMA's last value."""
    attrs: dict[str, Any] = {}
    if per_report:
        attrs.update(b_simple=per_report[-1], b_simple_per_epoch=list(per_report))
    sums = estimate.float_sums()
    count = int(sums.get("n", 0))
    attrs["b_simple_measurements"] = count
    if count:
        attrs["b_simple_sums"] = sums
    ratio, low, high = fieller_interval(sums)
    if ratio is not None:
        attrs.update(b_simple=ratio, b_simple_interval=[low, high])
        if high is None:
            attrs["b_simple_missing"] = (
                f"no upper end: the mean |G|² over the trial's {count} measurements is not "
                f"told from 0 at {NOISE_SCALE_CONFIDENCE:.0%} (the gradient is nearly lost in "
                "its noise with the measurements its share of training time buys)"
            )
        return attrs
    attrs.pop("b_simple", None)
    if low is not None and low > 0:
        attrs["b_simple_interval"] = [low, None]
        attrs["b_simple_missing"] = (
            f"the mean |G|² estimate over the trial's {count} measurements is not positive: "
            f"the gradient is lost in its noise at this batch size; B_simple ≥ {low:.3g} "
            f"({NOISE_SCALE_CONFIDENCE:.0%} lower bound), a point value needs more measurements"
        )
        return attrs
    probes = int(sums.get("probes", 0))
    if count == 0:
        attrs["b_simple_missing"] = (
            "no measurement of the gradient noise scale: the trial stopped before its first"
            " (pruned early, or too short for one in its share of training time)"
        )
    elif count < 3:
        attrs["b_simple_missing"] = (
            f"{count} measurement(s) of the gradient noise scale; an estimate needs 3"
        )
    elif probes:
        attrs["b_simple_missing"] = (
            f"the trial's {probes} probe(s) ({count} passes) do not tell |G|² from 0: the "
            "gradient is lost in its noise with the examples its share of training time buys"
        )
    else:
        attrs["b_simple_missing"] = (
            "the mean |G|² or tr(Σ) estimate over the trial's measurements is not positive: "
            "the gradient is too small against its noise to measure at this batch size"
        )
    return attrs
