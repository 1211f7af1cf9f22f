"""Weight decay as a timescale: the best weight decay λ per batch size, whether it was searched
there at all, and τ_epoch = B / (η·λ·N) with the slope of log τ against log B
(``weight_decay_view`` → ``WeightDecayView``).

Wang & Aitchison (2024) read AdamW's weights as an exponential moving average of recent
updates over τ_iter = 1/(η·λ) updates, τ_epoch = τ_iter·B/N epochs (N training examples),
and find the best τ_epoch roughly constant across model and data size. On a study: τ per
batch size from its best trial's (η, λ); "constant across B" only when the slope's interval
contains 0. A batch size whose complete trials all used one weight decay has no best λ to
speak of, only the one value tried, and the view says so.

Pure: trials in, numbers and sentences out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from hpo.report.scaling import DEFAULT_CONFIDENCE, least_squares, student_t_quantile
from hpo.report.summary import complete_trials, trial_batch_size


@dataclass(frozen=True)
class WeightDecayRow:
    """One batch size: its best complete trial's (η, λ), how many distinct weight decays
    its complete trials tried, and τ_epoch with the interval the tried values allow (the
    log-midpoints to the nearest LR and weight decay tried on each side; None when the
    batch size tried only one of either, or the training set size is unknown)."""

    batch_size: int
    lr: float
    weight_decay: float
    n_weight_decays: int
    tau_epoch: float | None
    tau_low: float | None
    tau_high: float | None
    # Widths (log2) of the brackets around log2 η and log2 λ: the resolution of the point.
    lr_width: float | None = None
    weight_decay_width: float | None = None
    # "lowest" or "highest" where the best trial's λ is that end of the weight decays tried
    # at this batch size (two or more tried): the best λ may lie further out.
    weight_decay_end: str | None = None

    @property
    def searched(self) -> bool:
        return self.n_weight_decays >= 2


@dataclass(frozen=True)
class WeightDecayView:
    """The rows, the training set size N, and the slope of log τ on log B with its
    ``confidence`` interval (None with fewer than three batch sizes with a τ)."""

    rows: tuple[WeightDecayRow, ...]
    train_size: int | None
    slope: float | None
    slope_low: float | None
    slope_high: float | None
    confidence: float = DEFAULT_CONFIDENCE
    # The epochs the complete trials trained (the most any recorded, ``train_epochs``);
    # None when none recorded it (a budget in steps or seconds records none).
    epochs_trained: float | None = None

    @property
    def constant(self) -> bool | None:
        """Whether the slope's interval contains 0 (None without an interval)."""
        if self.slope_low is None or self.slope_high is None:
            return None
        return self.slope_low <= 0.0 <= self.slope_high

    def describe(self) -> str:
        """Sentences for the summary, generated from the rows, the slope's interval and
        how τ compares with the epochs trained."""
        barely, ends = self._barely_acts(), self._describe_ends()
        return self._describe_slope() + (f" {barely}" if barely else "") + ends

    def _barely_acts(self) -> str:
        """Where τ_epoch (its interval's lower end where it has one) is more than
        ``BARELY_ACTS`` × the epochs trained: weight decay shrank the weights by only
        exp(−epochs/τ) over a run, so the trials hardly tell one λ from another."""
        epochs = self.epochs_trained
        rows = [r for r in self.rows if r.tau_epoch is not None]
        slow = self.barely_acted()
        if epochs is None or not slow:
            return ""
        shortest = min(r.tau_epoch for r in slow)  # type: ignore[type-var]
        where = (
            "at every batch size"
            if len(slow) == len(rows)
            else f"at B = {_list([r.batch_size for r in slow])}"
        )
        shrink = 100 * (1 - math.exp(-epochs / shortest))
        return (
            f"Weight decay barely acted {where}: τ_epoch there ({shortest:.3g} epochs or more) "
            f"is over {BARELY_ACTS:g}× the {epochs:g} epoch{'' if epochs == 1 else 's'} each "
            f"trial trained, so over a run it pulled the weights toward zero by at most "
            f"{shrink:.2g}% (1 − exp(−epochs/τ)); these trials say little about the λ a longer "
            "run needs."
        )

    def _describe_ends(self) -> str:
        """The caution where a batch size's best λ is the lowest or highest it tried; where
        it is the lowest at every batch size that tried two or more, weight decay did not
        help within the range tried."""
        ends = [r for r in self.rows if r.searched and r.weight_decay_end]
        if not ends:
            return ""
        listed = ", ".join(f"B = {r.batch_size} ({r.weight_decay_end})" for r in ends)
        text = (
            f" Caution: at {listed} the best trial used the extreme weight decay tried there, "
            "so that batch size's best λ may lie further out, and τ_epoch with it."
        )
        if lowest_won_everywhere([r for r in self.rows if r.searched]):
            text += (
                " The lowest weight decay tried won at every batch size: within the range "
                "searched weight decay did not help, and a lower range may do as well or better."
            )
        return text

    def barely_acted(self) -> list[WeightDecayRow]:
        """The rows whose τ_epoch (its interval's lower end where it has one) is over
        ``BARELY_ACTS`` × the epochs trained: there the trials could hardly tell one λ from
        another. Empty when the epochs trained are not recorded."""
        epochs = self.epochs_trained
        if epochs is None or epochs <= 0:
            return []
        return [
            r
            for r in self.rows
            if r.tau_epoch is not None and (r.tau_low or r.tau_epoch) > BARELY_ACTS * epochs
        ]

    def _describe_slope(self) -> str:
        if not self.rows:
            return "Weight decay: no complete trial yet."
        fixed = [row.batch_size for row in self.rows if not row.searched]
        text = ""
        if len(fixed) == len(self.rows):
            return (
                "Weight decay was not varied: every batch size's complete trials used one "
                "weight decay, so the best λ per batch size is only the value tried and "
                "nothing here says whether another would be better."
            )
        if fixed:
            text += (
                f"Weight decay was not varied at B = {_list(fixed)} (one value among its "
                "complete trials): its λ there is the value tried, not a best. "
            )
        if self.train_size is None:
            return text + "τ_epoch = B/(η·λ·N) needs the training set size, which is not stored."
        percent = f"{self.confidence:.0%}"
        if self.slope is None or self.slope_low is None or self.slope_high is None:
            # two batch sizes give a slope but no interval (no scatter to measure)
            return text + (
                "τ_epoch = B/(η·λ·N) needs three or more batch sizes with a searched weight "
                "decay before its trend across batch sizes can be told."
            )
        text += (
            f"The AdamW/SGD timescale τ_epoch = B/(η·λ·N) (N = {self.train_size:,}) of each "
            f"batch size's best trial: slope of log τ on log B = {self.slope:.2f} ({percent} "
            f"interval {self.slope_low:.2f} to {self.slope_high:.2f}); "
        )
        if self.constant:
            text += "τ is consistent with constant across batch size (the interval contains 0)"
            if self.slope_high - self.slope_low > 2.0:
                text += (
                    ", but the interval is wide: more weight decays per batch size would narrow it"
                )
            return text + "."
        trend = "grows" if self.slope > 0 else "falls"
        return text + f"τ {trend} with batch size: not constant (the interval excludes 0)."


