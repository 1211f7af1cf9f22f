"""Epochs of training until a search first reaches the grid's best: grid vs random vs hpo.

On the demo task (``studies/demo.toml``: synthetic H&E-like patches, small CNN; the figures
in docs/benchmarks.md were measured on an earlier demo configuration: batch 16-512, LR
1e-4-1, weight decay 1e-6-1e-2, 4 epochs per trial):

- grid: every config of the literature-style grid (each power-of-two batch size x 3
  log-spaced LRs x 1 weight decay, ``hpo.space.grid_search_space``) trained to the last
  epoch. Its cost is all of it (``grid_epochs``): a grid search only knows its best after
  running every config. Its best val metric (over all configs and epochs) minus 0.01 is
  the target.
- random: random search over the same continuous space, every trial trained to the end.
- hpo: the demo's own search (multivariate TPE + median pruning after the warm-up).

For random and hpo, the figure is the number of epochs trained (pruned trials count the
epochs they ran) until a trial first reports a val metric >= target; median over
``--seeds`` seeds (spec seed and sampler seed both = the seed). A run that has not reached
the target within ``--max-epochs`` (default: the grid's cost) counts as that many epochs.
Trials run one after another in this process, through ``hpo.objective.train_trial``, with
in-memory storage.

Run: ``uv run python benchmarks/cost_to_target.py --json cost.json``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import optuna
import torch

from hpo.data import load_splits
from hpo.objective import train_trial
from hpo.space import make_pruner, make_sampler
from hpo.spec import StudySpec, load_spec

TOLERANCE = 0.01


def with_changes(spec: StudySpec, **tables: dict) -> StudySpec:
    """A copy of ``spec`` with some fields of some tables replaced (validated again)."""
    data = json.loads(spec.to_json())
    for table, fields in tables.items():
        if isinstance(fields, dict):
            data[table].update(fields)
        else:
            data[table] = fields
    return StudySpec.model_validate(data)


class _Budget:
    """Counts epochs across trials; stops the study at the target or at the epoch cap."""

    def __init__(self, target: float | None, max_epochs: float, metric_sign: float) -> None:
        self.target, self.max_epochs, self.sign = target, max_epochs, metric_sign
        self.epochs = 0
        self.reached_at: int | None = None
        self.best = -math.inf

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        for epoch in sorted(trial.intermediate_values):
            value = self.sign * trial.intermediate_values[epoch]
            self.best = max(self.best, value)
            if self.reached_at is None and self.target is not None and value >= self.target:
                self.reached_at = self.epochs + epoch
        # A diverged trial also trained (part of) the epoch it diverged in.
        diverged = trial.user_attrs.get("fail_reason") == "diverged"
        self.epochs += len(trial.intermediate_values) + int(diverged)
        if self.reached_at is not None or self.epochs >= self.max_epochs:
            study.stop()


def run_search(spec: StudySpec, splits, target: float | None, max_epochs: float,
               n_trials: int | None = None) -> _Budget:  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=spec.objective.direction,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
    )
    sign = 1.0 if spec.objective.direction == "maximize" else -1.0
    budget = _Budget(None if target is None else sign * target, max_epochs, sign)
    study.optimize(
        lambda trial: train_trial(trial, spec, splits=splits),
        n_trials=n_trials,
        callbacks=[budget],
    )
    return budget


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="study file name or path (demo)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for random and hpo (3)")
    parser.add_argument("--max-epochs", type=float, default=None,
                        help="epoch cap per random/hpo run (the grid's cost)")  # fmt: skip
    parser.add_argument("--train-size", type=int, default=None,
                        help="shrink the task: training patches (the study's)")  # fmt: skip
    parser.add_argument("--val-size", type=int, default=None, help="validation patches")
    parser.add_argument("--image-size", type=int, default=None, help="patch side in pixels")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"target = grid's best - this ({TOLERANCE})")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny task: 256/128 patches of 16 px, 2 epochs, 1 seed, cap 4")  # fmt: skip
    args = parser.parse_args(argv)

    spec = load_spec(args.study)
    dataset: dict = {}
    if args.quick:
        args.seeds, args.max_epochs = 1, args.max_epochs or 4
        dataset = {"train_size": 256, "val_size": 128, "image_size": 16, "cache_dir": None}
        spec = with_changes(
            spec, budget={"epochs": 2}, pruner={"min_epochs": 1}, search={"batch_size_max": 64}
        )
    for name in ("train_size", "val_size", "image_size"):
        if getattr(args, name) is not None:
            dataset[name] = getattr(args, name)
    if dataset:
        spec = with_changes(spec, dataset=dataset)
    torch.set_num_threads(spec.training.num_threads or os.cpu_count() or 1)
    splits = load_splits(spec.dataset)
    started = time.perf_counter()

    grid_spec = with_changes(spec, sampler={"kind": "grid"}, pruner={"kind": "none"})
    grid = run_search(grid_spec, splits, None, math.inf)
    grid_epochs = grid.epochs
    sign = 1.0 if spec.objective.direction == "maximize" else -1.0
    grid_best = sign * grid.best
    target = grid_best - sign * args.tolerance
    max_epochs = args.max_epochs or grid_epochs
    print(f"grid: {grid_epochs} epochs, best {spec.objective.metric} {grid_best:.4f}, "
          f"target {target:.4f}", flush=True)  # fmt: skip

    costs: dict[str, list[float]] = {"random": [], "hpo": []}
    for seed in range(args.seeds):
        for name in ("random", "hpo"):
            changes: dict = {"seed": seed}
            if name == "random":
                changes.update(sampler={"kind": "random", "seed": seed}, pruner={"kind": "none"})
            else:
                changes.update(sampler={"seed": seed})
            run_spec = with_changes(spec, **changes)
            run = run_search(run_spec, splits, target, max_epochs)
            cost = run.reached_at if run.reached_at is not None else max_epochs
            costs[name].append(cost)
            reached = "reached" if run.reached_at is not None else "NOT reached (capped)"
            print(f"seed {seed} {name}: {reached} after {cost} epochs "
                  f"(best {sign * run.best:.4f})", flush=True)  # fmt: skip

    result = {
        "grid_epochs": grid_epochs,
        "random_epochs": statistics.median(costs["random"]),
        "hpo_epochs": statistics.median(costs["hpo"]),
    }
    result["hpo_fraction_of_grid"] = result["hpo_epochs"] / grid_epochs
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"cost_to_target on {spec.name} ({spec.dataset.train_size} patches of "
        f"{spec.dataset.image_size} px, {spec.budget.epochs} epochs/trial, {args.seeds} seeds, "
        f"{time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f}): target "
        f"{spec.objective.metric} {target:.4f}; grid {grid_epochs} epochs, random "
        f"{result['random_epochs']:g} (runs {costs['random']}), hpo {result['hpo_epochs']:g} "
        f"(runs {costs['hpo']}) = {result['hpo_fraction_of_grid']:.0%} of the grid"
    )
    return result


if __name__ == "__main__":
    main()
