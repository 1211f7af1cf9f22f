"""A plain-PyTorch trainer for hpo: its own Dataset and DataLoader, model, loss, AdamW with a
linear warmup and a cosine schedule, checkpoint and resume through the trial's context.

hpo calls ``train(ctx)`` once per trial (``[trainer] function = "own_training:train"`` in
study.toml) and searches ``ctx.params["batch_size"]``, ``["lr"]`` and ``["weight_decay"]``,
plus the study file's extra ``[search.extra.warmup_fraction]`` (``ctx.params["warmup_fraction"]``);
everything else here is the team's own code. The data is generated (two Gaussian clouds in
16 dimensions, seeded), so the example runs anywhere in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import hpo

FEATURES = 16
WARMUP_FRACTION = 0.1  # of all optimizer updates
NOISE_EVERY = 8  # measure the gradient noise scale on every 8th update


class Clouds(Dataset):
    """``size`` points of two overlapping Gaussian clouds, labels 0 and 1 (seeded)."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        centre = torch.linspace(-1.0, 1.0, FEATURES)
        noise = torch.randn(size, FEATURES, generator=generator) * 2.0
        self.points = noise + (self.labels[:, None] * 2 - 1) * centre * 0.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[index], self.labels[index]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))


def warmup_cosine(
    total_updates: int, warmup_fraction: float = WARMUP_FRACTION
) -> Callable[[int], float]:
    """The LR factor at each update: linear warmup over ``warmup_fraction`` of the
    updates, then cosine decay to 0."""
    warmup = max(1, int(warmup_fraction * total_updates))

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = (update - warmup) / max(1, total_updates - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for points, labels in loader:
        predicted = model(points.to(device)).argmax(dim=1)
        correct += int((predicted == labels.to(device)).sum())
        total += len(labels)
    return correct / total


def step_with_noise(
    ctx: hpo.TrialContext, model: nn.Module, points: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """One batch's gradient as two half-batch backward passes (the same gradient as one
    pass), with the gradient noise scale measured from them (``ctx.noise``)."""
    half = len(labels) // 2
    first = F.cross_entropy(model(points[:half]), labels[:half], reduction="sum") / len(labels)
    first.backward()
    first_sq = hpo.gradient_sq_norm(model)
    second = F.cross_entropy(model(points[half:]), labels[half:], reduction="sum") / len(labels)
    second.backward()
    ctx.noise.record_split(first_sq, hpo.gradient_sq_norm(model), half, len(labels))
    return (first + second).detach()


def train(ctx: hpo.TrialContext) -> float:
    if ctx.budget.unit != "epochs":
        raise ValueError("this trainer counts its budget in epochs")
    epochs = int(ctx.budget.amount)
    batch_size = ctx.params["batch_size"]
    train_set, val_set = Clouds(2048, seed=1), Clouds(512, seed=2)
    loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(ctx.seed),
    )  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=256)
    model = make_model().to(ctx.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=ctx.params["lr"], weight_decay=ctx.params["weight_decay"]
    )
    # An extra searched parameter of the study file; the default when the file has none.
    warmup_fraction = ctx.params.get("warmup_fraction", WARMUP_FRACTION)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs * len(loader), warmup_fraction)
    )
    start = 0
    if ctx.resume is not None:  # a retry of a trial whose worker died: go on from its state
        model.load_state_dict(ctx.resume["model"])
        optimizer.load_state_dict(ctx.resume["optimizer"])
        schedule.load_state_dict(ctx.resume["schedule"])
        loader.generator.set_state(ctx.resume["loader_rng"])
        start = ctx.resume["epoch"]
    updates = ctx.updates
    value = math.nan
    for epoch in range(start, epochs):
        model.train()
        for points, labels in loader:
            points, labels = points.to(ctx.device), labels.to(ctx.device)
            optimizer.zero_grad(set_to_none=True)
            if (updates + 1) % NOISE_EVERY == 0:
                step_with_noise(ctx, model, points, labels)
            else:
                F.cross_entropy(model(points), labels).backward()
            optimizer.step()
            schedule.step()
            updates += 1
        value = accuracy(model, val_loader, ctx.device)
        # Raises the pruning exception when the pruner stops this trial: let it go.
        ctx.report(value, samples=updates * batch_size, updates=updates)
        ctx.save_checkpoint(
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "loader_rng": loader.generator.get_state(),
            }
        )
    return value
