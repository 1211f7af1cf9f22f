"""deploy/slurm/hpo-worker.sbatch under a real (one-node, loopback) Slurm cluster against
PostgreSQL: an array of 3 finishes the study at its exact total, and an ``scancel`` of one
array task mid-trial re-queues that trial, which another task finishes."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.storage import open_storage

from .conftest import tiny_study_text
from .databases import FAST_HEARTBEAT, scratch_database
from .slurm_cluster import slurm, slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "deploy" / "slurm" / "hpo-worker.sbatch"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
pytestmark = [pytest.mark.db, pytest.mark.slurm, pytest.mark.slow]


def _submit_env(cluster: dict[str, str], url: str, tmp_path: Path) -> dict[str, str]:
    """What the user exports before ``sbatch``: the script's variables, for this machine."""
    return {
        **cluster,
        **FAST_HEARTBEAT,
        "HPO_STORAGE": url,
        "HPO_STUDY": "tiny",
        "HPO_HOME": str(Path(sys.prefix).parent),  # the checkout whose .venv runs the tests
        "HPO_DATA_ROOT": str(tmp_path / "data"),
        "HPO_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "HPO_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }


def _create_study(url: str, tmp_path: Path, **study: object) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "tiny.toml").write_text(tiny_study_text(**study))
    from typer.testing import CliRunner

    from hpo.cli import app

    env = {"HPO_STUDIES_DIR": str(studies)}
    result = CliRunner().invoke(app, ["create", "--study", "tiny", "--storage", url], env=env)
    assert result.exit_code == 0, result.output


def _sbatch(env: dict[str, str], tmp_path: Path, *options: str) -> str:
    """Submit the shipped script as an array of 3 sized for this machine (no GPU: the
    command line overrides its #SBATCH lines, as a user would); the array's job id."""
    out = slurm(env, "sbatch", "--parsable", "--array=0-2", "--gres=none",
                "--cpus-per-task=1", "--mem=1500M", f"--output={tmp_path}/task-%a.log",
                *options, str(SBATCH))  # fmt: skip
    return out.strip().split(";")[0]


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("task-*.log")))


def _wait_gone(env: dict[str, str], job: str, tmp_path: Path, timeout_s: float = 500) -> None:
    deadline = time.monotonic() + timeout_s
    while slurm(env, "squeue", "-h", "-j", job, "-o", "%i").strip():
        if time.monotonic() > deadline:
            pytest.fail(f"array {job} still queued after {timeout_s} s:\n{_logs(tmp_path)}")
        time.sleep(1)


@pytest.fixture(scope="module")
def one_cluster() -> Iterator[dict[str, str]]:
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(one_cluster: dict[str, str]) -> Iterator[dict[str, str]]:
    """The module's cluster (its daemons start once), empty again after each test: a job a
    failed test left queued or running is cancelled before the next test submits."""
    yield one_cluster
    slurm(one_cluster, "scancel", "--partition=test", check=False)
    deadline = time.monotonic() + 120
    while slurm(one_cluster, "squeue", "-h", "-o", "%i", check=False).strip():
        assert time.monotonic() < deadline, "the test cluster's jobs did not end"
        time.sleep(1)


def test_an_array_of_three_finishes_the_study_at_its_exact_total(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    with scratch_database("postgresql") as url:
        _create_study(url, tmp_path, epochs=1)
        env = _submit_env(cluster, url, tmp_path)
        job = _sbatch(env, tmp_path)
        _wait_gone(env, job, tmp_path)
        study = optuna.load_study(study_name="tiny", storage=open_storage(url))
        finished = [t for t in study.trials if t.state in FINISHED]
        assert len(finished) == 4, _logs(tmp_path)  # budget.n_trials: not one more
        assert all(t.state in FINISHED for t in study.trials), _logs(tmp_path)
        for task in range(3):
            log = (tmp_path / f"task-{task}.log").read_text()
            assert "error" not in log.lower(), log


def test_scancel_of_a_task_mid_trial_requeues_it_and_another_task_finishes_it(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    with scratch_database("postgresql") as url:
        # Long enough trials that one is caught mid-way (several epochs of 2048 patches).
        _create_study(url, tmp_path, epochs=4, train_size=2048, val_size=256, pruner="none")
        env = _submit_env(cluster, url, tmp_path)
        job = _sbatch(env, tmp_path)
        storage = open_storage(url)
        study = optuna.load_study(study_name="tiny", storage=storage)
        deadline = time.monotonic() + 300
        while True:  # a trial that has reported an epoch: mid-trial
            running = [
                t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.intermediate_values and "worker" in t.user_attrs
            ]  # fmt: skip
            if running:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no trial reached its first epoch:\n{_logs(tmp_path)}")
            time.sleep(0.5)
        victim = running[0]
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        task = _task_of(pid)
        slurm(env, "scancel", f"{job}_{task}")
        _wait_gone(env, job, tmp_path)

        study = optuna.load_study(study_name="tiny", storage=storage)
        trials = study.get_trials(deepcopy=False)
        stopped = trials[victim.number]
        assert stopped.state == TrialState.FAIL, _logs(tmp_path)
        assert stopped.user_attrs["fail_reason"] == "worker stopped (SIGTERM)"
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert retry.state in FINISHED and retry.params == victim.params, _logs(tmp_path)
        finisher = int(retry.user_attrs["worker"].rsplit(":", 1)[1])
        assert finisher != pid  # another task finished it
        assert len([t for t in trials if t.state in FINISHED]) == 4, _logs(tmp_path)
        log = (tmp_path / f"task-{task}.log").read_text()
        assert re.search(r"SIGTERM|re-?queue", log, re.IGNORECASE), log


def _task_of(pid: int) -> str:
    """The array index of the task whose batch script (exec'd into the worker) is ``pid``:
    its SLURM_ARRAY_TASK_ID (the one node is this machine)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (index,) = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"SLURM_ARRAY_TASK_ID=")]
    return index.decode()
