"""How ``prediction_quality.py`` judges a prediction against its grid: the grid's reference
(``Reference``: the LR peaks on a grid with one weight decay, the best (LR, λ) pairs on a
grid with a weight-decay axis), each case against it (``judge``; ``prediction_wd`` for λ)
and the goals over all cases (``goals``). Sibling of ``prediction_quality.py`` (not a
package); pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
import statistics

from grid_truth import (
    DEFAULT_WINDOW,
    Cell,
    Truth,
    cell_standard_errors,
    grid_standard_error,
    grid_truth,
    pair_truth,
    tau_trend,
)
from prediction_wd import decay_tolerance, judge_decay, mean_at_decay, model_counts, tau_table

from hpo.report.prediction import leave_one_out_errors
from hpo.spec import StudySpec

FACTOR_GOAL = 2.0
VALUE_GOAL = 0.01
COVERAGE_GOAL = 0.8


def value_at(mean: dict[tuple[int, float], float], batch_size: int, lr: float) -> float:
    """The grid's mean value at ``lr``, linear in log LR between grid points (the end
    value beyond the grid's LRs)."""
    row = sorted((x, v) for (b, x), v in mean.items() if b == batch_size)
    if lr <= row[0][0]:
        return row[0][1]
    for (low, below), (high, above) in zip(row, row[1:], strict=False):
        if lr <= high:
            share = math.log(lr / low) / math.log(high / low)
            return below + share * (above - below)
    return row[-1][1]


def judge(
    case: dict, truths: dict[int, Truth], mean: dict, maximize: bool, sigma: float | dict = 0.0
) -> dict:
    """The case against the grid's peak (``grid_truth``): factor to its LR, whether the
    prediction is within 2x of the peak's own 80% interval, covered, value shortfall (the
    peak value less the grid's mean read off at the predicted LR) with its standard error
    (the peak value's and the read-off's; ``sigma``: each grid mean's, one for all or per
    config)."""
    truth = truths[case["batch_size"]]
    low, high = case["lr_interval"] or (None, None)
    sign = 1.0 if maximize else -1.0
    best_mean = max(sign * v for (b, _), v in mean.items() if b == case["batch_size"]) * sign
    at_prediction = value_at(mean, case["batch_size"], case["lr"])
    truth_low, truth_high = truth.lr_interval
    read_off_se = _read_off_se(mean, case["batch_size"], case["lr"], sigma)
    values = sigma.values() if isinstance(sigma, dict) else [sigma]
    known = all(map(math.isfinite, values))
    nearest = min(max(case["lr"], truth_low), truth_high)
    return case | {
        "grid_best_lr": truth.lr,
        "grid_best_lr_interval": [truth_low, truth_high],
        "factor": max(case["lr"], truth.lr) / min(case["lr"], truth.lr),
        "factor_to_interval": max(case["lr"], nearest) / min(case["lr"], nearest),
        "covered": None if low is None else low <= truth.lr <= high,
        "grid_best_value": truth.value,
        "grid_best_mean": best_mean,
        "value_from_grid": at_prediction,
        "shortfall_from_grid": sign * (truth.value - at_prediction),
        # None where the grid's noise is unknown (one seed, no fit with a residual)
        "shortfall_se": math.hypot(truth.value_se, read_off_se) if known else None,
    }


def _read_off_se(mean: dict, batch_size: int, lr: float, sigma: float | dict) -> float:
    """The standard error of ``value_at``: its two grid means' (``sigma``: one for all or
    each config's own), weighted as it weighs them; 0 where unknown."""
    share = _share(mean, batch_size, lr)
    if not isinstance(sigma, dict):
        return sigma * math.sqrt(share**2 + (1 - share) ** 2) if math.isfinite(sigma) else 0.0
    lrs = sorted(x for (b, x) in mean if b == batch_size)
    low = max([x for x in lrs if x <= lr], default=lrs[0])
    high = min([x for x in lrs if x >= lr], default=lrs[-1])
    found = math.hypot(share * sigma[(batch_size, high)], (1 - share) * sigma[(batch_size, low)])
    return found if math.isfinite(found) else 0.0


