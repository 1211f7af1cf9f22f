"""kill -9 at each phase of a trial: nothing lost, nothing duplicated, nothing stuck.

A real ``hpo worker`` process kills itself with SIGKILL at a chosen phase
(``$HPO_TEST_KILL_AT``, ``hpo.settings.kill_point``: deterministic, no timing); then a
second worker (``run_worker`` in the test process) finishes the study. The study total is exact, no trial is RUNNING or
WAITING at the end, and the killed trial is retried with its parameters, resuming from
its last whole checkpoint where one was written. Heartbeat 1 s, grace 3 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import tomllib
from optuna.trial import FrozenTrial, TrialState

from hpo.settings import KILL_AT_ENV, NodeSettings
from hpo.spec import parse_spec
from hpo.storage import open_storage
from hpo.study import create_or_load_study, superseded_trials
from hpo.worker import run_worker

from .conftest import tiny_study_text
from .databases import scratch_database

TOTAL = 2
EPOCHS = 3  # 4 updates an epoch: 128 training patches at batch size 32

# The first trial's parameters, queued so that its batch size (and updates an epoch) is known.
FIRST = {"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-4}
# phase -> (the killed trial's state once its worker is gone, the epoch its retry resumes
# from; None: the trial was told before the kill and is not retried). "claimed" is tried
# on a queued trial (WAITING -> RUNNING) and on a new one (``claimed-new``: study.ask
# creating it).
PHASES = {
    "claimed": (TrialState.RUNNING, 0),  # RUNNING in storage, nothing else done
    "claimed-new": (TrialState.RUNNING, 0),
    "step:2": (TrialState.RUNNING, 0),  # mid-epoch 1, no checkpoint yet
    "step:6": (TrialState.RUNNING, 1),  # mid-epoch 2, epoch 1 checkpointed
    "checkpoint-partial:2": (TrialState.RUNNING, 1),  # half of epoch 2's file written
    "checkpoint-write:2": (TrialState.RUNNING, 1),  # epoch 2's file written, not renamed
    "tell": (TrialState.RUNNING, EPOCHS),  # trained and checkpointed, not told
    "told": (TrialState.COMPLETE, None),  # told, checkpoints not yet cleaned up
}


def _spec(phase: str):
    """The tiny study; checkpoints written in the background (the default) except for a
    kill mid-epoch: whether the previous epoch's write has ended by the kill is a race there,
    and the test asserts the epoch the retry resumes from. A write the kill cuts short
    (``checkpoint-partial``, ``checkpoint-write``) is the background writer's."""
    extra = "[training]\ncheckpoint_async = false\n" if phase.startswith("step") else ""
    text = tiny_study_text(epochs=EPOCHS, train_size=128, val_size=64, pruner="none",
                           sampler="random", extra=extra)  # fmt: skip
    return parse_spec(tomllib.loads(text), source="test", default_name="tiny")


@dataclass
class Killed:
    """One phase's run: the killed trial as the kill left it, every trial at the end."""

    phase: str
    victim: FrozenTrial
    trials: list[FrozenTrial]
    checkpoints: Path


def _worker(url: str, directory: Path, kill_at: str) -> subprocess.Popen:
    inherited = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV}
    env = inherited | {
        "HPO_STORAGE": url, "HPO_HEARTBEAT_S": "1", "HPO_GRACE_S": "3",
        "HPO_CHECKPOINT_DIR": str(directory / "ckpt"), "HPO_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1", KILL_AT_ENV: kill_at,
    }  # fmt: skip
    command = [sys.executable, "-m", "hpo", "worker", "--study", "tiny", "--n-trials", str(TOTAL)]
    log = open(directory / "worker-killed.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT)


def _trials(url: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage=open_storage(url)).get_trials()


def _kill_then_finish(runs: dict[str, tuple[str, Path]]) -> dict[str, Killed]:
    """For each phase (its storage URL and directory): a worker process killed at the
    phase (all phases side by side, so their process starts overlap), then, once all are
    dead, a worker in this process (``run_worker``, no process start) finishing each
    study in turn."""
    for phase, (url, _) in runs.items():
        loaded = create_or_load_study(_spec(phase), url)
        if phase != "claimed-new":
            loaded.study.enqueue_trial(FIRST)
        loaded.storage.engine.dispose()
    killed = {p: _worker(url, d, p.removesuffix("-new")) for p, (url, d) in runs.items()}
    codes = {phase: process.wait(timeout=300) for phase, process in killed.items()}
    results = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HPO_HEARTBEAT_S", "1")
        env.setenv("HPO_GRACE_S", "3")
        env.delenv(KILL_AT_ENV, raising=False)
        for phase, (url, directory) in runs.items():
            output = (directory / "worker-killed.log").read_text()
            assert codes[phase] == -signal.SIGKILL, (phase, output)
            victim = _trials(url)[0]
            node = NodeSettings(checkpoint_dir=directory / "ckpt", num_threads=1)
            finished = run_worker("tiny", url, total_trials=TOTAL, node=node)
            assert finished.exit_code == 0, (phase, finished)
            results[phase] = Killed(phase, victim, _trials(url), directory / "ckpt")
    return results


def _assert_nothing_lost(run: Killed) -> None:
    expected_state, resumed_from = PHASES[run.phase]
    assert run.victim.number == 0 and run.victim.state == expected_state
    trials = run.trials
    states = [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states
    assert len({t.number for t in trials}) == len(trials)
    counted = [t for t in trials if t.number not in superseded_trials(trials)]
    assert len(counted) == TOTAL, states
    assert all(t.state == TrialState.COMPLETE for t in counted), states
    assert not [t.number for t in counted if "fail_reason" in t.user_attrs]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == run.victim.number]
    if resumed_from is None:
        assert not retries and trials[0].state == TrialState.COMPLETE
    else:
        (retry,) = retries
        assert trials[0].state == TrialState.FAIL
        if run.phase != "claimed-new":
            # The three drawn parameters, and the batch size shown beside them (hpo.space).
            assert retry.params == {**FIRST, "batch_size": 2 ** FIRST["log2_batch_size"]}
        assert retry.user_attrs["resumed_from_epoch"] == resumed_from
        assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    assert not list(run.checkpoints.rglob("*.tmp"))  # a killed write leaves no debris


@pytest.fixture(scope="module")
def on_sqlite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Killed]:
    runs = {}
    for phase in PHASES:
        directory = tmp_path_factory.mktemp(phase.replace(":", "-"))
        runs[phase] = (f"sqlite:///{directory / 'hpo.db'}", directory)
    return _kill_then_finish(runs)


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_worker_killed_at_each_phase_loses_no_trial_on_sqlite(
    on_sqlite: dict[str, Killed], phase: str
) -> None:
    _assert_nothing_lost(on_sqlite[phase])


POSTGRES_PHASES = ("claimed", "checkpoint-write:2")


@pytest.fixture(scope="module")
def on_postgres(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Killed]:
    with contextlib.ExitStack() as stack:
        runs = {}
        for phase in POSTGRES_PHASES:
            url = stack.enter_context(scratch_database("postgresql"))
            runs[phase] = (url, tmp_path_factory.mktemp(f"pg-{phase.replace(':', '-')}"))
        yield _kill_then_finish(runs)


@pytest.mark.db
@pytest.mark.parametrize("phase", POSTGRES_PHASES)
def test_a_worker_killed_at_a_phase_loses_no_trial_on_postgresql(
    on_postgres: dict[str, Killed], phase: str
) -> None:
    _assert_nothing_lost(on_postgres[phase])
