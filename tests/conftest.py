"""Shared fixtures: tiny study files that train in seconds on 2 CPU cores."""

from __future__ import annotations

import contextlib
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from hpo.settings import default_omp_wait_policy

# As at hpo's entry points: before torch is imported, idle OpenMP threads sleep instead of
# spinning (4-8x faster steps on a shared 2-core machine under load: docs/benchmarks.md).
default_omp_wait_policy()

from hpo.objective import train_trial  # noqa: E402

__all__ = ["EXAMPLE_STUDY", "tiny_study_text", "train_trial"]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own-training"  # a user's own trainer ([trainer] function)
EXAMPLE_STUDY = EXAMPLE / "study.toml"


# Property tests draw the same examples on every run (CI must not flake on a new seed);
# their coverage comes from many generated inputs, not from a different draw each time.
hypothesis_settings.register_profile("hpo", derandomize=True, deadline=None)
hypothesis_settings.load_profile("hpo")

TINY_STUDY = """
seed = 0

[dataset]
kind = "synthetic"
train_size = {train_size}
val_size = {val_size}
image_size = 32

[model]
name = "small-cnn"

[search]
batch_size_min = 16
batch_size_max = 64
lr_low = 1e-3
lr_high = 0.3
weight_decay_low = 1e-6
weight_decay_high = 1e-3
optimizer = "sgd"

[budget]
epochs = {epochs}
n_trials = 4

[pruner]
kind = "{pruner}"
min_epochs = 1
n_startup_trials = 1

[sampler]
kind = "{sampler}"
seed = 0
n_startup_trials = 2

[objective]
metric = "val_auc"
"""


def tiny_study_text(
    *,
    train_size: int = 256,
    val_size: int = 128,
    epochs: int = 2,
    pruner: str = "median",
    sampler: str = "tpe",
    extra: str = "",
) -> str:
    body = TINY_STUDY.format(
        train_size=train_size, val_size=val_size, epochs=epochs, pruner=pruner, sampler=sampler
    )
    return textwrap.dedent(body) + textwrap.dedent(extra)


@pytest.fixture
def studies_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working directory with a ``studies/`` folder; HPO_* env vars cleared."""
    directory = tmp_path / "studies"
    directory.mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("HPO_STORAGE", "HPO_STUDIES_DIR", "HPO_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return directory


@pytest.fixture
def tiny_study(studies_dir: Path) -> Path:
    path = studies_dir / "tiny.toml"
    path.write_text(tiny_study_text())
    return path


@contextlib.contextmanager
def far_from_utc() -> Iterator[None]:
    """This process's local time zone set to UTC+9 for the block."""
    machine = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        yield
    finally:
        if machine is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = machine
        time.tzset()


@pytest.fixture
def example_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example's directory importable here and in child processes; cwd a temp dir."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLE), str(REPO)]))
    monkeypatch.chdir(tmp_path)
    for name in ("HPO_STORAGE", "HPO_STUDIES_DIR", "HPO_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path
