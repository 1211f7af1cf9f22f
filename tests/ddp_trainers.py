"""A user's data-parallel trainer for tests/test_ddp.py (``[trainer] function =
"tests.ddp_trainers:linear"``): a linear classifier trained on a fixed synthetic set, each
rank on its share of every global batch, gradients averaged with ``ctx.average_gradients``;
every rank saves what it ended with, so the test can compare the ranks with each other and
with ``single_process``, the same training in one process on the whole batches."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import hpo

FEATURES = 8
STEPS_PER_REPORT = 4


def _data(batch_size: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(steps, batch_size, FEATURES, generator=generator)
    labels = (features[..., 0] + 0.5 * features[..., 1] > 0).long()
    return features, labels


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(FEATURES, 2)


def linear(ctx: hpo.TrialContext) -> float:
    batch_size, lr = ctx.params["batch_size"], ctx.params["lr"]
    steps = STEPS_PER_REPORT * ctx.budget.reports
    features, labels = _data(batch_size, steps)
    model = _model(ctx.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    token = ctx.broadcast(f"from rank {ctx.rank}")
    share = slice(ctx.rank * ctx.local_batch_size, (ctx.rank + 1) * ctx.local_batch_size)
    loss = torch.zeros(())
    for step in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(features[step][share]), labels[step][share])
        loss.backward()
        ctx.average_gradients(model)
        optimizer.step()
        if (step + 1) % STEPS_PER_REPORT == 0:
            ctx.report(-float(loss.detach()), samples=(step + 1) * batch_size, updates=step + 1)
    assert ctx.checkpoint_dir is not None
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seen = {"token": token, "local_batch_size": ctx.local_batch_size, "lr": lr,
            "world_size": ctx.world_size, "state": model.state_dict()}  # fmt: skip
    torch.save(seen, ctx.checkpoint_dir / f"rank-{ctx.rank}.pt")
    return -float(loss.detach())


def single_process(seed: int, batch_size: int, lr: float, reports: int) -> dict[str, torch.Tensor]:
    """``linear``'s training in one process on the whole batches: its final weights."""
    steps = STEPS_PER_REPORT * reports
    features, labels = _data(batch_size, steps)
    model = _model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(features[step]), labels[step]).backward()
        optimizer.step()
    return model.state_dict()


def fails_on_rank_1(ctx: hpo.TrialContext) -> float:
    """Rank 1 raises before the first collective; rank 0 waits in it."""
    if ctx.rank == 1:
        raise ValueError("rank 1's data loader broke")
    ctx.broadcast("never received")
    ctx.report(0.5)
    return 0.5


def out_of_memory_on_rank_1(ctx: hpo.TrialContext) -> float:
    """Rank 1 runs out of memory before the first collective; rank 0 waits in it."""
    if ctx.rank == 1:
        raise MemoryError("no room for the activations")
    ctx.broadcast("never received")
    ctx.report(0.5)
    return 0.5


def hangs_on_rank_1(ctx: hpo.TrialContext) -> float:
    """Rank 1 never reaches the first collective; rank 0 waits in it until the timeout."""
    if ctx.rank == 1:
        time.sleep(3600)
    ctx.broadcast("never received")
    ctx.report(0.5)
    return 0.5
