"""The gradient noise scale of a small-batch trial, measured by a probe at a larger batch.

B_simple = tr(Σ)/|G|² is a property of the current weights, not of the batch the trial
trains with. Measured from the training batch's own halves (``hpo.noise.noise_scale_step``),
the |G|² estimate g_1·g_2 of halves of b examples has a noise SD of about √tr(Σ²)/b: at
B = 8 (b = 4) each measurement is 10-30× noisier than the |G|² it estimates on the demo
task, and measuring more often cannot recover that within a few percent of the training
(the error of the mean falls as 1/(b·√n), its cost grows as b·n).

So a trial at B < ``NOISE_PROBE_MIN_TRAIN_BATCH`` measures with a probe instead: on a few
updates, before the step, ``NOISE_PROBE_BATCH`` freshly drawn training examples are
forwarded and backpropagated at the current weights in ``NOISE_PROBE_PARTS`` passes (each
normalized by its own batch statistics, as a micro-batch is: with batch norm the passes,
not single examples, are the independent units), their gradients' Gram matrix taken, and
the gradients discarded. The update, optimizer state, batch-norm running statistics,
torch's RNG streams and the trial's batch generator are left exactly as they were (the
probe draws from its own generator, seeded by the trial's seed and the update count, so
a resumed trial draws the same examples), so the trial trains bit-identically with or
without probes (tested). The |G|² estimate is the mean over pairs of passes of g_i·g_j (a
U-statistic: with K parts its noise variance is 2K/(K − 1)·tr(Σ²)/M², 1.5× below two
halves of the same M at K = 4), tr(Σ) the passes' mean |g_i|² less that, times the part
size; each probe adds its K jackknife pseudo-values to the trial's sums, so a single probe
already carries its own error (Fieller's interval with n − probes degrees of freedom,
``hpo.noise_interval``).

How many probes: as many as ``NOISE_PROBE_SHARE`` of the trial's training time pays for,
at the probe's measured cost (timed on every probe; the first of a process is placed at
5% of the trial, before its cost is known), spread evenly over the trial.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hpo.device import DeviceSetup
    from hpo.resource import TrainingBudget
    from hpo.train import Tally, TrainingData, TrainingRun

# Examples per probe, in this many forward/backward passes of NOISE_PROBE_BATCH / PARTS.
NOISE_PROBE_BATCH = 256
NOISE_PROBE_PARTS = 4
# A trial at a batch size below this probes; at or above it the training batch's halves
# measure (``noise_scale_step``), which costs a fraction of a step there.
NOISE_PROBE_MIN_TRAIN_BATCH = 128
# The share of a trial's training time its probes may take (the overhead is ≤ 3%).
NOISE_PROBE_SHARE = 0.025
# Before a probe has been timed in this process, the first one is placed here (share of
# the trial's budget), early enough to leave room for the rest.
NOISE_PROBE_FIRST_AT = 0.05

# The last measured seconds of one probe, per model class, input shape and device: a
# later trial of the same model plans its probes from it before timing its own.
_PROBE_SECONDS: dict[tuple[Any, ...], float] = {}


def probe_gram(
    model: torch.nn.Module,
    scaler: torch.amp.GradScaler,
    autocast: torch.autocast,
    images: torch.Tensor,
    targets: torch.Tensor,
    parts: int = NOISE_PROBE_PARTS,
) -> torch.Tensor:
    """The Gram matrix (float64, parts × parts) of the mean-loss gradients of ``images``
    split into ``parts`` equal passes, unscaled from the fp16 grad scaler. Leaves the
    model's gradients None; the caller saves and restores buffers and RNG."""
    size = images.shape[0] // parts
    if size < 1 or parts < 2:
        raise ValueError(f"a probe needs at least 2 parts of 1 example, got {images.shape[0]}")
    flats = []
    for part in range(parts):
        window = slice(part * size, (part + 1) * size)
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images[window]).float(), targets[window])
        scaler.scale(loss).backward()
        grads = [
            p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None
        ]
        flats.append(torch.cat(grads))
    model.zero_grad(set_to_none=True)
    stacked = torch.stack(flats)
    gram = (stacked @ stacked.T).double()
    return gram * scaler.get_scale() ** -2 if scaler.is_enabled() else gram


