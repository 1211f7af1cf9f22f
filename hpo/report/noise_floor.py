"""The noise floor: how far apart runs of one configuration land with other seeds, and
whether the winner beats the runner-up by more than that (``noise_floor`` → ``NoiseFloor``).

The runs: each replicated configuration's original trial and its complete replicates
(``hpo.replicates``). The spread is their pooled standard deviation,
s² = Σ_groups Σ (x − x̄_group)² / Σ_groups (n_group − 1), with its interval from the
chi-square distribution of (dof·s²/σ²) (dof = Σ (n_group − 1)): the seed-to-seed spread of one
run's value, assumed the same for every configuration.

The verdict compares the two best batch sizes of the search (its winner and runner-up) by
the mean of each one's best configuration's runs (one run where it has no replicate): the
margin's interval is Student's t with dof degrees of freedom times s·√(1/n_winner +
1/n_runner_up). "Beats it beyond the spread" only when that interval excludes 0.

Pure: trials in, numbers and sentences out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from hpo.replicates import REPLICATE_OF_ATTR, is_replicate
from hpo.report.scaling import DEFAULT_CONFIDENCE, student_t_quantile
from hpo.report.summary import BatchSizeRow, complete_trials, trial_batch_size

METHOD = "pooled SD of each replicated configuration's runs (original and replicates)"


@dataclass(frozen=True)
class Runs:
    """One configuration's runs: the original trial's number and every run's value."""

    batch_size: int
    trial: int
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)


@dataclass(frozen=True)
class NoiseFloor:
    """The spread (None without a replicated configuration of two or more runs), its
    interval and degrees of freedom, and the winner's margin over the runner-up with its
    interval (None without a spread or a runner-up)."""

    groups: tuple[Runs, ...]
    spread: float | None
    spread_low: float | None
    spread_high: float | None
    dof: int
    winner: Runs | None = None
    runner_up: Runs | None = None
    margin: float | None = None
    margin_low: float | None = None
    margin_high: float | None = None
    confidence: float = DEFAULT_CONFIDENCE
    # Why there is no spread (``hpo.replicates.why_no_replicates``), if known.
    why_none: str | None = None

    @property
    def beyond(self) -> bool | None:
        """Whether the winner beats the runner-up beyond the spread (the margin's interval
        excludes 0); None when that cannot be computed."""
        return None if self.margin_low is None else self.margin_low > 0

    def describe(self) -> str:
        """Sentences for the report and ``hpo status``, generated from the numbers."""
        if self.spread is None or self.spread_low is None or self.spread_high is None:
            return (
                f"Noise floor: none, {self.why_none or 'no replicate trial has completed'}; "
                "so nothing here says whether the winner's margin is larger than seed-to-seed "
                "spread."
            )
        percent = f"{self.confidence:.0%}"
        text = (
            f"Seed-to-seed spread: {self.spread:.4f} (pooled SD of {len(self.groups)} "
            f"configuration(s) run with {sum(len(g.values) for g in self.groups)} seeds in all, "
            f"{self.dof} degree(s) of freedom; {percent} interval {self.spread_low:.4f} to "
            f"{self.spread_high:.4f})."
        )
        if self.winner is None or self.runner_up is None or self.margin_high is None:
            return text + " With one batch size there is no runner-up to compare with."
        win, run = self.winner, self.runner_up
        text += (
            f" The winner, B = {win.batch_size}, {_runs(win)}; the runner-up, "
            f"B = {run.batch_size}, {_runs(run)}. The margin {self.margin:.4f} "
            f"({percent} interval {self.margin_low:.4f} to {self.margin_high:.4f})"
        )
        text += f" is {self.verdict()}"
        if self.beyond:
            return text + "."
        return text + "; more replicates (search.replicates) would narrow it."

    def verdict(self) -> str:
        """Whether the margin's interval excludes 0, in words ("" without a margin)."""
        if self.winner is None or self.runner_up is None or self.beyond is None:
            return ""
        win, run = self.winner.batch_size, self.runner_up.batch_size
        if self.beyond:
            return f"beyond the seed-to-seed spread: B = {win} beats B = {run} (the interval excludes 0)"
        return (
            f"within the seed-to-seed spread: these runs cannot tell B = {win} from B = {run} "
            "(the interval contains 0)"
        )

    def as_dict(self) -> dict[str, Any]:
        """``hpo export``'s ``seed_spread``: without a spread, only why (``none``)."""
        if self.spread is None:
            return {"none": self.why_none or "no replicate trial has completed"}
        spread: dict[str, Any] = {
            "value": self.spread,
            "interval": [self.spread_low, self.spread_high],
            "dof": self.dof,
            "method": METHOD,
            "confidence": self.confidence,
        }
        if self.margin is not None and self.winner and self.runner_up:
            spread["winner_margin"] = {
                "winner_batch_size": self.winner.batch_size,
                "runner_up_batch_size": self.runner_up.batch_size,
                "value": self.margin,
                "interval": [self.margin_low, self.margin_high],
                "beyond_spread": self.beyond,
            }
        return spread


