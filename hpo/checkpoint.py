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

Nothing is lost to a failing disk: the location is checked once when a worker starts
(``check_checkpoint_dir``); a save that fails later raises ``CheckpointSaveFailed`` with
the previous file intact (the objective warns and trains on); a file that cannot be
loaded raises ``CheckpointUnreadable`` after being moved to ``ROOT/STUDY/unreadable/``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpo.paths import OutputDirError, check_writable_dir
from hpo.settings import kill_point
from hpo.spec import StudySpec
from hpo.train import Tally, TrainingRun

DEFAULT_CHECKPOINT_DIR = Path("hpo-checkpoints")
FILE_NAME = "checkpoint.pt"
UNREADABLE_DIR = "unreadable"


def checkpoint_root(spec: StudySpec) -> Path:
    """The study's checkpoint directory (absolute)."""
    configured = spec.training.checkpoint_dir
    return (Path(configured) if configured else DEFAULT_CHECKPOINT_DIR).resolve() / spec.name


CheckpointDirError = OutputDirError  # the checkpoint directory cannot be used on this node


class CheckpointSaveFailed(Exception):
    """An epoch's checkpoint could not be written (disk full, I/O error, permission). The
    previous checkpoint, if any, is intact; the trial goes on without this one."""


class CheckpointUnreadable(Exception):
    """A checkpoint file could not be loaded (truncated, corrupt, from another model). It
    has been moved to ``moved_to`` (None if even that failed) for inspection."""

    def __init__(self, message: str, moved_to: Path | None) -> None:
        super().__init__(message)
        self.moved_to = moved_to


def check_checkpoint_dir(root: Path) -> None:
    """Raise CheckpointDirError (one line) unless ``root`` is, or can be made, a directory
    this process can write a file into and fsync. A worker calls it once before its first
    trial, so an unusable location stops the worker, not every trial at its first save."""
    check_writable_dir(
        root,
        "checkpoint directory (--checkpoint-dir, $HPO_CHECKPOINT_DIR or training.checkpoint_dir)",
    )


def _os_reason(error: OSError) -> str:
    """An OSError as a short reason ('File exists', 'No space left on device', ...)."""
    return error.strerror or type(error).__name__


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class TrialCheckpoint:
    """One trial's checkpoint file; ``save`` after each epoch, ``load_into`` on a retry."""

    path: Path

    @classmethod
    def in_root(cls, root: Path, original_trial_number: int) -> TrialCheckpoint:
        return cls(root / f"trial-{original_trial_number}" / FILE_NAME)

    def save(self, run: TrainingRun) -> None:
        """Write the state after ``run``'s last completed epoch; replaces the previous file.

        Raises CheckpointSaveFailed for any OSError (full disk, EIO, read-only, permission):
        the state is serialized in memory first, so every failure is a file-system one, and
        a half-written temporary file is removed, so the previous checkpoint stays valid.
        """
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
        buffer = io.BytesIO()
        torch.save(state, buffer)
        temporary = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_durably(temporary, buffer.getbuffer())
            kill_point("checkpoint-write")  # tests only: written, not yet renamed
            os.replace(temporary, self.path)
            self._remove_stale_temporaries()
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise CheckpointSaveFailed(
                f"checkpoint {self.path} after epoch {run.epochs_done} not saved: "
                f"{_os_reason(error)}"
            ) from error

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed writer left beside the checkpoint (a kill -9
        between the write and the rename). Only one worker at a time runs a trial's retry
        chain, and this one has just renamed its own, so any left is a dead process's."""
        for stale in self.path.parent.glob(f".{FILE_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def load_into(self, run: TrainingRun) -> int:
        """Restore the saved state into ``run`` if there is a file; returns the epochs it
        had completed (0 when there is no checkpoint and the run starts fresh).

        Raises CheckpointUnreadable when the file cannot be loaded or does not fit ``run``
        (truncated, corrupt, another model); the file is moved aside first, under
        ``ROOT/unreadable/`` (which cleanup never touches). ``run`` may then hold part of
        the state: the caller builds a fresh one.
        """
        if not self.path.is_file():
            return 0
        try:
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
            epoch = int(state["epoch"])
            if epoch != run.epochs_done:
                raise ValueError(f"epoch {epoch} but {run.epochs_done} epochs of metrics")
            return epoch
        except Exception as error:  # torch.load and load_state_dict raise many kinds
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            moved_to = self._move_aside()
            raise CheckpointUnreadable(
                f"checkpoint {self.path} unreadable ({reason}); "
                + (f"moved to {moved_to}" if moved_to else "could not be moved aside"),
                moved_to,
            ) from None

    def _move_aside(self) -> Path | None:
        """Move the file to ``ROOT/unreadable/trial-N.<time>.pt``; None if that fails."""
        aside = self.path.parent.parent / UNREADABLE_DIR
        target = (
            aside / f"{self.path.parent.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.pt"
        )
        try:
            aside.mkdir(exist_ok=True)
            os.replace(self.path, target)
        except OSError:
            return None
        return target


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
