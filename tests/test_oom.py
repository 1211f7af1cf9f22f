"""Out of memory during a trial: the trial fails as "oom", the device's cap falls, memory is
freed and the worker goes on. CUDA's OOM is injected on the CPU."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import hpo.objective
import hpo.train
from hpo.caps import lower_batch_cap, read_batch_cap, write_batch_cap
from hpo.data import DeviceBatcher, channel_stats, load_splits
from hpo.device import select_device
from hpo.models import build_model
from hpo.spec import load_spec
from hpo.study import create_or_load_study
from hpo.train import evaluate_within_memory
from hpo.worker import run_worker
from tests.conftest import tiny_study_text


class _OutOfMemoryAbove(torch.nn.Module):
    """Wraps a model; raises CUDA's OOM when a batch of at least ``limit`` samples goes
    through it in the given mode, as a too-large batch on a GPU would."""

    def __init__(self, inner: torch.nn.Module, limit: int, *, in_training: bool) -> None:
        super().__init__()
        self.inner, self.limit, self.in_training = inner, limit, in_training

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] >= self.limit and self.training == self.in_training:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(images)


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'oom.db'}"


@pytest.fixture
def tiny_study(studies_dir: Path) -> Path:
    """One epoch on 128 patches: these tests are about what happens around training."""
    path = studies_dir / "tiny.toml"
    path.write_text(tiny_study_text(train_size=128, val_size=64, epochs=1))
    return path


def _oom_training_at(monkeypatch: pytest.MonkeyPatch, limit: int) -> list[str]:
    original = hpo.train.build_model
    monkeypatch.setattr(
        hpo.train,
        "build_model",
        lambda *a, **k: _OutOfMemoryAbove(original(*a, **k), limit, in_training=True),
    )
    released: list[str] = []
    monkeypatch.setattr(hpo.objective, "release_device_memory", released.append)
    return released


def test_oom_fails_the_trial_lowers_the_cap_and_the_worker_goes_on(
    tiny_study: Path, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = _oom_training_at(monkeypatch, limit=64)
    spec = load_spec("tiny")
    loaded = create_or_load_study(spec, storage_url)
    loaded.study.enqueue_trial({"log2_batch_size": 6, "lr": 0.05, "weight_decay": 1e-4})

    run_worker("tiny", storage_url, total_trials=3)

    trials = optuna.load_study(study_name="tiny", storage=storage_url).trials
    first = trials[0]
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "oom"
    assert first.user_attrs["batch_size_cap_after_oom"] == 32
    assert read_batch_cap(loaded.ref, select_device(spec.training).name) == 32
    assert released == ["cpu"]
    # The worker lived on: the later trials ran, none above the lowered cap.
    assert len(trials) == 3
    assert all(t.state != TrialState.FAIL for t in trials[1:])
    assert all(t.user_attrs["batch_size"] <= 32 for t in trials[1:])


def test_a_trial_drawn_above_the_cap_trains_at_the_cap_and_records_it(
    tiny_study: Path, storage_url: str
) -> None:
    spec = load_spec("tiny")
    loaded = create_or_load_study(spec, storage_url)
    write_batch_cap(loaded.ref, select_device(spec.training).name, 16)
    loaded.study.enqueue_trial({"log2_batch_size": 6, "lr": 0.05, "weight_decay": 1e-4})

    run_worker("tiny", storage_url, total_trials=1)

    trial = optuna.load_study(study_name="tiny", storage=storage_url).trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["batch_size"] == 16
    assert trial.user_attrs["batch_size_clamped_from"] == 64


def test_the_cap_is_only_ever_lowered(tiny_study: Path, storage_url: str) -> None:
    study = create_or_load_study(load_spec("tiny"), storage_url).ref
    write_batch_cap(study, "gpu-x", 16)
    assert lower_batch_cap(study, "gpu-x", 128) == 16
    assert lower_batch_cap(study, "gpu-x", 16) == 8
    assert read_batch_cap(study, "gpu-x") == 8
    assert read_batch_cap(study, "another-gpu") is None


def test_evaluation_halves_its_batch_after_an_oom(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    setup = select_device(spec.training)
    train_set, _ = load_splits(spec.dataset)
    model = _OutOfMemoryAbove(build_model("small-cnn"), 100, in_training=False)
    batcher = DeviceBatcher(*channel_stats(train_set.images), setup.device, channels_last=False)

    (loss, accuracy, _), batch_size = evaluate_within_memory(model, train_set, batcher, setup, 512)

    assert batch_size == 64
    assert loss > 0 and 0.0 <= accuracy <= 1.0