def _runs(runs: Runs) -> str:
    values = ", ".join(f"{v:.4f}" for v in runs.values)
    if len(runs.values) == 1:
        return f"trial {runs.trial}, one run: {values}"
    return f"trial {runs.trial} and its replicates: {values} (mean {runs.mean:.4f})"


def noise_floor(
    trials: list[FrozenTrial],
    rows: list[BatchSizeRow],
    maximize: bool,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    why_none: str | None = None,
) -> NoiseFloor:
    """The floor from the study's trials and its search's best per batch size (``rows``,
    ``hpo.report.summary``: replicates left out)."""
    complete = {t.number: t for t in complete_trials(trials)}
    runs = {
        number: _runs_of(trial, complete.values())
        for number, trial in complete.items()
        if not is_replicate(trial)
    }
    groups = tuple(r for r in runs.values() if len(r.values) >= 2)
    dof = sum(len(g.values) - 1 for g in groups)
    if dof == 0:
        return NoiseFloor(groups, None, None, None, 0, confidence=confidence, why_none=why_none)
    squares = sum(sum((v - g.mean) ** 2 for v in g.values) for g in groups)
    spread = math.sqrt(squares / dof)
    low, high = _spread_interval(spread, dof, confidence)
    floor = NoiseFloor(groups, spread, low, high, dof, confidence=confidence)
    ranked = sorted(
        (r for r in rows if r.best_trial in runs and r.best_value is not None),
        key=lambda r: r.best_value,  # type: ignore[arg-type, return-value]
        reverse=maximize,
    )
    if len(ranked) < 2:
        return floor
    winner, runner_up = runs[ranked[0].best_trial], runs[ranked[1].best_trial]  # type: ignore[index]
    margin = (winner.mean - runner_up.mean) * (1.0 if maximize else -1.0)
    half = (
        student_t_quantile(0.5 + confidence / 2, dof)
        * spread
        * math.sqrt(1 / len(winner.values) + 1 / len(runner_up.values))
    )
    return NoiseFloor(
        groups, spread, low, high, dof, winner, runner_up,
        margin, margin - half, margin + half, confidence,
    )  # fmt: skip


def _runs_of(original: FrozenTrial, complete: Any) -> Runs:
    values = [float(original.value)]  # type: ignore[arg-type]
    values += [
        float(t.value)  # type: ignore[arg-type]
        for t in complete
        if is_replicate(t) and t.user_attrs.get(REPLICATE_OF_ATTR) == original.number
    ]
    return Runs(trial_batch_size(original) or 0, original.number, tuple(values))


def _spread_interval(spread: float, dof: int, confidence: float) -> tuple[float, float]:
    """σ's interval from dof·s²/σ² ~ χ²(dof)."""
    from scipy import stats

    tail = (1 - confidence) / 2
    upper = stats.chi2.ppf(1 - tail, dof)
    lower = stats.chi2.ppf(tail, dof)
    return spread * math.sqrt(dof / upper), spread * math.sqrt(dof / lower)
