"""Training a CNN for one set of hyperparameters: ``train_step``, evaluation and ``fit``.

Torch only: nothing here knows about Optuna. ``hpo.objective`` turns an Optuna trial into
a call of ``fit`` (and a report/prune after every epoch through ``on_epoch``);
``hpo.probe`` times ``train_step`` at every batch size. Both use the same step, so what
the probe measures (optimizer state included) is what a trial allocates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from hpo.data import (
    DeviceBatcher,
    PatchSet,
    PreparedPatches,
    batch_indices,
    channel_stats,
    num_classes,
)
from hpo.device import DeviceSetup, autocast, is_out_of_memory, release_device_memory
from hpo.models import build_model
from hpo.noise import (
    NOISE_SCALE_EVERY,
    NoiseScaleEstimate,
    gradient_sq_norm,
    noise_every_for,
    noise_scale_step,
    record_split_measurement,
)
from hpo.noise_probe import noise_probe_for
from hpo.resource import TrainingBudget, cosine_factor
from hpo.spec import ModelSpec, SearchSpec, StudySpec, TrainingSpec, TrialParams
from hpo.training_state import Diverged, EpochMetrics, Tally, TrainingData, TrainingRun

# Checking the loss for NaN forces a device sync; on CUDA do it every few steps only.
CUDA_FINITE_CHECK_EVERY = 16
# Train accuracy for the generalization gap is measured in eval mode on at most this many
# patches, and no more than the validation split has (the accuracy it is compared with is
# no more precise), after the last epoch only (see ``fit``). Capped by the validation size,
# the pass costs at most one evaluation: at 4,096 training / 512 validation patches and 2
# epochs, 2,048 probe patches were 8% of a trial, more than all its validation passes (6%;
# docs/benchmarks.md).
TRAIN_EVAL_SAMPLES = 2048
# On CPU, evaluation runs in batches of at most this many patches. From a prepared
# validation split, small-cnn evaluated about as fast at 64 to 512 (32 px: 8,186 patches/s
# at 64, 8,525 at 256, 7,698 at 512; 48 px: 3,553 · 3,420 · 3,245; load 2), but inside a
# trial, between training steps, the passes at 512 took 0.13-0.14 s per epoch against
# 0.18-0.23 at 64 (docs/benchmarks.md). Eval mode: the accuracy and AUC do not depend on
# the batch size (the loss's sum order does, in the 7th digit).
CPU_EVAL_BATCH_MAX = 256
# The validation split is normalized on the device once per trial and evaluated at every
# report from that copy when it fits in this many bytes (float32: 9,700 patches at 48 px,
# 2,400 at 96 px); larger splits are prepared batch by batch at every report. On CPU that
# preparation was ~20% of an evaluation pass (demo, small-cnn, B = 64: 2,465 vs 3,163
# patches/s without it, load 6.5; docs/benchmarks.md).
EVAL_PREPARED_MAX_BYTES = 256 * 2**20


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


def build_model_on(model: ModelSpec, setup: DeviceSetup, *, num_classes: int) -> torch.nn.Module:
    """The model on the device in its memory format, with a ``num_classes``-wide head
    (``hpo.data.num_classes``: no default, so no caller gets a head for another dataset)."""
    built = build_model(
        model.name, pretrained=model.pretrained, factory=model.factory, num_classes=num_classes
    )
    built = built.to(setup.device)
    return built.to(memory_format=torch.channels_last) if setup.channels_last else built


def build_run(
    spec: StudySpec,
    params: TrialParams,
    setup: DeviceSetup,
    *,
    seed: int,
) -> TrainingRun:
    """A fresh model (its head sized for the spec's dataset, ``hpo.data.num_classes``;
    compiled with ``training.compile``), optimizer, cosine schedule over ``budget.epochs``
    and RNG, seeded.

    (With ``budget.unit`` steps or seconds the epoch-wise scheduler is not stepped: ``fit``
    sets the cosine LR before every update from the share of the budget spent.)"""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model_on(spec.model, setup, num_classes=num_classes(spec.dataset))
    if spec.training.compile:
        # In place: the state dict keeps its keys, so checkpoints load either way. A later
        # model of the same architecture in this process reuses the compiled graph (no new
        # compile, measured), and other processes read inductor's on-disk cache.
        model.compile(mode=spec.training.compile_mode)
    optimizer = make_optimizer(model, spec.search, params)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.budget.epochs or 1)
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
    probe = train.subset(torch.arange(min(len(train), len(val), TRAIN_EVAL_SAMPLES)))
    val_prepared = batcher.prepare(val, max_bytes=EVAL_PREPARED_MAX_BYTES)
    return TrainingData(train, val, probe, batcher, val_prepared)


def train_step_accumulated(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    setup: DeviceSetup,
    images: torch.Tensor,
    targets: torch.Tensor,
    micro_batch_size: int,
    noise: NoiseScaleEstimate | None = None,
) -> torch.Tensor:
    """One optimizer update on one batch, run as forward/backward passes of
    ``micro_batch_size`` samples whose gradients add up to the whole batch's: each pass's
    mean loss is weighted by its share of the batch. Returns the batch's mean loss,
    detached. Without BatchNorm the update equals ``train_step``'s (to float tolerance);
    with it, each pass normalizes by its own micro-batch statistics.

    With ``noise`` given, the micro-batches double as the noise scale's two batch sizes
    (``hpo.noise.record_split_measurement``): the gradient's squared norm after the first
    micro-batch's backward is the small batch, after the last one the whole batch. No
    extra forward pass and the update is unchanged: only two norms are taken."""
    optimizer.zero_grad(set_to_none=True)
    total = images.shape[0]
    loss_sum = torch.zeros((), device=images.device)
    parts = list(zip(images.split(micro_batch_size), targets.split(micro_batch_size), strict=True))
    first_sq = None
    for part_images, part_targets in parts:
        with autocast(setup):
            loss = F.cross_entropy(model(part_images).float(), part_targets)
        weighted = loss * (part_images.shape[0] / total)
        scaler.scale(weighted).backward()
        loss_sum += weighted.detach()
        if noise is not None and first_sq is None and len(parts) > 1:
            first_sq = gradient_sq_norm(model)
    if first_sq is not None:
        record_split_measurement(
            noise, scaler, first_sq, gradient_sq_norm(model), parts[0][1].shape[0], total
        )
    scaler.step(optimizer)
    scaler.update()
    return loss_sum


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
    took a worker 7-11 s more at load 14-16 on the shared 2-core machine."""
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


