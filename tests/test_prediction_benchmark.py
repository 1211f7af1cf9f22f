"""benchmarks/prediction_quality.py: hpo's predictions against a grid run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

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
    grid's cache is reused by a second call."""
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
