"""Are hpo's predictions for untrained batch sizes right? Checked against a dense grid.

Ground truth: a dense grid run through hpo's own CLI (``hpo launch`` on a grid study:
every batch size from the study's smallest to ``--extend`` × its largest, × ``--lrs``
log-spaced LRs over the study's LR range, × one weight decay, no pruning), ``--grid-seeds``
times; a config's value is its mean over seeds, a diverged trial counts as chance (0.5).
The grid's best LR at each batch size lies between grid points (the vertex of a parabola
in log LR, ``answer_quality.grid_best_lrs``).

Then the study as shipped, launched through the CLI with ``--search-seeds`` seeds. From each
search study hpo predicts (``hpo.report.prediction.predict_configuration``, what
``hpo export --batch-size B`` answers):

- leave-one-batch-size-out: each studied batch size's best LR from the other batch sizes'
  points only;
- extrapolation: 2× and 4× the largest studied batch size (never trained by the search).

Each case records the predicted LR, its 80% interval, the model the study chose, and the
grid's best LR there. Goals (printed as ``goals``): the predicted LR within a factor 2 of
the grid's best; the 80% interval covers the grid's best in at least 80% of cases; the
configuration trained at the prediction within 0.01 of the grid's best value at that batch
size. That last one is measured two ways: ``value_from_grid`` (the grid's mean value
interpolated in log LR at the predicted LR: no extra training, as many seeds as the grid)
and, unless ``--no-train``, ``value_trained`` (one run at the predicted configuration
through ``hpo.objective.train_trial``, the function every worker runs, seeded as the search
was; the LR clamped to the study's range).

Run: ``uv run python benchmarks/prediction_quality.py --grid-cache grid.json --json out.json``
(``--only grid`` stops after the grid; ``--quick`` shrinks everything for the test suite;
``--runs-from answer.json`` judges the search runs an ``answer_quality.py`` file stored,
their α fit's points, instead of running searches).
"""

from __future__ import annotations

# ruff: noqa: E402
from hpo.settings import default_omp_wait_policy

default_omp_wait_policy()  # as hpo's entry points do, before torch is imported

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import tomli_w
import torch
from optuna.trial import TrialState

from hpo.api import load
from hpo.data import load_splits
from hpo.objective import train_trial
from hpo.report.prediction import predict_configuration
from hpo.report.scaling import fit_lr_scaling
from hpo.report.summary import is_maximize, trial_batch_size
from hpo.report.weight_decay import weight_decay_view
from hpo.space import BATCH_PARAM
from hpo.spec import StudySpec, load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_search  # (sibling scripts, not a package)
from answer_quality import grid_best_lrs, log_spaced, numerics

REPO = Path(__file__).resolve().parents[1]
FACTOR_GOAL = 2.0
VALUE_GOAL = 0.01
COVERAGE_GOAL = 0.8


def _with(spec: StudySpec, **tables: dict) -> StudySpec:
    data = json.loads(spec.to_json())
    for table, fields in tables.items():
        data[table] = fields if table in ("name", "seed") else {**data[table], **fields}
    return StudySpec.model_validate(data)


