"""benchmarks/fair_search.py and answer_quality.py run both policies on a shrunken demo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_fair_search_quick_reports_both_policies(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fair_search", REPO / "benchmarks/fair_search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fair.json"
    module.main(["--quick", "--json", str(out), "--threads", "1"])
    results = json.loads(out.read_text())
    assert set(results) == {"old", "fair"}
    (fair,) = results["fair"]
    assert sum(fair["states"].values()) == 4
    # the first round gives every batch size a trial, and the floor lets each complete
    assert all(count >= 1 for count in fair["complete_per_batch_size"].values())
    assert fair["epochs_trained"] > 0 and fair["alpha"] is not None


def test_answer_quality_quick_compares_hpo_with_the_grid(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "answer_quality", REPO / "benchmarks/answer_quality.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "answer.json"
    argv = ["--quick", "--lrs", "2", "--grid-seeds", "1", "--hpo-seeds", "1", "--threads", "1"]
    module.main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["grid_epochs"] == 6.0  # 3 batch sizes x 2 LRs x 1 epoch
    assert set(result["policies"]) == {"old", "fair"}
    fair = result["policies"]["fair"]
    assert set(fair["per_b_shortfall"]) == {"16", "32", "64"}
    assert None not in fair["per_b_shortfall"].values()  # the fair policy covers every B
    assert fair["pruning_regret"] in (0, 1) and fair["top_configs"] == 1
    assert fair["hpo_epochs_fraction"] > 0


def test_answer_quality_reuses_its_cached_grid_and_refuses_another(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "answer_quality", REPO / "benchmarks/answer_quality.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = tmp_path / "grid.json"
    argv = ["--quick", "--lrs", "2", "--grid-seeds", "1", "--threads", "1", "--only", "grid"]
    first = module.main([*argv, "--grid-cache", str(cache)])
    assert cache.is_file() and first["policies"] == {}

    def no_training(*args, **kwargs):
        raise AssertionError("the cached grid was trained again")

    module.train_trial = no_training
    again = module.main([*argv, "--grid-cache", str(cache)])
    assert again["grid_values"] == first["grid_values"]
    assert again["alpha_grid"] == first["alpha_grid"]
    with pytest.raises(SystemExit, match="another grid: lrs differ"):
        module.main([*argv[:2], "3", *argv[3:], "--grid-cache", str(cache)])
