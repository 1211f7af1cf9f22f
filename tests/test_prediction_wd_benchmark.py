"""benchmarks/prediction_quality.py with a weight-decay axis: the grid's best (LR, λ) per
batch size (grid_truth.pair_truth), its timescale's trend (grid_truth.tau_trend), the grid
study and its cache, and each prediction's λ judged against the grid (prediction_wd)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
import pytest

from hpo.space import grid_search_space
from tests.benchmark_scripts import load_benchmark

LRS = [4e-4 * 2**i for i in range(6)]  # 4e-4 ... 1.28e-2, an octave apart
DECAYS = [1e-3, 1e-2, 1e-1]
N = 2048


def _quality():
    return load_benchmark("prediction_quality")  # puts benchmarks/ on sys.path


def _truth():
    _quality()
    return load_benchmark("grid_truth")


def _planted(best_decay, best_lr, sizes=(8, 32, 128), decays=DECAYS):
    """A grid whose value at B is 0.7 − 0.01·(log2 lr/lr*(B))² − 0.01·(log2 λ/λ*(B))²,
    0.3 past 4× the best LR (a divergence cliff no parabola follows)."""
    mean = {}
    for b in sizes:
        for lr in LRS:
            for wd in decays:
                x, y = math.log2(lr / best_lr(b)), math.log2(wd / best_decay(b))
                mean[(b, lr, wd)] = 0.3 if x > 2 else 0.7 - 0.01 * x * x - 0.01 * y * y
    return mean


def test_the_best_weight_decay_is_the_quadratic_vertex_in_log_decay_at_each_batch_size() -> None:
    """λ* planted between grid points and moving with B; the LR of the pair is each weight
    decay's LR peak at λ*; exact (no noise) and the interval holds it with noise."""
    truth = _truth()

    def best_decay(b):
        return 3e-3 * b / 8

    def best_lr(b):
        return 2e-3

    found = truth.pair_truth(_planted(best_decay, best_lr), True, sigma=0.0)
    for b, pair in found.items():
        assert pair.weight_decay == pytest.approx(best_decay(b), rel=0.02)
        assert pair.lr == pytest.approx(2e-3, rel=0.02)
        assert pair.value == pytest.approx(0.7, abs=1e-9)
    noisy = truth.pair_truth(_planted(best_decay, best_lr), True, sigma=0.002, seed=1)
    for b, pair in noisy.items():
        low, high = pair.weight_decay_interval
        assert low <= best_decay(b) <= high and low < high
        assert len(pair.draws) == truth.DRAWS
    # minimized: the same pairs, the value in the metric's own sign
    minimized = truth.pair_truth(
        {k: -v for k, v in _planted(best_decay, best_lr).items()}, False, 0.0
    )
    assert minimized[8].weight_decay == pytest.approx(found[8].weight_decay)
    assert minimized[8].value == pytest.approx(-0.7)


def test_the_pair_lr_follows_the_best_decay_where_the_best_lr_depends_on_it() -> None:
    """The best LR ∝ 1/λ: the pair's LR is read at λ*, not at the middle weight decay."""
    truth = _truth()
    mean = {}
    for lr in LRS:
        for wd in DECAYS:
            x = math.log2(lr / (2e-3 * (1e-2 / wd) ** 0.25))
            mean[(8, lr, wd)] = 0.7 - 0.01 * x * x - 0.01 * math.log2(wd / 0.05) ** 2
    pair = truth.pair_truth(mean, True, 0.0)[8]
    assert pair.weight_decay > 0.02
    assert pair.lr == pytest.approx(2e-3 * (1e-2 / pair.weight_decay) ** 0.25, rel=0.05)


def test_a_flat_weight_decay_axis_gives_an_interval_over_the_whole_axis() -> None:
    """Where λ changes the value by less than the grid's noise the best λ is not located:
    its interval spans the grid's weight decays (what a two-epoch AdamW run shows)."""
    truth = _truth()
    mean = {(8, lr, wd): 0.7 - 0.01 * math.log2(lr / 2e-3) ** 2 for lr in LRS for wd in DECAYS}
    low, high = truth.pair_truth(mean, True, sigma=0.005, seed=2)[8].weight_decay_interval
    assert low <= 1.5e-3 and high >= 0.07


