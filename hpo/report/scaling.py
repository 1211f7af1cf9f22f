"""The fit of lr* ∝ B^α: one point per batch size (the geometric mean LR of its near-best
complete trials), least squares in log-log, the interval of α, and the batch sizes whose
optimum the tried LRs do not bracket (``fit_lr_scaling`` → ``ScalingFit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.report.summary import complete_trials, is_maximize, trial_batch_size

# How many of the best complete trials of each batch size the report draws from (the α fit
# averages those of them near the best; the LR ridge and the B_simple curves use them all).
DEFAULT_TOP_K = 3
# How close to a batch size's best value (a share of it) a complete trial must be to count
# as an estimate of that batch size's best LR. One percent is the report's notion of "as
# good as the best" (the cost view's default tolerance) and about the seed-to-seed spread of
# the demo's val AUC; a trial further below is evidence of where the optimum is *not*.
DEFAULT_NEAR_BEST = 0.01
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class ScalingFit:
    """The fit of log2 lr* = intercept + α · log2 B, one point per batch size.

    A batch size's point is its estimated best LR: the geometric mean of the LRs of its
    near-best complete trials (among its ``top_k`` best, those within ``near_best`` of its
    best value, a share of it). One point per batch size, not every top trial: the trials of
    one batch size are not independent measurements of its optimum, and a poor trial (one
    the per-batch-size floor kept from pruning, say at an LR that diverged) measures where
    the optimum is not. The slope's standard error then comes from how far the batch
    sizes' optima scatter about the line, which includes how poorly a flat optimum is
    located: the interval widens with that scatter, not with the number of trials.

    ``alpha`` is None when fewer than two batch sizes have complete trials;
    ``alpha_low``/``alpha_high`` (the two-sided ``confidence`` interval from Student's t
    with one degree of freedom per batch size beyond two) are None with two batch sizes.
    ``reason`` says in words why either is missing. ``trials`` are the (batch size, lr) of
    the trials the points average.
    """

    alpha: float | None
    alpha_low: float | None
    alpha_high: float | None
    intercept: float | None
    points: tuple[tuple[int, float], ...]
    top_k: int
    confidence: float
    reason: str | None = None
    batch_sizes: tuple[int, ...] = field(default=())
    trials: tuple[tuple[int, float], ...] = field(default=())
    near_best: float = DEFAULT_NEAR_BEST
    # Batch sizes with no worse trial (complete, or pruned and behind the best at its last
    # report) below ("below") or above ("above") their best trial's LR: the optimum there is
    # not bracketed on that side and may lie further out, which no interval from these
    # points can know.
    unbracketed: tuple[tuple[int, str], ...] = field(default=())
    # True when the interval comes from how finely LRs were tried around each point
    # (``_resolution_standard_error``), which was wider than the points' scatter about the
    # line: e.g. every point a first-round trial placed by the same rule, on one line.
    resolution_bound: bool = False
    # How finely the tried LRs locate a point (log2): the root mean square of the points'
    # bracket widths / √12 (``resolution_widths``); None when no point has a neighbour.
    # Predictions take it as a floor under one point's scatter (hpo.report.prediction).
    point_sd: float | None = None

    @property
    def n_points(self) -> int:
        return len(self.points)

    def lr_at(self, batch_size: float) -> float:
        """The fitted best learning rate at ``batch_size``."""
        if self.alpha is None or self.intercept is None:
            raise ValueError("no fit: " + (self.reason or "too few trials"))
        return 2.0 ** (self.intercept + self.alpha * math.log2(batch_size))

    def contains(self, alpha: float) -> bool | None:
        """Whether ``alpha`` lies inside the interval (None without an interval)."""
        if self.alpha_low is None or self.alpha_high is None:
            return None
        return self.alpha_low <= alpha <= self.alpha_high

    def describe(self) -> str:
        """One or two sentences for a person: α, its interval, and which rule it supports."""
        if self.alpha is None:
            return f"No scaling fit: {self.reason}."
        where = (
            f"over the best LR of each of {len(self.batch_sizes)} batch sizes (the geometric "
            f"mean of its complete trials within {self.near_best:.0%} of its best, at most "
            f"{self.top_k}: {len(self.trials)} trials; least squares in log-log)"
        )
        if self.alpha_low is None:
            return f"Fitted lr* ∝ B^α with α = {self.alpha:.2f} {where}; {self.reason}."
        percent = f"{self.confidence:.0%}"
        text = (
            f"Fitted lr* ∝ B^α with α = {self.alpha:.2f} ({percent} interval "
            f"{self.alpha_low:.2f} to {self.alpha_high:.2f}) {where}."
        )
        linear, square_root, flat = self.contains(1.0), self.contains(0.5), self.contains(0.0)
        if linear and square_root:
            text += " The interval is too wide to tell the linear rule (α = 1) from the "
            text += "square-root rule (α = 0.5)"
            text += " or from no dependence on batch size (α = 0)" if flat else ""
            text += "; more batch sizes, or complete trials that locate each batch size's "
            text += "best LR more closely, would narrow it."
        elif linear or square_root:
            inside, outside = ("linear rule (α = 1)", "square-root rule (α = 0.5)")[
                :: 1 if linear else -1
            ]
            text += f" Consistent with the {inside}; not with the {outside}."
        else:
            text += " Neither the linear rule (α = 1) nor the square-root rule (α = 0.5) lies "
            text += "inside the interval."
        if flat and not (linear and square_root):
            text += " α = 0 (no dependence on batch size) is not ruled out."
        if self.resolution_bound:
            text += (
                " The interval's width comes from how far apart the LRs tried at each batch "
                "size are (each best LR lies somewhere between its neighbours), not from the "
                "points' scatter, which is smaller; trials at LRs between those tried would "
                "narrow it."
            )
        return text + self._describe_unbracketed()

    def _describe_unbracketed(self) -> str:
        if not self.unbracketed:
            return ""
        by_batch: dict[int, list[str]] = {}
        for b, side in self.unbracketed:
            by_batch.setdefault(b, []).append(side)
        sides = ", ".join(
            f"B = {b} (no worse LR tried on either side)"
            if len(found) == 2
            else f"B = {b} ({'lowest' if found[0] == 'below' else 'highest'})"
            for b, found in by_batch.items()
        )
        return (
            f" Caution: at {sides} the best trial is the extreme LR tried there, so that batch "
            "size's optimum may lie further out than its point, and α further from the fit "
            "than the interval says."
        )


def student_t_quantile(probability: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def fit_lr_scaling(
    study: optuna.Study,
    *,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
    near_best: float = DEFAULT_NEAR_BEST,
) -> ScalingFit:
    """Fit lr* ∝ B^α by least squares on (log2 B, log2 lr*), lr* per batch size from its
    near-best complete trials (see ``ScalingFit``).

    Raises ValueError for ``top_k < 1``, ``confidence`` outside (0, 1) or a negative
    ``near_best``. Too few trials is not an error: the returned fit says so in ``reason``.
    """
    _check_fit_arguments(top_k, confidence, near_best)
    near = near_best_trials(study, top_k, near_best)
    points = [
        (b, 2.0 ** (sum(math.log2(t.params["lr"]) for t in trials) / len(trials)))
        for b, trials in near.items()
    ]
    batch_sizes = tuple(near)
    # Every complete or pruned trial: which LRs were tried around each point.
    tried = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    best = {b: trials[0] for b, trials in near.items()}
    unbracketed = _unbracketed(is_maximize(study), tried, best)
    common = {
        "points": tuple(points),
        "top_k": top_k,
        "confidence": confidence,
        "batch_sizes": batch_sizes,
        "trials": tuple((b, float(t.params["lr"])) for b, trials in near.items() for t in trials),
        "near_best": near_best,
        "unbracketed": unbracketed,
        "point_sd": _point_sd(resolution_widths(tried, points)),
    }
    if len(batch_sizes) < 2:
        found = "no batch size has" if not batch_sizes else f"only batch size {batch_sizes[0]} has"
        return ScalingFit(
            alpha=None,
            alpha_low=None,
            alpha_high=None,
            intercept=None,
            reason=(
                f"{found} complete trials; the fit needs complete trials at two or more batch sizes"
            ),
            **common,
        )
    return _fit_line(points, tried, confidence, common)


def _point_sd(widths: dict[int, float | None]) -> float | None:
    known = [w for w in widths.values() if w is not None]
    return math.sqrt(sum(w * w for w in known) / len(known) / 12) if known else None


def _check_fit_arguments(top_k: int, confidence: float, near_best: float) -> None:
    """Raise ValueError naming the first of ``fit_lr_scaling``'s arguments out of range."""
    if top_k < 1:
        raise ValueError(f"top_k = {top_k} must be at least 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence} must be between 0 and 1")
    if not near_best >= 0.0:
        raise ValueError(f"near_best = {near_best} must be 0 or more (a share of the best)")


