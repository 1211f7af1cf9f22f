"""Are hpo's predictions for untrained batch sizes right? Checked against a dense grid.

Ground truth: a dense grid run through hpo's own CLI (``hpo launch`` on a grid study:
every batch size from the study's smallest to ``--extend`` × its largest, × ``--lrs``
log-spaced LRs over the study's LR range or ``--grid-lr-range``, × one weight decay or
``--grid-wds`` log-spaced over the study's weight-decay range, no pruning),
``--grid-seeds`` times; a config's value is its mean over seeds, a diverged trial counts
as chance (0.5). The cache is written after each seed and extended by the seeds it lacks;
``--grid-hold-s`` starts no grid trial after that long (the next run with the same
``--keep`` continues the unfinished seed), so a grid too long for one sitting runs in
pieces.
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

With a weight-decay axis the reference at each batch size is the best (LR, λ) pair
(``grid_truth.pair_truth``), each case's λ is judged too, the value is read off at the
predicted (LR, λ), and the grid's timescale τ_epoch = B/(η·λ·N) per batch size and its
trend are set beside each search's (``prediction_wd``).

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
their α fit's points, instead of running searches; ``--more-seeds N --around K`` brings the
K LRs nearest each batch size's peak to N seeds in the cache, ``grid_cells.py``).
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
import time
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
from hpo.report.weight_decay import WeightDecayView, weight_decay_view
from hpo.space import BATCH_PARAM
from hpo.spec import StudySpec, load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_search  # (sibling scripts, not a package)
import grid_cache
import grid_cells
from answer_quality import log_spaced, numerics
from grid_truth import DEFAULT_WINDOW, Cell
from prediction_judge import Reference, goals, judge, value_at  # noqa: F401 (judge, value_at: the tests')
from prediction_wd import decay_goals, stored_view, tau_table, view_from, without

REPO = Path(__file__).resolve().parents[1]


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


def _finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def launch(
    spec: StudySpec, directory: Path, threads: int, timeout: float | None = None
) -> optuna.Study | None:
    """``spec`` written as a study file and run by ``python -m hpo launch`` (one worker,
    SQLite in ``directory``); the finished study. A study of the same file already in
    ``directory`` (``--keep``) is reused when finished and continued when not (``hpo
    launch`` on the stored study, the trials still to run). With ``timeout`` (seconds) no
    trial starts after it, and an unfinished study gives None."""
    path = directory / f"{spec.name}.toml"
    url = f"sqlite:///{directory / (spec.name + '.db')}"
    command = [sys.executable, "-m", "hpo", "launch", "--study", str(path), "--storage", url]
    command += ["--threads", str(threads)]
    if (directory / f"{spec.name}.db").is_file():  # a study kept by --keep
        if path.read_text() != _toml(spec):
            raise SystemExit(f"{directory} holds another {spec.name}: remove it")
        left = (spec.budget.n_trials or 0) - _finished(load(spec.name, storage=url).study)
        if left <= 0:
            return load(spec.name, storage=url).study
        command += ["--n-trials", str(left)]
    if timeout is not None:
        if timeout < 1:  # no time left to start a trial
            return None
        command += ["--timeout", str(timeout)]
    path.write_text(_toml(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    study = load(spec.name, storage=url).study
    if timeout is not None and _finished(study) < (spec.budget.n_trials or 0):
        return None
    return study


def grid_spec(
    spec: StudySpec,
    extend: int,
    lrs: int,
    seed: int,
    wds: int = 1,
    lr_range: tuple[float, float] | None = None,
) -> StudySpec:
    """The grid study: batch sizes up to ``extend`` × the study's largest, ``lrs`` LRs
    log-spaced over ``lr_range`` (default the study's LR range), ``wds`` weight decays
    log-spaced over the study's weight-decay range (one: its geometric middle), no pruner,
    every config once."""
    search = spec.search
    grid_lrs = log_spaced(*(lr_range or (search.lr_low, search.lr_high)), lrs)
    decays = (
        [math.sqrt(search.weight_decay_low * search.weight_decay_high)]
        if wds == 1
        else log_spaced(search.weight_decay_low, search.weight_decay_high, wds)
    )
    n_sizes = int(math.log2(search.batch_size_max * extend / search.batch_size_min)) + 1
    return _with(
        spec,
        name=f"grid-{seed}",
        seed=seed,
        search={"batch_size_max": search.batch_size_max * extend},
        pruner={"kind": "none"},
        budget={"n_trials": n_sizes * lrs * len(decays), "timeout_s": None},
        sampler={"kind": "grid", "seed": seed, "grid_lr": grid_lrs, "grid_weight_decay": decays},
    )


def _grid_spec(spec: StudySpec, args: argparse.Namespace, seed: int) -> StudySpec:
    lr_range = tuple(args.grid_lr_range) if args.grid_lr_range else None
    return grid_spec(spec, args.extend, args.lrs, seed, args.grid_wds, lr_range)  # type: ignore[arg-type]


def grid(spec: StudySpec, args: argparse.Namespace, directory: Path) -> dict:
    """``grid_by_seed``'s grid; with ``--more-seeds`` first extended at the configs deciding
    each peak (``more_seeds``). Where the cache holds seeds added at single configs
    (``grid_cells``), each config's ``Cell`` (its mean and seeds) instead of its values."""
    values = grid_by_seed(spec, args, directory)
    for path in getattr(args, "grid_also", None) or []:
        values = grid_cache.merged_rows(values, path, _grid_spec(spec, args, 0), args.grid_seeds)
    if getattr(args, "more_seeds", 0) > args.grid_seeds:
        more_seeds(spec, args, values)
    cache = args.grid_cache
    stored = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if "seed_values" not in stored:
        return values
    decay = _grid_spec(spec, args, 0).sampler.grid_weight_decay or [0.0]
    return grid_cells.cells_of(stored, args.grid_seeds, decay[0])


def more_seeds(spec: StudySpec, args: argparse.Namespace, values: dict) -> int:
    """``--more-seeds``: the ``--around`` LRs nearest each batch size's peak (chosen on the
    grid's own seeds: the same configs however many were added before) brought to that many
    seeds one (config, seed) at a time, each saved to the cache at once; no new one starts
    after ``--hold-s`` seconds. Refused where this machine does not reproduce the cache
    (``grid_cells.extend_where_reproduced``). How many were added."""
    if args.grid_cache is None or args.grid_wds != 1:
        raise SystemExit("--more-seeds takes a --grid-cache of a grid with one weight decay")
    cells = {c: Cell(statistics.mean(v), len(v), tuple(v)) for c, v in values.items()}
    chosen = grid_cells.deciding(cells, spec.objective.direction == "maximize", args.around)
    deadline = time.time() + args.hold_s if args.hold_s else None
    torch.set_num_threads(args.threads)
    return grid_cells.extend_where_reproduced(
        args.grid_cache,
        lambda seed: _grid_spec(spec, args, seed),
        chosen,
        (args.grid_seeds, args.more_seeds),
        deadline,
    )


def grid_by_seed(spec: StudySpec, args: argparse.Namespace, directory: Path) -> dict:
    """{(batch size, lr, weight decay): [value of each grid seed]}, read from
    ``--grid-cache`` when it holds this grid (the same study, LRs, weight decays, device
    kind and precision; as many seeds or more), else run and written there after each
    seed, so a cache with fewer seeds is extended by the seeds it lacks. With
    ``--grid-hold-s`` no grid trial starts after that many seconds: the run ends with the
    seeds done cached and the unfinished seed's study kept in ``--keep``, where the next
    run continues it. A cache written before each seed's value was kept holds only the
    means (one value per config)."""
    base = _grid_spec(spec, args, 0)
    decays = list(base.sampler.grid_weight_decay or [])
    # the device kind and precision: the same config ends elsewhere in bf16 than in fp32
    key = {"spec": json.loads(base.to_json()), "seeds": 0, "numerics": numerics(spec)}
    values, cache = {}, args.grid_cache
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        # Judging stored searches trains nothing here: the grid's numerics need only match
        # theirs (both recorded), not this machine's.
        offline = args.runs_from is not None or args.cases_from is not None
        if grid_cache.comparable(stored["key"], offline) != grid_cache.comparable(key, offline):
            raise SystemExit(f"{cache} holds another grid (study, LRs or numerics differ)")
        key["seeds"], values = stored["key"]["seeds"], grid_cache.cached_values(stored, decays[0])
        if key["seeds"] >= args.grid_seeds and "values" in stored:
            return {config: v[: args.grid_seeds] for config, v in values.items()}
        if "values" not in stored:  # means only: usable as they are, not extended
            if key["seeds"] == args.grid_seeds:
                return values
            raise SystemExit(f"{cache} holds only means over {key['seeds']} seeds")
    deadline = None if args.grid_hold_s is None else time.monotonic() + args.grid_hold_s
    for seed in range(key["seeds"], args.grid_seeds):
        timeout = None if deadline is None else deadline - time.monotonic()
        study = launch(_grid_spec(spec, args, seed), directory, args.threads, timeout)
        if study is None:
            raise SystemExit(
                f"grid unfinished: seeds {key['seeds']} of {args.grid_seeds} done and cached; "
                "run again with the same --keep and --grid-cache to continue"
            )
        for trial in study.get_trials(deepcopy=False):
            config = (trial_batch_size(trial), float(trial.params["lr"]))
            config += (float(trial.params["weight_decay"]),)
            complete = trial.state == TrialState.COMPLETE
            values.setdefault(config, []).append(float(trial.value) if complete else 0.5)
        key["seeds"] = seed + 1
        if cache is not None:
            grid_cache.write_cache(cache, key, values, len(decays) > 1)
    return values


def cases(study: optuna.Study, spec: StudySpec, extend: int) -> tuple[dict, list[dict]]:
    """The α fit's points of one search study ({"points", "point_sd"}: what a later
    ``--cases-from`` predicts from again) and every prediction from them (``predictions``,
    as ``hpo export`` makes them)."""
    fit = fit_lr_scaling(study)
    view = weight_decay_view(study.get_trials(deepcopy=False), is_maximize(study), {})
    found = predictions(list(fit.points), extend, spec.search.optimizer, fit.point_sd or 0.0, view)
    points = [list(p) for p in fit.points]
    return {"points": points, "point_sd": fit.point_sd or 0.0, "view": stored_view(view)}, found


def predictions(
    points: list[tuple[int, float]],
    extend: int,
    optimizer: str,
    point_sd: float,
    view: WeightDecayView | None = None,
) -> list[dict]:
    """Each studied batch size predicted from the others' ``points`` (its best LR left
    out) and the weight-decay ``view``'s other rows, and 2×, 4× … ``extend`` × the largest
    studied batch size from all of them."""

    def predict(known: list, batch_size: int, decays: object):  # as predict_from_fit does
        return predict_configuration(known, batch_size, decays, optimizer, point_sd=point_sd)

    found = []
    for batch_size, _ in points:
        others = [p for p in points if p[0] != batch_size]
        found.append(("left out", predict(others, batch_size, without(view, batch_size))))
    largest = max((b for b, _ in points), default=1)
    factor = 2
    while factor <= extend and points:
        found.append(("extrapolated", predict(points, largest * factor, view)))
        factor *= 2
    return [
        {
            "kind": kind,
            "batch_size": p.batch_size,
            "lr": p.lr,
            "lr_interval": list(p.lr_interval) if p.lr_interval else None,
            "model_of_scaling": p.model_of_scaling,
            "weight_decay": p.weight_decay,
            "weight_decay_interval": list(p.weight_decay_interval)
            if p.weight_decay_interval
            else None,
            "weight_decay_note": p.weight_decay_note,
            "model_of_weight_decay": p.model_of_weight_decay,
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


def train_at(spec: StudySpec, case: dict, extend: int, predicted_decay: bool = False) -> float:
    """One run at the case's batch size and predicted LR (clamped to the study's LR range;
    the weight decay the grid used, or with ``predicted_decay`` the predicted one clamped
    to the study's range) through ``hpo.objective.train_trial``, the function every worker
    runs, seeded as the search study was; its value (0.5 if it diverged)."""
    search = spec.search
    wide = _with(spec, search={"batch_size_max": search.batch_size_max * extend})
    lr = min(max(case["lr"], search.lr_low), search.lr_high)
    decay = math.sqrt(search.weight_decay_low * search.weight_decay_high)
    if predicted_decay and case.get("weight_decay"):
        decay = min(max(case["weight_decay"], search.weight_decay_low), search.weight_decay_high)
    study = optuna.create_study(
        direction=spec.objective.direction, pruner=optuna.pruners.NopPruner()
    )
    log2_batch_size = int(math.log2(case["batch_size"]))
    study.enqueue_trial({BATCH_PARAM: log2_batch_size, "lr": lr, "weight_decay": decay})
    splits = load_splits(wide.dataset)
    study.optimize(lambda t: train_trial(t, wide, splits=splits), n_trials=1)
    trial = study.trials[0]
    return float(trial.value) if trial.state == TrialState.COMPLETE else 0.5


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
    reference = Reference(grid(spec, args, directory), spec, args.truth_window)
    result = reference.summary(spec.search.optimizer, spec.dataset.train_size)
    if args.only == "grid":
        return result
    searches = []
    if args.runs_from is not None:
        judged = []
        for seed, points in stored_runs(args.runs_from):
            for case in predictions(points, args.extend, spec.search.optimizer, args.point_sd):
                judged.append(reference.judge(case) | {"seed": seed})
    elif args.cases_from is not None:
        stored = json.loads(args.cases_from.read_text())
        judged, searches = rejudged(stored, args, spec, reference), stored.get("searches") or []
    else:
        judged, searches = searched(spec, args, directory, reference)
    result |= {"cases": judged, "goals": goals(judged)}
    if searches:
        result["searches"] = searches
    if reference.axis:
        result["weight_decay_goals"] = decay_goals(judged, reference.tolerance)
        views = [(s["seed"], s["view"]) for s in searches if s.get("view")]
        result["tau"] = tau_table(reference.trend, views)
    return result


def searched(
    spec: StudySpec, args: argparse.Namespace, directory: Path, reference: Reference
) -> tuple[list[dict], list[dict]]:
    """The searches run through the CLI, each one's predictions judged (and trained at,
    unless ``--no-train``); (judged cases, each search's stored points and view)."""
    judged, searches = [], []
    for seed in range(args.search_seeds):
        seeded = _with(spec, name=f"search-{seed}", seed=seed, sampler={"seed": seed})
        study = launch(seeded, directory, args.threads)
        assert study is not None  # no timeout: the study ran to its end
        fitted, found = cases(study, seeded, args.extend)
        searches.append({"seed": seed, **fitted})
        for case in found:
            row = reference.judge(case) | {"seed": seed}
            if not args.no_train:
                row["value_trained"] = train_at(seeded, case, args.extend, reference.axis)
                sign = 1.0 if reference.maximize else -1.0
                row["shortfall_trained"] = sign * (row["grid_best_value"] - row["value_trained"])
            judged.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return judged, searches


def rejudged(stored: dict, args: argparse.Namespace, spec: StudySpec, reference: Reference) -> list:
    """The cases of an earlier ``--json`` file judged against this grid's reference: predicted
    again from each search's stored points (and weight-decay view) where the file has them
    (so a changed prediction method is judged without searching again; no trained value
    then, it was trained at the old prediction), else as they were predicted."""
    maximize = spec.objective.direction == "maximize"
    judged = []
    if stored.get("searches"):
        for search in stored["searches"]:
            points = [(int(b), float(lr)) for b, lr in search["points"]]
            optimizer, view = spec.search.optimizer, view_from(search.get("view"))
            for case in predictions(points, args.extend, optimizer, search["point_sd"], view):
                judged.append(reference.judge(case) | {"seed": search["seed"]})
        return judged
    kept = ("kind", "batch_size", "lr", "lr_interval", "model_of_scaling", "seed")
    kept += ("weight_decay", "weight_decay_interval", "model_of_weight_decay")
    for old in stored["cases"]:
        row = reference.judge({name: old[name] for name in kept if name in old})
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
    parser.add_argument(
        "--grid-wds",
        type=int,
        default=1,
        help="grid weight decays, log-spaced over the study's range (1: its geometric middle)",
    )
    parser.add_argument(
        "--grid-lr-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="the grid's LRs span this range (default: the study's LR range)",
    )
    parser.add_argument(
        "--grid-hold-s",
        type=float,
        help="start no grid trial after this many seconds; the grid is continued by the "
        "next run (same --keep, which it needs, and --grid-cache)",
    )
    parser.add_argument("--search-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="skip training at predictions")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid-cache", type=Path, help="grid results file: reused if present")
    parser.add_argument(
        "--grid-also",
        type=Path,
        action="append",
        help="the cache of a grid with other weight decays (the same study with another "
        "weight-decay range): its rows join --grid-cache's; repeatable",
    )
    parser.add_argument("--only", choices=("all", "grid"), default="all")
    parser.add_argument(
        "--truth-window",
        type=float,
        help="grid points within this of a batch size's best mean enter its peak's quadratic "
        f"(default: {DEFAULT_WINDOW}, or 4 standard errors where the seeds give more)",
    )
    parser.add_argument("--keep", type=Path, help="keep the studies' files here")
    parser.add_argument(
        "--more-seeds",
        type=int,
        default=0,
        help="bring the configs deciding each batch size's peak (--around) to this many seeds "
        "in the --grid-cache, one (config, seed) at a time (a grid with one weight decay)",
    )
    parser.add_argument(
        "--around", type=int, default=5, help="with --more-seeds: the LRs nearest each peak"
    )
    parser.add_argument(
        "--hold-s", type=float, help="with --more-seeds: start no new config after this long"
    )
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
    if args.grid_hold_s is not None and args.keep is None:
        # the unfinished seed's study lives in --keep: without it each piece starts it anew
        parser.error("--grid-hold-s needs --keep DIR, where the next run continues the grid")
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