def _without_none(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _toml(spec: StudySpec) -> str:
    return tomli_w.dumps(_without_none(json.loads(spec.to_json())))


def launch(spec: StudySpec, directory: Path, threads: int) -> optuna.Study:
    """``spec`` written as a study file and run by ``python -m hpo launch`` (one worker,
    SQLite in ``directory``); the finished study. A finished study of the same file
    already in ``directory`` (``--keep``) is reused."""
    path = directory / f"{spec.name}.toml"
    url = f"sqlite:///{directory / (spec.name + '.db')}"
    if (directory / f"{spec.name}.db").is_file():  # a finished study kept by --keep
        study = load(spec.name, storage=url).study
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        if len(finished) >= (spec.budget.n_trials or 0) and path.read_text() == _toml(spec):
            return study
        raise SystemExit(f"{directory} holds an unfinished or other {spec.name}: remove it")
    path.write_text(_toml(spec))
    command = [sys.executable, "-m", "hpo", "launch", "--study", str(path), "--storage", url]
    command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return load(spec.name, storage=url).study


def grid_spec(spec: StudySpec, extend: int, lrs: int, seed: int) -> StudySpec:
    """The grid study: batch sizes up to ``extend`` × the study's largest, ``lrs`` LRs,
    the weight decay range's geometric middle, no pruner, every config once."""
    search = spec.search
    grid_lrs = log_spaced(search.lr_low, search.lr_high, lrs)
    decay = math.sqrt(search.weight_decay_low * search.weight_decay_high)
    n_sizes = int(math.log2(search.batch_size_max * extend / search.batch_size_min)) + 1
    return _with(
        spec,
        name=f"grid-{seed}",
        seed=seed,
        search={"batch_size_max": search.batch_size_max * extend},
        pruner={"kind": "none"},
        budget={"n_trials": n_sizes * lrs, "timeout_s": None},
        sampler={"kind": "grid", "seed": seed, "grid_lr": grid_lrs, "grid_weight_decay": [decay]},
    )


def grid(spec: StudySpec, args: argparse.Namespace, directory: Path) -> dict:
    """{(batch size, lr): mean value over the grid's seeds}, read from ``--grid-cache``
    when it holds this grid (the same study, LRs, seeds, device kind and precision), else
    run and written there."""
    key = {"spec": json.loads(grid_spec(spec, args.extend, args.lrs, 0).to_json())}
    # the device kind and precision: the same config ends elsewhere in bf16 than in fp32
    key |= {"seeds": args.grid_seeds, "numerics": numerics(spec)}
    cache = args.grid_cache
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] != key:
            raise SystemExit(f"{cache} holds another grid (study, LRs or seeds differ)")
        return {(int(b), float(lr)): value for b, lr, value in stored["mean"]}
    values: dict[tuple[int, float], list[float]] = {}
    for seed in range(args.grid_seeds):
        study = launch(grid_spec(spec, args.extend, args.lrs, seed), directory, args.threads)
        for trial in study.get_trials(deepcopy=False):
            config = (trial_batch_size(trial), float(trial.params["lr"]))
            complete = trial.state == TrialState.COMPLETE
            values.setdefault(config, []).append(float(trial.value) if complete else 0.5)
    mean = {config: statistics.mean(v) for config, v in values.items()}
    if cache is not None:
        rows = [[b, lr, value] for (b, lr), value in sorted(mean.items())]
        cache.write_text(json.dumps({"key": key, "mean": rows}, indent=1))
    return mean


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


def cases(study: optuna.Study, spec: StudySpec, extend: int) -> list[dict]:
    """Every prediction of one search study (``predictions`` on its α fit's points, as
    ``hpo export`` makes them)."""
    fit = fit_lr_scaling(study)
    view = weight_decay_view(study.get_trials(deepcopy=False), is_maximize(study), {})
    return predictions(list(fit.points), extend, spec.search.optimizer, fit.point_sd or 0.0, view)


def predictions(
    points: list[tuple[int, float]],
    extend: int,
    optimizer: str,
    point_sd: float,
    view: object = None,
) -> list[dict]:
    """Each studied batch size predicted from the others' ``points`` (its best LR left
    out), and 2×, 4× … ``extend`` × the largest studied batch size from all of them."""

    def predict(known: list, batch_size: int):  # as predict_from_fit does
        return predict_configuration(known, batch_size, view, optimizer, point_sd=point_sd)

    found = []
    for batch_size, _ in points:
        found.append(("left out", predict([p for p in points if p[0] != batch_size], batch_size)))
    largest = max((b for b, _ in points), default=1)
    factor = 2
    while factor <= extend and points:
        found.append(("extrapolated", predict(points, largest * factor)))
        factor *= 2
    return [
        {
            "kind": kind,
            "batch_size": p.batch_size,
            "lr": p.lr,
            "lr_interval": list(p.lr_interval) if p.lr_interval else None,
            "model_of_scaling": p.model_of_scaling,
        }
        for kind, p in found
        if p is not None
    ]


def stored_runs(path: Path) -> list[tuple[int, list[tuple[int, float]]]]:
    """(seed, α fit points) of each search run of the shipped policy ("fair") in an
    ``answer_quality.py --json`` file: searches run earlier, judged here without rerunning."""
    runs = json.loads(path.read_text())["policies"]["fair"]["runs"]
    return [
        (run["seed"], sorted((int(b), float(lr)) for b, lr in run["alpha_points"].items()))
        for run in runs
    ]


def judge(case: dict, best_lrs: dict[int, float], mean: dict, maximize: bool) -> dict:
    """The case against the grid: factor to the grid's best LR, covered, value shortfall."""
    truth = best_lrs[case["batch_size"]]
    low, high = case["lr_interval"] or (None, None)
    sign = 1.0 if maximize else -1.0
    grid_best = max(sign * v for (b, _), v in mean.items() if b == case["batch_size"]) * sign
    at_prediction = value_at(mean, case["batch_size"], case["lr"])
    return case | {
        "grid_best_lr": truth,
        "factor": max(case["lr"], truth) / min(case["lr"], truth),
        "covered": None if low is None else low <= truth <= high,
        "grid_best_value": grid_best,
        "value_from_grid": at_prediction,
        "shortfall_from_grid": sign * (grid_best - at_prediction),
    }


