"""Is hpo's answer right? The demo study against a dense grid on the same task.

Ground truth: every batch size of the range x ``--lrs`` log-spaced LRs x 1 weight decay
(the geometric middle of its range), no pruning, the full budget, ``--grid-seeds`` seeds; a
config's value is its mean over seeds. Then the study as shipped ("fair") and the old
policy ("old": equal epochs, median pruner over all trials, TPE alone; see
``fair_search.policies``), ``--hpo-seeds`` seeds each. Printed as JSON, per policy:

- ``grid_best``, ``hpo_best`` (median over seeds of each run's best);
- ``hpo_epochs_fraction``: median training of one hpo run (epochs summed over its trials,
  ``train_epochs``) / one pass of the grid (every config once);
- ``per_b_shortfall``: for each batch size, the grid's best there minus hpo's best there
  (median over seeds; null when a run has no complete trial at that batch size);
- ``alpha_grid`` (the fit on the grid's best LR per batch size, between grid points: the
  vertex of a parabola in log LR through the best grid LR and its neighbours; and
  ``best_point``, on the best grid LR itself) and ``alpha_hpo`` (each run's fit, with its
  95% interval), and whether each grid α lies in each interval;
- ``pruning_regret``: the grid's top-10% configs (at least one), enqueued into the first
  seed's study after it has run, and how many the policy's pruner prunes (goal 0);
- ``pruning_regret_same_seed``: of those pruned, how many were a top config in their own
  run: each pruned one is trained again with the same seed to the full budget, without
  pruning, and counts if that final value reaches the grid's top-10% cutoff (the lowest
  grid value among the top configs). A prune that run would have ended below the cutoff
  was right for that seed (grid values are means over seeds; one run of a top config can
  end poor). ``regret_trials`` lists each enqueued config: its state, the report it was
  pruned at and its value there, the same-seed final value and curve (every report), and
  whether the replay
  reproduced the pruned run's value at that report (``replay_matches``);
- ``pruning_regret_all_seeds``: the same two counts over the first ``--regret-seeds``
  seeds' studies (default 1: seed 0 only), each config once per seed: with 4 configs one
  seed's same-seed count moves by one with the seeds the trials happen to get.

Targets the shipped demo is designed to meet: hpo_best >= grid_best - 0.005 with
hpo_epochs_fraction <= 0.3; every per_b_shortfall <= 0.01; the grid's α inside hpo's
interval; pruning regret 0.

Run: ``uv run python benchmarks/answer_quality.py --json answer.json`` (an hour or more on 2
CPU cores; ``--quick`` shrinks everything to seconds for the test suite). To split it into
parts (e.g. to run the grid once and the searches later), ``--grid-cache grid.json``
stores the grid's results after it has run and reuses them on the next call (refused if the
study, LRs or seeds differ), ``--only grid`` stops after the grid, and ``--policies fair``
runs a subset of the policies; ``--keep DIR`` keeps each search's SQLite study there (for
``hpo report`` or a second look; the seed-0 studies also hold the regret trials, after the
first 30).
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hpo.data import load_splits
from hpo.device import select_device
from hpo.objective import train_trial
from hpo.report.analysis import fit_lr_scaling
from hpo.space import BATCH_PARAM
from hpo.spec import StudySpec, load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_search  # (a sibling script, not a package)

REPO = Path(__file__).resolve().parents[1]
REGRET_ATTR = "regret_config"  # user attr of the grid's top configs enqueued for regret


def log_spaced(low: float, high: float, count: int) -> list[float]:
    if count == 1:
        return [math.sqrt(low * high)]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def grid(spec: StudySpec, lrs: int, seeds: int, cache: Path | None = None) -> dict:
    """Every (B, lr) config trained to the end, once per seed; values averaged over seeds.

    With ``cache``: read from that file when it holds this grid (same spec, LRs, seeds and
    numerics), else computed and written there."""
    wanted = {"spec": grid_fields(spec), "lrs": lrs, "seeds": seeds, "numerics": numerics(spec)}
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] != wanted:
            differ = _differences(stored["key"], wanted)
            raise SystemExit(f"{cache} holds another grid: {', '.join(differ)} differ")
        mean = {(int(log2), float(lr)): value for log2, lr, value in stored["mean"]}
        return {**stored["grid"], "mean": mean}
    search = spec.search
    weight_decay = math.sqrt(search.weight_decay_low * search.weight_decay_high)
    configs = [
        {BATCH_PARAM: int(math.log2(b)), "lr": lr, "weight_decay": weight_decay}
        for b in search.batch_sizes
        for lr in log_spaced(search.lr_low, search.lr_high, lrs)
    ]
    values: dict[tuple[int, float], list[float]] = {}
    epochs_per_seed = 0.0
    for seed in range(seeds):
        seeded = spec.model_copy(update={"seed": seed})
        study = optuna.create_study(
            direction=spec.objective.direction, pruner=optuna.pruners.NopPruner()
        )
        for config in configs:
            study.enqueue_trial(config)
        splits = load_splits(seeded.dataset)
        study.optimize(
            lambda t, seeded=seeded, splits=splits: train_trial(t, seeded, splits=splits),
            n_trials=len(configs),
        )
        epochs = 0.0
        for trial in study.trials:
            key = (int(trial.params[BATCH_PARAM]), float(trial.params["lr"]))
            value = trial.value if trial.state == TrialState.COMPLETE else 0.5  # diverged
            values.setdefault(key, []).append(float(value))
            epochs += trial.user_attrs.get("train_epochs", 0.0)
        epochs_per_seed = epochs
    mean = {config: statistics.mean(v) for config, v in values.items()}
    result = {"epochs_per_seed": epochs_per_seed, "weight_decay": weight_decay}
    if cache is not None:
        rows = [[log2, lr, value] for (log2, lr), value in mean.items()]
        cache.write_text(json.dumps({"key": wanted, "grid": result, "mean": rows}, indent=1))
    return {**result, "mean": mean}


def numerics(spec: StudySpec) -> dict[str, str]:
    """The device kind and precision this process trains ``spec`` in: part of a cached
    grid's key, since the same config and seed end at a different value in bf16 than in
    fp32 (``training.mixed_precision`` is bf16 only on a CPU that has it), so a grid from
    another machine is not ground truth for a search here."""
    setup = select_device(spec.training)
    return {"device": setup.name, "precision": setup.precision}


def grid_fields(spec: StudySpec) -> dict:
    """The study's fields a grid's values depend on: not the pruner, the sampler, or how many
    trials a search draws (so a cached grid outlives a change to the search policy)."""
    fields = json.loads(spec.to_json())
    for name in ("pruner", "sampler"):
        fields.pop(name, None)
    for name in ("n_trials", "timeout_s"):
        fields["budget"].pop(name, None)
    return fields


def _differences(stored: object, current: object, where: str = "") -> list[str]:
    """The dotted names at which two JSON values differ (a study field, ``lrs``, ``seeds``)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        names = sorted(set(stored) | set(current))
        return [
            d for n in names for d in _differences(stored.get(n), current.get(n), f"{where}.{n}")
        ]
    return [] if stored == current else [where.lstrip(".")]


