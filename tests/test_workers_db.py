"""Many workers, one study, on real PostgreSQL and MariaDB: exact totals, crashes, restarts.

Each test gets its own scratch database. Workers are real ``hpo worker`` processes with
1 s heartbeats and a 5 s grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import tomllib
import torch
from optuna.trial import TrialState

from hpo.spec import parse_spec
from hpo.storage import open_storage
from hpo.study import create_or_load_study, study_budget, superseded_trials

from .conftest import tiny_study_text
from .databases import logs, scratch_database, start_worker, wait_all, worker_env
from .private_postgres import PostgresUnavailable, PrivatePostgres

pytestmark = pytest.mark.db


def _spec(**kwargs):
    return parse_spec(tomllib.loads(tiny_study_text(**kwargs)), source="test", default_name="tiny")


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    if url.startswith("postgresql"):  # may be restarting (here, or in a suite run beside us)
        _wait_until_postgres_accepts(url)
    return optuna.load_study(study_name="tiny", storage=open_storage(url)).get_trials()


def _assert_exact_total(url: str, total: int) -> list[optuna.trial.FrozenTrial]:
    trials = _trials(url)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    replaced = superseded_trials(trials)
    counted = [t for t in trials if t.number not in replaced]
    assert len(counted) == total, [(t.number, t.state.name) for t in trials]
    return trials


def _wait_for_checkpointed_trial(
    url: str, checkpoints: Path, workers: list[subprocess.Popen], timeout_s: float = 180
):
    """A RUNNING trial that has written at least one epoch checkpoint. Polls one open
    storage every 50 ms; fails at once if the workers all exit first (trials too short to
    catch mid-run: give them more epochs or data, as MID_RUN_TRIAL does)."""
    storage = open_storage(url)
    study = optuna.load_study(study_name="tiny", storage=storage)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for trial in study.get_trials(states=(TrialState.RUNNING,)):
                saved = checkpoints / "tiny" / f"trial-{trial.number}" / "checkpoint.pt"
                if saved.is_file():
                    return trial
            if all(worker.poll() is not None for worker in workers):
                pytest.fail("the workers finished before a trial was seen mid-run")
            time.sleep(0.05)
    finally:
        storage.engine.dispose()
    pytest.fail("no trial reached its first checkpoint in time")


# Trials long enough (several seconds of training) that a test sees one mid-run, after its
# first epoch checkpoint, even on a fast CPU: at 256 patches x 3 epochs a trial took 0.5 s
# on a bf16 CPU and the poll could miss all of them.
MID_RUN_TRIAL = {"epochs": 4, "train_size": 2048, "pruner": "none"}


@pytest.fixture(params=["postgresql", "mariadb"])
def any_db(request) -> str:
    with scratch_database(request.param) as url:
        yield url


@pytest.fixture
def postgres() -> str:
    with scratch_database("postgresql") as url:
        yield url


def test_three_workers_finish_exactly_the_study_total(any_db: str, tmp_path: Path) -> None:
    create_or_load_study(_spec(epochs=1, train_size=128, val_size=64), any_db, parallel=True)
    env = worker_env(any_db, tmp_path / "checkpoints")
    workers = [start_worker("tiny", 12, env, tmp_path) for _ in range(3)]

    assert wait_all(workers) == [0, 0, 0], logs(tmp_path)

    trials = _assert_exact_total(any_db, 12)
    assert len(trials) == 12
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work was shared


def test_killed_worker_trial_is_retried_and_resumes_from_its_checkpoint(
    postgres: str, tmp_path: Path
) -> None:
    spec = _spec(**MID_RUN_TRIAL)
    create_or_load_study(spec, postgres, parallel=True)
    checkpoints = tmp_path / "checkpoints"
    env = worker_env(postgres, checkpoints)
    workers = [start_worker("tiny", 3, env, tmp_path) for _ in range(2)]

    victim = _wait_for_checkpointed_trial(postgres, checkpoints, workers)
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    saved = checkpoints / "tiny" / f"trial-{victim.number}" / "checkpoint.pt"
    saved_epoch = torch.load(saved, weights_only=True)["epoch"]
    codes = wait_all(workers)

    assert sorted(codes) == [-signal.SIGKILL, 0], logs(tmp_path)
    trials = _assert_exact_total(postgres, 3)
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == victim.params
    assert retry.user_attrs["resumed_from_epoch"] == saved_epoch >= 1
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4]


@pytest.fixture
def restartable_postgres() -> Iterator[PrivatePostgres]:
    """A private server this test may restart (never the shared one other suites use)."""
    try:
        server = PrivatePostgres(fast=True)
        try:
            server.init()
            server.start()
        except BaseException:
            server.remove()
            raise
    except PostgresUnavailable as error:
        if os.environ.get("HPO_REQUIRE_DB"):
            pytest.fail(f"HPO_REQUIRE_DB is set and no private PostgreSQL: {error}")
        pytest.skip(str(error))
    try:
        yield server
    finally:
        server.remove()


@pytest.mark.slow
def test_workers_without_pre_ping_ride_out_a_postgresql_restart(
    restartable_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    # No pre-ping: every pooled connection is dead after the restart, and the first
    # statement on each fails; hpo's retry (not a ping) must carry the workers through.
    server = restartable_postgres
    url = server.create_database("hpo_restart")
    create_or_load_study(_spec(**MID_RUN_TRIAL), url, parallel=True)
    env = worker_env(url, tmp_path / "checkpoints", HPO_DB_PRE_PING="0")
    workers = [start_worker("tiny", 4, env, tmp_path) for _ in range(2)]
    _wait_for_checkpointed_trial(url, tmp_path / "checkpoints", workers)

    server.restart(down_s=3)  # clients see refused connections for 3 s, then a fresh server
    assert all(worker.poll() is None for worker in workers), "restart came too late to test"

    assert wait_all(workers) == [0, 0], logs(tmp_path) + server.log()
    trials = _assert_exact_total(url, 4)
    replaced = superseded_trials(trials)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in replaced)
    felt = ("unreachable during", "not recorded")  # a retried call, or a missed heartbeat
    assert any(sign in logs(tmp_path) for sign in felt), logs(tmp_path)


def _wait_until_postgres_accepts(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            open_storage(url, attempts=1).get_all_studies()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_two_launches_of_one_study_share_it(postgres: str, tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "tiny.toml").write_text(tiny_study_text(epochs=1, train_size=128))
    env = worker_env(postgres, tmp_path / "checkpoints")
    command = [sys.executable, "-m", "hpo", "launch", "--study", "tiny", "--n-trials", "3"]
    launches = [
        subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]

    assert wait_all(launches) == [0, 0]

    studies = optuna.get_all_study_summaries(open_storage(postgres))
    assert [s.study_name for s in studies] == ["tiny"]
    trials = _trials(postgres)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert 3 <= study_budget(optuna.load_study(study_name="tiny", storage=postgres)).finished <= 6


def test_sigterm_requeues_the_running_trial_and_exits_quickly(
    postgres: str, tmp_path: Path
) -> None:
    create_or_load_study(_spec(**MID_RUN_TRIAL), postgres, parallel=True)
    checkpoints = tmp_path / "checkpoints"
    worker = start_worker("tiny", 2, worker_env(postgres, checkpoints), tmp_path)
    running = _wait_for_checkpointed_trial(postgres, checkpoints, [worker])

    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = wait_all([worker], timeout_s=30)[0]

    assert time.monotonic() - sent < 10
    assert code == 128 + signal.SIGTERM, logs(tmp_path)
    trials = _trials(postgres)
    stopped = trials[running.number]
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["fail_reason"] == "worker stopped (SIGTERM)"
    (queued,) = [t for t in trials if t.state == TrialState.WAITING]
    assert queued.params == running.params
    assert queued.system_attrs["failed_trial"] == running.number
    assert not [t for t in trials if t.state == TrialState.RUNNING]
