"""A prediction_quality.py grid with more seeds at some cells: the cache extended one (config,
seed) at a time (benchmarks/grid_cells.py) and the peaks read with each config's own standard
error (benchmarks/grid_truth.py, benchmarks/prediction_judge.py)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hpo.spec import load_spec
from tests.benchmark_scripts import load_benchmark

LRS = [1e-3 * 1000 ** (i / 10) for i in range(11)]  # 1e-3 ... 1, an octave apart
REPO = Path(__file__).resolve().parent.parent
WD = 0.01  # the grid's one weight decay: cells are keyed (batch size, lr, weight decay)


def _curve(x: float) -> float:
    """A flat top peaking at lr 0.02, falling off a cliff (chance) from lr 0.25."""
    return 0.5 if x > math.log2(0.25) else 0.72 - 0.004 * (x - math.log2(0.02)) ** 2


def test_old_caches_read_as_before_and_added_seeds_join_their_cells() -> None:
    cells_of = load_benchmark("grid_cells").cells_of
    means_only = {"mean": [[8, 0.01, 0.7], [8, 0.02, 0.6]]}
    cells = cells_of(means_only, 2, WD)
    assert cells[(8, 0.01, WD)].mean == 0.7 and cells[(8, 0.01, WD)].count == 2
    assert cells[(8, 0.01, WD)].known == ()
    more = means_only | {"seed_values": [[8, 0.01, 2, 0.8], [8, 0.01, 3, 0.9], [8, 0.02, 0, 0.5]]}
    cells = cells_of(more, 2, WD)
    # the two base seeds' mean weighs two, each added seed one
    assert cells[(8, 0.01, WD)].mean == pytest.approx((2 * 0.7 + 0.8 + 0.9) / 4)
    assert cells[(8, 0.01, WD)].count == 4 and cells[(8, 0.01, WD)].known == (0.8, 0.9)
    # one base seed rerun alone adds nothing (it is inside the mean already)
    assert cells[(8, 0.02, WD)] == cells_of(means_only, 2, WD)[(8, 0.02, WD)]
    both = more | {"seed_values": [[8, 0.02, 0, 0.55], [8, 0.02, 1, 0.65], [8, 0.02, 2, 0.7]]}
    assert cells_of(both, 2, WD)[(8, 0.02, WD)].known == (0.55, 0.65, 0.7)
    kept = {"mean": [[8, 0.01, 0.7]], "values": [[8, 0.01, [0.69, 0.71, 0.75]]]}
    # a grid cache with more seeds than asked for gives its first ones
    added = kept | {"seed_values": [[8, 0.01, 2, 0.73]]}
    assert cells_of(added, 2, WD)[(8, 0.01, WD)].known == (0.69, 0.71, 0.73)


def test_equal_errors_per_config_give_the_single_sigma_answer() -> None:
    """An equal-seed grid read through the per-config path answers exactly as before."""
    truth = load_benchmark("grid_truth")
    rng = np.random.default_rng(5)
    mean = {(b, lr): _curve(math.log2(lr)) + rng.normal(0, 0.007) for b in (8, 16) for lr in LRS}
    single = truth.grid_truth(mean, True, 0.007)
    per_config = truth.grid_truth(mean, True, dict.fromkeys(mean, 0.007))
    assert per_config == single


def test_more_seeds_at_the_deciding_cells_narrow_the_peak_interval() -> None:
    """The same planted flat-top grid twice: every mean with two seeds' noise, then the five
    LRs around the peak with eight seeds (half the noise): the peak's 80% interval narrows
    and still covers the planted peak."""
    truth = load_benchmark("grid_truth")
    rng = np.random.default_rng(11)
    deciding = {lr for lr in LRS if abs(math.log2(lr / 0.02)) < 2.5}
    widths = {"two": [], "eight": []}
    for repeat in range(8):
        z = {lr: rng.normal() for lr in LRS}
        for name, inner in (("two", 0.01), ("eight", 0.005)):
            errors = {(32, lr): inner if lr in deciding else 0.01 for lr in LRS}
            mean = {(32, lr): _curve(math.log2(lr)) + z[lr] * errors[(32, lr)] for lr in LRS}
            found = truth.grid_truth(mean, True, errors, seed=repeat)[32]
            low, high = found.lr_interval
            assert low <= found.lr <= high
            widths[name].append(math.log2(high / low))
    assert np.median(widths["eight"]) < 0.75 * np.median(widths["two"])


def test_the_peak_weighs_each_point_by_its_standard_error() -> None:
    """A parabola with one point read low: with that point's standard error 10x the others'
    the fit follows the rest; with equal errors the low point pulls the vertex away."""
    truth = load_benchmark("grid_truth")
    xs = np.log2(LRS[2:7])
    values = 0.72 - 0.004 * (xs - math.log2(0.02)) ** 2
    values[3] -= 0.02
    equal = truth.peak(xs, values, 0.03, errors=np.full(5, 0.005))
    weighted = truth.peak(xs, values, 0.03, errors=np.array([0.005, 0.005, 0.005, 0.05, 0.005]))
    assert abs(math.log2(weighted.lr / 0.02)) < 0.1
    assert abs(math.log2(equal.lr / 0.02)) > 3 * abs(math.log2(weighted.lr / 0.02))


def test_cell_errors_pool_the_known_seeds_and_shrink_with_each_cells_seeds() -> None:
    truth = load_benchmark("grid_truth")
    mean = {(8, 0.01): 0.7, (8, 0.02): 0.71, (8, 0.5): 0.5}
    known = {(8, 0.01): [0.69, 0.71], (8, 0.02): [0.70, 0.72, 0.74, 0.68], (8, 0.5): []}
    counts = {(8, 0.01): 2, (8, 0.02): 6, (8, 0.5): 2}
    errors, source = truth.cell_standard_errors(mean, known, counts, True)
    pooled = math.sqrt((0.0002 * 1 + np.var([0.70, 0.72, 0.74, 0.68], ddof=1) * 3) / 4)
    assert errors[(8, 0.01)] == pytest.approx(pooled / math.sqrt(2))
    assert errors[(8, 0.02)] == pytest.approx(pooled / math.sqrt(6))
    assert errors[(8, 0.5)] == errors[(8, 0.01)] and "4 dof" in source


def test_the_cache_gains_only_missing_cells_each_with_its_grid_trial_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wanted (config, seed) not in the cache is trained as trial n of grid seed s's
    study would be (n its place in that sampler's order) and saved at once; the rest, and
    everything after the deadline, is left."""
    cells = load_benchmark("grid_cells")
    quality = load_benchmark("prediction_quality")
    spec = quality.quick(load_spec(REPO / "studies/demo.toml"))
    trained = []

    def fake_train(grid, number, params, splits):
        trained.append((grid.seed, number, params))
        return 0.6 + number / 1000

    monkeypatch.setattr(cells, "train_cell", fake_train)
    monkeypatch.setattr(cells, "load_splits", lambda dataset: ("train", "val"))
    cache = tmp_path / "grid.json"
    lrs = sorted({float(p["lr"]) for p in cells.grid_order(quality.grid_spec(spec, 2, 2, 0))})
    cache.write_text(json.dumps({"key": {}, "mean": [], "seed_values": [[8, lrs[0], 2, 0.6]]}))
    wanted = [((8, lrs[0]), 2), ((16, lrs[1]), 2), ((8, lrs[0]), 3)]
    added = cells.extend_cache(cache, lambda s: quality.grid_spec(spec, 2, 2, s), wanted)
    assert added == 2 and [t[0] for t in trained] == [2, 3]
    for seed, number, params in trained:
        order = cells.grid_order(quality.grid_spec(spec, 2, 2, seed))
        assert order[number] == params
    rows = json.loads(cache.read_text())["seed_values"]
    assert [(b, s) for b, _, s, _ in rows] == [(8, 2), (16, 2), (8, 3)]
    assert cells.extend_cache(cache, lambda s: quality.grid_spec(spec, 2, 2, s), wanted) == 0
    late = [((32, lrs[0]), 4)]
    assert cells.extend_cache(cache, lambda s: quality.grid_spec(spec, 2, 2, s), late, 0.0) == 0


