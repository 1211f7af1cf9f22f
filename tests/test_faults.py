"""Fault injection for everything that writes or reads checkpoints: nothing is lost.

- an unusable checkpoint location stops the worker once, before the study is touched;
- a save that fails mid-run (full disk, I/O error, read-only, permission; every phase of
  the write) is a warning: the trial goes on, keeps its result, and the worker counts it;
- an unreadable checkpoint is moved aside and the retry starts from epoch 0;
- a retry never inherits its predecessor's ``fail_reason`` or metrics.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import tomllib
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo import checkpoint as checkpoint_module
from hpo.caps import CLAMPED_ATTR
from hpo.checkpoint import (
    UNREADABLE_DIR,
    CheckpointDirError,
    CheckpointSaveFailed,
    CheckpointUnreadable,
    TrialCheckpoint,
    check_checkpoint_dir,
)
from hpo.cli import app
from hpo.data import load_splits
from hpo.device import select_device
from hpo.objective import Objective
from hpo.retry import PARAMETER_ATTRS, RETRY_REASON_ATTR, RetryWithCleanAttrs
from hpo.settings import NodeSettings
from hpo.space import sample_params
from hpo.spec import parse_spec
from hpo.study import create_or_load_study
from hpo.train import EpochMetrics, build_run
from hpo.worker import run_worker

from .conftest import tiny_study_text

pytestmark = pytest.mark.filterwarnings(
    f"ignore::{ExperimentalWarning.__module__}.ExperimentalWarning"
)

PARAMS = {"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-4}
WRITE_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM)


class Killed(Exception):
    """Stands in for kill -9 right after a checkpoint was written."""


@pytest.fixture(scope="module")
def spec():
    text = tiny_study_text(train_size=64, val_size=32, epochs=2, pruner="none", sampler="random")
    return parse_spec(tomllib.loads(text), source="test", default_name="tiny")


@pytest.fixture(scope="module")
def splits(spec):
    return load_splits(spec.dataset)


@pytest.fixture(scope="module")
def setup(spec):
    return select_device(spec.training)


@pytest.fixture(scope="module")
def uninterrupted_value(spec, splits, setup) -> float:
    """The objective of PARAMS trained without any fault: what every faulted run must match."""
    return Objective(spec, setup, splits)(_study().ask())


@pytest.fixture(scope="module")
def one_epoch_run(spec, setup):
    return _run_after_one_epoch(spec, setup)


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    return study


def _run_after_one_epoch(spec, setup):
    """A small run with one epoch of (fake) metrics, as a checkpoint would hold it."""
    params = sample_params(optuna.trial.FixedTrial(PARAMS), spec)
    run = build_run(spec, params, setup, seed=0)
    run.tally.history.append(EpochMetrics(1, 0.5, 0.6, 0.7, 0.6, 0.65))
    return run


# --------------------------------------------------------------------------- location


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at ``path`` (``mount`` needs root); skips the test where it cannot."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_file_as_checkpoint_dir_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "README.md"
    afile.write_text("x")
    for root in (afile, afile / "tiny", afile / "a" / "b"):
        with pytest.raises(CheckpointDirError, match="README.md") as raised:
            check_checkpoint_dir(root)
        assert "\n" not in str(raised.value)


def test_a_read_only_checkpoint_dir_is_refused(tmp_path: Path) -> None:
    with (
        _tmpfs(tmp_path / "ro", "ro,size=64k") as mount,
        pytest.raises(CheckpointDirError, match="Read-only file system"),
    ):
        check_checkpoint_dir(mount / "tiny")


def test_launch_with_an_unusable_checkpoint_dir_exits_2_before_creating_the_study(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tiny_study.parent.parent / "afile").write_text("x")
    monkeypatch.setenv("HPO_CHECKPOINT_DIR", "afile")
    result = CliRunner().invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint directory")
    assert "Traceback" not in result.output
    assert not (tiny_study.parent.parent / "hpo.db").exists()


# --------------------------------------------------------------------------- failed saves


def _inject(monkeypatch: pytest.MonkeyPatch, phase: str, code: int) -> None:
    """Make one phase of a checkpoint write fail with OSError(code)."""
    failure = OSError(code, os.strerror(code))

    def fail(*args, **kwargs):
        raise failure

    if phase == "mkdir":
        monkeypatch.setattr(Path, "mkdir", fail)
    elif phase == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    elif phase == "replace":
        monkeypatch.setattr(os, "replace", fail)
    else:  # "write": the data written partly, then the error (a disk filling up)

        class Filling:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                self.handle.write(bytes(data)[: len(data) // 2])
                raise failure

            def __getattr__(self, name):
                return getattr(self.handle, name)

        real_open = open
        monkeypatch.setattr(
            checkpoint_module, "open", lambda *a, **k: Filling(real_open(*a, **k)), raising=False
        )


@settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    phase=st.sampled_from(["mkdir", "write", "fsync", "replace"]),
    code=st.sampled_from(WRITE_ERRNOS),
    had_previous=st.booleans(),
)
def test_a_failed_save_raises_one_error_and_keeps_the_previous_checkpoint(
    one_epoch_run, tmp_path_factory, phase: str, code: int, had_previous: bool
) -> None:
    run = one_epoch_run
    checkpoint = TrialCheckpoint.in_root(tmp_path_factory.mktemp("ckpt"), 0)
    if had_previous:
        checkpoint.save(run)
    before = checkpoint.path.read_bytes() if had_previous else None
    with pytest.MonkeyPatch.context() as patch:
        _inject(patch, phase, code)
        with pytest.raises(CheckpointSaveFailed, match=os.strerror(code)):
            checkpoint.save(run)
    if had_previous:
        assert checkpoint.path.read_bytes() == before
        assert [p.name for p in checkpoint.path.parent.iterdir()] == ["checkpoint.pt"]
    else:
        assert not checkpoint.path.exists()
        leftovers = (
            list(checkpoint.path.parent.iterdir()) if checkpoint.path.parent.exists() else []
        )
        assert leftovers == []


def test_a_save_to_a_full_device_raises_save_failed(one_epoch_run, tmp_path: Path) -> None:
    """A real ENOSPC, from /dev/full, without patching anything."""
    checkpoint = TrialCheckpoint.in_root(tmp_path, 0)
    checkpoint.path.parent.mkdir()
    temporary = checkpoint.path.with_name(f".checkpoint.pt.{os.getpid()}.tmp")
    temporary.symlink_to("/dev/full")
    with pytest.raises(CheckpointSaveFailed, match="No space left on device"):
        checkpoint.save(one_epoch_run)
    assert not temporary.exists() and not checkpoint.path.exists()


def test_a_trial_whose_saves_fail_completes_with_its_result(
    spec, splits, setup, uninterrupted_value: float, tmp_path: Path, monkeypatch
) -> None:
    _inject(monkeypatch, "write", errno.ENOSPC)
    objective = Objective(spec, setup, splits, checkpoint_root=tmp_path)
    study = _study()
    trial = study.ask()
    value = objective(trial)
    study.tell(trial, value)

    finished = study.trials[0]
    assert finished.state == TrialState.COMPLETE
    assert value == pytest.approx(uninterrupted_value, abs=1e-6)
    assert finished.user_attrs["checkpoint_save_failures"] == spec.budget.epochs
    assert "No space left on device" in finished.user_attrs["checkpoint_save_error"]
    assert objective.failed_saves == spec.budget.epochs


def test_a_trial_on_a_full_tmpfs_completes(spec, splits, setup, tmp_path: Path) -> None:
    """A tiny tmpfs fills at the first save; the trial still completes."""
    with _tmpfs(tmp_path / "full", "size=16k") as mount:
        objective = Objective(spec, setup, splits, checkpoint_root=mount / "tiny")
        study = _study()
        trial = study.ask()
        study.tell(trial, objective(trial))
        assert study.trials[0].state == TrialState.COMPLETE
        assert objective.failed_saves == spec.budget.epochs
        assert not [p for p in (mount / "tiny").rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- unreadable


@st.composite
def corruptions(draw, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "random", "flip", "empty", "other-dict"]))
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=2048))
    if kind == "empty":
        return b""
    if kind == "other-dict":
        return _torch_bytes(draw(st.sampled_from([{}, {"epoch": 1}, [1, 2], {"model": 3}])))
    flipped = bytearray(valid)
    for index in draw(st.lists(st.integers(0, len(valid) - 1), min_size=1, max_size=8)):
        flipped[index] ^= 0xFF
    return bytes(flipped)


def _torch_bytes(value: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def valid_checkpoint_bytes(spec, setup, tmp_path_factory) -> bytes:
    checkpoint = TrialCheckpoint.in_root(tmp_path_factory.mktemp("valid"), 0)
    checkpoint.save(_run_after_one_epoch(spec, setup))
    return checkpoint.path.read_bytes()


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_a_damaged_checkpoint_loads_or_is_moved_aside(
    spec, setup, valid_checkpoint_bytes: bytes, tmp_path_factory, data
) -> None:
    damaged = data.draw(corruptions(valid_checkpoint_bytes))
    root = tmp_path_factory.mktemp("root")
    checkpoint = TrialCheckpoint.in_root(root, 3)
    checkpoint.path.parent.mkdir()
    checkpoint.path.write_bytes(damaged)
    params = sample_params(optuna.trial.FixedTrial(PARAMS), spec)
    run = build_run(spec, params, setup, seed=0)
    try:
        epoch = checkpoint.load_into(run)
    except CheckpointUnreadable as unreadable:
        assert not checkpoint.path.exists()
        assert (
            unreadable.moved_to is not None and unreadable.moved_to.parent == root / UNREADABLE_DIR
        )
        assert unreadable.moved_to.read_bytes() == damaged
        assert "\n" not in str(unreadable)
    else:
        assert epoch == 1 == run.epochs_done


# --------------------------------------------------------------------------- retries


def _first_trial_killed_after_epoch_one(spec, setup, splits, root: Path, monkeypatch):
    """Trial 0 saves its epoch-1 checkpoint, then its worker is stopped (as SIGINT would)."""
    study = _study()
    first = study.ask()
    save = TrialCheckpoint.save

    def save_then_die(self: TrialCheckpoint, run) -> None:
        save(self, run)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TrialCheckpoint, "save", save_then_die)
        with pytest.raises(Killed):
            Objective(spec, setup, splits, checkpoint_root=root)(first)
    first.set_user_attr("fail_reason", "worker stopped (SIGINT)")
    study.tell(first, state=TrialState.FAIL)
    RetryWithCleanAttrs(inherit_intermediate_values=True)(study, study.trials[0])
    return study


def test_a_retry_of_a_truncated_checkpoint_restarts_from_epoch_zero_and_completes(
    spec, splits, setup, uninterrupted_value: float, tmp_path: Path, monkeypatch
) -> None:
    study = _first_trial_killed_after_epoch_one(spec, setup, splits, tmp_path, monkeypatch)
    path = TrialCheckpoint.in_root(tmp_path, 0).path
    path.write_bytes(path.read_bytes()[:100])

    retry = study.ask()
    value = Objective(spec, setup, splits, checkpoint_root=tmp_path)(retry)
    study.tell(retry, value)

    finished = study.trials[1]
    assert finished.state == TrialState.COMPLETE
    assert value == pytest.approx(uninterrupted_value, abs=1e-6)
    assert finished.user_attrs["resumed_from_epoch"] == 0
    assert "unreadable" in finished.user_attrs["checkpoint_unreadable"]
    assert "fail_reason" not in finished.user_attrs
    assert finished.user_attrs[RETRY_REASON_ATTR] == "worker stopped (SIGINT)"
    (moved,) = (tmp_path / UNREADABLE_DIR).iterdir()
    assert moved.name.startswith("trial-0.")
    assert path.is_file()  # the retry's own checkpoint


@settings(derandomize=True, max_examples=50, deadline=None)
@given(
    attrs=st.dictionaries(
        st.sampled_from(
            [
                "fail_reason",
                "val_auc",
                "worker",
                "epochs_completed",
                "device",
                "resumed_from_epoch",
                "checkpoint_unreadable",
                "batch_size",
                CLAMPED_ATTR,
                RETRY_REASON_ATTR,
            ]
        ),
        st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False)),
    ),
    retries=st.integers(1, 3),
)
def test_a_retry_inherits_only_parameter_attrs(attrs: dict, retries: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, state=TrialState.FAIL)
    for _ in range(retries):
        RetryWithCleanAttrs(inherit_intermediate_values=True)(study, study.trials[-1])
        retry = study.ask()
        study.tell(retry, 0.5)  # the retry completes
        retry_frozen = study.trials[-1]
        assert "fail_reason" not in retry_frozen.user_attrs
        assert set(retry_frozen.user_attrs) <= PARAMETER_ATTRS | {RETRY_REASON_ATTR}
        for key in PARAMETER_ATTRS & attrs.keys():
            assert retry_frozen.user_attrs[key] == attrs[key]
        assert retry_frozen.system_attrs["failed_trial"] == 0
        # fail it again, as a worker would, to retry the retry
        study.add_trial(
            optuna.create_trial(
                state=TrialState.FAIL,
                params=retry_frozen.params,
                distributions=retry_frozen.distributions,
                user_attrs={**retry_frozen.user_attrs, "fail_reason": "again"},
                system_attrs=retry_frozen.system_attrs,
            )
        )
    if "fail_reason" in attrs:
        assert study.trials[1].user_attrs[RETRY_REASON_ATTR] == attrs["fail_reason"]


# --------------------------------------------------------------------------- the worker


def test_a_worker_whose_saves_fail_completes_its_trials_and_counts_the_failures(
    spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create_or_load_study(spec, url)
    _inject(monkeypatch, "fsync", errno.EIO)
    monkeypatch.setattr(checkpoint_module, "check_checkpoint_dir", lambda root: None)
    node = NodeSettings(checkpoint_dir=tmp_path / "checkpoints")
    result = run_worker(spec.name, url, total_trials=1, node=node)

    assert result.states == {"COMPLETE": 1} and result.exit_code == 0
    assert result.failed_saves == spec.budget.epochs
    assert f"{spec.budget.epochs} checkpoint save(s) failed" in caplog.text
    (trial,) = optuna.load_study(study_name=spec.name, storage=url).trials
    assert trial.user_attrs["checkpoint_save_failures"] == spec.budget.epochs


def test_a_worker_with_a_file_as_checkpoint_dir_exits_2_before_any_trial(
    spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    create_or_load_study(spec, url)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("HPO_CHECKPOINT_DIR", str(tmp_path / "afile"))
    result = CliRunner().invoke(app, ["worker", "--study", spec.name, "--storage", url])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: checkpoint directory")
    assert len(result.output.strip().splitlines()) == 1
    assert optuna.load_study(study_name=spec.name, storage=url).trials == []
