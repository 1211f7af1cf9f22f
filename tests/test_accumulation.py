"""training.above_cap = "accumulate": a batch size above the device's cap is trained as
micro-batches at the cap, one optimizer update per batch, instead of being clamped."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import hpo.objective
import hpo.train
from hpo.caps import read_batch_cap, write_batch_cap
from hpo.device import select_device
from hpo.spec import TrainingSpec, load_spec
from hpo.study import create_or_load_study
from hpo.train import train_step, train_step_accumulated
from hpo.worker import run_worker
from tests.conftest import tiny_study_text
from tests.test_oom import _OutOfMemoryAbove

BIG = {"log2_batch_size": 6, "lr": 0.05, "weight_decay": 1e-4}  # B = 64


@pytest.fixture
def tiny_study(studies_dir: Path) -> Path:
    path = studies_dir / "tiny.toml"
    extra = '\n[training]\nabove_cap = "accumulate"\n'
    path.write_text(tiny_study_text(train_size=128, val_size=64, epochs=1, extra=extra))
    return path


def test_accumulated_update_equals_one_big_batch_without_batchnorm() -> None:
    torch.manual_seed(0)
    setup = select_device(TrainingSpec(device="cpu", mixed_precision=False, channels_last=False))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)
    )
    twin = copy.deepcopy(model)
    images, targets = torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,))

    def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    optimizer, twin_optimizer = sgd(model), sgd(twin)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(2):  # two updates, so momentum is exercised too
        whole = train_step(model, optimizer, scaler, setup, images, targets)
        parts = train_step_accumulated(twin, twin_optimizer, scaler, setup, images, targets, 8)
        assert float(parts) == pytest.approx(float(whole), rel=1e-5)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _no_training_pass_above(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    original = hpo.train.build_model
    monkeypatch.setattr(
        hpo.train,
        "build_model",
        lambda *a, **k: _OutOfMemoryAbove(original(*a, **k), limit, in_training=True),
    )
    monkeypatch.setattr(hpo.objective, "release_device_memory", lambda device: None)


def test_a_batch_above_the_cap_is_accumulated_not_clamped(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training_pass_above(monkeypatch, limit=17)  # any pass above 16 samples would OOM
    url = f"sqlite:///{tmp_path / 'acc.db'}"
    spec = load_spec("tiny")
    loaded = create_or_load_study(spec, url)
    write_batch_cap(loaded.ref, select_device(spec.training).name, 16)
    loaded.study.enqueue_trial(BIG)

    run_worker("tiny", url, total_trials=1)

    (trial,) = optuna.load_study(study_name="tiny", storage=url).trials
    assert trial.state == TrialState.COMPLETE
    assert trial.params["log2_batch_size"] == 6 and trial.user_attrs["batch_size"] == 64
    assert trial.user_attrs["micro_batch_size"] == 16
    assert trial.user_attrs["accumulation_steps"] == 4
    assert trial.user_attrs["n_updates"] == 128 // 64  # one update per 64 samples
    assert "batch_size_clamped_from" not in trial.user_attrs


def test_an_oom_at_the_micro_batch_still_lowers_the_cap(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training_pass_above(monkeypatch, limit=32)
    url = f"sqlite:///{tmp_path / 'oom.db'}"
    spec = load_spec("tiny")
    loaded = create_or_load_study(spec, url)
    device = select_device(spec.training).name
    write_batch_cap(loaded.ref, device, 32)
    loaded.study.enqueue_trial(BIG)

    run_worker("tiny", url, total_trials=1)

    (trial,) = optuna.load_study(study_name="tiny", storage=url).trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "oom"
    assert trial.user_attrs["micro_batch_size"] == 32
    assert read_batch_cap(loaded.ref, device) == 16  # half the micro-batch that failed
