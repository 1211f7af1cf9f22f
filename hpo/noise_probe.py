"""The gradient noise scale of a small-batch trial, measured by a probe at a larger batch.

B_simple = tr(Σ)/|G|² is a property of the current weights, not of the batch the trial
trains with. Measured from the training batch's own halves (``hpo.noise.noise_scale_step``),
the |G|² estimate g_1·g_2 of halves of b examples has a noise SD of about √tr(Σ²)/b: at
B = 8 (b = 4) each measurement is 10-30× noisier than the |G|² it estimates on the demo
task, and measuring more often cannot recover that within a few percent of the training
(the error of the mean falls as 1/(b·√n), its cost grows as b·n).

So a trial at B < ``NOISE_PROBE_MIN_TRAIN_BATCH`` measures with probes instead: on a few
updates, before the step, passes of ``NOISE_PROBE_PART`` freshly drawn training examples
are forwarded and backpropagated at the current weights (each pass normalized by its own
batch statistics, as a micro-batch is: with batch norm the passes, not single examples,
are the independent units), their gradients' Gram matrix taken, and the gradients
discarded. The update, optimizer state, batch-norm running statistics, torch's RNG
streams and the trial's batch generator are left exactly as they were (the probe draws
from its own generator, seeded by the trial's seed and the update count), so the trial
trains bit-identically with or without probes (tested). The |G|² estimate is the mean
over pairs of passes of g_i·g_j (a U-statistic: with K passes of m its noise variance is
2K/(K − 1)·tr(Σ²)/(Km)², against 4·tr(Σ²)/(Km)² for two halves of the same examples),
tr(Σ) the passes' mean |g_i|² less that, times m; each probe adds its K jackknife
pseudo-values to the trial's sums, so one probe already carries its own error (Fieller's
interval with n − probes degrees of freedom, ``hpo.noise_interval``).

How many: the probes may take ``NOISE_PROBE_SHARE`` of the trial's training time, at their
measured cost (every pass is timed), spread evenly over the trial (``probe_plan``). Few
large probes beat many small ones: a probe's |G|² error falls as 1/M in its M examples,
the mean of n probes' as 1/√n.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hpo.device import autocast
from hpo.noise import NoiseScaleEstimate

if TYPE_CHECKING:
    from hpo.device import DeviceSetup
    from hpo.resource import TrainingBudget
    from hpo.training_state import Tally, TrainingData, TrainingRun

# A probe's passes: NOISE_PROBE_PART examples each, at least NOISE_PROBE_MIN_PARTS (its
# pseudo-values need 3) and at most NOISE_PROBE_MAX_PARTS (the passes' gradients are held
# until the Gram matrix is taken: 8 copies of the parameters).
NOISE_PROBE_PART = 64
NOISE_PROBE_MIN_PARTS = 3
NOISE_PROBE_MAX_PARTS = 8
# A trial at a batch size below this probes; at or above it the training batch's halves
# measure (``noise_scale_step``), a fraction of a step there (1.10x a plain step at B = 64
# on the 2-core CPU): on the demo, B = 64's trials measured a two-sided pooled interval
# from their halves (8 each, 0.6% of training) and none from probes at 2.5% (3 passes).
NOISE_PROBE_MIN_TRAIN_BATCH = 64
# The share of a trial's training time its probes may take (the overhead is ≤ 3%).
NOISE_PROBE_SHARE = 0.025
# Seconds per probe example last measured in this process, per model class, input shape
# and device: a later trial plans its first probe from it.
_SECONDS_PER_EXAMPLE: dict[tuple[Any, ...], float] = {}


def probe_gram(
    model: torch.nn.Module,
    scaler: torch.amp.GradScaler,
    autocast: torch.autocast,
    parts: Iterator[tuple[torch.Tensor, torch.Tensor]],
    go_on: Callable[[int], bool] = lambda done: True,
) -> torch.Tensor:
    """The Gram matrix (float64, K × K) of the mean-loss gradients of the batches
    ``parts`` yields, one forward/backward pass each, unscaled from the fp16 grad scaler;
    after each pass ``go_on(passes done)`` says whether to take the next one. Leaves the
    model's gradients None; the caller saves and restores buffers and RNG."""
    flats = []
    for images, targets in parts:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images).float(), targets)
        scaler.scale(loss).backward()
        grads = [
            p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None
        ]
        flats.append(torch.cat(grads))
        if not go_on(len(flats)):
            break
    model.zero_grad(set_to_none=True)
    stacked = torch.stack(flats)
    gram = (stacked @ stacked.T).double()
    return gram * scaler.get_scale() ** -2 if scaler.is_enabled() else gram


def probe_seed(run: TrainingRun) -> int:
    """The probe's own seed at this update: the trial's seed and its update count, so a
    resumed trial draws what an uninterrupted one would have."""
    return (run.generator.initial_seed() * 1_000_003 + run.tally.updates + 1) % 2**63