def train_at(spec: StudySpec, case: dict, extend: int) -> float:
    """One run at the case's batch size and predicted LR (clamped to the study's LR range;
    the weight decay the grid used) through ``hpo.objective.train_trial``, the function
    every worker runs, seeded as the search study was; its value (0.5 if it diverged)."""
    search = spec.search
    wide = _with(spec, search={"batch_size_max": search.batch_size_max * extend})
    lr = min(max(case["lr"], search.lr_low), search.lr_high)
    decay = math.sqrt(search.weight_decay_low * search.weight_decay_high)
    study = optuna.create_study(
        direction=spec.objective.direction, pruner=optuna.pruners.NopPruner()
    )
    log2_batch_size = int(math.log2(case["batch_size"]))
    study.enqueue_trial({BATCH_PARAM: log2_batch_size, "lr": lr, "weight_decay": decay})
    splits = load_splits(wide.dataset)
    study.optimize(lambda t: train_trial(t, wide, splits=splits), n_trials=1)
    trial = study.trials[0]
    return float(trial.value) if trial.state == TrialState.COMPLETE else 0.5


def goals(judged: list[dict]) -> dict:
    """The three goals over every case (and the trained-value one where trained)."""
    covered = [c["covered"] for c in judged if c["covered"] is not None]
    trained = [c["shortfall_trained"] for c in judged if "shortfall_trained" in c]
    result = {
        "cases": len(judged),
        "within_factor_2": sum(c["factor"] <= FACTOR_GOAL for c in judged),
        "max_factor": max((c["factor"] for c in judged), default=None),
        "coverage_80": sum(covered) / len(covered) if covered else None,
        "within_0_01_from_grid": sum(c["shortfall_from_grid"] <= VALUE_GOAL for c in judged),
        "max_shortfall_from_grid": max((c["shortfall_from_grid"] for c in judged), default=None),
        "within_0_01_trained": sum(s <= VALUE_GOAL for s in trained) if trained else None,
        "max_shortfall_trained": max(trained) if trained else None,
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


def quick(spec: StudySpec) -> StudySpec:
    """Seconds instead of minutes: the shrunken demo of ``fair_search.quick`` over four
    batch sizes (leave-one-out needs three left) on a training set the largest grid batch
    size still steps through."""
    shrunk = fair_search.quick(spec)
    return _with(
        shrunk,
        dataset={"train_size": 256},
        search={"batch_size_min": 8, "batch_size_max": 64},
        budget={"n_trials": 8},
    )


def run(args: argparse.Namespace, directory: Path) -> dict:
    spec = load_spec(args.study)
    if args.quick:
        spec = quick(spec)
    mean = grid(spec, args, directory)
    maximize = spec.objective.direction == "maximize"
    best_lrs = grid_best_lrs({(int(math.log2(b)), lr): v for (b, lr), v in mean.items()}, maximize)
    result: dict = {
        "grid_best_lr": best_lrs,
        "grid_values": [[b, lr, v] for (b, lr), v in sorted(mean.items())],
    }
    if args.only == "grid":
        return result
    if args.runs_from is not None:
        judged = []
        for seed, points in stored_runs(args.runs_from):
            for case in predictions(points, args.extend, spec.search.optimizer, args.point_sd):
                judged.append(judge(case, best_lrs, mean, maximize) | {"seed": seed})
        return result | {"cases": judged, "goals": goals(judged)}
    judged = []
    for seed in range(args.search_seeds):
        seeded = _with(spec, name=f"search-{seed}", seed=seed, sampler={"seed": seed})
        study = launch(seeded, directory, args.threads)
        for case in cases(study, seeded, args.extend):
            row = judge(case, best_lrs, mean, maximize) | {"seed": seed}
            if not args.no_train:
                row["value_trained"] = train_at(seeded, case, args.extend)
                sign = 1.0 if maximize else -1.0
                row["shortfall_trained"] = sign * (row["grid_best_value"] - row["value_trained"])
            judged.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return result | {"cases": judged, "goals": goals(judged)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies/demo.toml"))
    parser.add_argument("--lrs", type=int, default=9, help="grid LRs over the study's range")
    parser.add_argument("--extend", type=int, default=4, help="grid up to this × the largest B")
    parser.add_argument("--grid-seeds", type=int, default=2)
    parser.add_argument("--search-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="skip training at predictions")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid-cache", type=Path, help="grid results file: reused if present")
    parser.add_argument("--only", choices=("all", "grid"), default="all")
    parser.add_argument("--keep", type=Path, help="keep the studies' files here")
    parser.add_argument(
        "--runs-from",
        type=Path,
        help="judge the search runs stored in this answer_quality.py JSON (no search, no "
        "training) instead of running searches",
    )
    parser.add_argument(
        "--point-sd",
        type=float,
        default=2 / math.sqrt(12),
        help="with --runs-from (no trials stored): how finely each best LR is located, log2 "
        "(default: LRs two octaves apart, the first round's pair)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the in-process runs at the predictions
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        result = run(args, directory)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