def _share(mean: dict[tuple[int, float], float], batch_size: int, lr: float) -> float:
    """Where ``lr`` lies between its two neighbouring grid LRs (0 at the lower; 0 beyond
    the grid's ends): the weight ``value_at`` gives the upper one."""
    lrs = sorted(x for (b, x) in mean if b == batch_size)
    for low, high in zip(lrs, lrs[1:], strict=False):
        if low <= lr <= high:
            return math.log(lr / low) / math.log(high / low)
    return 0.0


def goals(judged: list[dict]) -> dict:
    """The three goals over every case (and the trained-value one where trained)."""
    covered = [c["covered"] for c in judged if c["covered"] is not None]
    trained = [c["shortfall_trained"] for c in judged if "shortfall_trained" in c]
    result = {
        "cases": len(judged),
        "within_factor_2": sum(c["factor"] <= FACTOR_GOAL for c in judged),
        "max_factor": max((c["factor"] for c in judged), default=None),
        "within_factor_2_of_truth_interval": sum(
            c.get("factor_to_interval", c["factor"]) <= FACTOR_GOAL for c in judged
        ),
        "interval_width_median": statistics.median(
            [c["lr_interval"][1] / c["lr_interval"][0] for c in judged if c.get("lr_interval")]
            or [math.nan]
        ),
        "coverage_80": sum(covered) / len(covered) if covered else None,
        "within_0_01_from_grid": sum(c["shortfall_from_grid"] <= VALUE_GOAL for c in judged),
        "max_shortfall_from_grid": max((c["shortfall_from_grid"] for c in judged), default=None),
        # a miss the grid's noise does not explain: the shortfall beyond 0.01 by more than
        # the one-sided 80% bound of its standard error
        "beyond_0_01_past_noise": sum(
            c["shortfall_from_grid"] - VALUE_GOAL > 0.8416 * c["shortfall_se"]
            for c in judged
            if c.get("shortfall_se") is not None
        )
        if any(c.get("shortfall_se") is not None for c in judged)
        else None,
        "within_0_01_trained": sum(s <= VALUE_GOAL for s in trained) if trained else None,
        "max_shortfall_trained": max(trained) if trained else None,
        "models": model_counts(judged),
    }
    for kind in ("left out", "extrapolated"):
        mine = [c for c in judged if c["kind"] == kind]
        result[kind] = {
            "cases": len(mine),
            "within_factor_2": sum(c["factor"] <= FACTOR_GOAL for c in mine),
            "covered": sum(bool(c["covered"]) for c in mine),
        }
    result["met"] = {
        "factor_2": result["within_factor_2"] == len(judged),
        "coverage": result["coverage_80"] is not None and result["coverage_80"] >= COVERAGE_GOAL,
        "value_0_01_from_grid": result["within_0_01_from_grid"] == len(judged),
        "value_0_01_trained": None if not trained else result["within_0_01_trained"] == len(judged),
    }
    return result