def test_tau_is_constant_across_batch_sizes_where_the_best_decay_grows_with_b() -> None:
    """λ* ∝ B at a fixed η: τ_epoch = B/(η·λ·N) constant, the slope's interval holds 0;
    λ* fixed: τ ∝ B, slope 1, not constant."""
    truth = _truth()
    sizes = (8, 16, 32, 64)
    grows = truth.pair_truth(
        _planted(lambda b: 1e-3 * b / 8 * 3, lambda b: 2e-3, sizes), True, 0.002, seed=3
    )
    trend = truth.tau_trend(grows, N)
    assert trend.slope == pytest.approx(0.0, abs=0.05) and trend.constant
    assert trend.tau[8] == pytest.approx(8 / (2e-3 * 3e-3 * N), rel=0.05)
    low, high = trend.tau_interval[8]
    assert low <= trend.tau[8] <= high
    fixed = truth.pair_truth(_planted(lambda b: 1e-2, lambda b: 2e-3, sizes), True, 0.001, seed=4)
    trend = truth.tau_trend(fixed, N)
    assert trend.slope == pytest.approx(1.0, abs=0.05) and not trend.constant


def test_the_grid_study_has_a_weight_decay_axis_and_its_own_lr_range() -> None:
    module = _quality()
    spec = module.load_spec(module.REPO / "benchmarks/results/prediction_quality_adamw_study.toml")
    one = module.grid_spec(spec, 2, 7, 0)
    assert one.sampler.grid_weight_decay == [pytest.approx(0.01)]  # the range's middle
    assert one.sampler.grid_lr[0] == pytest.approx(1e-4) and one.budget.n_trials == 6 * 7
    axis = module.grid_spec(spec, 2, 6, 1, wds=3, lr_range=(4e-4, 1.28e-2))
    assert axis.sampler.grid_weight_decay == pytest.approx(DECAYS)
    assert axis.sampler.grid_lr == pytest.approx(LRS)
    assert axis.budget.n_trials == 6 * 6 * 3 and axis.search.batch_size_max == 256


def _args(tmp_path: Path, seeds: int) -> argparse.Namespace:
    return argparse.Namespace(
        extend=2, lrs=2, grid_wds=2, grid_lr_range=None, grid_seeds=seeds, grid_hold_s=None,
        grid_cache=tmp_path / "grid.json", runs_from=None, cases_from=None, threads=1,
    )  # fmt: skip


def _fake_launch(module, launched: list[int], value):
    """A stand-in for ``hpo launch`` on a grid study: every grid point once, its value
    ``value(grid spec, lr, weight decay)``; the seeds launched are appended to ``launched``."""

    def fake_launch(grid, directory, threads, timeout=None):
        launched.append(grid.seed)
        study = optuna.create_study()
        space = grid_search_space(grid)
        for log2_b in space[module.BATCH_PARAM]:
            for lr in space["lr"]:
                for wd in space["weight_decay"]:
                    params = {module.BATCH_PARAM: log2_b, "lr": lr, "weight_decay": wd}
                    distributions = {
                        name: optuna.distributions.CategoricalDistribution([v])
                        for name, v in params.items()
                    }
                    study.add_trial(optuna.trial.create_trial(
                        params=params, distributions=distributions, value=value(grid, lr, wd)
                    ))  # fmt: skip
        return study

    return fake_launch