def probe_seed(run: TrainingRun) -> int:
    """The probe's own seed at this update: the trial's seed and its update count, so a
    resumed trial draws what an uninterrupted one would have."""
    return (run.generator.initial_seed() * 1_000_003 + run.tally.updates + 1) % 2**63


def run_probe(run: TrainingRun, data: TrainingData, setup: DeviceSetup, *, augment: bool) -> float:
    """One probe at the current weights, folded into ``run.tally.noise``; returns its
    seconds (synchronized on a GPU). Everything training reads is as it was before."""
    from hpo.train import autocast

    model = run.model
    started = _now(setup)
    generator = torch.Generator().manual_seed(probe_seed(run))
    size = NOISE_PROBE_BATCH // NOISE_PROBE_PARTS
    count = min(len(data.train), NOISE_PROBE_BATCH) // size * size
    indices = torch.randperm(len(data.train), generator=generator)[:count]
    images, targets = data.batcher.take(data.train, indices, generator if augment else None)
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(setup.device) if setup.device.type == "cuda" else None
    try:
        gram = probe_gram(model, run.scaler, autocast(setup), images, targets, count // size)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, setup.device)
    run.tally.noise.update_parts(gram, size)
    seconds = _now(setup) - started
    _PROBE_SECONDS[_cost_key(run, data, setup)] = seconds
    run.tally.noise_probes += 1
    run.tally.noise_seconds += seconds
    return seconds


def probe_due(tally: Tally, fraction: float, cost: float | None) -> bool:
    """Whether to probe before the next update, ``fraction`` of the trial's budget spent
    (``hpo.resource.TrainingBudget.fraction``) at ``tally``'s pace, one probe taking
    ``cost`` seconds (None: not yet timed in this process). The trial's planned training
    time is its plain training so far over ``fraction``; it affords ⌊share · planned /
    cost⌋ probes, the i-th due at (i − ½)/n of the budget, and never more than the share
    of the time planned."""
    plain = tally.train_seconds - tally.noise_seconds
    if fraction <= 0 or plain <= 0:
        return False
    if cost is None:
        return tally.noise_probes == 0 and fraction >= NOISE_PROBE_FIRST_AT
    planned = plain / fraction
    affordable = int(NOISE_PROBE_SHARE * planned / cost)
    due = math.floor(affordable * fraction + 0.5)
    return tally.noise_probes < due and tally.noise_seconds + cost <= NOISE_PROBE_SHARE * planned


def probe_cost(run: TrainingRun, data: TrainingData, setup: DeviceSetup) -> float | None:
    """Seconds of one probe: this trial's mean so far, else the last one timed in this
    process for the same model, input and device, else None."""
    if run.tally.noise_probes:
        return run.tally.noise_seconds / run.tally.noise_probes
    return _PROBE_SECONDS.get(_cost_key(run, data, setup))


def noise_probe_for(
    run: TrainingRun,
    data: TrainingData,
    setup: DeviceSetup,
    budget: TrainingBudget,
    batch_size: int,
    augment: bool,
    micro_batch_size: int | None,
) -> Callable[[TrainingRun], None] | None:
    """What ``hpo.train.train_epoch`` calls before every update of a trial that probes
    (``uses_probe``): a probe when one is due (``probe_due``); None for other trials."""
    if not uses_probe(batch_size, micro_batch_size, run.data_parallel):
        return None

    def maybe_probe(run: TrainingRun) -> None:
        fraction = budget.fraction(run.tally.updates, run.tally.train_seconds)
        if probe_due(run.tally, fraction, probe_cost(run, data, setup)):
            run_probe(run, data, setup, augment=augment)

    return maybe_probe


def uses_probe(batch_size: int, micro_batch_size: int | None, data_parallel: Any) -> bool:
    """Whether a trial measures by probes: a batch below NOISE_PROBE_MIN_TRAIN_BATCH,
    trained in one pass on one process (accumulation and data-parallel trials measure
    from their own split of the batch)."""
    accumulating = micro_batch_size is not None and micro_batch_size < batch_size
    return batch_size < NOISE_PROBE_MIN_TRAIN_BATCH and not accumulating and data_parallel is None


def _cost_key(run: TrainingRun, data: TrainingData, setup: DeviceSetup) -> tuple[Any, ...]:
    return (type(run.model).__name__, tuple(data.train.images.shape[1:]), str(setup.device))


def _now(setup: DeviceSetup) -> float:
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    return time.perf_counter()
