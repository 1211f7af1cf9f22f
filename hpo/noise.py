"""The gradient noise scale B_simple = tr(Σ) / |G|², measured inside normal training steps
(at B ≥ 64; a smaller batch measures by probes at a larger one, ``hpo.noise_probe``).

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training") show that the
critical batch size, above which a bigger batch buys throughput but not fewer steps, is
about B_simple (Σ: the per-example gradient covariance, G: the true gradient). Appendix A
estimates both from the squared norms of gradients over two batch sizes B_small < B_big:

    |G|²  ≈ (B_big·|g_big|² − B_small·|g_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

Each is unbiased but noisy, so the two are averaged separately (exponential moving
averages, bias-corrected as in Adam) and only then divided. ``noise_scale_step`` gets the
two norms from one ordinary update: the batch's two halves are forwarded and backpropagated
one after the other (the gradient after the first half gives g_1, the rest g_2, after both
g_big; the small batch's |g_small|² is the mean of |g_1|² and |g_2|²), so there is no extra
forward pass and the optimizer sees the full batch's mean gradient.
A model with batch norm normalizes each half with its own statistics on a measured step.
A batch trained as accumulation micro-batches (``training.above_cap = "accumulate"``) is
split already: the first micro-batch is the small batch and the whole batch the big one
(``record_split_measurement``), so measuring there changes nothing in the update.

Torch only; nothing here knows about Optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Measure on every k-th update. A measured update took 1.09x (B = 128) to 1.14x (B = 64) a
# plain one on the 2-core CPU (docs/benchmarks.md, noise_overhead.py): at k = 32 at most
# 0.4% of samples/s, inside the 3% budget.
NOISE_SCALE_EVERY = 32
# A trial too short for this many measurements at k = NOISE_SCALE_EVERY measures more often
# (``noise_every_for``): an interval from fewer than 8 pairs is mostly unbounded. On the
# demo B = 128 (64 updates) measures every 8th update, 1.1% of its training, and B = 64
# every 16th, 0.9% (docs/benchmarks.md).
NOISE_SCALE_MIN_MEASUREMENTS = 8


def noise_every_for(total_updates: int | None) -> int:
    """k for a trial of ``total_updates`` updates: NOISE_SCALE_EVERY, or less so that the
    trial gets NOISE_SCALE_MIN_MEASUREMENTS measurements (at least every 2nd update; a
    budget in seconds, whose length is unknown, keeps the default)."""
    if total_updates is None:
        return NOISE_SCALE_EVERY
    return max(2, min(NOISE_SCALE_EVERY, total_updates // NOISE_SCALE_MIN_MEASUREMENTS))


# EMA decay per measurement: an effective window of ~100 measurements (~3200 updates at k=32).
NOISE_SCALE_DECAY = 0.99


@dataclass
class NoiseScaleEstimate:
    """Bias-corrected EMAs of the unbiased |G|² and tr(Σ) estimates.

    The fields are floats after loading and 0-d tensors on the training device while
    training (no device sync per measurement); ``to_dict`` turns them into floats.
    """

    decay: float = NOISE_SCALE_DECAY
    gradient_sq: Any = 0.0  # EMA of the |G|² estimate (not yet bias-corrected)
    trace: Any = 0.0  # EMA of the tr(Σ) estimate
    weight: Any = 0.0  # 1 − decay^n over the n finite measurements (the bias correction)
    # Plain running sums of the per-measurement estimates (n, Σg, Σt, Σg², Σt², Σgt), for
    # the trial's B_simple as a ratio of means and its interval (``fieller_interval``).
    sums: dict[str, Any] = field(default_factory=dict)

    def update(
        self, small_sq: torch.Tensor, big_sq: torch.Tensor, small_batch: int, big_batch: int
    ) -> None:
        """Fold in one measurement: squared gradient norms over ``small_batch`` and
        ``big_batch`` examples (``small_batch < big_batch``). A non-finite pair (an fp16
        overflow step) is skipped without a device sync."""
        if not 0 < small_batch < big_batch:
            raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch}, {big_batch}")
        gradient_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
        trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
        finite = torch.isfinite(gradient_sq) & torch.isfinite(trace)
        self._fold(gradient_sq, trace, finite, gradient_sq.reshape(1), trace.reshape(1))

    def update_parts(self, gram: torch.Tensor, part_size: int) -> None:
        """Fold in one probe (``hpo.noise_probe``): ``gram`` the K × K Gram matrix of the
        mean-loss gradients of K independent passes of ``part_size`` examples each. |G|² is
        the mean of g_i·g_j over the pairs i ≠ j (unbiased), tr(Σ) is part_size times the
        mean |g_i|² less that. The moving averages take the probe's pair; the sums take its
        K jackknife pseudo-values (leave one pass out), whose spread is the probe's own
        error, and count the probe in ``sums["probes"]`` (Fieller's degrees of freedom are
        n − probes)."""
        parts = gram.shape[0]
        if parts < 3:
            raise ValueError(f"a probe needs at least 3 passes for its pseudo-values, got {parts}")
        diagonal = gram.diagonal()
        diagonal_sum, total = diagonal.sum(), gram.sum()

        def pair(off_diagonal: torch.Tensor, diagonal_sum: torch.Tensor, k: int):
            gradient_sq = off_diagonal / (k * (k - 1))
            return gradient_sq, part_size * (diagonal_sum / k - gradient_sq)

        gradient_sq, trace = pair(total - diagonal_sum, diagonal_sum, parts)
        cross = gram.sum(dim=1) - diagonal  # each pass's dot products with the others
        left_g, left_t = pair(
            total - diagonal_sum - 2 * cross, diagonal_sum - diagonal, parts - 1
        )  # fmt: skip
        pseudo_g = parts * gradient_sq - (parts - 1) * left_g
        pseudo_t = parts * trace - (parts - 1) * left_t
        finite = torch.isfinite(pseudo_g).all() & torch.isfinite(pseudo_t).all()
        self._fold(gradient_sq.float(), trace.float(), finite, pseudo_g.float(), pseudo_t.float())
        self.sums["probes"] = self.sums.get("probes", 0.0) + finite.float()

    def _fold(
        self,
        gradient_sq: torch.Tensor,
        trace: torch.Tensor,
        finite: torch.Tensor,
        values_g: torch.Tensor,
        values_t: torch.Tensor,
    ) -> None:
        """The moving averages take (gradient_sq, trace); the running sums take each pair
        of ``values_g`` and ``values_t`` — all skipped, without a device sync, unless
        ``finite``."""
        keep = torch.where(finite, self.decay, 1.0)
        self.gradient_sq = keep * self.gradient_sq + (1 - keep) * gradient_sq.nan_to_num(0.0)
        self.trace = keep * self.trace + (1 - keep) * trace.nan_to_num(0.0)
        self.weight = keep * self.weight + (1 - keep)
        used = finite.float()  # 1 for a finite measurement, 0 for a skipped one
        g, t = values_g.nan_to_num(0.0) * used, values_t.nan_to_num(0.0) * used
        for key, value in (
            ("n", used * values_g.numel()),
            ("g", g.sum()),
            ("t", t.sum()),
            ("gg", (g * g).sum()),
            ("tt", (t * t).sum()),
            ("gt", (g * t).sum()),
        ):
            self.sums[key] = self.sums.get(key, 0.0) + value

    def b_simple(self) -> float | None:
        """tr(Σ) / |G|², or None before any measurement or while either average is not
        positive: each is a difference of noisy norms, and with few measurements (a short
        epoch at a large batch) the |G|² average, or more rarely the tr(Σ) one, can come
        out ≤ 0, where the ratio is no noise scale at all (the demo stored -33 once)."""
        weight, gradient_sq, trace = (float(v) for v in (self.weight, self.gradient_sq, self.trace))
        if weight <= 0 or gradient_sq <= 0 or trace <= 0 or not math.isfinite(trace / gradient_sq):
            return None
        return trace / gradient_sq

    def float_sums(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.sums.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "decay": float(self.decay),
            "gradient_sq": float(self.gradient_sq),
            "trace": float(self.trace),
            "weight": float(self.weight),
            "sums": self.float_sums(),
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> NoiseScaleEstimate:
        return cls(**{**saved, "sums": dict(saved.get("sums") or {})})


def gradient_sq_norm(model: torch.nn.Module) -> torch.Tensor:
    """Sum of squares of all parameter gradients, as a float32 0-d tensor (no sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().square()


def noise_scale_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: torch.autocast,
    images: torch.Tensor,
    targets: torch.Tensor,
    estimate: NoiseScaleEstimate,
) -> torch.Tensor:
    """One optimizer update on the batch, done as two half-batch backward passes whose
    gradients sum to the batch's mean gradient, and one noise-scale measurement folded
    into ``estimate``. Returns the batch's mean loss, detached (no device sync unless the
    fp16 grad scaler is on). ``autocast`` is the context the forward runs under."""
    batch = targets.shape[0]
    half = batch // 2
    if half == 0:
        raise ValueError("a noise-scale step needs a batch of at least 2")
    optimizer.zero_grad(set_to_none=True)
    losses = []
    first: list[torch.Tensor] = []
    for part in (slice(0, half), slice(half, batch)):
        with autocast:
            loss = F.cross_entropy(model(images[part]).float(), targets[part], reduction="sum")
        loss = loss / batch
        scaler.scale(loss).backward()
        losses.append(loss.detach())
        if not first:  # the first half's gradient, kept to take the second's as the rest
            first = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    record_halves(estimate, scaler, first, grads, half, batch)
    scaler.step(optimizer)
    scaler.update()
    return losses[0] + losses[1]


