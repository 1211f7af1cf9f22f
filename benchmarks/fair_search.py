"""The demo study under the old search policy and the fair one, side by side.

- old: equal epochs, Optuna's median pruner over all trials, TPE alone (no fair-search
  settings: ``stratify_by_batch_size``, ``min_trials_per_batch_size`` and
  ``cover_batch_sizes`` off, the pruner's startup at 4 trials).
- median: an earlier demo policy: 30 trials, a first round of one trial per batch size at
  the square-root rule's LR, the median pruner from report 2 comparing a trial only with
  its own batch size (pruned trials counted), and no pruning at a batch size until 2 of
  its trials have completed.
- median20: the demo policy before the catch-up pruner: 20 trials, a first round of two
  LRs per batch size (×½ and ×2 the square-root rule's), the stratified median pruner from
  half an epoch with pruned trials counted, the floor of 2.
- fair: ``studies/demo.toml`` as shipped.

The old, median and median20 policies fix the study fields they are defined by (pruner,
sampler, trial count), so they stay the same policies whatever the demo ships.

Each policy runs the study once per seed, trials one after another in this process through
``hpo.study.create_or_load_study`` (SQLite in a temp dir) and ``hpo.objective.train_trial``.
Printed per policy and seed: wall time, trials by state, complete and pruned per batch
size, the fitted α with its 95% interval (``hpo.report.analysis.fit_lr_scaling``), the
best and median complete value, and the training spent (epochs summed over trials).

Run: ``uv run python benchmarks/fair_search.py --json fair.json`` (``--quick`` shrinks the
task to seconds, for the test suite).
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from hpo.data import load_splits
from hpo.objective import train_trial
from hpo.replicates import replicate_trials
from hpo.report.analysis import fit_lr_scaling
from hpo.spec import StudySpec, load_spec
from hpo.study import create_or_load_study

REPO = Path(__file__).resolve().parents[1]


def _with(spec: StudySpec, **tables: dict) -> StudySpec:
    data = json.loads(spec.to_json())
    for table, fields in tables.items():
        data[table].update(fields)
    return StudySpec.model_validate(data)


def policies(spec: StudySpec) -> dict[str, StudySpec]:
    """The policies by name, on ``spec``'s task (apply ``quick`` after, not before: the old
    and median policies set the pruner's first report and the trial count themselves)."""
    old = _with(
        spec,
        pruner={
            "kind": "median",
            "min_epochs": 2,
            "stratify_by_batch_size": False,
            "compare_with_pruned": False,
            "min_trials_per_batch_size": 0,
            "n_startup_trials": 4,
        },
        sampler={"cover_batch_sizes": False, "n_startup_trials": 10},
        budget={"n_trials": 30},
    )
    median = _with(
        spec,
        pruner={
            "kind": "median",
            "min_epochs": 2,
            "n_startup_trials": 2,
            "stratify_by_batch_size": True,
            "min_trials_per_batch_size": 2,
            "compare_with_pruned": True,
            "min_trials_at_report": 1,
        },
        sampler={"cover_batch_sizes": True, "first_round_lrs": 1, "n_startup_trials": 10},
        budget={"n_trials": 30},
    )
    # The median policy from half an epoch, two LRs per batch size in the first round,
    # 20 trials: the demo's policy before the catch-up pruner.
    median20 = _with(
        median,
        pruner={"min_epochs": 1},
        sampler={"first_round_lrs": 2},
        budget={"n_trials": 20},
    )
    return {"old": old, "median": median, "median20": median20, "fair": spec}


def chosen_policies(spec: StudySpec, names: str, *, shrink: bool = False) -> dict[str, StudySpec]:
    """The comma-separated ``names`` of ``policies(spec)``, shrunk by ``quick`` if asked;
    an unknown name is an error naming the known ones."""
    known = policies(spec)
    wanted = [name for name in names.split(",") if name]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown policies {', '.join(unknown)}: choose from {', '.join(known)}")
    return {name: quick(known[name]) if shrink else known[name] for name in wanted}