def test_the_deciding_configs_are_the_lrs_nearest_each_peak() -> None:
    cell = load_benchmark("grid_cells").Cell
    grid = {(32, lr, WD): cell(_curve(math.log2(lr)), 2) for lr in LRS}
    chosen = load_benchmark("grid_cells").deciding(grid, True, 5)
    assert [lr for _, lr in chosen] == pytest.approx(LRS[2:7])


def test_a_cell_trained_alone_reproduces_the_grid_study_and_more_seeds_extend_it(
    tmp_path: Path,
) -> None:
    """The quick grid through ``hpo launch``; one of its configs trained alone with grid seed
    0 gives the study's value exactly; ``--more-seeds 2 --around 1`` then adds seed 1 at the
    LR nearest each batch size's peak, and the grid reads those configs as two seeds."""
    cells = load_benchmark("grid_cells")
    quality = load_benchmark("prediction_quality")
    cache = tmp_path / "grid.json"
    argv = ["--quick", "--lrs", "2", "--extend", "2", "--grid-seeds", "1", "--threads", "1"]
    argv += ["--only", "grid", "--grid-cache", str(cache)]
    quality.main(argv)
    stored = json.loads(cache.read_text())
    (batch_size, lr, (value,)) = stored["values"][3]
    spec = quality.quick(load_spec(REPO / "studies/demo.toml"))
    check = tmp_path / "check.json"
    check.write_text(json.dumps(stored))
    cells.extend_cache(check, lambda s: quality.grid_spec(spec, 2, 2, s), [((batch_size, lr), 0)])
    assert json.loads(check.read_text())["seed_values"] == [[batch_size, lr, 0, value]]
    extended = quality.main([*argv, "--more-seeds", "2", "--around", "1"])
    added = json.loads(cache.read_text())["seed_values"]
    assert sorted(b for b, _, _, _ in added) == [8, 16, 32, 64, 128]
    assert {s for _, _, s, _ in added} == {1}
    assert sorted(n for _, _, n in extended["grid_seeds"]) == [1] * 5 + [2] * 5
    # a cache this machine does not reproduce (its numbers moved by 0.01) takes no seeds
    drifted = json.loads(cache.read_text())
    drifted["values"] = [[b, lr, [v + 0.01 for v in vs]] for b, lr, vs in drifted["values"]]
    drifted["mean"] = [[b, lr, m + 0.01] for b, lr, m in drifted["mean"]]
    cache.write_text(json.dumps(drifted))
    with pytest.raises(SystemExit, match="cannot join"):
        quality.main([*argv, "--more-seeds", "3", "--around", "1"])
    assert json.loads(cache.read_text())["seed_values"] == added


