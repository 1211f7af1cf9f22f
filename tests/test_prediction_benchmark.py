"""benchmarks/prediction_quality.py: hpo's predictions against a grid run through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark


def _module():
    module = load_benchmark("prediction_quality")
    return module


def test_prediction_quality_quick_judges_held_out_and_extrapolated_batch_sizes(
    tmp_path: Path,
) -> None:
    """Grid (B 8..128 x 2 LRs) and one search (B 8..64) through ``hpo launch``; each studied
    batch size left out and 2x the largest predicted, each judged against the grid; the
    grid's cache is reused by a second call, and the stored search by a third."""
    module = _module()
    out, cache = tmp_path / "p.json", tmp_path / "grid.json"
    argv = ["--quick", "--lrs", "2", "--extend", "2", "--grid-seeds", "1", "--search-seeds", "1"]
    argv += ["--threads", "1", "--no-train", "--grid-cache", str(cache)]
    result = module.main([*argv, "--json", str(out), "--keep", str(tmp_path / "studies")])
    assert json.loads(out.read_text())["goals"] == result["goals"]
    assert {row[0] for row in result["grid_values"]} == {8, 16, 32, 64, 128}
    kinds = {(case["kind"], case["batch_size"]) for case in result["cases"]}
    assert ("extrapolated", 128) in kinds
    for case in result["cases"]:
        assert case["factor"] >= 1 and case["grid_best_lr"] > 0
        assert case["model_of_scaling"] in ("power law", "ridge")
    assert result["goals"]["cases"] == len(result["cases"])
    again = module.main([*argv, "--only", "grid"])  # from the cache: no study is run
    assert again["grid_values"] == result["grid_values"]
    # the search's points are kept: --cases-from predicts from them again, searching nothing
    assert result["searches"][0]["points"]
    judged = module.main([*argv, "--cases-from", str(out)])
    assert [(c["batch_size"], c["lr"]) for c in judged["cases"]] == [
        (c["batch_size"], c["lr"]) for c in result["cases"]
    ]
    for case in judged["cases"]:
        low, high = case["grid_best_lr_interval"]
        assert low <= case["grid_best_lr"] <= high


def test_a_grid_in_pieces_needs_keep_for_the_unfinished_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--grid-hold-s`` without ``--keep``: refused at once (exit 2, one line), since the
    unfinished seed's study would be lost with the run's scratch folder."""
    argv = ["--quick", "--only", "grid", "--grid-cache", str(tmp_path / "grid.json")]
    with pytest.raises(SystemExit) as refused:
        _module().main([*argv, "--grid-hold-s", "60"])
    assert refused.value.code == 2
    assert "--grid-hold-s needs --keep" in capsys.readouterr().err
    assert not (tmp_path / "grid.json").exists()


def test_value_at_interpolates_the_grid_in_log_lr() -> None:
    module = _module()
    mean = {(32, 0.01): 0.7, (32, 0.04): 0.9, (64, 0.01): 0.1}
    assert module.value_at(mean, 32, 0.02) == pytest.approx(0.8)
    assert module.value_at(mean, 32, 0.001) == 0.7 and module.value_at(mean, 32, 1.0) == 0.9


def test_goals_count_factor_coverage_and_shortfall() -> None:
    module = _module()
    cases = [
        {"kind": "left out", "factor": 1.5, "covered": True, "shortfall_from_grid": 0.002},
        {"kind": "extrapolated", "factor": 3.0, "covered": False, "shortfall_from_grid": 0.02},
    ]
    goals = module.goals(cases)
    assert goals["within_factor_2"] == 1 and goals["coverage_80"] == 0.5
    assert goals["within_0_01_from_grid"] == 1
    assert goals["met"] == {
        "factor_2": False,
        "coverage": False,
        "value_0_01_from_grid": False,
        "value_0_01_trained": None,
    }
    assert goals["extrapolated"] == {"cases": 1, "within_factor_2": 0, "covered": 0}


def test_stored_runs_are_predicted_left_out_and_beyond(tmp_path: Path) -> None:
    module = _module()
    points = {str(b): 0.002 * b**0.5 for b in (8, 16, 32, 64, 128)}
    stored = {"policies": {"fair": {"runs": [{"seed": 3, "alpha_points": points}]}}}
    (tmp_path / "answer.json").write_text(json.dumps(stored))
    ((seed, loaded),) = module.stored_runs(tmp_path / "answer.json")
    assert seed == 3 and [b for b, _ in loaded] == [8, 16, 32, 64, 128]
    found = module.predictions(loaded, 4, "sgd", 0.5)
    assert [(c["kind"], c["batch_size"]) for c in found][-2:] == [
        ("extrapolated", 256),
        ("extrapolated", 512),
    ]
    assert len(found) == 7
    for case in found:
        assert case["lr"] == pytest.approx(0.002 * case["batch_size"] ** 0.5, rel=1e-6)


def _row(curve, lrs: list[float]) -> dict[tuple[int, float], float]:
    return {(32, lr): curve(math.log2(lr)) for lr in lrs}


LRS = [1e-3 * 1000 ** (i / 10) for i in range(11)]  # 1e-3 ... 1, an octave apart


def test_the_grid_peak_is_a_quadratic_over_the_near_best_points_not_the_cliff() -> None:
    """A parabola peaking at lr 0.02 that falls off a cliff (chance) from lr 0.1: the peak
    between grid points, the cliff left out, the value the parabola's."""
    truth = load_benchmark("grid_truth")

    def curve(x: float) -> float:
        return 0.5 if x > math.log2(0.1) else 0.75 - 0.004 * (x - math.log2(0.02)) ** 2

    found = truth.grid_truth(_row(curve, LRS), True, sigma=0.0)[32]
    assert found.lr == pytest.approx(0.02, rel=0.02) and found.value == pytest.approx(0.75)
    minimized = truth.grid_truth({k: -v for k, v in _row(curve, LRS).items()}, False, 0.0)
    assert minimized[32].lr == pytest.approx(found.lr) and minimized[32].value < 0


def test_the_grid_peak_interval_is_wide_on_a_flat_noisy_top_and_covers_the_peak() -> None:
    """With noise of the grid's size the argmax of a flat top moves by octaves: the peak's
    80% interval from redrawn grids is wide there, narrow on a sharp peak, and covers it."""
    truth = load_benchmark("grid_truth")
    rng = np.random.default_rng(3)
    widths = {}
    for curvature in (0.002, 0.03):
        covered = 0
        for _ in range(10):
            row = _row(lambda x, k=curvature: 0.75 - k * (x - math.log2(0.02)) ** 2, LRS)
            noisy = {k: v + rng.normal(0.0, 0.007) for k, v in row.items()}
            found = truth.grid_truth(noisy, True, sigma=0.007, seed=int(rng.integers(100)))[32]
            low, high = found.lr_interval
            covered += low <= 0.02 <= high
            widths.setdefault(curvature, []).append(high / low)
        assert covered >= 6
    assert np.median(widths[0.002]) > 3 * np.median(widths[0.03])


def test_the_grid_standard_error_is_the_seed_spread_where_each_seed_is_kept() -> None:
    truth = load_benchmark("grid_truth")
    per_seed = {(32, lr): [0.7, 0.72] for lr in LRS}
    mean = {k: 0.71 for k in per_seed}
    sigma, source = truth.grid_standard_error(mean, per_seed, True)
    assert sigma == pytest.approx(math.sqrt(0.0002 / 2)) and "seed" in source
    sigma, source = truth.grid_standard_error(mean, {k: [0.71] for k in mean}, True)
    assert sigma == pytest.approx(0.0, abs=1e-9) and "scatter" in source
