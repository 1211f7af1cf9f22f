"""benchmarks/fair_search.py and answer_quality.py run both policies on a shrunken demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

from tests.benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_fair_search_quick_reports_both_policies(tmp_path: Path) -> None:
    module = load_benchmark("fair_search")
    out = tmp_path / "fair.json"
    module.main(["--quick", "--json", str(out), "--threads", "1"])
    results = json.loads(out.read_text())
    assert set(results) == {"old", "fair"}
    (fair,) = results["fair"]
    assert sum(fair["states"].values()) == 7
    # the first round gives every batch size a trial, and the floor lets each complete
    assert all(count >= 1 for count in fair["complete_per_batch_size"].values())
    assert fair["epochs_trained"] > 0 and fair["alpha"] is not None


def test_answer_quality_quick_compares_hpo_with_the_grid(tmp_path: Path) -> None:
    module = load_benchmark("answer_quality")
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
    assert fair["policy"]["budget"]["n_trials"] == 7  # the policy's fields, as run
    assert fair["pruning_regret_same_seed"] <= fair["pruning_regret"]


def _answer_quality():
    module = load_benchmark("answer_quality")
    return module


def test_the_grids_best_lr_lies_between_grid_points_at_the_parabolas_vertex() -> None:
    module = _answer_quality()
    lrs = module.log_spaced(1e-3, 1.0, 9)  # 3/8 decade apart

    def value(lr: float, best: float) -> float:
        return 0.74 - 0.05 * math.log2(lr / best) ** 2

    truth = {16: 0.0123, 32: 0.0301, 64: 0.0577}  # none on a grid point
    mean = {(int(math.log2(b)), lr): value(lr, best) for b, best in truth.items() for lr in lrs}
    found = module.grid_best_lrs(mean)
    for batch_size, best in truth.items():
        assert found[batch_size] == pytest.approx(best, rel=1e-6)
    minimized = module.grid_best_lrs({key: -v for key, v in mean.items()}, maximize=False)
    assert minimized == pytest.approx(found)


def test_the_grids_best_lr_at_the_end_of_the_range_is_that_grid_point() -> None:
    module = _answer_quality()
    mean = {(4, 1e-3): 0.7, (4, 1e-2): 0.6, (4, 1e-1): 0.5}
    assert module.grid_best_lrs(mean) == {16: 1e-3}


def test_each_runs_interval_is_checked_for_the_grids_alpha() -> None:
    inside = _answer_quality()._inside
    assert inside(0.5, [[0.0, 1.0], [None, None], [0.6, 1.0]]) == [True, None, False]
    assert inside(None, [[0.0, 1.0]]) == [None]


def test_answer_quality_cached_grid_outlives_a_change_of_pruner_or_sampler(
    tmp_path: Path,
) -> None:
    module = _answer_quality()
    spec = module.load_spec(REPO / "studies/demo.toml")
    other = spec.model_copy(
        update={
            "pruner": spec.pruner.model_copy(update={"min_trials_per_batch_size": 3}),
            "budget": spec.budget.model_copy(update={"n_trials": 40}),
        }
    )
    assert module.grid_fields(other) == module.grid_fields(spec)
    longer = spec.model_copy(update={"budget": spec.budget.model_copy(update={"epochs": 3})})
    assert module.grid_fields(longer) != module.grid_fields(spec)


def test_answer_quality_reuses_its_cached_grid_and_refuses_another(tmp_path: Path) -> None:
    module = load_benchmark("answer_quality")
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


class _PruneAtFirstReport(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_regret_replays_a_pruned_config_with_its_own_seed(tiny_study: Path) -> None:
    """A pruned top config is trained again with the same seed to the full budget: the
    replay reproduces the pruned run's value at the report it was pruned at, and it counts
    as same-seed regret only if its final value reaches the cutoff."""
    module = _answer_quality()
    data = module.load_spec("tiny").model_dump()
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"].update(epochs=1, reports=2)
    spec = module.StudySpec.model_validate(data)
    top = [(4, 0.01), (5, 0.03)]

    def regret(cutoff: float) -> dict:
        study = optuna.create_study(direction="maximize", pruner=_PruneAtFirstReport())
        study.enqueue_trial({"log2_batch_size": 6, "lr": 0.01, "weight_decay": 1e-4})
        study.optimize(lambda t: module.train_trial(t, spec), n_trials=1)  # trial 0: not top
        return module.pruning_regret(study, spec, top, 1e-4, cutoff)

    low = regret(cutoff=0.0)
    assert low["pruned"] == 2 and low["same_seed"] == 2
    for row in low["trials"]:
        assert row["state"] == "PRUNED" and row["pruned_at_report"] == 1
        assert row["replay_matches"] and row["same_seed_final"] is not None
        assert len(row["same_seed_curve"]) == 2  # every report of the replay
        assert row["same_seed_curve"][-1] == row["same_seed_final"]
    high = regret(cutoff=1.01)
    assert high["pruned"] == 2 and high["same_seed"] == 0
    assert [r["same_seed_final"] for r in high["trials"]] == [
        r["same_seed_final"] for r in low["trials"]
    ]  # deterministic per seed


def test_a_cached_grid_from_other_numerics_is_refused(tmp_path: Path) -> None:
    """A grid trained in fp32 on another machine is not ground truth for a bf16 search
    here: the same config and seed end at a different value."""
    module = _answer_quality()
    cache = tmp_path / "grid.json"
    argv = ["--quick", "--lrs", "2", "--grid-seeds", "1", "--threads", "1", "--only", "grid"]
    first = module.main([*argv, "--grid-cache", str(cache)])
    assert first["numerics"]["precision"] in ("float32", "bfloat16")
    stored = json.loads(cache.read_text())
    stored["key"]["numerics"]["precision"] = "float16"
    cache.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="another grid: numerics.precision differ"):
        module.main([*argv, "--grid-cache", str(cache)])


def test_regret_over_several_seeds_counts_each_config_once_per_seed(tmp_path: Path) -> None:
    module = _answer_quality()
    argv = ["--quick", "--lrs", "2", "--grid-seeds", "1", "--hpo-seeds", "2", "--threads", "1"]
    result = module.main([*argv, "--policies", "fair", "--regret-seeds", "2"])
    fair = result["policies"]["fair"]
    every = fair["pruning_regret_all_seeds"]
    assert every["seeds"] == 2 and every["configs"] == 2 * fair["top_configs"]
    assert len(every["trials"]) == 2 and every["trials"][0] == fair["regret_trials"]
    assert every["pruned"] == sum(pruned for pruned, _ in every["per_seed"])
    assert every["per_seed"][0] == [fair["pruning_regret"], fair["pruning_regret_same_seed"]]