def record_halves(
    estimate: NoiseScaleEstimate,
    scaler: torch.amp.GradScaler,
    first: list[torch.Tensor],
    total: list[torch.Tensor],
    half: int,
    batch: int,
) -> None:
    """Fold one measurement from a batch split in two passes (``noise_scale_step``):
    ``first`` the gradients after the first pass (``half`` examples, its loss weighted
    half/batch), ``total`` after both. The small batch is both halves: the mean of
    |g_1|² and |g_2|² (g_2 from the rest, total − first), which with equal halves makes
    the |G|² estimate g_1·g_2, the product of two independent half-batch gradients, with
    less variance than |g_1|² alone (which the pair falls back to for an odd batch)."""
    if len(first) != len(total) or not total:
        return
    first_sq = sum(f.float().square().sum() for f in first)
    total_sq = sum(t.float().square().sum() for t in total)
    rest_sq = sum((t.float() - f.float()).square().sum() for f, t in zip(first, total, strict=True))
    unscale = scaler.get_scale() ** -2 if scaler.is_enabled() else 1.0
    small_sq = first_sq * (batch / half) ** 2
    if batch == 2 * half:
        small_sq = (small_sq + rest_sq * (batch / half) ** 2) / 2
    estimate.update(small_sq * unscale, total_sq * unscale, half, batch)


def record_split_measurement(
    estimate: NoiseScaleEstimate,
    scaler: torch.amp.GradScaler,
    first_sq: torch.Tensor,
    total_sq: torch.Tensor,
    first_size: int,
    total_size: int,
) -> None:
    """Fold one measurement from a batch split into passes whose losses are weighted by
    their share of the batch (``noise_scale_step``'s halves, or the accumulation
    micro-batches of ``hpo.train.train_step_accumulated``): ``first_sq`` is the squared
    gradient norm after the first pass's backward (``first_size`` examples), ``total_sq``
    after all of them (``total_size``). The first pass's gradient is
    (first_size/total_size)·g_small, so |g_small|² is ``first_sq`` rescaled by the square
    of the inverse; under the fp16 grad scaler both norms are unscaled first."""
    unscale = scaler.get_scale() ** -2 if scaler.is_enabled() else 1.0
    small_sq = first_sq * unscale * (total_size / first_size) ** 2
    estimate.update(small_sq, total_sq * unscale, first_size, total_size)
