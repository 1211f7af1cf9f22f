"""The state of one training run, as plain data: its tally (what checkpoints and trial
attrs hold), the run's mutable parts, the data it trains on, and one report's metrics.

Apart from ``hpo.train``, which trains them, so that what a run's helpers read
(``hpo.noise_probe``) needs no import of the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hpo.data import DeviceBatcher, PatchSet, PreparedPatches
from hpo.noise import NoiseScaleEstimate


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochMetrics:
    """One report's numbers. ``train_samples_per_s`` is the training throughput since the
    previous report (samples over training time, evaluation not counted): what a log line
    shows per epoch, where the trial's ``samples_per_s`` attr is the whole run's. None in
    checkpoints written before it was recorded."""

    epoch: int
    train_loss: float
    train_acc: float | None  # measured after the last epoch only; None before it
    val_loss: float
    val_acc: float
    val_auc: float
    train_samples_per_s: float | None = None

    def objective(self, metric: str) -> float:
        return float(getattr(self, metric))


@dataclass
class Tally:
    """What a run has done so far; saved in checkpoints, stored as user attrs."""

    updates: int = 0
    train_samples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluation at the report points (validation, train probe)
    history: list[EpochMetrics] = field(default_factory=list)
    # The gradient noise scale (hpo.noise): the running estimate and its value per epoch.
    noise: NoiseScaleEstimate = field(default_factory=NoiseScaleEstimate)
    b_simple: list[float | None] = field(default_factory=list)
    # Probes of a small-batch trial (hpo.noise_probe): how many, their examples and seconds
    # (counted in train_seconds too), which plan the next ones.
    noise_probes: int = 0
    noise_probe_examples: int = 0
    noise_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "noise": self.noise.to_dict()}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Tally:
        history = [EpochMetrics(**m) for m in saved["history"]]
        noise = NoiseScaleEstimate.from_dict(saved.get("noise") or {})  # older checkpoints
        return cls(**{**saved, "history": history, "noise": noise})


@dataclass
class TrainingRun:
    """Everything that changes while training: exactly what a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    tally: Tally = field(default_factory=Tally)
    # The pass over the training set in progress when a report fell inside it (a budget
    # not in whole epochs): its remaining batches, and how many. Not checkpointed: a run
    # resumed there starts a fresh pass.
    epoch_batches: Iterator[torch.Tensor] | None = None
    batches_left: int = 0
    # A data-parallel trial's rank group (``hpo.distributed.RankGroup``): its ``shard`` of
    # each global batch is trained, and its ``update`` averages gradients over the ranks.
    data_parallel: Any = None

    @property
    def epochs_done(self) -> int:
        """Reports done (with one report per epoch, the epochs)."""
        return len(self.tally.history)


@dataclass(frozen=True)
class TrainingData:
    """The splits a run trains and evaluates on, and the batcher that prepares them."""

    train: PatchSet
    val: PatchSet
    train_probe: PatchSet  # the first patches of train, for the generalization gap
    batcher: DeviceBatcher
    # ``val`` normalized once on the device (None when above EVAL_PREPARED_MAX_BYTES).
    val_prepared: PreparedPatches | None = None

    @property
    def val_for_eval(self) -> PatchSet | PreparedPatches:
        return self.val_prepared if self.val_prepared is not None else self.val
