"""Per-trial checkpoints, so a trial whose worker died resumes instead of starting over.

After every epoch a trial writes model + optimizer + LR scheduler + grad scaler + RNG
states (torch's global CPU/CUDA generators and the trial's batch/augmentation generator)
and the run's tally (per-epoch metrics, updates, seconds) to
``ROOT/STUDY/trial-N/checkpoint.pt``, atomically (write a temporary file, fsync, rename),
so a kill at any moment leaves the previous epoch's file intact. With a ``CheckpointWriter``
(``training.checkpoint_async``, on by default) the write is off the training's critical
path: the trial's thread only copies the state to the host (``host_state``: on a GPU,
non-blocking copies an event marks done) and a background thread serializes, writes,
fsyncs and renames while training goes on; at most one write is in flight, and the trial
waits for it before it ends. A kill during that write leaves a partial temporary file and
the previous checkpoint intact; the retry resumes from the last file renamed (one epoch
earlier than a synchronous write would have given, at worst). ``N`` is the number of
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _write_durably(path: Path, data: memoryview) -> None:
    half = len(data) // 2
    with open(path, "wb") as handle:
        handle.write(data[:half])
        handle.flush()
        kill_point("checkpoint-partial")  # tests only: half the file written
        handle.write(data[half:])
        handle.flush()
        os.fsync(handle.fileno())


def run_state(run: TrainingRun) -> dict[str, Any]:
    """What a checkpoint holds; the tensors are ``run``'s own (training changes them)."""
    return {
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


def host_state(run: TrainingRun) -> tuple[dict[str, Any], torch.cuda.Event | None]:
    """A copy of ``run_state`` that training cannot change: every tensor copied to the
    host, every container new. Device tensors are copied without blocking (into pinned
    memory); the event returned (None on a CPU) is done when those copies are, and the
    writer waits for it, never the training thread."""
    on_device = False

    def copy(value: Any) -> Any:
        nonlocal on_device
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                return value.detach().clone()
            on_device = True
            return value.detach().to("cpu", non_blocking=True)
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        return value

    state = copy(run_state(run))
    ready = None
    if on_device:
        ready = torch.cuda.Event()
        ready.record()
    return state, ready


class CheckpointWriter:
    """Writes checkpoints in a background thread while training goes on (one writer per
    worker, shared by its trials; a thread per write, none left idle). ``save`` first
    waits for the write in flight, if any, so at most one host copy is held; a write that
    failed is raised by the next ``save`` (after the new write is started) or by ``wait``:
    CheckpointSaveFailed for a file-system error, as a synchronous save raises it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, checkpoint: TrialCheckpoint, run: TrainingRun) -> None:
        failed = self._finish()
        state, ready = host_state(run)
        self._thread = threading.Thread(
            target=self._write, args=(checkpoint, state, ready), name="hpo-checkpoint"
        )
        self._thread.start()
        if failed is not None:
            raise failed

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight is renamed; raise what it failed with."""
        failed = self._finish()
        if failed is not None:
            raise failed

    def _write(self, checkpoint: TrialCheckpoint, state: dict, ready: Any) -> None:
        try:
            checkpoint.write(state, ready)
        except BaseException as error:  # raised on the training thread, by _finish's caller
            self._error = error

    def _finish(self) -> BaseException | None:
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        failed, self._error = self._error, None
        return failed


@dataclass(frozen=True)
class TrialCheckpoint:
    """One trial's checkpoint file; ``save`` after each epoch, ``load_into`` on a retry."""

    path: Path
    # Writes in the background when set (``training.checkpoint_async``); else ``save``
    # returns once the file is renamed.
    writer: CheckpointWriter | None = None

    @classmethod
    def in_root(
        cls, root: Path, original_trial_number: int, writer: CheckpointWriter | None = None
    ) -> TrialCheckpoint:
        return cls(root / f"trial-{original_trial_number}" / FILE_NAME, writer)

    def save(self, run: TrainingRun) -> None:
        """Write the state after ``run``'s last completed epoch; replaces the previous file.
        With a ``writer``, the state is copied to the host and written in the background
        (``CheckpointWriter.save``: a failure is raised by the next save or the wait)."""
        if self.writer is not None:
            self.writer.save(self, run)
        else:
            self.write(run_state(run))

    def write(self, state: dict[str, Any], ready: torch.cuda.Event | None = None) -> None:
        """Serialize ``state`` (once ``ready``, its copies from the device, is done), write
        it to a temporary file, fsync, and rename it over the checkpoint.

        Raises CheckpointSaveFailed for any OSError (full disk, EIO, read-only, permission):
        the state is serialized in memory first, so every failure is a file-system one, and
        a half-written temporary file is removed, so the previous checkpoint stays valid.
        """
        if ready is not None:
            ready.synchronize()
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
                f"checkpoint {self.path} after epoch {state['epoch']} not saved: "
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