def grid_best_lrs(mean: dict[tuple[int, float], float], maximize: bool = True) -> dict[int, float]:
    """The grid's best LR at each batch size, between grid points: the vertex of the
    parabola in log LR through its best LR and that LR's two neighbours (kept within half a
    step of the best, where the parabola is trusted); the best LR itself at the range's ends.
    On a grid LRs 3/8 decade apart, the best grid point alone moves α in steps of 0.1-0.3."""
    sign = 1.0 if maximize else -1.0
    best = {}
    for log2_batch_size in sorted({log2 for log2, _ in mean}):
        row = sorted((lr, sign * v) for (log2, lr), v in mean.items() if log2 == log2_batch_size)
        top = max(range(len(row)), key=lambda i: row[i][1])
        if top in (0, len(row) - 1):
            best[2**log2_batch_size] = row[top][0]
            continue
        (low_lr, below), (lr, peak), (high_lr, above) = row[top - 1 : top + 2]
        curvature = below - 2 * peak + above
        step = math.log2(high_lr / lr)  # log-spaced: the same on both sides
        offset = 0.0 if curvature >= 0 else 0.5 * (below - above) / curvature
        best[2**log2_batch_size] = lr * 2.0 ** (step * max(-0.5, min(0.5, offset)))
    return best


def grid_alpha(spec: StudySpec, mean: dict[tuple[int, float], float]) -> dict:
    """α on the grid: ``fit_lr_scaling`` over one point per batch size at the grid's best LR
    between grid points (``grid_best_lrs``: the reference), and at its best grid point
    (``best_point``: what the grid alone says, coarser)."""
    maximize = spec.objective.direction == "maximize"
    by_vertex = _fit_points(spec, grid_best_lrs(mean, maximize))
    by_point = {}
    for (log2_batch_size, lr), value in mean.items():
        current = by_point.get(2**log2_batch_size)
        better = current is None or (value > current[1] if maximize else value < current[1])
        if better:
            by_point[2**log2_batch_size] = (lr, value)
    at_point = _fit_points(spec, {b: lr for b, (lr, _) in by_point.items()})
    return {**by_vertex, "best_point": at_point}


def _fit_points(spec: StudySpec, best_lrs: dict[int, float]) -> dict:
    """``fit_lr_scaling`` on one trial per batch size at ``best_lrs``."""
    study = optuna.create_study(direction=spec.objective.direction)
    high = int(math.log2(spec.search.batch_size_max))
    distributions = {
        BATCH_PARAM: IntDistribution(int(math.log2(spec.search.batch_size_min)), high),
        "lr": FloatDistribution(spec.search.lr_low, spec.search.lr_high, log=True),
    }
    for batch_size, lr in best_lrs.items():
        study.add_trial(
            create_trial(
                params={BATCH_PARAM: int(math.log2(batch_size)), "lr": lr},
                distributions=distributions,
                value=1.0,
                user_attrs={"batch_size": batch_size},
            )
        )
    fit = fit_lr_scaling(study, top_k=1)
    return {
        "alpha": fit.alpha,
        "interval": [fit.alpha_low, fit.alpha_high],
        "best_lr_per_batch_size": {b: lr for b, lr in fit.points},
    }


def pruning_regret(
    study: optuna.Study,
    spec: StudySpec,
    top: list[tuple[int, float]],
    weight_decay: float,
    cutoff: float,
) -> dict:
    """Enqueue ``top`` configs into ``study`` (its pruner as configured); the pruned count
    (``pruned``), how many of those were a top config in their own run (``same_seed``:
    replayed to the full budget with the trial's seed, final value at least ``cutoff`` in
    the study's direction) and one row per config (``trials``)."""
    # Trials still queued by the study (a first round larger than its budget) run first.
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    for log2_batch_size, lr in top:
        study.enqueue_trial(
            {BATCH_PARAM: log2_batch_size, "lr": lr, "weight_decay": weight_decay},
            user_attrs={REGRET_ATTR: True},
        )
    splits = load_splits(spec.dataset)
    study.optimize(lambda t: train_trial(t, spec, splits=splits), n_trials=waiting + len(top))
    sign = 1.0 if spec.objective.direction == "maximize" else -1.0
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.user_attrs.get(REGRET_ATTR):
            continue
        row: dict = {
            "batch_size": 2 ** int(trial.params[BATCH_PARAM]),
            "lr": float(trial.params["lr"]),
            "state": trial.state.name,
            "value": trial.value,
        }
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            report = max(trial.intermediate_values)
            replay = replay_unpruned(spec, trial, splits)
            final = replay.value
            row.update(
                pruned_at_report=report,
                value_at_prune=trial.intermediate_values[report],
                same_seed_final=final,
                same_seed_curve=[
                    replay.intermediate_values[k] for k in sorted(replay.intermediate_values)
                ],
                replay_matches=replay.intermediate_values.get(report)
                == trial.intermediate_values[report],
                regret=final is not None and sign * final >= sign * cutoff,
            )
        rows.append(row)
    pruned = sum(row["state"] == "PRUNED" for row in rows)
    return {
        "pruned": pruned,
        "same_seed": sum(bool(row.get("regret")) for row in rows),
        "trials": rows,
    }


def replay_unpruned(
    spec: StudySpec, trial: optuna.trial.FrozenTrial, splits: tuple
) -> optuna.trial.FrozenTrial:
    """``trial``'s config trained again to the full budget with the same training seed
    (``hpo.objective``: spec.seed + the trial's number), no pruner: what the pruned run
    would have reached."""
    seeded = spec.model_copy(update={"seed": spec.seed + trial.number})
    replay = optuna.create_study(
        direction=spec.objective.direction, pruner=optuna.pruners.NopPruner()
    )
    replay.enqueue_trial({k: trial.params[k] for k in (BATCH_PARAM, "lr", "weight_decay")})
    replay.optimize(lambda t: train_trial(t, seeded, splits=splits), n_trials=1)
    return replay.trials[0]  # its number is 0, so its seed is spec.seed + trial.number