# τ_epoch above this many times the epochs trained: weight decay has barely acted.
BARELY_ACTS = 10.0


def _list(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def training_set_size(
    class_counts: dict[str, dict[str, int]], trials: list[FrozenTrial]
) -> int | None:
    """N: the stored train split's patches, else from a trial's updates, batch size and
    epochs (``n_updates``·B/``train_epochs``); None when neither is recorded."""
    train = class_counts.get("train")
    if train:
        return int(sum(train.values()))
    for trial in trials:
        updates, epochs = trial.user_attrs.get("n_updates"), trial.user_attrs.get("train_epochs")
        batch_size = trial_batch_size(trial)
        if (
            isinstance(updates, int)
            and isinstance(epochs, int | float)
            and epochs > 0
            and batch_size
        ):
            return round(updates * batch_size / epochs)
    return None


def _bracket(value: float, tried: list[float]) -> tuple[float, float] | None:
    """log2 bounds around log2 ``value``: the midpoints to the nearest other tried value on
    each side (one side only: the same distance both ways); None when nothing else was
    tried."""
    y = math.log2(value)
    below = [y - math.log2(t) for t in tried if math.log2(t) < y - 1e-9]
    above = [math.log2(t) - y for t in tried if math.log2(t) > y + 1e-9]
    if not below and not above:
        return None
    down = min(below) / 2 if below else min(above) / 2
    up = min(above) / 2 if above else min(below) / 2
    return y - down, y + up


def lowest_won_everywhere(rows: list[WeightDecayRow]) -> bool:
    """Whether the best trial used the lowest weight decay tried at every one of ``rows``
    (some): within the range searched, weight decay did not help."""
    return bool(rows) and all(row.weight_decay_end == "lowest" for row in rows)


def _end(value: float, tried: list[float]) -> str | None:
    """ "lowest" or "highest" where ``value`` is that end of two or more distinct ``tried``."""
    distinct = {round(math.log(t), 9) for t in tried if t > 0}
    if len(distinct) < 2 or value <= 0:
        return None
    here = round(math.log(value), 9)
    return "lowest" if here == min(distinct) else "highest" if here == max(distinct) else None


def weight_decay_view(
    trials: list[FrozenTrial],
    maximize: bool,
    class_counts: dict[str, dict[str, int]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> WeightDecayView:
    """The view from the study's trials (``maximize``: the study's direction)."""
    complete = [
        t for t in complete_trials(trials) if "lr" in t.params and "weight_decay" in t.params
    ]
    tried = [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and "lr" in t.params
        and "weight_decay" in t.params
    ]
    train_size = training_set_size(class_counts, trials)
    by_batch: dict[int, list[FrozenTrial]] = {}
    for trial in complete:
        if (batch_size := trial_batch_size(trial)) is not None:
            by_batch.setdefault(batch_size, []).append(trial)
    rows = []
    for batch_size in sorted(by_batch):
        mine = by_batch[batch_size]
        best = (max if maximize else min)(mine, key=lambda t: t.value)
        around = [t for t in tried if trial_batch_size(t) == batch_size]
        rows.append(_row(batch_size, best, mine, around, train_size))
    slope, low, high = _slope([r for r in rows if r.searched and r.tau_epoch], confidence)
    epochs = [
        float(e)
        for t in complete
        if isinstance(e := t.user_attrs.get("train_epochs"), int | float) and math.isfinite(e)
    ]
    return WeightDecayView(
        tuple(rows), train_size, slope, low, high, confidence, max(epochs, default=None)
    )


def _row(
    batch_size: int,
    best: FrozenTrial,
    complete: list[FrozenTrial],
    around: list[FrozenTrial],
    train_size: int | None,
) -> WeightDecayRow:
    lr, weight_decay = float(best.params["lr"]), float(best.params["weight_decay"])
    n_decays = len({round(math.log(float(t.params["weight_decay"])), 9) for t in complete})
    lr_bracket = _bracket(lr, [float(t.params["lr"]) for t in around])
    decays_tried = [float(t.params["weight_decay"]) for t in around]
    wd_bracket = _bracket(weight_decay, decays_tried)
    # How finely the tried values place the point; needs no N: the prediction of λ uses it
    # where τ_epoch cannot be given.
    resolution = {
        "lr_width": None if lr_bracket is None else lr_bracket[1] - lr_bracket[0],
        "weight_decay_width": None if wd_bracket is None else wd_bracket[1] - wd_bracket[0],
        "weight_decay_end": _end(weight_decay, decays_tried),
    }
    if train_size is None or weight_decay <= 0:
        return WeightDecayRow(
            batch_size, lr, weight_decay, n_decays, None, None, None, **resolution
        )
    tau = batch_size / (lr * weight_decay * train_size)
    low = high = None
    if lr_bracket is not None and wd_bracket is not None:
        scale = batch_size / train_size
        low = scale / 2.0 ** (lr_bracket[1] + wd_bracket[1])
        high = scale / 2.0 ** (lr_bracket[0] + wd_bracket[0])
    return WeightDecayRow(batch_size, lr, weight_decay, n_decays, tau, low, high, **resolution)


def _slope(
    rows: list[WeightDecayRow], confidence: float
) -> tuple[float | None, float | None, float | None]:
    """Slope of log2 τ on log2 B and its interval: Student's t, the standard error the
    larger of the points' scatter and the brackets' resolution (each log2 τ uniform over
    its bracket, σ = width/√12, the LR's and the weight decay's widths added in quadrature)."""
    if len(rows) < 2:
        return None, None, None
    points = [(row.batch_size, row.tau_epoch) for row in rows]
    slope, _, scatter = least_squares(points)  # type: ignore[arg-type]
    if scatter is None:
        return slope, None, None
    xs = [math.log2(row.batch_size) for row in rows]
    mean_x = sum(xs) / len(xs)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    variance = sum(
        (x - mean_x) ** 2 * ((row.lr_width or 0.0) ** 2 + (row.weight_decay_width or 0.0) ** 2) / 12
        for x, row in zip(xs, rows, strict=True)
    )
    standard_error = max(scatter, math.sqrt(variance) / sxx)
    half = student_t_quantile(0.5 + confidence / 2, len(rows) - 2) * standard_error
    return slope, slope - half, slope + half
