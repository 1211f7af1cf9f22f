"""Data-parallel trials (``training.gpus_per_trial``, ``hpo.distributed``) on CPU with gloo
and 2 ranks: both ranks train the configuration rank 0 drew, the 2-rank update on a global
batch equals one process's update on it, the study sees one report per trial step and
B_simple with its interval; a kill -9 of a rank re-queues the trial, which resumes from its
checkpoint; SIGTERM to the worker stops every rank; no process is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import tomllib
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from optuna.trial import FrozenTrial, TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.device import DeviceSetup, DeviceUnavailable
from hpo.distributed import RankFailed, RankGroup, check_devices_per_trial
from hpo.launcher import GpuSelectionError, _child_env, gpu_groups, local_devices, resolve_gpus
from hpo.noise import NoiseScaleEstimate
from hpo.objective import TrialOutOfMemory, record_device_time, train_trial
from hpo.report import collect, summary_markdown
from hpo.settings import LABEL_ENV, TRUSTED_MODULES_ENV, NodeSettings
from hpo.spec import SpecError, TrainingSpec, parse_spec
from hpo.study import create_or_load_study, retried_from, superseded_trials
from hpo.worker import run_worker
from tests import ddp_trainers
from tests.conftest import tiny_study_text
from tests.test_report import add_trial

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


def test_a_worker_seeing_fewer_gpus_than_a_trial_needs_stops_before_its_first_trial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k != "TORCH_NCCL_ASYNC_ERROR_HANDLING"})  # fmt: skip
    training = TrainingSpec(device="cuda", gpus_per_trial=2)
    setup = DeviceSetup(torch.device("cuda"), None, channels_last=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailable, match="gpus_per_trial = 2 but this worker sees 1 GPU"):
        check_devices_per_trial(training, setup)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_devices_per_trial(training, setup)
    # Rank 0 is the worker: a NCCL error must fail the trial, not end the process.
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


@pytest.mark.parametrize("value", ["0", "3", '"two"'])
def test_a_bad_gpus_per_trial_exits_2_with_one_line_naming_the_field(
    studies_dir: Path, value: str
) -> None:
    text = tiny_study_text(pruner="none") + RANKS.replace("= 2", f"= {value}")
    (studies_dir / "tiny.toml").write_text(text)
    result = CliRunner().invoke(app, ["create", "--study", "tiny"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "training.gpus_per_trial" in line and "Traceback" not in result.output


def test_gpu_ranges_are_grouped_per_trial_within_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert resolve_gpus("0-7") == [str(i) for i in range(8)]
    assert gpu_groups(resolve_gpus("0-7"), 2) == ["0,1", "2,3", "4,5", "6,7"]
    assert gpu_groups(resolve_gpus("0-6"), 3) == ["0,1,2", "3,4,5"]  # GPU 6 left over
    assert gpu_groups(resolve_gpus("0-1,4,6"), 1) == ["0", "1", "4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert gpu_groups(resolve_gpus("all"), 2) == ["2,3", "5,7"]
    assert local_devices(3, per_trial=2) == ["2,3", "5,7", "2,3"]
    with pytest.raises(GpuSelectionError, match="gpus_per_trial = 4 but --gpus gives 2"):
        gpu_groups(resolve_gpus("0-1"), 4)
    for bad in ("2-9", "1-1,1", "a-b"):
        with pytest.raises(GpuSelectionError, match="--gpus"):
            resolve_gpus(bad)


@given(st.text(alphabet="0123456789-, al", max_size=12))
def test_any_gpus_text_is_a_list_of_visible_gpus_or_one_selection_error(text: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
        try:
            chosen = resolve_gpus(text)
        except GpuSelectionError as error:
            assert str(error).startswith("--gpus")
            return
    assert chosen and set(chosen) <= {"0", "1", "2", "3"} and len(set(chosen)) == len(chosen)


def test_each_worker_of_a_group_gets_its_gpus_in_cuda_visible_devices() -> None:
    child = _child_env("sqlite://", NodeSettings(), "4,5", 2, threads=1)
    assert child["CUDA_VISIBLE_DEVICES"] == "4,5" and child[LABEL_ENV] == "[gpu4,5] "


def test_a_data_parallel_trials_device_time_counts_every_device_it_held() -> None:
    spec = parse_spec(tomllib.loads(LINEAR_STUDY), source="test", default_name="ddp")
    ctx = SimpleNamespace(spec=spec, busy_seconds=0.0)
    recorded: dict[str, float] = {}
    record_device_time(recorded.__setitem__, ctx, time.perf_counter() - 10.0, idle_seconds=1.0)
    assert recorded["device_seconds_idle"] == 2.0
    assert recorded["device_seconds"] == pytest.approx(22.0, abs=0.5)


def test_a_ranks_share_above_the_cap_accumulates_in_micro_batches_to_the_same_update(
    tmp_path: Path,
) -> None:
    def linear_run() -> SimpleNamespace:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        return SimpleNamespace(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            tally=SimpleNamespace(noise=NoiseScaleEstimate()),
        )  # fmt: skip

    features, labels = torch.randn(16, 8), torch.randint(0, 2, (16,))
    setup = DeviceSetup(torch.device("cpu"), None, channels_last=False)
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
    try:
        whole, micro = linear_run(), linear_run()
        RankGroup(0, 1).update(whole, setup, features, labels, None)
        RankGroup(0, 1).update(micro, setup, features, labels, 4)
    finally:
        dist.destroy_process_group()
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(micro.model.state_dict()[name], value)


def test_the_report_says_its_batch_sizes_are_global_for_a_data_parallel_study() -> None:
    study = optuna.create_study(direction="maximize")
    for batch_size, lr, value in ((32, 0.01, 0.8), (64, 0.02, 0.85)):
        add_trial(study, batch_size, lr, value, user_attrs={"ranks": 2})
    text = summary_markdown(collect(study, "val_auc"))
    assert "Batch sizes are global: each trial trained data-parallel on 2 devices" in text
    single = optuna.create_study(direction="maximize")
    add_trial(single, 32, 0.01, 0.8)
    assert "Batch sizes are global" not in summary_markdown(collect(single, "val_auc"))


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


def test_a_rank_that_raises_fails_the_trial_with_its_error_as_the_reason(tmp_path: Path) -> None:
    text = LINEAR_STUDY.replace("ddp_trainers:linear", "ddp_trainers:fails_on_rank_1")
    spec = parse_spec(tomllib.loads(text), source="test", default_name="ddp")
    trial = optuna.create_study().ask()
    with pytest.raises(RankFailed) as failed:
        train_trial(trial, spec, checkpoint_root=tmp_path)
    assert str(failed.value) == (
        "rank 1 of 2 exited with code 1: ValueError: rank 1's data loader broke"
    )
    assert _followers_of(os.getpid()) == []  # stopped with the trial


def test_a_rank_out_of_memory_ends_the_trial_as_an_oom_not_a_retry(
    tmp_path: Path,
) -> None:
    text = LINEAR_STUDY.replace("ddp_trainers:linear", "ddp_trainers:out_of_memory_on_rank_1")
    spec = parse_spec(tomllib.loads(text), source="test", default_name="ddp")
    study = optuna.create_study()
    study.enqueue_trial({"log2_batch_size": 5, "lr": 0.3, "weight_decay": 1e-6})
    trial = study.ask()
    with pytest.raises(TrialOutOfMemory, match="at batch size 32"):
        train_trial(trial, spec, checkpoint_root=tmp_path)
    assert study.trials[0].user_attrs["fail_reason"] == "oom"
    assert _followers_of(os.getpid()) == []


def test_a_hung_rank_fails_the_trial_at_the_collective_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_COLLECTIVE_TIMEOUT_S", "2")
    text = LINEAR_STUDY.replace("ddp_trainers:linear", "ddp_trainers:hangs_on_rank_1")
    spec = parse_spec(tomllib.loads(text), source="test", default_name="ddp")
    with pytest.raises(RankFailed, match="^a collective failed: "):
        train_trial(optuna.create_study().ask(), spec, checkpoint_root=tmp_path)
    assert _followers_of(os.getpid()) == []


# --------------------------------------------------------------------- faults of a worker

EPOCHS = 4  # 8 updates an epoch: 256 training patches at batch size 32
FIRST = {"log2_batch_size": 5, "lr": 0.05, "weight_decay": 1e-4}
FOLLOWER_CODE = "from hpo.distributed import follower_main"


def _followers_of(pid: int) -> list[int]:
    """The follower ranks (``hpo.distributed``) among ``pid``'s children."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(child) for child in task.read_text().split()]
    return [child for child in children if FOLLOWER_CODE in _cmdline(child)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, what: str, timeout: float = 60.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Faulted:
    """The scenario's observations: rank 1 killed mid-trial, then the worker stopped with
    SIGTERM in the retry, then a worker in this process finishing the study."""

    killed_follower: int
    stopped_follower: int
    stopped_worker_code: int
    followers_after_stop: list[int]
    trials: list[FrozenTrial]
    leftover_followers: list[int]


@pytest.fixture(scope="module")
def faulted(tmp_path_factory: pytest.TempPathFactory) -> Faulted:
    directory = tmp_path_factory.mktemp("ddp-faults")
    url = f"sqlite:///{directory / 'hpo.db'}"
    extra = RANKS + "checkpoint_async = false\naugment = false\n"
    text = tiny_study_text(epochs=EPOCHS, train_size=256, val_size=64, pruner="none",
                           sampler="random", extra=extra)  # fmt: skip
    spec = parse_spec(tomllib.loads(text), source="test", default_name="tiny")
    loaded = create_or_load_study(spec, url)
    loaded.study.enqueue_trial(FIRST)
    loaded.storage.engine.dispose()
    env = os.environ | {
        "HPO_STORAGE": url, "HPO_HEARTBEAT_S": "1", "HPO_GRACE_S": "3",
        "HPO_CHECKPOINT_DIR": str(directory / "ckpt"), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    command = [sys.executable, "-m", "hpo", "worker", "--study", "tiny", "--n-trials", "1"]
    with open(directory / "worker.log", "w") as log:
        worker = subprocess.Popen(command, env=env, cwd=directory, stdout=log, stderr=log)
    try:
        first = directory / "ckpt" / "tiny" / "trial-0"
        _wait_for(lambda: any(first.glob("*")), "trial 0's first checkpoint")
        (killed,) = _wait_for(lambda: _followers_of(worker.pid), "rank 1")
        os.kill(killed, signal.SIGKILL)
        (stopped,) = _wait_for(
            lambda: [f for f in _followers_of(worker.pid) if f != killed], "the retry's rank 1"
        )
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    after_stop = [pid for pid in (killed, stopped) if _alive(pid)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HPO_HEARTBEAT_S", "1")
        patch.setenv("HPO_GRACE_S", "3")
        node = NodeSettings(checkpoint_dir=directory / "ckpt", num_threads=1)
        run_worker("tiny", url, total_trials=1, node=node)
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    return Faulted(killed, stopped, code, after_stop, trials, _followers_of(os.getpid()))


def test_a_killed_rank_fails_the_trial_with_the_reason_and_re_queues_it(
    faulted: Faulted,
) -> None:
    first = faulted.trials[0]
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "rank 1 of 2 was killed by SIGKILL"
    assert retried_from(faulted.trials[1]) == 0


def test_sigterm_to_the_worker_stops_every_rank(faulted: Faulted) -> None:
    assert faulted.stopped_worker_code == 128 + signal.SIGTERM
    assert faulted.followers_after_stop == []
    assert faulted.trials[1].user_attrs["fail_reason"] == "worker stopped (SIGTERM)"


def test_the_retried_trial_resumes_from_its_checkpoint_and_nothing_is_left_running(
    faulted: Faulted,
) -> None:
    trials = faulted.trials
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    (counted,) = [t for t in trials if t.number not in superseded_trials(trials)]
    assert counted.state == TrialState.COMPLETE
    assert counted.user_attrs["resumed_from_epoch"] >= 1
    assert sorted(counted.intermediate_values) == list(range(1, EPOCHS + 1))
    assert counted.user_attrs["reports_completed"] == EPOCHS
    # The built-in loop measures the noise scale on every update of a data-parallel trial.
    assert counted.user_attrs["b_simple_measurements"] == counted.user_attrs["n_updates"]
    assert len(counted.user_attrs["b_simple_interval"]) == 2
    assert faulted.leftover_followers == []


def test_the_ddp_benchmark_runs_quick(tmp_path: Path) -> None:
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_text(train_size=128, val_size=64) + RANKS)
    out = tmp_path / "ddp.json"
    command = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "ddp.py"),
               "--quick", "--study", str(study), "--threads", "2", "--json", str(out)]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, timeout=300)
    figures = json.loads(out.read_text())
    assert figures["ranks"] == 2 and figures["samples_per_s_2_ranks"] > 0
    assert figures["noise_measurements"] > 0  # measured on the 2-rank updates