def _fit_line(
    points: list[tuple[int, float]],
    tried: list[FrozenTrial],
    confidence: float,
    common: dict[str, Any],
) -> ScalingFit:
    """The fit through two or more ``points``: α and the intercept, and with three or more
    points α's ``confidence`` interval (its standard error the larger of the points' scatter
    and the resolution of the LRs ``tried``). ``common`` are the fit's other fields."""
    alpha, intercept, standard_error = least_squares(points)
    floor = _resolution_standard_error(tried, points)
    resolution_bound = standard_error is not None and floor is not None and floor > standard_error
    if resolution_bound:
        standard_error = floor
    if standard_error is None:
        return ScalingFit(
            alpha=alpha,
            alpha_low=None,
            alpha_high=None,
            intercept=intercept,
            reason="two batch sizes give a line but no interval (it needs three or more)",
            **common,
        )
    half_width = student_t_quantile(0.5 + confidence / 2, len(points) - 2) * standard_error
    return ScalingFit(
        alpha=alpha,
        alpha_low=alpha - half_width,
        alpha_high=alpha + half_width,
        intercept=intercept,
        resolution_bound=resolution_bound,
        **common,
    )


def _resolution_standard_error(
    tried: list[FrozenTrial], points: list[tuple[int, float]]
) -> float | None:
    """The slope's standard error from where each batch size's best LR can be, given the
    LRs tried there: a floor under the one from the points' scatter.

    The scatter about the line measures how well the points locate the optima only when
    the points scatter. Trials placed by one rule (the first round: the square-root rule's
    LR × ½ and × 2 at every batch size) can all be best and lie exactly on a line: zero
    residual, a zero-width interval, though each optimum is known only to lie between the
    LRs tried either side of its point. So each point's log2 LR is taken as uniform between
    the midpoints to its nearest tried LRs (COMPLETE or PRUNED trials of that batch size)
    below and above (one side only: the same distance both ways; none: the median of the
    other points), standard deviation width / √12, and the slope's standard error
    propagated from those: √(Σ (x_i − x̄)² σ_i²) / Sxx. None when no point has a neighbour.
    """
    widths = resolution_widths(tried, points)
    known = sorted(w for w in widths.values() if w is not None)
    if not known:
        return None
    fallback = known[len(known) // 2]
    xs = [math.log2(b) for b, _ in points]
    mean_x = sum(xs) / len(xs)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    variance = sum(
        (x - mean_x) ** 2 * ((widths[b] if widths[b] is not None else fallback) ** 2 / 12)
        for x, (b, _) in zip(xs, points, strict=True)
    )
    return math.sqrt(variance) / sxx


def resolution_widths(
    tried: list[FrozenTrial], points: list[tuple[int, float]]
) -> dict[int, float | None]:
    """Per point, the width (log2) of the bracket its best LR is known to lie in: between
    the midpoints to the nearest LRs tried below and above at that batch size (one side
    only: the same distance both ways; None: no other LR tried)."""
    log2_lrs: dict[int, list[float]] = {}
    for trial in tried:
        batch_size = trial_batch_size(trial)
        if batch_size is not None and "lr" in trial.params:
            log2_lrs.setdefault(batch_size, []).append(math.log2(float(trial.params["lr"])))
    widths: dict[int, float | None] = {}
    for batch_size, lr in points:
        y = math.log2(lr)
        below = [y - t for t in log2_lrs.get(batch_size, []) if t < y - 1e-9]
        above = [t - y for t in log2_lrs.get(batch_size, []) if t > y + 1e-9]
        gaps = [min(side) for side in (below, above) if side]
        widths[batch_size] = sum(gaps) / 2 if len(gaps) == 2 else (gaps[0] if gaps else None)
    return widths


def _unbracketed(
    maximize: bool, tried: list[FrozenTrial], best: dict[int, FrozenTrial]
) -> tuple[tuple[int, str], ...]:
    """(batch size, side) for each side of a batch size's best LR with no worse trial of
    that batch size among ``tried`` (the complete and pruned trials): a complete trial with
    a worse value, or a pruned one that was worse than the best trial at the report it was
    pruned at (the same resource)."""
    worse_lrs: dict[int, list[float]] = {b: [] for b in best}
    for trial in tried:
        batch_size = trial_batch_size(trial)
        if batch_size not in best or "lr" not in trial.params:
            continue
        if trial.number == best[batch_size].number:
            continue
        top = best[batch_size]
        if trial.state == TrialState.COMPLETE:
            mine, theirs = trial.value, top.value
        elif trial.intermediate_values:
            step = max(trial.intermediate_values)
            mine, theirs = trial.intermediate_values[step], top.intermediate_values.get(step)
        else:
            continue
        if (
            mine is not None
            and theirs is not None
            and (mine < theirs if maximize else mine > theirs)
        ):
            worse_lrs[batch_size].append(float(trial.params["lr"]))
    found = []
    for batch_size, trial in best.items():
        lr = float(trial.params["lr"])
        if not any(other < lr for other in worse_lrs[batch_size]):
            found.append((batch_size, "below"))
        if not any(other > lr for other in worse_lrs[batch_size]):
            found.append((batch_size, "above"))
    return tuple(found)


def near_best_trials(
    study: optuna.Study, top_k: int, near_best: float
) -> dict[int, list[FrozenTrial]]:
    """Per batch size, those of its ``top_k`` best complete trials whose value is within
    ``near_best`` (a share of the best value's magnitude) of its best: the trials whose LRs
    estimate that batch size's best LR. The best trial is always one."""
    maximize = is_maximize(study)
    near = {}
    for batch_size, trials in top_trials_by_batch_size(study, top_k).items():
        best = float(trials[0].value)
        slack = near_best * abs(best)
        near[batch_size] = [
            t for t in trials if (t.value >= best - slack if maximize else t.value <= best + slack)
        ]
    return near


def top_trials_by_batch_size(study: optuna.Study, top_k: int) -> dict[int, list[FrozenTrial]]:
    """The ``top_k`` best complete trials of each batch size, best first: the trials the α
    fit, the LR ridge and the B_simple curves are drawn from. Trials without an lr cannot
    enter the fit and are skipped."""
    maximize = is_maximize(study)
    complete = [t for t in complete_trials(study.get_trials(deepcopy=False)) if "lr" in t.params]
    by_batch: dict[int, list[FrozenTrial]] = {}
    for trial in complete:
        batch_size = trial_batch_size(trial)
        if batch_size is not None:
            by_batch.setdefault(batch_size, []).append(trial)
    return {
        batch_size: sorted(by_batch[batch_size], key=lambda t: t.value, reverse=maximize)[:top_k]
        for batch_size in sorted(by_batch)
    }


def least_squares(points: list[tuple[int, float]]) -> tuple[float, float, float | None]:
    """Slope α, intercept and the slope's standard error of log2 lr on log2 B. The standard
    error is None for two points: a line through them leaves no residual to estimate it."""
    xs = [math.log2(b) for b, _ in points]
    ys = [math.log2(lr) for _, lr in points]
    n = len(points)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    alpha = sxy / sxx
    intercept = mean_y - alpha * mean_x
    if n < 3:
        return alpha, intercept, None
    residual = sum((y - (intercept + alpha * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return alpha, intercept, math.sqrt(residual / (n - 2) / sxx)
