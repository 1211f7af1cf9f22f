"""Per-trial checkpoints, so a trial whose worker died resumes instead of starting over.

After every epoch a trial writes model + optimizer + LR scheduler + grad scaler + epoch + RNG
states (torch's global CPU/CUDA generators and the trial's batch/augmentation generator) and
the per-trial counters to ``ROOT/STUDY/trial-N/checkpoint.pt``, atomically (write a
temporary file, then rename), so a kill at any moment leaves the previous epoch's file
intact. ``N`` is the number of the *original* trial: a retry (Optuna's
``RetryHeartbeatStaleTrialCallback`` re-queues a vanished trial under a new number, with
system attr ``failed_trial``) finds the checkpoint of the trial it replaces.

``ROOT`` is ``$HPO_CHECKPOINT_DIR``, else the spec's ``training.checkpoint_dir``, else
``./hpo-checkpoints``. For a retry to resume on another node it must be a directory every
node mounts at that path.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a shared directory must not
be a way to run code on every node.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.spec import StudySpec

CHECKPOINT_ENV = "HPO_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = Path("hpo-checkpoints")
FILE_NAME = "checkpoint.pt"


def checkpoint_root(spec: StudySpec) -> Path:
    """The study's checkpoint directory (absolute; see the module docstring for the order)."""
    configured = os.environ.get(CHECKPOINT_ENV) or spec.training.checkpoint_dir
    return (Path(configured) if configured else DEFAULT_CHECKPOINT_DIR).resolve() / spec.name


def trial_system_attrs(trial: optuna.Trial | FrozenTrial) -> dict[str, Any]:
    """A trial's system attrs (where Optuna's retry callback notes ``failed_trial`` and
    ``retry_history``). A live ``optuna.Trial`` does not expose them, so read its frozen
    copy from the study."""
    study = getattr(trial, "study", None)
    if isinstance(trial, FrozenTrial) or study is None:
        return dict(getattr(trial, "system_attrs", {}))
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number:
            return dict(frozen.system_attrs)
    return {}


def original_trial_number(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the first trial in a retry chain (the trial's own number if not a retry)."""
    return int(trial_system_attrs(trial).get("failed_trial", trial.number))


@dataclass(frozen=True)
class TrialCheckpoint:
    """One trial's checkpoint file; ``save`` after each epoch, ``resume`` when the trial starts."""

    path: Path

    @classmethod
    def for_trial(cls, root: Path, trial: optuna.Trial | FrozenTrial) -> TrialCheckpoint:
        return cls(root / f"trial-{original_trial_number(trial)}" / FILE_NAME)

    def save(
        self,
        epoch: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        generator: torch.Generator,
        extra: dict[str, Any],
    ) -> None:
        """Write the state after ``epoch`` (1-based) completed; replaces the previous file."""
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "extra": extra,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def resume(
        self,
        trial: optuna.Trial,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        generator: torch.Generator,
    ) -> tuple[int, dict[str, Any] | None]:
        """Load the last saved state into the given objects, if there is one.

        Returns ``(epochs already completed, extra)``, or ``(0, None)`` when the trial starts
        fresh. A retried trial gets user attrs ``retry_of`` (the trial it replaces) and
        ``resumed_from_epoch`` (0 when no checkpoint was found).
        """
        history = trial_system_attrs(trial).get("retry_history") or []
        if not history:
            return 0, None
        trial.set_user_attr("retry_of", int(history[-1]))
        if not self.path.is_file():
            trial.set_user_attr("resumed_from_epoch", 0)
            return 0, None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        cuda_states = state["cuda_rng"]
        if (
            cuda_states
            and torch.cuda.is_available()
            and len(cuda_states) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(cuda_states)
        epoch = int(state["epoch"])
        trial.set_user_attr("resumed_from_epoch", epoch)
        return epoch, state["extra"]


_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


def remove_finished_checkpoints(root: Path, study: optuna.Study) -> list[Path]:
    """Delete the checkpoints of finished trials, except the best trial's; returns what went.

    A checkpoint is kept while any trial of its retry chain is RUNNING or WAITING (a
    vanished trial is still RUNNING until its grace period ends). The directory is listed
    before the trials are read, so a trial that starts meanwhile is seen as running.
    """
    if not root.is_dir():
        return []
    directories = [path for path in root.iterdir() if path.name.startswith("trial-")]
    trials = study.get_trials(deepcopy=False)
    keep = {original_trial_number(t) for t in trials if t.state in _UNFINISHED}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        keep.add(original_trial_number(study.best_trial))
    removed = []
    for directory in directories:
        number = directory.name.removeprefix("trial-")
        if number.isdigit() and int(number) not in keep:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed
