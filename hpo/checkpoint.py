"""Per-trial checkpoints, so a trial whose worker died resumes instead of starting over.

After every epoch a trial writes model + optimizer + LR scheduler + grad scaler + RNG
states (torch's global CPU/CUDA generators and the trial's batch/augmentation generator)
and the run's tally (per-epoch metrics, updates, seconds) to
``ROOT/STUDY/trial-N/checkpoint.pt``, atomically (write a temporary file, fsync, rename),
so a kill at any moment leaves the previous epoch's file intact. ``N`` is the number of
the *original* trial of a retry chain (``hpo.study.original_trial_number``), so a retry
finds the checkpoint of the trial it replaces.

``ROOT`` is the node's ``--checkpoint-dir`` / ``$HPO_CHECKPOINT_DIR``, else the spec's
``training.checkpoint_dir``, else ``./hpo-checkpoints`` (the node setting is applied to
the spec by ``StudySpec.on_node``). For a retry to resume on another node it must be a
directory every node mounts at that path.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a shared directory must not
be a way to run code on every node. Nothing here knows about Optuna.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hpo.spec import StudySpec
from hpo.train import Tally, TrainingRun

DEFAULT_CHECKPOINT_DIR = Path("hpo-checkpoints")
FILE_NAME = "checkpoint.pt"


def checkpoint_root(spec: StudySpec) -> Path:
    """The study's checkpoint directory (absolute)."""
    configured = spec.training.checkpoint_dir
    return (Path(configured) if configured else DEFAULT_CHECKPOINT_DIR).resolve() / spec.name


@dataclass(frozen=True)
class TrialCheckpoint:
    """One trial's checkpoint file; ``save`` after each epoch, ``load_into`` on a retry."""

    path: Path

    @classmethod
    def in_root(cls, root: Path, original_trial_number: int) -> TrialCheckpoint:
        return cls(root / f"trial-{original_trial_number}" / FILE_NAME)

    def save(self, run: TrainingRun) -> None:
        """Write the state after ``run``'s last completed epoch; replaces the previous file."""
        state = {
            "epoch": run.epochs_done,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "generator": run.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "extra": run.tally.to_dict(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def load_into(self, run: TrainingRun) -> int:
        """Restore the saved state into ``run`` if there is a file; returns the epochs it
        had completed (0 when there is no checkpoint and the run starts fresh)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        run.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        cuda_states = state["cuda_rng"]
        if (
            cuda_states
            and torch.cuda.is_available()
            and len(cuda_states) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(cuda_states)
        run.tally = Tally.from_dict(state["extra"])
        return int(state["epoch"])


def remove_checkpoints_except(listed: list[Path], keep: set[int]) -> list[Path]:
    """Delete the trial directories in ``listed`` whose original trial number is not in
    ``keep``; returns what went. The caller lists the directory (``list_trial_dirs``)
    *before* reading which trials to keep, so a trial that starts meanwhile is kept."""
    removed = []
    for directory in listed:
        number = directory.name.removeprefix("trial-")
        if number.isdigit() and int(number) not in keep:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def list_trial_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [path for path in root.iterdir() if path.name.startswith("trial-")]