def run_probe(
    run: TrainingRun, data: TrainingData, setup: DeviceSetup, *, augment: bool, allowance: float
) -> None:
    """One probe at the current weights, folded into ``run.tally.noise``: passes of
    NOISE_PROBE_PART fresh examples until the next would take it past ``allowance``
    seconds (from the passes timed so far; synchronized on a GPU), within
    NOISE_PROBE_MIN_PARTS..NOISE_PROBE_MAX_PARTS. Everything training reads is as it was
    before."""
    model = run.model
    started = _now(setup)
    generator = torch.Generator().manual_seed(probe_seed(run))
    size = max(1, min(NOISE_PROBE_PART, len(data.train) // NOISE_PROBE_MAX_PARTS))
    order = torch.randperm(len(data.train), generator=generator)
    augmenter = generator if augment else None
    parts = (
        data.batcher.take(data.train, order[k * size : (k + 1) * size], augmenter)
        for k in range(NOISE_PROBE_MAX_PARTS)
    )

    def go_on(done: int) -> bool:
        elapsed = _now(setup) - started
        return done < NOISE_PROBE_MIN_PARTS or elapsed * (done + 1) / done <= allowance

    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(setup.device) if setup.device.type == "cuda" else None
    try:
        gram = probe_gram(model, run.scaler, autocast(setup), parts, go_on)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, setup.device)
    run.tally.noise.update_parts(gram, size)
    run.tally.noise_probes += 1
    run.tally.noise_probe_examples += gram.shape[0] * size
    run.tally.noise_seconds += _now(setup) - started


def probe_plan(
    tally: Tally, fraction: float, batch_size: int, per_example: float | None = None
) -> tuple[bool, float | None]:
    """(whether the trial probes at all, the seconds the next probe may take if one is due
    before the next update, else None); ``fraction`` of the trial's budget is spent
    (``TrainingBudget.fraction``).

    The trial's planned training time is its plain training so far over ``fraction``, and
    its probes may take NOISE_PROBE_SHARE of that: as many examples as that buys at the
    probe's seconds per example (measured on this trial's probes, else ``per_example``:
    the last probe's in this process, else the training's own, an upper bound: a pass of
    NOISE_PROBE_PART is no slower per example than a smaller batch). It probes when that
    buys NOISE_PROBE_MIN_PARTS passes, or once it has probed. Bigger probes beat more of
    them (a probe's |G|² error falls as 1/M, the mean of n probes' as 1/√n), so it takes
    one probe per NOISE_PROBE_MAX_PARTS passes it affords, the i-th due at (i − ½)/n of
    the budget, each allowed an equal share of what is left."""
    plain = tally.train_seconds - tally.noise_seconds
    if fraction <= 0 or plain <= 0 or tally.updates == 0:
        return tally.noise_probes > 0, None
    if tally.noise_probe_examples:
        per_example = tally.noise_seconds / tally.noise_probe_examples
    elif per_example is None:
        per_example = plain / (tally.updates * batch_size)
    allowed = NOISE_PROBE_SHARE * plain / fraction
    passes = allowed / (per_example * NOISE_PROBE_PART)
    probing = tally.noise_probes > 0 or passes >= NOISE_PROBE_MIN_PARTS
    probes = max(1, round(passes / NOISE_PROBE_MAX_PARTS))
    if not probing or tally.noise_probes >= math.floor(probes * fraction + 0.5):
        return probing, None
    allowance = (allowed - tally.noise_seconds) / (probes - tally.noise_probes)
    enough = NOISE_PROBE_MIN_PARTS * NOISE_PROBE_PART * per_example
    return probing, allowance if allowance >= enough else None


def noise_probe_for(
    run: TrainingRun,
    data: TrainingData,
    setup: DeviceSetup,
    budget: TrainingBudget,
    batch_size: int,
    augment: bool,
    micro_batch_size: int | None,
) -> Callable[[TrainingRun], bool] | None:
    """What ``hpo.train.train_epoch`` calls before every update of a trial that may probe
    (``uses_probe``; None for other trials): a probe when one is due (``probe_plan``).
    Returns whether the trial probes; one that does not (too short for a probe in its
    share of time) measures with the training batch's halves instead, and its first
    probe, when the plan finds one affordable after all, replaces those measurements."""
    if not uses_probe(batch_size, micro_batch_size, run.data_parallel):
        return None
    key = (type(run.model).__name__, tuple(data.train.images.shape[1:]), str(setup.device))

    def maybe_probe(run: TrainingRun) -> bool:
        fraction = budget.fraction(run.tally.updates, run.tally.train_seconds)
        probing, allowance = probe_plan(
            run.tally, fraction, batch_size, _SECONDS_PER_EXAMPLE.get(key)
        )
        if allowance is not None:
            if run.tally.noise_probes == 0:  # the halves' measurements, if any, give way
                run.tally.noise = NoiseScaleEstimate()
            run_probe(run, data, setup, augment=augment, allowance=allowance)
            _SECONDS_PER_EXAMPLE[key] = run.tally.noise_seconds / run.tally.noise_probe_examples
        return probing

    return maybe_probe


def uses_probe(batch_size: int, micro_batch_size: int | None, data_parallel: Any) -> bool:
    """Whether a trial measures by probes: a batch below NOISE_PROBE_MIN_TRAIN_BATCH,
    trained in one pass on one process (accumulation and data-parallel trials measure
    from their own split of the batch)."""
    accumulating = micro_batch_size is not None and micro_batch_size < batch_size
    return batch_size < NOISE_PROBE_MIN_TRAIN_BATCH and not accumulating and data_parallel is None


def _now(setup: DeviceSetup) -> float:
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    return time.perf_counter()