def _eval_batches(
    patches: PatchSet | PreparedPatches, batcher: DeviceBatcher, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``patches`` in order, ``batch_size`` at a time, ready for the model: slices of a
    prepared split, else each batch drawn and prepared now."""
    if isinstance(patches, PreparedPatches):
        for start in range(0, len(patches), batch_size):
            stop = start + batch_size
            yield patches.images[start:stop], patches.labels[start:stop]
        return
    for indices in batch_indices(len(patches), batch_size, generator=None, drop_last=False):
        yield batcher.take(patches, indices)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    patches: PatchSet | PreparedPatches,
    batcher: DeviceBatcher,
    setup: DeviceSetup,
    batch_size: int,
) -> tuple[float, float, float]:
    """(loss, accuracy, AUC) on ``patches`` in eval mode (a split, or one already prepared
    by ``DeviceBatcher.prepare``: the same numbers, without preparing it again). AUC is the
    tumour class's ROC AUC for two classes and the macro one-vs-rest AUC for more (the
    mean over the classes present of each class's ROC AUC against the rest); 0.5 when
    only one class is present (it is undefined there)."""
    model.eval()
    losses, probabilities, labels = [], [], []
    for images, targets in _eval_batches(patches, batcher, batch_size):
        with autocast(setup):
            logits = model(images)
        logits = logits.float()
        losses.append(F.cross_entropy(logits, targets, reduction="sum"))
        probabilities.append(logits.softmax(dim=1))
        labels.append(targets)
    probability = torch.cat(probabilities).cpu()
    label = torch.cat(labels).cpu()
    loss = float(torch.stack(losses).sum()) / len(patches)
    present = label.unique()
    if probability.shape[1] == 2:
        accuracy = float(((probability[:, 1] > 0.5).long() == label).float().mean())
        return loss, accuracy, binary_auc(probability[:, 1], label)
    accuracy = float((probability.argmax(dim=1) == label).float().mean())
    if present.numel() < 2:
        return loss, accuracy, 0.5
    per_class = [binary_auc(probability[:, c], (label == c).long()) for c in present.tolist()]
    return loss, accuracy, float(sum(per_class) / len(per_class))


def evaluate_within_memory(
    model: torch.nn.Module,
    patches: PatchSet | PreparedPatches,
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
    stop_at: Callable[[Tally], bool] | None = None,
    lr_factor: Callable[[Tally], float] | None = None,
    sync_every_step: bool = False,
    micro_batch_size: int | None = None,
    noise_every: int = NOISE_SCALE_EVERY,
    noise_probe: Callable[[TrainingRun], bool] | None = None,
) -> float:
    """One pass over the training set (the last partial batch dropped, so every update
    sees exactly ``batch_size`` samples); returns the mean loss. Raises Diverged.

    ``stop_at`` ends the pass early, after the first update at which it holds; the next
    call goes on with the same pass. ``lr_factor`` sets the LR before every update to the
    base LR times its value (a schedule in updates or seconds); without it the epoch-wise
    scheduler steps once at the end of each full pass. ``sync_every_step`` waits for the
    device after every update, so the time counted is the time the update took.
    ``micro_batch_size`` (below ``batch_size``) accumulates gradients over passes of that
    many samples (``train_step_accumulated``). Every ``noise_every``-th update (0: never)
    also measures the gradient noise scale into ``run.tally.noise``: from the first
    micro-batch and the whole batch when accumulating, else from two half-batch passes
    (``hpo.noise.noise_scale_step``), unless ``noise_probe`` (called before every update)
    measures it by a probe at a larger batch instead (``hpo.noise_probe``).
    """
    run.model.train()
    on_gpu = setup.device.type == "cuda" and not sync_every_step
    check_every = CUDA_FINITE_CHECK_EVERY if on_gpu else 1
    loss_sum = torch.zeros((), device=setup.device)
    steps = 0
    last = time.perf_counter()
    for indices in _pass_batches(run, data, batch_size):
        if lr_factor is not None:
            set_lr_factor(run, lr_factor(run.tally))
        images, targets = data.batcher.take(data.train, indices, run.generator if augment else None)
        probed = noise_probe is not None and noise_probe(run)  # then the halves do not measure
        every = 0 if probed else noise_every
        loss_sum += _update(run, setup, images, targets, micro_batch_size, every)
        steps += 1
        run.batches_left -= 1
        count_update(run.tally, batch_size, since=last)
        last = time.perf_counter()
        if steps % check_every == 0:
            running = float(loss_sum) / steps
            if not math.isfinite(running):
                raise Diverged(f"loss diverged at epoch {run.epochs_done + 1}, step {steps}")
            on_step(running)
        if stop_at is not None and stop_at(run.tally):
            break
    _end_pass_if_done(run, step_scheduler=lr_factor is None)
    train_loss = float(loss_sum) / max(steps, 1)
    run.tally.train_seconds += time.perf_counter() - last  # the device finishing its queue
    if not math.isfinite(train_loss):
        raise Diverged(f"loss diverged at epoch {run.epochs_done + 1}")
    return train_loss


def _end_pass_if_done(run: TrainingRun, *, step_scheduler: bool) -> None:
    """After the pass's last batch: the next call starts a new pass, and the epoch-wise
    scheduler (a schedule without ``lr_factor``) steps."""
    if run.batches_left == 0:
        run.epoch_batches = None
        if step_scheduler:
            run.scheduler.step()


def _pass_batches(run: TrainingRun, data: TrainingData, batch_size: int) -> Iterator[torch.Tensor]:
    """The batches left in the current pass over the training set (a new shuffled pass
    when the last one ended; the same on every rank of a data-parallel trial); a pass
    stopped at a report point goes on next time."""
    if run.epoch_batches is None:
        run.epoch_batches = batch_indices(
            len(data.train), batch_size, generator=run.generator, drop_last=True
        )
        run.batches_left = len(data.train) // batch_size
    if run.data_parallel is not None:  # this rank's slice of each global batch
        return map(run.data_parallel.shard, run.epoch_batches)
    return run.epoch_batches


def _update(
    run: TrainingRun,
    setup: DeviceSetup,
    images: torch.Tensor,
    targets: torch.Tensor,
    micro_batch_size: int | None,
    noise_every: int,
) -> torch.Tensor:
    """One optimizer update on one batch: accumulated over micro-batches when the batch is
    above them, else a plain step. Every ``noise_every``-th update also measures the
    gradient noise scale: from the micro-batches when accumulating, else as a step of two
    half-batch passes (``noise_scale_step``)."""
    if run.data_parallel is not None:  # the noise scale comes with every update there
        return run.data_parallel.update(run, setup, images, targets, micro_batch_size)
    batch_size = images.shape[0]
    measure = bool(noise_every) and (run.tally.updates + 1) % noise_every == 0
    if micro_batch_size is not None and micro_batch_size < batch_size:
        return train_step_accumulated(
            run.model, run.optimizer, run.scaler, setup, images, targets, micro_batch_size,
            run.tally.noise if measure else None,
        )  # fmt: skip
    if measure and batch_size >= 2:
        return noise_scale_step(
            run.model, run.optimizer, run.scaler, autocast(setup), images, targets,
            run.tally.noise,
        )  # fmt: skip
    return train_step(run.model, run.optimizer, run.scaler, setup, images, targets)


def count_update(tally: Tally, batch_size: int, *, since: float) -> None:
    """Count one optimizer update of ``batch_size`` samples that started at ``since``."""
    tally.updates += 1
    tally.train_samples += batch_size
    tally.train_seconds += time.perf_counter() - since


def set_lr_factor(run: TrainingRun, factor: float) -> None:
    """Every parameter group's LR becomes its base LR times ``factor``."""
    for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * factor


def train_to_report(
    run: TrainingRun,
    data: TrainingData,
    setup: DeviceSetup,
    budget: TrainingBudget,
    report: int,
    *,
    batch_size: int,
    augment: bool,
    on_step: Callable[[float], None],
    micro_batch_size: int | None = None,
) -> float:
    """Train until ``budget``'s report point ``report``: whole passes, the last one
    stopped where the report falls. Returns the mean training loss since the last report
    (NaN when the report point was already reached). With one report per epoch this is
    exactly one ``train_epoch``. The noise scale is measured by probes at a small batch
    (``hpo.noise_probe``), else every ``hpo.noise.noise_every_for(total updates)``-th
    update: more often in a short trial."""

    def reached(tally: Tally) -> bool:
        return budget.reached(report, tally.updates, tally.train_seconds)

    def cosine(tally: Tally) -> float:
        return cosine_factor(budget.fraction(tally.updates, tally.train_seconds))

    probe = noise_probe_for(run, data, setup, budget, batch_size, augment, micro_batch_size)
    losses: list[tuple[float, int]] = []
    while not reached(run.tally):
        before = run.tally.updates
        loss = train_epoch(
            run, data, setup, batch_size=batch_size, augment=augment, on_step=on_step,
            stop_at=reached, lr_factor=None if budget.unit == "epochs" else cosine,
            sync_every_step=budget.unit == "seconds", micro_batch_size=micro_batch_size,
            noise_every=noise_every_for(budget.total_updates), noise_probe=probe,
        )  # fmt: skip
        losses.append((loss, run.tally.updates - before))
    if len(losses) == 1:
        return losses[0][0]
    updates = sum(count for _, count in losses)
    return sum(loss * count for loss, count in losses) / updates if updates else math.nan


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
    """Train from ``run``'s state (fresh or resumed) to the end of its budget.

    The budget is ``budget.epochs``, ``budget.steps`` or ``budget.seconds`` by
    ``budget.unit`` (``hpo.resource``). At each of its ``reports`` evenly spaced report
    points (by default after every epoch): evaluation on the validation set and the
    gradient noise scale's estimate appended to ``tally.b_simple``, then ``on_epoch`` with
    ``metrics.epoch`` = the report number, which may raise to stop (pruning). After the
    last report also, in eval mode, on the first training patches (``TRAIN_EVAL_SAMPLES``,
    at most as many as the validation split has):
    ``train_acc`` for the generalization gap. Only the last report's gap is read (a
    trial's ``train_acc`` and ``generalization_gap`` attrs), and that pass cost 20-25% of
    a demo trial when it ran every epoch; measured at the end only, it is the same measure
    (same patches, same mode, same weights), so earlier reports carry ``train_acc = None``
    and a pruned trial has no gap. Raises Diverged, and lets an OOM through to the caller.
    """
    training = spec.training
    eval_batch = training.eval_batch_size
    if setup.device.type == "cpu":
        eval_batch = min(eval_batch, CPU_EVAL_BATCH_MAX)
    budget = TrainingBudget.for_trial(spec.budget, len(data.train), params.batch_size)
    for epoch in range(run.epochs_done + 1, budget.reports + 1):
        samples_before, seconds_before = run.tally.train_samples, run.tally.train_seconds
        train_loss = train_to_report(
            run, data, setup, budget, epoch, batch_size=params.batch_size,
            augment=training.augment, on_step=lambda loss, epoch=epoch: on_step(epoch, loss),
            micro_batch_size=params.micro_batch_size,
        )  # fmt: skip
        eval_started = time.perf_counter()
        (val_loss, val_acc, val_auc), eval_batch = evaluate_within_memory(
            run.model, data.val_for_eval, data.batcher, setup, eval_batch
        )
        run.tally.b_simple.append(run.tally.noise.b_simple())
        train_acc = None
        if epoch == budget.reports:
            (_, train_acc, _), eval_batch = evaluate_within_memory(
                run.model, data.train_probe, data.batcher, setup, eval_batch
            )
        run.tally.eval_seconds += time.perf_counter() - eval_started
        seconds = run.tally.train_seconds - seconds_before
        samples_per_s = (run.tally.train_samples - samples_before) / seconds if seconds else None
        metrics = EpochMetrics(
            epoch, train_loss, train_acc, val_loss, val_acc, val_auc, samples_per_s
        )
        run.tally.history.append(metrics)
        on_epoch(metrics)
    return run.tally
