"""Are hpo's predictions for untrained batch sizes right? Checked against a dense grid.

Ground truth: a dense grid run through hpo's own CLI (``hpo launch`` on a grid study:
every batch size from the study's smallest to ``--extend`` × its largest, × ``--lrs``
log-spaced LRs over the study's LR range, × one weight decay, no pruning), ``--grid-seeds``
times; a config's value is its mean over seeds, a diverged trial counts as chance (0.5).
The grid's best LR at each batch size is the peak of a quadratic in log LR fitted to the
grid points near its best, with an 80% interval from the grid's own noise (``grid_truth``:
on a flat, noisy top the argmax moves by an octave with the seeds); the grid's best value
is that quadratic's peak value (the largest of many noisy means reads high).

Then the study as shipped, launched through the CLI with ``--search-seeds`` seeds. From each
search study hpo predicts (``hpo.report.prediction.predict_configuration``, what
``hpo export --batch-size B`` answers):

- leave-one-batch-size-out: each studied batch size's best LR from the other batch sizes'
  points only;
- extrapolation: 2× and 4× the largest studied batch size (never trained by the search).

Each case records the predicted LR, its 80% interval, the model the study chose, and the
grid's peak LR there with its interval (``factor_to_interval``: the factor to the nearest
LR of that interval, 1 inside it). Goals (printed as ``goals``): the predicted LR within a factor 2 of
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
from answer_quality import log_spaced, numerics
from grid_truth import DEFAULT_WINDOW, Truth, grid_standard_error, grid_truth

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
    """{(batch size, lr): [value of each grid seed]}, read from ``--grid-cache`` when it
    holds this grid (the same study, LRs, seeds, device kind and precision), else run and
    written there. A cache written before each seed's value was kept holds only the means
    (one value per config)."""
    key = {"spec": json.loads(grid_spec(spec, args.extend, args.lrs, 0).to_json())}
    # the device kind and precision: the same config ends elsewhere in bf16 than in fp32
    key |= {"seeds": args.grid_seeds, "numerics": numerics(spec)}
    cache = args.grid_cache
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        # Judging stored searches trains nothing here: the grid's numerics need only match
        # theirs (both recorded), not this machine's.
        offline = args.runs_from is not None or args.cases_from is not None
        if _comparable(stored["key"], offline) != _comparable(key, offline):
            raise SystemExit(f"{cache} holds another grid (study, LRs, seeds or numerics differ)")
        if "values" in stored:
            return {(int(b), float(lr)): list(v) for b, lr, v in stored["values"]}
        return {(int(b), float(lr)): [value] for b, lr, value in stored["mean"]}
    values: dict[tuple[int, float], list[float]] = {}
    for seed in range(args.grid_seeds):
        study = launch(grid_spec(spec, args.extend, args.lrs, seed), directory, args.threads)
        for trial in study.get_trials(deepcopy=False):
            config = (trial_batch_size(trial), float(trial.params["lr"]))
            complete = trial.state == TrialState.COMPLETE
            values.setdefault(config, []).append(float(trial.value) if complete else 0.5)
    if cache is not None:
        mean = [[b, lr, statistics.mean(v)] for (b, lr), v in sorted(values.items())]
        rows = [[b, lr, v] for (b, lr), v in sorted(values.items())]
        cache.write_text(json.dumps({"key": key, "mean": mean, "values": rows}, indent=1))
    return values


def _comparable(key: dict, offline: bool) -> dict:
    """A grid key without the fields a config's value does not depend on: the search's
    replicates, and ``gpus_per_trial`` unset (one device, as 1 is); without the numerics when
    ``offline``."""
    key = json.loads(json.dumps(key))
    key["spec"].get("search", {}).pop("replicates", None)
    training = key["spec"].get("training", {})
    training["gpus_per_trial"] = training.get("gpus_per_trial") or 1
    if offline:
        key.pop("numerics", None)
    return key


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


def cases(study: optuna.Study, spec: StudySpec, extend: int) -> tuple[dict, list[dict]]:
    """The α fit's points of one search study ({"points", "point_sd"}: what a later
    ``--cases-from`` predicts from again) and every prediction from them (``predictions``,
    as ``hpo export`` makes them)."""
    fit = fit_lr_scaling(study)
    view = weight_decay_view(study.get_trials(deepcopy=False), is_maximize(study), {})
    found = predictions(list(fit.points), extend, spec.search.optimizer, fit.point_sd or 0.0, view)
    return {"points": [list(p) for p in fit.points], "point_sd": fit.point_sd or 0.0}, found


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


def judge(
    case: dict, truths: dict[int, Truth], mean: dict, maximize: bool, sigma: float = 0.0
) -> dict:
    """The case against the grid's peak (``grid_truth``): factor to its LR, whether the
    prediction is within 2x of the peak's own 80% interval, covered, value shortfall (the
    peak value less the grid's mean read off at the predicted LR) with its standard error
    (the peak value's and the read-off's, ``sigma`` each grid mean's)."""
    truth = truths[case["batch_size"]]
    low, high = case["lr_interval"] or (None, None)
    sign = 1.0 if maximize else -1.0
    best_mean = max(sign * v for (b, _), v in mean.items() if b == case["batch_size"]) * sign
    at_prediction = value_at(mean, case["batch_size"], case["lr"])
    truth_low, truth_high = truth.lr_interval
    share = _share(mean, case["batch_size"], case["lr"])
    read_off_se = sigma * math.sqrt(share**2 + (1 - share) ** 2) if math.isfinite(sigma) else 0.0
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
        "shortfall_se": math.hypot(truth.value_se, read_off_se) if math.isfinite(sigma) else None,
    }


