"""One trial's training loop: set up, loop over epochs, step, evaluate, report, prune.

Reads top to bottom in ``run_trial``. Device details sit in ``select_device``: CUDA gets
AMP (bf16 where supported, else fp16 with a grad scaler), channels_last and
cudnn.benchmark; a CPU gets channels_last and bf16 autocast when it has bf16 instructions.
On this project's reference CPU (AMD EPYC, avx512_bf16) that was 3.9× for a small CNN and
1.9× for ResNet-18 over fp32 NCHW; ``training.mixed_precision = false`` turns it off.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import optuna
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from hpo.checkpoint import TrialCheckpoint, original_trial_number
from hpo.data import DeviceBatcher, PatchSet, batch_indices, channel_stats, load_splits
from hpo.models import build_model
from hpo.probe import (
    CLAMPED_ATTR,
    clamp_batch_size,
    lower_batch_cap,
    read_batch_cap,
    release_device_memory,
)
from hpo.space import TrialParams, sample_params
from hpo.spec import StudySpec, TrainingSpec

# Checking the loss for NaN forces a device sync; on CUDA do it every few steps only.
CUDA_FINITE_CHECK_EVERY = 16
# Train accuracy for the generalization gap is measured in eval mode on this many patches.
TRAIN_EVAL_SAMPLES = 2048


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of device memory. The trial is FAIL with ``fail_reason = "oom"``,
    the device's batch-size cap is already lowered and memory freed: a worker catches this
    (``study.optimize(catch=...)``) and goes on with the next trial."""


