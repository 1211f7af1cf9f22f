"""Training a CNN for one set of hyperparameters: ``train_step``, evaluation and ``fit``.

Torch only: nothing here knows about Optuna. ``hpo.objective`` turns an Optuna trial into
a call of ``fit`` (and a report/prune after every epoch through ``on_epoch``);
``hpo.probe`` times ``train_step`` at every batch size. Both use the same step, so what
the probe measures (optimizer state included) is what a trial allocates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hpo.data import DeviceBatcher, PatchSet, batch_indices, channel_stats
from hpo.device import DeviceSetup, is_out_of_memory, release_device_memory
from hpo.models import build_model
from hpo.spec import ModelSpec, SearchSpec, StudySpec, TrainingSpec, TrialParams

# Checking the loss for NaN forces a device sync; on CUDA do it every few steps only.
CUDA_FINITE_CHECK_EVERY = 16
# Train accuracy for the generalization gap is measured in eval mode on this many patches,
# after the last epoch only (see ``fit``).
TRAIN_EVAL_SAMPLES = 2048
# On CPU, evaluation runs in batches of at most this many patches: small-cnn at 48 px
# evaluated 3,265-3,753 patches/s in batches of 64 and 833-1,077 in batches of 512 on the
# shared 2-core machine (load 2.5-4.6; docs/benchmarks.md, issue 13). Eval mode: the
# metrics do not depend on the batch size.
CPU_EVAL_BATCH_MAX = 64


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float | None  # measured after the last epoch only; None before it
    val_loss: float
    val_acc: float
    val_auc: float

    def objective(self, metric: str) -> float:
        return float(getattr(self, metric))


@dataclass
class Tally:
    """What a run has done so far; saved in checkpoints, stored as user attrs."""

    updates: int = 0
    train_samples: int = 0
    train_seconds: float = 0.0
    history: list[EpochMetrics] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Tally:
        return cls(**{**saved, "history": [EpochMetrics(**m) for m in saved["history"]]})


@dataclass
class TrainingRun:
    """Everything that changes while training: exactly what a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    tally: Tally = field(default_factory=Tally)

    @property
    def epochs_done(self) -> int:
        return len(self.tally.history)


@dataclass(frozen=True)
class TrainingData:
    """The splits a run trains and evaluates on, and the batcher that prepares them."""

    train: PatchSet
    val: PatchSet
    train_probe: PatchSet  # the first patches of train, for the generalization gap
    batcher: DeviceBatcher


def autocast(setup: DeviceSetup) -> torch.autocast:
    if setup.amp_dtype is None:
        return torch.autocast(setup.device.type, enabled=False)
    return torch.autocast(setup.device.type, dtype=setup.amp_dtype)


def make_optimizer(
    model: torch.nn.Module, search: SearchSpec, params: TrialParams
) -> torch.optim.Optimizer:
    if search.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=search.momentum,
            weight_decay=params.weight_decay,
            nesterov=search.momentum > 0,
        )
    return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def build_model_on(model: ModelSpec, setup: DeviceSetup) -> torch.nn.Module:
    built = build_model(model.name, pretrained=model.pretrained).to(setup.device)
    return built.to(memory_format=torch.channels_last) if setup.channels_last else built


