"""Data-parallel trials (``training.gpus_per_trial``, ``hpo.distributed``) on CPU with gloo
and 2 ranks: both ranks train the configuration rank 0 drew, the 2-rank update on a global
batch equals one process's update on it, the study sees one report per trial step and
B_simple with its interval; a kill -9 of a rank re-queues the trial, which resumes from its
checkpoint; SIGTERM to the worker stops every rank; no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import tomllib
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.objective import train_trial
from hpo.settings import TRUSTED_MODULES_ENV, NodeSettings
from hpo.spec import SpecError, parse_spec
from hpo.study import create_or_load_study, superseded_trials
from hpo.worker import run_worker
from tests import ddp_trainers
from tests.conftest import tiny_study_text

RANKS = '[training]\ndevice = "cpu"\ngpus_per_trial = 2\nnum_threads = 1\n'
LINEAR_STUDY = f"""
name = "ddp-linear"
seed = 3
[trainer]
function = "tests.ddp_trainers:linear"
[search]
batch_size_min = 16
batch_size_max = 32
lr_low = 0.01
lr_high = 0.5
weight_decay_low = 1e-6
weight_decay_high = 1e-5
optimizer = "sgd"
[budget]
epochs = 2
[pruner]
kind = "none"
{RANKS}"""


@pytest.fixture(autouse=True)
def _trust_the_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRUSTED_MODULES_ENV, "tests.ddp_trainers")


def test_gpus_per_trial_must_be_a_positive_divisor_of_the_smallest_batch() -> None:
    for value, words in ((0, "training.gpus_per_trial"), (3, "must divide search.batch_size_min")):
        text = LINEAR_STUDY.replace("gpus_per_trial = 2", f"gpus_per_trial = {value}")
        with pytest.raises(SpecError, match=words):
            parse_spec(tomllib.loads(text), source="test", default_name="ddp")


def test_two_ranks_train_rank_0s_configuration_to_the_single_process_update(
    tmp_path: Path,
) -> None:
    spec = parse_spec(tomllib.loads(LINEAR_STUDY), source="test", default_name="ddp")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"log2_batch_size": 4, "lr": 0.3, "weight_decay": 1e-6})
    study.optimize(lambda trial: train_trial(trial, spec, checkpoint_root=tmp_path), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    ranks = [torch.load(path) for path in sorted(tmp_path.rglob("rank-*.pt"))]
    assert [seen["token"] for seen in ranks] == ["from rank 0", "from rank 0"]
    assert [(seen["lr"], seen["local_batch_size"], seen["world_size"]) for seen in ranks] == [
        (0.3, 8, 2), (0.3, 8, 2)]  # fmt: skip
    expected = ddp_trainers.single_process(spec.seed, 16, 0.3, reports=2)
    for seen in ranks:
        for name, value in expected.items():
            torch.testing.assert_close(seen["state"][name], value, rtol=1e-5, atol=1e-6)
    # One report per trial step, from rank 0 only; the noise scale from every update.
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs["reports_completed"] == 2
    assert trial.user_attrs["b_simple_measurements"] == 2 * ddp_trainers.STEPS_PER_REPORT
    assert trial.user_attrs["b_simple_sums"]["n"] == 8
    low, high = trial.user_attrs["b_simple_interval"]
    assert 0 <= low <= trial.user_attrs["b_simple"] and (high is None or high >= low)
