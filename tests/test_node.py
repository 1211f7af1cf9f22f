"""Node-local settings, the device resolved once at worker start, and exit codes that say
whether a run achieved anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

import hpo.train
from hpo.cli import app
from hpo.settings import NodeSettings, SettingsError
from hpo.spec import NODE_LOCAL_FIELDS, load_spec, spec_differences
from hpo.storage import SPEC_ATTR
from hpo.worker import run_worker
from tests.conftest import tiny_study_text
from tests.test_data import write_image_folder

runner = CliRunner()
NO_GPU = not torch.cuda.is_available()


def _url(directory: Path) -> str:
    return f"sqlite:///{directory / 'hpo.db'}"


@pytest.mark.skipif(not NO_GPU, reason="needs a node without a GPU")
def test_a_cuda_study_on_a_node_without_gpu_exits_2_before_any_trial(studies_dir: Path) -> None:
    study = tiny_study_text(epochs=1, extra='\n[training]\ndevice = "cuda"\n')
    (studies_dir / "tiny.toml").write_text(study)
    command = [sys.executable, "-m", "hpo", "launch", "--study", "tiny", "--n-trials", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert result.returncode == 2, result.stderr
    assert "training.device: cuda requested but no GPU is visible" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (studies_dir.parent / "hpo.db").exists()  # nothing created, nothing ran


@pytest.mark.skipif(not NO_GPU, reason="needs a node without a GPU")
def test_a_worker_joining_a_cuda_study_without_gpu_exits_2(studies_dir: Path) -> None:
    (studies_dir / "tiny.toml").write_text(tiny_study_text(epochs=1))
    url = _url(studies_dir.parent)
    assert runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"]).exit_code == 0

    result = runner.invoke(app, ["worker", "--study", "tiny", "--storage", url, "--device", "cuda"])

    assert result.exit_code == 2
    assert "cuda requested but no GPU is visible" in result.output
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert len(trials) == 1  # the worker started no trial


def test_a_run_where_every_trial_fails_exits_1_with_the_reasons(
    studies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (studies_dir / "tiny.toml").write_text(tiny_study_text(epochs=1, pruner="none"))

    def broken(*args: object, **kwargs: object) -> torch.nn.Module:
        raise RuntimeError("weights are corrupt")

    monkeypatch.setattr(hpo.train, "build_model", broken)
    result = runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "2"])

    assert result.exit_code == 1, result.output
    assert "no trial finished COMPLETE or PRUNED: fail 2" in result.output
    assert "error: RuntimeError: weights are corrupt ×2" in result.output


def test_node_local_fields_never_count_as_a_spec_difference(tiny_study: Path) -> None:
    spec = load_spec("tiny")
    here = spec.on_node(NodeSettings(Path("/mnt/pcam"), "cpu", 3, Path("/scratch/checkpoints")))
    assert here.training.num_threads == 3 and here.training.device == "cpu"
    assert spec_differences(spec, here) == []
    changed = here.model_copy(update={"budget": here.budget.model_copy(update={"epochs": 9})})
    assert spec_differences(spec, changed) == ["budget.epochs"]
    assert {"dataset.root", "training.device"} <= NODE_LOCAL_FIELDS


def test_node_settings_come_from_flags_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_DATA_ROOT", "/from/env")
    monkeypatch.setenv("HPO_NUM_THREADS", "4")
    node = NodeSettings.from_env(device="cpu")
    assert node == NodeSettings(Path("/from/env"), "cpu", 4, None)
    assert NodeSettings.from_env(data_root=Path("/flag")).data_root == Path("/flag")
    assert NodeSettings.from_env(**{}).to_env()["HPO_DATA_ROOT"] == "/from/env"
    monkeypatch.setenv("HPO_DEVICE", "tpu")
    with pytest.raises(SettingsError, match="HPO_DEVICE"):
        NodeSettings.from_env()


def test_a_node_with_its_data_under_another_path_joins_and_trains(
    studies_dir: Path, tmp_path: Path
) -> None:
    """The study was created where the images sit in one directory; this node has them
    elsewhere and says so with --data-root. No "different spec" refusal, and it trains."""
    creator_root, node_root = tmp_path / "creator-images", tmp_path / "node-images"
    write_image_folder(creator_root, per_class=24, size=32)
    write_image_folder(node_root, per_class=24, size=32)
    extra = '\n[training]\ncheckpoint_dir = "creator-checkpoints"\nnum_threads = 1\n'
    text = tiny_study_text(epochs=1, pruner="none", extra=extra)
    text = text.replace('kind = "synthetic"', f'kind = "imagefolder"\nroot = "{creator_root}"')
    text = text.replace("train_size = 256\nval_size = 128\n", "")
    text = text.replace("batch_size_max = 64", "batch_size_max = 32")
    (studies_dir / "tiny.toml").write_text(text)
    url = _url(studies_dir.parent)
    assert runner.invoke(app, ["launch", "--study", "tiny", "--n-trials", "1"]).exit_code == 0
    creator_root.rename(tmp_path / "gone")  # the creator's path does not exist on this node

    node_file = text.replace('"creator-checkpoints"', '"node-checkpoints"').replace(
        "num_threads = 1", "num_threads = 2"
    )
    (studies_dir / "tiny.toml").write_text(node_file)
    result = runner.invoke(
        app,
        ["worker", "--study", "tiny", "--storage", url, "--spec", "tiny", "--n-trials", "2",
         "--data-root", str(node_root)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert (studies_dir.parent / "node-checkpoints" / "tiny").is_dir()


# The spec as ``hpo launch`` stored it before node-local settings existed (a real study's
# JSON, from this version's predecessor): it must still load and run.
STORED_BEFORE = {
    "name": "tiny", "seed": 0,
    "dataset": {"kind": "synthetic", "root": None, "train_size": 128, "val_size": 64,
                "val_fraction": 0.2, "image_size": 32, "cache_dir": None, "seed": 0},
    "model": {"name": "small-cnn", "pretrained": False},
    "search": {"batch_size_min": 16, "batch_size_max": 64, "lr_low": 0.001, "lr_high": 0.3,
               "weight_decay_low": 1e-06, "weight_decay_high": 0.001, "optimizer": "sgd",
               "momentum": 0.9},
    "budget": {"epochs": 1, "n_trials": 2, "timeout_s": None},
    "pruner": {"kind": "none", "min_epochs": 1, "n_startup_trials": 1, "reduction_factor": 3},
    "sampler": {"kind": "tpe", "seed": 0, "n_startup_trials": 2, "grid_lr": None,
                "grid_weight_decay": None},
    "objective": {"metric": "val_auc"},
    "training": {"device": "auto", "mixed_precision": True, "channels_last": True,
                 "eval_batch_size": 512, "augment": True, "color_jitter": 0.0,
                 "num_threads": None, "checkpoint_dir": None},
}  # fmt: skip


def test_a_study_stored_in_the_previous_format_loads_and_runs(tmp_path: Path) -> None:
    url = _url(tmp_path)
    study = optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    study.set_user_attr(SPEC_ATTR, json.dumps(STORED_BEFORE))

    result = run_worker("tiny", url, total_trials=2, node=NodeSettings(num_threads=1))

    assert result.exit_code == 0
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