class Reference:
    """The grid's reference and how a case is judged against it: the LR peaks alone on a
    grid with one weight decay; the best (LR, λ) pairs, λ judged too and the value read at
    the predicted (LR, λ), on a grid with a weight-decay axis."""

    def __init__(self, per_seed: dict, spec: StudySpec, window: float | None) -> None:
        """``per_seed``: each config's seeds' values, or its ``Cell`` where configs have
        different numbers of seeds (``grid_cells``)."""
        cells = {
            c: Cell(statistics.mean(v), len(v), tuple(v)) if isinstance(v, list | tuple) else v
            for c, v in per_seed.items()
        }
        mean3 = {config: cell.mean for config, cell in cells.items()}
        self.decays = sorted({wd for _, _, wd in mean3})
        self.maximize = spec.objective.direction == "maximize"
        self.mean3 = mean3
        # one weight decay: (batch size, lr) keys, as before the weight-decay axis
        self.mean = {(b, lr): v for (b, lr, _), v in mean3.items()}
        self.counts = {c if self.axis else c[:2]: cell.count for c, cell in cells.items()}
        self.window = window if window is not None else DEFAULT_WINDOW
        self.sigma, self.source = self._standard_error(cells)
        if window is None and "seed" in self.source:  # σ from the seeds, not the fits:
            self.window = max(DEFAULT_WINDOW, 4 * self.largest)  # a noisier metric: wider top
        self.tolerance = decay_tolerance(self.decays)
        self.pairs = {}
        if self.axis:
            self.pairs = pair_truth(mean3, self.maximize, self.sigma, self.window)
            self.truths = {
                b: Truth(p.lr, p.lr_interval, p.value, p.n_points, p.value_se)
                for b, p in self.pairs.items()
            }
        else:
            self.truths = grid_truth(self.mean, self.maximize, self.sigma, self.window)

    @property
    def axis(self) -> bool:
        return len(self.decays) > 1

    @property
    def largest(self) -> float:
        """The largest config's standard error (the one for all where they are equal)."""
        return max(self.sigma.values()) if isinstance(self.sigma, dict) else self.sigma

    def _standard_error(self, cells: dict) -> tuple[float | dict, str]:
        """One standard error for every config's mean where all have the same seeds, else
        each config's own (``cell_standard_errors``)."""
        keyed = self.mean3 if self.axis else self.mean
        per = {c if self.axis else c[:2]: cell for c, cell in cells.items()}
        if len(set(self.counts.values())) > 1:  # more seeds at some configs
            known = {c: list(cell.known) for c, cell in per.items()}
            return cell_standard_errors(keyed, known, self.counts, self.maximize, self.window)
        values = {c: list(cell.known) or [cell.mean] for c, cell in per.items()}
        return grid_standard_error(keyed, values, self.maximize, self.window)

    def judge(self, case: dict) -> dict:
        if not self.axis:
            return judge(case, self.truths, self.mean, self.maximize, self.sigma)
        decay = case.get("weight_decay") or math.sqrt(self.decays[0] * self.decays[-1])
        at_decay = mean_at_decay(self.mean3, case["batch_size"], decay)
        row = judge(case, self.truths, at_decay, self.maximize, self.sigma)
        return row | judge_decay(case, self.pairs[case["batch_size"]], self.tolerance)

    def summary(self, optimizer: str, train_size: int) -> dict:
        truths = self.truths
        result: dict = {
            "grid_best_lr": {b: t.lr for b, t in truths.items()},
            "grid_best_lr_interval": {b: list(t.lr_interval) for b, t in truths.items()},
            "grid_best_value": {b: t.value for b, t in truths.items()},
            "grid_standard_error": {"value": self.largest, "from": self.source}
            | (
                {"per_config": [[*c, e] for c, e in sorted(self.sigma.items())]}
                if isinstance(self.sigma, dict)
                else {}
            ),
            "grid_seeds": [[*c, n] for c, n in sorted(self.counts.items())],
            "truth_window": self.window,
            "grid_models_leave_one_out": leave_one_out_errors(
                [(float(b), t.lr) for b, t in truths.items()], optimizer
            ),
        }
        if self.axis:
            pairs = self.pairs
            result |= {
                "grid_weight_decays": self.decays,
                "grid_best_weight_decay": {b: p.weight_decay for b, p in pairs.items()},
                "grid_best_weight_decay_interval": {
                    b: list(p.weight_decay_interval) for b, p in pairs.items()
                },
                "weight_decay_tolerance": self.tolerance,
            }
            rows = [[b, lr, wd, v] for (b, lr, wd), v in sorted(self.mean3.items())]
            self.trend = tau_trend(pairs, train_size)
            result["tau"] = tau_table(self.trend, [])
        else:
            rows = [[b, lr, v] for (b, lr), v in sorted(self.mean.items())]
        return result | {"grid_values": rows}
