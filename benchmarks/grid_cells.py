"""More seeds at single cells of a ``prediction_quality.py`` grid, exactly as the grid ran them.

A grid seed ``s`` is one grid study (``hpo launch``, Optuna's ``GridSampler`` seeded with
``s``): the trial number ``n`` a config gets is its place in that sampler's order, and it
trains with seed ``s + n`` (``hpo.replicates.training_seed``). So one (config, grid seed)
result is reproduced without the rest of its study: the sampler's order replayed without
training (``grid_order``), then that one config trained through ``hpo.objective.train_trial``
under a spec whose seed makes its training seed ``s + n`` (``train_cell``).

The grid cache (``--grid-cache``) keeps such results apart from the grid's own: under
``"seed_values"``, ``[batch size, lr, grid seed, value]`` rows, added one at a time and
saved after each (``extend_cache``), so an interrupted run loses at most one cell and a
rerun adds only what is missing. The cache's ``key`` stays as it is: the grid is the same
grid, only some of its cells have more seeds (``cells_of`` merges them). Cells are added on
a grid with one weight decay (its rows keyed (batch size, lr), as its cache's are); a
(config, seed) the grid itself later runs whole is among its own seeds and counted once.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo.data import load_splits
from hpo.objective import train_trial
from hpo.space import BATCH_PARAM, grid_search_space, make_sampler
from hpo.spec import StudySpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_truth import Cell, grid_truth  # noqa: E402 (a sibling script, not a package)

Config = tuple[int, float]

# A config's base seeds trained again here must give the cached mean within this: the same
# numerics reproduce a run to the last digit; a box whose bf16 kernels round differently
# drifts by 1e-3 and more over a thousand steps, and its seeds cannot join the cached ones.
REPRODUCE_TOLERANCE = 1e-4


def grid_order(grid: StudySpec) -> list[dict]:
    """The params of each trial of the grid study ``grid``, in trial-number order: its
    ``GridSampler`` replayed on an in-memory study with no training."""
    space = grid_search_space(grid)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(grid), direction=grid.objective.direction)
    size = 1
    for choices in space.values():
        size *= len(choices)

    def ask(trial: optuna.Trial) -> float:
        for name, choices in space.items():
            trial.suggest_categorical(name, choices)
        return 0.0

    study.optimize(ask, n_trials=size)
    return [t.params for t in study.trials]


def config_of(params: dict) -> Config:
    return 2 ** int(params[BATCH_PARAM]), float(params["lr"])


def train_cell(grid: StudySpec, number: int, params: dict, splits: tuple) -> float:
    """Trial ``number`` of the grid study ``grid`` (its ``params``) trained alone with the
    training seed the study gave it; its value, 0.5 where it diverged (as the grid counts)."""
    alone = StudySpec.model_validate(json.loads(grid.to_json()) | {"seed": grid.seed + number})
    study = optuna.create_study(
        direction=grid.objective.direction, pruner=optuna.pruners.NopPruner()
    )
    study.enqueue_trial(params)
    study.optimize(lambda t: train_trial(t, alone, splits=splits), n_trials=1)
    trial = study.trials[0]
    return float(trial.value) if trial.state == TrialState.COMPLETE else 0.5


def extend_cache(
    cache: Path,
    grid_of_seed: Callable[[int], StudySpec],
    wanted: list[tuple[Config, int]],
    deadline: float | None = None,
) -> int:
    """Each (config, grid seed) of ``wanted`` the cache lacks trained and saved at once;
    stops before starting one past ``deadline`` (``time.time()``). How many were added."""
    stored = json.loads(cache.read_text())
    rows = stored.setdefault("seed_values", [])
    have = {(int(b), float(lr), int(s)) for b, lr, s, _ in rows}
    orders: dict[int, dict[Config, tuple[int, dict]]] = {}
    splits = None
    added = 0
    for (batch_size, lr), seed in wanted:
        if (batch_size, lr, seed) in have:
            continue
        if deadline is not None and time.time() > deadline:
            break
        grid = grid_of_seed(seed)
        if seed not in orders:
            orders[seed] = {config_of(p): (n, p) for n, p in enumerate(grid_order(grid))}
        splits = splits or load_splits(grid.dataset)
        number, params = orders[seed][(batch_size, lr)]
        started = time.time()
        value = train_cell(grid, number, params, splits)
        rows.append([batch_size, lr, seed, value])
        have.add((batch_size, lr, seed))
        cache.write_text(json.dumps(stored, indent=1))
        added += 1
        took = time.time() - started
        print(
            f"B={batch_size} lr={lr:.4g} seed={seed}: {value:.6f} ({took:.1f} s)", file=sys.stderr
        )
    return added


def reproduction_gap(
    cache: Path, grid_of_seed: Callable[[int], StudySpec], config: Config, base_seeds: int
) -> float:
    """``config``'s grid seeds 0 … ``base_seeds`` - 1 trained again here (into a scratch copy
    of the cache: the cache itself is left as it is) less the cache's mean of them."""
    stored = json.loads(cache.read_text())
    grid_only = {k: v for k, v in stored.items() if k != "seed_values"}
    before = cells_of(grid_only, base_seeds, 0.0)[(*config, 0.0)]
    scratch = cache.with_name(cache.name + ".reproduce")
    scratch.write_text(json.dumps(grid_only))
    try:
        extend_cache(scratch, grid_of_seed, [(config, s) for s in range(base_seeds)])
        rows = json.loads(scratch.read_text())["seed_values"]
    finally:
        scratch.unlink()
    return statistics.mean(v for _, _, _, v in rows) - before.mean