def _inside(alpha: float | None, intervals: list[list[float | None]]) -> list[bool | None]:
    """Per run, whether ``alpha`` lies in its interval (None without one)."""
    return [
        None if low is None or high is None or alpha is None else low <= alpha <= high
        for low, high in intervals
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies/demo.toml"))
    parser.add_argument("--lrs", type=int, default=9)
    parser.add_argument("--grid-seeds", type=int, default=2)
    parser.add_argument("--hpo-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid-cache", type=Path, help="grid results file: reused if present")
    parser.add_argument("--only", choices=("all", "grid"), default="all")
    parser.add_argument(
        "--policies", default="old,fair", help="comma-separated: old, median, median20, fair"
    )
    parser.add_argument("--keep", type=Path, help="keep the search studies' SQLite files here")
    parser.add_argument(
        "--regret-seeds",
        type=int,
        default=1,
        help="enqueue the grid's top configs into the first N seeds' studies (1: seed 0 only)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(args.study)
    chosen = fair_search.chosen_policies(spec, args.policies, shrink=args.quick)
    if args.quick:
        spec = fair_search.quick(spec)
    truth = grid(spec, args.lrs, args.grid_seeds, args.grid_cache)
    mean = truth["mean"]
    grid_best = max(mean.values())
    grid_per_b = {
        b: max(v for (log2, _), v in mean.items() if 2**log2 == b) for b in spec.search.batch_sizes
    }
    alpha_grid = grid_alpha(spec, mean)
    ranked = sorted(mean, key=mean.get, reverse=True)
    top = ranked[: max(1, len(ranked) // 10)]
    result: dict = {
        "grid_best": grid_best,
        "grid_best_per_batch_size": grid_per_b,
        "grid_epochs": truth["epochs_per_seed"],
        "numerics": numerics(spec),
        "grid_values": [[2**log2, lr, value] for (log2, lr), value in sorted(mean.items())],
        "alpha_grid": alpha_grid,
        "policies": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        for name, policy in chosen.items():
            if args.only == "grid":
                continue
            runs, regrets = [], []
            for seed in range(args.hpo_seeds):
                database = Path(directory) / f"{name}-{seed}.db"
                if database.exists():
                    raise SystemExit(f"{database} exists: --keep needs a fresh directory")
                seeded, study, wall = fair_search.optimize(policy, seed, database)
                runs.append(fair_search.summarize(study, seeded, seed, wall))
                if seed < args.regret_seeds:
                    regrets.append(
                        pruning_regret(
                            study, seeded, top, truth["weight_decay"], min(mean[c] for c in top)
                        )
                    )
            regret = regrets[0] if regrets else None
            shortfall = {}
            for b in spec.search.batch_sizes:
                found = [r["best_per_batch_size"][b] for r in runs]
                shortfall[b] = None if None in found else grid_per_b[b] - statistics.median(found)
            bests = [r["best"] for r in runs if r["best"] is not None]
            intervals = [r["alpha_interval"] for r in runs]
            fields = json.loads(policy.to_json())
            result["policies"][name] = {
                "policy": {table: fields[table] for table in ("pruner", "sampler", "budget")},
                "hpo_best": statistics.median(bests) if bests else None,
                "hpo_epochs_fraction": statistics.median(r["epochs_trained"] for r in runs)
                / truth["epochs_per_seed"],
                "per_b_shortfall": shortfall,
                "alpha_hpo": [[r["alpha"], *r["alpha_interval"]] for r in runs],
                "alpha_grid_inside": _inside(alpha_grid["alpha"], intervals),
                "alpha_grid_best_point_inside": _inside(
                    alpha_grid["best_point"]["alpha"], intervals
                ),
                "pruning_regret": None if regret is None else regret["pruned"],
                "pruning_regret_same_seed": None if regret is None else regret["same_seed"],
                "regret_trials": None if regret is None else regret["trials"],
                "pruning_regret_all_seeds": {
                    "seeds": len(regrets),
                    "configs": len(regrets) * len(top),
                    "pruned": sum(r["pruned"] for r in regrets),
                    "same_seed": sum(r["same_seed"] for r in regrets),
                    "per_seed": [[r["pruned"], r["same_seed"]] for r in regrets],
                    "trials": [r["trials"] for r in regrets],
                },
                "top_configs": len(top),
                "runs": runs,
            }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