def test_a_cached_grid_with_fewer_seeds_is_extended_by_the_seeds_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is written after each seed; a later run asking for more seeds runs only
    the missing ones (here a stand-in for ``hpo launch``) and keeps the cached values; one
    asking for fewer reads the first seeds, running nothing."""
    module = _quality()
    spec = module.quick(module.load_spec(module.REPO / "studies/demo.toml"))
    launched: list[int] = []
    fake_launch = _fake_launch(module, launched, lambda grid, lr, wd: grid.seed + lr)
    monkeypatch.setattr(module, "launch", fake_launch)
    first = module.grid(spec, _args(tmp_path, 1), tmp_path)
    assert launched == [0] and len({wd for _, _, wd in first}) == 2
    assert json.loads((tmp_path / "grid.json").read_text())["key"]["seeds"] == 1
    both = module.grid(spec, _args(tmp_path, 2), tmp_path)
    assert launched == [0, 1]
    for config, values in both.items():
        assert values == [first[config][0], 1 + config[1]]
    assert module.grid(spec, _args(tmp_path, 1), tmp_path) == first and launched == [0, 1]


def test_a_grid_cache_from_before_the_weight_decay_axis_is_read_as_it_was(tmp_path: Path) -> None:
    module = load_benchmark("prediction_quality")
    stored = {"values": [[8, 0.001, [0.6, 0.62]], [8, 0.01, [0.7, 0.68]]]}
    assert module.grid_cache.cached_values(stored, 0.01) == {
        (8, 0.001, 0.01): [0.6, 0.62],
        (8, 0.01, 0.01): [0.7, 0.68],
    }


def test_a_predicted_decay_is_judged_against_the_grids_best_and_its_value_read_there() -> None:
    """On a planted grid (λ* = 3e-3 at every B): a prediction 2× off is within the
    tolerance (half the grid's decade step, √10), 5× off is not; the value is read at the
    predicted (LR, λ); the interval's coverage is counted."""
    module = _quality()
    wd = load_benchmark("prediction_wd")
    assert wd.decay_tolerance(DECAYS) == pytest.approx(math.sqrt(10))
    planted = _planted(lambda b: 3e-3, lambda b: 2e-3, sizes=(8, 16, 32, 64))
    per_seed = {config: [v - 0.001, v + 0.001] for config, v in planted.items()}
    spec = module.load_spec(module.REPO / "benchmarks/results/prediction_quality_adamw_study.toml")
    reference = module.Reference(per_seed, spec, None)
    assert reference.axis and reference.pairs[16].weight_decay == pytest.approx(3e-3, rel=0.05)
    near = {"kind": "left out", "batch_size": 16, "lr": LRS[2], "lr_interval": [1e-3, 4e-3]}
    near |= {"weight_decay": 6e-3, "weight_decay_interval": [1e-3, 1e-2]}
    far = near | {"kind": "extrapolated", "weight_decay": 1.5e-2, "weight_decay_interval": None}
    judged = [reference.judge(near), reference.judge(far)]
    assert judged[0]["wd_within_tolerance"] and judged[0]["wd_covered"]
    assert not judged[1]["wd_within_tolerance"] and judged[1]["wd_covered"] is None
    # read off at the predicted LR (a grid LR here) and λ: linear in log λ between 1e-3, 1e-2
    share = math.log(6e-3 / 1e-3) / math.log(10)
    at_1, at_10 = planted[(16, LRS[2], 1e-3)], planted[(16, LRS[2], 1e-2)]
    assert judged[0]["value_from_grid"] == pytest.approx(at_1 + share * (at_10 - at_1))
    assert judged[0]["shortfall_from_grid"] > 0
    goals = wd.decay_goals(judged, reference.tolerance)
    assert goals["within_tolerance"] == 1 and goals["coverage_80"] == 1.0
    assert goals["with_interval"] == 1 and goals["by_kind"]["extrapolated"]["cases"] == 1


def test_a_left_out_batch_size_predicts_its_decay_from_the_others_timescale() -> None:
    """The weight-decay view's rows lose the left-out batch size, as its LR does; a view
    stored as JSON predicts the same λ again (``--cases-from``)."""
    module = _quality()
    wd = load_benchmark("prediction_wd")
    from hpo.report.weight_decay import WeightDecayRow, WeightDecayView

    sizes = (8, 16, 32, 64)
    rows = tuple(
        WeightDecayRow(b, 1e-3 * b**0.5, 1e-2 * (1.5 if b == 32 else 1.0) * b**0.5, 3, 1.0, None,
                       None, lr_width=1.0, weight_decay_width=1.0)
        for b in sizes
    )  # fmt: skip
    view = WeightDecayView(rows, N, None, None, None, epochs_trained=2.0)
    points = [(b, 1e-3 * b**0.5) for b in sizes]
    found = module.predictions(points, 2, "adamw", 0.3, view)
    again = module.predictions(points, 2, "adamw", 0.3, wd.view_from(wd.stored_view(view)))
    assert [c["weight_decay"] for c in found] == [c["weight_decay"] for c in again]
    # the rows' τ_epoch, 1 epoch, is within the 2 trained: weight decay acted, no note
    assert [c["weight_decay_note"] for c in found] == [None] * len(found)
    assert wd.view_from(wd.stored_view(view)).epochs_trained == 2.0
    left_out_32 = next(c for c in found if c["kind"] == "left out" and c["batch_size"] == 32)
    # from 8, 16 and 64, where λ = 1e-2·√B exactly: the 1.5× at 32 is not seen
    assert left_out_32["weight_decay"] == pytest.approx(1e-2 * 32**0.5, rel=0.05)
    assert wd.without(view, 32).rows == tuple(r for r in rows if r.batch_size != 32)


def test_stored_searches_are_judged_on_a_weight_decay_grid_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``main`` with ``--cases-from`` on a grid with a weight-decay axis (its cache made by a
    stand-in for ``hpo launch``: nothing trains): each case's λ judged, the weight-decay
    goals, the grid's τ beside the stored search's, and the best λ the planted one."""
    module = _quality()
    wd = load_benchmark("prediction_wd")
    from hpo.report.weight_decay import WeightDecayRow, WeightDecayView

    def value(grid, lr, decay):  # best LR 2e-3, best λ 1e-4 (the axis' middle), two seeds
        noise = 0.001 if grid.seed else -0.001
        return 0.7 - 0.01 * math.log2(lr / 2e-3) ** 2 - 0.01 * math.log2(decay / 1e-4) ** 2 + noise

    monkeypatch.setattr(module, "launch", _fake_launch(module, [], value))
    argv = ["--quick", "--lrs", "5", "--grid-lr-range", "1e-3", "1.6e-2", "--grid-wds", "3"]
    argv += ["--extend", "2", "--grid-seeds", "2", "--grid-cache", str(tmp_path / "grid.json")]
    sizes = (8, 16, 32, 64)
    rows = tuple(
        WeightDecayRow(b, 2e-3, 1e-4, 2, 20.0, 10.0, 40.0, 1.0, 1.0) for b in sizes
    )  # τ 20 epochs, 10× the 2 trained at its lower end: not "barely acted"
    view = wd.stored_view(WeightDecayView(rows, 256, None, None, None, epochs_trained=2.0))
    search = {"seed": 0, "points": [[b, 2e-3] for b in sizes], "point_sd": 0.5, "view": view}
    (tmp_path / "p.json").write_text(json.dumps({"searches": [search]}))
    result = module.main([*argv, "--cases-from", str(tmp_path / "p.json")])
    assert result["grid_weight_decays"] == pytest.approx([1e-5, 1e-4, 1e-3])
    for b, best in result["grid_best_weight_decay"].items():
        assert best == pytest.approx(1e-4, rel=0.05), b
    assert {c["batch_size"] for c in result["cases"]} == {8, 16, 32, 64, 128}
    for case in result["cases"]:
        assert case["weight_decay"] == pytest.approx(1e-4, rel=1e-6)
        assert case["wd_within_tolerance"] and case["wd_factor"] == pytest.approx(1, rel=0.05)
        assert case["weight_decay_note"] is None
    goals = result["weight_decay_goals"]
    assert goals["cases"] == 5 and goals["within_tolerance"] == 5
    assert goals["tolerance"] == pytest.approx(math.sqrt(10))  # half the 10x step
    assert set(result["tau"]["grid"]["tau_epoch"]) == {8, 16, 32, 64, 128}
    assert result["tau"]["searches"][0]["tau_epoch"] == {b: 20.0 for b in sizes}


def test_a_grid_with_other_weight_decays_joins_its_rows_and_a_different_grid_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--grid-also``: the same study with a lower weight-decay range, run into its own
    cache, adds its λ rows to the grid's; a cache with other LRs, or the same weight decays
    again, is refused with the reason."""
    module = _quality()
    spec = module.quick(module.load_spec(module.REPO / "studies/demo.toml"))
    low = module._with(spec, search={"weight_decay_low": 1e-7, "weight_decay_high": 1e-6})
    monkeypatch.setattr(module, "launch", _fake_launch(module, [], lambda g, lr, wd: lr + wd))
    main = module.grid(spec, _args(tmp_path, 1), tmp_path)
    other = argparse.Namespace(**{**vars(_args(tmp_path, 1)), "grid_cache": tmp_path / "low.json"})
    rows = module.grid(low, other, tmp_path)
    joined = module.grid(spec, argparse.Namespace(**{**vars(_args(tmp_path, 1)), "grid_also": [other.grid_cache]}), tmp_path)  # fmt: skip
    assert joined == main | rows and len({wd for _, _, wd in joined}) == 4
    assert sorted({wd for _, _, wd in rows}) == pytest.approx([1e-7, 1e-6])
    with pytest.raises(SystemExit, match="repeats weight decays"):
        module.grid_cache.merged_rows(
            main, tmp_path / "grid.json", module._grid_spec(spec, _args(tmp_path, 1), 0), 1
        )
    lrs = argparse.Namespace(**{**vars(other), "grid_cache": tmp_path / "lrs.json", "lrs": 3})
    module.grid(low, lrs, tmp_path)
    with pytest.raises(SystemExit, match="another grid"):
        module.grid_cache.merged_rows(
            main, lrs.grid_cache, module._grid_spec(spec, _args(tmp_path, 1), 0), 1
        )