def test_the_reference_reads_a_grid_with_more_seeds_at_some_configs_with_each_ones_error() -> None:
    """Configs with unequal seeds (``Cell``s): each mean gets its own standard error, the
    summary lists them and each config's seeds, and a prediction read off between two grid
    LRs takes its standard error from those two."""
    judge = load_benchmark("prediction_judge")
    cell = load_benchmark("grid_truth").Cell
    spec = load_spec(REPO / "studies/demo.toml")
    rng = np.random.default_rng(3)
    per_seed = {}
    for b in (8, 16, 32):
        for lr in LRS:
            seeds = 8 if abs(math.log2(lr / 0.02)) < 1.5 else 2
            values = tuple(_curve(math.log2(lr)) + rng.normal(0, 0.01, seeds))
            per_seed[(b, lr, WD)] = cell(float(np.mean(values)), seeds, values)
    reference = judge.Reference(per_seed, spec, None)
    errors = reference.sigma
    assert isinstance(errors, dict) and "dof" in reference.source
    assert errors[(8, LRS[5])] == pytest.approx(errors[(8, LRS[0])] / 2)  # √8 against √2
    summary = reference.summary(spec.search.optimizer, spec.dataset.train_size)
    assert [8, LRS[5], 8] in summary["grid_seeds"] and [8, LRS[0], 2] in summary["grid_seeds"]
    assert summary["grid_standard_error"]["value"] == max(errors.values())
    assert len(summary["grid_standard_error"]["per_config"]) == len(per_seed)
    middle = math.sqrt(LRS[0] * LRS[1])  # halfway between two 2-seed configs
    case = {"kind": "left out", "batch_size": 16, "lr": middle, "lr_interval": None}
    read_off = math.hypot(errors[(16, LRS[0])] / 2, errors[(16, LRS[1])] / 2)
    truth_se = reference.truths[16].value_se
    assert reference.judge(case)["shortfall_se"] == pytest.approx(math.hypot(truth_se, read_off))


def test_a_grid_extended_by_whole_seeds_keeps_the_seeds_added_at_single_configs(
    tmp_path: Path,
) -> None:
    quality = load_benchmark("prediction_quality")
    cache = tmp_path / "grid.json"
    cache.write_text(json.dumps({"key": {"seeds": 1}, "seed_values": [[8, 0.01, 3, 0.8]]}))
    quality.grid_cache.write_cache(cache, {"seeds": 2}, {(8, 0.01, WD): [0.6, 0.7]}, False)
    stored = json.loads(cache.read_text())
    assert stored["values"] == [[8, 0.01, [0.6, 0.7]]]
    assert stored["seed_values"] == [[8, 0.01, 3, 0.8]]


def test_more_seeds_refuse_a_grid_with_a_weight_decay_axis(tmp_path: Path) -> None:
    quality = load_benchmark("prediction_quality")
    spec = quality.quick(load_spec(REPO / "studies/demo.toml"))
    args = argparse.Namespace(grid_cache=tmp_path / "grid.json", grid_wds=2)
    with pytest.raises(SystemExit, match="one weight decay"):
        quality.more_seeds(spec, args, {})
