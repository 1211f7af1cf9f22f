"""Search space: batch size only as powers of two inside the bounds; grid covers all combinations."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import optuna
import pytest

from hpo.space import (
    BATCH_PARAM,
    BATCH_SIZE_PARAM,
    grid_search_space,
    grid_size,
    make_pruner,
    make_sampler,
    sample_params,
)
from hpo.spec import StudySpec, load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(tiny_study: Path, **changes: dict) -> StudySpec:
    data = load_spec("tiny").model_dump()
    for table, values in changes.items():
        data[table].update(values)
    return StudySpec.model_validate(data)


def test_batch_size_is_a_power_of_two_inside_the_bounds(tiny_study: Path) -> None:
    spec = _spec(
        tiny_study,
        dataset={"train_size": 4096},
        search={"batch_size_min": 8, "batch_size_max": 512},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(200):
        trial = study.ask()
        params = sample_params(trial, spec)
        study.tell(trial, 0.0)
        assert params.batch_size == 2**params.log2_batch_size
        assert 8 <= params.batch_size <= 512
        assert trial.user_attrs["batch_size"] == params.batch_size
        assert spec.search.lr_low <= params.lr <= spec.search.lr_high
        assert spec.search.weight_decay_low <= params.weight_decay <= spec.search.weight_decay_high
        seen.add(params.batch_size)
    assert seen == {8, 16, 32, 64, 128, 256, 512}


def test_batch_size_is_an_ordered_integer_exponent(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    study = optuna.create_study()
    trial = study.ask()
    sample_params(trial, spec)
    distribution = trial.distributions["log2_batch_size"]
    assert isinstance(distribution, optuna.distributions.IntDistribution)
    assert (distribution.low, distribution.high) == (4, 6)
    assert trial.distributions["lr"].log and trial.distributions["weight_decay"].log


@pytest.mark.parametrize("sampler_class", [optuna.samplers.TPESampler, optuna.samplers.GPSampler])
def test_the_batch_size_is_also_a_parameter_no_sampler_ever_draws(
    tiny_study: Path, sampler_class: type
) -> None:
    """For the dashboard: ``batch_size`` = 2 ** ``log2_batch_size`` as a single-valued
    parameter. TPE (multivariate) and GP model the exponent and never see the copy."""
    relative: list[set[str]] = []
    independent: list[str] = []

    class Spy(sampler_class):
        def infer_relative_search_space(self, study, trial):
            space = super().infer_relative_search_space(study, trial)
            relative.append(set(space))
            return space

        def sample_independent(self, study, trial, name, distribution):
            independent.append(name)
            return super().sample_independent(study, trial, name, distribution)

    spec = load_spec("tiny")
    options = {"multivariate": True} if sampler_class is optuna.samplers.TPESampler else {}
    study = optuna.create_study(sampler=Spy(seed=0, n_startup_trials=3, **options))
    study.optimize(lambda trial: sample_params(trial, spec).lr, n_trials=6)

    for trial in study.trials:
        batch_size = 2 ** trial.params[BATCH_PARAM]
        assert trial.params[BATCH_SIZE_PARAM] == batch_size
        assert trial.distributions[BATCH_SIZE_PARAM] == optuna.distributions.IntDistribution(
            batch_size, batch_size, log=True
        )
    assert BATCH_SIZE_PARAM not in independent and BATCH_PARAM in independent
    assert relative[-1] == {BATCH_PARAM, "lr", "weight_decay"}


def test_grid_covers_every_combination(tiny_study: Path) -> None:
    spec = _spec(
        tiny_study,
        dataset={"train_size": 512},
        search={"batch_size_min": 16, "batch_size_max": 256},
        sampler={"kind": "grid", "grid_lr": [1e-3, 1e-2], "grid_weight_decay": [1e-4]},
    )
    space = grid_search_space(spec)
    assert space["log2_batch_size"] == [4, 5, 6, 7, 8]
    assert grid_size(spec) == 10  # the literature's 5 batch sizes x 2 LRs
    study = optuna.create_study(sampler=make_sampler(spec))
    visited = set()

    def objective(trial: optuna.Trial) -> float:
        params = sample_params(trial, spec)
        visited.add((params.batch_size, params.lr, params.weight_decay))
        return 0.0

    # The grid sampler stops the study by itself once every point has been visited.
    study.optimize(objective, n_trials=3 * grid_size(spec))
    assert len(study.trials) == grid_size(spec)
    expected = set(itertools.product([16, 32, 64, 128, 256], [1e-3, 1e-2], [1e-4]))
    assert visited == expected


def test_default_grid_is_three_log_spaced_lrs(tiny_study: Path) -> None:
    spec = _spec(tiny_study, sampler={"kind": "grid"})
    lrs = grid_search_space(spec)["lr"]
    assert len(lrs) == 3
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(0.3)
    assert lrs[1] == pytest.approx(math.sqrt(1e-3 * 0.3))


def _base_sampler(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    return getattr(sampler, "base", sampler)


def test_tpe_is_multivariate_with_constant_liar_only_in_parallel(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    single = _base_sampler(make_sampler(spec, parallel=False))
    parallel = _base_sampler(make_sampler(spec, parallel=True))
    assert isinstance(single, optuna.samplers.TPESampler)
    assert single._multivariate and parallel._multivariate
    assert not single._constant_liar and parallel._constant_liar


@pytest.mark.parametrize(("kind", "cls"), [("gp", "GPSampler"), ("random", "RandomSampler")])
def test_other_samplers(tiny_study: Path, kind: str, cls: str) -> None:
    spec = _spec(tiny_study, sampler={"kind": kind})
    assert type(_base_sampler(make_sampler(spec))).__name__ == cls


def test_pruners_get_the_warm_up(tiny_study: Path) -> None:
    spec = _spec(tiny_study, budget={"epochs": 6}, pruner={"kind": "median", "min_epochs": 3})
    median = make_pruner(spec)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert median._n_warmup_steps == 3
    spec = _spec(tiny_study, budget={"epochs": 9}, pruner={"kind": "hyperband", "min_epochs": 2})
    hyperband = make_pruner(spec)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert hyperband._min_resource == 2 and hyperband._max_resource == 9
    spec = _spec(tiny_study, pruner={"kind": "none"})
    assert isinstance(make_pruner(spec), optuna.pruners.NopPruner)


def test_median_pruner_never_prunes_before_the_warm_up(tiny_study: Path) -> None:
    """A trial far below the median at epoch 1 survives a 2-epoch warm-up, then is pruned."""
    spec = _spec(
        tiny_study,
        budget={"epochs": 4},
        pruner={"kind": "median", "min_epochs": 2, "n_startup_trials": 1},
    )
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    for _ in range(3):
        good = study.ask()
        for epoch in range(1, 5):
            good.report(0.9, epoch)
        study.tell(good, 0.9)
    bad = study.ask()
    bad.report(0.1, 1)
    assert not bad.should_prune()
    bad.report(0.1, 2)
    assert bad.should_prune()


def test_a_fixed_trial_replays_the_three_drawn_parameters_only(tiny_study: Path) -> None:
    """Benchmarks and notebooks replay a configuration with optuna's FixedTrial, which
    refuses any parameter its dict does not name: the display copy is not asked there."""
    fixed = {BATCH_PARAM: 5, "lr": 0.01, "weight_decay": 1e-4}
    params = sample_params(optuna.trial.FixedTrial(fixed), load_spec("tiny"))
    assert (params.batch_size, params.lr, params.weight_decay) == (32, 0.01, 1e-4)
