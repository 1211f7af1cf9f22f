"""How fast each device kind trains, from ``hpo probe``, so that training seconds on
different device kinds can be compared.

``hpo probe`` stores its table on the study per device kind (user attr
``hpo_probe:<device kind>``, ``hpo.probe``): samples/s of the study's own model and
optimizer at every batch size that fitted. A device kind's speed relative to a reference
kind is the median, over the batch sizes both probed, of its samples/s over the
reference's; a trial's seconds on that kind times this factor are the seconds the
reference would have taken. A kind without a probe, or with no batch size in common with
the reference's, has no factor: its seconds stay incomparable. Pure: reads, draws nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpo.caps import PROBE_ATTR_PREFIX


def probe_rates(study_attrs: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Samples/s per batch size of every device kind the study was probed on (the rows
    that fitted, with a positive finite rate); malformed records (another tool's) are
    skipped."""
    rates: dict[str, dict[int, float]] = {}
    for key, record in study_attrs.items():
        if not key.startswith(PROBE_ATTR_PREFIX) or not isinstance(record, dict):
            continue
        rows = record.get("rows")
        mine = {}
        for row in rows if isinstance(rows, list) else ():
            rate = row.get("samples_per_s") if isinstance(row, dict) else None
            size = row.get("batch_size") if isinstance(row, dict) else None
            if not (isinstance(size, int) and row.get("fits") is True):
                continue
            if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0:
                mine[size] = float(rate)
        if mine:
            rates[key.removeprefix(PROBE_ATTR_PREFIX)] = mine
    return rates


@dataclass(frozen=True)
class SpeedFactor:
    """A device kind's probe-measured speed over the reference kind's: ``factor`` =
    median of (its samples/s / the reference's) over ``batch_sizes``, those both probed."""

    factor: float
    batch_sizes: tuple[int, ...]


def speed_factors(
    rates: Mapping[str, Mapping[int, float]], reference: str, kinds: set[str]
) -> dict[str, SpeedFactor]:
    """The factor of each of ``kinds`` that has one against ``reference`` (the reference
    itself: 1 when it was probed). Empty when the reference kind was never probed."""
    if reference not in rates:
        return {}
    base = rates[reference]
    factors = {}
    for kind in sorted(kinds):
        common = tuple(sorted(set(rates.get(kind, {})) & set(base)))
        if common:
            ratio = statistics.median(rates[kind][b] / base[b] for b in common)
            factors[kind] = SpeedFactor(ratio, common)
    return factors


def describe_factors(reference: str, factors: Mapping[str, SpeedFactor]) -> str:
    """The sentence that says how seconds were normalised, or "" when nothing was (only
    the reference kind's trials were compared)."""
    others = {kind: f for kind, f in factors.items() if kind != reference}
    if not others:
        return ""
    each = "; ".join(
        f"{kind} × {f.factor:.3g} (median over B = {', '.join(map(str, f.batch_sizes))})"
        for kind, f in others.items()
    )
    return (
        f"Training seconds normalised to {reference} by the samples/s `hpo probe` measured "
        f"on each device kind: {each}. "
    )