def extend_where_reproduced(
    cache: Path,
    grid_of_seed: Callable[[int], StudySpec],
    chosen: list[Config],
    seeds: tuple[int, int],
    deadline: float | None = None,
) -> int:
    """``chosen`` configs brought from ``seeds`` = (the grid's seeds, wanted) seeds, seed
    by seed (``extend_cache``); how many were added. Refused (``SystemExit``) where this
    machine does not reproduce the cache: ``chosen[0]``'s grid seeds trained again must give
    the cached mean within ``REPRODUCE_TOLERANCE``."""
    base_seeds, wanted = seeds
    gap = reproduction_gap(cache, grid_of_seed, chosen[0], base_seeds)
    if abs(gap) > REPRODUCE_TOLERANCE:
        raise SystemExit(
            f"{cache}: {chosen[0]} trained here differs from the cache by {gap:+.2g}; "
            "seeds from this machine cannot join that grid"
        )
    more = [(config, s) for s in range(base_seeds, wanted) for config in chosen]
    return extend_cache(cache, grid_of_seed, more, deadline)


def deciding(cells: dict[tuple, Cell], maximize: bool, around: int) -> list[Config]:
    """The configs that decide each batch size's peak: its ``around`` grid LRs nearest the
    peak of the grid as it stands (``grid_truth`` without redraws); (batch size, lr) each."""
    mean = {(key[0], key[1]): cell.mean for key, cell in cells.items()}
    chosen = []
    for batch_size, truth in grid_truth(mean, maximize, 0.0).items():
        lrs = sorted(lr for b, lr in mean if b == batch_size)
        nearest = sorted(lrs, key=lambda lr: (abs(math.log2(lr / truth.lr)), lr))[:around]
        chosen += [(batch_size, lr) for lr in sorted(nearest)]
    return chosen


def cells_of(stored: dict, base_seeds: int, decay: float) -> dict[tuple, Cell]:
    """Every config of a one-weight-decay grid cache, keyed (batch size, lr, ``decay``), with
    its mean over all its seeds: the grid's own first ``base_seeds`` (each seed's value where
    the cache kept them, else their mean counted as ``base_seeds`` values) and the
    ``seed_values`` rows added later (a base seed among those stands for itself once all
    base seeds of that config are there)."""
    extra: dict[Config, dict[int, float]] = {}
    for b, lr, seed, value in stored.get("seed_values", []):
        extra.setdefault((int(b), float(lr)), {})[int(seed)] = float(value)
    kept = "values" in stored
    if kept:
        base = {
            (int(b), float(lr)): list(map(float, v[:base_seeds])) for b, lr, v in stored["values"]
        }
    else:
        base = {(int(b), float(lr)): [float(m)] * base_seeds for b, lr, m in stored["mean"]}
    cells = {}
    for config, values in base.items():
        more = extra.get(config, {})
        own = [more[s] for s in range(base_seeds) if s in more]
        known = list(values) if kept else []
        if len(own) == base_seeds:  # the base seeds rerun one by one
            values, known = own, own
        later = [v for s, v in sorted(more.items()) if s >= base_seeds]
        total = values + later
        cells[(*config, decay)] = Cell(statistics.mean(total), len(total), tuple(known + later))
    return cells