def build_run(
    spec: StudySpec, params: TrialParams, setup: DeviceSetup, *, seed: int
) -> TrainingRun:
    """A fresh model, optimizer, cosine schedule over ``budget.epochs`` and RNG, seeded."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model_on(spec.model, setup)
    optimizer = make_optimizer(model, spec.search, params)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.budget.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=setup.uses_grad_scaler)
    return TrainingRun(model, optimizer, scheduler, scaler, generator)


def prepare_data(
    splits: tuple[PatchSet, PatchSet], setup: DeviceSetup, training: TrainingSpec
) -> TrainingData:
    train, val = splits
    mean, std = channel_stats(train.images)
    batcher = DeviceBatcher(
        mean,
        std,
        setup.device,
        channels_last=setup.channels_last,
        color_jitter=training.color_jitter if training.augment else 0.0,
    )
    probe = train.subset(torch.arange(min(len(train), TRAIN_EVAL_SAMPLES)))
    return TrainingData(train, val, probe, batcher)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    setup: DeviceSetup,
    images: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """One optimizer update on one batch; returns the loss, detached (no device sync)."""
    with autocast(setup):
        loss = F.cross_entropy(model(images).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def binary_auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC of ``score`` for label 1 against label 0: the Mann-Whitney U statistic with
    tied scores given their average rank, equal to sklearn's ``roc_auc_score`` (tested).
    0.5 when only one class is present (AUC is undefined there).

    In torch rather than sklearn: importing ``sklearn.metrics`` (scipy with it) after torch
    took a worker 7-11 s more at load 14-16 on the shared 2-core machine (issue 13)."""
    positives = int(label.sum())
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return 0.5
    sorted_score, order = score.double().sort()
    _, group, counts = torch.unique_consecutive(
        sorted_score, return_inverse=True, return_counts=True
    )
    group_end = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    rank = (group_end - (counts.double() - 1) / 2)[group]
    positive_rank_sum = rank[label[order] == 1].sum()
    return float((positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    patches: PatchSet,
    batcher: DeviceBatcher,
    setup: DeviceSetup,
    batch_size: int,
) -> tuple[float, float, float]:
    """(loss, accuracy, AUC) on ``patches`` in eval mode. AUC is 0.5 when only one class
    is present (it is undefined there)."""
    model.eval()
    losses, probabilities, labels = [], [], []
    for indices in batch_indices(len(patches), batch_size, generator=None, drop_last=False):
        images, targets = batcher.take(patches, indices)
        with autocast(setup):
            logits = model(images)
        logits = logits.float()
        losses.append(F.cross_entropy(logits, targets, reduction="sum"))
        probabilities.append(logits.softmax(dim=1)[:, 1])
        labels.append(targets)
    probability = torch.cat(probabilities).cpu()
    label = torch.cat(labels).cpu()
    loss = float(torch.stack(losses).sum()) / len(patches)
    accuracy = float(((probability > 0.5).long() == label).float().mean())
    auc = binary_auc(probability, label)
    return loss, accuracy, auc


def evaluate_within_memory(
    model: torch.nn.Module,
    patches: PatchSet,
    batcher: DeviceBatcher,
    setup: DeviceSetup,
    batch_size: int,
) -> tuple[tuple[float, float, float], int]:
    """``evaluate``, halving the batch after an OOM (evaluation's batch size is ours to
    choose, unlike training's). Returns the metrics and the batch size that worked."""
    while True:
        try:
            return evaluate(model, patches, batcher, setup, batch_size), batch_size
        except Exception as error:
            if not is_out_of_memory(error) or batch_size == 1:
                raise
        release_device_memory(setup.device.type)
        batch_size //= 2


def train_epoch(
    run: TrainingRun,
    data: TrainingData,
    setup: DeviceSetup,
    *,
    batch_size: int,
    augment: bool,
    on_step: Callable[[float], None],
) -> float:
    """One pass over the training set (the last partial batch dropped, so every update
    sees exactly ``batch_size`` samples); returns the mean loss. Raises Diverged."""
    run.model.train()
    started = time.perf_counter()
    check_every = CUDA_FINITE_CHECK_EVERY if setup.device.type == "cuda" else 1
    loss_sum = torch.zeros((), device=setup.device)
    steps = 0
    for indices in batch_indices(
        len(data.train), batch_size, generator=run.generator, drop_last=True
    ):
        images, targets = data.batcher.take(data.train, indices, run.generator if augment else None)
        loss_sum += train_step(run.model, run.optimizer, run.scaler, setup, images, targets)
        steps += 1
        run.tally.updates += 1
        if steps % check_every == 0:
            running = float(loss_sum) / steps
            if not math.isfinite(running):
                raise Diverged(f"loss diverged at epoch {run.epochs_done + 1}, step {steps}")
            on_step(running)
    run.scheduler.step()
    train_loss = float(loss_sum) / max(steps, 1)
    run.tally.train_seconds += time.perf_counter() - started
    run.tally.train_samples += steps * batch_size
    if not math.isfinite(train_loss):
        raise Diverged(f"loss diverged at epoch {run.epochs_done + 1}")
    return train_loss


def fit(
    run: TrainingRun,
    data: TrainingData,
    setup: DeviceSetup,
    spec: StudySpec,
    params: TrialParams,
    *,
    on_step: Callable[[int, float], None] = lambda epoch, loss: None,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
) -> Tally:
    """Train from ``run``'s state (fresh or resumed) to ``budget.epochs``.

    After every epoch: evaluation on the validation set, then ``on_epoch`` (which may
    raise to stop: pruning). After the last epoch also, in eval mode, on the first
    ``TRAIN_EVAL_SAMPLES`` training patches: ``train_acc`` for the generalization gap.
    Only the last epoch's gap is read (a trial's ``train_acc`` and ``generalization_gap``
    attrs), and that pass cost 20-25% of a demo trial when it ran every epoch; measured at
    the last epoch only, it is the same measure (same patches, same mode, same weights),
    so earlier epochs carry ``train_acc = None`` and a pruned trial has no gap.
    Raises Diverged, and lets an OOM through to the caller.
    """
    training = spec.training
    eval_batch = training.eval_batch_size
    if setup.device.type == "cpu":
        eval_batch = min(eval_batch, CPU_EVAL_BATCH_MAX)
    for epoch in range(run.epochs_done + 1, spec.budget.epochs + 1):
        train_loss = train_epoch(
            run, data, setup, batch_size=params.batch_size, augment=training.augment,
            on_step=lambda loss, epoch=epoch: on_step(epoch, loss),
        )  # fmt: skip
        (val_loss, val_acc, val_auc), eval_batch = evaluate_within_memory(
            run.model, data.val, data.batcher, setup, eval_batch
        )
        train_acc = None
        if epoch == spec.budget.epochs:
            (_, train_acc, _), eval_batch = evaluate_within_memory(
                run.model, data.train_probe, data.batcher, setup, eval_batch
            )
        metrics = EpochMetrics(epoch, train_loss, train_acc, val_loss, val_acc, val_auc)
        run.tally.history.append(metrics)
        on_epoch(metrics)
    return run.tally
