"""Is the study's critical batch size right? Its steps-to-target B_crit against a dense grid.

Ground truth: a dense grid run through hpo's own CLI (``hpo launch`` on a study file with
``[sampler] kind = "grid"``): every batch size of the range × ``--lrs`` log-spaced LRs × one
weight decay (the geometric middle of its range), no pruning, the study's budget and
report points, ``--grid-seeds`` seeds. A config's curve is its value at each report,
averaged over the grid seeds.

Then the study as shipped, ``--search-seeds`` seeds (spec and sampler seeded), each also
through ``hpo launch``. For each search: its B_crit from steps to target with the bootstrap
interval (``hpo.report.steps_to_target``: the target is the best value its weakest batch
size reaches), and the grid's B_crit *at that same target* (per batch size the fewest
updates any LR's mean curve needs, fitted to S(B) = S_min·(1 + B_crit/B) as the study's
is, upper bounds included). The goal: the study's interval contains the grid's B_crit for
every seed.

The case: the study file (``--study``, the demo by default) with ``--batch-sizes``,
``--lr-range``, ``--train-size``, ``--epochs``, ``--reports`` and ``--n-trials`` laid over
it, for one whose batch-size range spans B_crit (docs/benchmarks.md gives the command).

Printed as JSON: per seed the target, the study's value and interval, its steps per batch
size (``bounds``: those known only from above), the grid's B_crit and steps at that
target, and ``inside``.

Run: ``uv run python benchmarks/critical_batch.py --json critical.json`` (hours on 2 CPU
cores at the defaults: 5 batch sizes × 9 LRs × 2 seeds of the demo's trials); ``--quick``
shrinks it to a smoke test of the pipeline (tiny data, 3 batch sizes, 2 LRs, 1 grid seed)
for the test suite. ``--keep DIR`` keeps the study files and SQLite studies, the grid as
one study per seed and LR; a rerun with the same ``--keep`` reuses every finished one, so
a run cut off (e.g. by ``timeout``) resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import tomli_w

from hpo.report.steps_to_target import (
    batch_size_steps,
    crossing,
    fit_steps,
    measure_steps_to_target,
)
from hpo.report.summary import trial_batch_size
from hpo.spec import StudySpec, load_spec

REPO = Path(__file__).resolve().parents[1]


def with_tables(spec: StudySpec, **tables: dict) -> StudySpec:
    """``spec`` with fields of its tables replaced (``name=...`` for top-level fields)."""
    data = json.loads(spec.model_dump_json())
    for table, fields in tables.items():
        if isinstance(fields, dict):
            data[table] = {**data[table], **fields}
        else:
            data[table] = fields
    return StudySpec.model_validate(data)


def log_spaced(low: float, high: float, count: int) -> list[float]:
    if count == 1:
        return [math.sqrt(low * high)]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def grid_specs(spec: StudySpec, lrs: int, seed: int, chunked: bool) -> list[StudySpec]:
    """The grid for one seed: one study, or with ``chunked`` one study per LR (every batch
    size at that LR), chunks that ``launch`` keeps and reuses, so an interrupted run resumes
    where it stopped."""
    search = spec.search
    grid = log_spaced(search.lr_low, search.lr_high, lrs)
    chunks = [[lr] for lr in grid] if chunked else [grid]
    return [
        with_tables(
            spec,
            name=f"{spec.name}-grid-{seed}" + (f"-lr{index}" if chunked else ""),
            seed=seed,
            sampler={
                "kind": "grid",
                "seed": seed,
                "grid_lr": chunk,
                "grid_weight_decay": [
                    math.sqrt(search.weight_decay_low * search.weight_decay_high)
                ],
                "cover_batch_sizes": False,
            },
            pruner={"kind": "none"},
            budget={"n_trials": len(search.batch_sizes) * len(chunk)},
        )
        for index, chunk in enumerate(chunks)
    ]


def launch(spec: StudySpec, directory: Path, threads: int) -> optuna.Study:
    """``hpo launch`` on ``spec`` written as a study file; the finished study (its
    ``benchmark_wall_s`` set on it: the command's wall time). A study already in
    ``directory`` from the same study file with all its trials finished is reused, not run
    again; one left unfinished (an interrupted run) is started afresh."""
    path = directory / f"{spec.name}.toml"
    fields = json.loads(spec.model_dump_json(exclude_none=True))
    text = tomli_w.dumps(fields)
    database = directory / f"{spec.name}.db"
    storage = f"sqlite:///{database}"
    if database.exists() and path.exists() and path.read_text() == text:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        if len(study.get_trials(deepcopy=False, states=finished)) >= spec.budget.n_trials:
            return study
    database.unlink(missing_ok=True)
    path.write_text(text)
    command = [sys.executable, "-m", "hpo", "launch", "--study", str(path), "--storage", storage]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--threads", str(threads)], cwd=REPO, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    study = optuna.load_study(study_name=spec.name, storage=storage)
    study.set_user_attr("benchmark_wall_s", time.perf_counter() - started)
    return study


def grid_curves(studies: list[optuna.Study]) -> dict[tuple[int, float], list[tuple[float, float]]]:
    """Each config's curve (updates, value at each report), averaged over the grid seeds."""
    runs: dict[tuple[int, float], list[dict[int, float]]] = {}
    updates: dict[tuple[int, float], float] = {}
    for study in studies:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            key = (trial_batch_size(trial), round(float(trial.params["lr"]), 12))
            runs.setdefault(key, []).append(dict(trial.intermediate_values))
            updates[key] = float(trial.user_attrs["n_updates"])
    curves = {}
    for key, values in runs.items():
        reports = sorted(set.intersection(*(set(v) for v in values)))
        curves[key] = [
            (updates[key] * (i + 1) / len(reports), statistics.mean(v[r] for v in values))
            for i, r in enumerate(reports)
        ]
    return curves


def grid_b_crit(curves: dict, target: float, maximize: bool) -> dict:
    """The grid's steps to ``target`` per batch size (fewest over its LRs; an upper bound
    where an LR is past it at the first report) and B_crit, fitted as the study's is."""
    crossings: dict[int, list] = {}
    for (batch_size, _), curve in curves.items():
        crossings.setdefault(batch_size, []).append(crossing(curve, target, maximize))
    steps = {b: batch_size_steps(c) for b, c in sorted(crossings.items())}
    steps = {b: s for b, s in steps.items() if s is not None}
    fitted = fit_steps(
        [(b, s) for b, (s, exact) in steps.items() if exact],
        [(b, s) for b, (s, exact) in steps.items() if not exact],
    )
    return {
        "b_crit": None if fitted is None else fitted[1],
        "steps": {b: s for b, (s, _) in steps.items()},
        "bounds": [b for b, (_, exact) in steps.items() if not exact],
    }


def quick(spec: StudySpec) -> StudySpec:
    return with_tables(
        spec,
        dataset={"train_size": 256, "val_size": 64, "image_size": 32, "cache_dir": None},
        search={"batch_size_min": 16, "batch_size_max": 64},
        budget={"epochs": 1, "reports": 2, "n_trials": 6},
        pruner={"min_epochs": 1},
        sampler={"n_startup_trials": 6},
    )


def with_case(spec: StudySpec, args: argparse.Namespace) -> StudySpec:
    """The study file with the case's overrides (batch sizes, LR range, data, budget)."""
    search, budget, dataset = {}, {}, {}
    if args.batch_sizes:
        low, high = (int(v) for v in args.batch_sizes.split(":"))
        search.update(batch_size_min=low, batch_size_max=high)
    if args.lr_range:
        low, high = (float(v) for v in args.lr_range.split(":"))
        search.update(lr_low=low, lr_high=high)
    if args.train_size:
        dataset["train_size"] = args.train_size
    for name in ("epochs", "reports", "n_trials"):
        if getattr(args, name):
            budget[name] = getattr(args, name)
    tables = {"search": search, "budget": budget, "dataset": dataset}
    return with_tables(spec, **{table: fields for table, fields in tables.items() if fields})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies/demo.toml"))
    parser.add_argument("--lrs", type=int, default=9, help="grid LRs per batch size (9)")
    parser.add_argument("--grid-seeds", type=int, default=2)
    parser.add_argument("--search-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", help="LOW:HIGH, the study's batch-size range")
    parser.add_argument("--lr-range", help="LOW:HIGH, the study's LR range")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--reports", type=int)
    parser.add_argument("--n-trials", type=int, help="the search's trials")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--keep", type=Path, help="keep study files and SQLite studies here; a rerun reuses "
        "the finished ones (an interrupted run resumes)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = with_case(load_spec(args.study), args)
    if args.quick:
        spec = quick(spec)
        args.lrs, args.grid_seeds = min(args.lrs, 2), 1
    maximize = spec.objective.direction == "maximize"
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        grids = [
            launch(chunk, directory, args.threads)
            for seed in range(args.grid_seeds)
            for chunk in grid_specs(spec, args.lrs, seed, chunked=args.keep is not None)
        ]
        curves = grid_curves(grids)
        seeds = []
        for seed in range(args.search_seeds):
            seeded = with_tables(spec, name=f"{spec.name}-search-{seed}", seed=seed,
                                 sampler={"seed": seed})  # fmt: skip
            study = launch(seeded, directory, args.threads)
            measured = measure_steps_to_target(study.get_trials(), maximize, trial_batch_size)
            truth = grid_b_crit(curves, measured.target, maximize) if measured.target else {}
            grid_value = truth.get("b_crit")
            high = math.inf if measured.high is None else measured.high
            inside = None
            if grid_value is not None and measured.low is not None:
                inside = measured.low <= grid_value <= high
            seeds.append(
                {
                    "seed": seed,
                    "target": measured.target,
                    "b_crit": measured.b_crit,
                    "interval": [measured.low, measured.high],
                    "steps": dict(measured.steps),
                    "grid_b_crit": grid_value,
                    "grid_steps": truth.get("steps"),
                    "bounds": list(measured.bounds),
                    "grid_bounds": truth.get("bounds"),
                    "inside": inside,
                    "reason": measured.reason or None,
                    "wall_s": study.user_attrs.get("benchmark_wall_s"),
                }
            )
    result = {
        "study": spec.name,
        "grid": {"lrs": args.lrs, "seeds": args.grid_seeds, "configs": len(curves)},
        "seeds": seeds,
        "inside": sum(bool(s["inside"]) for s in seeds),
    }
    text = json.dumps(result, indent=2, default=lambda v: None if v == math.inf else str(v))
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
