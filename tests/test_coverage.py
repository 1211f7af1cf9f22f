"""sampler.cover_batch_sizes: a first round of one trial per batch size, queued once."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.data import load_splits
from hpo.space import BATCH_PARAM, first_round
from hpo.spec import StudySpec, load_spec
from hpo.study import create_or_load_study
from tests.conftest import train_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(tiny_study: Path, *, cover: bool, **search: object) -> StudySpec:
    data = load_spec("tiny").model_dump()
    data["sampler"]["cover_batch_sizes"] = cover
    data["search"].update(search)
    data["dataset"].update(train_size=128, val_size=64)
    data["budget"]["epochs"] = 1
    data["pruner"].update(min_epochs=1, stratify_by_batch_size=True, min_trials_per_batch_size=1)
    return StudySpec.model_validate(data)


def test_first_round_is_one_trial_per_batch_size_inside_the_space(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, batch_size_min=16, batch_size_max=64)
    round_ = first_round(spec)
    assert [p[BATCH_PARAM] for p in round_] == [4, 5, 6]
    lrs = [p["lr"] for p in round_]
    assert lrs[1] == pytest.approx(math.sqrt(1e-3 * 0.3))  # the middle B gets the middle LR
    assert lrs[2] / lrs[1] == pytest.approx(math.sqrt(2))  # square-root rule
    assert all(spec.search.lr_low <= lr <= spec.search.lr_high for lr in lrs)


def test_first_round_lr_stays_inside_a_narrow_range(tiny_study: Path) -> None:
    spec = _spec(tiny_study, cover=True, lr_low=0.01, lr_high=0.011, batch_size_max=128)
    lrs = [p["lr"] for p in first_round(spec)]
    assert min(lrs) == 0.01 and max(lrs) == 0.011


def test_a_new_study_queues_the_round_once(tiny_study: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cover.db'}"
    spec = _spec(tiny_study, cover=True)
    study = create_or_load_study(spec, url).study
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["fixed_params"][BATCH_PARAM] for t in waiting) == [4, 5, 6]
    assert {t.user_attrs["queued_by"] for t in waiting} == {"cover_batch_sizes"}
    again = create_or_load_study(spec, url).study  # a second launch, or a second worker
    assert len(again.get_trials()) == 3


def test_without_the_setting_nothing_is_queued(tiny_study: Path, tmp_path: Path) -> None:
    study = create_or_load_study(_spec(tiny_study, cover=False), f"sqlite:///{tmp_path / 'o.db'}")
    assert study.study.get_trials() == []


def test_every_batch_size_completes_in_a_tiny_study(tiny_study: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_study, cover=True)
    loaded = create_or_load_study(spec, f"sqlite:///{tmp_path / 'e2e.db'}")
    splits = load_splits(spec.dataset)
    loaded.study.optimize(lambda trial: train_trial(trial, spec, splits=splits), n_trials=4)
    complete = loaded.study.get_trials(states=(TrialState.COMPLETE,))
    assert {t.params[BATCH_PARAM] for t in complete} == {4, 5, 6}


def test_a_grid_queues_no_round(tiny_study: Path, tmp_path: Path) -> None:
    data = _spec(tiny_study, cover=True).model_dump()
    data["sampler"]["kind"] = "grid"
    data["pruner"]["kind"] = "none"
    loaded = create_or_load_study(StudySpec.model_validate(data), f"sqlite:///{tmp_path / 'g.db'}")
    assert loaded.study.get_trials() == []