@dataclass(frozen=True)
class DeviceSetup:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        """A device kind name (``cpu``, ``NVIDIA H100 80GB HBM3``) for stored results."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    @property
    def uses_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.amp_dtype == torch.float16


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX); without them
    bf16 autocast on CPU is emulated and slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def keep_freed_memory_in_process() -> None:
    """Stop glibc from handing freed blocks over 128 KiB back to the OS (Linux, CPU training).

    On CPU every batch and activation is such a block: glibc unmaps it when freed and the
    next step page-faults fresh zeroed pages back in. Raising the mmap and trim thresholds
    (what jemalloc/tcmalloc do for PyTorch's CPU recipes) keeps them in the heap. Measured
    here: input pipeline (64×3×96×96 batches, 2 threads) 4.5k → 11k samples/s.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum on 64-bit
    libc.mallopt(m_trim_threshold, 1 * 2**30)


def select_device(training: TrainingSpec) -> DeviceSetup:
    """The device and numerics a trial runs with, from the spec and what is present."""
    want_cuda = training.device == "cuda" or (
        training.device == "auto" and torch.cuda.is_available()
    )
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("training.device = 'cuda' but no CUDA device is visible")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        amp = None
        if training.mixed_precision:
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceSetup(torch.device("cuda"), amp, training.channels_last)
    keep_freed_memory_in_process()
    amp = torch.bfloat16 if training.mixed_precision and cpu_supports_bf16() else None
    return DeviceSetup(torch.device("cpu"), amp, training.channels_last)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_auc: float

    def objective(self, metric: str) -> float:
        return float(getattr(self, metric))


class TrialProgress(Protocol):
    """What the training loop tells the terminal. Implemented in ``hpo.worker``."""

    def start(self, trial_number: int, params: TrialParams, epochs: int, steps: int) -> None: ...

    def step(self, epoch: int, loss: float) -> None: ...

    def epoch_end(self, metrics: EpochMetrics, objective_name: str) -> None: ...

    def finish(self) -> None: ...


class _Silent:
    def start(self, trial_number: int, params: TrialParams, epochs: int, steps: int) -> None:
        pass

    def step(self, epoch: int, loss: float) -> None:
        pass

    def epoch_end(self, metrics: EpochMetrics, objective_name: str) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class _Tally:
    """Per-trial counters that become user attributes."""

    updates: int = 0
    train_samples: int = 0
    train_seconds: float = 0.0
    history: list[EpochMetrics] = field(default_factory=list)


def _autocast(setup: DeviceSetup):
    if setup.amp_dtype is None:
        return torch.autocast(setup.device.type, enabled=False)
    return torch.autocast(setup.device.type, dtype=setup.amp_dtype)


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
        with _autocast(setup):
            logits = model(images)
        logits = logits.float()
        losses.append(F.cross_entropy(logits, targets, reduction="sum"))
        probabilities.append(logits.softmax(dim=1)[:, 1])
        labels.append(targets)
    probability = torch.cat(probabilities).cpu()
    label = torch.cat(labels).cpu()
    loss = float(torch.stack(losses).sum()) / len(patches)
    accuracy = float(((probability > 0.5).long() == label).float().mean())
    auc = 0.5 if label.unique().numel() < 2 else float(roc_auc_score(label, probability))
    return loss, accuracy, auc


def evaluate_within_memory(
    model: torch.nn.Module,
    patches: PatchSet,
    batcher: DeviceBatcher,
    setup: DeviceSetup,
    batch_size: int,
) -> tuple[tuple[float, float, float], int]:
    """``evaluate``, halving the batch after a CUDA OOM (evaluation's batch size is ours
    to choose, unlike training's). Returns the metrics and the batch size that worked."""
    while True:
        try:
            return evaluate(model, patches, batcher, setup, batch_size), batch_size
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
        release_device_memory(setup.device.type)
        batch_size //= 2


def _optimizer(
    model: torch.nn.Module, spec: StudySpec, params: TrialParams
) -> torch.optim.Optimizer:
    if spec.search.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=spec.search.momentum,
            weight_decay=params.weight_decay,
            nesterov=spec.search.momentum > 0,
        )
    return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def _record(trial: optuna.Trial, tally: _Tally, started: float, spec: StudySpec) -> None:
    """Store the per-trial metrics as user attributes (also on pruned trials)."""
    attrs: dict[str, float | int] = {
        "epochs_completed": len(tally.history),
        "n_updates": tally.updates,
        "samples_per_s": tally.train_samples / tally.train_seconds if tally.train_seconds else 0.0,
        "wall_time_s": time.perf_counter() - started,
    }
    if tally.history:
        last = tally.history[-1]
        attrs.update(
            val_auc=last.val_auc,
            val_acc=last.val_acc,
            val_loss=last.val_loss,
            train_acc=last.train_acc,
            train_loss=last.train_loss,
            generalization_gap=last.train_acc - last.val_acc,
            best_val_auc=max(m.val_auc for m in tally.history),
            best_val_acc=max(m.val_acc for m in tally.history),
            best_val_loss=min(m.val_loss for m in tally.history),
        )
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def run_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    *,
    splits: tuple[PatchSet, PatchSet] | None = None,
    progress: TrialProgress | None = None,
    checkpoint: TrialCheckpoint | None = None,
) -> float:
    """Train one trial and return the objective at the last epoch.

    Reports the objective after every epoch (step = epoch, 1-based) and raises
    ``optuna.TrialPruned`` when the pruner says so (``fail_reason = "pruned"``) or when the
    loss turns NaN/inf (``fail_reason = "diverged"``). ``splits`` lets a worker load the
    data once for many trials. ``checkpoint`` is written after every epoch; a retried trial
    resumes from it (``hpo.checkpoint``).
    """
    started = time.perf_counter()
    progress = progress or _Silent()
    params = sample_params(trial, spec)
    training = spec.training
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    setup = select_device(training)
    trial.set_user_attr("device", setup.name)
    study = getattr(trial, "study", None)  # absent on optuna.trial.FixedTrial
    cap = read_batch_cap(study, setup.name) if study is not None else None
    if clamp_batch_size(params.batch_size, cap) != params.batch_size:
        # An enqueued trial, or the cap fell since the sampler drew: never train a size
        # known not to fit.
        trial.set_user_attr(CLAMPED_ATTR, params.batch_size)
        params = dataclasses.replace(params, batch_size=clamp_batch_size(params.batch_size, cap))
        trial.set_user_attr("batch_size", params.batch_size)
    trial.set_user_attr(
        "precision", str(setup.amp_dtype).removeprefix("torch.") if setup.amp_dtype else "float32"
    )

    train_set, val_set = splits if splits is not None else load_splits(spec.dataset)
    train_probe = train_set.subset(torch.arange(min(len(train_set), TRAIN_EVAL_SAMPLES)))
    mean, std = channel_stats(train_set.images)
    batcher = DeviceBatcher(
        mean,
        std,
        setup.device,
        channels_last=setup.channels_last,
        color_jitter=training.color_jitter if training.augment else 0.0,
    )

    seed = spec.seed + original_trial_number(trial)  # a retry replays its original
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(spec.model.name, pretrained=spec.model.pretrained).to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, spec, params)
    epochs = spec.budget.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=setup.uses_grad_scaler)
    check_every = CUDA_FINITE_CHECK_EVERY if setup.device.type == "cuda" else 1
    metric = spec.objective.metric
    steps_per_epoch = len(train_set) // params.batch_size
    tally = _Tally()
    start_epoch = 0
    if checkpoint is not None:
        start_epoch, saved = checkpoint.resume(
            trial, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            generator=generator,
        )  # fmt: skip
        if saved is not None:
            tally = _Tally(**{**saved, "history": [EpochMetrics(**m) for m in saved["history"]]})
    eval_batch = training.eval_batch_size
    progress.start(trial.number, params, epochs, steps_per_epoch)

    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=setup.device)
            steps = 0
            for indices in batch_indices(
                len(train_set), params.batch_size, generator=generator, drop_last=True
            ):
                images, targets = batcher.take(
                    train_set, indices, generator if training.augment else None
                )
                with _autocast(setup):
                    loss = F.cross_entropy(model(images).float(), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach()
                steps += 1
                tally.updates += 1
                if steps % check_every == 0:
                    running = float(loss_sum) / steps
                    if not math.isfinite(running):
                        trial.set_user_attr("fail_reason", "diverged")
                        raise optuna.TrialPruned(f"loss diverged at epoch {epoch}, step {steps}")
                    progress.step(epoch, running)
            scheduler.step()
            train_loss = float(loss_sum) / max(steps, 1)
            tally.train_seconds += time.perf_counter() - epoch_start
            tally.train_samples += steps * params.batch_size
            if not math.isfinite(train_loss):
                trial.set_user_attr("fail_reason", "diverged")
                raise optuna.TrialPruned(f"loss diverged at epoch {epoch}")

            (val_loss, val_acc, val_auc), eval_batch = evaluate_within_memory(
                model, val_set, batcher, setup, eval_batch
            )
            (_, train_acc, _), eval_batch = evaluate_within_memory(
                model, train_probe, batcher, setup, eval_batch
            )
            metrics = EpochMetrics(epoch, train_loss, train_acc, val_loss, val_acc, val_auc)
            tally.history.append(metrics)
            progress.epoch_end(metrics, metric)

            value = metrics.objective(metric)
            if not math.isfinite(value):
                trial.set_user_attr("fail_reason", "diverged")
                raise optuna.TrialPruned(f"{metric} is {value} at epoch {epoch}")
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("fail_reason", "pruned")
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric} = {value:.4f}")
            if checkpoint is not None:
                checkpoint.save(
                    epoch, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                    generator=generator, extra=asdict(tally),
                )  # fmt: skip
        return tally.history[-1].objective(metric)
    except torch.cuda.OutOfMemoryError:
        trial.set_user_attr("fail_reason", "oom")
    finally:
        _record(trial, tally, started, spec)
        progress.finish()
    # Only an OOM gets here. Its traceback (which held the activations) is gone now, so
    # dropping the last references and emptying the cache really frees the memory.
    model = optimizer = scheduler = images = targets = loss = loss_sum = None  # noqa: F841
    release_device_memory(setup.device.type)
    new_cap = lower_batch_cap(study, setup.name, params.batch_size) if study is not None else None
    trial.set_user_attr("batch_size_cap_after_oom", new_cap)
    raise TrialOutOfMemory(
        f"trial {trial.number}: out of memory on {setup.name} at batch size "
        f"{params.batch_size}; cap for this device is now {new_cap}"
    )