def _share(mean: dict[tuple[int, float], float], batch_size: int, lr: float) -> float:
    """Where ``lr`` lies between its two neighbouring grid LRs (0 at the lower; 0 beyond
    the grid's ends): the weight ``value_at`` gives the upper one."""
    lrs = sorted(x for (b, x) in mean if b == batch_size)
    for low, high in zip(lrs, lrs[1:], strict=False):
        if low <= lr <= high:
            return math.log(lr / low) / math.log(high / low)
    return 0.0


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
    per_seed = grid(spec, args, directory)
    mean = {config: statistics.mean(v) for config, v in per_seed.items()}
    maximize = spec.objective.direction == "maximize"
    window = args.truth_window if args.truth_window is not None else DEFAULT_WINDOW
    sigma, source = grid_standard_error(mean, per_seed, maximize, window)
    if args.truth_window is None and "seed" in source:  # σ from the seeds, not the fits:
        window = max(DEFAULT_WINDOW, 4 * sigma)  # a noisier metric needs a wider top
    truths = grid_truth(mean, maximize, sigma, window)
    result: dict = {
        "grid_best_lr": {b: t.lr for b, t in truths.items()},
        "grid_best_lr_interval": {b: list(t.lr_interval) for b, t in truths.items()},
        "grid_best_value": {b: t.value for b, t in truths.items()},
        "grid_standard_error": {"value": sigma, "from": source},
        "truth_window": window,
        "grid_values": [[b, lr, v] for (b, lr), v in sorted(mean.items())],
    }
    if args.only == "grid":
        return result
    if args.runs_from is not None:
        judged = []
        for seed, points in stored_runs(args.runs_from):
            for case in predictions(points, args.extend, spec.search.optimizer, args.point_sd):
                judged.append(judge(case, truths, mean, maximize, sigma) | {"seed": seed})
        return result | {"cases": judged, "goals": goals(judged)}
    if args.cases_from is not None:
        judged = rejudged(json.loads(args.cases_from.read_text()), args, spec, truths, mean, sigma)
        return result | {"cases": judged, "goals": goals(judged)}
    judged, searches = [], []
    for seed in range(args.search_seeds):
        seeded = _with(spec, name=f"search-{seed}", seed=seed, sampler={"seed": seed})
        study = launch(seeded, directory, args.threads)
        fitted, found = cases(study, seeded, args.extend)
        searches.append({"seed": seed, **fitted})
        for case in found:
            row = judge(case, truths, mean, maximize, sigma) | {"seed": seed}
            if not args.no_train:
                row["value_trained"] = train_at(seeded, case, args.extend)
                sign = 1.0 if maximize else -1.0
                row["shortfall_trained"] = sign * (row["grid_best_value"] - row["value_trained"])
            judged.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return result | {"searches": searches, "cases": judged, "goals": goals(judged)}


def rejudged(
    stored: dict, args: argparse.Namespace, spec: StudySpec, truths, mean, sigma: float
) -> list:
    """The cases of an earlier ``--json`` file judged against this grid's reference: predicted
    again from each search's stored points where the file has them (so a changed prediction
    method is judged without searching again; no trained value then, it was trained at the
    old prediction), else as they were predicted."""
    maximize = spec.objective.direction == "maximize"
    judged = []
    if stored.get("searches"):
        for search in stored["searches"]:
            points = [(int(b), float(lr)) for b, lr in search["points"]]
            optimizer = spec.search.optimizer
            for case in predictions(points, args.extend, optimizer, search["point_sd"]):
                judged.append(judge(case, truths, mean, maximize, sigma) | {"seed": search["seed"]})
        return judged
    kept = ("kind", "batch_size", "lr", "lr_interval", "model_of_scaling", "seed")
    for old in stored["cases"]:
        case = {name: old[name] for name in kept}
        row = judge(case, truths, mean, maximize, sigma)
        if "value_trained" in old:
            sign = 1.0 if maximize else -1.0
            row["value_trained"] = old["value_trained"]
            row["shortfall_trained"] = sign * (row["grid_best_value"] - old["value_trained"])
        judged.append(row)
    return judged


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
    parser.add_argument(
        "--truth-window",
        type=float,
        help="grid points within this of a batch size's best mean enter its peak's quadratic "
        f"(default: {DEFAULT_WINDOW}, or 4 standard errors where the seeds give more)",
    )
    parser.add_argument("--keep", type=Path, help="keep the studies' files here")
    parser.add_argument(
        "--runs-from",
        type=Path,
        help="judge the search runs stored in this answer_quality.py JSON (no search, no "
        "training) instead of running searches",
    )
    parser.add_argument(
        "--cases-from",
        type=Path,
        help="judge the cases of an earlier --json file (predicted again from its searches' "
        "stored points where it has them) instead of running searches",
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