def quick(spec: StudySpec) -> StudySpec:
    return _with(
        spec,
        dataset={"train_size": 128, "val_size": 64, "image_size": 32, "cache_dir": None},
        # the first round (up to 2 LRs x 3 batch sizes) and one trial of the sampler's
        search={"batch_size_min": 16, "batch_size_max": 64, "replicates": 0},
        budget={"epochs": 1, "reports": None, "n_trials": 7},
        pruner={"min_epochs": 1},
    )


def optimize(spec: StudySpec, seed: int, database: Path) -> tuple[StudySpec, optuna.Study, float]:
    """Run the study (spec and sampler seeded with ``seed``); the seeded spec, the study
    and the wall time in seconds."""
    # The search's trials only, as its own budget: the replicates (hpo.replicates) are
    # queued by hpo's claim, which study.optimize does not go through, and they change no
    # answer measured here.
    n_trials = spec.budget.n_trials - replicate_trials(spec, spec.budget.n_trials)
    spec = _with(
        spec,
        sampler={"seed": seed},
        search={"replicates": 0},
        budget={"n_trials": n_trials},
    ).model_copy(update={"seed": seed})
    loaded = create_or_load_study(spec, f"sqlite:///{database}")
    splits = load_splits(spec.dataset)
    started = time.perf_counter()
    loaded.study.optimize(lambda trial: train_trial(trial, spec, splits=splits), n_trials=n_trials)
    return spec, loaded.study, time.perf_counter() - started


def best_per_batch_size(study: optuna.Study, spec: StudySpec) -> dict[int, float | None]:
    """The best complete value at each batch size of the range (None: no complete trial)."""
    sign = 1.0 if spec.objective.direction == "maximize" else -1.0
    best: dict[int, float | None] = {b: None for b in spec.search.batch_sizes}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        batch_size = int(trial.user_attrs["batch_size"])
        current = best.get(batch_size)
        if current is None or sign * float(trial.value) > sign * current:
            best[batch_size] = float(trial.value)
    return best


def summarize(study: optuna.Study, spec: StudySpec, seed: int, wall: float) -> dict:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    values = [float(t.value) for t in complete if t.value is not None]
    fit = fit_lr_scaling(study)

    def per_batch(state: TrialState) -> dict[int, int]:
        counted = Counter(int(t.user_attrs["batch_size"]) for t in trials if t.state == state)
        return {b: counted.get(b, 0) for b in spec.search.batch_sizes}

    best = max(values) if values else None
    median = statistics.median(values) if values else None
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "states": dict(Counter(t.state.name for t in trials)),
        "complete_per_batch_size": per_batch(TrialState.COMPLETE),
        "pruned_per_batch_size": per_batch(TrialState.PRUNED),
        "best_per_batch_size": best_per_batch_size(study, spec),
        "alpha": fit.alpha,
        "alpha_interval": [fit.alpha_low, fit.alpha_high],
        "alpha_points": {b: lr for b, lr in fit.points},  # the fit's best LR per batch size
        "alpha_unbracketed": [f"{b} {side}" for b, side in fit.unbracketed],
        "best": best,
        "median_complete": median,
        "best_minus_median": None if best is None else best - median,
        "epochs_trained": sum(t.user_attrs.get("train_epochs", 0.0) for t in trials),
    }


def run_study(spec: StudySpec, seed: int, database: Path) -> dict:
    spec, study, wall = optimize(spec, seed, database)
    return summarize(study, spec, seed, wall)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies/demo.toml"))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--policies", default="old,fair", help="comma-separated: old, median, median20, fair"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = chosen_policies(load_spec(args.study), args.policies, shrink=args.quick)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, policy in chosen.items():
            results[name] = [
                run_study(policy, seed, Path(directory) / f"{name}-{seed}.db")
                for seed in range(args.seeds)
            ]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return results


if __name__ == "__main__":
    main()
